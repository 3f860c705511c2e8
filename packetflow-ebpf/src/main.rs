//! packetflow's kernel side: every program that timestamps a packet on its way.
//!
//! `probes/` holds one file per group of hooks; `parse.rs` turns packet bytes (from XDP, TC,
//! cgroup_skb or a kernel `sk_buff`) into an [`Event`]; `kernel.rs` reads kernel structs
//! through offsets that userspace found in the running kernel's BTF; `emit.rs` writes
//! records and counts what it could not write.
#![no_std]
#![feature(core_intrinsics)]
#![allow(internal_features)]
#![no_main]

mod emit;
mod filter;
mod kernel;
mod maps;
mod parse;
mod probes;
mod summary;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Never reached: the verifier rejects programs that could panic.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
