//! The one parser of captured Ethernet frames: the IP header, behind both the text lines
//! (`decode`) and the keys that pair a packet with its trace (`capture::packet_key`).

use std::net::IpAddr;

pub fn be16(d: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*d.get(i)?, *d.get(i + 1)?]))
}

pub fn be32(d: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_be_bytes(d.get(i..i + 4)?.try_into().ok()?))
}

pub use packetflow_common::capture::{ETH_ARP, ETH_IP, ETH_IP6};

pub fn ethertype(d: &[u8]) -> Option<u16> {
    be16(d, 12)
}

/// An IPv4 or IPv6 header, read from an Ethernet frame.
pub struct Ip {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The protocol number of what follows (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6).
    pub proto: u8,
    /// Offset of the transport header in the frame.
    pub l4: usize,
    /// Offset just past the IP packet, from its length field (may lie past a short capture).
    pub end: usize,
    /// IPv4 fragment offset in 8-byte units (0: a first fragment, or not fragmented).
    pub frag: u16,
}

/// The IP header of an IPv4 (`ETH_IP`) or IPv6 (`ETH_IP6`) frame; `None` when the frame
/// is too short to hold it or carries something else.
pub fn ip(d: &[u8]) -> Option<Ip> {
    match ethertype(d)? {
        ETH_IP => {
            let ihl = usize::from(*d.get(14)? & 0x0f) * 4;
            let src: [u8; 4] = d.get(26..30)?.try_into().ok()?;
            let dst: [u8; 4] = d.get(30..34)?.try_into().ok()?;
            let tot = usize::from(be16(d, 16)?);
            Some(Ip {
                src: src.into(),
                dst: dst.into(),
                proto: *d.get(23)?,
                l4: 14 + ihl,
                end: 14 + tot.max(ihl),
                frag: be16(d, 20)? & 0x1fff,
            })
        }
        ETH_IP6 => {
            let src: [u8; 16] = d.get(22..38)?.try_into().ok()?;
            let dst: [u8; 16] = d.get(38..54)?.try_into().ok()?;
            Some(Ip {
                src: src.into(),
                dst: dst.into(),
                proto: *d.get(20)?,
                l4: 54,
                end: 54 + usize::from(be16(d, 18)?),
                frag: 0,
            })
        }
        _ => None,
    }
}
