//! The matching rules: which record of each stage belongs to an anchor's trace (the
//! stage's side of the anchor in kernel order, the bytes or payload key it must cover),
//! when a trace has every stage it should, how it is built, and what a finished trace
//! takes out of its flow.

use packetflow_common::{
    Kind, Stage,
    event::{F_LOOPBACK, F_NO_WAITER},
};

use super::{
    Coverage,
    records::{Anchor, DropRec, FlowState, NSTAGES, Rec, partition_point_from_back, raw_seq},
};
use crate::model::trace::{Device, Flow, PathKind, StageTime, Trace, TraceKind};

/// Records examined on each side of the best candidate.
const SCAN: usize = 24;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Before,
    After,
    Either,
}

/// Where the record of `stage` sits in time relative to an anchor recorded at `anchor`.
fn side(stage: Stage, anchor: Stage) -> Side {
    use Stage::{DevQueue, IpSend, NetifReceive, NicXmit, SendSyscall, SockSend, TcEgress, Xdp};
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

/// The best record of `stage` for anchor `a`, by the rules in the correlator's module docs.
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

/// Does the trace miss a traced stage that lies, in kernel order, between two stages it
/// has? Then the packet passed that stage and the kernel wrote no record there (a full
/// ring and a skipped run are counted where they happen; this counts the rest).
pub(super) fn has_gap(cov: &Coverage, t: &Trace) -> bool {
    if matches!(t.kind, TraceKind::Control(_)) {
        return false;
    }
    let pos: Vec<usize> = t.stages.iter().map(|s| s.stage.kernel_pos()).collect();
    let (Some(lo), Some(hi)) = (pos.iter().min(), pos.iter().max()) else { return false };
    cov.global.iter().any(|s| {
        let p = s.kernel_pos();
        *lo < p && p < *hi && !pos.contains(&p) && !s.is_per_interface() && !s.is_per_packet()
    })
}

/// Does this trace have every stage it should have, given where its packet went?
fn complete(cov: &Coverage, anchor: &Anchor, rx_dev: Option<Device>, found: &[Option<Rec>; NSTAGES]) -> bool {
    let dev = Device { netns: anchor.rec.aux2, ifindex: anchor.rec.aux };
    for s in Stage::ALL {
        let want = match s {
            Stage::TcEgress => {
                anchor.stage == Stage::TcEgress || (anchor.stage == Stage::DevQueue && cov.tc_egress.contains(&dev))
            }
            // Only where a reader was blocked: never expected.
            Stage::Woken | Stage::OnCpu => false,
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
pub(super) fn build(flow: &Flow, st: &FlowState, anchor: &Anchor, cov: &Coverage) -> Trace {
    // Per stage, the record taken (by stage number).
    let mut found: [Option<Rec>; NSTAGES] = [None; NSTAGES];
    for s in Stage::ALL {
        found[s as usize] = if s == anchor.stage { Some(anchor.rec) } else { best(flow, st, s, anchor) };
    }
    // The reader's wake-up and run belong to this packet's own sock_queue record (the
    // hook copies it): never to a later packet's, when no reader was blocked for this one.
    // They come before the copy: a wake-up after it was for later data (the kernel ends
    // a watch at the thread's copy; this keeps out any that raced past that).
    let sq = found[Stage::SockQueue as usize];
    let waited = sq.is_some_and(|q| q.flags & F_NO_WAITER == 0);
    let copied = found[Stage::CopyToUser as usize].map_or(u64::MAX, |c| c.ts);
    for s in [Stage::Woken, Stage::OnCpu] {
        found[s as usize] =
            found[s as usize].filter(|r| waited && r.ts <= copied && sq.is_some_and(|q| r.lo == q.lo && r.ts >= q.ts));
    }
    let rx = found[Stage::NetifReceive as usize].map(|r| Device { netns: r.aux2, ifindex: r.aux });
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

    Trace {
        kind: anchor.kind,
        flow: *flow,
        seq: seq_raw,
        len,
        path: if anchor.rec.flags & F_LOOPBACK != 0 { PathKind::Loopback } else { PathKind::Nic },
        device: Device { netns: anchor.rec.aux2, ifindex: anchor.rec.aux },
        rx_device: rx,
        pid: tx.map(|p| p.0),
        tid: tx.map(|p| p.1),
        rx_pid: rxp.map(|p| p.0),
        rx_tid: rxp.map(|p| p.1),
        comm: None,
        rx_comm: None,
        cgroup: None,
        rx_cgroup: None,
        stages,
        complete,
        drop: None,
        retransmits: Vec::new(),
        receiver_blocked: match sq {
            Some(q) if cov.global.contains(&Stage::Woken) || cov.global.contains(&Stage::OnCpu) => {
                Some(q.flags & F_NO_WAITER == 0)
            }
            _ => None,
        },
    }
}

/// Do TCP records `r` and `a` hold the same packet's bytes (data: any byte in common;
/// control: the same sequence number and length)?
fn same_bytes(r: &Rec, a: &Rec) -> bool {
    if a.hi == a.lo || r.hi == r.lo {
        return r.lo == a.lo && r.hi == a.hi;
    }
    r.lo < a.hi && a.lo < r.hi
}

/// TCP: when a later anchor of the same bytes (a copy sent again) was queued, after
/// the packet anchored at `st.pending[i]`; its trace takes no record from then on. A
/// second anchor on another device within 10 ms is the same packet on another hop
/// (a bridge, a tunnel), not a copy. `u64::MAX`: none.
pub(super) fn copy_bound(flow: &Flow, st: &FlowState, i: usize) -> u64 {
    let Some(a) = st.pending.get(i) else { return u64::MAX };
    if flow.udp || a.kind != TraceKind::Data {
        return u64::MAX;
    }
    st.pending
        .iter()
        .skip(i + 1)
        .find(|b| {
            b.kind == TraceKind::Data
                && same_bytes(&b.rec, &a.rec)
                && (b.rec.aux == a.rec.aux || b.rec.ts.saturating_sub(a.rec.ts) >= 10_000_000)
        })
        .map_or(u64::MAX, |b| b.rec.ts)
}

/// The drop of the packet anchored at `st.pending[i]`: the first drop record of its
/// bytes (UDP: its key and length) at or after the anchor and before `bound`.
pub(super) fn drop_of(flow: &Flow, st: &FlowState, i: usize, bound: u64) -> Option<(usize, DropRec)> {
    let a = st.pending.get(i)?;
    let data = a.kind == TraceKind::Data || a.kind == TraceKind::Retrans;
    st.drops.iter().enumerate().find_map(|(j, d)| {
        let ok = d.rec.ts >= a.rec.ts
            && d.rec.ts < bound
            && (d.kind == Kind::Data) == data
            && if flow.udp { d.rec.lo == a.rec.lo && d.rec.hi == a.rec.hi } else { same_bytes(&d.rec, &a.rec) };
        ok.then_some((j, *d))
    })
}

/// Takes out of a trace the stages recorded after `limit` (another copy's); a trace
/// that loses one is incomplete.
pub(super) fn trim_after(t: &mut Trace, limit: u64) {
    let n = t.stages.len();
    t.stages.retain(|s| s.t_ns <= limit);
    if t.stages.len() < n {
        t.complete = false;
    }
}

/// TCP: when the bytes of `a` were sent again (tcp_retransmit_skb) after `after`.
pub(super) fn retransmits_of(st: &FlowState, a: &Rec, after: u64) -> Vec<u64> {
    st.retrans.iter().filter(|r| r.ts > after && same_bytes(r, a)).map(|r| r.ts).collect()
}

/// A UDP datagram that reached the transport but was never queued on its socket (a full
/// receive buffer, a socket filter): its socket stages will not come, and the trace need
/// not wait for the timeout. The proof is a later datagram of the same flow queued well
/// after this one reached the transport (a datagram is queued in the softirq that hands
/// it over, microseconds after `transport_rcv`). Without it, a receiver that could not
/// keep up held every dropped datagram's records for the whole timeout, and at 50,000
/// datagrams a second the correlator's per-stage bound evicted the records of datagrams
/// that had arrived.
pub(super) fn dropped_at_socket(st: &FlowState, trace: &Trace) -> bool {
    const GRACE_NS: u64 = 1_000_000;
    let Some(rcv) = trace.time_of(Stage::TransportRcv) else { return false };
    trace.time_of(Stage::SockQueue).is_none() && st.list(Stage::SockQueue).udp.newest > rcv.saturating_add(GRACE_NS)
}

/// A UDP trace's records leave their stages, so no other datagram can use them.
pub(super) fn mark_used(flow: &Flow, st: &mut FlowState, anchor: &Anchor, trace: &Trace) {
    if !flow.udp {
        return;
    }
    for t in &trace.stages {
        st.list_mut(t.stage).udp.remove((anchor.rec.lo, anchor.rec.hi), t.t_ns);
    }
}
