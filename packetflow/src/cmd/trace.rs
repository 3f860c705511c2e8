//! `packetflow trace`: live per-stage latency of the packets that match a filter.

use std::{io::IsTerminal, path::PathBuf, sync::atomic::Ordering, time::Duration};

use anyhow::Result;

use super::FilterArgs;
use crate::{
    kernel::interfaces::XdpChoice,
    model::{filter::FilterSpec, stage_set::StageSet, trace::PathKind},
    pipeline::accounting,
    pipeline::run::{self, RunOptions, Running},
    platform::{interfaces, netns},
    report::tables,
};

/// Examples printed at the end of `trace --help`.
pub const EXAMPLES: &str = "Examples:
  packetflow trace --port 8080 --duration 10        per-stage table of port 8080's packets
  packetflow trace -i eth0 --json - --count 100     100 traces as NDJSON on stdout
  packetflow trace --summary --stages overview      the cheap always-on mode, a few stages";

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
}

pub async fn run(a: Args) -> Result<()> {
    run::preflight("trace")?;
    let mut stop = run::StopSignals::new()?;
    let (attach_to, ifindexes) = interfaces::resolve(&a.ifaces, a.netns.as_deref())?;
    let filter = FilterSpec {
        ports: a.filter.ports.clone(),
        hosts: a.filter.hosts.clone(),
        pid: a.filter.pid,
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
    let deadline = a.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let why = loop {
        tokio::select! {
            why = stop.recv() => break why,
            () = running.shared.count_notify.notified() => break "count reached",
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
    Ok(())
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
