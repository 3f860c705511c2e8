//! The NDJSON recording format (docs/trace-format.md, schema/trace.schema.json): one serde
//! type per line kind, `HeaderJson`, `TraceJson` and `SummaryJson`, which the writer here
//! (`JsonSink`, `header`, `summary`) writes and the reader (`format::recording`) reads, so
//! the two cannot name a field differently.
//!
//! Line 1 is a `header`; then one `trace` object per finished packet trace; the last line
//! is a `summary`. Every line carries `"v"`, the schema version. The header and summary
//! are handed on as `serde_json::Value`s, whose keys come out sorted (as they always have);
//! a trace line is written straight from `TraceJson`, in its field order.
//!
//! Reading: a trace field the reader uses must have the right type (else the line is
//! damaged, see `format::recording`); the trace fields it does not need are not read
//! (`skip_deserializing`: they cost nothing); header and summary fields read leniently
//! (`or_default`, `counts_or_skip`), so damage there spoils nothing (a header `v` that is
//! not a number reads as 0: another version). Fields these types do not name are ignored.

use std::{borrow::Cow, collections::BTreeMap, io::Write, net::IpAddr};

use hdrhistogram::Histogram;
use packetflow_common::Stage;
use serde::{Deserialize, Deserializer, Serialize, de::DeserializeOwned};

use crate::{
    kernel::loader::Tracer,
    model::drops::{DropStats, PacketDrop},
    model::stats::{PERCENTILES, PathStats, Stats},
    model::trace::{Device, Flow, Trace},
    pipeline::correlate::CorrStats,
    pipeline::names::Names,
    pipeline::session::Sink,
    platform,
};

mod connection;
pub use connection::ConnectionJson;

pub const SCHEMA_VERSION: u64 = 1;

/// A name from a fixed table: borrowed when written (no allocation per trace), owned when
/// read.
pub type Name = Cow<'static, str>;

/// For a field the reader does not use: a value of the wrong type reads as the default
/// instead of spoiling the line.
fn or_default<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(d: D) -> Result<T, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).unwrap_or_default())
}

/// For a map of counts: an entry whose value is not a count is left out (the others are
/// kept); anything but an object reads as an empty map.
fn counts_or_skip<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, u64>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    let entries = v.as_object().into_iter().flatten();
    Ok(entries.filter_map(|(k, n)| Some((k.clone(), n.as_u64()?))).collect())
}

/// The `header` line: who wrote the file, where, when, with which filters and hooks.
#[derive(Serialize, Deserialize)]
pub struct HeaderJson {
    #[serde(rename = "type")]
    pub ty: Name,
    /// The schema version; 0 when absent or not a number.
    #[serde(default, deserialize_with = "or_default")]
    pub v: u64,
    /// The packetflow version that wrote the file.
    #[serde(default, deserialize_with = "or_default")]
    pub packetflow: String,
    #[serde(default, deserialize_with = "or_default")]
    pub kernel: String,
    #[serde(default, deserialize_with = "or_default")]
    pub hostname: String,
    #[serde(default, deserialize_with = "or_default")]
    pub start_wall_ns: u64,
    #[serde(default, deserialize_with = "or_default")]
    pub mono_to_wall_ns: i64,
    /// The filters as given (`model::filter::Filter`'s own serialization).
    #[serde(default)]
    pub filters: serde_json::Value,
    /// Per stage name: which kernel hook served it.
    #[serde(default, deserialize_with = "or_default")]
    pub hooks: BTreeMap<String, HookJson>,
    /// The stage names by stage number.
    #[serde(default, deserialize_with = "or_default")]
    pub stage_order: Vec<String>,
    /// Per connection step (`trace --connections`): which kernel hook served it.
    #[serde(default, deserialize_with = "or_default", skip_serializing_if = "BTreeMap::is_empty")]
    pub connection_hooks: BTreeMap<String, HookJson>,
}

/// How one stage is served here: the kernel hook, and why it is not, if it is not.
#[derive(Serialize, Deserialize)]
pub struct HookJson {
    pub hook: String,
    pub available: bool,
    pub error: Option<String>,
}

/// A `trace` line: one finished packet trace. `TraceJson::new` (here) makes one from a
/// `Trace`; `to_trace` (`format::recording`) checks one and makes the `Trace` again. The
/// fields `to_trace` does not need are written, not read (they stay at their defaults).
#[derive(Serialize, Deserialize)]
pub struct TraceJson {
    #[serde(rename = "type")]
    pub ty: Name,
    #[serde(skip_deserializing)]
    pub v: u64,
    pub kind: Name,
    pub proto: Name,
    pub family: Name,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub seq: u32,
    pub len: u32,
    pub path: Name,
    #[serde(default)]
    pub ifname: String,
    #[serde(default)]
    pub ifindex: u32,
    #[serde(skip_deserializing)]
    pub rx_ifname: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(skip_deserializing)]
    pub tid: Option<u32>,
    #[serde(default)]
    pub comm: Option<String>,
    #[serde(default)]
    pub rx_pid: Option<u32>,
    #[serde(default)]
    pub rx_comm: Option<String>,
    /// The sending and receiving processes' cgroup v2 paths, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_cgroup: Option<String>,
    /// The network namespaces (inode of /proc/PID/ns/net) of `ifname` and `rx_ifname`.
    #[serde(skip_deserializing)]
    pub netns: u32,
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub rx_netns: Option<u32>,
    pub complete: bool,
    /// Available stages not in `stages`.
    #[serde(skip_deserializing)]
    pub missing: Vec<Name>,
    pub stages: Vec<StageJson>,
    #[serde(skip_deserializing)]
    pub total_ns: u64,
    /// Where and why the kernel dropped the packet (docs/drops.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropJson>,
    /// TCP: when these bytes were sent again (ns, the same clock as the stages).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retransmits: Vec<u64>,
    /// With `woken`/`on_cpu` traced: `blocked` (a thread waited in a receive call when
    /// the data was queued) or `not_waiting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver: Option<String>,
}

/// One stage of a trace line.
#[derive(Serialize, Deserialize)]
pub struct StageJson {
    pub stage: Name,
    pub t_ns: u64,
    #[serde(default)]
    pub cpu: u16,
}

impl TraceJson {
    pub fn new(t: &Trace, names: &mut Names, available: &[Stage]) -> TraceJson {
        TraceJson {
            ty: "trace".into(),
            v: SCHEMA_VERSION,
            kind: t.kind.name().into(),
            proto: if t.flow.udp { "udp" } else { "tcp" }.into(),
            family: if t.flow.v6 { "ipv6" } else { "ipv4" }.into(),
            src: t.flow.src_ip(),
            sport: t.flow.sport,
            dst: t.flow.dst_ip(),
            dport: t.flow.dport,
            seq: t.seq,
            len: t.len,
            path: t.path.name().into(),
            ifname: names.ifname(t.device),
            ifindex: t.device.ifindex,
            rx_ifname: t.rx_device.map(|d| names.ifname(d)),
            pid: t.pid,
            tid: t.tid,
            comm: t.comm.clone(),
            rx_pid: t.rx_pid,
            rx_comm: t.rx_comm.clone(),
            cgroup: t.cgroup.clone(),
            rx_cgroup: t.rx_cgroup.clone(),
            netns: t.device.netns,
            rx_netns: t.rx_device.map(|d| d.netns),
            complete: t.complete,
            missing: available
                .iter()
                // `woken`/`on_cpu` come only where a reader was blocked: never missing.
                .filter(|s| !s.is_per_packet() && !t.stages.iter().any(|x| x.stage == **s))
                .map(|s| s.name().into())
                .collect(),
            stages: t
                .stages
                .iter()
                .map(|s| StageJson { stage: s.stage.name().into(), t_ns: s.t_ns, cpu: s.cpu })
                .collect(),
            total_ns: t.total_ns(),
            drop: t.drop.as_ref().map(|d| DropJson::new(d, names)),
            retransmits: t.retransmits.clone(),
            receiver: t.receiver_blocked.map(|b| if b { "blocked" } else { "not_waiting" }.to_string()),
        }
    }
}

/// The `summary` line: per path and stage percentiles, and every loss counter. The
/// reader uses only `lost`.
#[derive(Serialize, Deserialize)]
pub struct SummaryJson {
    #[serde(rename = "type")]
    pub ty: Name,
    #[serde(default, deserialize_with = "or_default")]
    pub v: u64,
    /// Per path name.
    #[serde(default, deserialize_with = "or_default")]
    pub paths: BTreeMap<String, PathJson>,
    /// Traces not counted in the statistics, by kind name.
    #[serde(default, deserialize_with = "or_default")]
    pub other_kinds: BTreeMap<String, u64>,
    /// Per stage name: records lost to a full ring buffer.
    #[serde(default, deserialize_with = "counts_or_skip")]
    pub lost: BTreeMap<String, u64>,
    /// The kernel counters as the run gathered them (docs/trace-format.md lists them).
    #[serde(default)]
    pub counters: serde_json::Value,
    #[serde(default, deserialize_with = "or_default")]
    pub correlator: CorrelatorJson,
    /// Drops by reason, last stage reached and location (docs/drops.md).
    #[serde(default, deserialize_with = "or_default")]
    pub drops: Vec<DropCountJson>,
    /// Retransmitted segments by port (the flow's lower port).
    #[serde(default, deserialize_with = "or_default")]
    pub retransmits: BTreeMap<String, u64>,
}

/// One row of the summary's drop counts.
#[derive(Serialize, Deserialize, Default)]
pub struct DropCountJson {
    pub reason: String,
    /// The last stage the packets reached; "-" when they had no trace.
    pub stage: String,
    /// Where the kernel dropped them; "-" in summary mode (counted in the kernel).
    pub location: String,
    pub packets: u64,
}

/// A trace's drop (`trace.drop`), and the body of a `drop` line (a drop without a trace).
#[derive(Serialize, Deserialize, Clone)]
pub struct DropJson {
    pub reason: String,
    pub location: String,
    pub t_ns: u64,
    /// The last stage the packet reached (absent on a `drop` line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    #[serde(default)]
    pub ifname: String,
    #[serde(default)]
    pub ifindex: u32,
    #[serde(default)]
    pub netns: u32,
}

impl DropJson {
    pub fn new(d: &PacketDrop, names: &mut Names) -> DropJson {
        DropJson {
            reason: d.reason.clone(),
            location: d.location.clone(),
            t_ns: d.t_ns,
            after: d.after.map(|s| s.name().to_string()),
            ifname: if d.device.ifindex == 0 { String::new() } else { names.ifname(d.device) },
            ifindex: d.device.ifindex,
            netns: d.device.netns,
        }
    }
}

impl DropJson {
    /// The drop of a packet of `flow` read back (the stage name checked).
    pub fn to_drop(&self, flow: Flow, seq: u32, len: u32, kind: &str) -> Result<PacketDrop, String> {
        let after = match &self.after {
            Some(s) => Some(Stage::from_name(s).ok_or_else(|| format!("unknown stage '{s}'"))?),
            None => None,
        };
        let kind = ["data", "retrans", "ack", "syn", "synack", "fin", "rst"]
            .into_iter()
            .find(|k| *k == kind)
            .ok_or_else(|| format!("unknown kind '{kind}'"))?;
        Ok(PacketDrop {
            t_ns: self.t_ns,
            reason: self.reason.clone(),
            location: self.location.clone(),
            device: Device { netns: self.netns, ifindex: self.ifindex },
            after,
            flow,
            seq,
            len,
            kind,
        })
    }
}

impl DropLineJson {
    pub fn to_drop(&self) -> Result<PacketDrop, String> {
        let flow = Flow::from_json(&self.family, &self.proto, self.src, self.sport, self.dst, self.dport);
        self.drop.to_drop(flow, self.seq, self.len, &self.kind)
    }
}

/// A `drop` line: a packet of the traced traffic dropped with no trace of its own (it
/// was dropped before any traced stage, or is a segment kind not traced).
#[derive(Serialize, Deserialize)]
pub struct DropLineJson {
    #[serde(rename = "type")]
    pub ty: Name,
    #[serde(skip_deserializing)]
    pub v: u64,
    pub kind: Name,
    pub proto: Name,
    pub family: Name,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub seq: u32,
    pub len: u32,
    #[serde(flatten)]
    pub drop: DropJson,
}

impl DropLineJson {
    pub fn new(d: &PacketDrop, names: &mut Names) -> DropLineJson {
        DropLineJson {
            ty: "drop".into(),
            v: SCHEMA_VERSION,
            kind: d.kind.into(),
            proto: if d.flow.udp { "udp" } else { "tcp" }.into(),
            family: if d.flow.v6 { "ipv6" } else { "ipv4" }.into(),
            src: d.flow.src_ip(),
            sport: d.flow.sport,
            dst: d.flow.dst_ip(),
            dport: d.flow.dport,
            seq: d.seq,
            len: d.len,
            drop: DropJson::new(d, names),
        }
    }
}

/// One path's statistics in the summary.
#[derive(Serialize, Deserialize)]
pub struct PathJson {
    pub traces: u64,
    pub complete: u64,
    /// Per stage name: the time since the previous stage.
    pub stages: BTreeMap<String, HistJson>,
    pub end_to_end: HistJson,
}

/// A latency histogram: its count and, unless empty, its percentiles, min and max.
#[derive(Serialize, Deserialize)]
pub struct HistJson {
    pub count: u64,
    /// `p50_ns`, `p90_ns`, … (`model::stats::PERCENTILES`).
    #[serde(flatten)]
    pub percentiles: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_ns: Option<u64>,
}

impl HistJson {
    fn new(h: &Histogram<u64>) -> HistJson {
        if h.is_empty() {
            return HistJson { count: 0, percentiles: BTreeMap::new(), max_ns: None, min_ns: None };
        }
        HistJson {
            count: h.len(),
            percentiles: PERCENTILES
                .iter()
                .map(|(p, name)| (format!("{name}_ns"), h.value_at_percentile(*p)))
                .collect(),
            max_ns: Some(h.max()),
            min_ns: Some(h.min()),
        }
    }
}

/// The correlator's counters (`CorrStats`) a recording keeps; older files lack the later
/// ones.
#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CorrelatorJson {
    pub records: u64,
    #[serde(default)]
    pub drops_traced: u64,
    #[serde(default)]
    pub drops_untraced: u64,
    #[serde(default)]
    pub retransmits: u64,
    pub traces: u64,
    pub incomplete: u64,
    pub flows_evicted: u64,
    pub records_evicted: u64,
    pub records_unmatched: u64,
    pub bad_records: u64,
    pub egress_unanchored: u64,
    pub stage_gaps: u64,
    pub traces_finished_early: u64,
}

/// Writes one line per trace to any writer.
pub struct JsonSink {
    out: Box<dyn Write + Send>,
    names: Names,
    available: Vec<Stage>,
    pub errors: u64,
    /// `trace --slow-us`: trace lines only for traces at least this slow (end to end, ns).
    pub slow_ns: u64,
    /// Traces left out for being faster than `slow_ns` (in the summary line).
    below: u64,
}

impl JsonSink {
    pub fn new(out: Box<dyn Write + Send>, names: Names, available: Vec<Stage>) -> JsonSink {
        JsonSink { out, names, available, errors: 0, slow_ns: 0, below: 0 }
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
        if self.slow_ns > 0 && t.drop.is_none() && crate::model::stats::end_to_end_ns(t) < self.slow_ns {
            self.below += 1;
            return;
        }
        let j = TraceJson::new(t, &mut self.names, &self.available);
        self.line(&j);
    }
    fn connection(&mut self, c: &crate::model::connection::Connection) {
        self.line(&ConnectionJson::new(c));
    }
    fn untraced_drop(&mut self, d: &PacketDrop) {
        let j = DropLineJson::new(d, &mut self.names);
        self.line(&j);
    }
    fn finish(&mut self, summary: &serde_json::Value) {
        let mut summary = summary.clone();
        if self.slow_ns > 0
            && let Some(o) = summary.as_object_mut()
        {
            o.insert("slow_us".into(), (self.slow_ns / 1000).into());
            o.insert("traces_below_slow_us".into(), self.below.into());
        }
        self.line(&summary);
        if let Err(e) = self.out.flush() {
            self.failed(e);
        }
        if self.errors > 0 {
            eprintln!("packetflow: {} writes of the --json output failed: it is incomplete", self.errors);
        }
    }
}

/// The header line (`HeaderJson`) of a run with this tracer and these filters.
pub fn header(tracer: &Tracer, filters: serde_json::Value) -> serde_json::Value {
    let hooks = tracer
        .stages
        .iter()
        .map(|(s, h)| {
            let hook = HookJson { hook: h.hook.clone(), available: h.state.is_ok(), error: h.state.clone().err() };
            (s.name().to_string(), hook)
        })
        .collect();
    let header = HeaderJson {
        ty: "header".into(),
        v: SCHEMA_VERSION,
        packetflow: env!("CARGO_PKG_VERSION").into(),
        kernel: platform::host::kernel_release(),
        hostname: platform::host::hostname(),
        start_wall_ns: platform::host::realtime_ns(),
        mono_to_wall_ns: platform::host::mono_to_wall_offset(),
        filters,
        hooks,
        stage_order: Stage::ALL.iter().map(|s| s.name().to_string()).collect(),
        connection_hooks: tracer
            .conn_hooks
            .iter()
            .map(|h| {
                let hook = HookJson { hook: h.hook.clone(), available: h.state.is_ok(), error: h.state.clone().err() };
                (h.stage.name().to_string(), hook)
            })
            .collect(),
    };
    serde_json::to_value(header).expect("a header has only string map keys")
}

/// The summary line (`SummaryJson`) of a run.
pub fn summary(
    stats: &Stats,
    lost: &BTreeMap<Stage, u64>,
    counters: serde_json::Value,
    corr: &CorrStats,
    drops: &DropStats,
) -> serde_json::Value {
    let path = |ps: &PathStats| PathJson {
        traces: ps.traces,
        complete: ps.complete,
        stages: ps.stages.iter().map(|(s, h)| (s.name().to_string(), HistJson::new(h))).collect(),
        end_to_end: HistJson::new(&ps.e2e),
    };
    let summary = SummaryJson {
        ty: "summary".into(),
        v: SCHEMA_VERSION,
        paths: stats.paths.iter().map(|(p, ps)| (p.name().to_string(), path(ps))).collect(),
        other_kinds: stats.other_kinds.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
        lost: lost.iter().map(|(s, n)| (s.name().to_string(), *n)).collect(),
        counters,
        correlator: CorrelatorJson {
            records: corr.records,
            traces: corr.traces,
            incomplete: corr.incomplete,
            flows_evicted: corr.flows_evicted,
            records_evicted: corr.records_evicted,
            records_unmatched: corr.records_unmatched,
            bad_records: corr.bad_records,
            egress_unanchored: corr.egress_unanchored,
            stage_gaps: corr.stage_gaps,
            traces_finished_early: corr.traces_finished_early,
            drops_traced: corr.drops_traced,
            drops_untraced: corr.drops_untraced,
            retransmits: corr.retransmits,
        },
        drops: drops
            .drops
            .iter()
            .map(|((reason, stage, location), n)| DropCountJson {
                reason: reason.clone(),
                stage: stage.clone(),
                location: location.clone(),
                packets: *n,
            })
            .collect(),
        retransmits: drops.retransmits.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
    };
    serde_json::to_value(summary).expect("a summary has only string map keys")
}

#[cfg(test)]
pub(crate) mod tests;
