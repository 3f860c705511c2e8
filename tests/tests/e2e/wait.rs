//! The receive wait split (docs/stages.md, "woken and on_cpu"): between `sock_queue` and
//! `copy_to_user`, the blocked reader made runnable (`woken`, sched:sched_wakeup) and
//! starting on a CPU (`on_cpu`, sched:sched_switch); `receiver` says whether a thread
//! was blocked in a receive call when the data was queued.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use packetflow_tests::*;
use serde_json::Value;

fn at(t: &Value, stage: &str) -> Option<u64> {
    t["stages"].as_array().unwrap().iter().find(|s| s["stage"] == stage).and_then(|s| s["t_ns"].as_u64())
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread (0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set), 0, "sched_setaffinity");
    }
}

/// Sends `n` datagrams to 127.0.0.1:`port`, `gap` apart, from CPU 0; a reader thread on
/// CPU 1 calls `read` for each. Returns the run's traces of that port, in send order.
fn run(name: &str, n: usize, gap: Duration, read: impl Fn(&UdpSocket) + Send + 'static) -> Vec<Value> {
    require_root();
    let port = unique_port();
    let json = tmp(name);
    let rx = UdpSocket::bind(("127.0.0.1", port)).expect("bind");
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tracer = start_trace(&["--port", &port.to_string(), "--proto", "udp"], &json);
    let reader = std::thread::spawn(move || {
        pin(1);
        for _ in 0..n {
            read(&rx);
        }
    });
    pin(0);
    let tx = UdpSocket::bind(("127.0.0.1", 0)).expect("bind");
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..n {
        tx.send_to(&pattern(64, i as u64 + 1), ("127.0.0.1", port)).expect("send");
        std::thread::sleep(gap);
    }
    reader.join().expect("reader");
    std::thread::sleep(Duration::from_millis(300));
    assert!(tracer.interrupt(Duration::from_secs(10)).expect("stops").success());
    let lines = read_ndjson(&json);
    let mut v: Vec<Value> = traces(&lines).into_iter().filter(|t| t["dport"] == port).cloned().collect();
    v.sort_by_key(|t| at(t, "dev_queue"));
    assert_eq!(v.len(), n, "one trace per datagram");
    v
}

fn recv(s: &UdpSocket) {
    let mut b = [0u8; 128];
    s.recv(&mut b).expect("recv");
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// A reader blocked in recv: every trace has `woken` then `on_cpu` between `sock_queue`
/// and `copy_to_user`, and says `receiver: blocked`.
#[test]
fn a_blocked_reader_is_woken_then_run() {
    let trs = run("wait-blocked.ndjson", 20, Duration::from_millis(20), recv);
    for t in &trs {
        assert_eq!(t["receiver"], "blocked", "{t}");
        let q = at(t, "sock_queue").expect("sock_queue");
        let w = at(t, "woken").unwrap_or_else(|| panic!("woken: {t}"));
        let r = at(t, "on_cpu").unwrap_or_else(|| panic!("on_cpu: {t}"));
        let c = at(t, "copy_to_user").expect("copy_to_user");
        assert!(q <= w && w <= r && r <= c, "queued <= woken <= on CPU <= copied: {t}");
        assert_eq!(t["complete"], true, "{t}");
        assert!(!t["missing"].as_array().unwrap().iter().any(|m| m == "woken"), "{t}");
    }
}

/// The reader's CPU taken by a real-time spinner (SCHED_FIFO, 20 ms bursts 5 ms apart):
/// the wait for a CPU (woken → on_cpu) grows by milliseconds, the wake-up (sock_queue →
/// woken) does not. Datagrams go every 7 ms, out of step with the spinner's 25 ms cycle:
/// sent every 25 ms, CI once put every one into the pauses (median wait 12 µs).
#[test]
fn a_busy_cpu_delays_on_cpu_not_woken() {
    let idle = run("wait-idle.ndjson", 20, Duration::from_millis(25), recv);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            pin(1);
            let p = libc::sched_param { sched_priority: 1 };
            // SAFETY: this thread (0), a valid policy and priority.
            assert_eq!(unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &raw const p) }, 0, "SCHED_FIFO");
            let end = Instant::now() + Duration::from_secs(20);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(20) {
                    std::hint::spin_loop();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let busy = run("wait-busy.ndjson", 30, Duration::from_millis(7), recv);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    spinner.join().unwrap();
    let split = |trs: &[Value]| -> (u64, u64) {
        let both: Vec<&Value> = trs.iter().filter(|t| at(t, "woken").is_some() && at(t, "on_cpu").is_some()).collect();
        // Busy, a datagram that comes while the woken reader still waits for the CPU
        // finds no reader blocked (`not_waiting`): about half have the two stages.
        assert!(both.len() >= 5 && both.len() * 3 >= trs.len(), "{} of {} traces have both", both.len(), trs.len());
        (
            median(both.iter().map(|t| at(t, "woken").unwrap() - at(t, "sock_queue").unwrap()).collect()),
            median(both.iter().map(|t| at(t, "on_cpu").unwrap() - at(t, "woken").unwrap()).collect()),
        )
    };
    let (wake_idle, run_idle) = split(&idle);
    let (wake_busy, run_busy) = split(&busy);
    println!(
        "median µs: woken idle {} busy {}; on_cpu idle {} busy {}",
        wake_idle / 1000,
        wake_busy / 1000,
        run_idle / 1000,
        run_busy / 1000
    );
    assert!(
        run_busy > 1_000_000 && run_busy > 10 * run_idle,
        "the wait for the CPU grows: {run_idle} -> {run_busy} ns"
    );
    assert!(wake_busy < 1_000_000, "the wake-up does not wait for the CPU: {wake_idle} -> {wake_busy} ns");
}

/// A reader that sleeps between reads is not in a receive call when its data comes: the
/// traces say `receiver: not_waiting` and have no `woken`/`on_cpu`.
#[test]
fn a_reader_not_in_a_receive_call_is_not_waiting() {
    let trs = run("wait-not.ndjson", 10, Duration::from_millis(60), |s| {
        recv(s);
        std::thread::sleep(Duration::from_millis(90));
    });
    let not: Vec<&Value> = trs.iter().filter(|t| t["receiver"] == "not_waiting").collect();
    // The first datagram may find the reader blocked; after it the reader is asleep
    // when each one comes (sent every 60 ms, read every 90 ms).
    assert!(not.len() >= 8, "{} of 10 not waiting: {trs:?}", not.len());
    for t in not {
        assert!(at(t, "woken").is_none() && at(t, "on_cpu").is_none(), "{t}");
        assert!(at(t, "copy_to_user").is_some(), "{t}");
    }
}

/// A reader asleep in epoll_wait on the socket (as tokio, nginx or redis wait): the thread
/// the epoll instance wakes is the one watched, and its traces have `woken` and `on_cpu`.
#[test]
fn an_epoll_reader_is_woken_too() {
    let trs = run("wait-epoll.ndjson", 20, Duration::from_millis(20), |s| {
        use std::os::fd::AsRawFd;
        s.set_nonblocking(true).unwrap();
        // SAFETY: plain epoll calls on descriptors this closure owns or borrows; `ev` and
        // `out` outlive them.
        unsafe {
            let ep = libc::epoll_create1(0);
            assert!(ep >= 0, "epoll_create1");
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 0 };
            assert_eq!(libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &raw mut ev), 0);
            let mut out = [libc::epoll_event { events: 0, u64: 0 }; 1];
            let n = libc::epoll_wait(ep, out.as_mut_ptr(), 1, 5000);
            libc::close(ep);
            assert_eq!(n, 1, "epoll_wait");
        }
        let mut b = [0u8; 128];
        s.recv(&mut b).expect("recv");
    });
    let woken = trs
        .iter()
        .filter(|t| t["receiver"] == "blocked" && at(t, "woken").is_some() && at(t, "on_cpu").is_some())
        .count();
    assert!(woken >= 18, "{woken} of 20 woken through epoll: {trs:?}");
}
