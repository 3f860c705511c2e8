//! Summary mode and sampling, on real traffic. Summary mode's in-kernel histograms must
//! agree with the full traces of the same packets (p50 and p99 within 5%); sampling must
//! keep whole connections (both directions, every packet) or none.

use std::{collections::BTreeMap, time::Duration};

use packetflow::{
    model::filter::FilterSpec,
    model::stage_set::StageSet,
    model::trace::PathKind,
    pipeline::run::{RunOptions, Running},
};
use packetflow_common::Stage;
use packetflow_tests::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn summary_mode_agrees_with_full_traces_of_the_same_packets() {
    agree(StageSet::ALL, 20);
}

/// With a subset the deltas are between the stages present, in both modes.
#[test]
fn summary_mode_agrees_with_full_traces_with_a_stage_subset() {
    // overview: send_syscall, dev_queue, nic_xmit, netif_receive, sock_queue,
    // recv_syscall: five deltas, p50 and p99 of each.
    agree(StageSet::parse("overview").unwrap(), 10);
}

/// Summary mode's in-kernel histograms against the full traces of the same 4000
/// packets: every stage's p50 and p99 within 5%, and at least `rows` of them compared.
fn agree(stages: StageSet, rows: usize) {
    require_root();
    // Summary mode does not split the socket-queue wait (docs/stages.md): without
    // woken/on_cpu, full mode's copy_to_user is also the time since sock_queue.
    let stages = StageSet::of(&stages.stages().filter(|s| !s.is_per_packet()).collect::<Vec<_>>());
    let port = unique_port();
    rt().block_on(async {
        let running = Running::start(RunOptions {
            filter: FilterSpec { ports: vec![port], summary: true, stages, ..Default::default() },
            ..Default::default()
        })
        .await
        .expect("start");
        let _srv = serve(None, "127.0.0.1", port, false);
        tokio::task::spawn_blocking(move || client(None, "127.0.0.1", port, 2000, 64, false)).await.unwrap();
        assert!(running.wait_traces(4000, Duration::from_secs(10)).await);
        let f = running.finish().await.expect("finish");
        let full = &f.stats.paths[&PathKind::Loopback];
        let kernel = &f.kernel_stats.as_ref().expect("kernel stats").paths[&PathKind::Loopback];
        assert_eq!(kernel.traces, 4000, "every packet reached its last stage in the kernel's view");
        let mut compared = BTreeMap::new();
        for s in Stage::KERNEL_ORDER {
            let (a, b) = (full.stages.get(&s), kernel.stages.get(&s));
            if !stages.contains(s) {
                // (A closure: this crate does not depend on hdrhistogram to name Histogram::len.)
                #[allow(clippy::redundant_closure_for_method_calls)]
                let n = (a.map_or(0, |h| h.len()), b.map_or(0, |h| h.len()));
                assert_eq!(n, (0, 0), "{} was not asked for", s.name());
                continue;
            }
            let (Some(a), Some(b)) = (a, b) else {
                continue;
            };
            if a.len() < 1000 {
                continue;
            }
            for q in [0.5, 0.99] {
                let (x, y) = (a.value_at_quantile(q) as f64, b.value_at_quantile(q) as f64);
                compared.insert((s.name(), (q * 100.0) as u32), (x, y));
                assert!((y - x).abs() <= 0.05 * x, "{} p{}: full {x} ns, summary {y} ns", s.name(), q * 100.0);
            }
        }
        assert!(compared.len() >= rows, "compared {} percentiles: {compared:?}", compared.len());
        let (x, y) = (full.e2e.value_at_quantile(0.99) as f64, kernel.e2e.value_at_quantile(0.99) as f64);
        assert!((y - x).abs() <= 0.05 * x, "end-to-end p99: full {x}, summary {y}");
    });
}

#[test]
fn sampling_keeps_whole_connections() {
    require_root();
    let port = unique_port();
    let json = tmp("sample.json");
    let mut tracer = start_trace(&["--port", &port.to_string(), "--sample", "4"], &json);
    let _srv = serve(None, "127.0.0.1", port, false);
    const CONNS: usize = 40;
    for _ in 0..CONNS {
        client(None, "127.0.0.1", port, 5, 32, false);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(tracer.interrupt(Duration::from_secs(10)).unwrap().success());
    let lines = read_ndjson(&json);
    let mut per_conn: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for t in traces(&lines) {
        let client_port = if t["dport"] == port { t["sport"].as_u64().unwrap() } else { t["dport"].as_u64().unwrap() };
        let e = per_conn.entry(client_port).or_default();
        if t["dport"] == port { e.0 += 1 } else { e.1 += 1 }
    }
    println!("{} of {CONNS} connections sampled", per_conn.len());
    assert!(!per_conn.is_empty() && per_conn.len() < CONNS, "1 in 4: {} of {CONNS}", per_conn.len());
    for (p, n) in &per_conn {
        assert_eq!(*n, (5, 5), "connection from port {p}: requests and responses all traced");
    }
}
