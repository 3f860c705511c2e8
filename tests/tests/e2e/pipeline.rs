//! The first real pipeline: a tp_btf program, XDP and TC egress/ingress write records into
//! the ring buffers; the reader decodes them; records for exactly the seed flow arrive
//! from every kind of hook. If any of them stops delivering, this fails.

use std::time::Duration;

use packetflow_tests::*;

#[test]
fn seed_flow_on_loopback_arrives_from_tp_btf_xdp_and_tc() {
    require_root();
    let port = unique_port();
    let json = tmp("pipeline.json");
    let mut tracer = start_trace(&["--port", &port.to_string(), "-i", "lo"], &json);
    let _server = serve(None, "127.0.0.1", port, false);
    let out = client(None, "127.0.0.1", port, 5, 18, false);
    assert!(out.contains("Server response: Hello from server!"), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    let st = tracer.interrupt(Duration::from_secs(10)).expect("trace exits on SIGINT");
    assert!(st.success(), "trace exit status {st}");

    let lines = read_ndjson(&json);
    assert_eq!(lines[0]["type"], "header");
    let traces = traces(&lines);
    assert_eq!(traces.len(), 10, "5 requests + 5 responses");
    for t in &traces {
        assert_eq!(t["src"], "127.0.0.1");
        assert_eq!(t["dst"], "127.0.0.1");
        assert!(t["sport"] == port || t["dport"] == port, "a trace of another flow: {t}");
        let stages = stage_names(t);
        for hook in ["dev_queue", "xdp", "tc_egress", "tc_ingress"] {
            assert!(stages.iter().any(|s| s == hook), "{hook} missing from {stages:?}");
        }
        assert_eq!(t["path"], "loopback");
        assert_eq!(t["ifname"], "lo");
    }
    let s = summary(&lines);
    for hook in ["dev_queue", "xdp", "tc_egress", "tc_ingress"] {
        assert!(s["counters"]["emitted"][hook].as_u64().unwrap() >= 10, "{hook}: {}", s["counters"]);
        assert_eq!(s["lost"][hook], 0);
    }
}
