//! Connection set-up traced (`trace --connections`), checked against the kernel's own
//! accounting: TcpExt ListenOverflows/ListenDrops (/proc/net/netstat of the listener's
//! namespace), connect()'s own errors, the listen() backlog, and the arithmetic of an
//! accept queue drained at a known pace.

use std::{
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use packetflow::platform::netns::in_netns;
use packetflow_tests::*;
use serde_json::Value;

const BACKLOG: i32 = 4;
const CLIENTS: usize = 50;
const ACCEPT_EVERY: Duration = Duration::from_millis(20);

/// The `connection` lines of a recording whose server port is `port`.
fn connections(lines: &[Value], port: u16) -> Vec<Value> {
    lines.iter().filter(|v| v["type"] == "connection" && v["server_port"] == port).cloned().collect()
}

fn step(c: &Value, name: &str) -> Option<u64> {
    c["steps"].as_array()?.iter().find(|s| s["step"] == name).and_then(|s| s["t_ns"].as_u64())
}

fn steps_named(c: &Value, name: &str) -> Vec<Value> {
    c["steps"].as_array().unwrap().iter().filter(|s| s["step"] == name).cloned().collect()
}

/// TcpExt ListenOverflows and ListenDrops of namespace `ns`.
fn listen_counters(ns: &Path) -> (u64, u64) {
    let text = in_netns(Some(ns), || Ok(std::fs::read_to_string("/proc/thread-self/net/netstat")?)).expect("netstat");
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (names, values) = (lines[0].split_whitespace(), lines[1].split_whitespace());
    let m: std::collections::HashMap<&str, u64> =
        names.zip(values).filter_map(|(n, v)| Some((n, v.parse().ok()?))).collect();
    (m["ListenOverflows"], m["ListenDrops"])
}

fn sysctl(ns: &Path, key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    in_netns(Some(ns), || Ok(std::fs::write(&path, value)?)).unwrap_or_else(|e| panic!("{key}={value}: {e}"));
}

/// A listener in `ns` on `addr` with `backlog` (listen() again sets it: std uses 128).
fn listener(ns: &Path, addr: SocketAddr, backlog: i32) -> TcpListener {
    let l = in_netns(Some(ns), || Ok(TcpListener::bind(addr)?)).expect("bind");
    // SAFETY: listen(2) on a socket this function owns; no memory is passed.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), backlog) }, 0, "listen");
    l
}

fn connect_from(ns: &Path, to: SocketAddr) -> std::io::Result<TcpStream> {
    in_netns(Some(ns), || Ok(TcpStream::connect_timeout(&to, Duration::from_secs(30))?)).map_err(std::io::Error::other)
}

/// Traces connections to `port` while `work` runs; returns the recording's lines.
fn traced(name: &str, port: u16, work: impl FnOnce()) -> Vec<Value> {
    traced_with(name, port, &[], work)
}

/// The same with more `trace` arguments.
fn traced_with(name: &str, port: u16, extra: &[&str], work: impl FnOnce()) -> Vec<Value> {
    let json = tmp(name);
    let p = port.to_string();
    let mut args = vec!["--connections", "--stages", "none", "--port", &p];
    args.extend(extra);
    let mut tracer = start_trace(&args, &json);
    work();
    std::thread::sleep(Duration::from_millis(500));
    assert!(tracer.interrupt(Duration::from_secs(10)).expect("stops").success());
    read_ndjson(&json)
}

/// 50 clients connect at once to a listener with backlog 4 whose application accepts one
/// connection every 20 ms. The kernel drops SYNs and handshake ACKs that find the accept
/// queue full (and, without SYN cookies, SYNs that find the SYN queue full); the clients
/// retransmit. Every drop the tracer reports must be one the kernel counted, and the
/// accept-queue waits must follow the queue: a connection with `p` ahead of it waits
/// about `p` × 20 ms, never more than (backlog + 1) × 20 ms.
#[test]
fn accept_queue_overflows_match_the_kernel() {
    require_root();
    let h = TestHosts::new("pfconn").expect("test hosts");
    // No SYN cookies: a full SYN queue drops the SYN (a drop the tracer must see too).
    // Two SYN-ACK retransmissions (3 s): a request whose handshake ACK was dropped keeps
    // the SYN queue full for 31 s with the default five, starving later SYNs past the
    // clients' patience.
    sysctl(&h.path_b(), "net.ipv4.tcp_syncookies", "0");
    sysctl(&h.path_b(), "net.ipv4.tcp_synack_retries", "2");
    let port = unique_port();
    let server: SocketAddr = (testhosts::ADDR_B.parse::<std::net::IpAddr>().unwrap(), port).into();
    let l = listener(&h.path_b(), server, BACKLOG);
    l.set_nonblocking(true).unwrap();
    let before = listen_counters(&h.path_b());
    let mut clients = Vec::new();
    let mut accepted = Vec::new();
    let lines = traced("conn-backlog.json", port, || {
        let clients_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = clients_done.clone();
        // Accepts one connection every 20 ms until the clients have all returned from
        // connect() and nothing came for 2 s: a client whose handshake ACK was dropped is
        // established on its side while the server may never queue it.
        let acceptor = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut last = Instant::now();
            let mut held = Vec::new();
            while Instant::now() < deadline
                && !(done.load(std::sync::atomic::Ordering::Relaxed) && last.elapsed() > Duration::from_secs(2))
            {
                match l.accept() {
                    Ok((s, peer)) => {
                        held.push((s, peer.port()));
                        last = Instant::now();
                        std::thread::sleep(ACCEPT_EVERY);
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
            held
        });
        let go = Arc::new(Barrier::new(CLIENTS));
        let threads: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (go, ns) = (go.clone(), h.path_a());
                std::thread::spawn(move || {
                    go.wait();
                    connect_from(&ns, server)
                })
            })
            .collect();
        clients = threads.into_iter().map(|t| t.join().unwrap()).collect();
        clients_done.store(true, std::sync::atomic::Ordering::Relaxed);
        accepted = acceptor.join().unwrap();
    });
    let after = listen_counters(&h.path_b());
    let conns = connections(&lines, port);
    let ports: Vec<u16> = clients.iter().flatten().map(|c| c.local_addr().unwrap().port()).collect();
    assert_eq!(conns.len(), CLIENTS, "one connection trace per client");
    // A client that gave up (30 s without an answer) ends so on its trace.
    let gave_up: Vec<&Value> =
        conns.iter().filter(|c| !ports.contains(&(c["client_port"].as_u64().unwrap() as u16))).collect();
    assert_eq!(gave_up.len(), CLIENTS - ports.len(), "{gave_up:?}");
    for c in gave_up {
        assert!(["abandoned", "timed_out"].contains(&c["outcome"].as_str().unwrap()), "{c}");
    }
    let accepted: Vec<u16> = accepted.iter().map(|(_, p)| *p).collect();
    println!("{} of {CLIENTS} connections accepted", accepted.len());
    for p in &ports {
        let c = conns.iter().find(|c| c["client_port"] == *p).unwrap_or_else(|| panic!("no trace for client port {p}"));
        for s in ["connect", "syn_sent", "syn_rcvd", "synack_sent", "established", "ack_rcvd", "connect_return"] {
            assert!(step(c, s).is_some(), "{s} missing: {c}");
        }
        // Every client's connection ends with an outcome: accepted; or on the accept queue
        // when the application stopped accepting; or its handshake ACK dropped and its
        // request never queued (the client established alone: a half-open connection).
        let outcome = c["outcome"].as_str().unwrap();
        if accepted.contains(p) {
            assert_eq!(outcome, "accepted", "{c}");
            assert!(step(c, "queued").is_some() && step(c, "accepted").is_some(), "{c}");
        } else if outcome == "handshake_dropped" {
            assert!(step(c, "queued").is_none(), "{c}");
            assert!(steps_named(c, "ack_rcvd").iter().all(|s| s.get("dropped").is_some()), "{c}");
        } else {
            assert_eq!(outcome, "not_accepted", "{c}");
        }
    }
    let sum = |k: &str| conns.iter().map(|c| c[k].as_u64().unwrap()).sum::<u64>();
    let (overflows, drops) = (after.0 - before.0, after.1 - before.1);
    println!(
        "kernel: {overflows} listen overflows, {drops} listen drops; traced: {} overflows, {} drops",
        sum("overflows"),
        sum("drops")
    );
    assert!(overflows > 0, "50 clients against a backlog of {BACKLOG} must overflow the accept queue");
    assert_eq!(sum("drops"), drops, "drops traced vs the kernel's ListenDrops");
    // Why each was dropped comes from the queues the segment found on arrival; the kernel
    // decides microseconds later, and a child another CPU queued meanwhile turns a drop
    // the trace calls "other" into an overflow (model::connection::Connection::drops). Only
    // a drop that found a queue one short of full can flip: count those from the trace.
    let borderline = conns
        .iter()
        .flat_map(|c| steps_named(c, "syn_rcvd").into_iter().chain(steps_named(c, "ack_rcvd")))
        .filter(|s| s.get("dropped").is_some())
        .filter(|s| {
            let (a, q, l) =
                (s["accept_queue"].as_u64().unwrap(), s["syn_queue"].as_u64().unwrap(), s["limit"].as_u64().unwrap());
            a == l || (s["step"] == "syn_rcvd" && q == l)
        })
        .count() as u64;
    println!("{borderline} drops found a queue one short of full");
    assert!(
        sum("overflows").abs_diff(overflows) <= borderline,
        "overflows traced {} vs the kernel's ListenOverflows {overflows} ({borderline} borderline)",
        sum("overflows")
    );
    // Every SYN and handshake ACK the listener dropped was sent again (a SYN
    // retransmission; an ACK answering a SYN-ACK retransmission), but the last, for a
    // connection that never got in.
    for c in &conns {
        let dropped = |name: &str| steps_named(c, name).iter().filter(|s| s.get("dropped").is_some()).count() as u64;
        let got_in = ["accepted", "not_accepted"].contains(&c["outcome"].as_str().unwrap());
        let answered = got_in || c["outcome"] == "handshake_dropped";
        assert!(c["syn_retransmits"].as_u64().unwrap() + u64::from(!answered) >= dropped("syn_rcvd"), "{c}");
        assert!(c["synack_retransmits"].as_u64().unwrap() + u64::from(!got_in) >= dropped("ack_rcvd"), "{c}");
        for s in steps_named(c, "syn_rcvd").iter().chain(&steps_named(c, "ack_rcvd")) {
            assert_eq!(s["limit"], BACKLOG, "the listener's limit is its backlog: {c}");
        }
    }
    // The accept-queue wait follows the queue's arithmetic. The queue is FIFO: a
    // connection queued earlier is accepted earlier. The connections ahead of one (queued
    // before it, accepted after it was queued) are at most the backlog, and each takes one
    // 20 ms turn of the application: a wait of about that many turns, never more than
    // (backlog + 1) turns. The bounds: a turn never ends early (sleep), and may end late
    // by a scheduler's delay (the turn as measured, and 30 ms allowed in all). The kernel checks the limit and adds
    // to the queue without one lock, so each further CPU can put one more past it (6
    // waiting behind a backlog of 4 has been seen here, with 2 CPUs).
    let tick = ACCEPT_EVERY.as_nanos() as u64;
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as u64;
    let most_ahead = BACKLOG as u64 + cpus - 1;
    let got: Vec<(u64, u64, &Value)> = conns
        .iter()
        .filter(|c| c["outcome"] == "accepted")
        .map(|c| (step(c, "queued").unwrap(), step(c, "accepted").unwrap(), c))
        .collect();
    // The application's turn as it ran: the longest gap between consecutive accepts while
    // the queue was busy (20 ms of sleep, plus what the scheduler adds: under QEMU's
    // emulation, tens of ms now and then).
    let mut times: Vec<u64> = got.iter().map(|(_, a, _)| *a).collect();
    times.sort_unstable();
    let mut busy: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).filter(|g| (tick..10 * tick).contains(g)).collect();
    busy.sort_unstable();
    let turn = busy.last().copied().unwrap_or(tick).max(tick);
    println!("the application's turn: at most {:.1} ms ({} busy gaps)", turn as f64 / 1e6, busy.len());
    let mut worst = 0;
    let mut differ = 0;
    for &(q, a, c) in &got {
        let ahead = got.iter().filter(|(q2, a2, _)| *q2 < q && *a2 > q).count() as u64;
        // `queued` is stamped just after the child is on the queue: two CPUs queueing
        // within microseconds of each other may stamp in the other order.
        let inverted = got.iter().find(|(q2, a2, _)| (*q2 < q) != (*a2 < a) && q2.abs_diff(q) > 50_000);
        assert!(inverted.is_none(), "not first in, first out: {c} and {}", inverted.unwrap().2);
        let (w, p) = (a - q, c["queue_position"].as_u64().unwrap());
        assert_eq!(c["accept_wait_ns"], w, "{c}");
        assert!(ahead <= most_ahead && p <= most_ahead, "{ahead} ahead, position {p}: {c}");
        assert!(w <= (most_ahead + 1) * turn + 30_000_000, "waited {w} ns, over (backlog + 1) turns: {c}");
        assert!(w <= (ahead + 1) * turn + 30_000_000, "waited {w} ns behind {ahead}: {c}");
        assert!(w >= ahead.saturating_sub(1) * tick, "waited only {w} ns behind {ahead}: {c}");
        differ += u64::from(ahead != p);
        worst = worst.max(w);
    }
    // `queue_position` is the queue the handshake ACK found: another CPU may queue or the
    // application accept in the microseconds before this connection is queued itself.
    println!("{differ} of {} connections found a queue other than the one they joined", got.len());
    println!("longest accept-queue wait {:.1} ms", worst as f64 / 1e6);
    assert!(worst >= (BACKLOG as u64 - 1) * tick, "the queue never filled: longest wait {worst} ns");
}

/// A connect() to a port nobody listens on ends "refused", with the kernel's error.
#[test]
fn connect_without_listener_is_refused() {
    require_root();
    let port = unique_port();
    let lines = traced("conn-refused.json", port, || {
        let e = TcpStream::connect(("127.0.0.1", port)).expect_err("nobody listens");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    });
    let conns = connections(&lines, port);
    assert_eq!(conns.len(), 1, "{conns:?}");
    let c = &conns[0];
    assert_eq!(c["outcome"], "refused", "{c}");
    assert_eq!(c["error"], "ECONNREFUSED", "{c}");
    assert_eq!(steps_named(c, "connect_return")[0]["ret"], -111, "{c}");
    assert_eq!(steps_named(c, "failed")[0]["errno"], 111, "{c}");
    assert!(step(c, "syn_sent").is_some() && step(c, "syn_rcvd").is_none(), "no listener saw the SYN: {c}");
    assert_eq!(c["connect_pid"], std::process::id(), "{c}");
}

/// IPv6 over the veth: every step on both ends, the backlog as the limit.
#[test]
fn ipv6_connection_over_veth() {
    require_root();
    let h = TestHosts::new("pfconn6").expect("test hosts");
    let port = unique_port();
    let server: SocketAddr = (testhosts::ADDR6_B.parse::<std::net::IpAddr>().unwrap(), port).into();
    let l = listener(&h.path_b(), server, 16);
    let perfetto = tmp("conn-v6.perfetto.json");
    let lines = traced_with("conn-v6.json", port, &["--chrome-trace", perfetto.to_str().unwrap()], || {
        let c = connect_from(&h.path_a(), server).expect("connect");
        let (s, peer) = l.accept().expect("accept");
        assert_eq!(peer, c.local_addr().unwrap());
        drop((s, c));
    });
    let conns = connections(&lines, port);
    assert_eq!(conns.len(), 1, "{conns:?}");
    let c = &conns[0];
    assert_eq!((c["family"].as_str(), c["outcome"].as_str()), (Some("ipv6"), Some("accepted")), "{c}");
    assert_eq!(c["client"], testhosts::ADDR6_A, "{c}");
    assert_eq!(steps_named(c, "syn_rcvd")[0]["limit"], 16, "{c}");
    let order = ["connect", "syn_sent", "syn_rcvd", "synack_sent", "established", "queued", "accepted"];
    let times: Vec<u64> = order.iter().map(|s| step(c, s).unwrap_or_else(|| panic!("{s} missing: {c}"))).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "steps out of order: {c}");
    assert_eq!(c["accept_pid"], std::process::id(), "{c}");
    // Perfetto: a "connections" process, one track for this connection, a slice per step.
    let t: Value = serde_json::from_str(&std::fs::read_to_string(&perfetto).unwrap()).expect("valid JSON");
    let ev = t["traceEvents"].as_array().unwrap();
    assert!(ev.iter().any(|e| e["name"] == "process_name" && e["args"]["name"] == "connections"), "{t}");
    let track = format!("[{}]:{} → [{}]:{port}", testhosts::ADDR6_A, c["client_port"], testhosts::ADDR6_B);
    assert!(ev.iter().any(|e| e["name"] == "thread_name" && e["args"]["name"] == track.as_str()), "{track}: {t}");
    let slices: Vec<&str> = ev.iter().filter(|e| e["cat"] == "step").map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(slices.len(), c["steps"].as_array().unwrap().len() - 1, "{slices:?}");
    assert!(ev.iter().any(|e| e["cat"] == "connection" && e["name"] == "connection accepted"), "{t}");
}

/// net.ipv4.tcp_syncookies=2: every SYN is answered with a cookie; the trace says so.
#[test]
fn syn_cookies_are_reported() {
    require_root();
    let h = TestHosts::new("pfcookie").expect("test hosts");
    sysctl(&h.path_b(), "net.ipv4.tcp_syncookies", "2");
    let port = unique_port();
    let server: SocketAddr = (testhosts::ADDR_B.parse::<std::net::IpAddr>().unwrap(), port).into();
    let l = listener(&h.path_b(), server, 8);
    let lines = traced("conn-cookie.json", port, || {
        let c = connect_from(&h.path_a(), server).expect("connect");
        drop((l.accept().expect("accept"), c));
    });
    let conns = connections(&lines, port);
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert_eq!(conns[0]["syn_cookie"], true, "{}", conns[0]);
    assert_eq!(conns[0]["outcome"], "accepted", "{}", conns[0]);
    assert_eq!(steps_named(&conns[0], "syn_rcvd")[0]["syncookies"], 2);
}

/// A SYN queued behind a backlog in a tbf on the client's veth: the wait lands between
/// `syn_sent` (net_dev_queue, before the qdisc) and `syn_rcvd`; the SYN-ACK's way back
/// (not shaped) stays fast.
#[test]
fn tbf_delay_lands_on_the_shaped_crossing() {
    require_root();
    let h = TestHosts::new("pfcontbf").expect("test hosts");
    let st = std::process::Command::new("tc")
        .args([
            "-n", &h.ns_a, "qdisc", "add", "dev", &h.veth_a, "root", "tbf", "rate", "1mbit", "burst", "10000", "limit",
            "200000",
        ])
        .status()
        .expect("tc (iproute2)");
    assert!(st.success(), "adding tbf");
    let port = unique_port();
    let server: SocketAddr = (testhosts::ADDR_B.parse::<std::net::IpAddr>().unwrap(), port).into();
    let l = listener(&h.path_b(), server, 8);
    let lines = traced("conn-tbf.json", port, || {
        // 50 kB ahead of the SYN at 125 kB/s: about 320 ms of queue past the bucket.
        let u = in_netns(Some(&h.path_a()), || Ok(UdpSocket::bind((testhosts::ADDR_A, 0))?)).expect("bind");
        for _ in 0..50 {
            u.send_to(&[0u8; 1000], (testhosts::ADDR_B, 9)).expect("send");
        }
        let c = connect_from(&h.path_a(), server).expect("connect");
        drop((l.accept().expect("accept"), c));
    });
    let conns = connections(&lines, port);
    assert_eq!(conns.len(), 1, "{conns:?}");
    let c = &conns[0];
    let at = |s: &str| step(c, s).unwrap_or_else(|| panic!("{s} missing: {c}"));
    let (syn, back) = (at("syn_rcvd") - at("syn_sent"), at("established") - at("synack_sent"));
    println!("SYN crossing {:.1} ms (shaped), SYN-ACK crossing {:.3} ms", syn as f64 / 1e6, back as f64 / 1e6);
    assert!(syn > 100_000_000, "the SYN waited behind the shaped queue: {c}");
    // Bounds relative to the shaped wait, not fixed: under the VM suite's emulated CPUs
    // connect() alone took 5.7 ms to reach net_dev_queue (a fixed 5 ms bound failed).
    assert!(back < syn / 10, "the SYN-ACK's way is not shaped: {c}");
    assert!(at("syn_sent") - at("connect") < syn / 10, "the qdisc wait is after net_dev_queue: {c}");
}
