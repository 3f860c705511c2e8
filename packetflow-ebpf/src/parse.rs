//! Packet parsing shared by every hook that sees packet bytes.
//!
//! A [`Source`] copies bytes relative to the start of the IP header, wherever the packet
//! lives (XDP buffer, TC or cgroup `__sk_buff`, a kernel `sk_buff` read with
//! `bpf_probe_read_kernel`). [`parse_l3`] turns those bytes into the flow, sequence range
//! and kind of an [`Event`]. All reads are bounds-checked copies into small stack buffers,
//! so a truncated or malformed packet makes a read fail, never an out-of-bounds access.

use packetflow_common::{
    Event, Kind,
    event::{F_UDP, F_V6, KIND_SHIFT},
    payload_key,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Why a packet was not turned into an event.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unparsed {
    /// Not IPv4/IPv6, not TCP/UDP, or a non-first fragment: nothing to trace.
    Other,
    /// Headers cut short, bad lengths, or a read that failed.
    Malformed,
}

pub trait Source {
    /// Copies `buf.len()` bytes starting `off` bytes past the start of the IP header.
    fn read(&self, off: u32, buf: &mut [u8]) -> Result<(), Unparsed>;
    /// Bytes from the start of the IP header to the end of the packet.
    fn l3_len(&self) -> u32;
}

#[inline(always)]
fn be16(b: &[u8], i: usize) -> u16 {
    match (b.get(i), b.get(i + 1)) {
        (Some(&hi), Some(&lo)) => ((hi as u16) << 8) | lo as u16,
        _ => 0,
    }
}

#[inline(always)]
fn be32(b: &[u8], i: usize) -> u32 {
    ((be16(b, i) as u32) << 16) | be16(b, i + 2) as u32
}

/// Offset of the IP header in an Ethernet frame (after up to two VLAN tags) and its
/// EtherType, read through `load(off, buf)` relative to the start of the frame.
#[inline(always)]
pub fn l2_skip(load: impl Fn(u32, &mut [u8]) -> bool) -> Result<(u32, u16), Unparsed> {
    let mut b = [0u8; 2];
    if !load(12, &mut b) {
        return Err(Unparsed::Malformed);
    }
    let mut proto = be16(&b, 0);
    let mut off = 14u32;
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        if !load(off + 2, &mut b) {
            return Err(Unparsed::Malformed);
        }
        proto = be16(&b, 0);
        off += 4;
    }
    if proto == ETH_P_IP || proto == ETH_P_IPV6 { Ok((off, proto)) } else { Err(Unparsed::Other) }
}

/// Fills flow, `seq`, `len` and the kind/protocol flags of `ev` from the packet in `src`.
///
/// Reads are few because each one is a helper call: one read of the first 40 bytes holds
/// IPv4's header and a whole TCP header without options, or IPv6's fixed header; the
/// transport header (and UDP's payload key) takes one more where it lies beyond.
#[inline(always)]
pub fn parse_l3<S: Source>(src: &S, ev: &mut Event) -> Result<(), Unparsed> {
    let l3_len = src.l3_len();
    let mut h = [0u8; 40];
    let full = src.read(0, &mut h).is_ok();
    if !full && src.read(0, &mut h[..20]).is_err() {
        // Not even 20 bytes: malformed if it claims to be IP.
        let mut first = [0u8; 1];
        src.read(0, &mut first)?;
        return Err(if matches!(first[0] >> 4, 4 | 6) { Unparsed::Malformed } else { Unparsed::Other });
    }
    let (l4_off, end, proto) = match h[0] >> 4 {
        4 => parse_ipv4(&h, ev, l3_len)?,
        6 if full => parse_ipv6(src, &h, ev, l3_len)?,
        6 => return Err(Unparsed::Malformed),
        _ => return Err(Unparsed::Other),
    };
    match proto {
        IPPROTO_TCP => {
            let mut t = [0u8; 20];
            if full && l4_off == 20 {
                t.copy_from_slice(&h[20..]);
            } else {
                src.read(l4_off, &mut t)?;
            }
            parse_tcp(&t, ev, l4_off, end)
        }
        IPPROTO_UDP => parse_udp(src, ev, l4_off, end),
        _ => Err(Unparsed::Other),
    }
}

/// Returns (L4 offset, end of IP payload, protocol).
#[inline(always)]
fn parse_ipv4(h: &[u8; 40], ev: &mut Event, l3_len: u32) -> Result<(u32, u32, u8), Unparsed> {
    let ihl = ((h[0] & 0x0f) as u32) * 4;
    if ihl < 20 {
        return Err(Unparsed::Malformed);
    }
    if be16(h, 6) & 0x1fff != 0 {
        return Err(Unparsed::Other); // a later fragment: no transport header
    }
    let tot_len = be16(h, 2) as u32;
    // tot_len is 0 on BIG TCP super-packets; Ethernet padding makes l3_len too long.
    let end = if tot_len == 0 || tot_len > l3_len { l3_len } else { tot_len };
    if end < ihl {
        return Err(Unparsed::Malformed);
    }
    ev.saddr[..4].copy_from_slice(&h[12..16]);
    ev.daddr[..4].copy_from_slice(&h[16..20]);
    Ok((ihl, end, h[9]))
}

#[inline(always)]
fn parse_ipv6<S: Source>(src: &S, h: &[u8; 40], ev: &mut Event, l3_len: u32) -> Result<(u32, u32, u8), Unparsed> {
    ev.saddr.copy_from_slice(&h[8..24]);
    ev.daddr.copy_from_slice(&h[24..40]);
    ev.flags |= F_V6;
    let plen = be16(h, 4) as u32;
    let end = if plen == 0 || plen + 40 > l3_len { l3_len } else { plen + 40 };
    let mut next = h[6];
    let mut off = 40u32;
    // Walk up to four extension headers (hop-by-hop, routing, fragment, destination).
    for _ in 0..4 {
        let mut x = [0u8; 4];
        match next {
            0 | 43 | 60 => {
                src.read(off, &mut x)?;
                next = x[0];
                off += (x[1] as u32 + 1) * 8;
            }
            44 => {
                src.read(off, &mut x)?;
                if be16(&x, 2) & 0xfff8 != 0 {
                    return Err(Unparsed::Other);
                }
                next = x[0];
                off += 8;
            }
            _ => break,
        }
    }
    if off > end {
        return Err(Unparsed::Malformed);
    }
    Ok((off, end, next))
}

/// `t`: the 20 bytes of the TCP header without options.
#[inline(always)]
fn parse_tcp(t: &[u8; 20], ev: &mut Event, l4: u32, end: u32) -> Result<(), Unparsed> {
    let doff = ((t[12] >> 4) as u32) * 4;
    if doff < 20 || l4 + doff > end {
        return Err(Unparsed::Malformed);
    }
    ev.sport = be16(t, 0);
    ev.dport = be16(t, 2);
    ev.seq = be32(t, 4);
    ev.len = end - l4 - doff;
    let fl = t[13];
    let kind = if ev.len > 0 {
        Kind::Data
    } else if fl & 0x12 == 0x12 {
        Kind::SynAck
    } else if fl & 0x02 != 0 {
        Kind::Syn
    } else if fl & 0x04 != 0 {
        Kind::Rst
    } else if fl & 0x01 != 0 {
        Kind::Fin
    } else {
        Kind::Ack
    };
    ev.flags |= (kind as u8) << KIND_SHIFT;
    Ok(())
}

#[inline(always)]
fn parse_udp<S: Source>(src: &S, ev: &mut Event, l4: u32, end: u32) -> Result<(), Unparsed> {
    if l4 + 8 > end {
        return Err(Unparsed::Malformed);
    }
    ev.flags |= F_UDP;
    ev.len = end - l4 - 8;
    // The header and the 16 payload bytes the key is made of, in one read when there are 16.
    let mut u = [0u8; 24];
    let n = if ev.len < 16 { ev.len } else { 16 };
    if n == 16 {
        src.read(l4, &mut u)?;
    } else {
        src.read(l4, &mut u[..8])?;
        // Short payload: copy what there is, one byte at a time.
        for i in 0..16u32 {
            if i < n {
                let mut b = [0u8; 1];
                src.read(l4 + 8 + i, &mut b)?;
                u[8 + i as usize] = b[0];
            }
        }
    }
    ev.sport = be16(&u, 0);
    ev.dport = be16(&u, 2);
    let mut p = [0u8; 16];
    p.copy_from_slice(&u[8..]);
    ev.seq = payload_key(&p, n);
    Ok(())
}
