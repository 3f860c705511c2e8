//! NDJSON trace output (format documented in docs/trace-format.md).
//!
//! Line 1 is a `header`; then one `trace` object per finished packet trace; the last line
//! is a `summary`. Every line carries `"v"`, the schema version.

use std::{collections::BTreeMap, io::Write};

use packetflow_common::Stage;
use serde::Serialize;

use crate::{
    kernel::loader::Tracer,
    model::stats::{PERCENTILES, Stats},
    model::trace::Trace,
    pipeline::correlate::CorrStats,
    pipeline::names::Names,
    pipeline::session::Sink,
    platform,
};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Serialize)]
pub struct StageJson {
    pub stage: &'static str,
    pub t_ns: u64,
    pub cpu: u16,
}

#[derive(Serialize)]
pub struct TraceJson {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub v: u32,
    pub kind: &'static str,
    pub proto: &'static str,
    pub family: &'static str,
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
    pub seq: u32,
    pub len: u32,
    pub path: &'static str,
    pub ifname: String,
    pub ifindex: u32,
    pub rx_ifname: Option<String>,
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    pub comm: Option<String>,
    pub rx_pid: Option<u32>,
    pub rx_comm: Option<String>,
    pub complete: bool,
    pub missing: Vec<&'static str>,
    pub stages: Vec<StageJson>,
    pub total_ns: u64,
}

impl TraceJson {
    pub fn new(t: &Trace, names: &mut Names, available: &[Stage]) -> TraceJson {
        TraceJson {
            ty: "trace",
            v: SCHEMA_VERSION,
            kind: t.kind.name(),
            proto: if t.flow.udp { "udp" } else { "tcp" },
            family: if t.flow.v6 { "ipv6" } else { "ipv4" },
            src: t.flow.src_ip().to_string(),
            sport: t.flow.sport,
            dst: t.flow.dst_ip().to_string(),
            dport: t.flow.dport,
            seq: t.seq,
            len: t.len,
            path: t.path.name(),
            ifname: names.ifname(t.netns, t.ifindex),
            ifindex: t.ifindex,
            rx_ifname: t.rx_ifindex.map(|(i, ns)| names.ifname(ns, i)),
            pid: t.pid,
            tid: t.tid,
            comm: t.comm.clone(),
            rx_pid: t.rx_pid,
            rx_comm: t.rx_comm.clone(),
            complete: t.complete,
            missing: available.iter().filter(|s| !t.stages.iter().any(|x| x.stage == **s)).map(|s| s.name()).collect(),
            stages: t.stages.iter().map(|s| StageJson { stage: s.stage.name(), t_ns: s.t_ns, cpu: s.cpu }).collect(),
            total_ns: t.total_ns(),
        }
    }
}

/// Writes one line per trace to any writer.
pub struct JsonSink {
    out: Box<dyn Write + Send>,
    names: Names,
    available: Vec<Stage>,
    pub errors: u64,
}

impl JsonSink {
    pub fn new(out: Box<dyn Write + Send>, names: Names, available: Vec<Stage>) -> JsonSink {
        JsonSink { out, names, available, errors: 0 }
    }

    pub fn line(&mut self, v: &impl Serialize) {
        let r = serde_json::to_writer(&mut self.out, v)
            .map_err(std::io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"));
        if let Err(e) = r {
            self.failed(e);
        }
    }

    /// Counts a failed write; says so once (the count comes at the end of the run).
    fn failed(&mut self, e: std::io::Error) {
        if self.errors == 0 {
            eprintln!("packetflow: writing the --json output failed: {e}; lines from now on may be lost");
        }
        self.errors += 1;
    }
}

impl Sink for JsonSink {
    fn trace(&mut self, t: &Trace) {
        let j = TraceJson::new(t, &mut self.names, &self.available);
        self.line(&j);
    }
    fn finish(&mut self, summary: &serde_json::Value) {
        self.line(summary);
        if let Err(e) = self.out.flush() {
            self.failed(e);
        }
        if self.errors > 0 {
            eprintln!("packetflow: {} writes of the --json output failed: it is incomplete", self.errors);
        }
    }
}

#[derive(Serialize)]
pub struct HookJson {
    pub hook: String,
    pub available: bool,
    pub error: Option<String>,
}

/// The header line: who wrote the file, where, when, with which filters and hooks.
pub fn header(tracer: &Tracer, filters: serde_json::Value) -> serde_json::Value {
    let hooks: BTreeMap<&str, HookJson> = tracer
        .stages
        .iter()
        .map(|(s, h)| {
            (s.name(), HookJson { hook: h.hook.clone(), available: h.state.is_ok(), error: h.state.clone().err() })
        })
        .collect();
    serde_json::json!({
        "type": "header",
        "v": SCHEMA_VERSION,
        "packetflow": env!("CARGO_PKG_VERSION"),
        "kernel": platform::host::kernel_release(),
        "hostname": platform::host::hostname(),
        "start_wall_ns": platform::host::realtime_ns(),
        "mono_to_wall_ns": platform::host::mono_to_wall_offset(),
        "filters": filters,
        "hooks": hooks,
        "stage_order": packetflow_common::Stage::ALL.iter().map(|s| s.name()).collect::<Vec<_>>(),
    })
}

/// The summary line: per path and stage percentiles, and every loss counter.
pub fn summary(
    stats: &Stats,
    lost: &BTreeMap<Stage, u64>,
    counters: serde_json::Value,
    corr: &CorrStats,
) -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    for (p, ps) in &stats.paths {
        let mut stages = serde_json::Map::new();
        for (s, h) in &ps.stages {
            stages.insert(s.name().into(), hist_json(h));
        }
        paths.insert(
            p.name().into(),
            serde_json::json!({
                "traces": ps.traces,
                "complete": ps.complete,
                "stages": stages,
                "end_to_end": hist_json(&ps.e2e),
            }),
        );
    }
    serde_json::json!({
        "type": "summary",
        "v": SCHEMA_VERSION,
        "paths": paths,
        "other_kinds": stats.other_kinds,
        "lost": lost.iter().map(|(s, n)| (s.name(), *n)).collect::<BTreeMap<_, _>>(),
        "counters": counters,
        "correlator": {
            "records": corr.records,
            "traces": corr.traces,
            "incomplete": corr.incomplete,
            "flows_evicted": corr.flows_evicted,
            "records_evicted": corr.records_evicted,
            "records_unmatched": corr.records_unmatched,
            "bad_records": corr.bad_records,
            "egress_unanchored": corr.egress_unanchored,
            "stage_gaps": corr.stage_gaps,
            "traces_finished_early": corr.traces_finished_early,
        },
    })
}

fn hist_json(h: &hdrhistogram::Histogram<u64>) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("count".into(), h.len().into());
    if !h.is_empty() {
        for (p, name) in PERCENTILES {
            m.insert(format!("{name}_ns"), h.value_at_percentile(p).into());
        }
        m.insert("max_ns".into(), h.max().into());
        m.insert("min_ns".into(), h.min().into());
    }
    serde_json::Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_writes_are_counted() {
        // /dev/full: every write fails with ENOSPC.
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let mut sink = JsonSink::new(Box::new(full), Names::new(&[]), Vec::new());
        sink.line(&serde_json::json!({"type": "header"}));
        sink.finish(&serde_json::json!({"type": "summary"}));
        assert_eq!(sink.errors, 2);
    }
}
