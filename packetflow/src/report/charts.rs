//! Pictures of a recording: SVG charts and one self-contained HTML page (no scripts, no
//! network fetches, works offline).
//!
//! * `percentiles` — per stage and path, a bar from p50 to p99 with a tick at p90, on a
//!   log scale: where the time goes, loopback and NIC side by side.
//! * `waterfall` — one packet's stages on a time axis (the median packet and the p99
//!   packet by end-to-end latency, per path).
//! * `timeline` — end-to-end p50 and p99 over the recording's time, per path.
//!
//! The accumulators here are bounded: a reservoir of traces for the waterfalls and a
//! fixed number of time buckets (merged pairwise as the recording grows).

use std::{collections::BTreeMap, fmt::Write as _};

use packetflow_common::Stage;

use crate::{
    model::stats::{self, Stats},
    model::trace::{PathKind, Trace, TraceKind},
    report::tables,
};

const RESERVOIR: usize = 4096;
const TIME_BUCKETS: usize = 256;
const LOG_BINS: usize = 4 * 40;

fn color(p: PathKind) -> &'static str {
    match p {
        PathKind::Loopback => "#1f77b4",
        PathKind::Nic => "#e8710a",
    }
}

/// Latencies in log bins (4 per power of two of ns): small and mergeable.
#[derive(Clone)]
struct LogHist([u32; LOG_BINS]);

impl LogHist {
    fn bin(ns: u64) -> usize {
        let x = (ns.max(1) as f64).log2() * 4.0;
        (x as usize).min(LOG_BINS - 1)
    }
    fn add(&mut self, ns: u64) {
        self.0[Self::bin(ns)] += 1;
    }
    fn merge(&mut self, o: &LogHist) {
        for (a, b) in self.0.iter_mut().zip(o.0.iter()) {
            *a += b;
        }
    }
    fn count(&self) -> u64 {
        self.0.iter().map(|&c| u64::from(c)).sum()
    }
    /// The value at quantile `q` (the bin's upper edge).
    fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let want = (q * n as f64).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (i, &c) in self.0.iter().enumerate() {
            acc += u64::from(c);
            if acc >= want {
                return Some(2f64.powf((i + 1) as f64 / 4.0));
            }
        }
        None
    }
}

struct Timeline {
    width_ns: u64,
    buckets: Vec<LogHist>,
}

impl Timeline {
    fn new() -> Timeline {
        Timeline { width_ns: 1_000_000, buckets: Vec::new() }
    }
    /// `start`: the recording's first trace, shared by every path's timeline.
    fn add(&mut self, start: u64, t_ns: u64, latency: u64) {
        let mut i = (t_ns.saturating_sub(start) / self.width_ns) as usize;
        while i >= TIME_BUCKETS {
            // Halve the resolution: merge neighbours.
            let merged: Vec<LogHist> = self
                .buckets
                .chunks(2)
                .map(|c| {
                    let mut h = c[0].clone();
                    if let Some(b) = c.get(1) {
                        h.merge(b);
                    }
                    h
                })
                .collect();
            self.buckets = merged;
            self.width_ns *= 2;
            i = (t_ns.saturating_sub(start) / self.width_ns) as usize;
        }
        while self.buckets.len() <= i {
            self.buckets.push(LogHist([0; LOG_BINS]));
        }
        self.buckets[i].add(latency);
    }
}

/// Everything the pictures need, gathered while streaming traces.
pub struct Gathered {
    pub stats: Stats,
    reservoir: BTreeMap<PathKind, Vec<Trace>>,
    seen: BTreeMap<PathKind, u64>,
    timelines: BTreeMap<PathKind, Timeline>,
    start: Option<u64>,
    rng: u64,
}

impl Default for Gathered {
    fn default() -> Self {
        Gathered {
            stats: Stats::default(),
            reservoir: BTreeMap::new(),
            seen: BTreeMap::new(),
            timelines: BTreeMap::new(),
            start: None,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }
}

impl Gathered {
    pub fn add(&mut self, t: &Trace) {
        self.stats.record(t);
        if t.kind != TraceKind::Data || t.stages.is_empty() {
            return;
        }
        let e2e = stats::end_to_end_ns(t);
        let t0 = t.stages[0].t_ns;
        let start = *self.start.get_or_insert(t0);
        self.timelines.entry(t.path).or_insert_with(Timeline::new).add(start, t0, e2e);
        let seen = self.seen.entry(t.path).or_default();
        *seen += 1;
        let r = self.reservoir.entry(t.path).or_default();
        if r.len() < RESERVOIR {
            r.push(t.clone());
        } else {
            // Reservoir sampling (xorshift): every trace has the same chance to stay.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let j = (self.rng % *seen) as usize;
            if j < RESERVOIR {
                r[j] = t.clone();
            }
        }
    }

    /// The sampled trace whose end-to-end latency is nearest the path's quantile `q`.
    pub fn packet_at(&self, path: PathKind, q: f64) -> Option<&Trace> {
        let target = self.stats.paths.get(&path)?.e2e.value_at_quantile(q);
        self.reservoir.get(&path)?.iter().min_by_key(|t| stats::end_to_end_ns(t).abs_diff(target))
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn svg_open(w: u32, h: u32, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        esc(title)
    )
}

/// Per stage and path: p50–p99 bars with a p90 tick, log scale in µs.
pub fn percentiles(stats: &Stats) -> String {
    let paths: Vec<PathKind> = stats.paths.keys().copied().collect();
    let stages: Vec<Stage> = Stage::KERNEL_ORDER
        .into_iter()
        .filter(|s| stats.paths.values().any(|p| p.stages.get(s).is_some_and(|h| !h.is_empty())))
        .collect();
    let (left, right, top, row) = (130.0, 30.0, 50.0, 14.0 * paths.len().max(1) as f64 + 10.0);
    let width = 900.0;
    let height = top + row * (stages.len() + 1) as f64 + 50.0;
    let mut vals = vec![];
    for p in stats.paths.values() {
        for s in &stages {
            if let Some(h) = p.stages.get(s).filter(|h| !h.is_empty()) {
                vals.push(h.value_at_quantile(0.5) as f64);
                vals.push(h.value_at_quantile(0.99) as f64);
            }
        }
        if !p.e2e.is_empty() {
            vals.push(p.e2e.value_at_quantile(0.99) as f64);
        }
    }
    let lo = vals.iter().copied().fold(f64::MAX, f64::min).max(10.0).log10().floor();
    let hi = vals.iter().copied().fold(1.0, f64::max).log10().ceil().max(lo + 1.0);
    let x = |ns: f64| left + (ns.max(1.0).log10() - lo) / (hi - lo) * (width - left - right);
    let mut s = svg_open(width as u32, height as u32, "Latency per stage: p50 to p99 bar, p90 tick (log scale)");
    let bottom = height - 40.0;
    for e in (lo as i32)..=(hi as i32) {
        let ns = 10f64.powi(e);
        let xx = x(ns);
        let label = if ns >= 1000.0 { format!("{} µs", ns / 1000.0) } else { format!("{ns} ns") };
        let _ = writeln!(
            s,
            "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{bottom}\" stroke=\"#ddd\"/><text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{label}</text>",
            bottom + 16.0
        );
    }
    let mut rows: Vec<(String, Option<Stage>)> = stages.iter().map(|s| (s.name().to_string(), Some(*s))).collect();
    rows.push(("end-to-end".into(), None));
    for (i, (name, st)) in rows.iter().enumerate() {
        let y0 = top + row * i as f64;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{name}</text>",
            left - 8.0,
            y0 + row / 2.0 + 4.0
        );
        for (k, p) in paths.iter().enumerate() {
            let Some(ps) = stats.paths.get(p) else {
                continue;
            };
            let h = match st {
                Some(st) => match ps.stages.get(st) {
                    Some(h) if !h.is_empty() => h,
                    _ => continue,
                },
                None => &ps.e2e,
            };
            if h.is_empty() {
                continue;
            }
            let (p50, p90, p99) =
                (h.value_at_quantile(0.5) as f64, h.value_at_quantile(0.9) as f64, h.value_at_quantile(0.99) as f64);
            let y = y0 + 5.0 + 14.0 * k as f64;
            let _ = writeln!(
                s,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"10\" fill=\"{}\" opacity=\"0.75\"><title>{} {name}: p50 {} µs, p90 {} µs, p99 {} µs</title></rect><line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                x(p50),
                (x(p99) - x(p50)).max(2.0),
                color(*p),
                p.name(),
                tables::us(p50 as u64),
                tables::us(p90 as u64),
                tables::us(p99 as u64),
                x(p90),
                x(p90),
                y + 10.0
            );
        }
    }
    legend(&mut s, &paths, left, height - 12.0);
    s.push_str("</svg>\n");
    s
}

fn legend(s: &mut String, paths: &[PathKind], x0: f64, y: f64) {
    for (i, p) in paths.iter().enumerate() {
        let x = x0 + 130.0 * i as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{:.1}\" width=\"12\" height=\"10\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{y}\">{} path</text>",
            y - 9.0,
            color(*p),
            x + 16.0,
            p.name()
        );
    }
}

/// One packet's stages on a linear time axis (µs since its first stage).
pub fn waterfall(t: &Trace, title: &str) -> String {
    let (left, right, top, row) = (130.0, 30.0, 50.0, 18.0);
    let width = 900.0;
    let height = top + row * t.stages.len() as f64 + 50.0;
    let t0 = t.stages.first().map_or(0, |s| s.t_ns);
    let total = t.total_ns().max(1) as f64;
    let x = |ns: u64| left + ns.saturating_sub(t0) as f64 / total * (width - left - right);
    let mut s = svg_open(width as u32, height as u32, title);
    let bottom = height - 40.0;
    for k in 0..=4 {
        let ns = t0.saturating_add((total * f64::from(k) / 4.0) as u64);
        let xx = x(ns);
        let _ = writeln!(
            s,
            "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{bottom}\" stroke=\"#ddd\"/><text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{} µs</text>",
            bottom + 16.0,
            tables::us(ns.saturating_sub(t0))
        );
    }
    for (i, st) in t.stages.iter().enumerate() {
        let y = top + row * i as f64;
        let from = if i == 0 { st.t_ns } else { t.stages[i - 1].t_ns };
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"12\" fill=\"{}\"><title>{}: {} µs</title></rect>",
            left - 8.0,
            y + 11.0,
            st.stage.name(),
            x(from),
            y + 2.0,
            (x(st.t_ns) - x(from)).max(1.5),
            color(t.path),
            st.stage.name(),
            tables::us(st.t_ns.saturating_sub(from))
        );
    }
    s.push_str("</svg>\n");
    s
}

/// End-to-end p50 and p99 over time, per path (log scale).
pub fn timeline(g: &Gathered) -> String {
    let (left, right, top) = (70.0, 30.0, 50.0);
    let (width, height) = (900.0, 340.0);
    let bottom = height - 50.0;
    // Per path: (time, p50, p99) points.
    #[allow(clippy::type_complexity)]
    let mut pts: Vec<(PathKind, Vec<(f64, f64, f64)>)> = Vec::new();
    let mut max_t: f64 = 1e-3;
    let (mut lo, mut hi) = (f64::MAX, 1.0f64);
    for (p, tl) in &g.timelines {
        let mut v = Vec::new();
        for (i, b) in tl.buckets.iter().enumerate() {
            if let (Some(p50), Some(p99)) = (b.quantile(0.5), b.quantile(0.99)) {
                let t = (i as f64 + 0.5) * tl.width_ns as f64 / 1e9;
                max_t = max_t.max(t);
                lo = lo.min(p50);
                hi = hi.max(p99);
                v.push((t, p50, p99));
            }
        }
        pts.push((*p, v));
    }
    let lo = lo.max(10.0).log10().floor();
    let hi = hi.log10().ceil().max(lo + 1.0);
    let x = |t: f64| left + t / max_t * (width - left - right);
    let y = |ns: f64| bottom - (ns.max(1.0).log10() - lo) / (hi - lo) * (bottom - top);
    let mut s =
        svg_open(width as u32, height as u32, "End-to-end latency over the recording: p50 (solid) and p99 (dashed)");
    for e in (lo as i32)..=(hi as i32) {
        let ns = 10f64.powi(e);
        let label = if ns >= 1000.0 { format!("{} µs", ns / 1000.0) } else { format!("{ns} ns") };
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">{label}</text>",
            y(ns),
            width - right,
            y(ns),
            left - 6.0,
            y(ns) + 4.0
        );
    }
    for k in 0..=4 {
        let t = max_t * f64::from(k) / 4.0;
        let label = if max_t < 2.0 { format!("{:.0} ms", t * 1e3) } else { format!("{t:.1} s") };
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{label}</text>",
            x(t),
            bottom + 16.0
        );
    }
    for (p, v) in &pts {
        for (dash, idx) in [("", 1usize), (" stroke-dasharray=\"5,3\"", 2)] {
            let line: Vec<String> =
                v.iter().map(|pt| format!("{:.1},{:.1}", x(pt.0), y(if idx == 1 { pt.1 } else { pt.2 }))).collect();
            if line.len() == 1 {
                let (cx, cy) = line[0].split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(s, "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3\" fill=\"{}\"/>", color(*p));
            } else if !line.is_empty() {
                let _ = writeln!(
                    s,
                    "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
                    color(*p),
                    line.join(" ")
                );
            }
        }
    }
    let paths: Vec<PathKind> = pts.iter().map(|(p, _)| *p).collect();
    legend(&mut s, &paths, left, height - 12.0);
    s.push_str("</svg>\n");
    s
}

/// Every chart: (file stem, svg).
pub fn all(g: &Gathered) -> Vec<(String, String)> {
    let mut out = vec![("percentiles".to_string(), percentiles(&g.stats))];
    for p in g.stats.paths.keys() {
        for (q, name) in [(0.5, "median"), (0.99, "p99")] {
            if let Some(t) = g.packet_at(*p, q) {
                let title = format!(
                    "{} path: the {name} packet ({} µs end to end, {} bytes {})",
                    p.name(),
                    tables::us(stats::end_to_end_ns(t)),
                    t.len,
                    if t.flow.udp { "UDP" } else { "TCP" }
                );
                out.push((format!("waterfall-{}-{name}", p.name()), waterfall(t, &title)));
            }
        }
    }
    out.push(("timeline".to_string(), timeline(g)));
    out
}

/// One self-contained page: the tables and every chart, inline.
pub fn html(g: &Gathered, title: &str, tables: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>body{{font-family:sans-serif;margin:24px;color:#222}}pre{{background:#f6f6f6;padding:12px;overflow:auto}}.charts svg{{display:block;margin:16px 0;max-width:100%;height:auto;border:1px solid #eee}}.pair{{display:flex;flex-wrap:wrap;gap:16px}}.pair svg{{flex:1 1 440px}}</style></head>\n<body><h1>{t}</h1>\n<pre>{tables}</pre>\n<div class=\"charts\">\n",
        t = esc(title),
        tables = esc(tables)
    );
    let charts = all(g);
    let mut i = 0;
    while i < charts.len() {
        let (name, svg) = &charts[i];
        if name.starts_with("waterfall-") && name.ends_with("-median") {
            // The median and p99 packets of a path side by side.
            s.push_str("<div class=\"pair\">\n");
            s.push_str(svg);
            if let Some((n2, svg2)) = charts.get(i + 1)
                && n2.starts_with("waterfall-")
            {
                s.push_str(svg2);
                i += 1;
            }
            s.push_str("</div>\n");
        } else {
            s.push_str(svg);
        }
        i += 1;
    }
    s.push_str("</div>\n</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_histogram_quantiles() {
        let mut h = LogHist([0; LOG_BINS]);
        for v in 1..=1000u64 {
            h.add(v * 1000);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((400_000.0..700_000.0).contains(&p50), "{p50}");
        assert!(h.quantile(0.99).unwrap() >= 900_000.0);
    }

    #[test]
    fn timeline_stays_bounded() {
        let mut t = Timeline::new();
        for i in 0..100_000u64 {
            t.add(0, i * 10_000_000, 1000 + i);
        }
        assert!(t.buckets.len() <= TIME_BUCKETS);
        assert_eq!(t.buckets.iter().map(LogHist::count).sum::<u64>(), 100_000);
    }
}
