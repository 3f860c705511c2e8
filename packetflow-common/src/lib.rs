//! Types shared by the eBPF programs (`packetflow-ebpf`) and the userspace daemon.
//!
//! Everything here is `#[repr(C)]`, `Copy`, has explicit padding and a compile-time size
//! check, so the kernel and user views of a record can never drift apart. With the `user`
//! feature the types also implement `aya::Pod` so userspace can put them in maps.
#![no_std]

pub mod blast;
pub mod capture;
pub mod config;
pub mod conn;
pub mod counters;
pub mod drop;
pub mod event;
pub mod stage;
pub mod summary;

pub use config::{Filter, MAX_FILTER_HOSTS, MAX_FILTER_IFACES, MAX_FILTER_PORTS, Offsets};
pub use conn::ConnStage;
pub use event::{Event, Kind, RecvSlot, SendSlot, payload_key};
pub use stage::{NUM_STAGES, Stage};

/// Number of ring-buffer shards the programs write to (`RB0`..`RB7`); a record goes to
/// shard `cpu % RING_SHARDS`, so at most `ncpus / RING_SHARDS` CPUs share one ring.
pub const RING_SHARDS: usize = 8;

/// Compile-time size assertion (kunai style): a struct that grows past its budget fails the
/// build, not the verifier.
#[macro_export]
macro_rules! assert_size {
    ($t:ty, $n:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $n);
    };
}
