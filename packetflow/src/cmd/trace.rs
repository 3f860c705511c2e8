//! `packetflow trace`: live per-stage latency of the packets that match a filter.

use std::{io::IsTerminal, net::IpAddr, path::PathBuf, sync::atomic::Ordering, time::Duration};

use anyhow::Result;

use crate::{
    correlate::PathKind,
    filter::FilterSpec,
    loader::XdpChoice,
    run::{self, RunOptions, Running},
    stats::{self, Stats},
    sys,
};

pub struct TraceArgs {
    pub ifaces: Vec<String>,
    pub ports: Vec<u16>,
    pub hosts: Vec<IpAddr>,
    pub pid: Option<u32>,
    pub proto: Option<String>,
    pub netns: Option<PathBuf>,
    pub duration: Option<Duration>,
    pub count: Option<u64>,
    pub json: Option<String>,
    pub chrome_trace: Option<String>,
    pub xdp: XdpChoice,
    pub control: bool,
    pub timeout: Duration,
    pub summary: bool,
    pub sample: u32,
    pub stages: crate::stage_set::StageSet,
}

/// The per-path tables, as printed live and at the end.
pub fn tables(stats: &Stats, lost: &std::collections::BTreeMap<packetflow_common::Stage, u64>) -> String {
    if stats.paths.is_empty() {
        return "no packet traces yet\n".into();
    }
    let mut out = String::new();
    for (p, ps) in &stats.paths {
        out.push_str(&format!("{} path: {} traces ({} complete)\n", p.name(), ps.traces, ps.complete));
        out.push_str(&stats::path_table(ps, lost));
        out.push('\n');
    }
    for (k, n) in &stats.other_kinds {
        out.push_str(&format!("{n} {k} traces (not in the statistics)\n"));
    }
    out
}

pub async fn run(a: TraceArgs) -> Result<()> {
    run::preflight("trace")?;
    let mut stop = run::StopSignals::new()?;
    let (interfaces, ifindexes) = resolve_interfaces(&a.ifaces, a.netns.as_deref())?;
    let filter = FilterSpec {
        ports: a.ports.clone(),
        hosts: a.hosts.clone(),
        pid: a.pid,
        proto: a.proto.clone(),
        ifindexes,
        control: a.control,
        summary: a.summary,
        no_records: a.summary,
        sample: a.sample,
        stages: a.stages,
    };
    if a.summary && (a.json.is_some() || a.chrome_trace.is_some() || a.count.is_some()) {
        crate::user_bail!(
            "--summary keeps no per-packet records: --json, --chrome-trace and --count need full tracing"
        );
    }
    let json_to_stdout = a.json.as_deref() == Some("-");
    let mut running = Running::start(RunOptions {
        filter,
        interfaces,
        any_in: any_namespaces(&a.ifaces, a.netns.as_deref()),
        xdp: a.xdp,
        json: a.json.clone(),
        chrome_trace: a.chrome_trace.clone(),
        netns_names: a
            .ifaces
            .iter()
            .filter_map(|s| s.split_once('@').map(|(_, ns)| netns_path(ns)))
            .chain(a.netns.iter().cloned())
            .collect(),
        timeout: a.timeout,
        count: a.count,
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
    for line in running.tracer.unavailable() {
        say(&format!("{line}\n"));
    }
    say(&format!("tracing ({}); Ctrl-C to stop\n", describe_filter(&a)));
    let deadline = a.duration.map(|d| tokio::time::Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let why = loop {
        tokio::select! {
            why = stop.recv() => break why,
            _ = running.shared.count_notify.notified() => break "count reached",
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break "duration over",
            _ = tick.tick() => {
                for line in running.watch_interfaces() {
                    say(&format!("{line}\n"));
                }
                if live {
                    let stats = running.stats();
                    let lost = running.lost();
                    let flows = running.shared.flows.load(Ordering::Relaxed);
                    print!("\x1b[2J\x1b[H{}{} flows tracked, {} records dropped by a slow reader\n",
                        tables(&stats, &lost), flows, running.shared.overflow_records.load(Ordering::Relaxed));
                }
            }
        }
    };
    let f = running.finish().await?;
    let say = |s: &str| {
        if json_to_stdout {
            eprint!("{s}");
        } else {
            print!("{s}");
        }
    };
    say(&format!("\nstopped ({why}); final summary:\n"));
    for p in [PathKind::Loopback, PathKind::Nic] {
        if !f.stats.paths.contains_key(&p) {
            say(&format!("{} path: no traces\n", p.name()));
        }
    }
    say(&tables(&f.stats, &f.lost));
    say(&format!("{}\n", run::loss_line(&f)));
    say(&format!("{}\n", run::cost_line(&f)));
    Ok(())
}

/// Interfaces to attach to: the ones named (IFACE, or IFACE@NETNS for another
/// namespace), `any` for all in the namespace, or loopback when none is named. Also the
/// indexes the device stages are limited to (only when interfaces were named; `any` adds
/// none). Unknown interfaces and namespaces are user errors.
#[allow(clippy::type_complexity)]
pub fn resolve_interfaces(
    named: &[String],
    netns: Option<&std::path::Path>,
) -> Result<(Vec<(Option<PathBuf>, String)>, Vec<u32>)> {
    let mut interfaces: Vec<(Option<PathBuf>, String)> = Vec::new();
    let mut ifindexes = Vec::new();
    let specs: Vec<String> = if named.is_empty() { vec!["lo".into()] } else { named.to_vec() };
    for spec in &specs {
        let (name, ns) = match spec.split_once('@') {
            Some((n, ns)) => (n.to_string(), Some(netns_path(ns))),
            None => (spec.clone(), netns.map(PathBuf::from)),
        };
        if let Some(p) = &ns
            && !p.exists()
        {
            crate::user_bail!("network namespace {} does not exist", p.display());
        }
        if name == "any" {
            let all = sys::in_netns(ns.as_deref(), || Ok(sys::interfaces()))?;
            interfaces.extend(all.into_iter().map(|(_, n, _)| (ns.clone(), n)));
            continue;
        }
        let Some(idx) = sys::in_netns(ns.as_deref(), || Ok(sys::ifindex(&name)))? else {
            let where_ = ns.as_ref().map(|p| format!(" in network namespace {}", p.display())).unwrap_or_default();
            crate::user_bail!("unknown interface '{name}'{where_}");
        };
        if !named.is_empty() {
            ifindexes.push(idx);
        }
        interfaces.push((ns, name));
    }
    Ok((interfaces, ifindexes))
}

/// The namespaces that `-i any` (or `any@NETNS`) names, for `RunOptions::any_in`.
pub fn any_namespaces(named: &[String], netns: Option<&std::path::Path>) -> Vec<Option<PathBuf>> {
    named
        .iter()
        .filter_map(|spec| match spec.split_once('@') {
            Some(("any", ns)) => Some(Some(netns_path(ns))),
            None if spec == "any" => Some(netns.map(PathBuf::from)),
            _ => None,
        })
        .collect()
}

/// A namespace given by name (in /run/netns) or by path.
pub fn netns_path(s: &str) -> PathBuf {
    if s.contains('/') { PathBuf::from(s) } else { PathBuf::from("/run/netns").join(s) }
}

fn describe_filter(a: &TraceArgs) -> String {
    let mut parts = Vec::new();
    if !a.ports.is_empty() {
        parts.push(format!("port {}", a.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")));
    }
    if !a.hosts.is_empty() {
        parts.push(format!("host {}", a.hosts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")));
    }
    if let Some(p) = a.pid {
        parts.push(format!("pid {p}"));
    }
    if let Some(p) = &a.proto {
        parts.push(p.clone());
    }
    if a.sample > 1 {
        parts.push(format!("1 flow in {}", a.sample));
    }
    if a.stages != crate::stage_set::StageSet::ALL {
        parts.push(format!("stages {}", a.stages.describe()));
    }
    if a.summary {
        parts.push("summary mode: in-kernel histograms".into());
    }
    if parts.is_empty() { "all TCP and UDP".into() } else { parts.join(", ") }
}
