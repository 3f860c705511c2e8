//! The correlator's memory bound: a flow that grows past the budget sheds its oldest
//! records, else the least recently active flow is evicted (its pending packets finished
//! early); flows idle past the retention are dropped.

use super::{Correlator, records::FlowState};
use crate::model::trace::Flow;

/// A list at least this long gives up its own oldest records before other flows are
/// evicted for the budget.
const SHED_MIN: usize = 256;
/// Small flows `shed` passes over, at most, before it evicts one.
const SHED_LOOK: usize = 8;

impl Correlator {
    /// Brings the flows back within the budget after `flow` grew: its own longest list
    /// gives up its oldest records when it is long (a few flows flooding a stage), else
    /// the least recently active other flow does when its list is long (a bulk flow whose
    /// old records traces have used); a short one is passed over (to the back, at most
    /// `SHED_LOOK` of them), then goes whole (many small flows). Each step frees at least
    /// one record's estimate or is one of `SHED_LOOK` passes: O(1) per record.
    pub(super) fn shed(&mut self, flow: Flow) {
        // Small flows passed over (sent to the back) looking for a long list behind them:
        // a bulk flow in the middle of the order holds the memory, not they.
        let mut passed = 0;
        while self.held_bytes > self.budget_bytes {
            let longest = |st: &FlowState| st.longest().map(|s| (s, st.list(s).len()));
            let own = self.flows.get(&flow).and_then(longest);
            let front = self.flows.front().filter(|(f, _)| **f != flow).map(|(f, st)| (*f, longest(st)));
            let front_is_other = front.is_some();
            let victim = match (own, front) {
                (Some((stage, n)), _) if n >= SHED_MIN => Some((flow, stage)),
                (_, Some((f, Some((stage, n))))) if n >= SHED_MIN => Some((f, stage)),
                (Some((stage, _)), None) => Some((flow, stage)),
                _ => None,
            };
            match victim {
                Some((flow, stage)) => {
                    let st = self.flows.get_mut(&flow).expect("flow exists");
                    let until = st.anchored_until;
                    if st.list_mut(stage).pop_oldest(until) == Some(true) {
                        self.stats.records_evicted += 1;
                    }
                    let bytes = st.bytes();
                    self.held_bytes = self.held_bytes + bytes - st.accounted;
                    st.accounted = bytes;
                }
                _ if front_is_other && passed < SHED_LOOK && passed < self.flows.len() => {
                    let f = *self.flows.front().expect("front exists").0;
                    self.flows.to_back(&f);
                    passed += 1;
                }
                _ if front_is_other => self.evict_front(),
                _ => break,
            }
        }
    }

    /// Evicts the least recently active flow, counting what it held. Its pending packets
    /// are finished as they stand (stages still missing are reported missing), to be
    /// emitted by the next `advance`.
    pub(super) fn evict_front(&mut self) {
        let Some(flow) = self.flows.front().map(|(f, _)| *f) else { return };
        let mut early = std::mem::take(&mut self.early);
        let before = early.len();
        // Without pruning: the records no trace used are counted evicted below.
        self.look(&flow, u64::MAX, false, &mut |t| early.push(t));
        self.stats.traces_finished_early += (early.len() - before) as u64;
        self.early = early;
        if let Some((_, st)) = self.flows.pop_front() {
            self.held_bytes -= st.accounted;
            self.stats.flows_evicted += 1;
            self.stats.records_evicted += st.records();
            // `look` finished them all; none is lost with the flow.
            self.stats.anchors_evicted += st.pending.len() as u64;
        }
    }

    /// Drops flows idle past the retention, least recently active first.
    pub(super) fn prune(&mut self) {
        // At most every 50 ms of watermark progress (and at the end).
        if self.watermark != u64::MAX && self.watermark < self.last_prune.saturating_add(50_000_000) {
            return;
        }
        self.last_prune = self.watermark;
        let horizon = self.watermark.saturating_sub(self.retention_ns);
        while let Some((_, st)) = self.flows.front() {
            if !(st.pending.is_empty() && st.last_ts < horizon && !st.dirty) {
                break;
            }
            let (_, st) = self.flows.pop_front().expect("front exists");
            self.held_bytes -= st.accounted;
            let until = st.anchored_until;
            for mut list in st.stages.into_iter().flatten() {
                self.stats.records_unmatched += list.prune(u64::MAX, until);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use packetflow_common::{
        Event, Stage,
        event::{F_END, F_UDP},
    };

    use crate::pipeline::correlate::{Correlator, Coverage};

    /// `n` single-datagram UDP flows, each seen at every stage but the optional ones in
    /// kernel order, 100 µs apart, advancing the watermark every 50 flows.
    fn flood(c: &mut Correlator, n: u32) -> u64 {
        let mut traces = 0;
        for i in 0..n {
            for (k, s) in Stage::KERNEL_ORDER.iter().filter(|s| !s.is_optional()).enumerate() {
                let mut e = Event::ZERO;
                e.stage = *s as u8;
                e.ts_ns = 1_000_000 + u64::from(i) * 100_000 + k as u64 * 100;
                (e.seq, e.len, e.flags) = (i, 4, F_UDP);
                (e.sport, e.dport) = ((i % 60_000) as u16, 9);
                (e.saddr[0], e.saddr[1], e.daddr[0]) = (127, (i / 60_000) as u8, 127);
                c.push(&e);
                assert!(c.held_bytes() <= c.budget_bytes, "{} over {}", c.held_bytes(), c.budget_bytes);
            }
            if i % 50 == 0 {
                c.advance(1_000_000 + u64::from(i) * 100_000, &mut |_| traces += 1);
            }
        }
        c.flush(&mut |_| traces += 1);
        traces
    }

    #[test]
    fn many_flows_waiting_for_their_timeout_stay_within_the_budget_and_are_all_traced() {
        let mut cov = Coverage::default();
        cov.global.extend(Stage::ALL);
        let mut c = Correlator::new(cov);
        c.budget_bytes = 1 << 20;
        // Two stages never come: every trace waits for its timeout (1 s = 10,000 flows).
        let traces = flood(&mut c, 20_000);
        assert_eq!(traces, 20_000, "every packet traced, early when its flow was evicted");
        assert!(c.stats.flows_evicted > 10_000, "{:?}", c.stats);
        assert_eq!(c.stats.traces_finished_early, c.stats.flows_evicted);
        assert_eq!(c.stats.anchors_evicted, 0);
        assert_eq!(c.stats.records_evicted, 0, "every record of an evicted flow was used by its trace");
        assert_eq!((c.flows(), c.held_bytes()), (0, 0), "nothing left after the flush");
    }

    #[test]
    fn a_bulk_flow_over_the_budget_sheds_its_used_records_and_is_not_evicted() {
        let mut cov = Coverage::default();
        cov.global.extend(Stage::ALL.iter().filter(|s| !s.is_optional()));
        let mut c = Correlator::new(cov);
        c.budget_bytes = 1 << 20;
        let mut traces = Vec::new();
        // A flow with one stray record, seen first: the least recently active one all
        // along, with the bulk flow behind it.
        let mut stray = Event::ZERO;
        (stray.stage, stray.ts_ns, stray.sport, stray.dport, stray.saddr[0], stray.daddr[0]) =
            (Stage::TransportRcv as u8, 999_000, 5, 6, 198, 198);
        c.push(&stray);
        for i in 0..5_000u32 {
            let t0 = 1_000_000 + u64::from(i) * 10_000;
            for (k, s) in Stage::KERNEL_ORDER.iter().filter(|s| !s.is_optional()).enumerate() {
                let mut e = Event::ZERO;
                (e.stage, e.ts_ns) = (*s as u8, t0 + k as u64 * 100);
                (e.seq, e.len) = (i * 1000, 1000);
                if matches!(s, Stage::SockQueue | Stage::RecvSyscall) {
                    (e.seq, e.len, e.flags) = (i * 1000 + 1000, 0, F_END);
                }
                (e.sport, e.dport, e.saddr[0], e.daddr[0]) = (1, 2, 198, 198);
                c.push(&e);
            }
            // Another flow's packet now and then: it makes the bulk flow the least recently
            // active one when the budget is passed.
            if i % 10 == 0 {
                let mut other = Event::ZERO;
                (other.stage, other.ts_ns, other.seq, other.len) = (Stage::DevQueue as u8, t0 + 5_000, i, 10);
                (other.sport, other.dport, other.saddr[0], other.daddr[0]) = (3, 4, 198, 198);
                c.push(&other);
            }
            if i % 50 == 0 {
                c.advance(t0, &mut |t| traces.push(t));
            }
        }
        c.flush(&mut |t| traces.push(t));
        let data = traces.iter().filter(|t| t.flow.sport == 1).count();
        assert_eq!(data, 5_000);
        assert!(c.stats.records > 60_000 && c.held_bytes() == 0);
        assert!(traces.iter().filter(|t| t.flow.sport == 1).all(|t| t.complete));
        // The bulk flow gave up only records its traces had used (an end-only record
        // marks the bytes below it); what was evicted is the other flow's (500 records
        // of packets that never get their other stages).
        assert_eq!(c.stats.flows_evicted, 0, "{:?}", c.stats);
        assert!(c.stats.records_evicted <= 500, "{:?}", c.stats);
    }

    #[test]
    fn finished_udp_flows_leave_nothing_behind() {
        let mut cov = Coverage::default();
        cov.global.extend(Stage::ALL.iter().filter(|s| !s.is_optional()));
        let mut c = Correlator::new(cov);
        let traces = flood(&mut c, 20_000);
        assert_eq!((traces, c.stats.incomplete, c.stats.flows_evicted), (20_000, 0, 0));
        assert_eq!((c.flows(), c.held_bytes()), (0, 0));
    }
}
