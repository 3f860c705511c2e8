//! `packetflow report`: the tables of a recording, computed from the file alone; a
//! comparison with a baseline recording; Chrome/Perfetto, HTML and SVG output.
//!
//! Reading streams: memory holds the statistics (bounded) and one line at a time, never
//! the file. On a terminal, progress goes to stderr.

pub mod charts;
pub mod tables;

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufReader, IsTerminal, Read},
    time::{Duration, Instant},
};

use anyhow::Result;
use hdrhistogram::Histogram;
use packetflow_common::Stage;

use crate::{
    error::user,
    format::ndjson::HeaderJson,
    format::recording::{Line, ReadNotes, Reader},
    model::connection::ConnStats,
    model::drops::DropStats,
    model::stats::{self, Stats},
    model::trace::{Flow, PathKind, Trace},
    pipeline::session::Sink,
    report::charts::Gathered,
    report::tables::us,
};

/// How `report` groups its table: per stage, per flow, per sending process.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum By {
    Stage,
    Flow,
    Pid,
}

/// Groups for `--by flow|pid` (bounded: past the limit, new groups fall into "other").
pub struct Groups {
    by: By,
    map: BTreeMap<String, Histogram<u64>>,
}

const MAX_GROUPS: usize = 10_000;

impl Groups {
    fn add(&mut self, t: &Trace) {
        if t.kind != crate::model::trace::TraceKind::Data {
            return;
        }
        let key = match self.by {
            By::Stage => return,
            By::Flow => flow_name(&t.flow, t.path),
            By::Pid => match (t.pid, &t.comm) {
                (Some(p), Some(c)) => format!("{p} {}", crate::format::output::printable(c)),
                (Some(p), None) => p.to_string(),
                _ => "(no sender process)".into(),
            },
        };
        let key =
            if self.map.len() >= MAX_GROUPS && !self.map.contains_key(&key) { "(other)".to_string() } else { key };
        let h =
            self.map.entry(key).or_insert_with(|| Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("bounds"));
        h.saturating_record(stats::end_to_end_ns(t).max(1));
    }

    pub fn table(&self) -> String {
        let title = if self.by == By::Flow { "flow" } else { "sender (pid comm)" };
        let mut header = vec![title.to_string(), "count".into()];
        header.extend(stats::PERCENTILES.iter().map(|(_, n)| format!("{n} µs")));
        header.push("max µs".into());
        let mut rows: Vec<(u64, Vec<String>)> = self
            .map
            .iter()
            .map(|(k, h)| {
                let mut r = vec![k.clone()];
                r.extend(tables::row(h));
                (h.len(), r)
            })
            .collect();
        rows.sort_by(|a, b| b.0.cmp(&a.0).then(a.1[0].cmp(&b.1[0])));
        let rows: Vec<Vec<String>> = rows.into_iter().map(|(_, r)| r).collect();
        format!(
            "end-to-end latency by {}\n{}",
            if self.by == By::Flow { "flow" } else { "sender" },
            tables::render(&header, &rows)
        )
    }
}

fn flow_name(f: &Flow, p: PathKind) -> String {
    format!(
        "{} {}:{} > {}:{} ({})",
        if f.udp { "udp" } else { "tcp" },
        f.src_ip(),
        f.sport,
        f.dst_ip(),
        f.dport,
        p.name()
    )
}

/// A reader that counts bytes and shows progress on a terminal.
struct Progress<R> {
    inner: R,
    read: u64,
    total: Option<u64>,
    name: String,
    last: Instant,
    show: bool,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.show && self.last.elapsed() > Duration::from_millis(250) {
            self.last = Instant::now();
            let mb = self.read as f64 / 1e6;
            match self.total {
                Some(t) if t > 0 => eprint!(
                    "\rreading {}: {:.0}% ({mb:.0} of {:.0} MB)",
                    self.name,
                    self.read as f64 * 100.0 / t as f64,
                    t as f64 / 1e6
                ),
                _ => eprint!("\rreading {}: {mb:.0} MB", self.name),
            }
        }
        Ok(n)
    }
}

/// What one pass over a recording leaves.
pub struct Read1 {
    pub gathered: Gathered,
    pub notes: ReadNotes,
    pub lost: BTreeMap<Stage, u64>,
    pub header: HeaderJson,
    pub groups: Groups,
    /// Connection traces per listener (`trace --connections` recordings).
    pub conns: ConnStats,
    /// Drops (from traces and `drop` lines) and retransmits (from the summary).
    pub drops: DropStats,
}

fn open(name: &str) -> Result<(Box<dyn Read>, Option<u64>)> {
    if name == "-" {
        return Ok((Box::new(std::io::stdin().lock()), None));
    }
    let f = File::open(name).map_err(|e| user(format!("cannot read {name}: {e}")))?;
    let len = f.metadata().ok().map(|m| m.len());
    Ok((Box::new(f), len))
}

/// Streams `name` through the statistics (and `sink`, when given).
/// Which traces a report keeps (`report --host --port --pid --comm --since --until`);
/// the default keeps all.
#[derive(Clone, Debug, Default)]
pub struct Select {
    pub hosts: Vec<std::net::IpAddr>,
    pub ports: Vec<u16>,
    /// The sending or the receiving process.
    pub pids: Vec<u32>,
    pub comm: Option<String>,
    /// Wall-clock bounds (ns since the epoch) on a trace's first stage; `Start(s)`: s
    /// seconds after the recording started.
    pub since: Option<When>,
    pub until: Option<When>,
}

/// A time for `--since`/`--until`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum When {
    Wall(u64),
    Start(f64),
}

impl When {
    /// `+S` (seconds after the recording started), `YYYY-MM-DDTHH:MM:SS[.f][Z]` (UTC), or
    /// seconds since the epoch.
    pub fn parse(s: &str) -> Result<When, String> {
        let bad = || {
            format!(
                "'{s}' is not a time: +SECONDS (after the recording started), YYYY-MM-DDTHH:MM:SS (UTC) or seconds since 1970"
            )
        };
        if let Some(rel) = s.strip_prefix('+') {
            return rel.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).map(When::Start).ok_or_else(bad);
        }
        if let Ok(secs) = s.parse::<f64>() {
            return (secs.is_finite() && secs >= 0.0).then_some(When::Wall((secs * 1e9) as u64)).ok_or_else(bad);
        }
        let t = s.trim_end_matches('Z');
        let (date, time) = t.split_once('T').or_else(|| t.split_once(' ')).ok_or_else(bad)?;
        let d: Vec<i64> = date.split('-').map(str::parse).collect::<Result<_, _>>().map_err(|_| bad())?;
        let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
        let h: Vec<i64> = hms.split(':').map(str::parse).collect::<Result<_, _>>().map_err(|_| bad())?;
        let [y, mo, day] = d[..] else { return Err(bad()) };
        let [hh, mm, ss] = h[..] else { return Err(bad()) };
        if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 || y < 1970 {
            return Err(bad());
        }
        let frac: f64 = format!("0.{frac}").parse().map_err(|_| bad())?;
        let secs = days_from_civil(y, mo, day) * 86_400 + hh * 3600 + mm * 60 + ss;
        Ok(When::Wall(secs as u64 * 1_000_000_000 + (frac * 1e9) as u64))
    }

    fn wall_ns(self, start_wall_ns: u64) -> u64 {
        match self {
            When::Wall(ns) => ns,
            When::Start(s) => start_wall_ns + (s * 1e9) as u64,
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Select {
    fn keeps(&self, t: &Trace, header: &HeaderJson) -> bool {
        let f = &t.flow;
        if !self.hosts.is_empty() && !self.hosts.iter().any(|h| *h == f.src_ip() || *h == f.dst_ip()) {
            return false;
        }
        if !self.ports.is_empty() && !self.ports.iter().any(|p| *p == f.sport || *p == f.dport) {
            return false;
        }
        if !self.pids.is_empty() && !self.pids.iter().any(|p| Some(*p) == t.pid || Some(*p) == t.rx_pid) {
            return false;
        }
        if let Some(c) = &self.comm
            && t.comm.as_ref() != Some(c)
            && t.rx_comm.as_ref() != Some(c)
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let first = t.stages.first().map_or(0, |s| s.t_ns);
            let wall = (first as i64).saturating_add(header.mono_to_wall_ns).max(0) as u64;
            if self.since.is_some_and(|w| wall < w.wall_ns(header.start_wall_ns))
                || self.until.is_some_and(|w| wall > w.wall_ns(header.start_wall_ns))
            {
                return false;
            }
        }
        true
    }
}

pub fn read(name: &str, only: Option<PathKind>, by: By, mut sink: Option<&mut dyn Sink>) -> Result<Read1> {
    read_selected(name, only, by, &Select::default(), sink.take())
}

/// `read`, keeping only the traces `select` keeps.
pub fn read_selected(
    name: &str,
    only: Option<PathKind>,
    by: By,
    select: &Select,
    mut sink: Option<&mut dyn Sink>,
) -> Result<Read1> {
    let (inner, total) = open(name)?;
    let show = std::io::stderr().is_terminal();
    let shown = if name == "-" { "stdin" } else { name };
    let progress = Progress { inner, read: 0, total, name: shown.to_string(), last: Instant::now(), show };
    let mut reader = Reader::new(BufReader::with_capacity(1 << 20, progress), shown)?;
    let mut gathered = Gathered::default();
    let mut groups = Groups { by, map: BTreeMap::new() };
    let mut lost = BTreeMap::new();
    let mut conns = ConnStats::default();
    let mut drops = DropStats::default();
    while let Some(line) = reader.next_line()? {
        match line {
            Line::Trace(t) => {
                if only.is_some_and(|p| p != t.path) || !select.keeps(&t, &reader.header) {
                    continue;
                }
                gathered.add(&t);
                groups.add(&t);
                if let Some(d) = &t.drop {
                    drops.record(d);
                }
                if let Some(s) = sink.as_deref_mut() {
                    s.trace(&t);
                }
            }
            Line::Drop(d) => drops.record(&d),
            Line::Summary(summary) => {
                for (p, n) in &summary.retransmits {
                    if let Ok(p) = p.parse::<u16>() {
                        *drops.retransmits.entry(p).or_default() += n;
                    }
                }
                for (k, n) in &summary.lost {
                    if let Some(s) = Stage::from_name(k) {
                        lost.insert(s, *n);
                    }
                }
            }
            Line::Connection(c) => {
                conns.record(&c);
                if let Some(s) = sink.as_deref_mut() {
                    s.connection(&c);
                }
            }
        }
    }
    if show {
        eprint!("\r\x1b[K");
    }
    Ok(Read1 { gathered, notes: std::mem::take(&mut reader.notes), lost, header: reader.header, groups, conns, drops })
}

pub fn report_notes(n: &ReadNotes) {
    for w in &n.warnings {
        eprintln!("warning: {}", crate::format::output::printable(w));
    }
    if n.skipped + n.unknown_type > n.warnings.len() as u64 {
        eprintln!("warning: {} lines skipped in all", n.skipped + n.unknown_type);
    }
}

/// The quantile's 95% interval from the histogram (rank ± 1.96 sd of a binomial).
fn interval(h: &Histogram<u64>, q: f64) -> (u64, u64) {
    let n = h.len() as f64;
    let sd = (n * q * (1.0 - q)).sqrt();
    let lo = ((n * q - 1.96 * sd) / n).clamp(0.0, 1.0);
    let hi = ((n * q + 1.96 * sd) / n).clamp(0.0, 1.0);
    (h.value_at_quantile(lo), h.value_at_quantile(hi))
}

/// "slower"/"faster" when the change is beyond noise: the 95% intervals of the quantile
/// do not overlap and the medians differ by more than 5%.
pub fn verdict(base: &Histogram<u64>, new: &Histogram<u64>, q: f64) -> &'static str {
    if base.len() < 20 || new.len() < 20 {
        return "";
    }
    let (b, n) = (base.value_at_quantile(q) as f64, new.value_at_quantile(q) as f64);
    let (bl, bh) = interval(base, q);
    let (nl, nh) = interval(new, q);
    let apart = nl > bh || nh < bl;
    if !apart || (n - b).abs() <= 0.05 * b {
        ""
    } else if n > b {
        "slower"
    } else {
        "faster"
    }
}

fn change(b: u64, n: u64) -> String {
    if b == 0 {
        return "-".into();
    }
    format!("{:+.1}%", (n as f64 - b as f64) * 100.0 / b as f64)
}

/// Per listener in both: handshake and accept-queue wait p50 and p99, baseline vs this,
/// change and verdict (as `compare`), and the overflows of each.
pub fn compare_connections(base: &ConnStats, new: &ConnStats) -> String {
    let header: Vec<String> =
        ["listener", "", "base p50 ms", "p50 ms", "change", "", "base p99 ms", "p99 ms", "change", ""]
            .iter()
            .map(std::string::ToString::to_string)
            .collect();
    let ms = |ns: u64| format!("{:.3}", ns as f64 / 1e6);
    let mut rows = Vec::new();
    let mut notes = String::new();
    for (addr, n) in &new.listeners {
        let Some(b) = base.listeners.get(addr) else {
            notes.push_str(&format!("{addr}: not in the baseline\n"));
            continue;
        };
        for (what, bh, nh) in
            [("handshake", &b.handshake, &n.handshake), ("accept wait", &b.accept_wait, &n.accept_wait)]
        {
            if bh.is_empty() || nh.is_empty() {
                continue;
            }
            let (b50, n50, b99, n99) = (
                bh.value_at_quantile(0.5),
                nh.value_at_quantile(0.5),
                bh.value_at_quantile(0.99),
                nh.value_at_quantile(0.99),
            );
            rows.push(vec![
                addr.to_string(),
                what.to_string(),
                ms(b50),
                ms(n50),
                change(b50, n50),
                verdict(bh, nh, 0.5).into(),
                ms(b99),
                ms(n99),
                change(b99, n99),
                verdict(bh, nh, 0.99).into(),
            ]);
        }
        notes.push_str(&format!(
            "{addr}: {} connections (baseline {}), overflows {} (baseline {}), other drops {} (baseline {})\n",
            n.connections(),
            b.connections(),
            n.overflows,
            b.overflows,
            n.other_drops,
            b.other_drops
        ));
    }
    let mut out = String::from("connection set-up:\n");
    if !rows.is_empty() {
        out.push_str(&tables::render(&header, &rows));
    }
    out.push_str(&notes);
    out
}

/// Drops per reason and last stage reached, baseline vs this (packets, and per 1000
/// data traces, which makes runs of different lengths comparable); retransmits per port.
pub fn compare_drops(base: &DropStats, base_traces: u64, new: &DropStats, new_traces: u64) -> String {
    let header: Vec<String> = ["reason", "after stage", "base packets", "packets", "base per 1k", "per 1k", "change"]
        .map(String::from)
        .to_vec();
    let per_k = |n: u64, t: u64| if t == 0 { "-".to_string() } else { format!("{:.2}", n as f64 * 1000.0 / t as f64) };
    let (b, n) = (base.by_reason_stage(), new.by_reason_stage());
    let keys: std::collections::BTreeSet<&(String, String)> = b.keys().chain(n.keys()).collect();
    let rows: Vec<Vec<String>> = keys
        .into_iter()
        .map(|k| {
            let (bn, nn) = (b.get(k).copied().unwrap_or(0), n.get(k).copied().unwrap_or(0));
            vec![
                k.0.clone(),
                k.1.clone(),
                bn.to_string(),
                nn.to_string(),
                per_k(bn, base_traces),
                per_k(nn, new_traces),
                change(bn, nn),
            ]
        })
        .collect();
    let mut out = String::from("drops:\n");
    if rows.is_empty() {
        out.push_str("none in either\n");
    } else {
        out.push_str(&tables::render(&header, &rows));
    }
    let ports: std::collections::BTreeSet<&u16> = base.retransmits.keys().chain(new.retransmits.keys()).collect();
    for p in ports {
        let (bn, nn) = (base.retransmits.get(p).copied().unwrap_or(0), new.retransmits.get(p).copied().unwrap_or(0));
        out.push_str(&format!("retransmits, port {p}: {nn} (baseline {bn})\n"));
    }
    out
}

/// Per path present in both: per stage p50 and p99, baseline vs this, change, verdict.
pub fn compare(base: &Stats, new: &Stats) -> String {
    let mut out = String::new();
    for (p, np) in &new.paths {
        let Some(bp) = base.paths.get(p) else {
            out.push_str(&format!("{} path: not in the baseline\n", p.name()));
            continue;
        };
        out.push_str(&format!("{} path: baseline {} traces, this {} traces\n", p.name(), bp.traces, np.traces));
        let header: Vec<String> =
            ["stage", "base p50 µs", "p50 µs", "change", "", "base p99 µs", "p99 µs", "change", ""]
                .iter()
                .map(std::string::ToString::to_string)
                .collect();
        let mut rows = Vec::new();
        let mut row = |name: &str, b: &Histogram<u64>, n: &Histogram<u64>| {
            if b.is_empty() || n.is_empty() {
                return;
            }
            let (b50, n50, b99, n99) = (
                b.value_at_quantile(0.5),
                n.value_at_quantile(0.5),
                b.value_at_quantile(0.99),
                n.value_at_quantile(0.99),
            );
            rows.push(vec![
                name.to_string(),
                us(b50),
                us(n50),
                change(b50, n50),
                verdict(b, n, 0.5).into(),
                us(b99),
                us(n99),
                change(b99, n99),
                verdict(b, n, 0.99).into(),
            ]);
        };
        for s in Stage::KERNEL_ORDER {
            if let (Some(b), Some(n)) = (bp.stages.get(&s), np.stages.get(&s)) {
                row(s.name(), b, n);
            }
        }
        row("end-to-end", &bp.e2e, &np.e2e);
        out.push_str(&tables::render(&header, &rows));
        out.push('\n');
    }
    out.push_str("(a change is marked when the 95% intervals of the percentile do not overlap and it exceeds 5%)\n");
    out
}

#[cfg(test)]
mod select_tests {
    use super::When;

    #[test]
    fn times_parse() {
        assert_eq!(When::parse("+30"), Ok(When::Start(30.0)));
        assert_eq!(When::parse("1700000000"), Ok(When::Wall(1_700_000_000_000_000_000)));
        assert_eq!(When::parse("2023-11-14T22:13:20Z"), Ok(When::Wall(1_700_000_000_000_000_000)));
        assert_eq!(When::parse("2026-12-05T10:00:00.5"), Ok(When::Wall(1_796_464_800_500_000_000)));
        assert!(When::parse("yesterday").is_err());
        assert!(When::parse("2026-13-01T00:00:00").is_err());
    }
}
