//! Per-stage latency statistics (the tables that show them: `report::tables`).
//!
//! A stage's latency in a trace is the time from the stage before it (in time order) to
//! it; `end-to-end` is `send_syscall` → `recv_syscall` (or first → last stage when one of
//! them is missing). Only data-packet traces count; retransmissions and control segments
//! are counted separately.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use packetflow_common::Stage;

use crate::model::trace::{PathKind, Trace, TraceKind};

/// Largest value a histogram holds: 100 s in ns.
const MAX_NS: u64 = 100_000_000_000;

pub fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

#[derive(Clone)]
pub struct PathStats {
    pub traces: u64,
    pub complete: u64,
    pub stages: BTreeMap<Stage, Histogram<u64>>,
    pub e2e: Histogram<u64>,
}

impl Default for PathStats {
    fn default() -> Self {
        PathStats { traces: 0, complete: 0, stages: BTreeMap::new(), e2e: hist() }
    }
}

#[derive(Clone, Default)]
pub struct Stats {
    pub paths: BTreeMap<PathKind, PathStats>,
    /// Traces that are not data packets, by kind name.
    pub other_kinds: BTreeMap<&'static str, u64>,
}

/// Percentiles reported everywhere, in this order.
pub const PERCENTILES: [(f64, &str); 4] = [(50.0, "p50"), (90.0, "p90"), (99.0, "p99"), (99.9, "p99.9")];

impl Stats {
    pub fn record(&mut self, t: &Trace) {
        if t.kind != TraceKind::Data {
            *self.other_kinds.entry(t.kind.name()).or_default() += 1;
            return;
        }
        let p = self.paths.entry(t.path).or_default();
        p.traces += 1;
        if t.complete {
            p.complete += 1;
        }
        for w in t.stages.windows(2) {
            let d = w[1].t_ns.saturating_sub(w[0].t_ns);
            let h = p.stages.entry(w[1].stage).or_insert_with(hist);
            h.saturating_record(d.max(1));
        }
        if let Some(first) = t.stages.first() {
            p.stages.entry(first.stage).or_insert_with(hist);
        }
        p.e2e.saturating_record(end_to_end_ns(t).max(1));
    }
}

/// A trace's end-to-end time: `send_syscall` → `recv_syscall`, or first → last stage when
/// one of them is missing.
pub fn end_to_end_ns(t: &Trace) -> u64 {
    match (t.time_of(Stage::SendSyscall), t.time_of(Stage::RecvSyscall)) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => t.total_ns(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::trace::{Device, Flow, StageTime};

    fn trace(times: &[(Stage, u64)]) -> Trace {
        Trace {
            kind: TraceKind::Data,
            flow: Flow { v6: false, udp: false, src: [0; 16], dst: [0; 16], sport: 1, dport: 2 },
            seq: 0,
            len: 1,
            path: PathKind::Loopback,
            device: Device { netns: 0, ifindex: 1 },
            rx_device: None,
            pid: None,
            tid: None,
            rx_pid: None,
            rx_tid: None,
            comm: None,
            rx_comm: None,
            cgroup: None,
            rx_cgroup: None,
            stages: times.iter().map(|&(stage, t_ns)| StageTime { stage, t_ns, cpu: 0 }).collect(),
            complete: true,
            drop: None,
            retransmits: Vec::new(),
            receiver_blocked: None,
        }
    }

    #[test]
    fn stage_deltas_sum_to_end_to_end() {
        let mut s = Stats::default();
        s.record(&trace(&[(Stage::SendSyscall, 1000), (Stage::DevQueue, 3000), (Stage::RecvSyscall, 10000)]));
        let p = &s.paths[&PathKind::Loopback];
        // HdrHistogram keeps 3 significant digits.
        let near = |h: &Histogram<u64>, v: u64| h.equivalent(h.max(), v);
        assert!(near(&p.stages[&Stage::DevQueue], 2000));
        assert!(near(&p.stages[&Stage::RecvSyscall], 7000));
        assert!(near(&p.e2e, 9000));
        assert!(p.stages[&Stage::SendSyscall].is_empty());
    }

    #[test]
    fn other_kinds_stay_out_of_the_statistics() {
        let mut s = Stats::default();
        let mut t = trace(&[(Stage::DevQueue, 1)]);
        t.kind = TraceKind::Retrans;
        s.record(&t);
        assert!(s.paths.is_empty());
        assert_eq!(s.other_kinds["retrans"], 1);
    }

    #[test]
    fn times_out_of_order_never_underflow() {
        // Whatever a file says (the reader refuses these, but nothing here may rely on
        // it): recv_syscall before send_syscall, stages out of time order.
        let t = trace(&[(Stage::RecvSyscall, 1000), (Stage::DevQueue, 500), (Stage::SendSyscall, 3000)]);
        assert_eq!(end_to_end_ns(&t), 0);
        assert_eq!(t.total_ns(), 2000);
        let mut s = Stats::default();
        s.record(&t);
        assert_eq!(s.paths[&PathKind::Loopback].e2e.max(), 1, "clamped to 1 ns, not wrapped to 100 s");
        assert!(crate::report::charts::waterfall(&t, "x").contains("dev_queue"));
        let backwards = trace(&[(Stage::SendSyscall, 3000), (Stage::RecvSyscall, 1000)]);
        assert_eq!(backwards.total_ns(), 0);
        assert!(crate::report::charts::waterfall(&backwards, "x").contains("recv_syscall"));
        let mut c = crate::format::chrome::ChromeTrace::new(Box::new(std::io::sink()));
        crate::pipeline::session::Sink::trace(&mut c, &t);
        crate::pipeline::session::Sink::trace(&mut c, &backwards);
    }
}
