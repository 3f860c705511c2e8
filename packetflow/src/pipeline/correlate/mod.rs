//! Joins per-hook records into per-packet traces.
//!
//! A *packet* is the `sk_buff` as the device layer queues it: every `dev_queue` record is
//! an anchor (on a host that only receives, an unmatched `netif_receive` record is). For
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
//! when the watermark passes the anchor by the timeout: stages still missing are reported
//! missing, never guessed.
//!
//! Memory is bounded: by `budget_bytes` over every flow (estimated by `FlowState::bytes`;
//! past it a long list sheds its oldest records, else the least recently active flow is
//! evicted, its pending packets finished early), per flow and stage at most
//! `MAX_TCP_PER_STAGE` / `MAX_UDP_PER_STAGE` records, at most `max_flows` flows, records
//! older than the retention dropped. Every eviction is counted, and O(1).
//!
//! Work is bounded too: `advance` looks only at flows that got records since it last
//! did, or whose wake-up time (when the watermark alone may finish a trace) has passed.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, VecDeque},
};

use hashlink::LinkedHashMap;

// Every record is hashed several times on its way (flow, process, UDP destination):
// SipHash's DoS resistance is not needed for keys the kernel hands us, and Fx is several
// times cheaper.
use rustc_hash::{FxBuildHasher, FxHashMap as HashMap, FxHashSet as HashSet};

use packetflow_common::{
    Event, Kind, Stage,
    event::{F_END, F_LOOPBACK},
};

use crate::model::trace::{Flow, PathKind, StageTime, Trace, TraceKind};

/// TCP records are compact (a VecDeque of 48-byte `Rec`s) and a bulk transfer keeps tens
/// of thousands in flight per stage (tests/tests/bulk.rs).
const MAX_TCP_PER_STAGE: usize = 1 << 16;
/// UDP records (a hash entry and an arrival-order entry each, `UDP_REC_BYTES`); a flood
/// of identical datagrams fills every stage of a flow up to this cap, or the budget.
const MAX_UDP_PER_STAGE: usize = 1 << 14;
/// Records examined on each side of the best candidate.
const SCAN: usize = 24;
const NSTAGES: usize = Stage::ALL.len();

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
}

/// Which device stages are observable where: (netns inode, ifindex) pairs with XDP and
/// TC attached. Tracepoint stages are global and listed in `global`.
#[derive(Clone, Debug, Default)]
pub struct Coverage {
    pub global: HashSet<Stage>,
    pub xdp: HashSet<(u32, u32)>,
    pub tc_ingress: HashSet<(u32, u32)>,
    pub tc_egress: HashSet<(u32, u32)>,
}

#[derive(Clone, Copy, Debug)]
struct Rec {
    ts: u64,
    /// TCP: unwrapped stream offset of the first byte; UDP: payload key.
    lo: u64,
    /// TCP: one past the last byte; UDP: payload length.
    hi: u64,
    end_only: bool,
    cpu: u16,
    aux: u32,
    aux2: u32,
    flags: u8,
}

impl Rec {
    /// TCP: do finished traces, which hold every byte below `until`, account for this
    /// record? (An end-only record marks the bytes below it.)
    fn used(&self, until: u64) -> bool {
        if self.end_only { self.lo <= until } else { self.lo < until }
    }
}

/// One stage's records of one flow.
#[derive(Default)]
struct Records {
    /// TCP: in time order (and, for one flow, nearly in sequence order).
    tcp: VecDeque<Rec>,
    /// UDP: by (payload key, length), each list in time order. A datagram's record
    /// leaves when a trace uses it, so identical payloads pair one to one, in order.
    udp: UdpRecords,
}

/// UDP records. A hash of short lists, not an ordered map over (key, length, time): a
/// datagram costs a hash lookup and a push at each stage, where the ordered map's insert,
/// range search and removal made the correlator, not the kernel, the limit on how many
/// records a second a run could take.
#[derive(Default)]
struct UdpRecords {
    by_key: HashMap<(u64, u64), Recs>,
    len: usize,
    /// Time of the newest record ever inserted (used or not).
    newest: u64,
    /// (key, length, time) in arrival order, to find the oldest in O(1) (may hold records
    /// already used).
    order: VecDeque<(u64, u64, u64)>,
}

/// The records of one payload key, in time order: nearly always one (no allocation);
/// many when datagrams repeat a payload (a flood of identical ones makes long lists).
enum Recs {
    One(Rec),
    Many(VecDeque<Rec>),
}

impl Recs {
    fn get(&self, i: usize) -> Option<&Rec> {
        match self {
            Recs::One(r) => (i == 0).then_some(r),
            Recs::Many(l) => l.get(i),
        }
    }

    /// The first position whose record is not before `ts` (`strict`: not at or before).
    fn position(&self, ts: u64, strict: bool) -> usize {
        let below = |r: &Rec| if strict { r.ts <= ts } else { r.ts < ts };
        match self {
            Recs::One(r) => below(r) as usize,
            Recs::Many(l) => partition_point_from_back(l, below),
        }
    }

    fn insert(&mut self, r: Rec) {
        if let Recs::One(x) = *self {
            *self = Recs::Many(VecDeque::from([x]));
        }
        if let Recs::Many(l) = self {
            let at = l.iter().rposition(|x| x.ts <= r.ts).map_or(0, |i| i + 1);
            l.insert(at, r);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Rec> {
        let (one, many) = match self {
            Recs::One(r) => (Some(r), None),
            Recs::Many(l) => (None, Some(l.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

impl UdpRecords {
    fn insert(&mut self, r: Rec) {
        match self.by_key.entry((r.lo, r.hi)) {
            std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().insert(r),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Recs::One(r));
            }
        }
        self.len += 1;
        self.newest = self.newest.max(r.ts);
        self.order.push_back((r.lo, r.hi, r.ts));
    }

    /// Where the record of `(key, length)` at time `ts` is in its list.
    fn find(&self, key: (u64, u64), ts: u64) -> Option<usize> {
        let list = self.by_key.get(&key)?;
        let i = list.position(ts, false);
        list.get(i).is_some_and(|r| r.ts == ts).then_some(i)
    }

    fn holds(&self, key: (u64, u64), ts: u64) -> bool {
        self.find(key, ts).is_some()
    }

    /// Takes out the record of `(key, length)` at time `ts`; false when there is none.
    fn remove(&mut self, key: (u64, u64), ts: u64) -> bool {
        let Some(i) = self.find(key, ts) else { return false };
        let empty = match self.by_key.get_mut(&key) {
            Some(Recs::Many(l)) => {
                l.remove(i);
                l.is_empty()
            }
            _ => true,
        };
        if empty {
            self.by_key.remove(&key);
        }
        self.len -= 1;
        true
    }

    /// Removes the oldest record still held; false when none is.
    fn pop_oldest(&mut self) -> Option<bool> {
        let (lo, hi, ts) = self.order.pop_front()?;
        Some(self.remove((lo, hi), ts))
    }

    /// The record of `(key, length)` nearest before `ts` (at or before it) or after it (at
    /// or after it).
    fn nearest(&self, key: (u64, u64), ts: u64, before: bool) -> Option<Rec> {
        let list = self.by_key.get(&key)?;
        if before {
            list.get(list.position(ts, true).checked_sub(1)?).copied()
        } else {
            list.get(list.position(ts, false)).copied()
        }
    }

    fn values(&self) -> impl Iterator<Item = &Rec> {
        self.by_key.values().flat_map(Recs::iter)
    }
}

impl Records {
    fn len(&self) -> usize {
        self.tcp.len() + self.udp.len
    }

    /// Inserts `r`; false when the oldest record had to go to make room before any trace
    /// used it (TCP: its bytes are not below `until`, the end of the finished traces).
    fn insert(&mut self, udp: bool, r: Rec, until: u64) -> bool {
        if udp {
            self.udp.insert(r);
            let mut evicted = false;
            while self.udp.len > MAX_UDP_PER_STAGE {
                match self.udp.pop_oldest() {
                    Some(held) => evicted |= held,
                    None => break,
                }
            }
            // Records used by traces linger in the order list: drop them when it grows.
            if self.udp.order.len() > 2 * self.udp.len + 1024 {
                let mut order = std::mem::take(&mut self.udp.order);
                order.retain(|(lo, hi, ts)| self.udp.holds((*lo, *hi), *ts));
                self.udp.order = order;
            }
            return !evicted;
        } else {
            let at = self.tcp.iter().rposition(|x| x.ts <= r.ts).map_or(0, |i| i + 1);
            self.tcp.insert(at, r);
            if self.tcp.len() > MAX_TCP_PER_STAGE {
                return self.tcp.pop_front().is_none_or(|old| old.used(until));
            }
        }
        true
    }

    /// Drops records older than `keep_from`; returns how many nobody used (TCP: whose
    /// bytes are not below `until`, the end of the finished traces).
    fn prune(&mut self, keep_from: u64, until: u64) -> u64 {
        let mut unmatched = 0;
        while self.tcp.front().is_some_and(|r| r.ts < keep_from) {
            let r = self.tcp.pop_front().expect("front exists");
            if !r.used(until) {
                unmatched += 1;
            }
        }
        // Arrival order is nearly time order: drop from the front while old.
        while self.udp.order.front().is_some_and(|k| k.2 < keep_from) {
            if self.udp.pop_oldest() == Some(true) {
                unmatched += 1;
            }
        }
        unmatched
    }
}

struct Anchor {
    stage: Stage,
    rec: Rec,
    kind: TraceKind,
}

#[derive(Default)]
struct FlowState {
    /// Per stage, allocated at its first record (most flows see a few stages only).
    stages: [Option<Box<Records>>; NSTAGES],
    /// What `bytes()` said when this flow was last accounted in `Correlator::held_bytes`.
    accounted: usize,
    /// Queued in `Correlator::dirty` (records came since `advance` last looked).
    dirty: bool,
    /// Earliest watermark at which a look may finish a trace or promote an anchor
    /// without new records (a `Correlator::wakes` entry exists for it); 0: none.
    wake: u64,
    /// Watermark when this flow's old records were last dropped.
    pruned_at: u64,
    pending: VecDeque<Anchor>,
    has_egress: bool,
    /// TCP sequence unwrapping: last raw value and its 64-bit position.
    seq_ref: Option<(u32, u64)>,
    /// Highest anchored TCP end, with the device and time of that anchor.
    max_end: Option<(u64, u32, u64)>,
    /// TCP: every byte below this belongs to a finished trace.
    anchored_until: u64,
    /// TCP: byte ranges of finished data traces (merged; the newest few thousand).
    anchored: BTreeMap<u64, u64>,
    /// tc_egress records up to this time were checked for a missing dev_queue anchor.
    egress_checked_ts: u64,
    last_ts: u64,
}

/// What a flow costs besides its records: the hashlink node (key, value, links), its
/// table slot, allocator headers.
const FLOW_OVERHEAD: usize = 128;
/// Estimated bytes per held record, with the slack of growing containers (up to 2x):
/// a TCP `Rec` in a VecDeque; a UDP record's hash entry (key, inline record, control
/// byte) plus its arrival-order entry.
const TCP_REC_BYTES: usize = 2 * size_of::<Rec>();
const UDP_REC_BYTES: usize = 2 * (size_of::<((u64, u64), Recs)>() + 1) + 2 * size_of::<(u64, u64, u64)>();
/// A pending anchor, with its queue's slack.
const ANCHOR_BYTES: usize = 2 * size_of::<Anchor>();
/// A stage's records before the first: the box, and the smallest allocations its
/// containers make (a hash table of 4 slots, a queue of 4) with allocator headers.
const STAGE_BYTES: usize = size_of::<Records>() + 16 + 4 * (size_of::<((u64, u64), Recs)>() + 1) + 16 + 4 * 24 + 16;
/// A list at least this long gives up its own oldest records before other flows are
/// evicted for the budget.
const SHED_MIN: usize = 256;
/// Entries in each of the maps that find a UDP flow from a socket's partial view
/// (`udp_dst`, `udp_queued`): cleared when full, so they hold only recent flows.
const MAX_UDP_KEYS: usize = 16_384;
/// Small flows `shed` passes over, at most, before it evicts one.
const SHED_LOOK: usize = 8;
/// UDP receive-side records waiting for their flow's destination, at most.
const MAX_ORPHANS: usize = 16_384;

static NO_RECORDS: std::sync::LazyLock<Records> = std::sync::LazyLock::new(Records::default);

impl Records {
    fn bytes(&self) -> usize {
        STAGE_BYTES + self.tcp.len() * TCP_REC_BYTES + self.udp.len * UDP_REC_BYTES
    }

    /// Removes the oldest record still held; `Some(true)` when no trace had used it
    /// (TCP: its bytes are not below `until`), None when the list is empty.
    fn pop_oldest(&mut self, until: u64) -> Option<bool> {
        if let Some(r) = self.tcp.pop_front() {
            return Some(!r.used(until));
        }
        while self.udp.len > 0 {
            if self.udp.pop_oldest()? {
                return Some(true);
            }
        }
        None
    }

    /// Gives memory back once a burst has passed (containers keep their largest size).
    fn shrink(&mut self) {
        if self.tcp.capacity() > 2 * self.tcp.len() + 64 {
            self.tcp.shrink_to_fit();
        }
        if self.udp.by_key.capacity() > 2 * self.udp.by_key.len() + 64 {
            self.udp.by_key.shrink_to_fit();
        }
        if self.udp.order.capacity() > 2 * self.udp.order.len() + 64 {
            self.udp.order.shrink_to_fit();
        }
    }
}

impl FlowState {
    fn list(&self, stage: Stage) -> &Records {
        self.stages[stage as usize].as_deref().unwrap_or(&NO_RECORDS)
    }

    fn list_mut(&mut self, stage: Stage) -> &mut Records {
        self.stages[stage as usize].get_or_insert_with(Box::default)
    }

    /// Estimated memory this flow holds (what the correlator's budget counts).
    fn bytes(&self) -> usize {
        FLOW_OVERHEAD
            + size_of::<Flow>()
            + size_of::<FlowState>()
            + self.stages.iter().flatten().map(|r| r.bytes()).sum::<usize>()
            + self.pending.len() * ANCHOR_BYTES
            + self.anchored.len() * 48
    }

    /// Records held, over every stage.
    fn records(&self) -> u64 {
        self.stages.iter().flatten().map(|l| l.len() as u64).sum()
    }

    /// The stage holding the most records.
    fn longest(&self) -> Option<Stage> {
        Stage::ALL.iter().copied().filter(|s| self.list(*s).len() > 0).max_by_key(|s| self.list(*s).len())
    }

    /// Notes `[lo, hi)` as belonging to a finished trace.
    fn mark_anchored(&mut self, lo: u64, hi: u64) {
        let (mut lo, mut hi) = (lo, hi);
        // Merge with every interval that touches [lo, hi).
        let touching: Vec<(u64, u64)> =
            self.anchored.range(..=hi).rev().take_while(|(_, e)| **e >= lo).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in touching {
            self.anchored.remove(&s);
            lo = lo.min(s);
            hi = hi.max(e);
        }
        self.anchored.insert(lo, hi);
        while self.anchored.len() > 4096 {
            self.anchored.pop_first();
        }
    }

    /// Does a finished trace or a pending anchor hold any byte of `[lo, hi)`?
    fn anchored_any(&self, lo: u64, hi: u64) -> bool {
        self.anchored.range(..hi).next_back().is_some_and(|(_, e)| *e > lo)
            || self.pending.iter().any(|a| a.rec.lo < hi && lo < a.rec.hi)
    }

    fn unwrap_seq(&mut self, seq: u32) -> u64 {
        match self.seq_ref {
            None => {
                // Start well away from zero so earlier bytes stay representable.
                let pos = 1u64 << 40;
                self.seq_ref = Some((seq, pos));
                pos
            }
            Some((raw, pos)) => {
                let d = seq.wrapping_sub(raw) as i32 as i64;
                let p = (pos as i64 + d) as u64;
                if d > 0 {
                    self.seq_ref = Some((seq, p));
                }
                p
            }
        }
    }
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
    comms: HashMap<u32, Option<String>>,
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
            comms: HashMap::default(),
            udp_dst: HashMap::default(),
            udp_queued: HashMap::default(),
            orphans: VecDeque::new(),
            early: Vec::new(),
            last_prune: 0,
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

    fn push_to(&mut self, flow: Flow, stage: Stage, ev: &Event) {
        // One lookup for a known flow (which becomes the most recently active).
        let st = match self.flows.to_back(&flow) {
            Some(st) => st,
            None => {
                if self.flows.len() >= self.max_flows {
                    self.evict_front();
                }
                let st = FlowState::default();
                self.held_bytes += st.bytes();
                self.flows.entry(flow).or_insert(FlowState { accounted: st.bytes(), ..st })
            }
        };
        st.last_ts = st.last_ts.max(ev.ts_ns);
        let rec = if ev.is_udp() {
            Rec { lo: ev.seq as u64, hi: ev.len as u64, end_only: false, ..rec_base(ev) }
        } else if ev.flags & F_END != 0 {
            let end = st.unwrap_seq(ev.seq);
            Rec { lo: end, hi: end, end_only: true, ..rec_base(ev) }
        } else {
            let lo = st.unwrap_seq(ev.seq);
            Rec { lo, hi: lo + ev.len.max(control_len(ev)) as u64, end_only: false, ..rec_base(ev) }
        };
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
        if matches!(stage, Stage::SendSyscall | Stage::SockSend | Stage::CopyToUser | Stage::RecvSyscall)
            && !self.comms.contains_key(&ev.aux)
        {
            // Looked up while the process most likely still runs.
            if self.comms.len() > 65_536 {
                self.comms.clear();
            }
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", ev.aux)).ok().map(|s| s.trim_end().to_string());
            self.comms.insert(ev.aux, comm);
        }
    }

    /// Brings the flows back within the budget after `flow` grew: its own longest list
    /// gives up its oldest records when it is long (a few flows flooding a stage), else
    /// the least recently active other flow does when its list is long (a bulk flow whose
    /// old records traces have used); a short one is passed over (to the back, at most
    /// `SHED_LOOK` of them), then goes whole (many small flows). Each step frees at least
    /// one record's estimate or is one of `SHED_LOOK` passes: O(1) per record.
    fn shed(&mut self, flow: Flow) {
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

    /// A UDP socket bound to the wildcard address does not know which of its addresses a
    /// datagram was sent to: its receive-side records carry an unspecified destination.
    /// They belong to the flow with the same source and ports seen on the wire. An
    /// unconnected socket read without asking for the sender (recv, read) names no
    /// source either: its records belong to the flow whose datagram with the same
    /// payload key and length was queued on that port.
    fn resolve(&mut self, flow: Flow, ev: &Event) -> Option<Flow> {
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

    fn retry_orphans(&mut self) {
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

    /// Evicts the least recently active flow, counting what it held. Its pending packets
    /// are finished as they stand (stages still missing are reported missing), to be
    /// emitted by the next `advance`.
    fn evict_front(&mut self) {
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
            if flow.udp && st.pending.is_empty() && st.stages.iter().all(Option::is_none) {
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
        let st = self.flows.get_mut(flow).expect("flow exists");
        // On a host that only receives, unmatched netif_receive records are anchors.
        if !st.has_egress {
            promote_ingress_anchors(st, wm, timeout);
        } else if !flow.udp {
            stats.egress_unanchored += promote_egress_orphans(st, wm, timeout);
        }
        let mut wake = None;
        while let Some(anchor) = st.pending.front() {
            let trace = build(flow, st, anchor, coverage);
            let last = trace.stages.iter().map(|s| s.t_ns).max().unwrap_or(0);
            let ready = (trace.complete && last < wm)
                || anchor.rec.ts.saturating_add(timeout) < wm
                || (flow.udp && last < wm && dropped_at_socket(st, &trace));
            if !ready {
                let by_time = anchor.rec.ts.saturating_add(timeout).saturating_add(1);
                // Past `last`, only new records (which make the flow dirty) or the
                // timeout can finish it.
                let by_wm = (trace.complete || flow.udp) && last >= wm;
                wake = Some(if by_wm { by_time.min(last.saturating_add(1)) } else { by_time });
                break;
            }
            let anchor = st.pending.pop_front().expect("front exists");
            mark_used(flow, st, &anchor, &trace);
            let mut trace = trace;
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
            if !flow.udp {
                st.anchored_until = st.anchored_until.max(anchor.rec.hi);
                if anchor.rec.hi > anchor.rec.lo {
                    st.mark_anchored(anchor.rec.lo, anchor.rec.hi);
                }
            }
            trace.comm = trace.pid.and_then(|p| comms.get(&p).cloned().flatten());
            trace.rx_comm = trace.rx_pid.and_then(|p| comms.get(&p).cloned().flatten());
            stats.traces += 1;
            if !trace.complete {
                stats.incomplete += 1;
                if has_gap(coverage, &trace) {
                    stats.stage_gaps += 1;
                }
            }
            out(trace);
        }
        // Records not yet settled may still become anchors (see the promote functions).
        if (!st.has_egress || !flow.udp) && st.last_ts.saturating_add(settle) >= wm {
            let t = st.last_ts.saturating_add(settle).saturating_add(1);
            wake = Some(wake.map_or(t, |w: u64| w.min(t)));
        }
        if flow.udp {
            // Datagrams' records leave with their traces: free the lists they emptied.
            for slot in st.stages.iter_mut() {
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
            for slot in st.stages.iter_mut() {
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

    /// Emits every pending trace as it stands (end of a run).
    pub fn flush(&mut self, out: &mut impl FnMut(Trace)) {
        self.advance(u64::MAX, out);
    }

    /// Drops flows idle past the retention, least recently active first.
    fn prune(&mut self) {
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

fn rec_base(ev: &Event) -> Rec {
    Rec { ts: ev.ts_ns, lo: 0, hi: 0, end_only: false, cpu: ev.cpu, aux: ev.aux, aux2: ev.aux2, flags: ev.flags }
}

/// SYN and FIN occupy one sequence number each.
fn control_len(ev: &Event) -> u32 {
    match ev.kind() {
        Kind::Syn | Kind::Fin => 1,
        _ => 0,
    }
}

fn promote_ingress_anchors(st: &mut FlowState, wm: u64, timeout: u64) {
    let settle = timeout / 4;
    let list = st.list(Stage::NetifReceive);
    let newest_anchor = st.pending.back().map_or(0, |a| a.rec.ts);
    let mut new: Vec<Rec> = list
        .tcp
        .iter()
        .chain(list.udp.values())
        // A loopback packet was queued on this host: without its device-queue record its
        // anchor was lost (counted where it was) or left with an evicted flow.
        .filter(|r| r.ts > newest_anchor && r.ts.saturating_add(settle) < wm && r.flags & F_LOOPBACK == 0)
        .copied()
        .collect();
    new.sort_by_key(|r| r.ts);
    for rec in new {
        st.pending.push_back(Anchor { stage: Stage::NetifReceive, rec, kind: TraceKind::Data });
    }
}

/// A UDP datagram that reached the transport but was never queued on its socket (a full
/// receive buffer, a socket filter): its socket stages will not come, and the trace need
/// not wait for the timeout. The proof is a later datagram of the same flow queued well
/// after this one reached the transport (a datagram is queued in the softirq that hands
/// it over, microseconds after `transport_rcv`). Without it, a receiver that could not
/// keep up held every dropped datagram's records for the whole timeout, and at 50,000
/// datagrams a second the correlator's per-stage bound evicted the records of datagrams
/// that had arrived.
fn dropped_at_socket(st: &FlowState, trace: &Trace) -> bool {
    const GRACE_NS: u64 = 1_000_000;
    let Some(rcv) = trace.time_of(Stage::TransportRcv) else { return false };
    trace.time_of(Stage::SockQueue).is_none() && st.list(Stage::SockQueue).udp.newest > rcv.saturating_add(GRACE_NS)
}

/// TCP data seen at tc_egress that no dev_queue record anchored (the net_dev_queue
/// program did not record it: seen rarely here under load, with no recursion miss
/// counted): it becomes its own anchor once it has settled, so its bytes are traced and
/// the missing stages are reported, never lost. Returns how many were promoted.
fn promote_egress_orphans(st: &mut FlowState, wm: u64, timeout: u64) -> u64 {
    let settle = timeout / 4;
    let checked = st.egress_checked_ts;
    // The list is in time order: only its tail is newer than what was checked.
    let list = &st.list(Stage::TcEgress).tcp;
    let from = partition_point_from_back(list, |r| r.ts <= checked);
    let orphans: Vec<Rec> = list
        .range(from..)
        .filter(|r| r.ts.saturating_add(settle) < wm && !r.end_only && r.hi > r.lo)
        .copied()
        .collect();
    let Some(newest) = orphans.iter().map(|r| r.ts).max() else { return 0 };
    st.egress_checked_ts = newest;
    let mut n = 0;
    for rec in orphans {
        if st.anchored_any(rec.lo, rec.hi) {
            continue;
        }
        let at = st.pending.iter().rposition(|a| a.rec.ts <= rec.ts).map_or(0, |i| i + 1);
        st.pending.insert(at, Anchor { stage: Stage::TcEgress, rec, kind: TraceKind::Data });
        n += 1;
    }
    n
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Before,
    After,
    Either,
}

fn side(stage: Stage, anchor: Stage) -> Side {
    use Stage::*;
    // Kernel order (docs/stages.md): tcx egress runs before the net_dev_queue tracepoint,
    // the driver after it. Native XDP runs before netif_receive_skb, generic XDP after it.
    match (anchor, stage) {
        (_, SendSyscall | SockSend | IpSend) => Side::Before,
        (DevQueue, TcEgress) => Side::Before,
        (NetifReceive, DevQueue | TcEgress | NicXmit) => Side::Before,
        (NetifReceive, Xdp) => Side::Either,
        _ => Side::After,
    }
}

/// Does TCP record `r` hold the bytes of `a` that matter at this stage?
fn covers(stage: Stage, r: &Rec, a: &Rec) -> bool {
    if a.hi == a.lo {
        // A control segment: the record of the same sequence number.
        return r.lo == a.lo && r.hi == a.hi;
    }
    if r.end_only {
        return r.lo >= a.hi;
    }
    let byte = if stage.is_egress() { a.lo } else { a.hi - 1 };
    r.lo <= byte && byte < r.hi
}

/// The best record of `stage` for anchor `a`, by the rules in the module docs.
fn best(flow: &Flow, st: &FlowState, stage: Stage, anchor: &Anchor) -> Option<Rec> {
    let list = st.list(stage);
    let a = &anchor.rec;
    let sd = side(stage, anchor.stage);
    if flow.udp {
        // The same datagram: same key and length, the nearest on the allowed side.
        let before = || list.udp.nearest((a.lo, a.hi), a.ts, true);
        let after = || list.udp.nearest((a.lo, a.hi), a.ts, false);
        return match sd {
            Side::Before => before(),
            Side::After => after(),
            Side::Either => match (before(), after()) {
                (Some(b), Some(f)) => Some(if a.ts - b.ts <= f.ts - a.ts { b } else { f }),
                (b, f) => b.or(f),
            },
        };
    }
    // TCP: start where the covering record should be (records are nearly in sequence
    // order), then look around it.
    let pivot = if stage.is_egress() {
        partition_point_from_back(&list.tcp, |r| r.lo <= a.lo)
    } else {
        partition_point_from_back(&list.tcp, |r| r.hi < a.hi)
    };
    let from = pivot.saturating_sub(SCAN);
    let to = (pivot + SCAN).min(list.tcp.len());
    // The list is in time order, so within the window the records after the anchor are a
    // tail and those before it a head: the nearest covering one is the first met walking
    // away from the anchor's time (ties: the earliest in the list, as a forward scan
    // keeping strict improvements would pick).
    let after = partition_point_from_back(&list.tcp, |r| r.ts < a.ts).clamp(from, to);
    let first_after = || list.tcp.range(after..to).find(|r| covers(stage, r, a)).copied();
    let last_before = || {
        let upto = partition_point_from_back(&list.tcp, |r| r.ts <= a.ts).clamp(from, to);
        let i = (from..upto).rev().find(|&i| covers(stage, &list.tcp[i], a))?;
        let ts = list.tcp[i].ts;
        let i = (from..i)
            .rev()
            .take_while(|&j| list.tcp[j].ts == ts)
            .filter(|&j| covers(stage, &list.tcp[j], a))
            .last()
            .unwrap_or(i);
        Some(list.tcp[i])
    };
    match sd {
        Side::Before => last_before(),
        Side::After => first_after(),
        Side::Either => match (last_before(), first_after()) {
            (Some(b), Some(f)) => Some(if b.ts.abs_diff(a.ts) <= f.ts.abs_diff(a.ts) { b } else { f }),
            (b, f) => b.or(f),
        },
    }
}

/// `VecDeque::partition_point`, searched from the back. The records a trace needs are
/// among the newest (traces finish in time order, a few ms behind the readers), so an
/// exponential search from the end touches a few cache-hot records, where a binary search
/// over the whole list (up to `MAX_TCP_PER_STAGE` per stage) touched cold ones at every
/// step: that was most of the correlator's time under a ping-pong load.
fn partition_point_from_back(list: &VecDeque<Rec>, pred: impl Fn(&Rec) -> bool) -> usize {
    let n = list.len();
    // `pred` holds below `lo` and fails from `hi` on.
    let (mut lo, mut hi) = (0, n);
    let mut step = 1;
    while step <= n {
        let i = n - step;
        if pred(&list[i]) {
            lo = i + 1;
            break;
        }
        hi = i;
        step *= 2;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(&list[mid]) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Does the trace miss a traced stage that lies, in kernel order, between two stages it
/// has? Then the packet passed that stage and the kernel wrote no record there (a full
/// ring and a skipped run are counted where they happen; this counts the rest).
fn has_gap(cov: &Coverage, t: &Trace) -> bool {
    if matches!(t.kind, TraceKind::Control(_)) {
        return false;
    }
    let pos: Vec<usize> = t.stages.iter().map(|s| s.stage.kernel_pos()).collect();
    let (Some(lo), Some(hi)) = (pos.iter().min(), pos.iter().max()) else { return false };
    cov.global.iter().any(|s| {
        let p = s.kernel_pos();
        *lo < p && p < *hi && !pos.contains(&p) && !s.is_per_interface()
    })
}

/// Does this trace have every stage it should have, given where its packet went?
fn complete(cov: &Coverage, anchor: &Anchor, rx_dev: Option<(u32, u32)>, found: &[Option<Rec>; NSTAGES]) -> bool {
    let dev = (anchor.rec.aux2, anchor.rec.aux);
    for s in Stage::ALL {
        let want = match s {
            Stage::TcEgress => {
                anchor.stage == Stage::TcEgress || (anchor.stage == Stage::DevQueue && cov.tc_egress.contains(&dev))
            }
            Stage::Xdp => rx_dev.is_some_and(|d| cov.xdp.contains(&d)),
            Stage::TcIngress => rx_dev.is_some_and(|d| cov.tc_ingress.contains(&d)),
            // Control segments have no socket-level or syscall stages.
            Stage::SendSyscall | Stage::SockSend | Stage::SockQueue | Stage::CopyToUser | Stage::RecvSyscall
                if matches!(anchor.kind, TraceKind::Control(_)) =>
            {
                false
            }
            Stage::DevQueue | Stage::NicXmit | Stage::SendSyscall | Stage::SockSend | Stage::IpSend
                if anchor.stage == Stage::NetifReceive =>
            {
                false
            }
            _ => cov.global.contains(&s),
        };
        if want && found[s as usize].is_none() {
            return false;
        }
    }
    true
}

/// Builds the trace of `anchor` from what is known now.
fn build(flow: &Flow, st: &FlowState, anchor: &Anchor, cov: &Coverage) -> Trace {
    // Per stage, the record taken (by stage number).
    let mut found: [Option<Rec>; NSTAGES] = [None; NSTAGES];
    for s in Stage::ALL {
        found[s as usize] = if s == anchor.stage { Some(anchor.rec) } else { best(flow, st, s, anchor) };
    }
    let rx = found[Stage::NetifReceive as usize].map(|r| (r.aux2, r.aux));
    let complete = complete(cov, anchor, rx, &found);
    let proc_of = |stage: Stage| found[stage as usize].map(|r| (r.aux, r.aux2));
    let tx = proc_of(Stage::SendSyscall).or(proc_of(Stage::SockSend));
    let rxp = proc_of(Stage::RecvSyscall).or(proc_of(Stage::CopyToUser));
    let mut stages: Vec<StageTime> = Stage::ALL
        .iter()
        .filter_map(|s| found[*s as usize].map(|r| StageTime { stage: *s, t_ns: r.ts, cpu: r.cpu }))
        .collect();
    stages.sort_unstable_by_key(|s| (s.t_ns, s.stage));
    let seq_raw = if flow.udp { anchor.rec.lo as u32 } else { raw_seq(st, anchor.rec.lo) };
    let len = if flow.udp { anchor.rec.hi as u32 } else { (anchor.rec.hi - anchor.rec.lo) as u32 };
    let trace = Trace {
        kind: anchor.kind,
        flow: *flow,
        seq: seq_raw,
        len,
        path: if anchor.rec.flags & F_LOOPBACK != 0 { PathKind::Loopback } else { PathKind::Nic },
        ifindex: anchor.rec.aux,
        netns: anchor.rec.aux2,
        rx_ifindex: rx.map(|(ns, i)| (i, ns)),
        pid: tx.map(|p| p.0),
        tid: tx.map(|p| p.1),
        rx_pid: rxp.map(|p| p.0),
        rx_tid: rxp.map(|p| p.1),
        comm: None,
        rx_comm: None,
        stages,
        complete,
    };
    trace
}

/// The raw 32-bit sequence number of unwrapped position `pos`.
fn raw_seq(st: &FlowState, pos: u64) -> u32 {
    match st.seq_ref {
        Some((raw, at)) => raw.wrapping_add(pos.wrapping_sub(at) as u32),
        None => pos as u32,
    }
}

/// A UDP trace's records leave their stages, so no other datagram can use them.
fn mark_used(flow: &Flow, st: &mut FlowState, anchor: &Anchor, trace: &Trace) {
    if !flow.udp {
        return;
    }
    for t in &trace.stages {
        st.list_mut(t.stage).udp.remove((anchor.rec.lo, anchor.rec.hi), t.t_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use packetflow_common::event::{F_UDP, KIND_SHIFT};

    fn ev(stage: Stage, ts: u64, seq: u32, len: u32) -> Event {
        let mut e = Event::ZERO;
        e.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        e.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        e.sport = 40000;
        e.dport = 8080;
        e.stage = stage as u8;
        e.ts_ns = ts;
        e.seq = seq;
        e.len = len;
        e.flags = F_LOOPBACK;
        e.aux = 1;
        e.aux2 = 7;
        e
    }

    /// Every hook of a kernel without kprobes (no IP-layer stages).
    #[test]
    fn search_from_the_back_finds_the_partition_point() {
        for n in [0usize, 1, 2, 3, 7, 8, 9, 100, 1000] {
            let list: VecDeque<Rec> = (0..n as u64).map(|i| Rec { lo: i * 10, ..rec_base(&Event::ZERO) }).collect();
            for x in [0u64, 1, 5, 10, 15, 500, 995, 9990, 10_000, u64::MAX] {
                let want = list.partition_point(|r| r.lo <= x);
                assert_eq!(partition_point_from_back(&list, |r| r.lo <= x), want, "n={n} x={x}");
            }
        }
    }

    fn all_global() -> Coverage {
        let mut c = Coverage::default();
        c.global = Stage::ALL.into_iter().filter(|s| !matches!(s, Stage::IpSend | Stage::IpRcv)).collect();
        c.xdp.insert((7, 1));
        c.tc_ingress.insert((7, 1));
        c.tc_egress.insert((7, 1));
        c
    }

    fn run(c: &mut Correlator, evs: &[Event]) -> Vec<Trace> {
        for e in evs {
            c.push(e);
        }
        let mut out = Vec::new();
        c.flush(&mut |t| out.push(t));
        out
    }

    /// Every stage once for bytes [seq, seq+len), 100 ns apart, in kernel order.
    fn one_packet(t0: u64, seq: u32, len: u32) -> Vec<Event> {
        let order = [
            Stage::SendSyscall,
            Stage::SockSend,
            Stage::TcEgress,
            Stage::DevQueue,
            Stage::NicXmit,
            Stage::NetifReceive,
            Stage::Xdp,
            Stage::TcIngress,
            Stage::TransportRcv,
            Stage::SockQueue,
            Stage::CopyToUser,
            Stage::RecvSyscall,
        ];
        order
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let mut e = ev(s, t0 + i as u64 * 100, seq, len);
                if s == Stage::SockQueue || s == Stage::RecvSyscall {
                    e.seq = seq.wrapping_add(len);
                    e.len = 0;
                    e.flags |= F_END;
                }
                e
            })
            .collect()
    }

    #[test]
    fn joins_one_packet_with_every_stage() {
        let mut c = Correlator::new(all_global());
        let t = run(&mut c, &one_packet(1_000, 5000, 18));
        assert_eq!(t.len(), 1);
        assert!(t[0].complete);
        assert_eq!(t[0].stages.len(), 12);
        assert_eq!(t[0].total_ns(), 1100);
        assert_eq!(t[0].seq, 5000);
        assert_eq!(t[0].len, 18);
        assert_eq!(t[0].path, PathKind::Loopback);
    }

    #[test]
    fn ip_stages_join_where_kprobes_serve_them() {
        let mut cov = all_global();
        cov.global.insert(Stage::IpSend);
        cov.global.insert(Stage::IpRcv);
        let mut c = Correlator::new(cov);
        let mut evs = one_packet(1_000, 5000, 18);
        evs.push(ev(Stage::IpSend, 1_150, 5000, 18));
        evs.push(ev(Stage::IpRcv, 1_750, 5000, 18));
        let t = run(&mut c, &evs);
        assert_eq!(t.len(), 1);
        assert!(t[0].complete);
        let names: Vec<&str> = t[0].stages.iter().map(|s| s.stage.name()).collect();
        assert_eq!(&names[..4], ["send_syscall", "sock_send", "ip_send", "tc_egress"]);
        assert!(names.windows(2).any(|w| w == ["tc_ingress", "ip_rcv"]), "{names:?}");
    }

    #[test]
    fn records_arriving_out_of_order_still_join() {
        let mut c = Correlator::new(all_global());
        let mut evs = one_packet(1_000, 5000, 18);
        evs.reverse();
        let t = run(&mut c, &evs);
        assert_eq!(t.len(), 1);
        assert!(t[0].complete);
    }

    #[test]
    fn one_syscall_many_segments_and_one_read_many_segments() {
        // A 3000-byte write sent as two segments, read back by one recv.
        let mut c = Correlator::new(all_global());
        let mut evs = vec![ev(Stage::SendSyscall, 100, 0, 3000), ev(Stage::SockSend, 110, 0, 3000)];
        for (i, (s, l)) in [(0u32, 1500u32), (1500, 1500)].iter().enumerate() {
            let t = 1_000 + i as u64 * 1_000;
            for (k, st) in [
                Stage::TcEgress,
                Stage::DevQueue,
                Stage::NicXmit,
                Stage::NetifReceive,
                Stage::Xdp,
                Stage::TcIngress,
                Stage::TransportRcv,
            ]
            .iter()
            .enumerate()
            {
                evs.push(ev(*st, t + k as u64 * 10, *s, *l));
            }
        }
        let mut q = ev(Stage::SockQueue, 2_500, 3000, 0);
        q.flags |= F_END;
        evs.push(q);
        evs.push(ev(Stage::CopyToUser, 3_000, 0, 3000));
        let mut r = ev(Stage::RecvSyscall, 3_100, 3000, 0);
        r.flags |= F_END;
        evs.push(r);
        let t = run(&mut c, &evs);
        assert_eq!(t.len(), 2);
        for tr in &t {
            assert!(tr.complete, "{tr:?}");
            assert_eq!(tr.time_of(Stage::SendSyscall), Some(100));
            assert_eq!(tr.time_of(Stage::RecvSyscall), Some(3_100));
        }
        assert_eq!(t[0].time_of(Stage::DevQueue), Some(1_010));
        assert_eq!(t[1].time_of(Stage::DevQueue), Some(2_010));
    }

    #[test]
    fn gro_merge_attributes_by_last_byte() {
        // Two segments queued separately, merged by GRO into one netif_receive record.
        let mut c = Correlator::new(all_global());
        let evs = vec![
            ev(Stage::DevQueue, 100, 0, 100),
            ev(Stage::DevQueue, 200, 100, 100),
            ev(Stage::NetifReceive, 500, 0, 200),
        ];
        let t = run(&mut c, &evs);
        assert_eq!(t.len(), 2);
        assert!(t.iter().all(|t| t.time_of(Stage::NetifReceive) == Some(500)));
    }

    #[test]
    fn a_packet_without_dev_queue_is_traced_from_tc_egress() {
        let mut c = Correlator::new(all_global());
        let mut evs = one_packet(1_000, 5000, 100);
        let second: Vec<Event> = one_packet(2_000, 5100, 100)
            .into_iter()
            .filter(|e| !matches!(Stage::from_u8(e.stage), Some(Stage::DevQueue | Stage::NicXmit)))
            .collect();
        evs.extend(second);
        evs.extend(one_packet(3_000, 5200, 100));
        // The complete packets finish first (before the orphan settles), so by the time
        // it is promoted higher bytes are done: it must still count as data.
        for e in &evs {
            c.push(e);
        }
        let mut t = Vec::new();
        c.advance(100_000, &mut |x| t.push(x));
        assert_eq!(t.len(), 2, "the two complete packets finish at once");
        c.flush(&mut |x| t.push(x));
        assert_eq!(
            t.iter().filter(|t| t.kind == TraceKind::Data).map(|t| t.len).sum::<u32>(),
            300,
            "every byte traced as data"
        );
        let orphan = t.iter().find(|t| t.seq == 5100).expect("the packet without dev_queue");
        assert!(!orphan.complete);
        assert_eq!(orphan.stages.len(), 10, "every stage but dev_queue and nic_xmit");
        assert_eq!(orphan.kind, TraceKind::Data);
        assert_eq!(c.stats.egress_unanchored, 1);
        assert!(t.iter().filter(|t| t.seq != 5100).all(|t| t.complete));
    }

    #[test]
    fn retransmission_is_its_own_kind() {
        let mut c = Correlator::new(all_global());
        let evs = vec![ev(Stage::DevQueue, 100, 0, 100), ev(Stage::DevQueue, 300_000_000, 0, 100)];
        let t = run(&mut c, &evs);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].kind, TraceKind::Data);
        assert_eq!(t[1].kind, TraceKind::Retrans);
    }

    #[test]
    fn anchors_arriving_out_of_order_are_not_retransmissions() {
        let mut c = Correlator::new(all_global());
        let evs = vec![ev(Stage::DevQueue, 200, 100, 100), ev(Stage::DevQueue, 100, 0, 100)];
        let t = run(&mut c, &evs);
        assert_eq!(t.len(), 2);
        assert!(t.iter().all(|t| t.kind == TraceKind::Data));
    }

    #[test]
    fn udp_identical_payloads_pair_one_to_one_in_order() {
        let mut c = Correlator::new(all_global());
        let mut evs = Vec::new();
        for i in 0..3u64 {
            for (k, s) in
                [Stage::SendSyscall, Stage::SockSend, Stage::DevQueue, Stage::NetifReceive, Stage::RecvSyscall]
                    .iter()
                    .enumerate()
            {
                let mut e = ev(*s, 1_000 * (i + 1) + k as u64 * 10, 0xabcd, 18);
                e.flags |= F_UDP;
                evs.push(e);
            }
        }
        let t = run(&mut c, &evs);
        assert_eq!(t.len(), 3);
        for (i, tr) in t.iter().enumerate() {
            let base = 1_000 * (i as u64 + 1);
            assert_eq!(tr.time_of(Stage::SendSyscall), Some(base));
            assert_eq!(tr.time_of(Stage::RecvSyscall), Some(base + 40));
        }
    }

    #[test]
    fn a_sender_interrupted_before_the_device_queue_keeps_its_own_tc_egress() {
        // Datagram 1 waits 72 µs between tcx egress and the device queue; datagram 2
        // (same payload) passes tcx egress 36 µs after datagram 1's dev_queue.
        let mut c = Correlator::new(all_global());
        let udp = |s, t| {
            let mut e = ev(s, t, 0xbeef, 18);
            e.flags |= F_UDP;
            e
        };
        let evs = vec![
            udp(Stage::TcEgress, 1_000),
            udp(Stage::DevQueue, 73_000),
            udp(Stage::TcEgress, 109_000),
            udp(Stage::DevQueue, 110_000),
        ];
        let t = run(&mut c, &evs);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].time_of(Stage::TcEgress), Some(1_000));
        assert_eq!(t[1].time_of(Stage::TcEgress), Some(109_000));
    }

    #[test]
    fn udp_records_from_a_wildcard_socket_join_their_flow() {
        let mut c = Correlator::new(all_global());
        let mut evs = Vec::new();
        // The socket's record first: its flow is only known once the wire record is in.
        for (s, t) in [(Stage::CopyToUser, 200), (Stage::DevQueue, 100)] {
            let mut e = ev(s, t, 0x1234, 18);
            e.flags |= F_UDP;
            if s == Stage::CopyToUser {
                e.daddr = [0; 16];
            }
            evs.push(e);
        }
        let t = run(&mut c, &evs);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].time_of(Stage::CopyToUser), Some(200));
    }

    #[test]
    fn an_unconnected_socket_read_without_the_sender_joins_by_payload() {
        let mut c = Correlator::new(all_global());
        let mut evs = Vec::new();
        for (s, t) in [(Stage::DevQueue, 100), (Stage::SockQueue, 150), (Stage::CopyToUser, 200)] {
            let mut e = ev(s, t, 0x1234, 18);
            e.flags |= F_UDP;
            if s == Stage::CopyToUser {
                // recv() on an unconnected socket: the local end only.
                (e.saddr, e.sport) = ([0; 16], 0);
            }
            evs.push(e);
        }
        let t = run(&mut c, &evs);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].time_of(Stage::CopyToUser), Some(200));
    }

    #[test]
    fn a_datagram_never_queued_is_finished_without_waiting_for_the_timeout() {
        let mut c = Correlator::new(all_global());
        let udp = |stage: Stage, ts: u64, key: u32| {
            let mut e = ev(stage, ts, key, 64);
            e.flags |= F_UDP;
            e
        };
        // Datagram 1 is dropped at its socket; datagram 2, 5 ms later, is delivered.
        let mut evs = Vec::new();
        for (key, t0, queued) in [(0x1111u32, 1_000_000u64, false), (0x2222, 6_000_000, true)] {
            for e in one_packet(t0, key, 64) {
                let s = Stage::from_u8(e.stage).unwrap();
                if queued || !matches!(s, Stage::SockQueue | Stage::CopyToUser | Stage::RecvSyscall) {
                    evs.push(udp(s, e.ts_ns, key));
                }
            }
        }
        for e in &evs {
            c.push(e);
        }
        let mut out = Vec::new();
        // Long before the timeout (1 s) has passed: both traces are out.
        c.advance(20_000_000, &mut |t| out.push(t));
        assert_eq!(out.len(), 2);
        assert!(!out[0].complete && out[0].time_of(Stage::SockQueue).is_none());
        assert!(out[1].complete);
    }

    #[test]
    fn a_flood_of_records_stays_bounded() {
        let mut c = Correlator::new(all_global());
        for i in 0..(MAX_UDP_PER_STAGE as u64 + 5_000) {
            let mut e = ev(Stage::SockQueue, 1_000 + i, 0x1111, 64);
            e.flags |= F_UDP;
            c.push(&e);
        }
        let st = c.flows.values().next().unwrap();
        assert_eq!(st.list(Stage::SockQueue).udp.len, MAX_UDP_PER_STAGE);
        assert_eq!(c.stats.records_evicted, 5_000);
    }

    #[test]
    fn missing_stage_is_missing_not_guessed() {
        let mut c = Correlator::new(all_global());
        let evs: Vec<Event> = one_packet(1_000, 0, 10).into_iter().filter(|e| e.stage != Stage::Xdp as u8).collect();
        let t = run(&mut c, &evs);
        assert_eq!(t.len(), 1);
        assert!(!t[0].complete);
        assert_eq!(t[0].time_of(Stage::Xdp), None);
        assert_eq!(c.stats.incomplete, 1);
    }

    #[test]
    fn waits_for_the_watermark() {
        let mut c = Correlator::new(all_global());
        for e in one_packet(1_000, 0, 10) {
            c.push(&e);
        }
        let mut out = Vec::new();
        c.advance(1_500, &mut |t| out.push(t));
        assert!(out.is_empty(), "last stage at 2100 not yet covered by the watermark");
        c.advance(2_200, &mut |t| out.push(t));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn sequence_wraparound() {
        let mut c = Correlator::new(all_global());
        let mut evs = one_packet(1_000, u32::MAX - 5, 10);
        evs.extend(one_packet(5_000, 4, 10));
        let t = run(&mut c, &evs);
        assert_eq!(t.len(), 2);
        assert!(t.iter().all(|t| t.complete));
        assert_eq!(t[0].seq, u32::MAX - 5);
        assert_eq!(t[1].seq, 4);
    }

    #[test]
    fn control_segment_kind() {
        let mut c = Correlator::new(all_global());
        let mut e = ev(Stage::DevQueue, 100, 77, 0);
        e.flags |= (Kind::Ack as u8) << KIND_SHIFT;
        let t = run(&mut c, &[e]);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].kind, TraceKind::Control(Kind::Ack));
    }
}
#[cfg(test)]
mod budget_tests {
    use super::*;
    use packetflow_common::event::F_UDP;

    /// `n` single-datagram UDP flows, each seen at every stage but the optional ones in
    /// kernel order, 100 µs apart, advancing the watermark every 50 flows.
    fn flood(c: &mut Correlator, n: u32) -> u64 {
        let mut traces = 0;
        for i in 0..n {
            for (k, s) in Stage::KERNEL_ORDER.iter().filter(|s| !s.is_optional()).enumerate() {
                let mut e = Event::ZERO;
                e.stage = *s as u8;
                e.ts_ns = 1_000_000 + i as u64 * 100_000 + k as u64 * 100;
                (e.seq, e.len, e.flags) = (i, 4, F_UDP);
                (e.sport, e.dport) = ((i % 60_000) as u16, 9);
                (e.saddr[0], e.saddr[1], e.daddr[0]) = (127, (i / 60_000) as u8, 127);
                c.push(&e);
                assert!(c.held_bytes() <= c.budget_bytes, "{} over {}", c.held_bytes(), c.budget_bytes);
            }
            if i % 50 == 0 {
                c.advance(1_000_000 + i as u64 * 100_000, &mut |_| traces += 1);
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
            let t0 = 1_000_000 + i as u64 * 10_000;
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
