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
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use packetflow_common::{Stage, counters};

use crate::{
    model::filter::FilterSpec,
    pipeline::run::{self, RunOptions, Running, StatsSampling},
    platform,
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

/// A child killed on drop.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cmd_in(ns: Option<&Path>, program: &str) -> Command {
    match ns {
        Some(p) => testhosts::netns_command(p, program),
        None => Command::new(program),
    }
}

/// The CPUs the server and the client of a request/response load run on: two different
/// ones, the same in every mode. Left to the scheduler, the two landed on one CPU in some
/// runs and on two in others (with a tracer's threads busy or not), and that placement,
/// not the tracing, decided the latency.
const SERVER_CPU: usize = 1;
const CLIENT_CPU: usize = 0;

/// Runs `c` on `cpu` only (when the machine has it).
fn pin(c: &mut Command, cpu: usize) -> &mut Command {
    use std::os::unix::process::CommandExt;
    if cpu < platform::host::possible_cpus().len() {
        // SAFETY: the pre_exec closure runs in the forked child before exec and calls only
        // async-signal-safe functions (sched_setaffinity) on a zeroed cpu_set_t it owns.
        unsafe {
            c.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    c
}

fn show(c: &Command) -> String {
    std::iter::once(c.get_program().to_string_lossy().into_owned())
        .chain(c.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
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

/// sockperf's percentile lines: "---> percentile 50.000 =   24.957".
fn sockperf_percentile(out: &str, p: &str) -> Option<f64> {
    out.lines()
        .find(|l| l.contains(&format!("percentile {p} =")))
        .and_then(|l| l.rsplit('=').next()?.trim().parse().ok())
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

fn sockperf_server(ns: Option<&Path>, addr: &str, port: u16, tcp: bool) -> Result<Kid> {
    let mut c = cmd_in(ns, "sockperf");
    pin(&mut c, SERVER_CPU).args(["server", "-i", addr, "-p", &port.to_string()]);
    if tcp {
        c.arg("--tcp");
    }
    let k = Kid(c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("sockperf (Debian package sockperf)")?);
    std::thread::sleep(Duration::from_millis(300));
    Ok(k)
}

/// sockperf's message counts: "[Total Run] RunTime=2.100 sec; Warm up time=400 msec;
/// SentMessages=150001; ReceivedMessages=150000": one-way messages, both directions.
fn sockperf_messages(out: &str) -> Option<u64> {
    let line = out.lines().find(|l| l.contains("[Total Run]"))?;
    let n = |key: &str| -> Option<u64> {
        let rest = line.split(key).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    Some(n("SentMessages=")? + n("ReceivedMessages=")?)
}

/// One sockperf ping-pong run: (p50, p99) one-way latency in µs, and the one-way
/// messages it exchanged.
fn ping_pong(
    ns: Option<&Path>,
    addr: &str,
    port: u16,
    tcp: bool,
    secs: u32,
    log: &mut Vec<String>,
) -> Result<(f64, f64, u64)> {
    let mut c = cmd_in(ns, "sockperf");
    pin(&mut c, CLIENT_CPU).args([
        "ping-pong",
        "-i",
        addr,
        "-p",
        &port.to_string(),
        "-m",
        "64",
        "-t",
        &secs.to_string(),
    ]);
    if tcp {
        c.arg("--tcp");
    }
    let line = show(&c);
    if !log.contains(&line) {
        log.push(line);
    }
    let o = c.output()?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    match (sockperf_percentile(&out, "50.000"), sockperf_percentile(&out, "99.000")) {
        (Some(a), Some(b)) => Ok((a, b, sockperf_messages(&out).unwrap_or(0))),
        _ => bail!("sockperf ping-pong gave no percentiles: {}", out.lines().last().unwrap_or_default()),
    }
}

/// The peer row: a bpftrace script anyone might write for two intervals (queue time,
/// transmit -> receive) on three tracepoints, skb-keyed maps, in-kernel histograms.
struct Peer(#[allow(dead_code)] Kid);

impl Peer {
    const SCRIPT: &str = "\
tracepoint:net:net_dev_queue { @q[args->skbaddr] = nsecs; }
tracepoint:net:net_dev_start_xmit /@q[args->skbaddr]/ {
  @queue_ns = hist(nsecs - @q[args->skbaddr]); delete(@q[args->skbaddr]); @x[args->skbaddr] = nsecs;
}
tracepoint:net:netif_receive_skb /@x[args->skbaddr]/ {
  @xmit_to_rcv_ns = hist(nsecs - @x[args->skbaddr]); delete(@x[args->skbaddr]);
}
";

    /// Starts the script and waits until its probes are attached.
    fn start(log: &mut Vec<String>) -> Result<Peer> {
        use std::io::{BufRead, BufReader};
        let path = std::env::temp_dir().join(format!("packetflow-bench-peer-{}.bt", std::process::id()));
        std::fs::write(&path, Self::SCRIPT)?;
        let mut c = Command::new("bpftrace");
        c.arg(&path);
        let line = format!("{} # {}", show(&c), Self::SCRIPT.replace('\n', " "));
        if !log.contains(&line) {
            log.push(line);
        }
        let mut kid = Kid(c
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("bpftrace (Debian package bpftrace)")?);
        let mut out = BufReader::new(kid.0.stdout.take().context("bpftrace stdout")?);
        let mut first = String::new();
        out.read_line(&mut first)?;
        if !first.starts_with("Attaching") {
            bail!("bpftrace did not attach its probes: {first:?}");
        }
        // Its output is read by nobody from here: the maps print only at exit.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        std::thread::sleep(Duration::from_millis(300));
        Ok(Peer(kid))
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

/// sockperf ping-pong p50/p99 per path, protocol and mode.
async fn latency(c: &Cfg, paths: &Paths, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    md.push_str("\n## Request/response latency (sockperf ping-pong, 64 B, one-way µs)\n\n");
    md.push_str(
        "| path | proto | mode | p50 µs | p99 µs | p50 overhead | p99 overhead |\n|---|---|---|---|---|---|---|\n",
    );
    let modes = [Mode::Off, Mode::Peer, Mode::Idle, Mode::Summary, Mode::SummaryStats, Mode::Full, Mode::NoMatch];
    let mut port = 41000u16;
    for path in ["loopback", "nic"] {
        for tcp in [true, false] {
            port += 10;
            let (srv_ns, cli_ns, addr, ifaces) = endpoints(path, paths);
            let _srv = sockperf_server(srv_ns.as_deref(), addr, port, tcp)?;
            let mut res: BTreeMap<Mode, Vec<(f64, f64)>> = BTreeMap::new();
            let run = |log: &mut Vec<String>| {
                ping_pong(cli_ns.as_deref(), addr, port, tcp, c.secs, log).map(|(p50, p99, _)| (p50, p99))
            };
            for round in 0..c.rounds {
                eprintln!("latency: {path} {} round {}/{}", if tcp { "TCP" } else { "UDP" }, round + 1, c.rounds);
                res.entry(Mode::Off).or_default().push(run(log)?);
                let peer = Peer::start(log)?;
                res.entry(Mode::Peer).or_default().push(run(log)?);
                drop(peer);
                // Idle programs are a load of their own (the flag is frozen into them).
                let idle = start_tracer(ifaces.clone(), Mode::Idle, port).await?;
                res.entry(Mode::Idle).or_default().push(run(log)?);
                idle.finish().await?;
                // One tracer for the traced modes of a round; the filter switches the mode.
                // Their order turns round by round, so none is always the first after the
                // tracer starts.
                let mut running = start_tracer(ifaces.clone(), Mode::Full, port).await?;
                let mut traced = [Mode::Summary, Mode::Full, Mode::NoMatch];
                traced.rotate_left(round % 3);
                for m in traced {
                    running.tracer.set_filter(&m.filter(port).to_kernel(std::process::id())?)?;
                    res.entry(m).or_default().push(run(log)?);
                }
                running.finish().await?;
                let stats = start_tracer(ifaces.clone(), Mode::SummaryStats, port).await?;
                res.entry(Mode::SummaryStats).or_default().push(run(log)?);
                stats.finish().await?;
            }
            let off = res
                .get(&Mode::Off)
                .map(|v| (median(v.iter().map(|x| x.0).collect()), median(v.iter().map(|x| x.1).collect())));
            for m in modes {
                let v = &res[&m];
                let (p50, p99) = (median(v.iter().map(|x| x.0).collect()), median(v.iter().map(|x| x.1).collect()));
                let (o50, o99) = off.unwrap_or((p50, p99));
                let _ = writeln!(
                    md,
                    "| {path} | {} | {} | {p50:.2} | {p99:.2} | {:+.1}% | {:+.1}% |",
                    if tcp { "TCP" } else { "UDP" },
                    m.name(),
                    (p50 / o50 - 1.0) * 100.0,
                    (p99 / o99 - 1.0) * 100.0
                );
            }
        }
    }
    Ok(())
}

/// iperf3 over loopback: off vs full tracing, Gbit/s.
async fn throughput(c: &Cfg, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    md.push_str(
        "\n## Bulk throughput (iperf3, TCP over loopback)\n\n| mode | Gbit/s | ratio to off |\n|---|---|---|\n",
    );
    let port = 42000u16;
    let mut res: BTreeMap<Mode, Vec<f64>> = BTreeMap::new();
    for round in 0..c.rounds {
        eprintln!("throughput: round {}/{}", round + 1, c.rounds);
        for m in [Mode::Off, Mode::Idle, Mode::Full] {
            let running =
                if m == Mode::Off { None } else { Some(start_tracer(vec![(None, "lo".into())], m, port).await?) };
            let _srv = Kid(pin(&mut Command::new("iperf3"), SERVER_CPU)
                .args(["-s", "-1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("iperf3")?);
            std::thread::sleep(Duration::from_millis(300));
            let mut cl = Command::new("iperf3");
            pin(&mut cl, CLIENT_CPU).args([
                "-c",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                &c.secs.to_string(),
                "-J",
            ]);
            let line = show(&cl);
            if !log.contains(&line) {
                log.push(line);
            }
            let o = cl.output()?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).context("iperf3 -J output")?;
            let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 bits_per_second")?;
            res.entry(m).or_default().push(bps / 1e9);
            if let Some(r) = running {
                let f = r.finish().await?;
                if m == Mode::Full && f.lost.values().sum::<u64>() + f.overflow_records > 0 {
                    eprintln!(
                        "note: full tracing lost {} records during iperf3",
                        f.lost.values().sum::<u64>() + f.overflow_records
                    );
                }
            }
        }
    }
    let off = median(res[&Mode::Off].clone());
    for m in [Mode::Off, Mode::Idle, Mode::Full] {
        let g = median(res[&m].clone());
        let _ = writeln!(md, "| {} | {g:.2} | {:.3} |", m.name(), g / off);
    }
    Ok(())
}

/// Average ns per run of every attached program (kernel.bpf_stats) in full tracing,
/// summary mode, with a filter that matches nothing and idle, over a sockperf TCP
/// ping-pong on loopback; beside them an empty tp_btf program on net_dev_queue, which measures what
/// any program costs on this machine before it does anything.
async fn hook_cost(c: &Cfg, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    const MODES: [Mode; 4] = [Mode::Full, Mode::Summary, Mode::NoMatch, Mode::Idle];
    const EMPTY: &str = "pf_probe_tp_btf";
    let port = 43000u16;
    let _srv = sockperf_server(None, "127.0.0.1", port, true)?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling kernel BPF statistics")?;
    let snapshot = || -> BTreeMap<String, (u64, u64)> {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter_map(|p| {
                let name = p.name_as_str()?.to_string();
                name.starts_with("pf_").then(|| (name, (p.run_time().as_nanos() as u64, p.run_count())))
            })
            .fold(BTreeMap::new(), |mut m, (n, v)| {
                let e: &mut (u64, u64) = m.entry(n).or_default();
                e.0 += v.0;
                e.1 += v.1;
                m
            })
    };
    let mut table: BTreeMap<String, [(u64, u64); MODES.len()]> = BTreeMap::new();
    let mut full_rate = 0f64;
    for (i, m) in MODES.into_iter().enumerate() {
        eprintln!("hook cost: {}", m.name());
        let mut running = start_tracer(vec![(None, "lo".into())], m, port).await?;
        let btf = aya::Btf::from_sys_fs()?;
        let empty: &mut aya::programs::BtfTracePoint = running
            .tracer
            .ebpf_mut()
            .program_mut(EMPTY)
            .context("the empty program is missing from the object")?
            .try_into()?;
        empty.load("net_dev_queue", &btf)?;
        empty.attach()?;
        let before = snapshot();
        let c0 = running.tracer.counters()?;
        let t0 = Instant::now();
        ping_pong(None, "127.0.0.1", port, true, c.secs, log)?;
        let after = snapshot();
        let c1 = running.tracer.counters()?;
        if m == Mode::Full {
            let emitted: u64 = (0..Stage::ALL.len() as u32)
                .map(|s| c1[(counters::EMITTED + s) as usize] - c0[(counters::EMITTED + s) as usize])
                .sum();
            full_rate = emitted as f64 / t0.elapsed().as_secs_f64();
        }
        for (name, (t, n)) in after {
            let (t0, n0) = before.get(&name).copied().unwrap_or((0, 0));
            table.entry(name).or_default()[i] = (t - t0, n - n0);
        }
        running.finish().await?;
    }
    md.push_str(
        "\n## Cost per hook (kernel.bpf_stats: run_time_ns / run_cnt, during sockperf TCP ping-pong on loopback)\n\n",
    );
    md.push_str(
        "Programs run for every packet or call on the machine, traced or not; \"no match\" is the cost when\nthe filter rejects the packet; \"idle\" is the same programs loaded to return at once, and\n`pf_probe_tp_btf` an empty program on net_dev_queue: what a program costs here (entry, exit,\nthe statistics' own clock reads) before it does anything.\n\n",
    );
    md.push_str(
        "| program | runs (full) | avg ns (full) | avg ns (summary) | avg ns (no match) | avg ns (idle) |\n|---|---|---|---|---|---|\n",
    );
    let avg = |x: (u64, u64)| if x.1 == 0 { "-".to_string() } else { format!("{:.0}", x.0 as f64 / x.1 as f64) };
    let mut total = [(0u64, 0u64); MODES.len()];
    for (name, r) in &table {
        if r.iter().all(|x| x.1 == 0) {
            continue;
        }
        let cells: Vec<String> = r.iter().map(|x| avg(*x)).collect();
        let _ = writeln!(md, "| {name} | {} | {} |", r[0].1, cells.join(" | "));
        if name != EMPTY {
            for (t, x) in total.iter_mut().zip(r) {
                t.0 += x.0;
                t.1 += x.1;
            }
        }
    }
    let cells: Vec<String> = total.iter().map(|x| format!("**{}**", avg(*x))).collect();
    let _ = writeln!(md, "| **all hooks** | {} | {} |", total[0].1, cells.join(" | "));
    let _ = writeln!(md, "\nRecords written during the full run: {full_rate:.0}/s.");
    Ok(())
}

/// Cost against the stages attached (`--stages`): sockperf TCP ping-pong on loopback per
/// named stage set and per single stage: idle (the set's hooks attached, programs
/// returning at once: what attaching them costs), summary and full mode (one tracer per
/// set and round; the filter switches the mode), with the kernel time of every
/// packetflow program per one-way message (kernel.bpf_stats). Full mode needs dev_queue
/// in the set (`StageSet::check_joinable`): a single stage without it has no full cell.
async fn stage_cost(c: &Cfg, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    let sets: Vec<String> = ["all", "overview", "receive", "send", "socket"]
        .into_iter()
        .map(String::from)
        .chain(Stage::KERNEL_ORDER.iter().map(|s| s.name().to_string()))
        .collect();
    let port = 45000u16;
    let _srv = sockperf_server(None, "127.0.0.1", port, true)?;
    let filter = |summary: bool, stages| FilterSpec {
        ports: vec![port],
        summary,
        no_records: summary,
        stages,
        ..Default::default()
    };
    let kernel_ns = |r: &Running| -> u64 { r.tracer.program_costs().unwrap_or_default().iter().map(|p| p.ns).sum() };
    let mut off = Vec::new();
    // Per set and mode: p50s and ns per one-way message; programs that ran.
    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum M {
        Idle,
        Summary,
        Full,
    }
    let mut res: BTreeMap<(usize, M), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let mut programs = vec![0usize; sets.len()];
    let measure = |r: &Running, log: &mut Vec<String>| -> Result<(f64, f64)> {
        let ns0 = kernel_ns(r);
        let (p50, _, msgs) = ping_pong(None, "127.0.0.1", port, true, c.secs, log)?;
        Ok((p50, (kernel_ns(r) - ns0) as f64 / msgs.max(1) as f64))
    };
    // Single stages get at most 3 rounds: 14 of them at 5 rounds would double the bench.
    const NAMED: usize = 5;
    for round in 0..c.rounds {
        for (i, name) in sets.iter().enumerate() {
            if i >= NAMED && round >= 3 {
                continue;
            }
            eprintln!("stages: round {}/{}: {name}", round + 1, c.rounds);
            if i % 4 == 0 {
                off.push(ping_pong(None, "127.0.0.1", port, true, c.secs, log)?.0);
            }
            let set = crate::model::stage_set::StageSet::parse(name)?;
            let start = |idle: bool| {
                Running::start(RunOptions {
                    filter: filter(true, set),
                    interfaces: vec![(None, "lo".into())],
                    idle,
                    ..Default::default()
                })
            };
            // A stage served only by hooks this kernel lacks (kprobes) cannot start.
            let idle = match start(true).await {
                Ok(r) => r,
                Err(e) if i >= NAMED => {
                    eprintln!("stages: {name}: {e:#}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (p50, per) = measure(&idle, log)?;
            let e = res.entry((i, M::Idle)).or_default();
            e.0.push(p50);
            e.1.push(per);
            idle.finish().await?;
            let mut running = start(false).await?;
            let mut modes = if set.check_joinable().is_ok() { vec![M::Summary, M::Full] } else { vec![M::Summary] };
            let n = modes.len();
            modes.rotate_left(round % n);
            for m in modes {
                running.tracer.set_filter(&filter(m == M::Summary, set).to_kernel(std::process::id())?)?;
                let (p50, per) = measure(&running, log)?;
                let e = res.entry((i, m)).or_default();
                e.0.push(p50);
                e.1.push(per);
            }
            programs[i] = running.tracer.program_costs().map_or(0, |p| p.len());
            running.finish().await?;
        }
    }
    let off = median(off);
    md.push_str("\n## Cost against the stages attached (`--stages`; sockperf TCP ping-pong on loopback, 64 B)\n\n");
    md.push_str(
        "Idle: the set's hooks attached, every program returning at once (what attaching them costs).\nKernel ns per message: every packetflow program's run time (kernel.bpf_stats) over the run, per one-way\nmessage sockperf exchanged (requests and replies). Programs: those that ran. Full tracing joins a packet's\nrecords at dev_queue, so a set without it has no full cells. Single stages: at most 3 rounds. The kernel's run statistics are on throughout\n(the kernel ns columns need them; they add two clock reads to every program run, which the latency table\nabove leaves out).\n\n",
    );
    let _ = writeln!(md, "Untraced p50: {off:.2} µs.\n");
    md.push_str("| stages | programs | idle p50 overhead | summary p50 overhead | summary kernel ns / message | full p50 overhead | full kernel ns / message |\n|---|---|---|---|---|---|---|\n");
    for (i, name) in sets.iter().enumerate() {
        let cell = |m: M| match res.get(&(i, m)) {
            Some((p50s, per)) => {
                (format!("{:+.1}%", (median(p50s.clone()) / off - 1.0) * 100.0), format!("{:.0}", median(per.clone())))
            }
            None => ("–".to_string(), "–".to_string()),
        };
        let ((io, _), (so, sn), (fo, fne)) = (cell(M::Idle), cell(M::Summary), cell(M::Full));
        let _ = writeln!(md, "| {name} | {} | {io} | {so} | {sn} | {fo} | {fne} |", programs[i]);
    }
    Ok(())
}

/// The highest record rate full tracing sustains without losing any: sockperf UDP
/// throughput over loopback, raised step by step until something is lost.
async fn event_rate(c: &Cfg, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    let port = 44000u16;
    let _srv = sockperf_server(None, "127.0.0.1", port, false)?;
    md.push_str("\n## Highest lossless record rate (full tracing, sockperf UDP throughput on loopback)\n\n");
    md.push_str("Lost: records a full ring refused, a busy reader dropped, or the correlator evicted before a trace\nused them.\n\n");
    md.push_str("| offered msg/s | records/s | lost records |\n|---|---|---|\n");
    let mut best = 0f64;
    for mps in [20_000u32, 30_000, 40_000, 50_000, 70_000, 100_000, 150_000, 200_000] {
        eprintln!("event rate: {mps} msg/s");
        let running = start_tracer(vec![(None, "lo".into())], Mode::Full, port).await?;
        let c0 = running.tracer.counters()?;
        let t0 = Instant::now();
        let mut cl = Command::new("sockperf");
        pin(&mut cl, CLIENT_CPU).args([
            "tp",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-m",
            "64",
            &format!("--mps={mps}"),
            "-t",
            &c.secs.to_string(),
        ]);
        let line = show(&cl);
        if !log.contains(&line) {
            log.push(line);
        }
        let o = cl.stdin(Stdio::null()).output()?;
        // The sending window sockperf reports ("Total of N messages sent in 3.000 sec"):
        // the run takes two seconds more (start-up, warm-up, wind-down), all but idle.
        let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        let secs = out
            .lines()
            .find_map(|l| l.split("messages sent in").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .unwrap_or_else(|| t0.elapsed().as_secs_f64());
        let c1 = running.tracer.counters()?;
        let f = running.finish().await?;
        let emitted: u64 = (0..Stage::ALL.len() as u32)
            .map(|s| c1[(counters::EMITTED + s) as usize] - c0[(counters::EMITTED + s) as usize])
            .sum();
        // Records the correlator had to evict before a trace used them are lost too.
        let lost = f.lost.values().sum::<u64>() + f.overflow_records + f.corr.records_evicted;
        let rate = emitted as f64 / secs;
        let _ = writeln!(md, "| {mps} | {rate:.0} | {lost} |");
        if lost > 0 {
            break;
        }
        best = best.max(rate);
    }
    let _ = writeln!(md, "\nHighest lossless: **{best:.0} records/s**.");
    Ok(())
}

/// Each capture tool at the same generator rates: the rate the sender achieved while the
/// tool captured (on a 2-core machine the tool's CPU use slows the sender), beside the
/// rate it achieves with no capture at all, and what each tool captured and dropped. The
/// steps stop at a tool's first loss. (Machine-wide CPU per packet was tried as a
/// finer measure: sockperf paces by spinning, and the noise swamped it.)
async fn capture_rate(c: &Cfg, paths: &Paths, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    const TOOLS: [&str; 3] = ["none", "packetflow", "tcpdump"];
    let port = 45000u16;
    let h = &paths.hosts;
    let _srv = sockperf_server(Some(&h.path_b()), testhosts::ADDR_B, port, false)?;
    let me = std::env::current_exe()?;
    md.push_str(
        "\n## Capture: highest lossless packet rate (sockperf UDP 64 B over veth, capture at the receiving end)\n\n",
    );
    md.push_str("| offered msg/s | no capture: sent msg/s | packetflow: sent msg/s | captured | dropped | tcpdump: sent msg/s | captured | dropped |\n|---|---|---|---|---|---|---|---|\n");
    let mut best = [0u32; 3];
    let mut alive = [true; 3];
    let count = |s: &str, what: &str| -> u64 {
        s.lines().find(|l| l.contains(what)).and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    };
    for mps in [25_000u32, 50_000, 100_000, 200_000, 300_000, 400_000, 600_000, 800_000] {
        if !alive[1] && !alive[2] {
            break;
        }
        eprintln!("capture rate: {mps} msg/s");
        let mut row = vec![mps.to_string()];
        for (i, tool) in TOOLS.into_iter().enumerate() {
            if !alive[i] {
                row.extend(["-".to_string(), "-".into(), "-".into()]);
                continue;
            }
            let cap = match tool {
                "packetflow" => {
                    let mut x = Command::new(&me);
                    x.args(["capture", "-i", &format!("{}@{}", h.veth_b, h.ns_b), "-Q", "in", "-w", "/dev/null"]);
                    Some(x)
                }
                "tcpdump" => {
                    let mut x = testhosts::netns_command(&h.path_b(), "tcpdump");
                    x.args(["-i", &h.veth_b, "-Q", "in", "-n", "-w", "/dev/null"]);
                    Some(x)
                }
                _ => None,
            };
            let mut kid = match cap {
                Some(mut x) => {
                    x.args(["udp", "port", &port.to_string()]);
                    let line = show(&x);
                    if !log.contains(&line) {
                        log.push(line);
                    }
                    let k = Kid(x.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?);
                    std::thread::sleep(Duration::from_millis(if tool == "packetflow" { 2500 } else { 800 }));
                    Some(k)
                }
                None => None,
            };
            let mut cl = testhosts::netns_command(&h.path_a(), "sockperf");
            cl.args([
                "tp",
                "-i",
                testhosts::ADDR_B,
                "-p",
                &port.to_string(),
                "-m",
                "64",
                &format!("--mps={mps}"),
                "-t",
                &c.secs.to_string(),
            ]);
            let line = show(&cl);
            if !log.contains(&line) {
                log.push(line);
            }
            let o = cl.output()?;
            let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
            // "Total of 200048 messages sent in 2.000 sec"
            let sent: u64 = out
                .lines()
                .find(|l| l.contains("messages sent in"))
                .and_then(|l| l.split("Total of").nth(1)?.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            // What counts is the rate that actually went through, not the rate asked for.
            let rate = (sent as f64 / f64::from(c.secs)) as u32;
            let Some(mut kid) = kid.take() else {
                best[i] = best[i].max(rate);
                row.push(rate.to_string());
                continue;
            };
            std::thread::sleep(Duration::from_millis(500));
            // SAFETY: kill(2) has no memory preconditions; the pid is our own child, not yet
            // reaped.
            unsafe { libc::kill(kid.0.id() as i32, libc::SIGINT) };
            let mut err = String::new();
            if let Some(e) = kid.0.stderr.as_mut() {
                let _ = std::io::Read::read_to_string(e, &mut err);
            }
            let _ = kid.0.wait();
            let captured = count(&err, "packets captured");
            let dropped = count(&err, if tool == "packetflow" { "dropped by packetflow" } else { "dropped by kernel" });
            let lossless = dropped == 0 && captured >= sent && sent > 0;
            if lossless {
                best[i] = best[i].max(rate);
            } else {
                alive[i] = false;
            }
            row.extend([rate.to_string(), captured.to_string(), dropped.to_string()]);
        }
        let _ = writeln!(md, "| {} |", row.join(" | "));
    }
    let ratio = if best[2] > 0 { format!("{:.2}x", f64::from(best[1]) / f64::from(best[2])) } else { "n/a".into() };
    let _ = writeln!(
        md,
        "\nHighest lossless rate: packetflow **{} msg/s**, tcpdump **{} msg/s** (ratio {ratio}): the highest rate sockperf\nachieved while the tool captured every packet it sent and reported no drop; the sender alone reached **{} msg/s**.\nWhere neither tool ever dropped, this is the sender's limit with the tool's CPU use beside it, not the tool's.",
        best[1], best[2], best[0]
    );
    Ok(())
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
    for tool in ["sockperf", "iperf3", "tcpdump", "bpftrace"] {
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
