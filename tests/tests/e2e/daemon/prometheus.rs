//! A real Prometheus (Debian's `prometheus`) scrapes the daemon: its
//! `histogram_quantile(0.99, ...)` over the stage histogram agrees with `status --json`'s
//! p99 within one bucket, and every query of the Grafana dashboard (dist/) returns data.

use std::net::UdpSocket;

use packetflow::platform::netns::in_netns;
use serde_json::Value;

use super::*;

/// Percent-encodes a query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `path` from Prometheus on 127.0.0.1:`port`: status code and body.
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, body.to_string()))
}

/// An instant query's result vector.
fn query(port: u16, q: &str) -> Vec<Value> {
    let (code, body) = get(port, &format!("/api/v1/query?query={}", encode(q))).expect("Prometheus answers");
    let j: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    assert!(code == 200 && j["status"] == "success", "{q}: {code} {body}");
    j["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The workspace root (dist/ is there).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

/// A program on $PATH.
fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

fn sample(v: &Value) -> f64 {
    v["value"][1].as_str().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN)
}

#[test]
fn prometheus_scrapes_the_daemon_and_the_dashboard_queries_return_data() {
    require_root();
    let Ok(prometheus) = which("prometheus") else {
        panic!("Debian's prometheus is not installed (cargo xtask setup installs it)");
    };
    let h = TestHosts::new("pfprom").expect("test hosts");
    let port = unique_port();
    let metrics = free_port();
    let extra = format!(
        "stages = \"all\"\ncost_sample_secs = 1\nports = [{port}]\ninterfaces = [\"{}@{}\", \"{}@{}\"]\n",
        h.veth_a, h.ns_a, h.veth_b, h.ns_b
    );
    let (cfg, socket) = config("daemon-prometheus", metrics, &extra);
    let d = Daemon::start(&cfg, metrics, &[]);

    // Prometheus on a port of its own, scraping the daemon every second.
    let dir = tmp("prometheus");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let prom_port = free_port();
    let prom_cfg = dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: packetflow\n    static_configs:\n      - targets: ['127.0.0.1:{metrics}']\n"
        ),
    )
    .unwrap();
    let _prom = Proc(
        Command::new(prometheus)
            .arg(format!("--config.file={}", prom_cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus"),
    );
    let t0 = Instant::now();
    while get(prom_port, "/-/ready").map(|r| r.0).ok() != Some(200) {
        assert!(t0.elapsed() < Duration::from_secs(30), "prometheus not ready within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Traffic over the veth: TCP exchanges, one segment dropped once by nftables (a
    // retransmission), and UDP to a closed port (NO_SOCKET drops).
    crate::drops::nft(
        &h.ns_b,
        &format!(
            "table inet pfprom {{\n chain input {{\n type filter hook input priority 0;\n tcp dport {port} ip length > 700 limit rate 1/hour burst 1 packets counter drop\n }}\n}}\n"
        ),
    );
    let _srv = serve(Some(&h.path_b()), testhosts::ADDR_B, port, false);
    client(Some(&h.path_a()), testhosts::ADDR_B, port, 300, 64, false);
    client(Some(&h.path_a()), testhosts::ADDR_B, port, 3, 800, false);
    let tx = in_netns(Some(&h.path_a()), || Ok(UdpSocket::bind((testhosts::ADDR_A, 0))?)).expect("bind");
    for i in 0..5u64 {
        tx.send_to(&pattern(100, i + 1), (testhosts::ADDR_B, port + 1)).expect("send");
    }
    d.wait_metric("packetflow_packets_traced_total{path=\"nic\"}", 600.0);
    // (Summary mode counts retransmits in the kernel, by the flow's lower port.)
    let rtx = format!("packetflow_retransmits_total{{port=\"{port}\"}}");
    let m = d.wait_metric(&rtx, 1.0);
    assert!(value(&m, &rtx) >= Some(1.0), "the dropped segment's retransmission is counted: {m}");

    // Wait until Prometheus holds a few scrapes of the counts after the traffic.
    let t0 = Instant::now();
    let traced = "packetflow_packets_traced_total{path=\"nic\"}";
    loop {
        let r =
            query(prom_port, &format!("count_over_time(packetflow_retransmits_total[1m]) and on () {traced} >= 600"));
        if r.first().is_some_and(|v| sample(v) >= 4.0) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "Prometheus never scraped the traffic's counts: {r:?}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // p99 of three stages: Prometheus's (interpolated within the bucket holding the 99th
    // percentile) and the daemon's (HdrHistogram) fall in the same bucket or the next.
    let st = packetflow(&["status", "--json", "--socket", socket.to_str().unwrap()]);
    let j: Value = serde_json::from_slice(&st.stdout).expect("status --json");
    let m = d.scrape();
    let bounds: Vec<f64> = m
        .lines()
        .filter(|l| l.starts_with("packetflow_end_to_end_latency_seconds_bucket{path=\"nic\",le=\""))
        .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next()?.parse().ok())
        .collect();
    assert!(bounds.len() > 100, "bucket bounds: {bounds:?}");
    let bucket = |v: f64| bounds.iter().position(|b| v <= *b * 1.000_001).unwrap_or(bounds.len());
    for stage in ["sock_queue", "copy_to_user", "netif_receive"] {
        let ours = j["paths"]["nic"]["stages"][stage]["p99_ns"].as_f64().expect("p99") / 1e9;
        let q = format!(
            "histogram_quantile(0.99, sum by (le) (packetflow_stage_latency_seconds_bucket{{path=\"nic\",stage=\"{stage}\"}}))"
        );
        let theirs = sample(query(prom_port, &q).first().expect("a p99 from Prometheus"));
        assert!(
            bucket(ours).abs_diff(bucket(theirs)) <= 1,
            "{stage}: Prometheus p99 {theirs} s (bucket {}), status --json {ours} s (bucket {})",
            bucket(theirs),
            bucket(ours)
        );
    }

    // Every query of the dashboard, with `$path` as "all paths", returns data.
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(workspace().join("dist/grafana-dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    let mut n = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let q = target["expr"].as_str().expect("expr").replace("$path", ".*");
            let r = query(prom_port, &q);
            assert!(!r.is_empty(), "panel '{}': no data for {q}", panel["title"]);
            n += 1;
        }
    }
    assert!(n >= 10, "{n} queries");
    drop(d);
}
