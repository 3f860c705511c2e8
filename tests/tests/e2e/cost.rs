//! The tracer's own cost: each program's runs and kernel time, from the kernel's BPF run
//! statistics (on while packetflow runs, as they were afterwards).

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use packetflow_tests::*;

fn bpf_stats_sysctl() -> String {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default()
}

#[test]
fn trace_ends_with_its_cost_per_traced_packet() {
    require_root();
    let before = bpf_stats_sysctl();
    let port = unique_port();
    let json = tmp("cost.ndjson");
    let mut t = start_trace(&["--port", &port.to_string(), "--duration", "6"], &json);
    let _srv = serve(None, "127.0.0.1", port, false);
    client(None, "127.0.0.1", port, 50, 18, false);
    let st = t.wait(Duration::from_secs(20)).expect("trace ends at --duration");
    assert!(st.success());
    let lines = read_ndjson(&json);
    let counters = &summary(&lines)["counters"];
    let ns = counters["tracing_kernel_ns"].as_u64().expect("tracing_kernel_ns in the summary");
    let runs = counters["tracing_program_runs"].as_u64().expect("tracing_program_runs in the summary");
    let traced = traces(&lines).len() as u64;
    assert!(traced >= 100, "50 exchanges traced: {traced}");
    // Every traced packet ran at least one program per stage it was seen at.
    assert!(runs >= traced * 10, "{runs} program runs for {traced} packets");
    assert!(ns / runs > 0, "kernel time per run: {ns} ns over {runs} runs");
    assert_eq!(bpf_stats_sysctl(), before, "kernel.bpf_stats_enabled as it was");
}

#[test]
fn the_cost_line_names_ns_per_packet_and_cpu_share() {
    require_root();
    let port = unique_port();
    let mut child = Command::new(bin())
        .args(["trace", "--port", &port.to_string(), "--duration", "5"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut r = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut out = String::new();
    // Traffic once the hooks are attached ("tracing (" comes after).
    while !out.contains("tracing (") {
        assert!(std::io::BufRead::read_line(&mut r, &mut out).unwrap() > 0, "trace ended early:\n{out}");
    }
    let _srv = serve(None, "127.0.0.1", port, false);
    client(None, "127.0.0.1", port, 20, 18, false);
    std::io::Read::read_to_string(&mut r, &mut out).unwrap();
    assert!(child.wait().unwrap().success());
    let line = out.lines().find(|l| l.starts_with("tracing cost: ")).unwrap_or_else(|| panic!("no cost line:\n{out}"));
    let ns: u64 = line
        .trim_start_matches("tracing cost: ")
        .split(" ns of kernel time per traced packet, ")
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ns per packet in '{line}'"));
    assert!(ns > 0 && line.contains("% of one CPU"), "{line}");
}
