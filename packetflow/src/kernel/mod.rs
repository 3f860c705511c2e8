//! The kernel side seen from userspace: loading and attaching the eBPF programs, reading
//! their maps, this kernel's BTF, and who holds an interface's XDP slot.

pub mod btf;
pub mod connections;
pub mod drops;
pub mod hook_kinds;
pub mod hooks;
pub mod interfaces;
pub mod loader;
pub mod readout;
pub mod run_stats;
pub mod xdp_owner;
