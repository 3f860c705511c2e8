//! Interfaces that come and go while tracing: a deleted interface's stages stop and the
//! run goes on; under `-i any`, interfaces that appear are attached.

use std::{
    io::{BufRead, BufReader, Read, Write},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use packetflow_tests::*;

/// A packetflow process whose stdout and stderr lines are collected as they come.
struct Lines {
    proc: Proc,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    fn spawn(args: &[&str]) -> Lines {
        let mut child = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting packetflow");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in
            [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
        {
            let l = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    println!("[packetflow] {line}");
                    l.lock().unwrap().push(line);
                }
            });
        }
        Lines { proc: Proc(child), lines }
    }

    /// Waits (at most `max`) for a line containing `s`.
    fn wait_for(&self, s: &str, max: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < max {
            if self.lines.lock().unwrap().iter().any(|l| l.contains(s)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn value(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix))?.rsplit(' ').next()?.parse().ok()
}

#[test]
fn a_deleted_interface_stops_its_stages_and_tracing_goes_on() {
    require_root();
    let h = TestHosts::new("pfgone").expect("test hosts");
    let port = unique_port();
    let spec = format!("{}@{}", h.veth_a, h.ns_a);
    let json = tmp("lost-interface.ndjson");
    let json_s = json.to_string_lossy().into_owned();
    let mut t = Lines::spawn(&[
        "trace",
        "-i",
        &spec,
        "-i",
        "lo",
        "--port",
        &port.to_string(),
        "--duration",
        "8",
        "--json",
        &json_s,
    ]);
    assert!(t.wait_for("tracing (", Duration::from_secs(30)), "trace did not start");
    testhosts::ip(&["netns", "del", &h.ns_a]).expect("deleting the namespace");
    let want = format!("lost interface {}@/run/netns/{}: its stages stop", h.veth_a, h.ns_a);
    assert!(t.wait_for(&want, Duration::from_secs(5)), "no '{want}' line");
    // Tracing goes on: loopback traffic after the loss is traced.
    let _srv = serve(None, "127.0.0.1", port, false);
    client(None, "127.0.0.1", port, 20, 18, false);
    let st = t.proc.wait(Duration::from_secs(20)).expect("trace ended at --duration");
    assert!(st.success(), "trace exited with {st}");
    assert!(t.wait_for("final summary", Duration::from_secs(1)));
    let lines = read_ndjson(&json);
    let after = traces(&lines).iter().filter(|t| t["path"] == "loopback" && t["complete"] == true).count();
    assert!(after >= 40, "20 exchanges on loopback after the loss traced whole: {after}");
}

#[test]
fn the_daemon_reports_a_lost_interface_in_stage_available() {
    require_root();
    let h = TestHosts::new("pfgond").expect("test hosts");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tmp("daemon-lost-interface");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("packetflow.toml");
    std::fs::write(
        &cfg,
        format!(
            "metrics_addr = \"127.0.0.1:{metrics}\"\ncontrol_socket = \"{}\"\nstages = \"all\"\ninterfaces = [\"{}@{}\"]\n",
            dir.join("ctl.sock").display(),
            h.veth_a,
            h.ns_a
        ),
    )
    .unwrap();
    let cfg = cfg.to_string_lossy().into_owned();
    let mut d = Lines::spawn(&["daemon", "--config", &cfg]);
    assert!(d.wait_for("ready:", Duration::from_secs(30)), "daemon not ready");
    let before = scrape(metrics);
    assert_eq!(value(&before, "packetflow_stage_available{stage=\"xdp\""), Some(1.0), "{before}");
    let links = value(&before, "packetflow_programs_attached ").unwrap();
    testhosts::ip(&["netns", "del", &h.ns_a]).expect("deleting the namespace");
    assert!(d.wait_for(&format!("lost interface {}", h.veth_a), Duration::from_secs(5)), "no 'lost interface' line");
    // The snapshot /metrics serves is taken right after that line: wait for it (at most 3 s).
    let t0 = Instant::now();
    let mut after = scrape(metrics);
    while value(&after, "packetflow_stage_available{stage=\"xdp\"") != Some(0.0)
        && t0.elapsed() < Duration::from_secs(3)
    {
        std::thread::sleep(Duration::from_millis(100));
        after = scrape(metrics);
    }
    for stage in ["xdp", "tc_ingress", "tc_egress"] {
        let m = format!("packetflow_stage_available{{stage=\"{stage}\"");
        assert_eq!(value(&after, &m), Some(0.0), "{stage} after the loss:\n{after}");
    }
    assert_eq!(value(&after, "packetflow_programs_attached "), Some(links - 3.0), "the three links died");
    assert_eq!(d.proc.0.try_wait().unwrap(), None, "the daemon keeps running");
}

#[test]
fn any_attaches_interfaces_that_appear() {
    require_root();
    let h = TestHosts::new("pfany").expect("test hosts");
    let spec = format!("any@{}", h.ns_a);
    let t = Lines::spawn(&["trace", "-i", &spec, "--duration", "8"]);
    assert!(t.wait_for("tracing (", Duration::from_secs(30)), "trace did not start");
    testhosts::ip(&["-n", &h.ns_a, "link", "add", "pfnew0", "type", "veth", "peer", "name", "pfnew1"])
        .expect("new veth");
    for name in ["pfnew0", "pfnew1"] {
        assert!(t.wait_for(&format!("new interface {name}: attached"), Duration::from_secs(5)), "{name} not attached");
    }
}

#[test]
fn capture_says_which_interface_it_lost_and_goes_on() {
    require_root();
    let h = TestHosts::new("pfgonc").expect("test hosts");
    let spec = format!("{}@{}", h.veth_a, h.ns_a);
    let mut c = Lines::spawn(&["capture", "-i", &spec, "-i", "lo", "--duration", "6", "udp"]);
    assert!(c.wait_for("capturing on", Duration::from_secs(30)), "capture did not start");
    testhosts::ip(&["netns", "del", &h.ns_a]).expect("deleting the namespace");
    let want = format!("lost interface {}@/run/netns/{}: its stages stop", h.veth_a, h.ns_a);
    assert!(c.wait_for(&want, Duration::from_secs(5)), "no '{want}' line");
    let st = c.proc.wait(Duration::from_secs(20)).expect("capture ended at --duration");
    assert!(st.success(), "capture exited with {st}");
    assert!(c.wait_for("packets captured", Duration::from_secs(1)), "no statistics at the end");
}
