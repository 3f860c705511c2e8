//! Drops (docs/drops.md), each against the kernel's own accounting: the reason comes from
//! this kernel's BTF and the location from /proc/kallsyms, on the trace of the packet
//! that died, or on a `drop` line when it had none.

use std::{net::UdpSocket, time::Duration};

use packetflow::platform::netns::in_netns;
use packetflow_tests::*;
use serde_json::Value;

/// Two test hosts, a port, a recording path and the `-i` arguments for both veths.
fn setup(name: &str) -> (TestHosts, u16, std::path::PathBuf, [String; 4]) {
    require_root();
    let h = TestHosts::new(name).expect("test hosts");
    let port = unique_port();
    let json = tmp(&format!("{name}.ndjson"));
    let i = ["-i".into(), format!("{}@{}", h.veth_a, h.ns_a), "-i".into(), format!("{}@{}", h.veth_b, h.ns_b)];
    (h, port, json, i)
}

/// `trace --port PORT` on both veths, with `extra` arguments.
fn trace_on(port: u16, i: &[String; 4], json: &std::path::Path, extra: &[&str]) -> Proc {
    let port = port.to_string();
    let mut args = vec!["--port", port.as_str()];
    args.extend(i.iter().map(String::as_str));
    args.extend_from_slice(extra);
    start_trace(&args, json)
}

/// Ten datagrams of 100 bytes from host A to `port` on B, 5 ms apart; then the tracer
/// is stopped once they had half a second to arrive.
fn send_and_stop(h: &TestHosts, port: u16, tracer: &mut Proc) {
    let tx = in_netns(Some(&h.path_a()), || Ok(UdpSocket::bind((testhosts::ADDR_A, 0))?)).expect("bind");
    for i in 0..10u64 {
        tx.send_to(&pattern(100, i + 1), (testhosts::ADDR_B, port)).expect("send");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(tracer.interrupt(Duration::from_secs(10)).expect("stops").success());
}

fn drops_of(lines: &[Value], port: u16) -> Vec<&Value> {
    lines.iter().filter(|l| l["dport"] == port && (l["type"] == "drop" || l.get("drop").is_some())).collect()
}

fn reason(l: &Value) -> &str {
    if l["type"] == "drop" { l["reason"].as_str().unwrap() } else { l["drop"]["reason"].as_str().unwrap() }
}

/// A counter of /proc/net/snmp (`Udp`, `RcvbufErrors`) in namespace `ns`.
fn snmp(ns: &std::path::Path, group: &str, field: &str) -> u64 {
    let text = in_netns(Some(ns), || Ok(std::fs::read_to_string("/proc/thread-self/net/snmp")?)).expect("snmp");
    let mut rows = text.lines().filter(|l| l.starts_with(&format!("{group}:")));
    let (names, values) = (rows.next().expect("names"), rows.next().expect("values"));
    let i = names.split_whitespace().position(|n| n == field).expect("field");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// UDP to a port nobody listens on: every datagram's trace ends in NO_SOCKET, after the
/// last stage before the transport, in the UDP receive code.
#[test]
fn udp_to_a_closed_port_ends_in_no_socket() {
    let (h, port, json, i) = setup("pfdrop1");
    let mut tracer = trace_on(port, &i, &json, &["--drops"]);
    send_and_stop(&h, port, &mut tracer);
    let lines = read_ndjson(&json);
    let trs: Vec<&Value> = traces(&lines).into_iter().filter(|t| t["dport"] == port).collect();
    assert_eq!(trs.len(), 10, "one trace per datagram");
    for t in &trs {
        let d = &t["drop"];
        assert_eq!(d["reason"], "NO_SOCKET", "{t}");
        assert!(d["location"].as_str().unwrap().contains("udp"), "the UDP receive code: {t}");
        assert_eq!(d["ifname"], h.veth_b.as_str(), "{t}");
        assert!(d["netns"].as_u64().unwrap() > 0, "{t}");
        let last = t["stages"].as_array().unwrap().last().unwrap();
        assert_eq!(d["after"], last["stage"], "after = the last stage reached: {t}");
        assert!(d["t_ns"].as_u64() >= last["t_ns"].as_u64(), "{t}");
        assert_eq!(t["complete"], false);
        assert!(stage_names(t).contains(&"netif_receive".to_string()), "{t}");
        assert!(!stage_names(t).contains(&"sock_queue".to_string()), "{t}");
    }
    let s = summary(&lines);
    let n: u64 = s["drops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["reason"] == "NO_SOCKET")
        .map(|r| r["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(n, 10, "summary counts: {}", s["drops"]);
    assert_eq!(s["correlator"]["drops_traced"], 10);
}

/// A receiver with a tiny buffer that does not read: every datagram past its buffer is
/// dropped with SOCKET_RCVBUFF, exactly as many as the kernel's UdpRcvbufErrors counted.
#[test]
fn full_receive_buffer_drops_match_udp_rcvbuf_errors() {
    let (h, port, json, i) = setup("pfdrop2");
    let rx = in_netns(Some(&h.path_b()), || Ok(UdpSocket::bind((testhosts::ADDR_B, port))?)).expect("bind");
    // The smallest receive buffer the kernel grants (it doubles the asked 1 byte to its
    // minimum, about 2.3 KiB): two or three datagrams fit.
    set_rcvbuf(&rx, 1, false);
    let mut tracer = trace_on(port, &i, &json, &[]);
    let before = snmp(&h.path_b(), "Udp", "RcvbufErrors");
    let tx = in_netns(Some(&h.path_a()), || Ok(UdpSocket::bind((testhosts::ADDR_A, 0))?)).expect("bind");
    for i in 0..200u64 {
        tx.send_to(&pattern(500, i + 1), (testhosts::ADDR_B, port)).expect("send");
    }
    std::thread::sleep(Duration::from_millis(500));
    let counted = snmp(&h.path_b(), "Udp", "RcvbufErrors") - before;
    assert!(tracer.interrupt(Duration::from_secs(10)).expect("stops").success());
    drop(rx);
    let lines = read_ndjson(&json);
    let d = drops_of(&lines, port);
    let full = d.iter().filter(|l| reason(l) == "SOCKET_RCVBUFF").count() as u64;
    println!("UdpRcvbufErrors +{counted}, traced SOCKET_RCVBUFF {full}, all drops {}", d.len());
    assert!(counted > 100, "the buffer overflowed: {counted}");
    assert_eq!(full, counted, "drops by reason = the kernel's UdpRcvbufErrors");
    assert_eq!(d.len() as u64, counted, "no other drop");
    let s = summary(&lines);
    assert_eq!(s["counters"]["drop_records_lost"].as_u64().unwrap_or(0), 0, "{}", s["counters"]);
}

/// A tbf with a tiny limit on the sender's veth: the qdisc drops what does not fit, by a
/// qdisc reason after `dev_queue`, as many as tc counts.
#[test]
fn qdisc_drops_are_counted_by_reason() {
    let (h, port, json, i) = setup("pfdrop3");
    let st = std::process::Command::new("tc")
        .args([
            "-n", &h.ns_a, "qdisc", "add", "dev", &h.veth_a, "root", "tbf", "rate", "1mbit", "burst", "2000", "limit",
            "3000",
        ])
        .status()
        .expect("tc (iproute2)");
    assert!(st.success());
    let rx = in_netns(Some(&h.path_b()), || Ok(UdpSocket::bind((testhosts::ADDR_B, port))?)).expect("bind");
    let mut tracer = trace_on(port, &i, &json, &[]);
    let tx = in_netns(Some(&h.path_a()), || Ok(UdpSocket::bind((testhosts::ADDR_A, 0))?)).expect("bind");
    for i in 0..50u64 {
        let _ = tx.send_to(&pattern(1000, i + 1), (testhosts::ADDR_B, port));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(tracer.interrupt(Duration::from_secs(10)).expect("stops").success());
    drop(rx);
    let out = std::process::Command::new("tc")
        .args(["-n", &h.ns_a, "-s", "qdisc", "show", "dev", &h.veth_a])
        .output()
        .expect("tc -s");
    let text = String::from_utf8_lossy(&out.stdout);
    let dropped: u64 = text
        .split("dropped ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drop count in {text}"));
    let lines = read_ndjson(&json);
    let d = drops_of(&lines, port);
    let qdisc = d.iter().filter(|l| reason(l).starts_with("QDISC")).count() as u64;
    println!("tc dropped {dropped}, traced qdisc drops {qdisc}: {:?}", d.iter().map(|l| reason(l)).collect::<Vec<_>>());
    assert!(dropped > 10, "the qdisc dropped: {text}");
    assert_eq!(qdisc, dropped, "traced qdisc drops = tc's count");
    for l in d.iter().filter(|l| l["type"] == "trace") {
        assert_eq!(l["drop"]["after"], "dev_queue", "dropped in the qdisc, after dev_queue: {l}");
    }
}

/// Runs `nft` in namespace `ns` with `script` on stdin.
pub(crate) fn nft(ns: &str, script: &str) -> String {
    use std::io::Write;
    let mut c = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft (nftables)");
    c.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success(), "nft -f: {script}");
    let out = std::process::Command::new("ip").args(["netns", "exec", ns, "nft", "list", "ruleset"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The packets an nft rule's `counter` counted.
fn nft_counted(ruleset: &str) -> u64 {
    ruleset
        .split("counter packets ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {ruleset}"))
}

/// An nftables drop rule on the receiver's input: NETFILTER_DROP on every datagram's
/// trace (a socket listens: without the rule they would arrive), as many as the rule's
/// counter, after the last stage before the IP layer.
#[test]
fn a_netfilter_drop_rule_shows_as_netfilter_drop() {
    let (h, port, json, i) = setup("pfdrop4");
    nft(
        &h.ns_b,
        &format!(
            "table inet pf {{\n chain input {{\n type filter hook input priority 0;\n udp dport {port} counter drop\n }}\n}}\n"
        ),
    );
    let rx = in_netns(Some(&h.path_b()), || Ok(UdpSocket::bind((testhosts::ADDR_B, port))?)).expect("bind");
    let mut tracer = trace_on(port, &i, &json, &[]);
    send_and_stop(&h, port, &mut tracer);
    drop(rx);
    let counted = nft_counted(&nft(&h.ns_b, ""));
    let lines = read_ndjson(&json);
    let trs: Vec<&Value> = traces(&lines).into_iter().filter(|t| t["dport"] == port).collect();
    let nf: Vec<&&Value> = trs.iter().filter(|t| t["drop"]["reason"] == "NETFILTER_DROP").collect();
    assert_eq!(counted, 10, "the rule dropped every datagram");
    assert_eq!(nf.len() as u64, counted, "one NETFILTER_DROP trace per packet the rule counted: {trs:?}");
    for t in nf {
        let after = t["drop"]["after"].as_str().unwrap();
        // (ip_rcv where kprobes work: the input hook runs inside ip_local_deliver.)
        assert!(["netif_receive", "tc_ingress", "xdp", "ip_rcv"].contains(&after), "before the transport: {t}");
        // The rule's verdict is carried out in nftables' chain walk (nft_do_chain).
        assert!(t["drop"]["location"].as_str().unwrap().starts_with("nf"), "netfilter's code: {t}");
    }
}

/// A segment dropped once (an nft rule that matches one packet: `limit ... burst 1`):
/// its trace ends in NETFILTER_DROP and lists one retransmission, the copy has its own
/// `retrans` trace, and every byte arrives intact.
#[test]
fn a_segment_dropped_once_shows_its_retransmission() {
    use std::io::{Read, Write};
    let (h, port, json, i) = setup("pfdrop5");
    // The only segment longer than 700 bytes is the 777-byte write below.
    nft(
        &h.ns_b,
        &format!(
            "table inet pf {{\n chain input {{\n type filter hook input priority 0;\n tcp dport {port} ip length > 700 limit rate 1/hour burst 1 packets counter drop\n }}\n}}\n"
        ),
    );
    let listener =
        in_netns(Some(&h.path_b()), || Ok(std::net::TcpListener::bind((testhosts::ADDR_B, port))?)).expect("listen");
    let mut tracer = trace_on(port, &i, &json, &[]);
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        got
    });
    let mut tx =
        in_netns(Some(&h.path_a()), || Ok(std::net::TcpStream::connect((testhosts::ADDR_B, port))?)).expect("connect");
    tx.set_nodelay(true).unwrap();
    let mut sent = Vec::new();
    for i in 0..21u64 {
        let p = pattern(if i == 10 { 777 } else { 100 }, i + 1);
        tx.write_all(&p).expect("write");
        sent.extend_from_slice(&p);
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(tx);
    let got = reader.join().expect("reader");
    assert!(got == sent, "the data arrives intact ({} of {} bytes)", got.len(), sent.len());
    std::thread::sleep(Duration::from_millis(500));
    assert!(tracer.interrupt(Duration::from_secs(10)).expect("stops").success());
    assert_eq!(nft_counted(&nft(&h.ns_b, "")), 1, "the rule dropped one segment");
    let lines = read_ndjson(&json);
    let big: Vec<&Value> = traces(&lines).into_iter().filter(|t| t["dport"] == port && t["len"] == 777).collect();
    let original: Vec<&&Value> = big.iter().filter(|t| t["kind"] == "data").collect();
    let copies: Vec<&&Value> = big.iter().filter(|t| t["kind"] == "retrans").collect();
    assert_eq!(original.len(), 1, "{big:?}");
    let o = original[0];
    assert_eq!(o["drop"]["reason"], "NETFILTER_DROP", "{o}");
    let rtx = o["retransmits"].as_array().expect("retransmits listed");
    assert_eq!(rtx.len(), 1, "one retransmission: {o}");
    assert!(rtx[0].as_u64() > o["drop"]["t_ns"].as_u64(), "{o}");
    assert_eq!(copies.len(), 1, "the copy's own trace: {big:?}");
    let c = copies[0];
    assert_eq!(c["seq"], o["seq"]);
    assert!(c.get("drop").is_none(), "the copy arrived: {c}");
    assert!(
        stage_names(c).contains(&"recv_syscall".to_string()) || stage_names(c).contains(&"sock_queue".to_string()),
        "{c}"
    );
    // The send side is shared (one write, one send call); from the copy's dev_queue on,
    // every record is the copy's.
    let at = |t: &Value, stage: &str| {
        t["stages"].as_array().unwrap().iter().find(|s| s["stage"] == stage).and_then(|s| s["t_ns"].as_u64())
    };
    let copy_queued = at(c, "dev_queue").expect("the copy's dev_queue");
    let last_o = o["stages"].as_array().unwrap().iter().map(|s| s["t_ns"].as_u64().unwrap()).max().unwrap();
    assert!(last_o < copy_queued, "no stage of the copy on the original's trace: {o} {c}");
    assert!(o["drop"]["t_ns"].as_u64().unwrap() < copy_queued, "{o} {c}");
    assert_eq!(at(c, "send_syscall"), at(o, "send_syscall"), "one send call for both copies");
    let s = summary(&lines);
    let n: u64 = s["retransmits"].as_object().unwrap().values().filter_map(Value::as_u64).sum();
    assert_eq!(n, 1, "one retransmission counted: {}", s["retransmits"]);
}
