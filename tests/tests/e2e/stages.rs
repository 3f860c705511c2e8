//! `--stages`: a run traces exactly the stages asked for, and a stage not asked for has no
//! program in the kernel (unless an asked stage's record is written by its hook).

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read},
    process::{Command, Stdio},
    time::Duration,
};

use packetflow_tests::*;

/// Names of the BPF programs process `pid` holds (the kernel keeps 15 characters).
fn programs_of(pid: u32) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo").flatten() {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")) {
            ids.insert(id.trim().parse::<u32>().expect("prog_id"));
        }
    }
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| ids.contains(&p.id()))
        .map(|p| p.name_as_str().unwrap_or_default().to_string())
        .collect()
}

fn has(programs: &BTreeSet<String>, name: &str) -> bool {
    programs.iter().any(|p| !p.is_empty() && name.starts_with(p.as_str()))
}

/// `present`: each entry is the tracepoint program and its kprobe stand-in (older
/// kernels), one of which must be loaded; `absent`: none of these may be.
fn check_programs(pid: u32, present: &[&str], absent: &[&str]) {
    let progs = programs_of(pid);
    for p in present {
        let kprobe = p.replacen("pf_", "pf_kp_", 1);
        assert!(has(&progs, p) || has(&progs, &kprobe), "{p} (or {kprobe}) should be loaded: {progs:?}");
    }
    for p in absent {
        let kprobe = p.replacen("pf_", "pf_kp_", 1);
        assert!(!has(&progs, p) && !has(&progs, &kprobe), "{p} should not be loaded: {progs:?}");
    }
}

#[test]
fn a_stage_subset_traces_exactly_those_stages_and_loads_only_their_programs() {
    require_root();
    let port = unique_port();
    let json = tmp("stages.ndjson");
    let mut t = start_trace(&["--port", &port.to_string(), "--stages", "socket,nic_xmit", "--duration", "6"], &json);
    check_programs(
        t.0.id(),
        // recv_syscall's note is left by the copy hooks; UDP's sock_queue takes its
        // datagram from the cgroup ingress hook.
        &[
            "pf_dev_queue",
            "pf_start_xmit",
            "pf_sk_data_ready",
            "pf_sched_wakeup",
            "pf_sched_switch",
            "pf_copy_to_user",
            "pf_sys_exit_recv",
            "pf_cg_ingress",
        ],
        &[
            "pf_tcp_sendmsg",
            "pf_sys_enter_send",
            "pf_ip_send",
            "pf_tcp_probe",
            "pf_netif_receive",
            "pf_ip_rcv",
            "pf_xdp",
            "pf_tc_ingress",
            "pf_tc_egress",
            "pf_cg_egress",
            "pf_cg_egress_nopid",
        ],
    );
    let _srv = serve(None, "127.0.0.1", port, false);
    client(None, "127.0.0.1", port, 50, 18, false);
    assert!(t.wait(Duration::from_secs(20)).expect("trace ends at --duration").success());
    let lines = read_ndjson(&json);
    let asked = ["dev_queue", "nic_xmit", "sock_queue", "woken", "on_cpu", "copy_to_user", "recv_syscall"];
    let mut available = available_stages(&lines);
    available.sort();
    let mut want: Vec<String> = asked.iter().map(std::string::ToString::to_string).collect();
    want.sort();
    assert_eq!(available, want, "the header lists the asked stages only");
    let ts = traces(&lines);
    assert!(ts.len() >= 100, "50 exchanges, both directions: {} traces", ts.len());
    let mut complete = 0;
    for t in &ts {
        let names = stage_names(t);
        assert!(names.iter().all(|n| asked.contains(&n.as_str())), "a stage not asked for: {t}");
        assert_monotonic(t, false);
        if t["complete"] == true {
            // woken/on_cpu only where the reader was blocked (the seed's is on epoll).
            let want: Vec<&str> = asked
                .iter()
                .copied()
                .filter(|s| names.iter().any(|n| n == s) || !["woken", "on_cpu"].contains(s))
                .collect();
            assert_eq!(names, want, "{t}");
            complete += 1;
        }
    }
    assert!(complete * 10 >= ts.len() * 9, "{complete} of {} traces complete", ts.len());
    let s = summary(&lines);
    let rows: BTreeSet<&str> =
        s["paths"]["loopback"]["stages"].as_object().expect("loopback stages").keys().map(String::as_str).collect();
    assert!(rows.iter().all(|r| asked.contains(r)) && rows.contains("sock_queue"), "{rows:?}");
}

#[test]
fn summary_mode_with_a_named_set_tabulates_its_stages() {
    require_root();
    let port = unique_port();
    let mut child = Command::new(bin())
        .args(["trace", "--summary", "--stages", "overview", "--port", &port.to_string(), "--duration", "5"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut r = BufReader::new(child.stdout.take().unwrap());
    let mut out = String::new();
    while !out.contains("tracing (") {
        assert!(r.read_line(&mut out).unwrap() > 0, "trace ended early:\n{out}");
    }
    check_programs(
        pid,
        &[
            "pf_sys_enter_send",
            "pf_tcp_sendmsg",
            "pf_dev_queue",
            "pf_start_xmit",
            "pf_netif_receive",
            "pf_sk_data_ready",
        ],
        &["pf_tcp_probe", "pf_xdp", "pf_tc_ingress", "pf_tc_egress"],
    );
    let _srv = serve(None, "127.0.0.1", port, false);
    client(None, "127.0.0.1", port, 50, 18, false);
    r.read_to_string(&mut out).unwrap();
    let _ = child.kill();
    assert!(child.wait().unwrap().success(), "{out}");
    let fin = out.rsplit("final summary").next().expect("a final summary");
    let overview = ["send_syscall", "dev_queue", "nic_xmit", "netif_receive", "sock_queue", "recv_syscall"];
    let all = kernel_order(false);
    let rows: Vec<(&str, u64)> = fin
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?;
            all.contains(&name).then(|| (name, w.next().and_then(|c| c.parse().ok()).unwrap_or(0)))
        })
        .collect();
    let names: Vec<&str> = rows.iter().map(|r| r.0).collect();
    assert_eq!(names, overview, "table rows:\n{fin}");
    // Every stage after the first has a delta per packet (both directions: 100).
    assert!(rows[1..].iter().all(|(_, n)| *n >= 90), "{fin}");
}

#[test]
fn bad_stage_lists_are_one_sentence_and_exit_2() {
    require_root();
    for (args, says) in [
        (&["trace", "--stages", "dev_queue,bogus"][..], "unknown stage or stage set 'bogus'"),
        (&["trace", "--stages", "sock_queue,recv_syscall", "--duration", "1"][..], "add dev_queue"),
    ] {
        let o = packetflow(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says) && err.trim().lines().count() == 1, "{args:?}: {err}");
    }
}

/// `--proto tcp`: UDP's own hooks (cgroup egress and ingress, sock_recv_length) are not
/// attached, and TCP traces keep every stage.
#[test]
fn proto_tcp_leaves_udps_own_hooks_off() {
    require_root();
    let port = unique_port();
    let json = tmp("stages-proto.ndjson");
    let mut t = start_trace(&["--port", &port.to_string(), "--proto", "tcp", "--duration", "6"], &json);
    check_programs(
        t.0.id(),
        &["pf_tcp_sendmsg", "pf_dev_queue", "pf_tcp_probe", "pf_sk_data_ready", "pf_copy_to_user"],
        &["pf_cg_egress", "pf_cg_egress_nopid", "pf_cg_ingress", "pf_sock_recv"],
    );
    let _srv = serve(None, "127.0.0.1", port, false);
    client(None, "127.0.0.1", port, 50, 18, false);
    assert!(t.wait(Duration::from_secs(20)).expect("trace ends at --duration").success());
    let lines = read_ndjson(&json);
    let ts = traces(&lines);
    assert!(ts.len() >= 100, "50 exchanges, both directions: {} traces", ts.len());
    let complete = ts.iter().filter(|t| t["complete"] == true).count();
    assert!(complete * 10 >= ts.len() * 9, "{complete} of {} traces complete", ts.len());
    for t in ts.iter().filter(|t| t["complete"] == true) {
        let names = stage_names(t);
        for s in ["send_syscall", "sock_send", "transport_rcv", "sock_queue", "copy_to_user", "recv_syscall"] {
            assert!(names.iter().any(|n| n == s), "{s} missing: {t}");
        }
    }
}
