//! Text tables: the per-stage tables `trace`, `demo`, `daemon` and `report` print.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use packetflow_common::Stage;

use crate::{
    model::connection::{ConnStats, Outcome},
    model::drops::DropStats,
    model::stats::{PERCENTILES, PathStats, Stats},
    model::trace::PathKind,
};

pub fn us(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1000.0)
}

/// One summary row: count, percentiles and max, in µs.
pub fn row(h: &Histogram<u64>) -> Vec<String> {
    let mut v = vec![h.len().to_string()];
    if h.is_empty() {
        v.extend(std::iter::repeat_n("-".to_string(), PERCENTILES.len() + 1));
        v[0] = "(first)".into();
        return v;
    }
    for (p, _) in PERCENTILES {
        v.push(us(h.value_at_percentile(p)));
    }
    v.push(us(h.max()));
    v
}

fn numeric(c: &str) -> bool {
    matches!(c, "-" | "(first)" | "missing") || c.parse::<f64>().is_ok()
}

/// Renders rows as an aligned text table: numbers right-aligned, text left-aligned.
pub fn render(header: &[String], rows: &[Vec<String>]) -> String {
    let n = header.len();
    let mut w = vec![0; n];
    for r in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        for (i, c) in r.iter().enumerate().take(n) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    for (k, r) in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)).enumerate() {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .take(n)
            .map(|(i, c)| if i > 0 && numeric(c) { format!("{c:>w$}", w = w[i]) } else { format!("{c:<w$}", w = w[i]) })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if k == 0 {
            out.push_str(&"-".repeat(w.iter().sum::<usize>() + 2 * (n - 1)));
            out.push('\n');
        }
    }
    out
}

/// The per-stage table of one path (live view and final summary).
pub fn path_table(p: &PathStats, lost: &BTreeMap<Stage, u64>) -> String {
    let mut header: Vec<String> = vec!["stage".into(), "count".into()];
    header.extend(PERCENTILES.iter().map(|(_, n)| format!("{n} µs")));
    header.push("max µs".into());
    header.push("lost".into());
    let mut rows = Vec::new();
    for s in Stage::KERNEL_ORDER {
        let Some(h) = p.stages.get(&s) else { continue };
        let mut r = vec![s.name().to_string()];
        r.extend(row(h));
        r.push(lost.get(&s).copied().unwrap_or(0).to_string());
        rows.push(r);
    }
    let mut r = vec!["end-to-end".to_string()];
    r.extend(row(&p.e2e));
    r.push(String::new());
    rows.push(r);
    render(&header, &rows)
}

/// Per stage, p50 and p99 on each path side by side, then end-to-end: the demo's table,
/// and `report`'s first table.
pub fn side_by_side(stats: &Stats) -> String {
    let paths = [PathKind::Loopback, PathKind::Nic];
    let mut header = vec!["stage".to_string()];
    for p in paths {
        header.push(format!("{} p50 µs", p.name()));
        header.push(format!("{} p99 µs", p.name()));
    }
    let cell = |p: PathKind, s: Option<Stage>, pct: f64| -> String {
        let Some(ps) = stats.paths.get(&p) else {
            return "-".into();
        };
        let h = match s {
            Some(s) => match ps.stages.get(&s) {
                Some(h) => h,
                None => return "missing".into(),
            },
            None => &ps.e2e,
        };
        if h.is_empty() { "(first)".into() } else { us(h.value_at_percentile(pct)) }
    };
    let mut rows = Vec::new();
    for s in Stage::KERNEL_ORDER {
        // No row for a stage no path has: not asked for (`--stages`), or an IP-layer stage
        // where kprobes do not work (a stage this kernel cannot serve is reported at start).
        if !stats.paths.values().any(|ps| ps.stages.contains_key(&s)) {
            continue;
        }
        let mut r = vec![s.name().to_string()];
        for p in paths {
            r.push(cell(p, Some(s), 50.0));
            r.push(cell(p, Some(s), 99.0));
        }
        rows.push(r);
    }
    let mut r = vec!["end-to-end".to_string()];
    for p in paths {
        r.push(cell(p, None, 50.0));
        r.push(cell(p, None, 99.0));
    }
    rows.push(r);
    let mut out = String::from("Communication analysis (measured): where the time went, per stage\n");
    out.push_str("(each stage: time since the stage before it in the same packet's trace; on lo, XDP runs\n in generic mode after netif_receive, so its row there is the time since netif_receive)\n\n");
    out.push_str(&render(&header, &rows));
    out
}

/// The per-path tables, as printed live and at the end.
pub fn path_tables(stats: &Stats, lost: &BTreeMap<Stage, u64>) -> String {
    if stats.paths.is_empty() {
        return "no packet traces yet\n".into();
    }
    let mut out = String::new();
    for (p, ps) in &stats.paths {
        out.push_str(&format!("{} path: {} traces ({} complete)\n", p.name(), ps.traces, ps.complete));
        out.push_str(&path_table(ps, lost));
        out.push('\n');
    }
    for (k, n) in &stats.other_kinds {
        out.push_str(&format!("{n} {k} traces (not in the statistics)\n"));
    }
    out
}

/// Milliseconds with three decimals (connection set-up spans µs to seconds).
fn ms(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

/// Connection establishment per listener (`trace --connections`, `demo --connections`):
/// outcomes, handshake and accept-queue wait (ms), the highest queue lengths seen, and
/// the drops and retransmissions set-up took.
pub fn connection_table(c: &ConnStats) -> String {
    let header: Vec<String> = [
        "listener",
        "conns",
        "accepted",
        "refused",
        "other",
        "handshake p50 ms",
        "p99",
        "accept wait p50 ms",
        "p99",
        "accept queue max/limit",
        "SYN queue max",
        "overflows",
        "other drops",
        "SYN rtx",
        "SYN-ACK rtx",
        "cookies",
    ]
    .map(String::from)
    .to_vec();
    let pct = |h: &Histogram<u64>, p: f64| if h.is_empty() { "-".to_string() } else { ms(h.value_at_percentile(p)) };
    let rows: Vec<Vec<String>> = c
        .listeners
        .iter()
        .map(|(addr, l)| {
            let n = |o: Outcome| l.outcomes.get(&o).copied().unwrap_or(0);
            let other = l.connections() - n(Outcome::Accepted) - n(Outcome::Refused);
            vec![
                addr.to_string(),
                l.connections().to_string(),
                n(Outcome::Accepted).to_string(),
                n(Outcome::Refused).to_string(),
                other.to_string(),
                pct(&l.handshake, 50.0),
                pct(&l.handshake, 99.0),
                pct(&l.accept_wait, 50.0),
                pct(&l.accept_wait, 99.0),
                if l.limit == 0 && l.max_accept == 0 { "-".into() } else { format!("{}/{}", l.max_accept, l.limit) },
                l.max_syn.to_string(),
                l.overflows.to_string(),
                l.other_drops.to_string(),
                l.syn_retransmits.to_string(),
                l.synack_retransmits.to_string(),
                l.cookies.to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "connections: none seen\n".into();
    }
    let mut out = render(&header, &rows);
    let others: BTreeMap<&str, u64> = c
        .listeners
        .values()
        .flat_map(|l| l.outcomes.iter())
        .filter(|(o, _)| !matches!(o, Outcome::Accepted | Outcome::Refused))
        .fold(BTreeMap::new(), |mut m, (o, n)| {
            *m.entry(o.name()).or_default() += n;
            m
        });
    if !others.is_empty() {
        let list: Vec<String> = others.iter().map(|(o, n)| format!("{n} {o}")).collect();
        out.push_str(&format!("other: {}\n", list.join(", ")));
    }
    if c.strays > 0 {
        out.push_str(&format!(
            "{} segments reached a listener outside any handshake (late ACKs of closed connections): not counted\n",
            c.strays
        ));
    }
    out
}

/// Drops by reason, the last stage their packets reached and where the kernel dropped
/// them, most first; then retransmits by port.
pub fn drop_table(d: &DropStats) -> String {
    if d.is_empty() {
        return "drops: none seen\n".into();
    }
    let mut out = String::new();
    if !d.drops.is_empty() {
        let header: Vec<String> = ["reason", "after stage", "location", "packets"].map(String::from).to_vec();
        let mut rows: Vec<(&(String, String, String), &u64)> = d.drops.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let rows: Vec<Vec<String>> =
            rows.into_iter().map(|((r, s, l), n)| vec![r.clone(), s.clone(), l.clone(), n.to_string()]).collect();
        out.push_str(&format!("drops ({} packets):\n", d.total()));
        out.push_str(&render(&header, &rows));
    }
    if !d.retransmits.is_empty() {
        let list: Vec<String> = d.retransmits.iter().map(|(p, n)| format!("port {p}: {n}")).collect();
        out.push_str(&format!("retransmits: {}\n", list.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_aligned() {
        let t = render(&["a".into(), "bb".into()], &[vec!["xxx".into(), "1".into()]]);
        assert_eq!(t, "a    bb\n-------\nxxx   1\n");
    }
}
