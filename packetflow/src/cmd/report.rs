//! `packetflow report`: the tables of a recording, a comparison with a baseline, and
//! Perfetto, HTML and SVG output (the work is in `report/`).

use std::{io::Write, path::PathBuf};

use anyhow::{Context, Result};

use crate::{
    error::user,
    format::{chrome::ChromeTrace, output},
    model::trace::PathKind,
    pipeline::session::Sink,
    report::{self, By, charts, tables},
};

/// Examples printed at the end of `report --help`.
pub const EXAMPLES: &str = "Examples:
  packetflow report run.json                        per-stage tables of a recording
  packetflow report after.json --baseline before.json   what changed, beyond noise
  packetflow report run.json --by flow --html run.html  per flow, and a page with charts
  packetflow report run.json --port 443 --since +60  one service, after the first minute";

/// Read a recording (--json output; `-` for stdin): tables, comparison, pictures.
#[derive(clap::Args)]
pub struct Args {
    /// The recording: NDJSON written by `trace --json` or `demo --json` (`-` for stdin).
    #[arg(value_name = "FILE")]
    pub file: String,
    /// Compare with this recording: p50/p99 per stage, changes beyond noise marked.
    #[arg(long, value_name = "OTHER")]
    pub baseline: Option<String>,
    /// Only traces of this path.
    #[arg(long, value_enum)]
    pub path: Option<PathKind>,
    /// Group the table per stage, per flow or per sending process.
    #[arg(long, value_enum, default_value = "stage")]
    pub by: By,
    /// Write a Chrome/Perfetto trace (open in ui.perfetto.dev).
    #[arg(long, value_name = "OUT.json")]
    pub chrome_trace: Option<String>,
    /// Write one self-contained HTML page with the tables and charts.
    #[arg(long, value_name = "OUT.html")]
    pub html: Option<String>,
    /// Write the charts as SVG files into DIR.
    #[arg(long, value_name = "DIR")]
    pub svg: Option<PathBuf>,
    /// Only traces with this address on either end (repeatable).
    #[arg(long = "host", value_name = "ADDR")]
    pub hosts: Vec<std::net::IpAddr>,
    /// Only traces with this port on either end (repeatable).
    #[arg(long = "port", value_name = "P")]
    pub ports: Vec<u16>,
    /// Only traces this process sent or received (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only traces a process of this name sent or received.
    #[arg(long, value_name = "NAME")]
    pub comm: Option<String>,
    /// Only traces from this time on: +SECONDS after the recording started,
    /// YYYY-MM-DDTHH:MM:SS (UTC) or seconds since 1970.
    #[arg(long, value_name = "TIME", value_parser = report::When::parse)]
    pub since: Option<report::When>,
    /// Only traces up to this time (as --since).
    #[arg(long, value_name = "TIME", value_parser = report::When::parse)]
    pub until: Option<report::When>,
}

pub fn run(a: Args) -> Result<()> {
    let mut chrome = match &a.chrome_trace {
        Some(p) => Some(ChromeTrace::new(output::writer(p)?)),
        None => None,
    };
    let select = report::Select {
        hosts: a.hosts.clone(),
        ports: a.ports.clone(),
        pids: a.pids.clone(),
        comm: a.comm.clone(),
        since: a.since,
        until: a.until,
    };
    let r = report::read_selected(&a.file, a.path, a.by, &select, chrome.as_mut().map(|c| c as &mut dyn Sink))?;
    report::report_notes(&r.notes);
    if let Some(c) = chrome.as_mut() {
        c.finish(&serde_json::Value::Null);
        if c.errors > 0 {
            return Err(user(format!("writing {} failed", a.chrome_trace.as_deref().unwrap_or(""))));
        }
    }
    let stats = &r.gathered.stats;
    let mut text = String::new();
    match a.by {
        By::Stage => {
            if stats.paths.is_empty() {
                // A connections-only recording has its table below.
                if r.conns.listeners.is_empty() {
                    text.push_str("no data-packet traces in the recording\n");
                }
            } else {
                text.push_str(&tables::side_by_side(stats));
                text.push('\n');
                text.push_str(&tables::path_tables(stats, &r.lost));
            }
        }
        By::Flow | By::Pid => text.push_str(&r.groups.table()),
    }
    if !r.conns.listeners.is_empty() {
        text.push_str(&format!("\nconnection set-up per listener:\n{}", tables::connection_table(&r.conns)));
    }
    if !r.drops.is_empty() {
        text.push_str(&tables::drop_table(&r.drops));
    }
    print!("{text}");
    if let Some(b) = &a.baseline {
        let base = report::read_selected(b, a.path, By::Stage, &select, None)?;
        report::report_notes(&base.notes);
        println!("\ncompared with the baseline {b}:");
        print!("{}", report::compare(&base.gathered.stats, stats));
        if !r.conns.listeners.is_empty() || !base.conns.listeners.is_empty() {
            print!("{}", report::compare_connections(&base.conns, &r.conns));
        }
        if !r.drops.is_empty() || !base.drops.is_empty() {
            let traces = |s: &crate::model::stats::Stats| s.paths.values().map(|p| p.traces).sum::<u64>();
            print!("{}", report::compare_drops(&base.drops, traces(&base.gathered.stats), &r.drops, traces(stats)));
        }
    }
    if let Some(dir) = &a.svg {
        output::ensure_dir(dir, "--svg directory")?;
        for (name, svg) in charts::all(&r.gathered) {
            let p = dir.join(format!("{name}.svg"));
            output::create(&p)?
                .write_all(svg.as_bytes())
                .map_err(|e| user(format!("cannot write {}: {e}", p.display())))?;
        }
    }
    if let Some(p) = &a.html {
        let title = format!("packetflow report: {}", if a.file == "-" { "stdin" } else { &a.file });
        let page = charts::html(&r.gathered, &title, &text);
        let mut f = output::create(std::path::Path::new(p))?;
        f.write_all(page.as_bytes()).with_context(|| format!("writing {p}"))?;
    }
    Ok(())
}
