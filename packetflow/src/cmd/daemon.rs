//! `packetflow daemon`: its flags, each overriding a key of the config file (the daemon
//! itself is in `daemon/`).

use std::{net::SocketAddr, path::PathBuf};

use super::FilterArgs;
use crate::{
    daemon::config::{Mode, Overrides},
    kernel::interfaces::XdpChoice,
};

/// Run as a service: always-on tracing, Prometheus /metrics, rotated trace files,
/// SIGHUP reload, `packetflow status` over a Unix socket.
#[derive(clap::Args)]
pub struct Args {
    /// TOML config file (default: /etc/packetflow/packetflow.toml when it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Prometheus endpoint address (default 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// Allow a non-loopback --metrics-addr (the endpoint has no authentication).
    #[arg(long)]
    pub metrics_public: bool,
    /// Write NDJSON traces here, rotated (implies full mode unless mode is set).
    #[arg(long, value_name = "DIR")]
    pub trace_dir: Option<PathBuf>,
    /// Only write traces at least this slow end to end.
    #[arg(long, value_name = "N")]
    pub slow_us: Option<u64>,
    /// summary (in-kernel histograms) or full (per-packet traces).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Control socket for `packetflow status` (default /run/packetflow/packetflow.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Interfaces for XDP and tcx (repeatable; IFACE@NETNS; `any`). Default: lo.
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub ifaces: Vec<String>,
    /// How to attach XDP: native (driver), generic (skb), auto (native, else generic), off.
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpChoice>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Trace 1 flow in N.
    #[arg(long, value_name = "N")]
    pub sample: Option<u32>,
    /// After attaching, become this user (no capabilities kept).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Replace another program's XDP attachment instead of refusing to start.
    #[arg(long)]
    pub force: bool,
}

impl Args {
    /// The flags as overrides of the config file's keys (read again on SIGHUP).
    pub fn overrides(&self) -> Overrides {
        let FilterArgs { ports, hosts, pids, comm, cgroup, proto } = self.filter.clone();
        Overrides {
            metrics_addr: self.metrics_addr,
            metrics_public: self.metrics_public,
            control_socket: self.socket.clone(),
            interfaces: self.ifaces.clone(),
            xdp_mode: self.xdp_mode,
            mode: self.mode,
            ports,
            hosts,
            proto,
            pids,
            comm,
            cgroup,
            sample: self.sample,
            trace_dir: self.trace_dir.clone(),
            slow_us: self.slow_us,
        }
    }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    crate::daemon::run(a).await
}
