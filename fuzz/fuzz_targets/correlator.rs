//! Arbitrary record streams into the correlator: records of any stage, flow, sequence and
//! time (repeated, reordered, contradictory), watermarks advancing in any steps. Never a
//! panic, and memory stays bounded: never more flows than `max_flows`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use packetflow::{
    model::trace::Device,
    pipeline::correlate::{Correlator, Coverage},
};
use packetflow_common::{Event, NUM_STAGES, Stage};

/// Reads the fuzzer's bytes as small numbers; zeros once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

/// A few addresses (v4-mapped and v6) and ports, so records meet on the same flows.
fn addr(n: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    if n & 4 == 0 {
        a[..4].copy_from_slice(&[198, 18, 0, 1 + (n & 3)]);
    } else {
        a[0] = 0xfd;
        a[15] = 1 + (n & 3);
    }
    a
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let cfg = b.u8();
    let mut cov = Coverage::default();
    for s in Stage::ALL {
        if cfg & 1 == 0 || (s as u8) % 2 == 0 {
            cov.global.insert(s);
        }
    }
    for (netns, ifindex) in [(0u32, 1u32), (7, 2), (7, 3)] {
        let dev = Device { netns, ifindex };
        if cfg & 2 != 0 {
            cov.xdp.insert(dev);
        }
        if cfg & 4 != 0 {
            cov.tc_ingress.insert(dev);
            cov.tc_egress.insert(dev);
        }
    }
    let mut c = Correlator::new(cov);
    c.max_flows = 1 + (b.u8() % 16) as usize;
    c.timeout_ns = 1 + b.u16() as u64 * 1000;
    let mut ts = 1_000_000u64;
    let mut wm = 0u64;
    let mut traces = 0u64; // emitted (any number is fine: no panic is the point)
    while !b.0.is_empty() {
        let op = b.u8();
        if op < 0xe0 {
            // A record: time moves on (or back a little), flow from a small set.
            let d = b.u16() as u64;
            ts = if op & 0x80 != 0 { ts.saturating_sub(d) } else { ts + d * 16 };
            let pick = b.u8();
            let (v6, udp) = (pick & 0x40 != 0, pick & 0x80 != 0);
            let stage = b.u8() % (NUM_STAGES as u8 + 2);
            let flags = b.u8();
            let ev = Event {
                ts_ns: ts,
                saddr: addr(pick & 3 | if v6 { 4 } else { 0 }),
                daddr: addr((pick >> 2) & 3 | if v6 { 4 } else { 0 }),
                sport: 40000 + (pick >> 4 & 3) as u16,
                dport: 8080,
                seq: b.u32(),
                len: b.u16() as u32,
                stage,
                flags: (flags & 0xf0) | (flags & 0x0c) | if v6 { 1 } else { 0 } | if udp { 2 } else { 0 },
                cpu: (op & 1) as u16,
                aux: [1, 2, 3, 4242][(pick & 3) as usize],
                aux2: [0, 7][(op >> 1 & 1) as usize],
            };
            c.push(&ev);
        } else if op < 0xfe {
            wm = wm.max(ts.saturating_sub(b.u16() as u64 * 1000));
            c.advance(wm, &mut |_| traces += 1);
        } else {
            c.flush(&mut |_| traces += 1);
        }
        assert!(c.flows() <= c.max_flows, "{} flows, max {}", c.flows(), c.max_flows);
    }
    c.flush(&mut |_| traces += 1);
    assert!(c.flows() <= c.max_flows);
});
