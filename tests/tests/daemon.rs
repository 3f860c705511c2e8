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
fn metrics_cover_every_stage_of_both_paths_and_match_the_traffic() {
    require_root();
    assert!(pf_programs().is_empty(), "another packetflow is running: {:?}", pf_programs());
    let h = TestHosts::new("pfdm").expect("test hosts");
    let port = unique_port();
    let metrics = free_port();
    let ifaces = format!("interfaces = [\"lo\", \"{}@{}\", \"{}@{}\"]\n", h.veth_a, h.ns_a, h.veth_b, h.ns_b);
    let (cfg, socket) = config("daemon-metrics", metrics, &format!("{ifaces}ports = [{port}]\n"));
    let d = Daemon::start(&cfg, metrics, &[]);
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600, "control socket is root-only");

    let _lo = serve(None, "127.0.0.1", port, false);
    let _nic = serve(Some(&h.path_b()), netns::ADDR_B, port, false);
    let n = 200u64;
    client(None, "127.0.0.1", port, n, 64, false);
    client(Some(&h.path_a()), netns::ADDR_B, port, n, 64, false);
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

#[test]
fn sigterm_and_sigkill_leave_nothing_attached() {
    require_root();
    let h = TestHosts::new("pfdk").expect("test hosts");
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        let metrics = free_port();
        let (cfg, socket) =
            config("daemon-exit", metrics, &format!("interfaces = [\"lo\", \"{}@{}\"]\n", h.veth_b, h.ns_b));
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
    let (cfg, _) = config("daemon-xdp", metrics, &format!("interfaces = [\"{spec}\"]\n"));
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
    let files = packetflow::trace_files::list(&dir);
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
    // Full mode with trace files: the most memory the daemon can use.
    let (cfg, _) = config(
        "daemon-flood",
        metrics,
        &format!("ports = [{port}]\ntrace_dir = \"{}\"\nrotate_mb = 4\nmax_total_mb = 16\n", dir.display()),
    );
    let d = Daemon::start(&cfg, metrics, &[]);
    let _srv = serve(None, "127.0.0.1", port, true);
    // 60 s of UDP from two senders, bounded in time and count.
    let stop = Instant::now() + Duration::from_secs(60);
    let senders: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let msg = [b'x'; 64];
                let mut sent = 0u64;
                while Instant::now() < stop && sent < 50_000_000 {
                    for _ in 0..1000 {
                        let _ = s.send_to(&msg, ("127.0.0.1", port));
                    }
                    sent += 1000;
                }
                sent
            })
        })
        .collect();
    let mut max_rss_kib = 0u64;
    let mut scrapes = 0;
    while Instant::now() < stop {
        let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        let rss: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        max_rss_kib = max_rss_kib.max(rss);
        let t = Instant::now();
        let m = scrape(metrics).expect("metrics served during the flood");
        assert!(t.elapsed() < Duration::from_secs(2), "scrape took {:?}", t.elapsed());
        assert!(m.contains("packetflow_programs_attached "), "{m}");
        scrapes += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    let sent: u64 = senders.into_iter().map(|t| t.join().unwrap()).sum();
    std::thread::sleep(Duration::from_secs(2));
    let m = d.scrape();
    let traced = value(&m, "packetflow_packets_traced_total{path=\"loopback\"}").unwrap();
    let dropped = value(&m, "packetflow_records_dropped_total").unwrap()
        + value(&m, "packetflow_trace_lines_dropped_total").unwrap()
        + m.lines()
            .filter(|l| l.starts_with("packetflow_events_lost_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    let on_disk: u64 = packetflow::trace_files::list(&dir).iter().map(|(_, n)| n).sum();
    println!(
        "flood: {sent} datagrams sent, {traced} traced, {dropped} records/lines/events dropped (counted), max RSS {} MiB, {scrapes} scrapes, {} files deleted, {:.1} MiB on disk",
        max_rss_kib / 1024,
        value(&m, "packetflow_trace_files_deleted_total").unwrap(),
        on_disk as f64 / (1 << 20) as f64
    );
    assert!(max_rss_kib < 200 * 1024, "RSS {max_rss_kib} KiB over the documented 200 MiB");
    assert!(traced > 10_000.0, "the flood was traced: {traced}");
    assert!(on_disk <= (16 << 20) + (1 << 20), "trace files total {on_disk} bytes over max_total_mb");
    assert!(value(&m, "packetflow_trace_files_deleted_total").unwrap() >= 1.0, "rotation deleted old files");
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
    let files = packetflow::trace_files::list(&disk.0);
    assert!(files.len() <= 2, "no file per line: {files:?}");
    let on_disk: usize = files.iter().map(|(p, _)| traces(&read_ndjson(p)).len()).sum();
    assert_eq!(on_disk as f64, written, "trace lines on disk vs packetflow_trace_lines_written_total");
    assert!(d.logged("No space left on device"), "{:?}", d.lines());
    d.signal(libc::SIGTERM);
    let st = d.proc.wait(Duration::from_secs(10)).expect("the daemon stops on SIGTERM");
    assert!(st.success(), "{:?}", d.lines());
}
