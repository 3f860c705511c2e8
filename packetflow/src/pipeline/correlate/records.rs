//! A flow's records, per stage, as the correlator holds them until traces use them: TCP
//! ones in time order, UDP ones by payload key; the bounds on how many a stage keeps and
//! the estimate of the memory they take (what the budget counts).

use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap as HashMap;

use packetflow_common::{Event, Kind, Stage};

use crate::model::trace::{Flow, TraceKind};

/// TCP records are compact (a VecDeque of 48-byte `Rec`s) and a bulk transfer keeps tens
/// of thousands in flight per stage (tests/tests/e2e/bulk.rs).
const MAX_TCP_PER_STAGE: usize = 1 << 16;
/// UDP records (a hash entry and an arrival-order entry each, `UDP_REC_BYTES`); a flood
/// of identical datagrams fills every stage of a flow up to this cap, or the budget.
pub(super) const MAX_UDP_PER_STAGE: usize = 1 << 14;
pub(super) const NSTAGES: usize = Stage::ALL.len();

/// One hook's record of a flow, as the correlator keeps it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rec {
    pub(super) ts: u64,
    /// TCP: unwrapped stream offset of the first byte; UDP: payload key.
    pub(super) lo: u64,
    /// TCP: one past the last byte; UDP: payload length.
    pub(super) hi: u64,
    pub(super) end_only: bool,
    pub(super) cpu: u16,
    pub(super) aux: u32,
    pub(super) aux2: u32,
    pub(super) flags: u8,
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
pub(super) struct Records {
    /// TCP: in time order (and, for one flow, nearly in sequence order).
    pub(super) tcp: VecDeque<Rec>,
    /// UDP: by (payload key, length), each list in time order. A datagram's record
    /// leaves when a trace uses it, so identical payloads pair one to one, in order.
    pub(super) udp: UdpRecords,
}

/// UDP records. A hash of short lists, not an ordered map over (key, length, time): a
/// datagram costs a hash lookup and a push at each stage, where the ordered map's insert,
/// range search and removal made the correlator, not the kernel, the limit on how many
/// records a second a run could take.
#[derive(Default)]
pub(super) struct UdpRecords {
    by_key: HashMap<(u64, u64), Recs>,
    pub(super) len: usize,
    /// Time of the newest record ever inserted (used or not).
    pub(super) newest: u64,
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
            Recs::One(r) => usize::from(below(r)),
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
    pub(super) fn remove(&mut self, key: (u64, u64), ts: u64) -> bool {
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
    pub(super) fn nearest(&self, key: (u64, u64), ts: u64, before: bool) -> Option<Rec> {
        let list = self.by_key.get(&key)?;
        if before {
            list.get(list.position(ts, true).checked_sub(1)?).copied()
        } else {
            list.get(list.position(ts, false)).copied()
        }
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Rec> {
        self.by_key.values().flat_map(Recs::iter)
    }
}

impl Records {
    pub(super) fn len(&self) -> usize {
        self.tcp.len() + self.udp.len
    }

    /// Inserts `r`; false when the oldest record had to go to make room before any trace
    /// used it (TCP: its bytes are not below `until`, the end of the finished traces).
    pub(super) fn insert(&mut self, udp: bool, r: Rec, until: u64) -> bool {
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
        }
        let at = self.tcp.iter().rposition(|x| x.ts <= r.ts).map_or(0, |i| i + 1);
        self.tcp.insert(at, r);
        if self.tcp.len() > MAX_TCP_PER_STAGE {
            return self.tcp.pop_front().is_none_or(|old| old.used(until));
        }
        true
    }

    /// Drops records older than `keep_from`; returns how many nobody used (TCP: whose
    /// bytes are not below `until`, the end of the finished traces).
    pub(super) fn prune(&mut self, keep_from: u64, until: u64) -> u64 {
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

/// A drop record (`packetflow_common::drop`) waiting for the trace of its packet.
#[derive(Clone, Copy, Debug)]
pub(super) struct DropRec {
    /// The packet's bytes (or UDP key and length) as at a device stage; `aux`/`aux2` the
    /// device.
    pub(super) rec: Rec,
    pub(super) reason: u32,
    pub(super) location: u64,
    /// The segment kind (`Kind` bits of the record's flags).
    pub(super) kind: Kind,
}

/// Drops and retransmission records a flow holds at most (older ones leave: drops as
/// drops without a trace, retransmissions uncounted on traces).
pub(super) const MAX_DROPS: usize = 64;

/// A packet waiting for its trace: the record that anchors it.
pub(super) struct Anchor {
    pub(super) stage: Stage,
    pub(super) rec: Rec,
    pub(super) kind: TraceKind,
}

/// What the correlator holds for one flow.
#[derive(Default)]
pub(super) struct FlowState {
    /// Per stage, allocated at its first record (most flows see a few stages only).
    pub(super) stages: [Option<Box<Records>>; NSTAGES],
    /// What `bytes()` said when this flow was last accounted in `Correlator::held_bytes`.
    pub(super) accounted: usize,
    /// Queued in `Correlator::dirty` (records came since `advance` last looked).
    pub(super) dirty: bool,
    /// Earliest watermark at which a look may finish a trace or promote an anchor
    /// without new records (a `Correlator::wakes` entry exists for it); 0: none.
    pub(super) wake: u64,
    /// Watermark when this flow's old records were last dropped.
    pub(super) pruned_at: u64,
    pub(super) pending: VecDeque<Anchor>,
    pub(super) has_egress: bool,
    /// TCP sequence unwrapping: last raw value and its 64-bit position.
    pub(super) seq_ref: Option<(u32, u64)>,
    /// Highest anchored TCP end, with the device and time of that anchor.
    pub(super) max_end: Option<(u64, u32, u64)>,
    /// TCP: every byte below this belongs to a finished trace.
    pub(super) anchored_until: u64,
    /// TCP: byte ranges of finished data traces (merged; the newest few thousand).
    pub(super) anchored: BTreeMap<u64, u64>,
    /// tc_egress records up to this time were checked for a missing dev_queue anchor.
    pub(super) egress_checked_ts: u64,
    pub(super) last_ts: u64,
    /// Drops of this flow's packets not yet on a trace (time order).
    pub(super) drops: VecDeque<DropRec>,
    /// TCP retransmissions (tcp_retransmit_skb), for the traces of the bytes sent again.
    pub(super) retrans: VecDeque<Rec>,
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
pub(super) const ANCHOR_BYTES: usize = 2 * size_of::<Anchor>();
/// A stage's records before the first: the box, and the smallest allocations its
/// containers make (a hash table of 4 slots, a queue of 4) with allocator headers.
const STAGE_BYTES: usize = size_of::<Records>() + 16 + 4 * (size_of::<((u64, u64), Recs)>() + 1) + 16 + 4 * 24 + 16;

static NO_RECORDS: std::sync::LazyLock<Records> = std::sync::LazyLock::new(Records::default);

impl Records {
    pub(super) fn bytes(&self) -> usize {
        STAGE_BYTES + self.tcp.len() * TCP_REC_BYTES + self.udp.len * UDP_REC_BYTES
    }

    /// Removes the oldest record still held; `Some(true)` when no trace had used it
    /// (TCP: its bytes are not below `until`), None when the list is empty.
    pub(super) fn pop_oldest(&mut self, until: u64) -> Option<bool> {
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
    pub(super) fn shrink(&mut self) {
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
    pub(super) fn list(&self, stage: Stage) -> &Records {
        self.stages[stage as usize].as_deref().unwrap_or(&NO_RECORDS)
    }

    pub(super) fn list_mut(&mut self, stage: Stage) -> &mut Records {
        self.stages[stage as usize].get_or_insert_with(Box::default)
    }

    /// Estimated memory this flow holds (what the correlator's budget counts).
    pub(super) fn bytes(&self) -> usize {
        FLOW_OVERHEAD
            + size_of::<Flow>()
            + size_of::<FlowState>()
            + self.stages.iter().flatten().map(|r| r.bytes()).sum::<usize>()
            + self.pending.len() * ANCHOR_BYTES
            + self.anchored.len() * 48
            + self.drops.len() * 2 * size_of::<DropRec>()
            + self.retrans.len() * TCP_REC_BYTES
    }

    /// Records held, over every stage.
    pub(super) fn records(&self) -> u64 {
        self.stages.iter().flatten().map(|l| l.len() as u64).sum()
    }

    /// The stage holding the most records.
    pub(super) fn longest(&self) -> Option<Stage> {
        Stage::ALL.iter().copied().filter(|s| self.list(*s).len() > 0).max_by_key(|s| self.list(*s).len())
    }

    /// Notes `[lo, hi)` as belonging to a finished trace.
    pub(super) fn mark_anchored(&mut self, lo: u64, hi: u64) {
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
    pub(super) fn anchored_any(&self, lo: u64, hi: u64) -> bool {
        self.anchored.range(..hi).next_back().is_some_and(|(_, e)| *e > lo)
            || self.pending.iter().any(|a| a.rec.lo < hi && lo < a.rec.hi)
    }

    pub(super) fn unwrap_seq(&mut self, seq: u32) -> u64 {
        match self.seq_ref {
            None => {
                // Start well away from zero so earlier bytes stay representable.
                let pos = 1u64 << 40;
                self.seq_ref = Some((seq, pos));
                pos
            }
            Some((raw, pos)) => {
                let d = i64::from(seq.wrapping_sub(raw) as i32);
                let p = (pos as i64 + d) as u64;
                if d > 0 {
                    self.seq_ref = Some((seq, p));
                }
                p
            }
        }
    }
}

pub(super) fn rec_base(ev: &Event) -> Rec {
    Rec { ts: ev.ts_ns, lo: 0, hi: 0, end_only: false, cpu: ev.cpu, aux: ev.aux, aux2: ev.aux2, flags: ev.flags }
}

/// SYN and FIN occupy one sequence number each.
pub(super) fn control_len(ev: &Event) -> u32 {
    match ev.kind() {
        Kind::Syn | Kind::SynAck | Kind::Fin => 1,
        _ => 0,
    }
}

/// `VecDeque::partition_point`, searched from the back. The records a trace needs are
/// among the newest (traces finish in time order, a few ms behind the readers), so an
/// exponential search from the end touches a few cache-hot records, where a binary search
/// over the whole list (up to `MAX_TCP_PER_STAGE` per stage) touched cold ones at every
/// step: that was most of the correlator's time under a ping-pong load.
pub(super) fn partition_point_from_back(list: &VecDeque<Rec>, pred: impl Fn(&Rec) -> bool) -> usize {
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

/// The raw 32-bit sequence number of unwrapped position `pos`.
pub(super) fn raw_seq(st: &FlowState, pos: u64) -> u32 {
    match st.seq_ref {
        Some((raw, at)) => raw.wrapping_add(pos.wrapping_sub(at) as u32),
        None => pos as u32,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use packetflow_common::Event;

    use super::{Rec, partition_point_from_back, rec_base};

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
}
