//! `packetflow demo`: the seed exchange over loopback and over a veth "NIC" between two
//! network namespaces, traced, with one side-by-side table of where the time went.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, anyhow};

use crate::{
    kernel::interfaces::XdpChoice,
    model::filter::{FilterSpec, Proto},
    model::trace::PathKind,
    pipeline::accounting,
    pipeline::run::{self, Finished, RunOptions, Running},
    platform::process::Proc,
    platform::testhosts::{self, TestHosts},
};

/// Which paths the demo runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Which {
    Loopback,
    Nic,
    Both,
}

/// Examples printed at the end of `demo --help`.
pub const EXAMPLES: &str = "Examples:
  packetflow demo                                   loopback and veth side by side, TCP
  packetflow demo --udp --count 5000 --json run.json    UDP, and keep every trace
  packetflow demo --path nic --stages socket        only the socket-queue wait split";

/// Run the seed exchange over loopback and a veth NIC path, traced, side by side.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Which paths to run.
    #[arg(long, value_enum, default_value = "both")]
    pub path: Which,
    /// Exchanges per path.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 18, value_name = "BYTES")]
    pub size: usize,
    /// UDP instead of TCP.
    #[arg(long)]
    pub udp: bool,
    /// IPv6 instead of IPv4.
    #[arg(long)]
    pub ipv6: bool,
    /// Write one JSON object per packet trace to FILE (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
    /// Write a Chrome/Perfetto trace (open in ui.perfetto.dev).
    #[arg(long, value_name = "OUT.json")]
    pub chrome_trace: Option<String>,
    /// Server port (another free one when it is busy).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// TCP connections per path, traced from connect() to accept() (0: none); a
    /// connection set-up table follows the per-packet one.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub connections: u64,
    /// Stages to trace (see `trace --stages`).
    #[arg(long, value_name = "LIST", default_value = "all", value_parser = crate::model::stage_set::StageSet::parse)]
    pub stages: crate::model::stage_set::StageSet,
}

fn me() -> Result<PathBuf> {
    std::env::current_exe().context("locating the packetflow binary")
}

/// Starts `packetflow serve` (inside `ns` when given) and waits for "Server listening".
fn start_server(ns: Option<&std::path::Path>, bind: &str, port: u16, udp: bool) -> Result<Proc> {
    let mut cmd = match ns {
        Some(p) => testhosts::netns_command(p, me()?),
        None => Command::new(me()?),
    };
    cmd.args(["serve", "--port", &port.to_string(), "--bind", bind]);
    if udp {
        cmd.arg("--udp");
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null()).spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no server stdout"))?;
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Keep reading what the server prints, so it never writes into a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    if !line.starts_with("Server listening") {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let _ = child.kill();
        return Err(crate::error::user(format!("the seed server did not start: {}", err.trim())));
    }
    Ok(Proc(child))
}

/// Runs `packetflow client` to completion; returns its last line (the round-trip summary).
/// `connections`: open that many connections instead of exchanging messages.
fn run_client(ns: Option<&std::path::Path>, addr: &str, a: &DemoArgs, connections: Option<u64>) -> Result<String> {
    let mut cmd = match ns {
        Some(p) => testhosts::netns_command(p, me()?),
        None => Command::new(me()?),
    };
    cmd.args([
        "client",
        addr,
        "--port",
        &a.port.to_string(),
        "--count",
        &a.count.to_string(),
        "--size",
        &a.size.to_string(),
    ]);
    if a.udp {
        cmd.arg("--udp");
    }
    if let Some(n) = connections {
        cmd.args(["--connections", &n.to_string()]);
    }
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(crate::error::user(format!(
            "the seed client failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string())
}

fn free_port(preferred: u16) -> u16 {
    if std::net::TcpListener::bind(("127.0.0.1", preferred)).is_ok()
        && std::net::UdpSocket::bind(("127.0.0.1", preferred)).is_ok()
    {
        return preferred;
    }
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_or(preferred, |a| a.port())
}

pub async fn run(mut a: DemoArgs) -> Result<()> {
    run::preflight("demo")?;
    let port = free_port(a.port);
    if port != a.port {
        println!("port {} is busy on 127.0.0.1; using {port}", a.port);
        a.port = port;
    }
    let want_lo = a.path != Which::Nic;
    let want_nic = a.path != Which::Loopback;
    let hosts = if want_nic {
        Some(TestHosts::new("pfdemo").context("creating the test hosts for the NIC path")?)
    } else {
        None
    };

    let mut interfaces = Vec::new();
    if want_lo {
        interfaces.push((None, "lo".to_string()));
    }
    if let Some(h) = &hosts {
        interfaces.push((Some(h.path_a()), h.veth_a.clone()));
        interfaces.push((Some(h.path_b()), h.veth_b.clone()));
    }
    // Connection set-up is TCP's.
    let conns = a.connections > 0 && !a.udp;
    let running = Running::start(RunOptions {
        filter: FilterSpec {
            ports: vec![a.port],
            proto: Some(if a.udp { Proto::Udp } else { Proto::Tcp }),
            stages: a.stages,
            ..Default::default()
        },
        interfaces,
        xdp: XdpChoice::Auto,
        json: a.json.clone(),
        chrome_trace: a.chrome_trace.clone(),
        netns_names: hosts.iter().flat_map(|h| [h.path_a(), h.path_b()]).collect(),
        connections: conns,
        ..Default::default()
    })
    .await?;
    for line in running.tracer.unavailable().into_iter().chain(running.tracer.conn_unavailable()) {
        println!("{line}");
    }

    let (lo_addr, nic_server) = if a.ipv6 { ("::1", testhosts::ADDR6_B) } else { ("127.0.0.1", testhosts::ADDR_B) };
    let mut rtt = Vec::new();
    let mut expected = 0;
    let mut expected_conns = 0;
    if want_lo {
        println!("loopback: {} exchanges of {} bytes over {lo_addr}:{} ({})", a.count, a.size, a.port, proto(&a));
        let _server = start_server(None, lo_addr, a.port, a.udp)?;
        rtt.push(("loopback", run_client(None, lo_addr, &a, None)?));
        expected += 2 * a.count;
        running.wait_traces(expected, Duration::from_secs(5)).await;
        if conns {
            rtt.push(("loopback", run_client(None, lo_addr, &a, Some(a.connections))?));
            // Each is done once the server has accepted it: keep the server until then.
            expected_conns += a.connections + 1; // and the exchange's own
            running.wait_connections(expected_conns, Duration::from_secs(5)).await;
        }
    }
    if let Some(h) = &hosts {
        println!(
            "nic: {} exchanges of {} bytes from {} ({}) to {nic_server}:{} ({}) over veth",
            a.count,
            a.size,
            if a.ipv6 { testhosts::ADDR6_A } else { testhosts::ADDR_A },
            h.ns_a,
            a.port,
            h.ns_b
        );
        let bind = if a.ipv6 { "::" } else { "0.0.0.0" };
        let _server = start_server(Some(&h.path_b()), bind, a.port, a.udp)?;
        rtt.push(("nic", run_client(Some(&h.path_a()), nic_server, &a, None)?));
        expected += 2 * a.count;
        running.wait_traces(expected, Duration::from_secs(5)).await;
        if conns {
            rtt.push(("nic", run_client(Some(&h.path_a()), nic_server, &a, Some(a.connections))?));
            expected_conns += a.connections + 1; // and the exchange's own
            running.wait_connections(expected_conns, Duration::from_secs(5)).await;
        }
    }
    let f = running.finish().await?;
    println!();
    print!("{}", side_by_side(&f, &a, hosts.as_ref()));
    if conns {
        println!(
            "\nconnection set-up, {} connections per path (loopback: {lo_addr}, nic: {nic_server}):",
            a.connections
        );
        print!("{}", crate::report::tables::connection_table(&f.conns));
    }
    for (p, line) in rtt {
        println!("{p} client: {line}");
    }
    println!("{}", accounting::loss_line(&f));
    println!("{}", accounting::cost_line(&f));
    Ok(())
}

fn proto(a: &DemoArgs) -> String {
    format!("{}/{}", if a.udp { "UDP" } else { "TCP" }, if a.ipv6 { "IPv6" } else { "IPv4" })
}

/// The demo's table (stats::side_by_side), then the route each path took and the hooks.
pub fn side_by_side(f: &Finished, a: &DemoArgs, hosts: Option<&TestHosts>) -> String {
    let mut out = crate::report::tables::side_by_side(&f.stats);
    out.push('\n');
    for p in [PathKind::Loopback, PathKind::Nic] {
        match f.stats.paths.get(&p) {
            Some(ps) => {
                out.push_str(&format!("{}: {} packet traces, {} complete", p.name(), ps.traces, ps.complete));
                let route = match p {
                    PathKind::Loopback => format!(
                        "; route: {} → lo → {} (interface lo)",
                        if a.ipv6 { "::1" } else { "127.0.0.1" },
                        if a.ipv6 { "::1" } else { "127.0.0.1" }
                    ),
                    PathKind::Nic => hosts
                        .map(|h| {
                            format!(
                                "; route: {} ({} in {}) → veth → {} ({} in {})",
                                if a.ipv6 { testhosts::ADDR6_A } else { testhosts::ADDR_A },
                                h.veth_a,
                                h.ns_a,
                                if a.ipv6 { testhosts::ADDR6_B } else { testhosts::ADDR_B },
                                h.veth_b,
                                h.ns_b
                            )
                        })
                        .unwrap_or_default(),
                };
                out.push_str(&route);
                out.push('\n');
            }
            None if (p == PathKind::Loopback && a.path != Which::Nic)
                || (p == PathKind::Nic && a.path != Which::Loopback) =>
            {
                out.push_str(&format!("{}: no traces\n", p.name()));
            }
            None => {}
        }
    }
    let xdp: Vec<String> = f
        .interfaces
        .iter()
        .map(|i| {
            format!(
                "{}: xdp {}",
                i.ifname,
                i.xdp.as_ref().map_or_else(|e| format!("unavailable ({e})"), std::string::ToString::to_string)
            )
        })
        .collect();
    if !xdp.is_empty() {
        out.push_str(&format!("hooks: {}\n", xdp.join(", ")));
    }
    out
}
