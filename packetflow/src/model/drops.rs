//! Drops and retransmissions: where and why the kernel freed a packet of the traced
//! traffic (`PacketDrop`), and the counts every output shows (`DropStats`).

use std::collections::BTreeMap;

use packetflow_common::Stage;

use crate::model::trace::{Device, Flow};

/// One dropped packet: on its trace (`Trace::drop`) when the correlator joined it to one,
/// else on its own (a packet dropped before any traced stage, or a segment not traced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketDrop {
    pub t_ns: u64,
    /// The kernel's name (`enum skb_drop_reason` without its prefix), e.g. `NO_SOCKET`.
    pub reason: String,
    /// The code that freed it, `symbol+0xoffset`.
    pub location: String,
    /// `skb->dev` when the kernel dropped it (ifindex 0: none yet).
    pub device: Device,
    /// The last stage the packet's trace reached (None: no trace).
    pub after: Option<Stage>,
    pub flow: Flow,
    /// TCP: the first byte's sequence number; UDP: the payload key.
    pub seq: u32,
    pub len: u32,
    /// Segment kind (`data`, `ack`, `syn`, ...; always `data` for UDP).
    pub kind: &'static str,
}

/// Drops counted at most per distinct (reason, stage, location); past this, into one
/// "other" row (counted all the same).
const MAX_ROWS: usize = 1024;
/// Ports whose retransmits are kept apart at most.
const MAX_PORTS: usize = 256;

/// Drops by reason, last stage reached and location; retransmits by port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DropStats {
    /// (reason, last stage name or "-", location) → packets.
    pub drops: BTreeMap<(String, String, String), u64>,
    /// Retransmitted segments by the flow's lower port (the service's, usually).
    pub retransmits: BTreeMap<u16, u64>,
}

impl DropStats {
    pub fn record(&mut self, d: &PacketDrop) {
        self.add(&d.reason, d.after.map_or("-", Stage::name), &d.location, 1);
    }

    /// Adds `n` drops (also summary mode's in-kernel counts, which have no location).
    pub fn add(&mut self, reason: &str, stage: &str, location: &str, n: u64) {
        let key = (reason.to_string(), stage.to_string(), location.to_string());
        let key = if self.drops.len() < MAX_ROWS || self.drops.contains_key(&key) {
            key
        } else {
            ("other".into(), "-".into(), "-".into())
        };
        *self.drops.entry(key).or_default() += n;
    }

    pub fn retransmit(&mut self, flow: &Flow) {
        let port = flow.sport.min(flow.dport);
        let port = if self.retransmits.len() < MAX_PORTS || self.retransmits.contains_key(&port) { port } else { 0 };
        *self.retransmits.entry(port).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.drops.values().sum()
    }

    /// Drops by (reason, stage), locations summed: what metrics and comparisons use.
    pub fn by_reason_stage(&self) -> BTreeMap<(String, String), u64> {
        let mut m = BTreeMap::new();
        for ((r, s, _), n) in &self.drops {
            *m.entry((r.clone(), s.clone())).or_default() += n;
        }
        m
    }

    pub fn is_empty(&self) -> bool {
        self.drops.is_empty() && self.retransmits.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(sport: u16, dport: u16) -> Flow {
        Flow { v6: false, udp: true, src: [0; 16], dst: [0; 16], sport, dport }
    }

    #[test]
    fn counts_by_reason_stage_and_location() {
        let mut s = DropStats::default();
        let d = PacketDrop {
            t_ns: 1,
            reason: "NO_SOCKET".into(),
            location: "__udp4_lib_rcv+0x1".into(),
            device: Device { netns: 1, ifindex: 1 },
            after: Some(Stage::NetifReceive),
            flow: flow(40000, 9),
            seq: 0,
            len: 5,
            kind: "data",
        };
        s.record(&d);
        s.record(&d);
        s.record(&PacketDrop { after: None, ..d.clone() });
        assert_eq!(s.total(), 3);
        assert_eq!(s.by_reason_stage()[&("NO_SOCKET".to_string(), "netif_receive".to_string())], 2);
        assert_eq!(s.by_reason_stage()[&("NO_SOCKET".to_string(), "-".to_string())], 1);
        s.retransmit(&flow(40000, 80));
        s.retransmit(&flow(80, 40000));
        assert_eq!(s.retransmits[&80], 2);
    }

    #[test]
    fn rows_are_bounded() {
        let mut s = DropStats::default();
        for i in 0..(MAX_ROWS + 10) {
            s.add("R", "-", &format!("f+{i:#x}"), 1);
        }
        assert_eq!(s.drops.len(), MAX_ROWS + 1);
        assert_eq!(s.total(), (MAX_ROWS + 10) as u64);
    }
}
