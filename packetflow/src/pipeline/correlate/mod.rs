//! Joins per-hook records into per-packet traces.
//!
//! A *packet* is the `sk_buff` as the device layer queues it: every `dev_queue` record is
//! an anchor (on a host that only receives, an unmatched `netif_receive` record is; TCP
//! data seen at `tc_egress` that no `dev_queue` record anchored becomes its own). For
//! each anchor and each other stage we pick the record of the same flow that covers the
//! packet's bytes and sits on the right side of the anchor in time:
//!
//! * TCP records carry stream byte ranges. A packet passes a sending-side stage with its
//!   first byte and has passed a receiving-side stage once its last byte has, so a send
//!   syscall that wrote many segments, a GSO super-packet, a GRO merge or a read that
//!   returned several segments all attribute correctly.
//! * UDP records carry a payload key; each record is used by one datagram only.
//!
//! Every stage sits on a known side of the anchor in kernel order (`tc_egress` before
//! `dev_queue`, `nic_xmit` and the receive stages after it): the record taken is the
//! nearest covering one on that side, never one from the other side, which belongs to
//! another packet. A trace is finished when every expected stage matched
//! and the readers have delivered everything up to its last timestamp (the watermark), or
//! when the watermark passes the anchor by the timeout (a UDP datagram its socket refused
//! sooner): stages still missing are reported missing, never guessed.
//!
//! Memory is bounded: by `budget_bytes` over every flow (estimated by `FlowState::bytes`;
//! past it a long list sheds its oldest records, else the least recently active flow is
//! evicted, its pending packets finished early), per flow and stage at most
//! `MAX_TCP_PER_STAGE` / `MAX_UDP_PER_STAGE` records, at most `max_flows` flows, records
//! older than the retention dropped. Every eviction is counted, and O(1).
//!
//! Work is bounded too: `advance` looks only at flows that got records since it last
//! did, or whose wake-up time (when the watermark alone may finish a trace) has passed.
//!
//! Where each part lives:
//!
//! * this file: the `Correlator` (`push`, `advance`, `flush`) and `look`, which finishes
//!   the ready traces of one flow (retransmissions, extra hops, statistics);
//! * `records`: a flow's records per stage (`Rec`, `Records`, `FlowState`), their bounds
//!   and their memory estimates;
//! * `matching`: which record of each stage belongs to an anchor's trace (`side`,
//!   `covers`, `best`), when a trace is complete, how it is built;
//! * `anchors`: anchors besides `dev_queue` (`netif_receive` on a host that only
//!   receives, `tc_egress` TCP data that no `dev_queue` record anchored);
//! * `udp_flow`: the flow of UDP records from a socket that sees only part of it;
//! * `budget`: the memory budget (shedding records, evicting flows, dropping idle ones).

mod anchors;
mod budget;
mod matching;
mod records;
#[cfg(test)]
mod tests;
mod udp_flow;

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
};

use hashlink::LinkedHashMap;

// Every record is hashed several times on its way (flow, process, UDP destination):
// SipHash's DoS resistance is not needed for keys the kernel hands us, and Fx is several
// times cheaper.
use rustc_hash::{FxBuildHasher, FxHashMap as HashMap, FxHashSet as HashSet};

use packetflow_common::{Event, Kind, Stage, event::F_END};

use self::{
    anchors::{promote_egress_orphans, promote_ingress_anchors},
    matching::{build, copy_bound, drop_of, dropped_at_socket, has_gap, mark_used, retransmits_of, trim_after},
    records::{ANCHOR_BYTES, Anchor, DropRec, FlowState, MAX_DROPS, Rec, control_len, raw_seq, rec_base},
    udp_flow::MAX_ORPHANS,
};
use crate::{
    kernel::drops::DropNamer,
    model::drops::PacketDrop,
    model::trace::{Device, Flow, Trace, TraceKind},
    pipeline::comm::CommCache,
};

/// Counters of what the correlator had to give up on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CorrStats {
    pub records: u64,
    pub traces: u64,
    pub incomplete: u64,
    pub flows_evicted: u64,
    pub records_evicted: u64,
    pub records_unmatched: u64,
    pub bad_records: u64,
    pub extra_hops: u64,
    /// TCP packets seen at tc_egress whose dev_queue record never came: traced from
    /// tc_egress, with dev_queue (and usually nic_xmit) reported missing.
    pub egress_unanchored: u64,
    /// Packets (anchors) whose trace was lost with an evicted flow: with the kernel's
    /// and the readers' losses at dev_queue, what makes traced + lost = sent.
    pub anchors_evicted: u64,
    /// Traces finished before their time because their flow was evicted for the
    /// memory bound (their missing stages may still have come).
    pub traces_finished_early: u64,
    /// Incomplete traces missing a stage between two they have (`has_gap`): the packet
    /// passed it, and no record came.
    pub stage_gaps: u64,
    /// Drops joined to a packet's trace, and drops of packets without one.
    pub drops_traced: u64,
    pub drops_untraced: u64,
    /// Retransmission records taken.
    pub retransmits: u64,
}

/// Which device stages are observable where: the devices with XDP and
/// TC attached. Tracepoint stages are global and listed in `global`.
#[derive(Clone, Debug, Default)]
pub struct Coverage {
    pub global: HashSet<Stage>,
    pub xdp: HashSet<Device>,
    pub tc_ingress: HashSet<Device>,
    pub tc_egress: HashSet<Device>,
}

pub struct Correlator {
    /// Least recently active first (a record moves its flow to the back).
    flows: LinkedHashMap<Flow, FlowState, FxBuildHasher>,
    pub coverage: Coverage,
    pub stats: CorrStats,
    /// Everything with a timestamp below this has been delivered.
    watermark: u64,
    pub timeout_ns: u64,
    pub retention_ns: u64,
    pub max_flows: usize,
    /// The memory the flows may hold, by `FlowState::bytes`; past it the oldest records
    /// of a flooded list, else the least recently active flows, go (counted).
    pub budget_bytes: usize,
    /// Sum of every flow's `FlowState::accounted`.
    held_bytes: usize,
    /// Flows that got records since `advance` last looked at them.
    dirty: Vec<Flow>,
    /// (watermark, flow): when a flow may finish a trace without new records.
    wakes: BinaryHeap<Reverse<(u64, Flow)>>,
    /// Command names of the processes seen at process stages.
    comms: CommCache,
    /// UDP (family, source, ports) → the flow with its destination (see `resolve`).
    udp_dst: HashMap<(bool, [u8; 16], u16, u16), Flow>,
    /// UDP (family, destination port, payload key, length) of a queued datagram → its
    /// flow (see `resolve`).
    udp_queued: HashMap<(bool, u16, u32, u32), Flow>,
    /// UDP receive-side records whose flow is not known yet (at most `MAX_ORPHANS`).
    orphans: VecDeque<Event>,
    /// Traces of evicted flows, finished early, for the next `advance` to emit.
    early: Vec<Trace>,
    last_prune: u64,
    /// Drops no trace took (`take_untraced_drops`).
    untraced: Vec<PacketDrop>,
    /// Names drop reasons and locations.
    pub namer: DropNamer,
}

/// The default of `Correlator::budget_bytes` (the daemon's `correlator_budget_mb`).
pub const DEFAULT_BUDGET_MB: usize = 16;

impl Correlator {
    pub fn new(coverage: Coverage) -> Correlator {
        Correlator {
            flows: LinkedHashMap::with_hasher(FxBuildHasher),
            coverage,
            stats: CorrStats::default(),
            watermark: 0,
            timeout_ns: 1_000_000_000,
            retention_ns: 5_000_000_000,
            max_flows: 65_536,
            budget_bytes: DEFAULT_BUDGET_MB << 20,
            held_bytes: 0,
            dirty: Vec::new(),
            wakes: BinaryHeap::new(),
            comms: CommCache::default(),
            udp_dst: HashMap::default(),
            udp_queued: HashMap::default(),
            orphans: VecDeque::new(),
            early: Vec::new(),
            last_prune: 0,
            untraced: Vec::new(),
            namer: DropNamer::default(),
        }
    }

    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// Estimated bytes the flows hold now (at most `budget_bytes` plus one record).
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Adds one record.
    pub fn push(&mut self, ev: &Event) {
        self.stats.records += 1;
        let Some(stage) = Stage::from_u8(ev.stage) else {
            self.stats.bad_records += 1;
            return;
        };
        let Some(flow) = self.resolve(Flow::of(ev), ev) else {
            // Destination not known yet: retried on every `advance`.
            if self.orphans.len() >= MAX_ORPHANS {
                self.orphans.pop_front();
                self.stats.records_evicted += 1;
            }
            self.orphans.push_back(*ev);
            return;
        };
        self.push_to(flow, stage, ev);
    }

    /// The flow's state, made if new (which may evict the least recently active flow);
    /// the flow becomes the most recently active. For the rare records (drops,
    /// retransmissions): two lookups, where `push_to` inlines the same steps to do one
    /// (returning the first lookup's borrow from here does not pass the borrow checker).
    fn state_of(&mut self, flow: Flow) -> &mut FlowState {
        if self.flows.contains_key(&flow) {
            return self.flows.to_back(&flow).expect("flow exists");
        }
        if self.flows.len() >= self.max_flows {
            self.evict_front();
        }
        let st = FlowState::default();
        self.held_bytes += st.bytes();
        self.flows.entry(flow).or_insert(FlowState { accounted: st.bytes(), ..st })
    }

    fn mark_dirty(&mut self, flow: Flow) {
        if let Some(st) = self.flows.get_mut(&flow)
            && !st.dirty
        {
            st.dirty = true;
            self.dirty.push(flow);
        }
    }

    /// Adds a drop record (`ev`, then `detail`, its second half: `DropRecord::detail`).
    pub fn push_drop(&mut self, ev: &Event, detail: &Event) {
        self.stats.records += 1;
        let flow = Flow::of(ev);
        let st = self.state_of(flow);
        let before = st.bytes();
        st.last_ts = st.last_ts.max(ev.ts_ns);
        let d = DropRec { rec: rec_of(st, ev), reason: detail.seq, location: detail.ts_ns, kind: ev.kind() };
        let at = st.drops.iter().rposition(|x| x.rec.ts <= d.rec.ts).map_or(0, |i| i + 1);
        st.drops.insert(at, d);
        let old = (st.drops.len() > MAX_DROPS).then(|| st.drops.pop_front()).flatten();
        let after = st.bytes();
        st.accounted = st.accounted + after - before;
        self.held_bytes = self.held_bytes + after - before;
        self.mark_dirty(flow);
        if let Some(old) = old {
            let st = self.flows.get(&flow).expect("flow exists");
            let p = untraced_drop(&mut self.namer, &flow, st, &old);
            self.stats.drops_untraced += 1;
            self.untraced.push(p);
        }
    }

    /// Adds a TCP retransmission record.
    pub fn push_retrans(&mut self, ev: &Event) {
        self.stats.records += 1;
        self.stats.retransmits += 1;
        let flow = Flow::of(ev);
        let st = self.state_of(flow);
        let before = st.bytes();
        let rec = rec_of(st, ev);
        st.retrans.push_back(rec);
        if st.retrans.len() > MAX_DROPS {
            st.retrans.pop_front();
        }
        let after = st.bytes();
        st.accounted = st.accounted + after - before;
        self.held_bytes = self.held_bytes + after - before;
        self.mark_dirty(flow);
    }

    /// Drops of packets no trace took since the last call.
    pub fn take_untraced_drops(&mut self) -> Vec<PacketDrop> {
        std::mem::take(&mut self.untraced)
    }

    fn push_to(&mut self, flow: Flow, stage: Stage, ev: &Event) {
        // One lookup for a known flow (which becomes the most recently active).
        let st = if let Some(st) = self.flows.to_back(&flow) {
            st
        } else {
            if self.flows.len() >= self.max_flows {
                self.evict_front();
            }
            let st = FlowState::default();
            self.held_bytes += st.bytes();
            self.flows.entry(flow).or_insert(FlowState { accounted: st.bytes(), ..st })
        };
        st.last_ts = st.last_ts.max(ev.ts_ns);
        let rec = rec_of(st, ev);
        let until = st.anchored_until;
        // Accounted by difference: only this list and the pending anchors change.
        let before = st.stages[stage as usize].as_ref().map_or(0, |l| l.bytes()) + st.pending.len() * ANCHOR_BYTES;
        if !st.list_mut(stage).insert(flow.udp, rec, until) {
            self.stats.records_evicted += 1;
        }
        let kind = match ev.kind() {
            Kind::Data => TraceKind::Data,
            k => TraceKind::Control(k),
        };
        if stage == Stage::DevQueue {
            st.has_egress = true;
            let at = st.pending.iter().rposition(|a| a.rec.ts <= rec.ts).map_or(0, |i| i + 1);
            st.pending.insert(at, Anchor { stage, rec, kind });
        }
        if !st.dirty {
            st.dirty = true;
            self.dirty.push(flow);
        }
        let after = st.list(stage).bytes() + st.pending.len() * ANCHOR_BYTES;
        st.accounted = st.accounted + after - before;
        self.held_bytes = self.held_bytes + after - before;
        // The accounting by difference must agree with the full count (unit tests).
        #[cfg(test)]
        assert_eq!(st.accounted, st.bytes());
        if self.held_bytes > self.budget_bytes {
            self.shed(flow);
        }
        if matches!(stage, Stage::SendSyscall | Stage::SockSend | Stage::CopyToUser | Stage::RecvSyscall) {
            // Looked up while the process most likely still runs.
            self.comms.note(ev.aux);
        }
    }

    /// Records that everything up to `wm` has been delivered, and emits the traces that
    /// are now finished. Only flows that got records, or whose wake-up time the
    /// watermark passed, are looked at.
    pub fn advance(&mut self, wm: u64, out: &mut impl FnMut(Trace)) {
        self.watermark = self.watermark.max(wm);
        if !self.orphans.is_empty() {
            self.retry_orphans();
        }
        let wm = self.watermark;
        for t in self.early.drain(..) {
            out(t);
        }
        let mut todo = std::mem::take(&mut self.dirty);
        while let Some(Reverse((t, flow))) = self.wakes.peek().copied() {
            if t > wm {
                break;
            }
            self.wakes.pop();
            if let Some(st) = self.flows.get_mut(&flow)
                && st.wake == t
            {
                st.wake = 0;
                if !st.dirty {
                    st.dirty = true;
                    todo.push(flow);
                }
            }
        }
        if wm == u64::MAX {
            // The end: every flow, in case one waits for nothing the watermark passes.
            todo.extend(self.flows.iter_mut().filter(|(_, st)| !st.dirty).map(|(f, st)| {
                st.dirty = true;
                *f
            }));
        }
        for flow in todo.drain(..) {
            let Some(st) = self.flows.get_mut(&flow) else { continue };
            st.dirty = false;
            let wake = self.look(&flow, wm, true, out);
            let st = self.flows.get_mut(&flow).expect("flow exists");
            if flow.udp && st.pending.is_empty() && st.drops.is_empty() && st.stages.iter().all(Option::is_none) {
                // Nothing left to join: a UDP flow keeps no state between datagrams.
                self.held_bytes -= st.accounted;
                self.flows.remove(&flow);
                continue;
            }
            if let Some(t) = wake
                && (st.wake == 0 || t < st.wake)
            {
                st.wake = t;
                self.wakes.push(Reverse((t, flow)));
            }
            let bytes = st.bytes();
            self.held_bytes = self.held_bytes + bytes - st.accounted;
            st.accounted = bytes;
        }
        self.dirty = todo;
        self.prune();
    }

    /// Finishes what is ready in one flow (and, with `prune`, drops its records older than
    /// the retention); returns the watermark at which it should be looked at again if no
    /// record comes before.
    fn look(&mut self, flow: &Flow, wm: u64, prune: bool, out: &mut impl FnMut(Trace)) -> Option<u64> {
        let timeout = self.timeout_ns;
        let settle = timeout / 4;
        let horizon = wm.saturating_sub(self.retention_ns);
        let coverage = &self.coverage;
        let stats = &mut self.stats;
        let comms = &self.comms;
        let namer = &mut self.namer;
        let untraced = &mut self.untraced;
        let st = self.flows.get_mut(flow).expect("flow exists");
        // On a host that only receives, unmatched netif_receive records are anchors.
        if !st.has_egress {
            promote_ingress_anchors(st, wm, timeout);
        } else if !flow.udp {
            stats.egress_unanchored += promote_egress_orphans(st, wm, timeout);
        }
        let mut wake = None;
        while let Some(anchor) = st.pending.front() {
            let mut trace = build(flow, st, anchor, coverage);
            // Records after the packet's drop are another copy's; a drop after its bytes
            // were queued again is the copy's (docs/drops.md, "Retransmissions"). Not
            // trimmed at the copy itself: after a spurious retransmission the original
            // arrived, and its own late stages (the copy) come after the copy was queued.
            let bound = copy_bound(flow, st, 0);
            let dropped = drop_of(flow, st, 0, bound);
            if let Some((_, d)) = dropped {
                trim_after(&mut trace, d.rec.ts);
            }
            let last = trace.stages.iter().map(|s| s.t_ns).max().unwrap_or(0);
            // A dropped packet's trace is done once its drop is delivered; TCP data's
            // waits for the retransmission (or the timeout) too.
            let drop_done = dropped.is_some_and(|(_, d)| {
                d.rec.ts < wm
                    && (flow.udp
                        || anchor.kind != TraceKind::Data
                        || !retransmits_of(st, &anchor.rec, d.rec.ts).is_empty())
            });
            let ready = (trace.complete && last < wm)
                || drop_done
                || anchor.rec.ts.saturating_add(timeout) < wm
                || (flow.udp && last < wm && dropped_at_socket(st, &trace));
            if !ready {
                let by_time = anchor.rec.ts.saturating_add(timeout).saturating_add(1);
                // Past `last`, only new records (which make the flow dirty) or the
                // timeout can finish it.
                let by_wm = (trace.complete || flow.udp) && last >= wm;
                wake = Some(if by_wm { by_time.min(last.saturating_add(1)) } else { by_time });
                if let Some((_, d)) = dropped {
                    wake = wake.map(|w| w.min(d.rec.ts.saturating_add(1)));
                }
                break;
            }
            if let Some((i, d)) = dropped {
                st.drops.remove(i);
                stats.drops_traced += 1;
                trace.drop = Some(traced_drop(namer, flow, st, &d, &trace));
            }
            trace.retransmits = retransmits_of(st, &anchor.rec, anchor.rec.ts);
            let anchor = st.pending.pop_front().expect("front exists");
            mark_used(flow, st, &anchor, &trace);
            // (A tc_egress anchor is promoted late, and only for bytes no trace holds:
            // it is never a retransmission.)
            if !flow.udp && anchor.kind == TraceKind::Data && anchor.stage != Stage::TcEgress {
                // In time order now: bytes anchored before are sent again, or the
                // same packet queued on a second device (a bridge, a tunnel).
                if let Some((end, ifindex, ts)) = st.max_end
                    && anchor.rec.hi <= end
                {
                    if ifindex != anchor.rec.aux && anchor.rec.ts.saturating_sub(ts) < 10_000_000 {
                        stats.extra_hops += 1;
                        continue;
                    }
                    trace.kind = TraceKind::Retrans;
                }
                if st.max_end.is_none_or(|(end, _, _)| anchor.rec.hi > end) {
                    st.max_end = Some((anchor.rec.hi, anchor.rec.aux, anchor.rec.ts));
                }
            }
            if trace.kind == TraceKind::Retrans
                && trace.retransmits.first().is_some_and(|t| *t < anchor.rec.ts + 1_000_000)
            {
                // This copy's own retransmission record (written just after it left).
                trace.retransmits.remove(0);
            }
            if !flow.udp {
                st.anchored_until = st.anchored_until.max(anchor.rec.hi);
                if anchor.rec.hi > anchor.rec.lo {
                    st.mark_anchored(anchor.rec.lo, anchor.rec.hi);
                }
            }
            trace.comm = trace.pid.and_then(|p| comms.get(p));
            trace.rx_comm = trace.rx_pid.and_then(|p| comms.get(p));
            trace.cgroup = trace.pid.and_then(|p| comms.cgroup(p));
            trace.rx_cgroup = trace.rx_pid.and_then(|p| comms.cgroup(p));
            stats.traces += 1;
            if !trace.complete {
                stats.incomplete += 1;
                if has_gap(coverage, &trace) {
                    stats.stage_gaps += 1;
                }
            }
            out(trace);
        }
        // Drops no pending anchor can take (each takes only drops after it) and that
        // settled: the packets had no trace.
        while let Some(d) = st.drops.front().copied() {
            let takeable = st.pending.front().is_some_and(|a| a.rec.ts <= d.rec.ts);
            let settled = d.rec.ts.saturating_add(settle) < wm;
            if takeable || !settled {
                if !takeable {
                    let t = d.rec.ts.saturating_add(settle).saturating_add(1);
                    wake = Some(wake.map_or(t, |w: u64| w.min(t)));
                }
                break;
            }
            st.drops.pop_front();
            stats.drops_untraced += 1;
            untraced.push(untraced_drop(namer, flow, st, &d));
        }
        // Records not yet settled may still become anchors (see the promote functions).
        if (!st.has_egress || !flow.udp) && st.last_ts.saturating_add(settle) >= wm {
            let t = st.last_ts.saturating_add(settle).saturating_add(1);
            wake = Some(wake.map_or(t, |w: u64| w.min(t)));
        }
        if flow.udp {
            // Datagrams' records leave with their traces: free the lists they emptied.
            for slot in &mut st.stages {
                if slot.as_ref().is_some_and(|l| l.len() == 0) {
                    *slot = None;
                }
            }
        }
        // Old records go at most every 50 ms of watermark progress per flow.
        if prune && (wm == u64::MAX || wm >= st.pruned_at.saturating_add(50_000_000)) {
            st.pruned_at = wm;
            let keep_from = horizon.min(st.pending.front().map_or(u64::MAX, |a| a.rec.ts));
            // A TCP record is accounted for when its bytes belong to finished traces (a
            // segment of a GSO packet, a read of several packets); a UDP one when used.
            let until = st.anchored_until;
            for slot in &mut st.stages {
                if let Some(list) = slot {
                    stats.records_unmatched += list.prune(keep_from, until);
                    if list.len() == 0 {
                        *slot = None;
                    } else {
                        list.shrink();
                    }
                }
            }
        }
        wake
    }

    /// Emits every pending trace as it stands (end of a run); drops no trace took go to
    /// `take_untraced_drops`.
    pub fn flush(&mut self, out: &mut impl FnMut(Trace)) {
        self.advance(u64::MAX, out);
    }
}

/// The correlator's record of `ev` (a TCP sequence number unwrapped in `st`).
fn rec_of(st: &mut FlowState, ev: &Event) -> Rec {
    if ev.is_udp() {
        Rec { lo: u64::from(ev.seq), hi: u64::from(ev.len), end_only: false, ..rec_base(ev) }
    } else if ev.flags & F_END != 0 {
        let end = st.unwrap_seq(ev.seq);
        Rec { lo: end, hi: end, end_only: true, ..rec_base(ev) }
    } else {
        let lo = st.unwrap_seq(ev.seq);
        Rec { lo, hi: lo + u64::from(ev.len.max(control_len(ev))), end_only: false, ..rec_base(ev) }
    }
}

fn drop_of_rec(namer: &mut DropNamer, flow: &Flow, st: &FlowState, d: &DropRec, after: Option<Stage>) -> PacketDrop {
    PacketDrop {
        t_ns: d.rec.ts,
        reason: namer.reason(d.reason),
        location: namer.location(d.location),
        device: Device { netns: d.rec.aux2, ifindex: d.rec.aux },
        after,
        flow: *flow,
        seq: if flow.udp { d.rec.lo as u32 } else { raw_seq(st, d.rec.lo) },
        len: if flow.udp { d.rec.hi as u32 } else { (d.rec.hi - d.rec.lo) as u32 },
        kind: d.kind.name(),
    }
}

/// A drop on the trace of its packet: after the trace's last stage.
fn traced_drop(namer: &mut DropNamer, flow: &Flow, st: &FlowState, d: &DropRec, t: &Trace) -> PacketDrop {
    let after = t.stages.iter().filter(|s| s.t_ns <= d.rec.ts).max_by_key(|s| (s.t_ns, s.stage.kernel_pos()));
    drop_of_rec(namer, flow, st, d, after.map(|s| s.stage))
}

fn untraced_drop(namer: &mut DropNamer, flow: &Flow, st: &FlowState, d: &DropRec) -> PacketDrop {
    drop_of_rec(namer, flow, st, d, None)
}
