use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use packetflow::{
    bench, capture, correlate::PathKind, daemon, demo, doctor, error, loader::XdpChoice, report, seed,
    stage_set::StageSet, trace,
};

#[derive(Parser)]
#[command(
    name = "packetflow",
    version,
    about = "Where a packet's time goes inside Linux: per-stage latency from send syscall to receive syscall, measured with eBPF."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpArg {
    Auto,
    Native,
    Generic,
    Off,
}

impl From<XdpArg> for XdpChoice {
    fn from(x: XdpArg) -> XdpChoice {
        match x {
            XdpArg::Auto => XdpChoice::Auto,
            XdpArg::Native => XdpChoice::Native,
            XdpArg::Generic => XdpChoice::Generic,
            XdpArg::Off => XdpChoice::Off,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum PathArg {
    Loopback,
    Nic,
    Both,
}

#[derive(Clone, Copy, ValueEnum)]
enum DirArg {
    In,
    Out,
    Inout,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnlyPath {
    Loopback,
    Nic,
}

#[derive(Clone, Copy, ValueEnum)]
enum ByArg {
    Stage,
    Flow,
    Pid,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Summary,
    Full,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtoArg {
    Tcp,
    Udp,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check what this kernel lets packetflow do (by trying), and say what is missing.
    Doctor,
    /// Trace packets live: per-stage latency table, optional NDJSON per packet.
    Trace {
        /// Attach XDP/TC to this interface (repeatable; IFACE@NETNS for another network
        /// namespace; `any` = all). Device stages are then limited to these. Default: lo.
        #[arg(short = 'i', long = "interface", value_name = "IFACE")]
        ifaces: Vec<String>,
        /// Only flows with this port on either end (repeatable).
        #[arg(long = "port", value_name = "P")]
        ports: Vec<u16>,
        /// Only flows with this address on either end (repeatable).
        #[arg(long = "host", value_name = "ADDR")]
        hosts: Vec<IpAddr>,
        /// Only this process (at the process-context stages).
        #[arg(long)]
        pid: Option<u32>,
        /// Only this protocol; the other one's own hooks are not attached (cheaper)
        #[arg(long, value_enum)]
        proto: Option<ProtoArg>,
        /// Network namespace (e.g. /run/netns/NAME) whose interfaces -i names.
        #[arg(long, value_name = "PATH")]
        netns: Option<PathBuf>,
        /// Stop after this many seconds.
        #[arg(long, value_name = "SECS")]
        duration: Option<f64>,
        /// Stop after this many data-packet traces.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Write one JSON object per packet trace to FILE (`-` for stdout).
        #[arg(long, value_name = "FILE")]
        json: Option<String>,
        /// Write a Chrome/Perfetto trace (open in ui.perfetto.dev).
        #[arg(long, value_name = "OUT.json")]
        chrome_trace: Option<String>,
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: XdpArg,
        /// Also trace segments without payload (ACK, SYN, FIN, RST) as their own kinds.
        #[arg(long)]
        control: bool,
        /// Give up waiting for a packet's missing stages after this many ms.
        #[arg(long, value_name = "MS", default_value_t = 1000)]
        timeout_ms: u64,
        /// Summary mode: per-stage histograms kept in the kernel, no per-packet records.
        #[arg(long)]
        summary: bool,
        /// Trace 1 flow in N (decided per flow in the kernel; sampled flows stay complete).
        #[arg(long, value_name = "N", default_value_t = 1)]
        sample: u32,
        /// Stages to trace: names and sets (all, overview, send, receive, socket), comma
        /// separated. A stage not asked for has no program attached: cost scales with it.
        #[arg(long, value_name = "LIST", default_value = "all")]
        stages: String,
    },
    /// Capture packets (XDP in, tcx out) to pcapng or tcpdump-like lines; filter in the kernel.
    Capture {
        /// Interface (repeatable; IFACE@NETNS for another namespace; `any` = all).
        #[arg(short = 'i', long = "interface", value_name = "IFACE")]
        ifaces: Vec<String>,
        /// Write pcapng to FILE (`-` for stdout) instead of printing lines.
        #[arg(short = 'w', value_name = "FILE")]
        write: Option<String>,
        /// Stop after COUNT packets.
        #[arg(short = 'c', value_name = "COUNT")]
        count: Option<u64>,
        /// Bytes to keep of each packet (at most 65535, what the hooks can copy).
        #[arg(short = 's', value_name = "SNAPLEN", default_value_t = 262144)]
        snaplen: u32,
        /// Direction: in (XDP), out (tcx egress) or inout.
        #[arg(short = 'Q', value_enum, default_value = "inout")]
        direction: DirArg,
        #[arg(long, value_name = "SECS")]
        duration: Option<f64>,
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: XdpArg,
        /// Also trace: put each packet's stage timestamps in its pcapng comment
        /// (`--stages=LIST` for some stages only; see `trace --stages`).
        #[arg(long, value_name = "LIST", num_args = 0..=1, require_equals = true, default_missing_value = "all")]
        stages: Option<String>,
        /// Filter, in pcap-filter syntax (host, net, port, portrange, src, dst, tcp, udp, icmp, icmp6, ip, ip6, and/or/not).
        #[arg(value_name = "EXPRESSION", trailing_var_arg = true)]
        expression: Vec<String>,
    },
    /// Run as a service: always-on tracing, Prometheus /metrics, rotated trace files,
    /// SIGHUP reload, `packetflow status` over a Unix socket.
    Daemon {
        /// TOML config file (default: /etc/packetflow/packetflow.toml when it exists).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Prometheus endpoint address (default 127.0.0.1:9464).
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Allow a non-loopback --metrics-addr (the endpoint has no authentication).
        #[arg(long)]
        metrics_public: bool,
        /// Write NDJSON traces here, rotated (implies full mode unless mode is set).
        #[arg(long, value_name = "DIR")]
        trace_dir: Option<PathBuf>,
        /// Only write traces at least this slow end to end.
        #[arg(long, value_name = "N")]
        slow_us: Option<u64>,
        /// summary (in-kernel histograms) or full (per-packet traces).
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// Control socket for `packetflow status` (default /run/packetflow/packetflow.sock).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Interfaces for XDP and tcx (repeatable; IFACE@NETNS; `any`). Default: lo.
        #[arg(short = 'i', long = "interface", value_name = "IFACE")]
        ifaces: Vec<String>,
        #[arg(long, value_enum)]
        xdp_mode: Option<XdpArg>,
        #[arg(long = "port", value_name = "P")]
        ports: Vec<u16>,
        #[arg(long = "host", value_name = "ADDR")]
        hosts: Vec<IpAddr>,
        #[arg(long)]
        pid: Option<u32>,
        /// Only this protocol; the other one's own hooks are not attached (cheaper)
        #[arg(long, value_enum)]
        proto: Option<ProtoArg>,
        #[arg(long, value_name = "N")]
        sample: Option<u32>,
        /// After attaching, become this user (no capabilities kept).
        #[arg(long, value_name = "USER")]
        user: Option<String>,
        /// Replace another program's XDP attachment instead of refusing to start.
        #[arg(long)]
        force: bool,
    },
    /// Ask the running daemon for its per-stage table, hooks and loss counters.
    Status {
        #[arg(long, value_name = "PATH", default_value = "/run/packetflow/packetflow.sock")]
        socket: PathBuf,
    },
    /// Run the seed exchange over loopback and a veth NIC path, traced, side by side.
    Demo {
        #[arg(long, value_enum, default_value = "both")]
        path: PathArg,
        #[arg(long, default_value_t = 1000)]
        count: u64,
        #[arg(long, default_value_t = 18, value_name = "BYTES")]
        size: usize,
        #[arg(long)]
        udp: bool,
        #[arg(long)]
        ipv6: bool,
        #[arg(long, value_name = "FILE")]
        json: Option<String>,
        /// Write a Chrome/Perfetto trace (open in ui.perfetto.dev).
        #[arg(long, value_name = "OUT.json")]
        chrome_trace: Option<String>,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Stages to trace (see `trace --stages`).
        #[arg(long, value_name = "LIST", default_value = "all")]
        stages: String,
    },
    /// Read a recording (--json output; `-` for stdin): tables, comparison, pictures.
    Report {
        #[arg(value_name = "FILE")]
        file: String,
        /// Compare with this recording: p50/p99 per stage, changes beyond noise marked.
        #[arg(long, value_name = "OTHER")]
        baseline: Option<String>,
        #[arg(long, value_enum)]
        path: Option<OnlyPath>,
        #[arg(long, value_enum, default_value = "stage")]
        by: ByArg,
        /// Write a Chrome/Perfetto trace (open in ui.perfetto.dev).
        #[arg(long, value_name = "OUT.json")]
        chrome_trace: Option<String>,
        /// Write one self-contained HTML page with the tables and charts.
        #[arg(long, value_name = "OUT.html")]
        html: Option<String>,
        /// Write the charts as SVG files into DIR.
        #[arg(long, value_name = "DIR")]
        svg: Option<PathBuf>,
    },
    /// Measure tracing overhead with sockperf, iperf3 and tcpdump (run by `cargo xtask bench`).
    Bench {
        /// Where to write the markdown report.
        #[arg(long, default_value = "BENCHMARKS.md")]
        out: PathBuf,
        /// One short round per measurement (to check the benchmark itself).
        #[arg(long)]
        quick: bool,
        /// Only these sections (latency, throughput, hooks, events, capture), printed and
        /// not written to --out: for iterating on one number.
        #[arg(long, value_delimiter = ',', value_name = "SECTION,...")]
        only: Vec<String>,
    },
    /// The seed server: answers each message with "Hello from server!".
    Serve {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long, default_value = "0.0.0.0", value_name = "ADDR")]
        bind: String,
        #[arg(long)]
        udp: bool,
        /// Print the seed's lines for every message (default: each client's first).
        #[arg(short, long)]
        verbose: bool,
        /// Exit after the first client disconnects (UDP: after --count messages).
        #[arg(long)]
        once: bool,
        #[arg(long, default_value_t = 1)]
        count: u64,
    },
    /// The seed client: sends "Hello from client!" and prints the answer.
    Client {
        #[arg(value_name = "ADDR")]
        addr: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long)]
        udp: bool,
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Message size: the greeting padded with '.' (or cut) to this many bytes.
        #[arg(long, default_value_t = 18, value_name = "BYTES")]
        size: usize,
        /// Pause between exchanges.
        #[arg(long, default_value_t = 0, value_name = "MS")]
        interval: u64,
        #[arg(short, long)]
        verbose: bool,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Doctor => runtime()?.block_on(doctor::run()),
        Cmd::Trace {
            ifaces,
            ports,
            hosts,
            pid,
            proto,
            netns,
            duration,
            count,
            json,
            chrome_trace,
            xdp_mode,
            control,
            timeout_ms,
            summary,
            sample,
            stages,
        } => {
            let stages = StageSet::parse(&stages)?;
            if sample == 0 {
                packetflow::user_bail!("--sample must be at least 1 (1 = every flow)");
            }
            if let Some(d) = duration
                && !(d > 0.0 && d.is_finite())
            {
                packetflow::user_bail!("--duration must be a positive number of seconds");
            }
            runtime()?.block_on(trace::run(trace::TraceArgs {
                ifaces,
                ports,
                hosts,
                pid,
                proto: proto.map(|p| match p {
                    ProtoArg::Tcp => "tcp".into(),
                    ProtoArg::Udp => "udp".into(),
                }),
                netns,
                duration: duration.map(Duration::from_secs_f64),
                count,
                json,
                chrome_trace,
                xdp: xdp_mode.into(),
                control,
                timeout: Duration::from_millis(timeout_ms.max(1)),
                summary,
                sample,
                stages,
            }))
        }
        Cmd::Capture { ifaces, write, count, snaplen, direction, duration, xdp_mode, stages, expression } => {
            let stages = stages.as_deref().map(StageSet::parse).transpose()?;
            if let Some(d) = duration
                && !(d > 0.0 && d.is_finite())
            {
                packetflow::user_bail!("--duration must be a positive number of seconds");
            }
            if snaplen == 0 {
                packetflow::user_bail!("-s must be at least 1 byte");
            }
            use packetflow_common::capture::{DIR_IN, DIR_OUT};
            runtime()?.block_on(capture::run(capture::CaptureArgs {
                ifaces,
                write,
                count,
                snaplen: snaplen.min(packetflow_common::capture::CAPTURE_MAX as u32),
                dirs: match direction {
                    DirArg::In => DIR_IN,
                    DirArg::Out => DIR_OUT,
                    DirArg::Inout => DIR_IN | DIR_OUT,
                },
                duration: duration.map(Duration::from_secs_f64),
                xdp: xdp_mode.into(),
                expression,
                stages,
            }))
        }
        Cmd::Daemon {
            config,
            metrics_addr,
            metrics_public,
            trace_dir,
            slow_us,
            mode,
            socket,
            ifaces,
            xdp_mode,
            ports,
            hosts,
            pid,
            proto,
            sample,
            user,
            force,
        } => {
            use packetflow::config::{self, Overrides};
            let overrides = Overrides {
                metrics_addr,
                metrics_public,
                control_socket: socket,
                interfaces: ifaces,
                xdp_mode: xdp_mode.map(|x| match x {
                    XdpArg::Auto => config::XdpMode::Auto,
                    XdpArg::Native => config::XdpMode::Native,
                    XdpArg::Generic => config::XdpMode::Generic,
                    XdpArg::Off => config::XdpMode::Off,
                }),
                mode: mode.map(|m| match m {
                    ModeArg::Summary => config::Mode::Summary,
                    ModeArg::Full => config::Mode::Full,
                }),
                ports,
                hosts,
                proto: proto.map(|p| match p {
                    ProtoArg::Tcp => config::Proto::Tcp,
                    ProtoArg::Udp => config::Proto::Udp,
                }),
                pid,
                sample,
                trace_dir,
                slow_us,
            };
            runtime()?.block_on(daemon::run(daemon::DaemonArgs { config, overrides, user, force }))
        }
        Cmd::Status { socket } => daemon::status(&socket),
        Cmd::Bench { out, quick, only } => runtime()?.block_on(bench::run(bench::BenchArgs { out, quick, only })),
        Cmd::Report { file, baseline, path, by, chrome_trace, html, svg } => report::run(report::ReportArgs {
            file,
            baseline,
            path: path.map(|p| match p {
                OnlyPath::Loopback => PathKind::Loopback,
                OnlyPath::Nic => PathKind::Nic,
            }),
            by: match by {
                ByArg::Stage => report::By::Stage,
                ByArg::Flow => report::By::Flow,
                ByArg::Pid => report::By::Pid,
            },
            chrome_trace,
            html,
            svg,
        }),
        Cmd::Demo { path, count, size, udp, ipv6, json, chrome_trace, port, stages } => {
            let stages = StageSet::parse(&stages)?;
            runtime()?.block_on(demo::run(demo::DemoArgs {
                path: match path {
                    PathArg::Loopback => demo::Which::Loopback,
                    PathArg::Nic => demo::Which::Nic,
                    PathArg::Both => demo::Which::Both,
                },
                count,
                size,
                udp,
                ipv6,
                json,
                chrome_trace,
                port,
                stages,
            }))
        }
        Cmd::Serve { port, bind, udp, verbose, once, count } => {
            seed::serve(&seed::ServeOpts { port, bind: seed::parse_addr(&bind)?, udp, verbose, once, count })
        }
        Cmd::Client { addr, port, udp, count, size, interval, verbose } => seed::client(&seed::ClientOpts {
            addr: seed::parse_addr(&addr)?,
            port,
            udp,
            count,
            size,
            interval: Duration::from_millis(interval),
            verbose,
        })
        .map(|_| ()),
    }
}

fn main() {
    // No panic message or backtrace reaches a user: one line, exit 1.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("packetflow: internal error{at}: {msg} (please report this)");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let code = match std::panic::catch_unwind(|| dispatch(cli)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            let (code, line) = error::report(&e);
            eprintln!("packetflow: {line}");
            code
        }
        Err(_) => 1,
    };
    std::process::exit(code);
}
