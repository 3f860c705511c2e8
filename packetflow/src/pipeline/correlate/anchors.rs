//! Anchors besides `dev_queue`: `netif_receive` records on a host that only receives,
//! and TCP data seen at `tc_egress` that no `dev_queue` record anchored.

use packetflow_common::{Stage, event::F_LOOPBACK};

use super::records::{Anchor, FlowState, Rec, partition_point_from_back};
use crate::model::trace::TraceKind;

/// On a host that only receives (no `dev_queue` record in the flow), every
/// `netif_receive` record newer than the last anchor becomes one once it has settled
/// (a quarter of the timeout), unless it came over loopback.
pub(super) fn promote_ingress_anchors(st: &mut FlowState, wm: u64, timeout: u64) {
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

/// TCP data seen at tc_egress that no dev_queue record anchored (the net_dev_queue
/// program did not record it: seen rarely here under load, with no recursion miss
/// counted): it becomes its own anchor once it has settled, so its bytes are traced and
/// the missing stages are reported, never lost. Returns how many were promoted.
pub(super) fn promote_egress_orphans(st: &mut FlowState, wm: u64, timeout: u64) -> u64 {
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
