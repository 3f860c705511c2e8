//! `packetflow trace`: live per-stage latency of the packets that match a filter.

use std::{io::IsTerminal, path::PathBuf, sync::atomic::Ordering, time::Duration};

use anyhow::Result;

use super::FilterArgs;
use crate::{
    kernel::interfaces::XdpChoice,
    model::{filter::FilterSpec, stage_set::StageSet, trace::PathKind},
    pipeline::accounting,
    pipeline::run::{self, RunOptions, Running},
    platform::{cgroup::Cgroup, interfaces, netns},
    report::tables,
};

/// Examples printed at the end of `trace --help`.
pub const EXAMPLES: &str = "Examples:
  packetflow trace --port 8080 --duration 10        per-stage table of port 8080's packets
  packetflow trace -i eth0 --json - --count 100     100 traces as NDJSON on stdout
  packetflow trace --summary --stages overview      the cheap always-on mode, a few stages
  packetflow trace --json - -- curl -s http://198.18.0.2/   only this command's packets";

/// Trace packets live: per-stage latency table, optional NDJSON per packet.
#[derive(clap::Args)]
pub struct Args {
    /// Attach XDP/TC to this interface (repeatable; IFACE@NETNS for another network
    /// namespace; `any` = all). Device stages are then limited to these. Default: lo.
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub ifaces: Vec<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Network namespace (e.g. /run/netns/NAME) whose interfaces -i names.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = super::seconds)]
    pub duration: Option<Duration>,
    /// Stop after this many data-packet traces.
    #[arg(short = 'c', long, value_name = "N")]
    pub count: Option<u64>,
    /// Write one JSON object per packet trace to FILE (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
    /// With --json: write only traces that took at least this many µs end to end (and
    /// every dropped packet's); the tables still count every trace.
    #[arg(long = "slow-us", value_name = "N", requires = "json")]
    pub slow_us: Option<u64>,
    /// Write a Chrome/Perfetto trace (open in ui.perfetto.dev).
    #[arg(long, value_name = "OUT.json")]
    pub chrome_trace: Option<String>,
    /// How to attach XDP: native (driver), generic (skb), auto (native, else generic), off.
    #[arg(long = "xdp-mode", value_name = "MODE", value_enum, default_value = "auto")]
    pub xdp: XdpChoice,
    /// Also trace segments without payload (ACK, SYN, FIN, RST) as their own kinds.
    #[arg(long)]
    pub control: bool,
    /// Also trace TCP connection set-up: connect, SYN, SYN queue, SYN-ACK, ACK, accept
    /// queue, accept, with queue lengths and drops; a table per listener at the end,
    /// one `connection` line each with --json. With `--stages none`: connections only.
    #[arg(long)]
    pub connections: bool,
    /// Print each drop of the traced traffic as it happens: reason, where in the kernel,
    /// interface, last stage reached (also packets dropped before any traced stage).
    /// The table of drops by reason is printed at the end of every run that saw one.
    #[arg(long)]
    pub drops: bool,
    /// Give up waiting for a packet's missing stages after this many ms.
    #[arg(long = "timeout-ms", value_name = "MS", default_value = "1000", value_parser = super::millis)]
    pub timeout: Duration,
    /// Summary mode: per-stage histograms kept in the kernel, no per-packet records.
    #[arg(long)]
    pub summary: bool,
    /// Trace 1 flow in N (decided per flow in the kernel; sampled flows stay complete).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub sample: u32,
    /// Stages to trace: names and sets (all, overview, send, receive, socket), comma
    /// separated. A stage not asked for has no program attached: cost scales with it.
    #[arg(long, value_name = "LIST", default_value = "all", value_parser = StageSet::parse)]
    pub stages: StageSet,
    /// Run this command in a cgroup of its own and trace only its flows, from its first
    /// packet; tracing stops when it exits (`packetflow trace -- curl http://...`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub async fn run(a: Args) -> Result<()> {
    run::preflight("trace")?;
    let mut stop = run::StopSignals::new()?;
    let (attach_to, ifindexes) = interfaces::resolve(&a.ifaces, a.netns.as_deref())?;
    if !a.command.is_empty() && a.filter.cgroup.is_some() {
        crate::user_bail!("trace -- CMD runs CMD in a cgroup of its own: leave --cgroup out");
    }
    // `-- CMD`: its cgroup first, so the filter can name it before anything is attached.
    let own_cgroup = if a.command.is_empty() { None } else { Some(CommandCgroup::create()?) };
    let cgroup = match (&own_cgroup, &a.filter.cgroup) {
        (Some(c), _) => Some(c.cgroup.clone()),
        (None, Some(p)) => Some(Cgroup::resolve(p)?),
        (None, None) => None,
    };
    let filter = FilterSpec {
        ports: a.filter.ports.clone(),
        hosts: a.filter.hosts.clone(),
        pids: a.filter.pids.clone(),
        comm: a.filter.comm.clone(),
        cgroup,
        proto: a.filter.proto,
        ifindexes,
        control: a.control,
        summary: a.summary,
        no_records: a.summary,
        sample: a.sample,
        stages: a.stages,
    };
    let described = describe(&filter, a.connections);
    if a.summary && (a.json.is_some() || a.chrome_trace.is_some() || a.count.is_some()) {
        crate::user_bail!(
            "--summary keeps no per-packet records: --json, --chrome-trace and --count need full tracing"
        );
    }
    let json_to_stdout = a.json.as_deref() == Some("-");
    let mut running = Running::start(RunOptions {
        filter,
        interfaces: attach_to,
        any_in: interfaces::any_namespaces(&a.ifaces, a.netns.as_deref()),
        xdp: a.xdp,
        json: a.json.clone(),
        chrome_trace: a.chrome_trace.clone(),
        netns_names: a
            .ifaces
            .iter()
            .filter_map(|s| s.split_once('@').map(|(_, ns)| netns::path(ns)))
            .chain(a.netns.iter().cloned())
            .collect(),
        timeout: a.timeout,
        count: a.count,
        slow_ns: a.slow_us.unwrap_or(0).saturating_mul(1000),
        connections: a.connections,
        more_sinks: a.drops.then(|| -> run::MoreSinks {
            Box::new(move |tracer, _| vec![Box::new(DropPrinter::new(tracer, json_to_stdout))])
        }),
        ..Default::default()
    })
    .await?;
    let live = std::io::stdout().is_terminal() && !json_to_stdout;
    let say = |s: &str| {
        if json_to_stdout {
            eprint!("{s}");
        } else {
            print!("{s}");
        }
    };
    for line in running
        .tracer
        .unavailable()
        .into_iter()
        .chain(running.tracer.conn_unavailable())
        .chain(running.tracer.drops_unavailable())
    {
        say(&format!("{line}\n"));
    }
    say(&format!("tracing ({described}); Ctrl-C to stop\n"));
    // The command starts once every hook is attached: its first packet is traced.
    let (exited_tx, mut exited) = tokio::sync::oneshot::channel();
    if let Some(c) = &own_cgroup {
        let child = c.spawn(&a.command)?;
        std::thread::spawn(move || {
            let mut child = child;
            let _ = exited_tx.send(child.wait());
        });
    }
    let mut status = None;
    let deadline = a.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let why = loop {
        tokio::select! {
            why = stop.recv() => break why,
            () = running.shared.count_notify.notified() => break "count reached",
            st = &mut exited, if own_cgroup.is_some() && status.is_none() => {
                status = Some(st.ok().and_then(Result::ok));
                // Its last packets' records still travel: one trace timeout, then stop.
                tokio::time::sleep(a.timeout + Duration::from_millis(200)).await;
                break "the command exited";
            }
            () = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break "duration over",
            _ = tick.tick() => {
                for line in running.watch_interfaces() {
                    say(&format!("{line}\n"));
                }
                if live {
                    let stats = running.stats();
                    let lost = running.lost();
                    let flows = running.shared.flows.load(Ordering::Relaxed);
                    let conns = if a.connections {
                        tables::connection_table(&running.shared.conns.lock().expect("conns lock"))
                    } else {
                        String::new()
                    };
                    let drops = running.drops();
                    let drops = if drops.is_empty() { String::new() } else { tables::drop_table(&drops) };
                    println!("\x1b[2J\x1b[H{}{conns}{drops}{} flows tracked, {} records dropped by a slow reader",
                        tables::path_tables(&stats, &lost), flows, running.shared.overflow_records.load(Ordering::Relaxed));
                }
            }
        }
    };
    let f = running.finish().await?;
    say(&format!("\nstopped ({why}); final summary:\n"));
    if !a.stages.is_empty() {
        for p in [PathKind::Loopback, PathKind::Nic] {
            if !f.stats.paths.contains_key(&p) {
                say(&format!("{} path: no traces\n", p.name()));
            }
        }
        say(&tables::path_tables(&f.stats, &f.lost));
    }
    if a.connections {
        say(&format!("connection set-up per listener:\n{}", tables::connection_table(&f.conns)));
    }
    if a.drops || !f.drops.is_empty() {
        say(&tables::drop_table(&f.drops));
    }
    say(&format!("{}\n", accounting::loss_line(&f)));
    say(&format!("{}\n", accounting::cost_line(&f)));
    if let Some(c) = own_cgroup {
        match status.flatten() {
            Some(st) => say(&format!("{} exited: {st}\n", a.command[0])),
            None => say(&format!("{} was still running: it stays in {}\n", a.command[0], c.cgroup.path)),
        }
        c.remove();
    }
    Ok(())
}

/// The cgroup `trace -- CMD` runs its command in (removed at the end, once empty).
struct CommandCgroup {
    cgroup: Cgroup,
    dir: std::path::PathBuf,
}

impl CommandCgroup {
    fn create() -> Result<CommandCgroup> {
        let (cgroup, dir) = Cgroup::create_for_command()?;
        Ok(CommandCgroup { cgroup, dir })
    }

    /// Starts `cmd` inside the cgroup: the child moves itself there before exec, so its
    /// first packet already belongs to it.
    fn spawn(&self, cmd: &[String]) -> Result<std::process::Child> {
        use std::os::unix::process::CommandExt;
        let procs = std::ffi::CString::new(self.dir.join("cgroup.procs").into_os_string().into_encoded_bytes())?;
        let mut c = std::process::Command::new(&cmd[0]);
        c.args(&cmd[1..]);
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (open, write, close) on memory prepared before the
        // fork; writing "0" to cgroup.procs moves the writing process.
        unsafe {
            c.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0\n".as_ptr().cast(), 2) != 2 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        c.spawn().map_err(|e| crate::error::user(format!("cannot run {}: {e}", cmd[0])))
    }

    /// Removes the cgroup when nothing is left in it (a command that left a daemon behind
    /// keeps it, and is said to).
    fn remove(self) {
        for _ in 0..20 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `trace --drops`: one line per drop, as the correlator hands it on (a traced packet's
/// once its trace is finished, so with the stage it reached).
struct DropPrinter {
    names: crate::pipeline::names::Names,
    to_stderr: bool,
}

impl DropPrinter {
    fn new(tracer: &crate::kernel::loader::Tracer, to_stderr: bool) -> DropPrinter {
        DropPrinter { names: crate::pipeline::names::Names::new(&tracer.interfaces), to_stderr }
    }

    fn print(&mut self, d: &crate::model::drops::PacketDrop) {
        let dev = if d.device.ifindex == 0 { "-".to_string() } else { self.names.ifname(d.device) };
        let line = format!(
            "drop {} at {} on {dev} after {}: {} {} {}:{} > {}:{} len {}\n",
            d.reason,
            d.location,
            d.after.map_or("(no trace)", packetflow_common::Stage::name),
            if d.flow.udp { "udp" } else { "tcp" },
            d.kind,
            d.flow.src_ip(),
            d.flow.sport,
            d.flow.dst_ip(),
            d.flow.dport,
            d.len
        );
        if self.to_stderr {
            eprint!("{line}");
        } else {
            print!("{line}");
        }
    }
}

impl crate::pipeline::session::Sink for DropPrinter {
    fn trace(&mut self, t: &crate::model::trace::Trace) {
        if let Some(d) = &t.drop {
            self.print(d);
        }
    }
    fn untraced_drop(&mut self, d: &crate::model::drops::PacketDrop) {
        self.print(d);
    }
}

/// The filter and mode in words, for the start line.
fn describe(f: &FilterSpec, connections: bool) -> String {
    let mut parts = f.describe();
    if f.stages != StageSet::ALL {
        parts.push(format!("stages {}", f.stages.describe()));
    }
    if f.summary {
        parts.push("summary mode: in-kernel histograms".into());
    }
    if connections {
        parts.push("connection set-up".into());
    }
    if parts.is_empty() { "all TCP and UDP".into() } else { parts.join(", ") }
}
