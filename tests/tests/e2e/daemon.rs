//! `packetflow daemon` as a service: metrics that match the traffic on both paths, the
//! control socket, SIGHUP reloads (good and bad), clean exits on SIGTERM and SIGKILL with
//! nothing left in the kernel, config errors with file:line, the XDP clobber check,
//! privilege drop, a bounded-memory flood, and the systemd unit.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use packetflow_tests::*;

/// A running daemon: its stderr lines are collected (and echoed) as they come.
struct Daemon {
    proc: Proc,
    log: Arc<Mutex<Vec<String>>>,
    metrics: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A config file with the test's metrics port and control socket, plus `extra` lines.
fn config(name: &str, metrics: u16, extra: &str) -> (PathBuf, PathBuf) {
    let dir = tmp(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("ctl.sock");
    let path = dir.join("packetflow.toml");
    std::fs::write(
        &path,
        format!("metrics_addr = \"127.0.0.1:{metrics}\"\ncontrol_socket = \"{}\"\n{extra}", socket.display()),
    )
    .unwrap();
    (path, socket)
}

impl Daemon {
    /// Starts `packetflow daemon --config CFG ARGS` and waits for its "ready" line.
    fn start(cfg: &Path, metrics: u16, args: &[&str]) -> Daemon {
        let mut child = Command::new(bin())
            .args(["daemon", "--config"])
            .arg(cfg)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting packetflow daemon");
        let err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                println!("[daemon] {line}");
                l.lock().unwrap().push(line);
            }
        });
        let d = Daemon { proc: Proc(child), log, metrics };
        let t0 = Instant::now();
        while !d.logged("ready:") {
            assert!(t0.elapsed() < Duration::from_secs(30), "daemon not ready within 30 s: {:?}", d.lines());
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn logged(&self, s: &str) -> bool {
        self.lines().iter().any(|l| l.contains(s))
    }

    /// Waits (at most 5 s) for a log line containing `s`.
    fn wait_log(&self, s: &str) {
        let t0 = Instant::now();
        while !self.logged(s) {
            assert!(t0.elapsed() < Duration::from_secs(5), "no '{s}' in {:?}", self.lines());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> i32 {
        self.proc.0.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) has no memory preconditions; the pid is the daemon child, not yet reaped.
        unsafe { libc::kill(self.pid(), sig) };
    }

    fn scrape(&self) -> String {
        scrape(self.metrics).expect("scraping /metrics")
    }

    /// Scrapes until `metric` reaches `want` (or 15 s pass); returns the last scrape.
    fn wait_metric(&self, metric: &str, want: f64) -> String {
        let t0 = Instant::now();
        loop {
            let m = self.scrape();
            if value(&m, metric).unwrap_or(0.0) >= want || t0.elapsed() > Duration::from_secs(15) {
                return m;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// GET /metrics on 127.0.0.1:`port`; the body.
fn scrape(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    Ok(body.to_string())
}

/// The value of the sample whose name-and-labels text is exactly `metric`.
fn value(text: &str, metric: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(metric)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Names of loaded BPF programs that are packetflow's (they all start with `pf_`).
fn pf_programs() -> Vec<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .filter(|n| n.starts_with("pf_"))
        .collect()
}

/// Waits (at most 5 s: the kernel frees programs after an RCU grace period) until no
/// packetflow program is loaded; returns what is left.
fn wait_unloaded() -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let left = pf_programs();
        if left.is_empty() || t0.elapsed() > Duration::from_secs(5) {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn xdp_on(h: &TestHosts, ns: &str, dev: &str) -> String {
    let out = Command::new("ip").args(["-n", ns, "-d", "link", "show", "dev", dev]).output().unwrap();
    let _ = h;
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("xdp")).collect::<Vec<_>>().join("\n")
}

#[test]
fn a_reload_changes_the_stages_attached_with_no_gap_in_the_stages_kept() {
    require_root();
    // (The test before may have just stopped: the kernel frees programs a little later.)
    let left = wait_unloaded();
    assert!(left.is_empty(), "another packetflow is running: {left:?}");
    let port = unique_port();
    let metrics = free_port();
    let (cfg, _) = config("daemon-stages", metrics, &format!("ports = [{port}]\nstages = \"socket\"\n"));
    let mut d = Daemon::start(&cfg, metrics, &[]);
    let has = |p: &str| pf_programs().iter().any(|n| n == p);
    assert!(has("pf_dev_queue") && has("pf_copy_to_user"), "{:?}", pf_programs());
    assert!(!has("pf_start_xmit") && !has("pf_tcp_probe") && !has("pf_xdp"), "{:?}", pf_programs());
    let _srv = serve(None, "127.0.0.1", port, false);
    let copied = "packetflow_stage_latency_seconds_count{path=\"loopback\",stage=\"copy_to_user\"}";
    let xmit = "packetflow_stage_latency_seconds_count{path=\"loopback\",stage=\"nic_xmit\"}";
    client(None, "127.0.0.1", port, 50, 32, false);
    let m = d.wait_metric(copied, 100.0);
    assert_eq!(value(&m, copied), Some(100.0), "50 exchanges, two packets each");
    assert_eq!(value(&m, xmit), None, "nic_xmit is not asked for");

    let text = std::fs::read_to_string(&cfg).unwrap().replace("stages = \"socket\"", "stages = \"socket,nic_xmit\"");
    std::fs::write(&cfg, &text).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded");
    assert!(d.logged("attached tp_btf net_dev_start_xmit"), "{:?}", d.lines());
    assert!(has("pf_start_xmit"), "{:?}", pf_programs());
    client(None, "127.0.0.1", port, 50, 32, false);
    let m = d.wait_metric(copied, 200.0);
    assert_eq!(value(&m, copied), Some(200.0), "the kept stages counted every packet across the reload");
    assert_eq!(value(&m, xmit), Some(100.0), "the added stage, from the reload on");

    std::fs::write(&cfg, text.replace("socket,nic_xmit", "socket")).unwrap();
    d.signal(libc::SIGHUP);
    let t0 = Instant::now();
    while has("pf_start_xmit") && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!has("pf_start_xmit"), "detached at the second reload: {:?}", d.lines());
    assert!(has("pf_copy_to_user"), "{:?}", pf_programs());
    d.signal(libc::SIGTERM);
    assert_eq!(d.proc.wait(Duration::from_secs(5)).and_then(|s| s.code()), Some(0), "{:?}", d.lines());
}

#[test]
fn metrics_cover_every_stage_of_both_paths_and_match_the_traffic() {
    require_root();
    assert!(pf_programs().is_empty(), "another packetflow is running: {:?}", pf_programs());
    let h = TestHosts::new("pfdm").expect("test hosts");
    let port = unique_port();
    let metrics = free_port();
    // Every stage (the daemon's default set is `overview`).
    let ifaces =
        format!("stages = \"all\"\ninterfaces = [\"lo\", \"{}@{}\", \"{}@{}\"]\n", h.veth_a, h.ns_a, h.veth_b, h.ns_b);
    let (cfg, socket) = config("daemon-metrics", metrics, &format!("{ifaces}ports = [{port}]\n"));
    let d = Daemon::start(&cfg, metrics, &[]);
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600, "control socket is root-only");

    let _lo = serve(None, "127.0.0.1", port, false);
    let _nic = serve(Some(&h.path_b()), testhosts::ADDR_B, port, false);
    let n = 200u64;
    client(None, "127.0.0.1", port, n, 64, false);
    client(Some(&h.path_a()), testhosts::ADDR_B, port, n, 64, false);
    // Each exchange is two data packets (request and answer).
    let m = d.wait_metric("packetflow_packets_traced_total{path=\"nic\"}", (2 * n) as f64);
    let m = if value(&m, "packetflow_packets_traced_total{path=\"loopback\"}") < Some((2 * n) as f64) {
        d.wait_metric("packetflow_packets_traced_total{path=\"loopback\"}", (2 * n) as f64)
    } else {
        m
    };
    for path in ["loopback", "nic"] {
        assert_eq!(
            value(&m, &format!("packetflow_packets_traced_total{{path=\"{path}\"}}")),
            Some((2 * n) as f64),
            "{path}"
        );
        assert_eq!(
            value(&m, &format!("packetflow_end_to_end_latency_seconds_count{{path=\"{path}\"}}")),
            Some((2 * n) as f64)
        );
        // Every stage this kernel serves, after the first (send_syscall starts the
        // clock), has a histogram holding every packet.
        let served = expected_stages();
        for stage in kernel_order(path == "loopback").into_iter().skip(1).filter(|s| served.contains(s)) {
            let count =
                value(&m, &format!("packetflow_stage_latency_seconds_count{{path=\"{path}\",stage=\"{stage}\"}}"));
            assert_eq!(count, Some((2 * n) as f64), "{path} {stage}");
            let inf = value(
                &m,
                &format!("packetflow_stage_latency_seconds_bucket{{path=\"{path}\",stage=\"{stage}\",le=\"+Inf\"}}"),
            );
            assert_eq!(inf, count, "{path} {stage} +Inf bucket");
        }
    }
    assert_eq!(
        m.matches("packetflow_stage_latency_seconds_bucket{path=\"nic\",stage=\"xdp\"").count(),
        147,
        "146 bounds + Inf"
    );
    assert!(value(&m, "packetflow_programs_attached").unwrap() >= 20.0);
    assert_eq!(value(&m, "packetflow_events_lost_total{stage=\"dev_queue\",hook=\"tp_btf net_dev_queue\"}"), Some(0.0));
    assert!(m.contains("packetflow_ring_fill_ratio{shard=\"0\"}"));
    assert!(m.contains("packetflow_correlation_evictions_total{what=\"flows\"}"));

    let st = packetflow(&["status", "--socket", socket.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    assert!(text.contains(&format!("loopback path: {} traces", 2 * n)), "{text}");
    assert!(text.contains(&format!("nic path: {} traces", 2 * n)), "{text}");
    assert!(text.contains("xdp            XDP on lo (generic)"), "{text}");
    assert!(text.contains("losses: 0 events lost in the kernel"), "{text}");
    drop(d);
}

/// The daemon samples the kernel's run statistics (`cost_sample_secs`): on for one second
/// in every N, and /metrics and status say how long they were on; the sysctl is as it
/// was once the daemon is gone.
#[test]
fn the_daemon_samples_its_own_cost() {
    require_root();
    let sysctl = || std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    let before = sysctl();
    let port = unique_port();
    let metrics = free_port();
    let (cfg, socket) = config("daemon-cost", metrics, &format!("ports = [{port}]\ncost_sample_secs = 2\n"));
    let d = Daemon::start(&cfg, metrics, &[]);
    let _srv = serve(None, "127.0.0.1", port, false);
    // Traffic for about 5 s: windows on at 0-1 s, 2-3 s and 4-5 s.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        client(None, "127.0.0.1", port, 50, 64, false);
    }
    std::thread::sleep(Duration::from_millis(1200)); // the metrics snapshot is once a second
    let m = d.scrape();
    let sampled = value(&m, "packetflow_program_stats_seconds_total").expect("packetflow_program_stats_seconds_total");
    let runs: f64 = m
        .lines()
        .filter(|l| l.starts_with("packetflow_program_runs_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let secs: f64 = m
        .lines()
        .filter(|l| l.starts_with("packetflow_program_run_seconds_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let up = t0.elapsed().as_secs_f64();
    assert!(sampled >= 2.0 && sampled <= up * 0.75, "statistics on {sampled} s of about {up} s");
    assert!(runs > 0.0 && secs > 0.0, "program runs {runs}, kernel time {secs} s");
    let st = packetflow(&["status", "--socket", socket.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(text.contains("s of run statistics over"), "{text}");
    drop(d);
    assert_eq!(sysctl(), before, "kernel.bpf_stats_enabled as it was");
}

#[test]
fn sigterm_and_sigkill_leave_nothing_attached() {
    require_root();
    let h = TestHosts::new("pfdk").expect("test hosts");
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let metrics = free_port();
        let (cfg, socket) = config(
            "daemon-exit",
            metrics,
            &format!("stages = \"all\"\ninterfaces = [\"lo\", \"{}@{}\"]\n", h.veth_b, h.ns_b),
        );
        let mut d = Daemon::start(&cfg, metrics, &[]);
        assert!(pf_programs().len() >= 10, "{:?}", pf_programs());
        assert!(xdp_on(&h, &h.ns_b, &h.veth_b).contains("pf_xdp"), "XDP attached while running");
        let t0 = Instant::now();
        d.signal(sig);
        let st = d.proc.wait(Duration::from_secs(10)).expect("daemon exits");
        let took = t0.elapsed();
        if sig == libc::SIGTERM {
            assert_eq!(st.code(), Some(0), "SIGTERM exits 0: {:?}", d.lines());
            assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
            assert!(d.logged("stopped; lost 0 events"), "{:?}", d.lines());
            assert!(!socket.exists(), "control socket removed");
        }
        assert_eq!(wait_unloaded(), Vec::<String>::new(), "programs left after signal {sig}");
        assert_eq!(xdp_on(&h, &h.ns_b, &h.veth_b), "", "XDP left on {} after signal {sig}", h.veth_b);
    }
}

#[test]
fn sighup_applies_a_new_filter_and_rejects_a_broken_file() {
    require_root();
    let (a, b) = (unique_port(), unique_port());
    let metrics = free_port();
    let (cfg, _) = config("daemon-hup", metrics, &format!("ports = [{a}]\n"));
    let d = Daemon::start(&cfg, metrics, &[]);
    let _sa = serve(None, "127.0.0.1", a, false);
    let _sb = serve(None, "127.0.0.1", b, false);
    let traced = "packetflow_packets_traced_total{path=\"loopback\"}";
    client(None, "127.0.0.1", a, 50, 32, false);
    client(None, "127.0.0.1", b, 50, 32, false);
    let m = d.wait_metric(traced, 100.0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        value(&d.scrape(), traced),
        Some(100.0),
        "only port {a} is traced: {}",
        value(&m, traced).unwrap_or(0.0)
    );

    // New filter: port b only. The old numbers stay.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(&format!("ports = [{a}]"), &format!("ports = [{b}]"));
    std::fs::write(&cfg, &text).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded");
    client(None, "127.0.0.1", a, 50, 32, false);
    client(None, "127.0.0.1", b, 30, 32, false);
    d.wait_metric(traced, 160.0);
    std::thread::sleep(Duration::from_millis(1500));
    let m = d.scrape();
    assert_eq!(value(&m, traced), Some(160.0), "100 before the reload + 60 on port {b}");
    assert_eq!(value(&m, "packetflow_config_reloads_total{result=\"applied\"}"), Some(1.0));

    // A broken file: rejected with file:line, port b stays in force.
    std::fs::write(&cfg, format!("{text}sample = \"often\"\n")).unwrap();
    d.signal(libc::SIGHUP);
    d.wait_log("configuration rejected");
    let line = d.lines().into_iter().find(|l| l.contains("configuration rejected")).unwrap();
    let lineno = text.lines().count() + 1;
    assert!(line.contains(&format!("{}:{lineno}: sample:", cfg.display())), "{line}");
    client(None, "127.0.0.1", b, 20, 32, false);
    d.wait_metric(traced, 200.0);
    let m = d.scrape();
    assert_eq!(value(&m, traced), Some(200.0), "port {b} still traced after the rejected reload");
    assert_eq!(value(&m, "packetflow_config_reloads_total{result=\"rejected\"}"), Some(1.0));
}

#[test]
fn bad_config_at_start_exits_2_naming_file_line_and_key() {
    require_root();
    let metrics = free_port();
    for (extra, line, key) in [
        ("ports = [1, 2\n", 3, ""),
        ("sample = 2\nport = [80]\n", 4, "port"),
        ("sample = 2\n\nxdp_mode = \"sometimes\"\n", 5, "xdp_mode"),
        ("rotate_mb = 0\n", 3, "rotate_mb"),
    ] {
        let (cfg, _) = config("daemon-bad", metrics, extra);
        let out = Command::new(bin()).args(["daemon", "--config"]).arg(&cfg).stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(&format!("{}:{line}:", cfg.display())), "{extra:?}: {err}");
        assert!(err.contains(key), "{extra:?} names {key}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
        assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
    }
    let out = packetflow(&["daemon", "--config", "/nonexistent/packetflow.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file /nonexistent/packetflow.toml"));
    let out = packetflow(&["daemon", "--metrics-addr", "0.0.0.0:9999", "--socket", "/tmp/pf-never.sock"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("metrics_public"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn another_programs_xdp_is_not_clobbered_without_force() {
    require_root();
    let h = TestHosts::new("pfdx").expect("test hosts");
    let json = tmp("daemon-xdp-holder.json");
    let spec = format!("{}@{}", h.veth_b, h.ns_b);
    let mut holder = start_trace(&["-i", &spec, "--port", "1"], &json);
    let metrics = free_port();
    let (cfg, _) = config("daemon-xdp", metrics, &format!("stages = \"all\"\ninterfaces = [\"{spec}\"]\n"));
    let out = Command::new(bin()).args(["daemon", "--config"]).arg(&cfg).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let want = format!("held by pid {} (packetflow)", holder.0.id());
    assert!(
        err.contains(&format!("interface {} already has an XDP program", h.veth_b)) && err.contains(&want),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");
    assert!(xdp_on(&h, &h.ns_b, &h.veth_b).contains("pf_xdp"), "the holder's program is still there");

    let d = Daemon::start(&cfg, metrics, &["--force"]);
    assert!(d.logged("--force: detached the XDP program"), "{:?}", d.lines());
    let m = d.scrape();
    assert_eq!(
        value(&m, &format!("packetflow_stage_available{{stage=\"xdp\",hook=\"XDP on {} (native)\"}}", h.veth_b)),
        Some(1.0),
        "{m}"
    );
    drop(d);
    let _ = holder.interrupt(Duration::from_secs(5));
}

#[test]
fn user_option_drops_every_capability_and_keeps_working() {
    require_root();
    let port = unique_port();
    let metrics = free_port();
    let dir = tmp("daemon-user-traces");
    let _ = std::fs::remove_dir_all(&dir);
    let (cfg, _) = config("daemon-user", metrics, &format!("ports = [{port}]\ntrace_dir = \"{}\"\n", dir.display()));
    let mut d = Daemon::start(&cfg, metrics, &["--user", "nobody"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let field = |k: &str| {
        status.lines().find_map(|l| l.strip_prefix(k)).unwrap().split_whitespace().next().unwrap().to_string()
    };
    assert_eq!(field("Uid:"), "65534", "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapPrm:"), "0000000000000000");
    let _srv = serve(None, "127.0.0.1", port, false);
    client(None, "127.0.0.1", port, 20, 32, false);
    let m = d.wait_metric("packetflow_packets_traced_total{path=\"loopback\"}", 40.0);
    assert_eq!(value(&m, "packetflow_packets_traced_total{path=\"loopback\"}"), Some(40.0));
    // Still able to write trace files (the directory was handed over) and to reload.
    d.signal(libc::SIGHUP);
    d.wait_log("configuration reloaded");
    d.signal(libc::SIGTERM);
    assert_eq!(d.proc.wait(Duration::from_secs(5)).and_then(|s| s.code()), Some(0), "{:?}", d.lines());
    assert!(d.logged("configuration reloaded"), "{:?}", d.lines());
    let files = packetflow::format::trace_files::list(&dir);
    let traces: usize = files.iter().map(|(p, _)| traces(&read_ndjson(p)).len()).sum();
    assert_eq!(traces, 40, "{files:?}");
    // Each file is a recording `packetflow report` reads.
    let out = packetflow(&["report", files[0].0.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("loopback"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(wait_unloaded(), Vec::<String>::new());
}

#[test]
fn flood_keeps_memory_bounded_and_metrics_served() {
    require_root();
    let port = unique_port();
    let metrics = free_port();
    let dir = tmp("daemon-flood-traces");
    let _ = std::fs::remove_dir_all(&dir);
    // Full mode with trace files, the default correlator budget: the most memory the
    // daemon can use.
    let (cfg, _) = config(
        "daemon-flood",
        metrics,
        &format!("ports = [{port}]\ntrace_dir = \"{}\"\nrotate_mb = 4\nmax_total_mb = 16\n", dir.display()),
    );
    let d = Daemon::start(&cfg, metrics, &[]);
    // The receiver reads and discards the first half of the flood, then stops reading:
    // the datagrams its full buffer drops are traced up to the transport, and each waits
    // its timeout for socket stages that never come. That many pending traces exceed the
    // correlator's budget, which evicts flows (their traces finished early, incomplete).
    let rx = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) && n < 100_000 {
                // recv: an unconnected socket that names no sender; its records join
                // their flow by payload (correlate.rs `resolve`).
                if rx.recv(&mut buf).is_ok() {
                    n += 1;
                }
            }
        })
    };
    // 200,000 flows: one datagram each from its own source (127.1.a.b, port p), the
    // shape of a flood from random sources, at RATE flows a second (96,000 records a
    // second; a debug build keeps up on 2 cores). Bounded in count and in time (90 s).
    const FLOWS: u32 = 200_000;
    const PER_ADDR: u32 = 2_000;
    const RATE: u32 = 8_000;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(90);
    let senders: Vec<_> = (0..2u32)
        .map(|t| {
            std::thread::spawn(move || {
                let mut sent = 0u64;
                for i in (t..FLOWS).step_by(2) {
                    if Instant::now() > deadline {
                        break;
                    }
                    if i % 200 < 2 {
                        let due = start + Duration::from_secs_f64(f64::from(i) / f64::from(RATE));
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    }
                    let a = i / PER_ADDR;
                    let src = std::net::Ipv4Addr::new(127, 1, (a >> 8) as u8, a as u8 + 1);
                    let Ok(s) = std::net::UdpSocket::bind((src, 40_000 + (i % PER_ADDR) as u16)) else { continue };
                    if s.send_to(&i.to_be_bytes(), ("127.0.0.1", port)).is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    let mut max_rss_kib = 0u64;
    let mut scrapes = 0;
    let rss = || -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    while senders.iter().any(|s| !s.is_finished()) {
        max_rss_kib = max_rss_kib.max(rss());
        let t = Instant::now();
        let m = scrape(metrics).expect("metrics served during the flood");
        assert!(t.elapsed() < Duration::from_secs(2), "scrape took {:?}", t.elapsed());
        assert!(m.contains("packetflow_programs_attached "), "{m}");
        scrapes += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let sent: u64 = senders.into_iter().map(|t| t.join().unwrap()).sum();
    // Every datagram is accounted for once its trace times out (1 s) and the readers
    // deliver the rest: traced + each counted loss = sent.
    let account = |m: &str| -> (f64, f64, f64, f64) {
        let traced = value(m, "packetflow_packets_traced_total{path=\"loopback\"}").unwrap_or(0.0);
        // A full ring, or a run the kernel skipped: either way no device-queue record.
        let ring = m
            .lines()
            .filter(|l| {
                l.starts_with("packetflow_events_lost_total{stage=\"dev_queue\"")
                    || l.starts_with("packetflow_events_missed_total{stage=\"dev_queue\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        let reader = value(m, "packetflow_packets_lost_total{cause=\"reader_behind\"}").unwrap();
        let evicted = value(m, "packetflow_packets_lost_total{cause=\"evicted\"}").unwrap();
        (traced, ring, reader, evicted)
    };
    let t0 = Instant::now();
    let (m, (traced, ring, reader_lost, evicted)) = loop {
        max_rss_kib = max_rss_kib.max(rss());
        let m = d.scrape();
        let a = account(&m);
        if a.0 + a.1 + a.2 + a.3 >= sent as f64 || t0.elapsed() > Duration::from_secs(20) {
            break (m, a);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    let on_disk: u64 = packetflow::format::trace_files::list(&dir).iter().map(|(_, n)| n).sum();
    println!(
        "flood metrics at the end:\n{}",
        m.lines().filter(|l| !l.starts_with('#') && !l.contains("_bucket")).collect::<Vec<_>>().join("\n")
    );
    println!(
        "flood: {sent} datagrams from {sent} flows sent; {traced} traced, lost: {ring} in the kernel's ring, {reader_lost} by a reader behind, {evicted} evicted with their flow; flows evicted {}, records evicted {}; correlator {:.1} MiB of {:.0}; max RSS {} MiB; {scrapes} scrapes; {} files deleted, {:.1} MiB on disk",
        value(&m, "packetflow_correlation_evictions_total{what=\"flows\"}").unwrap(),
        value(&m, "packetflow_correlation_evictions_total{what=\"records\"}").unwrap(),
        value(&m, "packetflow_correlator_bytes").unwrap() / f64::from(1 << 20),
        value(&m, "packetflow_correlator_budget_bytes").unwrap() / f64::from(1 << 20),
        max_rss_kib / 1024,
        value(&m, "packetflow_trace_files_deleted_total").unwrap(),
        on_disk as f64 / f64::from(1 << 20)
    );
    assert!(sent >= u64::from(FLOWS) * 9 / 10, "the flood was sent: {sent} of {FLOWS}");
    assert_eq!(traced + ring + reader_lost + evicted, sent as f64, "sent = traced + each counted loss");
    let complete = value(&m, "packetflow_packets_complete_total{path=\"loopback\"}").unwrap();
    assert!(complete > 50_000.0, "the read half of the flood was traced whole: {complete} complete");
    assert!(traced > sent as f64 / 2.0, "most of the flood was traced: {traced} of {sent}");
    assert!(
        value(&m, "packetflow_correlation_evictions_total{what=\"flows\"}").unwrap() > 0.0,
        "the unread half held more pending traces than the budget: flows were evicted"
    );
    assert!(max_rss_kib <= 96 * 1024, "RSS {max_rss_kib} KiB over the documented 96 MiB");
    assert!(on_disk <= (16 << 20) + (1 << 20), "trace files total {on_disk} bytes over max_total_mb");
    drop(d);
}

#[test]
fn systemd_unit_verifies() {
    require_root();
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/packetflow.service");
    let exec = Path::new("/usr/local/bin/packetflow");
    // systemd-analyze checks that ExecStart's binary exists: put this build there for
    // the check when nothing is installed.
    let placed = !exec.exists();
    if placed {
        std::os::unix::fs::symlink(bin(), exec).unwrap();
    }
    let out =
        Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("systemd-analyze (Debian: systemd)");
    if placed {
        let _ = std::fs::remove_file(exec);
    }
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify: {text}");
}

/// Open descriptors of process `pid`.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, std::iter::Iterator::count)
}

#[test]
fn idle_metrics_clients_leave_scrapes_served_and_descriptors_bounded() {
    require_root();
    const CLIENTS: usize = 2000;
    // Room for the clients here (the daemon inherits the limit: without the cap it could
    // hold them all).
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes into `lim`, an rlimit we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) }, 0);
    let want = (4 * CLIENTS) as libc::rlim_t;
    if lim.rlim_cur < want {
        lim.rlim_cur = want.min(lim.rlim_max);
        // SAFETY: setrlimit(2) reads `lim`, an rlimit we own.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) }, 0, "raising RLIMIT_NOFILE");
    }
    assert!(lim.rlim_cur >= (CLIENTS + 500) as libc::rlim_t, "RLIMIT_NOFILE {} is too low", lim.rlim_cur);
    let metrics = free_port();
    let (cfg, _) = config("daemon-idle-clients", metrics, "");
    let d = Daemon::start(&cfg, metrics, &[]);
    d.scrape();
    let base = open_fds(d.pid());
    // 2,000 clients that connect and never send a request (bounded: one pass, 3 s each).
    let mut idle = Vec::with_capacity(CLIENTS);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics));
    for i in 0..CLIENTS {
        let c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("idle client {i} could not connect: {e}"));
        idle.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut most = open_fds(d.pid());
    // Scrapes are served, fast, while the idle clients stay connected.
    for _ in 0..5 {
        let t = Instant::now();
        let m = scrape(metrics).expect("scrape with 2,000 idle clients connected");
        assert!(t.elapsed() < Duration::from_secs(2), "scrape took {:?}", t.elapsed());
        assert!(m.contains("packetflow_programs_attached "), "{m}");
        most = most.max(open_fds(d.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("daemon descriptors: {base} before, at most {most} with {CLIENTS} idle clients");
    assert!(
        most <= base + 64 + 8,
        "{most} descriptors open (before the clients: {base}): not capped at 64 connections"
    );
    let m = d.scrape();
    let dropped = |reason: &str| {
        value(&m, &format!("packetflow_metrics_connections_dropped_total{{reason=\"{reason}\"}}")).unwrap_or(-1.0)
    };
    assert!(
        dropped("idle_evicted") + dropped("timeout") >= (CLIENTS - 64) as f64,
        "every idle client past the cap was closed, and counted: {}",
        m.lines().filter(|l| l.starts_with("packetflow_metrics_")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(value(&m, "packetflow_metrics_accept_errors_total"), Some(0.0));
    drop(idle);
    drop(d);
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command's closing parenthesis: state, ppid, ...; utime and stime are the
    // 12th and 13th of these (fields 14 and 15 of proc(5)).
    let f: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf(3) has no memory preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / tick)
}

#[test]
fn metrics_accept_errors_back_off_instead_of_spinning() {
    require_root();
    let metrics = free_port();
    let (cfg, _) = config("daemon-emfile", metrics, "");
    let d = Daemon::start(&cfg, metrics, &[]);
    d.scrape();
    // Leave the daemon 10 free descriptors, then queue 40 connections: accept fails with EMFILE.
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: prlimit(2) writes the old limit into `old`, an rlimit we own; the new-limit pointer
    // is null (no change).
    assert_eq!(unsafe { libc::prlimit(d.pid(), libc::RLIMIT_NOFILE, std::ptr::null(), &raw mut old) }, 0);
    let tight = libc::rlimit { rlim_cur: (open_fds(d.pid()) + 10) as libc::rlim_t, rlim_max: old.rlim_max };
    // SAFETY: prlimit(2) reads the new limit from an rlimit we own; the old-limit pointer is null.
    assert_eq!(unsafe { libc::prlimit(d.pid(), libc::RLIMIT_NOFILE, &raw const tight, std::ptr::null_mut()) }, 0);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics));
    let idle: Vec<TcpStream> =
        (0..40).map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("queued")).collect();
    std::thread::sleep(Duration::from_millis(200));
    let cpu0 = cpu_time(d.pid());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_time(d.pid()).checked_sub(cpu0).unwrap();
    // SAFETY: prlimit(2) reads the new limit from an rlimit we own; the old-limit pointer is null.
    assert_eq!(unsafe { libc::prlimit(d.pid(), libc::RLIMIT_NOFILE, &raw const old, std::ptr::null_mut()) }, 0);
    drop(idle);
    println!("daemon CPU over 2 s with accept failing: {spent:?}");
    assert!(spent < Duration::from_millis(500), "the accept loop spun: {spent:?} of CPU in 2 s");
    // Descriptors back: served again, and the failures were counted.
    let t0 = Instant::now();
    let m = loop {
        if let Ok(m) = scrape(metrics) {
            break m;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "not served again after the limit was restored");
        std::thread::sleep(Duration::from_millis(100));
    };
    let errors = value(&m, "packetflow_metrics_accept_errors_total").unwrap_or(0.0);
    assert!((2.0..=40.0).contains(&errors), "about 10 failed accepts a second were counted: {errors}");
    drop(d);
}

/// The id of the XDP program on `dev` in namespace `ns` ("prog/xdp id N" in `ip -d link`).
fn xdp_prog_id(ns: &str, dev: &str) -> Option<u32> {
    let out = Command::new("ip").args(["-n", ns, "-d", "link", "show", "dev", dev]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rest = text.split("prog/xdp id ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// The interface index of `dev` in namespace `ns`.
fn ifindex_in(ns: &str, dev: &str) -> u32 {
    let out = Command::new("ip").args(["-n", ns, "-o", "link", "show", "dev", dev]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split(':').next().unwrap().trim().parse().unwrap()
}

#[test]
fn force_detaches_the_holders_xdp_only_from_the_named_interface() {
    require_root();
    let h = TestHosts::new("pfdo").expect("test hosts");
    // A second interface beside veth_b in the same namespace (a veth pair of its own).
    let (c, d) = (format!("{}c", h.veth_b), format!("{}d", h.veth_b));
    testhosts::ip(&["-n", &h.ns_b, "link", "add", &c, "type", "veth", "peer", "name", &d]).unwrap();
    for dev in [&c, &d] {
        testhosts::ip(&["-n", &h.ns_b, "link", "set", dev, "up"]).unwrap();
    }
    let json = tmp("daemon-force-holder.json");
    let (spec_b, spec_c) = (format!("{}@{}", h.veth_b, h.ns_b), format!("{c}@{}", h.ns_b));
    let mut holder = start_trace(&["-i", &spec_b, "-i", &spec_c, "--port", "1"], &json);
    let prog = xdp_prog_id(&h.ns_b, &h.veth_b).expect("the holder's XDP program on veth_b");
    assert_eq!(xdp_prog_id(&h.ns_b, &c), Some(prog), "one program, two interfaces");

    let metrics = free_port();
    let (cfg, _) = config("daemon-force", metrics, &format!("stages = \"all\"\ninterfaces = [\"{spec_b}\"]\n"));
    let d1 = Daemon::start(&cfg, metrics, &["--force"]);
    assert!(d1.logged(&format!("--force: detached the XDP program {prog}")), "{:?}", d1.lines());
    let now_b = xdp_prog_id(&h.ns_b, &h.veth_b);
    assert!(now_b.is_some() && now_b != Some(prog), "the daemon's program replaced the holder's on veth_b: {now_b:?}");
    assert_eq!(xdp_prog_id(&h.ns_b, &c), Some(prog), "the holder keeps its program on {c}");
    drop(d1);
    let _ = holder.interrupt(Duration::from_secs(5));
}

#[test]
fn force_detaches_nothing_it_cannot_tell_apart() {
    require_root();
    // veth_a and veth_b live in two namespaces, each with its own index space: they may
    // share an index, and an XDP bpf_link tells the index but not the namespace.
    let h = TestHosts::new("pfdn").expect("test hosts");
    let json = tmp("daemon-force-ns-holder.json");
    let (spec_a, spec_b) = (format!("{}@{}", h.veth_a, h.ns_a), format!("{}@{}", h.veth_b, h.ns_b));
    let mut holder = start_trace(&["-i", &spec_a, "-i", &spec_b, "--port", "1"], &json);
    let prog = xdp_prog_id(&h.ns_a, &h.veth_a).expect("the holder's XDP program on veth_a");
    assert_eq!(xdp_prog_id(&h.ns_b, &h.veth_b), Some(prog));
    let metrics = free_port();
    let (cfg, _) = config("daemon-force-ns", metrics, &format!("stages = \"all\"\ninterfaces = [\"{spec_b}\"]\n"));
    if ifindex_in(&h.ns_a, &h.veth_a) == ifindex_in(&h.ns_b, &h.veth_b) {
        let child = Command::new(bin())
            .args(["daemon", "--force", "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut p = Proc(child);
        // Bounded: a daemon that detached something starts and runs (killed on drop).
        let code = p.wait(Duration::from_secs(20)).and_then(|s| s.code());
        if code.is_none() {
            let _ = p.0.kill();
        }
        let mut err = String::new();
        let _ = p.0.stderr.take().unwrap().read_to_string(&mut err);
        assert_eq!(code, Some(2), "refused, not started: {err}");
        assert!(err.contains("--force detaches nothing") && err.contains("network namespaces"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(xdp_prog_id(&h.ns_b, &h.veth_b), Some(prog), "veth_b keeps the holder's program");
    } else {
        let d = Daemon::start(&cfg, metrics, &["--force"]);
        assert!(d.logged("--force: detached"), "{:?}", d.lines());
        drop(d);
    }
    assert_eq!(xdp_prog_id(&h.ns_a, &h.veth_a), Some(prog), "the holder keeps its program on veth_a");
    let _ = holder.interrupt(Duration::from_secs(5));
}

/// Runs `packetflow daemon --config CFG`, which should fail at start: its exit code (None
/// if it was still running after 30 s and had to be killed) and its stderr.
fn daemon_start_error(cfg: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(bin())
        .args(["daemon", "--config"])
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut p = Proc(child);
    let code = p.wait(Duration::from_secs(30)).and_then(|st| st.code());
    drop(p);
    let mut text = String::new();
    let _ = err.read_to_string(&mut text);
    (code, text)
}

#[test]
fn control_socket_path_holding_a_regular_file_is_refused_and_kept() {
    require_root();
    let metrics = free_port();
    let (cfg, socket) = config("daemon-ctl-file", metrics, "");
    std::fs::write(&socket, "not a socket").unwrap();
    let (code, err) = daemon_start_error(&cfg);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    assert!(err.contains(&format!("control_socket {} exists and is not a socket", socket.display())), "{err}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not a socket", "the file is intact");
}

#[test]
fn a_symlinked_trace_dir_is_refused() {
    require_root();
    let metrics = free_port();
    let real = tmp("daemon-real-traces");
    let link = tmp("daemon-link-traces");
    let _ = std::fs::remove_dir_all(&real);
    let _ = std::fs::remove_file(&link);
    std::fs::create_dir_all(&real).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (cfg, _) = config("daemon-link", metrics, &format!("trace_dir = \"{}\"\n", link.display()));
    let (code, err) = daemon_start_error(&cfg);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err.trim(),
        format!(
            "packetflow: refusing to use trace_dir {}: it is a symbolic link (name the directory it points to)",
            link.display()
        )
    );
    assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
}

#[test]
fn a_full_trace_disk_is_counted_and_the_daemon_keeps_running() {
    require_root();
    let port = unique_port();
    let metrics = free_port();
    let disk = Tmpfs::mount("daemon-full-traces", "256k");
    let (cfg, _) = config(
        "daemon-full",
        metrics,
        &format!("ports = [{port}]\ntrace_dir = \"{}\"\nrotate_mb = 1\nmax_total_mb = 4\n", disk.0.display()),
    );
    let mut d = Daemon::start(&cfg, metrics, &[]);
    let _srv = serve(None, "127.0.0.1", port, true);
    // Traced UDP until the writer reports an error (at most 20 s, 20,000 datagrams).
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let t0 = Instant::now();
    let mut sent = 0;
    while t0.elapsed() < Duration::from_secs(20) && sent < 20_000 {
        for _ in 0..100 {
            let _ = s.send_to(&[b'x'; 64], ("127.0.0.1", port));
        }
        sent += 100;
        std::thread::sleep(Duration::from_millis(10));
        if sent % 1000 == 0 && value(&d.scrape(), "packetflow_trace_write_errors_total").unwrap_or(0.0) >= 1.0 {
            break;
        }
    }
    // More while the writer pauses: each line is counted, no file is opened per line.
    for _ in 0..10 {
        for _ in 0..100 {
            let _ = s.send_to(&[b'x'; 64], ("127.0.0.1", port));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(d.proc.0.try_wait().unwrap().is_none(), "the daemon keeps running: {:?}", d.lines());
    let m = d.scrape();
    let errors = value(&m, "packetflow_trace_write_errors_total").unwrap();
    let written = value(&m, "packetflow_trace_lines_written_total").unwrap();
    let dropped = value(&m, "packetflow_trace_lines_dropped_total").unwrap();
    println!("{sent} datagrams; {written} lines written, {dropped} dropped, {errors} write errors");
    assert!((1.0..=3.0).contains(&errors), "{errors} write errors: one per pause, not one per line");
    assert!(dropped >= 1000.0, "lines not written are counted: {dropped}");
    // Honest: the files hold exactly the lines counted as written (whole lines only).
    let files = packetflow::format::trace_files::list(&disk.0);
    assert!(files.len() <= 2, "no file per line: {files:?}");
    let on_disk: usize = files.iter().map(|(p, _)| traces(&read_ndjson(p)).len()).sum();
    assert_eq!(on_disk as f64, written, "trace lines on disk vs packetflow_trace_lines_written_total");
    assert!(d.logged("No space left on device"), "{:?}", d.lines());
    d.signal(libc::SIGTERM);
    let st = d.proc.wait(Duration::from_secs(10)).expect("the daemon stops on SIGTERM");
    assert!(st.success(), "{:?}", d.lines());
}
