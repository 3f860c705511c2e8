//! Truth of the numbers: a veth shaped with tbf to a known rate must show the queueing
//! delay that rate implies in the dev_queue → nic_xmit stage (within 20%), while the
//! other stages stay where they were without shaping.

use std::{net::UdpSocket, time::Duration};

use packetflow::platform::netns::in_netns;
use packetflow_tests::*;
use serde_json::Value;

// 2 Mbit/s with a 10 kB bucket: every queued packet waits ~4 ms more than the one before
// it, and a qdisc watchdog that fires late (a vCPU preempted on a busy host) is made up by
// the tokens that pile up meanwhile, up to the bucket's 40 ms. With a bucket of one or two
// packets, one late wake-up of a few ms delayed every later packet for good, and the test
// measured the host's hiccups rather than the tracer.
const RATE_BYTES_PER_S: f64 = 250_000.0;
const BURST: f64 = 10_000.0;
const PAYLOAD: usize = 1000;
const WIRE: f64 = (14 + 20 + 8 + PAYLOAD) as f64; // what tbf charges: the L2 frame
const PACKETS: usize = 40;

fn opt(tr: &Value, stage: &str) -> Option<u64> {
    tr["stages"].as_array().unwrap().iter().find(|s| s["stage"] == stage).and_then(|s| s["t_ns"].as_u64())
}

fn t(tr: &Value, stage: &str) -> u64 {
    opt(tr, stage).unwrap_or_else(|| panic!("{stage} missing in {tr}"))
}

/// Traces that carry every stage. On this kernel a datagram rarely has no record at
/// some stages the hooks around them saw it pass (about one CI run in 15: nic_xmit; once
/// nic_xmit, netif_receive and sock_queue of one datagram sent late from the qdisc; the
/// kernel's own `emitted` counts short by as many, no skipped run counted; cause unknown,
/// docs/stages.md "From records to traces"). The tracer must then say so: such a trace is
/// incomplete and names what it misses; the kernel's `emitted` count proves those records
/// were never written (the tracer lost nothing it was given); and the summary counts it,
/// as a kernel loss or a stage gap. The comparisons below use the complete traces.
fn check_incomplete(trs: &[Value], summary: &Value) {
    let partial: Vec<&Value> = trs.iter().filter(|tr| tr["complete"] != true).collect();
    let mut missing_at = std::collections::BTreeMap::<String, u64>::new();
    for tr in &partial {
        let missing = tr["missing"].as_array().expect("an incomplete trace lists what it misses");
        assert!(!missing.is_empty(), "incomplete without a missing stage: {tr}");
        for m in missing {
            let m = m.as_str().unwrap();
            assert!(opt(tr, m).is_none(), "{m} listed missing but present: {tr}");
            *missing_at.entry(m.to_string()).or_default() += 1;
        }
        println!("tolerated: {tr}");
    }
    for (stage, n) in &missing_at {
        let emitted = summary["counters"]["emitted"][stage].as_u64().unwrap_or(0);
        assert_eq!(emitted + n, trs.len() as u64, "{stage}: {n} traces miss it, the kernel wrote {emitted} records");
    }
    let counted = summary["lost"].as_object().map_or(0, |l| l.values().filter_map(Value::as_u64).sum::<u64>())
        + summary["correlator"]["stage_gaps"].as_u64().unwrap_or(0);
    assert!(
        partial.len() as u64 <= counted,
        "{} of {} traces incomplete, {counted} counted (kernel losses + stage gaps): {}",
        partial.len(),
        trs.len(),
        summary["counters"]
    );
}

/// Sends a burst through the NIC path, traced; returns the burst's traces by send order.
fn burst(h: &TestHosts, port: u16, name: &str) -> Vec<Value> {
    let json = tmp(name);
    let ia = format!("{}@{}", h.veth_a, h.ns_a);
    let ib = format!("{}@{}", h.veth_b, h.ns_b);
    let mut tracer = start_trace(&["--port", &port.to_string(), "--proto", "udp", "-i", &ia, "-i", &ib], &json);
    let rx = in_netns(Some(&h.path_b()), || Ok(UdpSocket::bind((testhosts::ADDR_B, port))?)).expect("bind");
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tx = in_netns(Some(&h.path_a()), || Ok(UdpSocket::bind((testhosts::ADDR_A, 0))?)).expect("bind");
    // Distinct payloads: datagram i starts with its number.
    for i in 0..PACKETS {
        let mut p = pattern(PAYLOAD, i as u64 + 1);
        p[..8].copy_from_slice(&(i as u64).to_be_bytes());
        tx.send_to(&p, (testhosts::ADDR_B, port)).expect("send");
    }
    let mut buf = [0u8; 2048];
    for _ in 0..PACKETS {
        rx.recv_from(&mut buf).expect("every datagram arrives");
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(tracer.interrupt(Duration::from_secs(10)).expect("stops").success());
    let lines = read_ndjson(&json);
    let mut v: Vec<Value> = traces(&lines).into_iter().filter(|t| t["dport"] == port).cloned().collect();
    assert_eq!(v.len(), PACKETS, "one trace per datagram");
    check_incomplete(&v, summary(&lines));
    v.sort_by_key(|tr| t(tr, "dev_queue"));
    v
}

/// Token-bucket departure times for packets entering the qdisc at `enq` (ns).
fn model(enq: &[u64]) -> Vec<f64> {
    let mut tokens = BURST;
    let mut clock = enq[0] as f64;
    let mut out = Vec::new();
    for &e in enq {
        let start = clock.max(e as f64);
        tokens = (tokens + (start - clock) * RATE_BYTES_PER_S / 1e9).min(BURST);
        let wait = if tokens >= WIRE { 0.0 } else { (WIRE - tokens) / RATE_BYTES_PER_S * 1e9 };
        let depart = start + wait;
        tokens = (tokens + wait * RATE_BYTES_PER_S / 1e9) - WIRE;
        clock = depart;
        out.push(depart);
    }
    out
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn stage_medians(trs: &[Value]) -> Vec<(String, u64)> {
    let trs: Vec<&Value> = trs.iter().filter(|tr| tr["complete"] == true).collect();
    let names = ["sock_send", "tc_egress", "xdp", "netif_receive", "tc_ingress", "transport_rcv", "sock_queue"];
    let prev = |s: &str| match s {
        "sock_send" => "send_syscall",
        "tc_egress" => "sock_send",
        "xdp" => "nic_xmit",
        "netif_receive" => "xdp",
        "tc_ingress" => "netif_receive",
        "transport_rcv" => "tc_ingress",
        _ => "transport_rcv",
    };
    names.iter().map(|n| (n.to_string(), median(trs.iter().map(|tr| t(tr, n) - t(tr, prev(n))).collect()))).collect()
}

#[test]
fn tbf_queueing_delay_shows_in_nic_xmit_only() {
    require_root();
    let h = TestHosts::new("pftbf").expect("test hosts");
    let base = burst(&h, unique_port(), "tbf-base.json");

    let st = std::process::Command::new("tc")
        .args([
            "-n", &h.ns_a, "qdisc", "add", "dev", &h.veth_a, "root", "tbf", "rate", "2mbit", "burst", "10000", "limit",
            "1000000",
        ])
        .status()
        .expect("tc (iproute2)");
    assert!(st.success(), "adding tbf");
    let shaped = burst(&h, unique_port(), "tbf-shaped.json");

    // Every datagram enters the model (each one takes tokens); only complete traces are
    // compared with it.
    let enq: Vec<u64> = shaped.iter().map(|tr| t(tr, "dev_queue")).collect();
    let dep = model(&enq);
    let (measured, expected): (Vec<f64>, Vec<f64>) = shaped
        .iter()
        .zip(dep.iter().zip(&enq))
        .filter(|(tr, _)| tr["complete"] == true)
        .map(|(tr, (d, e))| ((t(tr, "nic_xmit") - e) as f64, d - *e as f64))
        .unzip();
    let (sm, se): (f64, f64) = (measured.iter().sum(), expected.iter().sum());
    println!("queueing delay: measured {:.1} ms in total, tbf model {:.1} ms", sm / 1e6, se / 1e6);
    assert!(se > 10e6, "the burst must queue: model {se}");
    assert!((sm - se).abs() <= 0.2 * se, "measured {sm} vs expected {se}");
    for (i, (m, e)) in measured.iter().zip(&expected).enumerate() {
        if *e > 20e6 {
            assert!((m - e).abs() <= 0.2 * e, "packet {i}: measured {m} ns, expected {e} ns");
        }
    }
    let (b, s) = (stage_medians(&base), stage_medians(&shaped));
    for ((name, before), (_, after)) in b.iter().zip(&s) {
        println!("{name}: {before} ns unshaped, {after} ns shaped");
        assert!(*after <= before * 3 + 50_000, "{name} moved: {before} ns -> {after} ns");
    }
}
