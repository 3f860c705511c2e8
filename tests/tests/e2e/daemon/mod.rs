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

mod files;
mod metrics;
mod prometheus;
mod xdp;

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
