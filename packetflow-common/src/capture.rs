//! Packet capture: the record header and the in-kernel filter.
//!
//! The filter is a set of primitives (host, net, port, protocol...) the kernel evaluates
//! into a bitmask, and a truth table over that bitmask (the `CAP_TABLE` map), computed in
//! userspace from the expression: any and/or/not structure costs one table lookup, and
//! the program stays small and obviously bounded for the verifier.

use crate::assert_size;

/// Bytes the capture programs can copy from one packet (the snaplen cap). Larger packets
/// (GSO/GRO super-packets, BIG TCP) are truncated to this; their original length is kept.
pub const CAPTURE_MAX: usize = 65535;

/// `capture --bypass`: the XDP program puts `[ts_ns: u64][XSK_META_MAGIC: u64]` in the
/// frame's metadata, just before its first byte, when the driver allows metadata; the
/// reader takes the kernel's time from there, else stamps the frame itself.
pub const XSK_META_MAGIC: u64 = 0x7066_6d65_7461_7473;
/// Receive queues an interface may have AF_XDP sockets on (`CAP_XSKS` entries).
pub const XSK_MAX_QUEUES: u32 = 64;

/// The per-CPU staging buffer: a record header and the packet bytes.
pub const CAP_BUF: usize = 32 + CAPTURE_MAX;

/// Distinct primitives an expression may use (the truth table has 2^N bits).
pub const MAX_PRIMS: usize = 12;

pub const HOOK_XDP: u8 = 0;
pub const HOOK_TC_EGRESS: u8 = 1;
pub const HOOK_TC_INGRESS: u8 = 2;
/// A packet the kernel dropped (`capture --drops`, skb:kfree_skb): the frame is its
/// network-layer bytes behind a synthesized Ethernet header (zero addresses), and `_pad`
/// holds the drop reason (u32, little endian) and the low 32 bits of the dropping code's
/// address (kernel text: the high 32 bits are all ones on x86_64).
pub const HOOK_DROP: u8 = 3;

pub const DIR_IN: u8 = 1;
pub const DIR_OUT: u8 = 2;

/// Written in front of the packet bytes in every capture record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapHdr {
    pub ts_ns: u64,
    /// Length of the frame on the wire (or of the skb), before truncation.
    pub len: u32,
    /// Bytes that follow this header.
    pub caplen: u32,
    pub ifindex: u32,
    pub dir: u8,
    pub hook: u8,
    pub cpu: u16,
    pub _pad: [u8; 8],
}
assert_size!(CapHdr, 32);

/// Primitive kinds.
pub const P_IP: u8 = 1;
pub const P_IP6: u8 = 2;
pub const P_TCP: u8 = 3;
pub const P_UDP: u8 = 4;
pub const P_ICMP: u8 = 5;
pub const P_ICMP6: u8 = 6;
/// `host`: `addr` equals the address (v4: also ARP/RARP sender/target, as libpcap does).
pub const P_HOST: u8 = 7;
/// `net`: the first `prefix` bits equal `addr`.
pub const P_NET: u8 = 8;
/// `port`/`portrange`: TCP, UDP or SCTP port in [lo, hi] (IPv4: first fragment only);
/// `l4` restricts to TCP or UDP.
pub const P_PORT: u8 = 9;

pub const DIR_SRC: u8 = 1;
pub const DIR_DST: u8 = 2;
/// Source or destination (the default).
pub const DIR_EITHER: u8 = 3;
/// Source and destination.
pub const DIR_BOTH: u8 = 4;

/// One primitive of a capture expression.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prim {
    pub kind: u8,
    /// `DIR_*` for host/net/port.
    pub dir: u8,
    /// 4 or 6 for host/net.
    pub family: u8,
    /// host/net: prefix length in bits.
    pub prefix: u8,
    /// port: 0 (TCP, UDP or SCTP), 6 (TCP only) or 17 (UDP only).
    /// host/net: 1 = IP only (`ip host`, `ip6 net`): no ARP/RARP match.
    pub l4: u8,
    pub _pad: u8,
    pub port_lo: u16,
    pub port_hi: u16,
    pub _pad2: u16,
    pub addr: [u8; 16],
}
assert_size!(Prim, 28);

impl Prim {
    pub const NONE: Prim =
        Prim { kind: 0, dir: 0, family: 0, prefix: 0, l4: 0, _pad: 0, port_lo: 0, port_hi: 0, _pad2: 0, addr: [0; 16] };
}

/// Capture settings, in a one-entry array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    pub enabled: u32,
    /// Bytes to copy per packet (at most CAPTURE_MAX).
    pub snaplen: u32,
    pub nprims: u32,
    /// `DIR_IN` (capture at XDP) and/or `DIR_OUT` (capture at tcx egress): `-Q`.
    pub dirs: u32,
    /// Loopback devices: their packets are recorded once, at ingress (as tcpdump does),
    /// so tcx egress skips these ifindexes.
    pub skip_out: [u32; 4],
    pub prims: [Prim; MAX_PRIMS],
}
assert_size!(CaptureConfig, 32 + 28 * MAX_PRIMS);

/// Entries of the truth table map `CAP_TABLE`: entry `m` is 1 when a packet whose
/// primitive results form bitmask `m` is captured. A map lookup rather than an index into
/// an array keeps the bitmask out of pointer arithmetic, so the verifier can prune.
pub const TABLE_SIZE: u32 = 1 << MAX_PRIMS;

impl CaptureConfig {
    /// Captures everything.
    pub const ALL: CaptureConfig = CaptureConfig {
        enabled: 1,
        snaplen: CAPTURE_MAX as u32,
        nprims: 0,
        dirs: (DIR_IN | DIR_OUT) as u32,
        skip_out: [0; 4],
        prims: [Prim::NONE; MAX_PRIMS],
    };
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, padding written out as fields (size pinned by
    // assert_size!): no uninitialised byte, and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::CaptureConfig {}
    // SAFETY: repr(C), integer fields only, padding written out as fields (size pinned by
    // assert_size!): no uninitialised byte, and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::CapHdr {}
}
