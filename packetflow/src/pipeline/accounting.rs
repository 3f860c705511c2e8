//! What a tracing run lost and what it cost: the kernel's loss counters per stage, the
//! tracer's own kernel time, and the lines that say both at the end of a run.

use std::collections::BTreeMap;

use packetflow_common::{Stage, counters};

use crate::pipeline::run::Finished;

/// What the tracer's programs cost the kernel over a run.
#[derive(Clone, Debug)]
pub struct Cost {
    /// Kernel time and program runs while the run statistics were on (`sampled`).
    pub kernel_ns: u64,
    pub runs: u64,
    pub elapsed: std::time::Duration,
    pub sampled: std::time::Duration,
}

impl Cost {
    pub(crate) fn of(
        programs: &[crate::kernel::run_stats::ProgramCost],
        elapsed: std::time::Duration,
        sampled: std::time::Duration,
    ) -> Cost {
        Cost {
            kernel_ns: programs.iter().map(|p| p.ns).sum(),
            runs: programs.iter().map(|p| p.runs).sum(),
            elapsed,
            sampled: sampled.min(elapsed),
        }
    }

    /// Share of one CPU while measured, in percent.
    pub fn cpu_percent(&self) -> f64 {
        self.kernel_ns as f64 / self.sampled.as_nanos().max(1) as f64 * 100.0
    }

    /// Were the statistics on for only part of the run?
    pub fn is_sampled(&self) -> bool {
        self.sampled.as_secs_f64() < self.elapsed.as_secs_f64() * 0.99
    }

    /// The kernel time over the whole run: measured, or scaled up from the samples.
    pub fn whole_run_ns(&self) -> u64 {
        if self.is_sampled() {
            (self.kernel_ns as f64 * self.elapsed.as_secs_f64() / self.sampled.as_secs_f64().max(1e-9)) as u64
        } else {
            self.kernel_ns
        }
    }
}

/// "tracing cost: 940 ns of kernel time per traced packet, 3.1% of one CPU ...".
pub fn cost_line(f: &Finished) -> String {
    let Some(c) = &f.cost else {
        return "tracing cost: unknown (the kernel's BPF run statistics are off, or could not be turned on)".into();
    };
    let packets: u64 = f.stats.paths.values().map(|p| p.traces).sum();
    let per = match packets {
        0 => "no packet traced".to_string(),
        n => format!("{} ns of kernel time per traced packet", c.whole_run_ns() / n),
    };
    let over = if c.is_sampled() {
        format!("in {:.1} s of run statistics sampled over {:.1} s", c.sampled.as_secs_f64(), c.elapsed.as_secs_f64())
    } else {
        format!("in {:.1} s", c.elapsed.as_secs_f64())
    };
    format!(
        "tracing cost: {per}, {:.1}% of one CPU ({} program runs, {:.1} ms of kernel time {over})",
        c.cpu_percent(),
        c.runs,
        c.kernel_ns as f64 / 1e6,
    )
}

/// Ring-buffer losses per stage, from the kernel counters.
pub fn lost_per_stage(c: &[u64]) -> BTreeMap<Stage, u64> {
    Stage::ALL.iter().map(|s| (*s, c.get((counters::LOST + *s as u32) as usize).copied().unwrap_or(0))).collect()
}

/// Ring losses plus the runs the kernel skipped, per stage.
pub fn with_misses(mut lost: BTreeMap<Stage, u64>, missed: &BTreeMap<Stage, u64>) -> BTreeMap<Stage, u64> {
    for (s, n) in missed {
        *lost.entry(*s).or_default() += n;
    }
    lost
}

pub fn counters_json(c: &[u64], overflow: u64) -> serde_json::Value {
    let g = |i: u32| c.get(i as usize).copied().unwrap_or(0);
    serde_json::json!({
        "parsed_xdp": g(counters::PARSED_XDP),
        "unparsed_xdp": g(counters::UNPARSED_XDP),
        "parsed_tc": g(counters::PARSED_TC),
        "unparsed_tc": g(counters::UNPARSED_TC),
        "unparsed_skb": g(counters::UNPARSED_SKB),
        "control_skipped": g(counters::CONTROL_SKIPPED),
        "send_syscall_unattributed": g(counters::SEND_SLOT_MISS),
        "recv_syscall_unattributed": g(counters::RECV_SLOT_MISS),
        "kernel_reads_failed": g(counters::READ_FAILED),
        "summary_evicted": g(counters::SUMMARY_EVICTED),
        "reader_overflow_records": overflow,
        "connection_records": g(counters::CONN_EMITTED),
        "connection_records_lost": g(counters::CONN_LOST),
        "drop_records": g(counters::DROP_EMITTED),
        "drop_records_lost": g(counters::DROP_LOST),
        "retransmit_records": g(counters::RETRANS_EMITTED),
        "retransmit_records_lost": g(counters::RETRANS_LOST),
        "emitted": Stage::ALL.iter().map(|s| (s.name(), g(counters::EMITTED + *s as u32))).collect::<BTreeMap<_, _>>(),
    })
}

/// Kernel timestamp → wall clock, for display.
pub fn wall_clock(offset: i64, t_ns: u64) -> String {
    let w = (t_ns as i64 + offset) as u64;
    let secs = w / 1_000_000_000;
    format!("{}.{:09}", secs, w % 1_000_000_000)
}

/// One line naming every loss, for the end of a run ("lost 0 events" when none).
pub fn loss_line(f: &Finished) -> String {
    let lost: Vec<String> =
        f.lost.iter().filter(|(_, n)| **n > 0).map(|(s, n)| format!("lost {n} events at {}", s.name())).collect();
    let mut parts = if lost.is_empty() { vec!["lost 0 events in the kernel".to_string()] } else { lost };
    if f.overflow_records > 0 {
        parts.push(format!("{} records dropped by a slow reader", f.overflow_records));
    }
    if f.corr.flows_evicted > 0 || f.corr.records_evicted > 0 {
        parts.push(format!(
            "{} flows and {} records evicted from the correlator",
            f.corr.flows_evicted, f.corr.records_evicted
        ));
    }
    if f.corr.egress_unanchored > 0 {
        parts.push(format!(
            "{} packets had no dev_queue record (traced from tc_egress, dev_queue reported missing)",
            f.corr.egress_unanchored
        ));
    }
    if f.corr.stage_gaps > 0 {
        parts.push(format!(
            "{} packets passed a stage that wrote no record (a stage missing between two the trace has; docs/stages.md)",
            f.corr.stage_gaps
        ));
    }
    if f.corr.traces_finished_early > 0 {
        parts.push(format!(
            "{} traces finished early (their flow was evicted for the memory budget)",
            f.corr.traces_finished_early
        ));
    }
    let g = |i: u32| f.counters.get(i as usize).copied().unwrap_or(0);
    if g(counters::CONN_LOST) > 0 {
        parts.push(format!("lost {} connection records (ring full)", g(counters::CONN_LOST)));
    }
    if g(counters::DROP_LOST) + g(counters::RETRANS_LOST) > 0 {
        parts.push(format!(
            "lost {} drop and {} retransmission records (ring full)",
            g(counters::DROP_LOST),
            g(counters::RETRANS_LOST)
        ));
    }
    if g(counters::SUMMARY_EVICTED) > 0 {
        parts.push(format!(
            "{} packets left out of the in-kernel histograms (their slot went to another packet first)",
            g(counters::SUMMARY_EVICTED)
        ));
    }
    if g(counters::SEND_SLOT_MISS) + g(counters::RECV_SLOT_MISS) > 0 {
        parts.push(format!(
            "{} sends and {} receives could not be tied to their syscall",
            g(counters::SEND_SLOT_MISS),
            g(counters::RECV_SLOT_MISS)
        ));
    }
    parts.join("; ")
}
