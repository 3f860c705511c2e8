//! The daemon's Prometheus metrics: a snapshot of the pipeline (refreshed every second by
//! the daemon's main loop), encoded by prometheus-client at each scrape (served by
//! `http.rs` on `GET /metrics`).
//!
//! Latency histograms are exported with buckets 1 µs × 1.1^k up to past 1 s (146 bounds),
//! so `histogram_quantile` reads any percentile from 1 µs to 1 s within 10%.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Instant,
};

use hdrhistogram::Histogram;
use packetflow_common::{Stage, counters};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::{Registry, Unit},
};

use super::http::{ACCEPT_ERRORS, DROPPED_IDLE, DROPPED_OVER_LIMIT, DROPPED_TIMEOUT};
use crate::{
    kernel::{hooks::StageHook, interfaces::Attached},
    model::stats::Stats,
    pipeline::correlate::CorrStats,
};

/// Everything the metrics endpoint and `packetflow status` show, as of `taken`.
#[derive(Clone)]
pub struct Snapshot {
    pub taken: Instant,
    pub stats: Stats,
    pub counters: Vec<u64>,
    /// Per stage, runs of its programs the kernel skipped (`Tracer::recursion_misses`).
    pub missed: BTreeMap<Stage, u64>,
    /// Each program's runs and kernel time (None: run statistics unavailable).
    pub programs: Option<Vec<crate::kernel::run_stats::ProgramCost>>,
    /// Since the programs were attached.
    pub tracing_for: std::time::Duration,
    /// Of that, how long the run statistics were on (`cost_sample_secs`): `programs`
    /// counts runs and time in those windows only.
    pub stats_sampled: std::time::Duration,
    pub corr: CorrStats,
    pub reader_overflow: u64,
    /// Of those, packet anchors (device-queue records).
    pub reader_overflow_anchors: u64,
    /// The correlator's estimated memory and its budget, bytes.
    pub corr_bytes: (u64, u64),
    /// Per ring shard: the largest backlog a reader found, as a fraction of the ring.
    pub ring_fill: BTreeMap<usize, f64>,
    pub stages: BTreeMap<Stage, StageHook>,
    pub interfaces: Vec<Attached>,
    pub links: usize,
    pub trace_lines_written: u64,
    pub trace_lines_dropped: u64,
    pub trace_files_deleted: u64,
    pub trace_write_errors: u64,
    pub reloads_applied: u64,
    pub reloads_rejected: u64,
    /// Connection set-up per listener (`connections = true`).
    pub conns: crate::model::connection::ConnStats,
    pub conns_traced: bool,
    /// Drops by reason and stage, retransmits by port.
    pub drops: crate::model::drops::DropStats,
}

/// Upper bounds of the latency buckets, in seconds: 1 µs × 1.1^k, k = 0..=145 (≈ 1.0 s
/// at k = 145), rounded to 4 significant digits so the `le` labels stay short.
pub fn bucket_bounds() -> Vec<f64> {
    (0..=145)
        .map(|k| {
            let x = 1e-6 * 1.1f64.powi(k);
            let scale = 10f64.powi(3 - x.log10().floor() as i32);
            (x * scale).round() / scale
        })
        .collect()
}

/// (sum in s, count, per-bucket counts) of an ns histogram, for the bounds above.
fn buckets(h: &Histogram<u64>, bounds: &[f64]) -> (f64, u64, Vec<(f64, u64)>) {
    let mut out: Vec<(f64, u64)> = bounds.iter().map(|b| (*b, 0)).collect();
    out.push((f64::INFINITY, 0));
    let mut sum = 0.0;
    for v in h.iter_recorded() {
        let secs = h.highest_equivalent(v.value_iterated_to()) as f64 * 1e-9;
        let n = v.count_at_value();
        sum += secs * n as f64;
        let i = bounds.partition_point(|b| *b < secs);
        out[i].1 += n;
    }
    (sum, h.len(), out)
}

#[derive(Debug)]
struct Exporter {
    snap: Arc<Mutex<Option<Snapshot>>>,
    bounds: Vec<f64>,
}

// A snapshot holds histograms, which are not Debug; the collector needs Debug.
impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshot")
    }
}

fn metric<'a>(
    enc: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
    unit: Option<&'a Unit>,
    ty: MetricType,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, std::fmt::Error> {
    enc.encode_descriptor(name, help, unit, ty)
}

impl Collector for Exporter {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // The endpoint's own counters, also before the first snapshot.
        let mut m = metric(
            &mut enc,
            "packetflow_metrics_connections_dropped",
            "Connections to this endpoint closed unserved: over_limit (every slot busy), idle_evicted (the oldest waiting for its request, to make room), timeout (no request, or the reply not taken, in time)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in
            [("over_limit", &DROPPED_OVER_LIMIT), ("idle_evicted", &DROPPED_IDLE), ("timeout", &DROPPED_TIMEOUT)]
        {
            m.encode_family(&[("reason", reason)])?.encode_counter::<NoLabelSet, _, f64>(&n.load(Relaxed), None)?;
        }
        counter(
            &mut enc,
            "packetflow_metrics_accept_errors",
            "Failed accepts on this endpoint (each pauses accepting briefly)",
            ACCEPT_ERRORS.load(Relaxed),
        )?;
        let guard = self.snap.lock().expect("snapshot lock");
        let Some(s) = guard.as_ref() else {
            return Ok(());
        };
        let secs = Unit::Seconds;

        let mut m = metric(
            &mut enc,
            "packetflow_stage_latency",
            "Time from the previous stage of the same packet to this stage",
            Some(&secs),
            MetricType::Histogram,
        )?;
        for (path, ps) in &s.stats.paths {
            for (stage, h) in &ps.stages {
                if h.is_empty() {
                    continue;
                }
                let labels = [("path", path.name()), ("stage", stage.name())];
                let (sum, count, b) = buckets(h, &self.bounds);
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(sum, count, &b, None)?;
            }
        }
        let mut m = metric(
            &mut enc,
            "packetflow_end_to_end_latency",
            "Time from send_syscall to recv_syscall of each packet",
            Some(&secs),
            MetricType::Histogram,
        )?;
        for (path, ps) in &s.stats.paths {
            if ps.e2e.is_empty() {
                continue;
            }
            let (sum, count, b) = buckets(&ps.e2e, &self.bounds);
            m.encode_family(&[("path", path.name())])?.encode_histogram::<NoLabelSet>(sum, count, &b, None)?;
        }

        drops(&mut enc, &s.drops)?;
        if s.conns_traced {
            connections(&mut enc, &s.conns, &self.bounds)?;
        }

        let mut m =
            metric(&mut enc, "packetflow_packets_traced", "Data packets traced, per path", None, MetricType::Counter)?;
        for (path, ps) in &s.stats.paths {
            m.encode_family(&[("path", path.name())])?.encode_counter::<NoLabelSet, _, f64>(&ps.traces, None)?;
        }
        let mut m = metric(
            &mut enc,
            "packetflow_packets_complete",
            "Data packets traced through every observable stage, per path",
            None,
            MetricType::Counter,
        )?;
        for (path, ps) in &s.stats.paths {
            m.encode_family(&[("path", path.name())])?.encode_counter::<NoLabelSet, _, f64>(&ps.complete, None)?;
        }

        let mut m = metric(
            &mut enc,
            "packetflow_events_lost",
            "Events a hook could not write because its ring buffer was full",
            None,
            MetricType::Counter,
        )?;
        for stage in Stage::ALL {
            let n = s.counters.get((counters::LOST + stage as u32) as usize).copied().unwrap_or(0);
            let hook = s.stages.get(&stage).map_or("", |h| h.hook.as_str());
            m.encode_family(&[("stage", stage.name()), ("hook", hook)])?
                .encode_counter::<NoLabelSet, _, f64>(&n, None)?;
        }
        let mut m = metric(
            &mut enc,
            "packetflow_events_emitted",
            "Events written to the ring buffers, per stage",
            None,
            MetricType::Counter,
        )?;
        for stage in Stage::ALL {
            let n = s.counters.get((counters::EMITTED + stage as u32) as usize).copied().unwrap_or(0);
            m.encode_family(&[("stage", stage.name())])?.encode_counter::<NoLabelSet, _, f64>(&n, None)?;
        }
        counter(
            &mut enc,
            "packetflow_records_dropped",
            "Records dropped because the correlator was behind",
            s.reader_overflow,
        )?;
        let mut m = metric(
            &mut enc,
            "packetflow_correlation_evictions",
            "Flows and records the correlator evicted before they completed (memory bound)",
            None,
            MetricType::Counter,
        )?;
        m.encode_family(&[("what", "flows")])?.encode_counter::<NoLabelSet, _, f64>(&s.corr.flows_evicted, None)?;
        m.encode_family(&[("what", "records")])?.encode_counter::<NoLabelSet, _, f64>(&s.corr.records_evicted, None)?;
        if let Some(progs) = &s.programs {
            let mut m = metric(
                &mut enc,
                "packetflow_program_runs",
                "Runs of each of the tracer's programs while the kernel's BPF run statistics were on (packetflow_program_stats_seconds_total; the daemon samples them, cost_sample_secs)",
                None,
                MetricType::Counter,
            )?;
            for p in progs {
                let stage = p.stage.map_or("", |s| s.name());
                m.encode_family(&[("program", p.name.as_str()), ("stage", stage)])?
                    .encode_counter::<NoLabelSet, _, f64>(&p.runs, None)?;
            }
            let mut m = metric(
                &mut enc,
                "packetflow_program_run",
                "Kernel time spent in each of the tracer's programs while the run statistics were on (share of one CPU: its rate over packetflow_program_stats_seconds_total's)",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            for p in progs {
                let stage = p.stage.map_or("", |s| s.name());
                m.encode_family(&[("program", p.name.as_str()), ("stage", stage)])?
                    .encode_counter::<NoLabelSet, _, f64>(&(p.ns as f64 / 1e9), None)?;
            }
            let mut m = metric(
                &mut enc,
                "packetflow_program_stats",
                "Time the kernel's BPF run statistics were on: the windows packetflow_program_runs_total and packetflow_program_run_seconds_total count in",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            m.encode_counter::<NoLabelSet, _, f64>(&s.stats_sampled.as_secs_f64(), None)?;
        }
        let mut m = metric(
            &mut enc,
            "packetflow_events_missed",
            "Runs of a stage's program the kernel skipped because a BPF program was already running on that CPU (records never written)",
            None,
            MetricType::Counter,
        )?;
        for stage in Stage::ALL {
            let n = s.missed.get(&stage).copied().unwrap_or(0);
            m.encode_family(&[("stage", stage.name())])?.encode_counter::<NoLabelSet, _, f64>(&n, None)?;
        }
        let mut m = metric(
            &mut enc,
            "packetflow_packets_lost",
            "Packets that got no trace: their device-queue record was dropped by a reader that was behind, or evicted with its flow (the kernel's own losses are packetflow_events_lost_total{stage=\"dev_queue\"})",
            None,
            MetricType::Counter,
        )?;
        m.encode_family(&[("cause", "reader_behind")])?
            .encode_counter::<NoLabelSet, _, f64>(&s.reader_overflow_anchors, None)?;
        m.encode_family(&[("cause", "evicted")])?
            .encode_counter::<NoLabelSet, _, f64>(&s.corr.anchors_evicted, None)?;
        gauge(&mut enc, "packetflow_correlator_bytes", "The correlator's estimated memory", s.corr_bytes.0 as i64)?;
        gauge(&mut enc, "packetflow_correlator_budget_bytes", "The correlator's memory budget", s.corr_bytes.1 as i64)?;
        counter(&mut enc, "packetflow_traces_incomplete", "Traces finished with stages missing", s.corr.incomplete)?;
        counter(
            &mut enc,
            "packetflow_traces_with_gaps",
            "Incomplete traces missing a stage between two they have: the packet passed it and the kernel wrote no record there",
            s.corr.stage_gaps,
        )?;
        counter(
            &mut enc,
            "packetflow_summary_evicted",
            "Summary mode: packets left out of the in-kernel histograms because another packet took their slot",
            s.counters.get(counters::SUMMARY_EVICTED as usize).copied().unwrap_or(0),
        )?;

        let mut m = metric(
            &mut enc,
            "packetflow_ring_fill_ratio",
            "Largest backlog a reader found in each ring-buffer shard since the last refresh, as a fraction of its size",
            None,
            MetricType::Gauge,
        )?;
        for (shard, f) in &s.ring_fill {
            m.encode_family(&[("shard", shard.to_string())])?.encode_gauge(f)?;
        }
        gauge(&mut enc, "packetflow_programs_attached", "Attachments (bpf_links) held by the daemon", s.links as i64)?;
        let mut m = metric(
            &mut enc,
            "packetflow_stage_available",
            "1 when the stage's hook is attached on this kernel, else 0",
            None,
            MetricType::Gauge,
        )?;
        for (stage, h) in &s.stages {
            m.encode_family(&[("stage", stage.name()), ("hook", h.hook.as_str())])?
                .encode_gauge(&i64::from(h.state.is_ok()))?;
        }

        counter(
            &mut enc,
            "packetflow_trace_lines_written",
            "Trace lines written to the trace files",
            s.trace_lines_written,
        )?;
        counter(
            &mut enc,
            "packetflow_trace_lines_dropped",
            "Trace lines not written: the file writer was behind, or a write failed (disk full) or was paused after a failure",
            s.trace_lines_dropped,
        )?;
        counter(
            &mut enc,
            "packetflow_trace_files_deleted",
            "Old trace files deleted to respect max_total_mb",
            s.trace_files_deleted,
        )?;
        counter(&mut enc, "packetflow_trace_write_errors", "Failed trace file writes", s.trace_write_errors)?;
        let mut m =
            metric(&mut enc, "packetflow_config_reloads", "SIGHUP reloads, by result", None, MetricType::Counter)?;
        m.encode_family(&[("result", "applied")])?.encode_counter::<NoLabelSet, _, f64>(&s.reloads_applied, None)?;
        m.encode_family(&[("result", "rejected")])?.encode_counter::<NoLabelSet, _, f64>(&s.reloads_rejected, None)?;
        let age = s.taken.elapsed().as_secs_f64();
        let mut m = metric(
            &mut enc,
            "packetflow_snapshot_age",
            "Age of the numbers in this scrape",
            Some(&secs),
            MetricType::Gauge,
        )?;
        m.encode_gauge(&age)?;
        Ok(())
    }
}

/// A per-listener number: (metric name, help, the value).
type ListenerMetric = (&'static str, &'static str, fn(&crate::model::connection::ListenerStats) -> u64);

/// Connection set-up per listener (the server's address as clients named it).
fn connections(
    enc: &mut DescriptorEncoder,
    c: &crate::model::connection::ConnStats,
    bounds: &[f64],
) -> Result<(), std::fmt::Error> {
    use crate::model::connection::ListenerStats;
    let secs = Unit::Seconds;
    let names: Vec<(String, &ListenerStats)> = c.listeners.iter().map(|(a, l)| (a.to_string(), l)).collect();
    for (name, help, get) in [
        (
            "packetflow_connection_handshake",
            "From a connection's first SYN to it being on the accept queue (else the client established), retransmissions included",
            (|l: &ListenerStats| &l.handshake) as fn(&ListenerStats) -> &Histogram<u64>,
        ),
        (
            "packetflow_connection_accept_wait",
            "From a connection on the accept queue to accept() returning it",
            |l: &ListenerStats| &l.accept_wait,
        ),
    ] {
        let mut m = metric(enc, name, help, Some(&secs), MetricType::Histogram)?;
        for (listener, l) in &names {
            let h = get(l);
            if !h.is_empty() {
                let (sum, count, b) = buckets(h, bounds);
                m.encode_family(&[("listener", listener.as_str())])?
                    .encode_histogram::<NoLabelSet>(sum, count, &b, None)?;
            }
        }
    }
    let mut m = metric(
        enc,
        "packetflow_connections",
        "Connections traced, per listener and outcome",
        None,
        MetricType::Counter,
    )?;
    for (listener, l) in &names {
        for (o, n) in &l.outcomes {
            m.encode_family(&[("listener", listener.as_str()), ("outcome", o.name())])?
                .encode_counter::<NoLabelSet, _, f64>(n, None)?;
        }
    }
    let gauges: [ListenerMetric; 4] = [
        ("packetflow_listener_accept_queue", "Accept-queue length the latest SYN or handshake ACK found", |l| {
            l.last.map_or(0, |q| u64::from(q.accept))
        }),
        ("packetflow_listener_accept_queue_max", "Highest accept-queue length seen", |l| u64::from(l.max_accept)),
        ("packetflow_listener_accept_queue_limit", "The listen() backlog as the kernel applies it", |l| {
            u64::from(l.limit)
        }),
        ("packetflow_listener_syn_queue_max", "Highest SYN-queue length seen", |l| u64::from(l.max_syn)),
    ];
    for (name, help, get) in gauges {
        let mut m = metric(enc, name, help, None, MetricType::Gauge)?;
        for (listener, l) in &names {
            m.encode_family(&[("listener", listener.as_str())])?.encode_gauge(&(get(l) as i64))?;
        }
    }
    let counters: [ListenerMetric; 5] = [
        (
            "packetflow_listener_overflows",
            "SYNs and handshake ACKs dropped for a full accept queue (TcpExt ListenOverflows)",
            |l| l.overflows,
        ),
        (
            "packetflow_listener_other_drops",
            "Other SYNs and handshake ACKs the listener dropped (a full SYN queue without cookies)",
            |l| l.other_drops,
        ),
        ("packetflow_listener_syn_cookies", "SYNs answered with a SYN cookie", |l| l.cookies),
        ("packetflow_connection_syn_retransmits", "SYNs clients sent again", |l| l.syn_retransmits),
        ("packetflow_connection_synack_retransmits", "SYN-ACKs the server sent again", |l| l.synack_retransmits),
    ];
    for (name, help, get) in counters {
        let mut m = metric(enc, name, help, None, MetricType::Counter)?;
        for (listener, l) in &names {
            m.encode_family(&[("listener", listener.as_str())])?.encode_counter::<NoLabelSet, _, f64>(&get(l), None)?;
        }
    }
    Ok(())
}

/// Drops per reason and last stage reached ("none": no trace); retransmits per port.
fn drops(enc: &mut DescriptorEncoder, d: &crate::model::drops::DropStats) -> Result<(), std::fmt::Error> {
    {
        let mut m = metric(
            enc,
            "packetflow_drops",
            "Packets of the traced traffic the kernel dropped, per drop reason and last stage reached",
            None,
            MetricType::Counter,
        )?;
        for ((reason, stage), n) in d.by_reason_stage() {
            let stage = if stage == "-" { "none" } else { stage.as_str() };
            m.encode_family(&[("reason", reason.as_str()), ("stage", stage)])?
                .encode_counter::<NoLabelSet, _, f64>(&n, None)?;
        }
    }
    let mut m = metric(
        enc,
        "packetflow_retransmits",
        "TCP segments sent again, per port (the lower of the flow's two)",
        None,
        MetricType::Counter,
    )?;
    for (port, n) in &d.retransmits {
        let port = port.to_string();
        m.encode_family(&[("port", port.as_str())])?.encode_counter::<NoLabelSet, _, f64>(n, None)?;
    }
    Ok(())
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    m.encode_counter::<NoLabelSet, _, f64>(&v, None)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    m.encode_gauge(&v)
}

/// The registry behind `/metrics`, reading `snap`.
pub fn registry(snap: Arc<Mutex<Option<Snapshot>>>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(Exporter { snap, bounds: bucket_bounds() }));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_resolve_percentiles_within_ten_percent() {
        let b = bucket_bounds();
        assert!(b[0] <= 1e-6 && *b.last().unwrap() >= 1.0);
        for w in b.windows(2) {
            assert!(w[1] / w[0] <= 1.1015, "{} / {}", w[1], w[0]);
        }
        let mut h = crate::model::stats::hist();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap(); // 1 µs .. 1 ms
        }
        let (sum, count, out) = buckets(&h, &b);
        assert_eq!(count, 1000);
        assert_eq!(out.iter().map(|(_, n)| n).sum::<u64>(), 1000);
        assert!((sum - 0.5005).abs() < 0.001, "{sum}");
        // The bucket holding the p99 (990 µs) is within 10% of it.
        let mut cum = 0;
        let p99 = out.iter().find(|(_, n)| {
            cum += n;
            cum >= 990
        });
        let le = p99.unwrap().0;
        assert!((990e-6..=990e-6 * 1.1).contains(&le), "{le}");
    }
}
