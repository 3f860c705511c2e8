//! Recordings people can use: every line packetflow writes validates against the JSON
//! Schema; `report` reproduces the live tables from the file alone; the Perfetto export
//! has the right structure; the HTML report renders in Chromium; damaged files give a
//! sentence with a line number, never a panic.

use std::{collections::HashMap, path::Path, process::Command, time::Duration};

use packetflow_tests::*;
use serde_json::Value;

fn demo_recording(extra: &[&str]) -> (String, std::path::PathBuf, u16) {
    require_root();
    let port = unique_port();
    let json = tmp(&format!("rec-{port}.json"));
    let p = port.to_string();
    let mut args = vec!["demo", "--count", "100", "--port", &p, "--json", json.to_str().unwrap()];
    args.extend(extra);
    let o = packetflow(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (String::from_utf8_lossy(&o.stdout).into_owned(), json, port)
}

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../schema/trace.schema.json")).unwrap(),
    )
    .unwrap();
    jsonschema::options().should_validate_formats(true).build(&schema).expect("schema compiles")
}

#[test]
fn every_line_validates_against_the_schema() {
    let v = validator();
    for extra in [&[][..], &["--udp", "--ipv6"][..]] {
        let (_, json, _) = demo_recording(extra);
        let lines = read_ndjson(&json);
        assert!(lines.len() > 400);
        for (i, l) in lines.iter().enumerate() {
            let errors: Vec<String> = v.iter_errors(l).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "line {}: {errors:?}\n{l}", i + 1);
        }
        // The schema is not vacuous: damaged lines fail it. (The first trace: the line
        // after the header may be another kind, a `drop` line, say.)
        let trace = lines.iter().find(|l| l["type"] == "trace").expect("a trace line");
        let mut bad = trace.clone();
        bad["stages"][0]["stage"] = "warp_drive".into();
        assert!(!v.is_valid(&bad));
        let mut bad = trace.clone();
        bad.as_object_mut().unwrap().remove("src");
        assert!(!v.is_valid(&bad));
    }
}

#[test]
fn report_reproduces_the_demo_table_from_the_file_alone() {
    let (out, json, _) = demo_recording(&[]);
    let r = packetflow(&["report", json.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let rep = String::from_utf8_lossy(&r.stdout);
    let block = |s: &str| -> String {
        let start = s.find("Communication analysis").expect("table");
        let end = s[start..].find("end-to-end").map(|i| start + i).expect("end-to-end row");
        let line_end = s[end..].find('\n').map_or(s.len(), |i| end + i);
        s[start..line_end].to_string()
    };
    assert_eq!(block(&rep), block(&out), "report's table differs from the demo's");
    // And the connection set-up table, row for row (one per path's listener).
    let conn_rows = |s: &str| -> Vec<String> {
        s.lines().filter(|l| l.starts_with("127.0.0.1:") || l.starts_with("198.18.0.2:")).map(String::from).collect()
    };
    assert_eq!(conn_rows(&out).len(), 2, "{out}");
    assert_eq!(conn_rows(&rep), conn_rows(&out), "report's connection table differs from the demo's");
    // From stdin too.
    let r2 = Command::new(bin()).args(["report", "-"]).stdin(std::fs::File::open(&json).unwrap()).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&r2.stdout), rep);
}

#[test]
fn report_reproduces_the_trace_tables() {
    require_root();
    let port = unique_port();
    let json = tmp("rt-trace.json");
    let mut t = {
        use std::io::{BufRead, BufReader};
        let mut c = Command::new(bin())
            .args(["trace", "--port", &port.to_string(), "--json", json.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = c.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut all = String::new();
            let mut r = BufReader::new(out);
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line.starts_with("tracing (") {
                    let _ = tx.send(String::new());
                }
                all.push_str(&line);
                line.clear();
            }
            let _ = tx.send(all);
        });
        rx.recv().unwrap();
        (Proc(c), rx)
    };
    let _srv = serve(None, "127.0.0.1", port, false);
    client(None, "127.0.0.1", port, 50, 64, false);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(t.0.interrupt(std::time::Duration::from_secs(10)).unwrap().success());
    let live = t.1.recv().unwrap();
    let final_part = &live[live.find("final summary").expect("final summary")..];
    let from_live = &final_part[final_part.find("loopback path:").unwrap()..final_part.find("lost 0 events").unwrap()];
    let r = packetflow(&["report", json.to_str().unwrap()]);
    let rep = String::from_utf8_lossy(&r.stdout);
    let from_file = &rep[rep.find("loopback path:").unwrap()..];
    assert_eq!(from_file.trim_end(), from_live.trim_end());
}

#[test]
fn perfetto_export_has_processes_tracks_slices_and_arrows() {
    let (_, json, _) = demo_recording(&[]);
    let out = tmp("chrome.json");
    let r = packetflow(&["report", json.to_str().unwrap(), "--chrome-trace", out.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).expect("valid JSON");
    let ev = v["traceEvents"].as_array().expect("traceEvents");
    let by = |ph: &'static str| ev.iter().filter(move |e| e["ph"] == ph);
    for e in ev {
        assert!(e["ph"].is_string() && e["pid"].is_u64() && e["name"].is_string(), "{e}");
    }
    let procs: Vec<&str> =
        by("M").filter(|e| e["name"] == "process_name").map(|e| e["args"]["name"].as_str().unwrap()).collect();
    assert!(procs.contains(&"loopback path") && procs.contains(&"nic path"), "{procs:?}");
    let threads = by("M").filter(|e| e["name"] == "thread_name").count();
    assert!(threads >= 4, "a track per flow (2 flows per path): {threads}");
    let packets: Vec<&Value> = by("X").filter(|e| e["cat"] == "packet").collect();
    assert_eq!(packets.len(), 400, "one packet slice per trace");
    // Stage slices tile their packet: durations are the stage deltas of the recording.
    let lines = read_ndjson(&json);
    let mut want: HashMap<(u64, String), f64> = HashMap::new();
    for t in traces(&lines) {
        let st = t["stages"].as_array().unwrap();
        for w in st.windows(2) {
            let d = w[1]["t_ns"].as_u64().unwrap() - w[0]["t_ns"].as_u64().unwrap();
            want.insert(
                (w[0]["t_ns"].as_u64().unwrap(), w[1]["stage"].as_str().unwrap().to_string()),
                d as f64 / 1000.0,
            );
        }
    }
    let stages: Vec<&Value> = by("X").filter(|e| e["cat"] == "stage").collect();
    // One slice per stage after the first (11 each, more where woken/on_cpu came).
    let deltas: usize = traces(&lines).iter().map(|t| t["stages"].as_array().unwrap().len() - 1).sum();
    assert!(deltas >= 400 * 11);
    assert_eq!(stages.len(), deltas);
    for s in stages {
        let key = ((s["ts"].as_f64().unwrap() * 1000.0).round() as u64, s["name"].as_str().unwrap().to_string());
        let d = want.get(&key).unwrap_or_else(|| panic!("no stage delta for {s}"));
        assert!((s["dur"].as_f64().unwrap() - d).abs() < 1e-6, "{s}: want {d}");
    }
    let starts: Vec<u64> = by("s").map(|e| e["id"].as_u64().unwrap()).collect();
    let ends: Vec<u64> = by("f").map(|e| e["id"].as_u64().unwrap()).collect();
    assert_eq!(starts.len(), 400);
    assert_eq!(starts, ends, "every send→receive arrow is closed");
}

#[test]
fn damaged_recordings_get_a_sentence_with_the_line_number() {
    let (_, json, _) = demo_recording(&[]);
    let text = std::fs::read_to_string(&json).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let write = |name: &str, content: &str| {
        let p = tmp(name);
        std::fs::write(&p, content).unwrap();
        p
    };
    let run = |p: &Path| packetflow(&["report", p.to_str().unwrap()]);
    let no_panic = |o: &std::process::Output| {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!e.contains("panicked") && !e.contains("internal error"), "{e}");
    };
    // Cut mid-line: skipped, named, the rest reported.
    let cut = &text[..text.len() - 200];
    let o = run(&write("cut.json", cut));
    no_panic(&o);
    assert!(o.status.success());
    let n = cut.lines().count();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("line {n}: truncated last line")),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A corrupt line in the middle: skipped and named.
    let mut corrupt: Vec<String> = lines.iter().map(std::string::ToString::to_string).collect();
    corrupt[10] = "{\"type\":\"trace\", this is not json".into();
    let o = run(&write("corrupt.json", &(corrupt.join("\n") + "\n")));
    no_panic(&o);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 11: not valid JSON"));
    // An unknown future field: accepted.
    let future = text.replacen("\"kind\":\"data\"", "\"kind\":\"data\",\"added_in_v1_5\":{\"x\":1}", 5);
    let o = run(&write("future.json", &future));
    assert!(o.status.success() && o.stderr.is_empty(), "{}", String::from_utf8_lossy(&o.stderr));
    // Empty, not a recording, another schema version: refused with exit 2.
    for (name, content, needle) in [
        ("empty.json", String::new(), "is empty"),
        ("nothdr.json", lines[1..].join("\n"), "line 1"),
        ("v9.json", text.replacen("\"v\":1", "\"v\":9", 1), "schema version 9"),
        ("binary.json", "\u{0}\u{1}\u{2}garbage".to_string(), "line 1"),
    ] {
        let o = run(&write(name, &content));
        no_panic(&o);
        assert_eq!(o.status.code(), Some(2), "{name}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(needle), "{name}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let o = packetflow(&["report", "/no/such/file.json"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn html_report_renders_in_chromium() {
    let (_, json, _) = demo_recording(&[]);
    let html = tmp("report.html");
    let svg = tmp("svg");
    let o = packetflow(&[
        "report",
        json.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        !page.contains("http://")
            || page.matches("http://").all(|_| page.contains("xmlns=\"http://www.w3.org/2000/svg\""))
    );
    assert!(!page.contains("<script") && !page.contains("src=\"http"), "self-contained");
    for name in [
        "percentiles",
        "timeline",
        "waterfall-loopback-median",
        "waterfall-loopback-p99",
        "waterfall-nic-median",
        "waterfall-nic-p99",
    ] {
        let f = svg.join(format!("{name}.svg"));
        let s = std::fs::read_to_string(&f).unwrap_or_else(|_| panic!("{} missing", f.display()));
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
    }
    let shot = tmp("report.png");
    let profile = tmp("chromium-profile");
    let o = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--enable-logging=stderr", "--v=0", "--window-size=1200,2400"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("chromium (Debian package `chromium`, installed by cargo xtask setup)");
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    for bad in ["Uncaught", "CONSOLE", "Failed to load resource", "net::ERR_"] {
        let hits: Vec<&str> = log.lines().filter(|l| l.contains(bad) && l.contains("report.html")).collect();
        assert!(hits.is_empty(), "console: {hits:?}");
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).expect("screenshot")));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let pixels = &buf[..info.buffer_size()];
    let nonwhite = pixels.chunks(px).filter(|p| p.iter().take(3).any(|&c| c < 200)).count();
    let total = pixels.len() / px;
    println!("{nonwhite} of {total} pixels drawn");
    assert!(nonwhite * 100 > total, "the screenshot is (nearly) blank: {nonwhite} of {total}");
}

#[test]
fn report_streams_big_recordings_in_bounded_memory() {
    let (_, json, _) = demo_recording(&[]);
    let text = std::fs::read_to_string(&json).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let traces: Vec<&str> = lines.filter(|l| l.contains("\"type\":\"trace\"")).collect();
    let big = tmp("big.json");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
        writeln!(f, "{header}").unwrap();
        let mut size = 0usize;
        while size < 100_000_000 {
            for t in &traces {
                writeln!(f, "{t}").unwrap();
                size += t.len() + 1;
            }
        }
    }
    // The report's peak RSS, from its own /proc/PID/status (VmHWM), read every 5 ms while
    // it runs. Not wait4's ru_maxrss: at exec the kernel carries the parent's high-water
    // mark into the child's, and the parent is the whole end-to-end test binary (hundreds
    // of MB after the daemon's flood test), so ru_maxrss measured this test's process.
    let mut child = Proc(
        Command::new(bin())
            .args(["report", big.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status_file = format!("/proc/{}/status", child.0.id());
    let mut hwm_kib = 0u64;
    let status = loop {
        if let Some(kib) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        }) {
            hwm_kib = hwm_kib.max(kib);
        }
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success(), "report exit status: {status}");
    assert!(hwm_kib > 0, "read the report's VmHWM at least once");
    let rss_mb = hwm_kib / 1024;
    println!("report of a 100 MB recording: max RSS {rss_mb} MB");
    assert!(rss_mb < 64, "memory grows with the file: {rss_mb} MB");
    let _ = std::fs::remove_file(&big);
}

#[test]
fn baseline_comparison_marks_only_the_stage_that_changed() {
    let (_, json, _) = demo_recording(&[]);
    // A copy of the recording where every packet spends 50 µs more before copy_to_user.
    let slow: String = std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            if v["type"] == "trace" {
                let mut shift = 0;
                for s in v["stages"].as_array_mut().unwrap() {
                    if s["stage"] == "copy_to_user" {
                        shift = 50_000;
                    }
                    let t = s["t_ns"].as_u64().unwrap() + shift;
                    s["t_ns"] = t.into();
                }
            }
            v.to_string() + "\n"
        })
        .collect();
    let slow_path = tmp("slow.json");
    std::fs::write(&slow_path, slow).unwrap();
    let o = packetflow(&["report", slow_path.to_str().unwrap(), "--baseline", json.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let cmp = &out[out.find("compared with the baseline").expect("comparison")..];
    // Every path of the demo is compared, row by row: a comparison with no rows would
    // pass the checks below without comparing anything.
    let mut paths = 0;
    let mut rows: Vec<&str> = Vec::new();
    for line in cmp.lines() {
        if line.contains(" path: baseline ") {
            assert!(!line.contains("baseline 0 traces") && !line.contains("this 0 traces"), "{line}");
            paths += 1;
            continue;
        }
        if !(line.starts_with(|c: char| c.is_ascii_lowercase()) && line.contains("  ")) {
            continue;
        }
        let name = line.split_whitespace().next().unwrap();
        if name == "stage" {
            continue; // the header
        }
        rows.push(name);
        match name {
            "copy_to_user" | "end-to-end" => assert!(line.contains("slower"), "{line}"),
            _ if line.contains('%') => {
                assert!(!line.contains("slower") && !line.contains("faster"), "noise marked as change: {line}");
            }
            _ => {}
        }
    }
    assert_eq!(paths, 2, "both demo paths compared: {cmp}");
    for must in ["copy_to_user", "end-to-end", "recv_syscall", "sock_send"] {
        assert_eq!(rows.iter().filter(|r| **r == must).count(), paths, "a {must} row per path: {cmp}");
    }
    assert!(rows.len() >= 2 * 8, "{} rows compared: {cmp}", rows.len());
}

#[test]
fn report_refuses_stages_against_the_kernel_order_naming_the_line() {
    // recv_syscall first, send_syscall last, times increasing: once an end-to-end of
    // 100059316 µs in release builds and "attempt to subtract with overflow" in debug ones.
    let header = r#"{"type":"header","v":1,"packetflow":"0.1.0"}"#;
    let trace = |first: &str, last: &str| {
        format!(
            r#"{{"type":"trace","v":1,"kind":"data","proto":"tcp","family":"ipv4","src":"127.0.0.1","sport":1,"dst":"127.0.0.1","dport":2,"seq":5,"len":10,"path":"loopback","ifname":"lo","complete":true,"stages":[{{"stage":"{first}","t_ns":1000,"cpu":0}},{{"stage":"dev_queue","t_ns":2000,"cpu":0}},{{"stage":"{last}","t_ns":4000,"cpu":1}}],"total_ns":3000}}"#
        )
    };
    let good = trace("send_syscall", "recv_syscall");
    let bad = trace("recv_syscall", "send_syscall");
    let p = tmp("rec-kernel-order.json");
    std::fs::write(&p, format!("{header}\n{good}\n{good}\n{bad}\n{good}\n")).unwrap();
    let o = packetflow(&["report", p.to_str().unwrap()]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!err.contains("panicked") && !err.contains("overflow"), "{err}");
    assert_eq!(o.status.code(), Some(0), "a damaged line is skipped, the rest reported: {err}");
    assert!(err.contains("line 4: not a valid trace (stages contradict the kernel's order"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // The three good traces alone: 3 µs end to end.
    assert!(out.contains("loopback path: 3 traces (3 complete)"), "{out}");
    let e2e = out.lines().rfind(|l| l.starts_with("end-to-end")).unwrap_or_else(|| panic!("{out}"));
    assert_eq!(e2e.split_whitespace().collect::<Vec<_>>(), ["end-to-end", "3", "3.00", "3.00", "3.00", "3.00", "3.00"]);
}

/// `report --port/--host/--comm/--pid/--since/--until` keep the traces they name, and
/// `trace --slow-us` writes only traces at least that slow (the rest counted in its summary).
#[test]
fn report_selects_traces_and_trace_keeps_only_slow_ones() {
    let (_, file, port) = demo_recording(&["--path", "loopback"]);
    let f = file.to_str().unwrap();
    let count = |args: &[&str]| -> u64 {
        let mut all = vec!["report", f];
        all.extend_from_slice(args);
        let o = packetflow(&all);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.lines()
            .find_map(|l| l.strip_prefix("loopback path: ").and_then(|r| r.split(' ').next()?.parse().ok()))
            .unwrap_or(0)
    };
    let all = count(&[]);
    assert_eq!(all, 200, "100 exchanges: 200 traces");
    assert_eq!(count(&["--port", &port.to_string()]), all);
    assert_eq!(count(&["--port", "1"]), 0);
    assert_eq!(count(&["--host", "127.0.0.1"]), all);
    assert_eq!(count(&["--host", "198.18.0.9"]), 0);
    assert_eq!(count(&["--comm", "no-such-command"]), 0);
    assert_eq!(count(&["--since", "+0", "--until", "+3600"]), all);
    assert_eq!(count(&["--since", "+3600"]), 0);
    assert_eq!(count(&["--until", "1970-01-02T00:00:00Z"]), 0);
    // Each exchange's request by the client's pid: half the traces (the server answers).
    let lines = read_ndjson(&file);
    let pid = traces(&lines).iter().find_map(|t| t["pid"].as_u64()).expect("a sending pid");
    let by_pid = count(&["--pid", &pid.to_string()]);
    assert!(by_pid > 0 && by_pid <= all, "{by_pid}");
    let o = packetflow(&["report", f, "--since", "yesterday"]);
    assert_eq!(o.status.code(), Some(2));

    // trace --slow-us: a threshold nothing reaches writes no trace, one everything
    // reaches writes all, and the summary says how many were left out.
    for (slow, written_all) in [("10000000", false), ("1", true)] {
        require_root();
        let port = unique_port();
        let json = tmp(&format!("slow-{slow}.ndjson"));
        let mut tracer = start_trace(&["--port", &port.to_string(), "--slow-us", slow], &json);
        let _srv = serve(None, "127.0.0.1", port, false);
        client(None, "127.0.0.1", port, 10, 64, false);
        std::thread::sleep(Duration::from_millis(1500));
        assert!(tracer.interrupt(Duration::from_secs(10)).expect("stops").success());
        let lines = read_ndjson(&json);
        let written = traces(&lines).iter().filter(|t| t["kind"] == "data").count() as u64;
        let s = summary(&lines);
        let below = s["traces_below_slow_us"].as_u64().expect("the count of traces left out");
        assert_eq!(s["slow_us"].as_u64(), slow.parse().ok());
        if written_all {
            assert_eq!((written, below), (20, 0), "{s}");
        } else {
            assert_eq!(written, 0);
            assert!(below >= 20, "{s}");
        }
    }
}
