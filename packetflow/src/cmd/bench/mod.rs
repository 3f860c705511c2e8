//! `packetflow bench` (run by `cargo xtask bench`): what tracing costs, measured with
//! tools nobody here wrote (sockperf, iperf3, tcpdump), side by side in one run, and
//! written to BENCHMARKS.md.
//!
//! Every comparison interleaves its modes round by round (off, then the traced modes) and
//! reports medians over the rounds, so a noisy machine shifts them all alike.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use packetflow_common::{Stage, counters};

mod capture;
mod cost;
mod latency;
mod tools;

use capture::capture_rate;
use cost::{event_rate, hook_cost, stage_cost};
use latency::{latency, throughput};
use tools::{CLIENT_CPU, Peer, SERVER_CPU, pin, ping_pong, show, sockperf_server, sockperf_tp};

use crate::{
    model::filter::FilterSpec,
    pipeline::run::{self, RunOptions, Running, StatsSampling},
    platform,
    platform::process::Proc,
    platform::testhosts::{self, TestHosts},
};

/// Measure tracing overhead with sockperf, iperf3 and tcpdump (run by `cargo xtask bench`).
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Where to write the markdown report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// One short round per measurement (to check the benchmark itself).
    #[arg(long)]
    pub quick: bool,
    /// Only these sections (latency, stages, throughput, hooks, events, capture), printed
    /// and not written to --out: for iterating on one number.
    #[arg(long, value_delimiter = ',', value_name = "SECTION,...")]
    pub only: Vec<String>,
}

const SECTIONS: [&str; 6] = ["latency", "stages", "throughput", "hooks", "events", "capture"];

struct Cfg {
    rounds: usize,
    secs: u32,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The traced modes compared with "off".
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    Off,
    /// Every hook attached, every program returning at once: what the attachments cost
    /// before packetflow does any work (the floor under the other modes).
    Idle,
    Summary,
    /// Summary mode with the kernel's run statistics on, as in `trace` and in the
    /// daemon's sampling second (`cost_sample_secs`); the other modes have them off.
    SummaryStats,
    Full,
    NoMatch,
    /// Not packetflow: the bpftrace script `Peer::SCRIPT`, a quick tracer's cost.
    Peer,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Idle => "hooks attached, programs idle",
            Mode::Summary => "summary",
            Mode::SummaryStats => "summary, run statistics on",
            Mode::Full => "full",
            Mode::NoMatch => "full, filter matches nothing",
            Mode::Peer => "peer: bpftrace, 3 tracepoints, 2 intervals",
        }
    }
    fn filter(self, port: u16) -> FilterSpec {
        match self {
            Mode::Summary | Mode::SummaryStats => {
                FilterSpec { ports: vec![port], summary: true, no_records: true, ..Default::default() }
            }
            Mode::NoMatch => FilterSpec { ports: vec![port.wrapping_add(7)], ..Default::default() },
            _ => FilterSpec { ports: vec![port], ..Default::default() },
        }
    }
}

struct Paths {
    hosts: TestHosts,
}

/// Where a path's server runs and its client connects from: (server netns, client netns,
/// server address, interfaces to attach to).
#[allow(clippy::type_complexity)]
fn endpoints(
    path: &str,
    p: &Paths,
) -> (Option<PathBuf>, Option<PathBuf>, &'static str, Vec<(Option<PathBuf>, String)>) {
    if path == "loopback" {
        (None, None, "127.0.0.1", vec![(None, "lo".to_string())])
    } else {
        (
            Some(p.hosts.path_b()),
            Some(p.hosts.path_a()),
            testhosts::ADDR_B,
            vec![(Some(p.hosts.path_a()), p.hosts.veth_a.clone()), (Some(p.hosts.path_b()), p.hosts.veth_b.clone())],
        )
    }
}

/// A tracer for `mode`, with the kernel's run statistics off unless the mode asks for
/// them (they cost every program run two clock reads; the daemon samples them).
async fn start_tracer(interfaces: Vec<(Option<PathBuf>, String)>, mode: Mode, port: u16) -> Result<Running> {
    Running::start(RunOptions {
        filter: mode.filter(port),
        interfaces,
        idle: mode == Mode::Idle,
        run_stats: if mode == Mode::SummaryStats { StatsSampling::Always } else { StatsSampling::Never },
        ..Default::default()
    })
    .await
}

/// Asks the kernel for zero CPU wake-up latency (PM QoS) for as long as the file stays open.
fn hold_cpu_latency_zero() -> std::io::Result<std::fs::File> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open("/dev/cpu_dma_latency")?;
    f.write_all(&0i32.to_ne_bytes())?;
    Ok(f)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub async fn run(a: BenchArgs) -> Result<()> {
    run::preflight("bench")?;
    for tool in ["sockperf", "iperf3", "tcpdump", "bpftrace", "ethtool"] {
        if Command::new(tool).arg("--version").output().is_err() {
            crate::user_bail!("the benchmark needs {tool} (cargo xtask bench installs it)");
        }
    }
    if let Some(bad) = a.only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
        crate::user_bail!("unknown bench section {bad:?} (sections: {})", SECTIONS.join(", "));
    }
    let want = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
    let c = if a.quick { Cfg { rounds: 1, secs: 1 } } else { Cfg { rounds: 5, secs: 2 } };
    let paths = Paths { hosts: TestHosts::new("pfbench")? };
    let start = Instant::now();
    let mut md = String::new();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let _ = writeln!(md, "# packetflow benchmarks\n");
    let _ = writeln!(
        md,
        "Run: {date}; kernel {}; CPU {} ({} cores); packetflow {} (release build); {} round(s) of {} s per measurement, medians.",
        platform::host::kernel_release(),
        cpu_model(),
        platform::host::possible_cpus().len(),
        env!("CARGO_PKG_VERSION"),
        c.rounds,
        c.secs
    );
    // Idle CPUs poll instead of halting for the whole run. In a KVM guest with haltpoll
    // idle (this project's machine) a wake-up from a halt costs ~50 µs and the poll window
    // adapts to the load, so untraced ping-pong came out at 5 µs one run and 51 µs the
    // next, and any extra CPU work (a tracer's reader) looked like a speed-up.
    let qos = hold_cpu_latency_zero();
    let _ = writeln!(
        md,
        "CPU idle: {}.",
        match &qos {
            Ok(_) => "/dev/cpu_dma_latency held at 0 for the run (idle CPUs poll, no halt/wake-up latency)".to_string(),
            Err(e) => format!("not pinned ({e}): latencies include CPU wake-ups"),
        }
    );
    let _ = writeln!(
        md,
        "Request/response and bulk loads: server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU} (sched_setaffinity), in every mode."
    );
    let mut log = Vec::new();
    if want("latency") {
        latency(&c, &paths, &mut md, &mut log).await?;
    }
    if want("stages") {
        stage_cost(&c, &mut md, &mut log).await?;
    }
    if want("throughput") {
        throughput(&c, &mut md, &mut log).await?;
    }
    if want("hooks") {
        hook_cost(&c, &mut md, &mut log).await?;
    }
    if want("events") {
        event_rate(&c, &mut md, &mut log).await?;
    }
    if want("capture") {
        capture_rate(&c, &paths, &mut md, &mut log).await?;
    }
    let _ = writeln!(
        md,
        "\n## Commands\n\nProduced by `cargo xtask bench` ({:.0} s). The loads it ran:\n",
        start.elapsed().as_secs_f64()
    );
    for l in &log {
        let _ = writeln!(md, "    {l}");
    }
    print!("{md}");
    if a.only.is_empty() {
        std::fs::write(&a.out, &md).with_context(|| format!("writing {}", a.out.display()))?;
        eprintln!("wrote {}", a.out.display());
    }
    Ok(())
}
