//! `packetflow blast`: what userspace tells the generator's XDP program
//! (packetflow-ebpf/src/probes/blast.rs), and where it writes in the frame.

/// Offset of the UDP source port in the frame (Ethernet, IPv4 without options).
pub const SPORT_OFF: usize = 14 + 20;
/// Offset of the UDP payload: `[cpu: u32 BE][frame number on that CPU: u64 BE]` first.
pub const PAYLOAD_OFF: usize = 14 + 20 + 8;
/// The smallest frame the generator builds (Ethernet's minimum without the FCS).
pub const MIN_FRAME: usize = 60;

/// The same for every CPU (a one-entry array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlastConfig {
    /// Source ports used: `base_port .. base_port + flows`, one per frame in turn.
    pub flows: u32,
    pub base_port: u32,
}
crate::assert_size!(BlastConfig, 8);

/// One CPU's sending (a per-CPU array): the program sends while `sent < limit` and the
/// time is before `stop_ns`, one frame per `interval_ns` (0: as fast as it runs); every
/// other run of the program sends nothing (XDP_DROP of the run's own frame), which is
/// how a live-frame run, which cannot sleep, keeps a rate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlastState {
    /// Frames this CPU sent: also the number written into the next one.
    pub sent: u64,
    pub limit: u64,
    pub interval_ns: u64,
    /// When the next frame is due (monotonic ns).
    pub next_ns: u64,
    /// No frame at or after this time (monotonic ns).
    pub stop_ns: u64,
}
crate::assert_size!(BlastState, 40);

/// How far behind its schedule a CPU may fall and then catch up in a burst.
pub const CATCH_UP_NS: u64 = 100_000;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), u32/u64 fields only, no padding (sizes pinned above); every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::BlastConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BlastState {}
}
