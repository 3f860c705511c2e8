//! Process filters (docs/filters.md): `trace -- CMD`, `--cgroup`, `--comm`, `--pid`. Two
//! clients talk to one server at once, with different message sizes; the traces must hold
//! every packet of the selected client's flow (both directions, every stage) and none of
//! the other's. The server itself matches no filter: its side of the flow is traced
//! because the client's process claimed the flow.

use std::{path::Path, process::Command, time::Duration};

use packetflow_tests::*;
use serde_json::Value;

const INSIDE: usize = 64;
const OUTSIDE: usize = 300;
const N: u64 = 5;

/// The payload lengths of the data traces, and each trace's completeness.
fn data_traces(json: &Path) -> Vec<Value> {
    traces(&read_ndjson(json)).into_iter().filter(|t| t["kind"] == "data").cloned().collect()
}

/// Checks: exactly the inside client's exchanges (request and answer each), complete.
fn only_inside(json: &Path, what: &str) {
    let t = data_traces(json);
    let lens: Vec<u64> = t.iter().map(|t| t["len"].as_u64().unwrap()).collect();
    assert!(!lens.contains(&(OUTSIDE as u64)), "{what}: a packet of the other client was traced: {lens:?}");
    assert_eq!(lens.iter().filter(|l| **l == INSIDE as u64).count(), 2 * N as usize, "{what}: {lens:?}");
    for t in &t {
        assert_eq!(t["complete"], true, "{what}: {t}");
    }
}

/// A client of `size` bytes in the background, outside any filter (returns its thread).
fn outside_client(port: u16) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        client(None, "127.0.0.1", port, N, OUTSIDE, false)
    })
}

#[test]
fn trace_a_command_traces_only_its_flows_from_the_first_packet() {
    require_root();
    // TCP claims its flow at tcp_sendmsg; UDP at the send syscall, for the cgroup hook.
    for udp in [false, true] {
        let what = if udp { "trace -- CMD (UDP)" } else { "trace -- CMD (TCP)" };
        let port = unique_port();
        let json = tmp(&format!("cmd-{udp}.ndjson"));
        let _srv = serve(None, "127.0.0.1", port, udp);
        let other = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            client(None, "127.0.0.1", port, N, OUTSIDE, udp)
        });
        let bin = bin();
        let mut cmd = Command::new(&bin);
        cmd.args(["trace", "--port", &port.to_string(), "--json", json.to_str().unwrap(), "--"])
            .arg(&bin)
            .args(["client", "127.0.0.1", "--port", &port.to_string(), "--count", &N.to_string()])
            .args(["--size", &INSIDE.to_string(), "--interval", "50"]);
        if udp {
            cmd.arg("--udp");
        }
        let o = cmd.output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{what}: {out}{}", String::from_utf8_lossy(&o.stderr));
        assert!(out.contains("Hello from server!"), "the command ran with its output: {out}");
        assert!(out.contains("exited: exit status: 0"), "{out}");
        other.join().unwrap();
        only_inside(&json, what);
    }
    // Its cgroups are gone.
    let root = packetflow::platform::mounts::cgroup2_root().unwrap();
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("packetflow-trace-"))
        .collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

#[test]
fn cgroup_and_comm_filters_select_processes_in_the_kernel() {
    require_root();
    let port = unique_port();
    let _srv = serve(None, "127.0.0.1", port, false);
    let root = packetflow::platform::mounts::ensure_cgroup2().unwrap();
    let dir = root.join(format!("pf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = bin();
    let inside = |extra: &str| {
        // The client moves itself into the cgroup, then runs (`exec`: the same process).
        let script = format!(
            "echo 0 > {}/cgroup.procs && exec {extra}{} client 127.0.0.1 --port {port} --count {N} --size {INSIDE} --interval 50",
            dir.display(),
            bin.display()
        );
        let o = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    // --cgroup, by the cgroup's path below the root (as /proc/PID/cgroup shows it).
    let json = tmp("cgroup.ndjson");
    let rel = format!("/{}", dir.file_name().unwrap().to_string_lossy());
    let mut tracer = start_trace(&["--port", &port.to_string(), "--cgroup", &rel], &json);
    let other = outside_client(port);
    inside("");
    other.join().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(tracer.interrupt(Duration::from_secs(10)).expect("stops").success());
    only_inside(&json, "--cgroup");
    // --comm: the client under another name (a symlink names the command).
    let link = tmp("pfclient");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&bin, &link).unwrap();
    let json = tmp("comm.ndjson");
    let mut tracer = start_trace(&["--port", &port.to_string(), "--comm", "pfclient"], &json);
    let other = outside_client(port);
    let o = Command::new(&link)
        .args(["client", "127.0.0.1", "--port", &port.to_string(), "--count", &N.to_string()])
        .args(["--size", &INSIDE.to_string(), "--interval", "50"])
        .output()
        .unwrap();
    assert!(o.status.success());
    other.join().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(tracer.interrupt(Duration::from_secs(10)).expect("stops").success());
    only_inside(&json, "--comm");
    let _ = std::fs::remove_dir(&dir);
    // Bad input: one sentence, exit 2.
    let o = packetflow(&["trace", "--cgroup", "/no/such/cgroup", "--duration", "1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such cgroup"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = packetflow(&["trace", "--comm", "a-name-longer-than-15", "--duration", "1"]);
    assert_eq!(o.status.code(), Some(2));
}
