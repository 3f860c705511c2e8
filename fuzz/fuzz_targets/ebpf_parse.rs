//! The eBPF programs' packet parser (packetflow-ebpf/src/parse.rs, the very file the
//! programs are built from) on arbitrary frames, through a host `Source` over a byte
//! slice: every read in bounds or refused, never a panic, and what it extracts agrees
//! with the bytes (addresses, ports, payload length within the packet).
#![no_main]

use libfuzzer_sys::fuzz_target;
use packetflow_common::{
    Event, Kind,
    event::{F_UDP, F_V6, KIND_SHIFT},
};

#[allow(dead_code)]
#[path = "../../packetflow-ebpf/src/parse.rs"]
mod parse;

use parse::{Source, Unparsed};

/// The packet from the start of its IP header, as the kernel-side sources see it.
struct Slice<'a>(&'a [u8]);

impl Source for Slice<'_> {
    fn read(&self, off: u32, buf: &mut [u8]) -> Result<(), Unparsed> {
        let start = off as usize;
        let src =
            self.0.get(start..start.checked_add(buf.len()).ok_or(Unparsed::Malformed)?).ok_or(Unparsed::Malformed)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn l3_len(&self) -> u32 {
        self.0.len() as u32
    }
}

fuzz_target!(|frame: &[u8]| {
    // As XDP and TC do: skip the Ethernet header (and VLAN tags), then parse.
    let load = |off: u32, buf: &mut [u8]| match frame.get(off as usize..off as usize + buf.len()) {
        Some(s) => {
            buf.copy_from_slice(s);
            true
        }
        None => false,
    };
    let Ok((l3, _ethertype)) = parse::l2_skip(load) else { return };
    let ip = &frame[l3 as usize..];
    let mut ev = Event {
        ts_ns: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        seq: 0,
        len: 0,
        stage: 0,
        flags: 0,
        cpu: 0,
        aux: 0,
        aux2: 0,
    };
    if parse::parse_l3(&Slice(ip), &mut ev).is_err() {
        return;
    }
    // Parsed: the header fields came from where the protocol puts them. (The IP header's
    // version decides, not the EtherType: a version-4 header behind EtherType IPv6 is
    // read as IPv4.)
    let v6 = ev.flags & F_V6 != 0;
    assert_eq!(ip[0] >> 4, if v6 { 6 } else { 4 }, "IP version flag vs the header's version");
    if v6 {
        assert_eq!(&ev.saddr[..], &ip[8..24]);
        assert_eq!(&ev.daddr[..], &ip[24..40]);
    } else {
        assert_eq!(&ev.saddr[..4], &ip[12..16]);
        assert_eq!(&ev.daddr[..4], &ip[16..20]);
    }
    // The payload lies inside the packet, after the transport header.
    assert!(ev.len as usize <= ip.len(), "payload {} in a {}-byte packet", ev.len, ip.len());
    let kind = ev.flags >> KIND_SHIFT;
    if ev.flags & F_UDP != 0 {
        assert_eq!(kind, Kind::Data as u8);
        assert!(ev.len as usize + 8 + if v6 { 40 } else { 20 } <= ip.len());
    } else if ev.len > 0 {
        assert_eq!(kind, Kind::Data as u8);
    } else {
        assert_ne!(kind, Kind::Data as u8);
    }
});
