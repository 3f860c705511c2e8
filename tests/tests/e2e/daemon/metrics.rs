//! The daemon's metrics: every stage of both paths against the traffic, its own cost,
//! a bounded-memory flood, idle and failing metrics clients.

use super::*;

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
    // The same facts as one JSON object: counts and p99s agree with /metrics' histograms.
    let st = packetflow(&["status", "--json", "--socket", socket.to_str().unwrap()]);
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let j: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status --json is one JSON object");
    assert_eq!(j["type"], "status");
    assert_eq!(j["daemon"]["pid"], d.pid());
    assert!(j["daemon"]["hooks"]["xdp"]["hook"].as_str().unwrap_or_default().starts_with("XDP on lo (generic)"), "{j}");
    for path in ["loopback", "nic"] {
        assert!(j["paths"][path]["traces"].as_u64() >= Some(2 * n), "{path}: {j}");
        let p99 = j["paths"][path]["stages"]["sock_queue"]["p99_ns"].as_f64().expect("sock_queue p99") / 1e9;
        // The first bucket bound at or above the p99 holds at least 99% of the packets.
        let buckets: Vec<(f64, f64)> = m
            .lines()
            .filter(|l| {
                l.starts_with(&format!(
                    "packetflow_stage_latency_seconds_bucket{{path=\"{path}\",stage=\"sock_queue\",le="
                ))
            })
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?.parse::<f64>().ok()?;
                Some((le, l.rsplit(' ').next()?.parse::<f64>().ok()?))
            })
            .collect();
        let (le, below) = buckets.iter().find(|(le, _)| *le >= p99).expect("a bucket above the p99");
        let total =
            value(&m, &format!("packetflow_stage_latency_seconds_count{{path=\"{path}\",stage=\"sock_queue\"}}"))
                .unwrap();
        assert!(*below >= 0.99 * total, "{path}: {below} of {total} at or below {le} s, p99 {p99} s");
        // ... and a bucket more than one step (×1.1) below it holds fewer.
        if let Some((le, below)) = buckets.iter().rev().find(|(le, _)| *le < p99 / 1.1) {
            assert!(*below < 0.99 * total, "{path}: {below} of {total} at or below {le} s, p99 {p99} s");
        }
    }
    drop(d);
}

/// The daemon samples the kernel's run statistics (`cost_sample_secs`): on for one second
/// in every N, and /metrics and status say how long they were on; the sysctl is as it
/// was once the daemon is gone.
/// `connections = true`: per-listener connection set-up metrics, from the kernel's own
/// numbers (the listen() backlog as the limit, accept-queue lengths).
#[test]
fn connection_metrics_per_listener() {
    require_root();
    let port = unique_port();
    let metrics = free_port();
    let (cfg, socket) = config("daemon-conns", metrics, &format!("ports = [{port}]\nconnections = true\n"));
    let d = Daemon::start(&cfg, metrics, &[]);
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    // SAFETY: listen(2) on a socket this test owns; it only sets the backlog.
    assert_eq!(unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 8) }, 0);
    // Three connections queued before the first accept: the queue reaches 3 of 8.
    let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(50));
    let accepted: Vec<_> = (0..3).map(|_| l.accept().unwrap()).collect();
    let listener = format!("listener=\"127.0.0.1:{port}\"");
    let m = d.wait_metric(&format!("packetflow_connections_total{{{listener},outcome=\"accepted\"}}"), 3.0);
    let get =
        |name: &str| value(&m, &format!("{name}{{{listener}}}")).unwrap_or_else(|| panic!("{name} missing:\n{m}"));
    assert_eq!(get("packetflow_listener_accept_queue_limit"), 8.0);
    assert_eq!(get("packetflow_listener_accept_queue_max"), 2.0, "the third ACK found two queued");
    assert_eq!(get("packetflow_listener_overflows_total"), 0.0);
    assert_eq!(get("packetflow_connection_accept_wait_seconds_count"), 3.0);
    assert_eq!(get("packetflow_connection_handshake_seconds_count"), 3.0);
    // The first waited the 50 ms before the accepts began.
    assert!(get("packetflow_connection_accept_wait_seconds_sum") >= 0.12, "{m}");
    let st = packetflow(&["status", "--socket", socket.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(text.contains("connection set-up per listener") && text.contains(&format!("127.0.0.1:{port}")), "{text}");
    drop((clients, accepted, d));
}

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
    // the rest waits in its (large) receive buffer, traced up to the socket queue, and
    // each trace waits its timeout for the copy that never comes. That many pending
    // traces exceed the correlator's budget, which evicts flows (their traces finished
    // early, incomplete). The buffer is large so that nothing is dropped: a dropped
    // datagram's trace ends at its drop (docs/drops.md) and would not wait.
    let rx = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
    set_rcvbuf(&rx, 256 << 20, true);
    rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The socket stays open (this `rx`) after the reader stops: closed, it would turn
    // the rest of the flood into NO_SOCKET drops.
    let reader = {
        let done = done.clone();
        let rx = rx.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) && n < 100_000 {
                // recv: an unconnected socket that names no sender; its records join
                // their flow by payload (pipeline/correlate/udp_flow.rs `resolve`).
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
    drop(rx);
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
