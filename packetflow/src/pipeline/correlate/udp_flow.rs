//! The flow of UDP records from a socket that sees only part of it: one bound to the
//! wildcard address (no destination), one read without asking for the sender (no
//! source). Until that flow is known its records wait as orphans.

use packetflow_common::{Event, Stage};

use super::Correlator;
use crate::model::trace::Flow;

/// Entries in each of the maps that find a UDP flow from a socket's partial view
/// (`udp_dst`, `udp_queued`): cleared when full, so they hold only recent flows.
const MAX_UDP_KEYS: usize = 16_384;
/// UDP receive-side records waiting for their flow's destination, at most.
pub(super) const MAX_ORPHANS: usize = 16_384;

impl Correlator {
    /// A UDP socket bound to the wildcard address does not know which of its addresses a
    /// datagram was sent to: its receive-side records carry an unspecified destination.
    /// They belong to the flow with the same source and ports seen on the wire. An
    /// unconnected socket read without asking for the sender (recv, read) names no
    /// source either: its records belong to the flow whose datagram with the same
    /// payload key and length was queued on that port.
    pub(super) fn resolve(&mut self, flow: Flow, ev: &Event) -> Option<Flow> {
        if !flow.udp {
            return Some(flow);
        }
        if flow.src == [0; 16] && flow.sport == 0 {
            return self.udp_queued.get(&(flow.v6, flow.dport, ev.seq, ev.len)).copied();
        }
        if ev.stage == Stage::SockQueue as u8 {
            if self.udp_queued.len() >= MAX_UDP_KEYS {
                self.udp_queued.clear();
            }
            self.udp_queued.insert((flow.v6, flow.dport, ev.seq, ev.len), flow);
        }
        let key = (flow.v6, flow.src, flow.sport, flow.dport);
        if flow.dst == [0; 16] {
            return self.udp_dst.get(&key).copied();
        }
        if self.udp_dst.get(&key) != Some(&flow) {
            if self.udp_dst.len() >= MAX_UDP_KEYS {
                self.udp_dst.clear();
            }
            self.udp_dst.insert(key, flow);
        }
        Some(flow)
    }

    /// Gives every orphan another try (its flow may be known now); one older than the
    /// retention is dropped, counted unmatched.
    pub(super) fn retry_orphans(&mut self) {
        for _ in 0..self.orphans.len() {
            let Some(ev) = self.orphans.pop_front() else {
                break;
            };
            match (self.resolve(Flow::of(&ev), &ev), Stage::from_u8(ev.stage)) {
                (Some(flow), Some(stage)) => self.push_to(flow, stage, &ev),
                _ if ev.ts_ns.saturating_add(self.retention_ns) < self.watermark => self.stats.records_unmatched += 1,
                _ => self.orphans.push_back(ev),
            }
        }
    }
}
