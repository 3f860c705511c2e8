//! What the daemon writes: the control socket path, the trace directory, a full disk.

use super::*;

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

/// `connections = true` with trace files: each connection's set-up is a `connection` line
/// in them, readable by `report`.
#[test]
fn trace_files_hold_connection_lines() {
    require_root();
    let metrics = free_port();
    let port = unique_port();
    let dir = tmp("daemon-conn-traces");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (cfg, _) = config(
        "daemon-conn-files",
        metrics,
        &format!("trace_dir = \"{}\"\nports = [{port}]\nconnections = true\n", dir.display()),
    );
    let mut d = Daemon::start(&cfg, metrics, &[]);
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let clients: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let accepted: Vec<_> = (0..2).map(|_| l.accept().unwrap()).collect();
    let listener = format!("listener=\"127.0.0.1:{port}\"");
    d.wait_metric(&format!("packetflow_connections_total{{{listener},outcome=\"accepted\"}}"), 2.0);
    d.signal(libc::SIGTERM);
    assert!(d.proc.wait(Duration::from_secs(20)).is_some_and(|s| s.success()), "{:?}", d.lines());
    let lines: Vec<serde_json::Value> = std::fs::read_dir(&dir)
        .unwrap()
        .flat_map(|f| read_ndjson(&f.unwrap().path()))
        .filter(|v| v["type"] == "connection" && v["server_port"] == port)
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|c| c["outcome"] == "accepted"), "{lines:?}");
    drop((clients, accepted));
}
