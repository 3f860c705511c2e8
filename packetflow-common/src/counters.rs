//! Indices into the per-CPU `COUNTERS` array. Nothing the tracer loses is silent: every
//! failed ring-buffer write and every attribution it could not make has a counter here.

use crate::NUM_STAGES;

/// `LOST + stage`: records a hook could not write because its ring shard was full.
pub const LOST: u32 = 0;
/// `EMITTED + stage`: records written.
pub const EMITTED: u32 = NUM_STAGES as u32;
/// Packets the XDP/TC programs parsed as IPv4/IPv6 TCP/UDP.
pub const PARSED_XDP: u32 = 2 * NUM_STAGES as u32;
pub const UNPARSED_XDP: u32 = PARSED_XDP + 1;
pub const PARSED_TC: u32 = PARSED_XDP + 2;
pub const UNPARSED_TC: u32 = PARSED_XDP + 3;
/// Socket buffers the tracepoint hooks could not parse (not IP, truncated, read failed).
pub const UNPARSED_SKB: u32 = PARSED_XDP + 4;
/// TCP segments without payload (ACK/SYN/FIN/RST) skipped because control tracing is off.
pub const CONTROL_SKIPPED: u32 = PARSED_XDP + 5;
/// A transport hook ran in a syscall whose entry this CPU did not record (the thread moved
/// CPUs, or another thread overwrote the note): `send_syscall` is missing for that data.
pub const SEND_SLOT_MISS: u32 = PARSED_XDP + 6;
/// A recv syscall returned on another CPU than its copy ran on: `recv_syscall` missing.
pub const RECV_SLOT_MISS: u32 = PARSED_XDP + 7;
/// Kernel memory reads (`bpf_probe_read_kernel`) that failed.
pub const READ_FAILED: u32 = PARSED_XDP + 8;

pub const NUM_COUNTERS: u32 = 64;

/// Capture: packets the filter selected, per hook (XDP, TC egress).
pub const CAP_MATCHED_XDP: u32 = PARSED_XDP + 9;
pub const CAP_MATCHED_TC: u32 = PARSED_XDP + 10;
/// Capture: selected packets lost to a full ring shard, per hook.
pub const CAP_LOST_XDP: u32 = PARSED_XDP + 11;
pub const CAP_LOST_TC: u32 = PARSED_XDP + 12;
/// Capture: packets seen by the capture programs, per hook (matched or not).
pub const CAP_SEEN_XDP: u32 = PARSED_XDP + 13;
pub const CAP_SEEN_TC: u32 = PARSED_XDP + 14;
/// Not a count to report: record bytes this CPU wrote since it last woke its ring's
/// reader (see `wake_after` in packetflow-ebpf).
pub const UNWOKEN_RECORD_BYTES: u32 = PARSED_XDP + 15;
/// Summary mode: packets whose in-kernel state another packet's took over before they
/// reached `recv_syscall` (not counted in the histograms).
pub const SUMMARY_EVICTED: u32 = PARSED_XDP + 16;
/// Not a count to report: capture bytes this CPU wrote since it last woke its capture
/// ring's reader.
pub const UNWOKEN_CAPTURE_BYTES: u32 = PARSED_XDP + 17;
/// Connection records (`ConnStage`) written, and lost to a full ring shard.
pub const CONN_EMITTED: u32 = PARSED_XDP + 18;
pub const CONN_LOST: u32 = PARSED_XDP + 19;
/// Drop records (`drop::DropRecord`) written, and lost to a full ring shard.
pub const DROP_EMITTED: u32 = PARSED_XDP + 20;
pub const DROP_LOST: u32 = PARSED_XDP + 21;
/// Retransmission records written, and lost to a full ring shard.
pub const RETRANS_EMITTED: u32 = PARSED_XDP + 22;
pub const RETRANS_LOST: u32 = PARSED_XDP + 23;
/// Capture: dropped packets the filter selected (`capture --drops`), and of those lost to
/// a full capture shard.
pub const CAP_MATCHED_DROP: u32 = PARSED_XDP + 24;
pub const CAP_LOST_DROP: u32 = PARSED_XDP + 25;
/// `capture --bypass`: packets the filter selected on a receive queue that has no AF_XDP
/// socket (the queue came up after the start, or its socket could not bind). They go on
/// to the stack, not captured: said at exit.
pub const CAP_XSK_NO_SOCKET: u32 = PARSED_XDP + 26;
