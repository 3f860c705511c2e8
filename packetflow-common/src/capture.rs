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

// The filter's semantics, shared by the kernel programs (packetflow-ebpf's
// probes/capture.rs) and `capture -r` (packetflow/src/capture/read.rs): libpcap's, see
// packetflow/src/capture/expr.rs.

pub const ETH_IP: u16 = 0x0800;
pub const ETH_IP6: u16 = 0x86dd;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_RARP: u16 = 0x8035;

/// What the filter looks at (`summarize`), for `matches`.
pub struct Pkt {
    pub eth: u16,
    /// IPv4 protocol or IPv6 fixed next header.
    pub l4: u8,
    pub ports: bool,
    pub sport: u16,
    pub dport: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// What the filter looks at in a frame; `load(offset, buf)` reads bytes of it (false
/// past its end). The kernel programs and `capture -r` both use it.
// (The fragment offset is tested against its mask, as the IP header defines it.)
#[allow(clippy::verbose_bit_mask)]
#[inline(always)]
pub fn summarize(load: impl Fn(u32, &mut [u8]) -> bool) -> Pkt {
    let mut k = Pkt { eth: 0, l4: 0, ports: false, sport: 0, dport: 0, src: [0; 16], dst: [0; 16] };
    let mut b = [0u8; 2];
    if !load(12, &mut b) {
        return k;
    }
    k.eth = u16::from_be_bytes(b);
    let mut l4_off = 0u32;
    match k.eth {
        ETH_IP => {
            let mut h = [0u8; 20];
            if !load(14, &mut h) {
                return k;
            }
            k.l4 = h[9];
            k.src[..4].copy_from_slice(&h[12..16]);
            k.dst[..4].copy_from_slice(&h[16..20]);
            let first_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0;
            if first_fragment {
                l4_off = 14 + u32::from(h[0] & 0x0f) * 4;
            }
        }
        ETH_IP6 => {
            let mut h = [0u8; 8];
            if !load(14, &mut h) || !load(22, &mut k.src) || !load(38, &mut k.dst) {
                return k;
            }
            k.l4 = h[6];
            l4_off = 54;
        }
        ETH_ARP | ETH_RARP => {
            // Ethernet/IPv4 ARP: sender protocol address at 28, target at 38.
            let mut a = [0u8; 4];
            if load(28, &mut a) {
                k.src[..4].copy_from_slice(&a);
            }
            if load(38, &mut a) {
                k.dst[..4].copy_from_slice(&a);
            }
        }
        _ => {}
    }
    if l4_off != 0 && matches!(k.l4, 6 | 17 | 132) {
        let mut p = [0u8; 4];
        if load(l4_off, &mut p) {
            k.ports = true;
            k.sport = u16::from_be_bytes([p[0], p[1]]);
            k.dport = u16::from_be_bytes([p[2], p[3]]);
        }
    }
    k
}

/// The first `prefix` bits of `a` and `b` are equal.
#[inline(always)]
fn prefix_eq(a: &[u8; 16], b: &[u8; 16], prefix: u8) -> bool {
    let mut diff = 0u32;
    for w in 0..4usize {
        let bits = (i32::from(prefix) - 32 * w as i32).clamp(0, 32) as u32;
        let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
        let x = u32::from_be_bytes([a[4 * w], a[4 * w + 1], a[4 * w + 2], a[4 * w + 3]]);
        let y = u32::from_be_bytes([b[4 * w], b[4 * w + 1], b[4 * w + 2], b[4 * w + 3]]);
        diff |= (x ^ y) & mask;
    }
    diff == 0
}

#[inline(always)]
fn by_dir(dir: u8, s: bool, d: bool) -> bool {
    match dir {
        DIR_SRC => s,
        DIR_DST => d,
        DIR_BOTH => s && d,
        _ => s || d,
    }
}

/// Does primitive `p` hold for packet `k`?
#[inline(always)]
pub fn matches(p: &Prim, k: &Pkt) -> bool {
    let ip = k.eth == ETH_IP;
    let ip6 = k.eth == ETH_IP6;
    match p.kind {
        P_IP => ip,
        P_IP6 => ip6,
        P_TCP => (ip || ip6) && k.l4 == 6,
        P_UDP => (ip || ip6) && k.l4 == 17,
        P_ICMP => ip && k.l4 == 1,
        P_ICMP6 => ip6 && k.l4 == 58,
        P_HOST | P_NET => {
            let family_ok =
                if p.family == 4 { ip || (p.l4 == 0 && (k.eth == ETH_ARP || k.eth == ETH_RARP)) } else { ip6 };
            family_ok && by_dir(p.dir, prefix_eq(&k.src, &p.addr, p.prefix), prefix_eq(&k.dst, &p.addr, p.prefix))
        }
        P_PORT => {
            k.ports
                && (p.l4 == 0 || p.l4 == k.l4)
                && by_dir(
                    p.dir,
                    k.sport >= p.port_lo && k.sport <= p.port_hi,
                    k.dport >= p.port_lo && k.dport <= p.port_hi,
                )
        }
        _ => false,
    }
}
