//! The filter is evaluated in the kernel: with two concurrent flows and a filter on one
//! port, the other flow leaves no trace and no record.

use std::time::Duration;

use packetflow_tests::*;

#[test]
fn port_filter_keeps_only_its_flow() {
    require_root();
    let (p1, p2) = (unique_port(), unique_port());
    let json = tmp("filter.json");
    let mut tracer = start_trace(&["--port", &p1.to_string()], &json);
    let _s1 = serve(None, "127.0.0.1", p1, false);
    let _s2 = serve(None, "127.0.0.1", p2, false);
    let other = std::thread::spawn(move || client(None, "127.0.0.1", p2, 400, 100, false));
    let mine = client(None, "127.0.0.1", p1, 20, 100, false);
    other.join().expect("other flow");
    assert!(mine.contains("20 exchanges"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(tracer.interrupt(Duration::from_secs(10)).expect("stops").success());

    let lines = read_ndjson(&json);
    let traces = traces(&lines);
    assert!(traces.iter().all(|t| t["sport"] == p1 || t["dport"] == p1), "a trace of another flow");
    assert_eq!(traces.iter().filter(|t| t["kind"] == "data").count(), 40);
    // Filtered in the kernel: the 800 packets of the other flow wrote no record
    // (40 traces of one record per served stage, plus a few of connection set-up and
    // tear-down).
    let per = available_stages(&lines).len() as u64;
    let records = summary(&lines)["correlator"]["records"].as_u64().expect("records");
    assert!(records < 40 * per + 60, "{records} records: the other flow was not filtered in the kernel");
}
