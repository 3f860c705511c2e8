//! Tests of the NDJSON writer: the bytes of each line kind, and failed writes; and the
//! sample traces, names and header the reader's round-trip test (`format::recording`)
//! writes with it.

use packetflow_common::Kind;

use super::*;
use crate::{
    kernel::interfaces::Attached,
    model::trace::{Device, Flow, PathKind, StageTime, TraceKind},
};

/// Names for ifindex 1 ("lo") and 2 ("eth0"), without asking the system.
pub(crate) fn sample_names() -> Names {
    let dev = |ifindex: u32, name: &str| Attached {
        netns: None,
        netns_inode: 0,
        ifname: name.into(),
        ifindex,
        xdp: Ok("native"),
        tc_ingress: Ok(()),
        tc_egress: Ok(()),
        lost: false,
    };
    Names::new(&[dev(1, "lo"), dev(2, "eth0")])
}

pub(crate) const SAMPLE_AVAILABLE: [Stage; 5] =
    [Stage::SendSyscall, Stage::DevQueue, Stage::NicXmit, Stage::NetifReceive, Stage::RecvSyscall];

/// A data packet over loopback with every optional field set (and a comm that needs
/// escaping), a UDP retransmission over IPv6 with none, a SYN.
pub(crate) fn sample_traces() -> Vec<Trace> {
    let st = |stage: Stage, t_ns: u64, cpu: u16| StageTime { stage, t_ns, cpu };
    let v4 = |a: [u8; 4]| {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a);
        b
    };
    let v6 = |a: &str| a.parse::<std::net::Ipv6Addr>().unwrap().octets();
    let none = Trace {
        kind: TraceKind::Data,
        flow: Flow { v6: false, udp: false, src: v4([127, 0, 0, 1]), dst: v4([10, 1, 2, 3]), sport: 1, dport: 2 },
        seq: 0,
        len: 0,
        path: PathKind::Nic,
        device: Device { netns: 0, ifindex: 2 },
        rx_device: None,
        pid: None,
        tid: None,
        rx_pid: None,
        rx_tid: None,
        comm: None,
        rx_comm: None,
        cgroup: None,
        rx_cgroup: None,
        stages: Vec::new(),
        complete: false,
        drop: None,
        retransmits: Vec::new(),
        receiver_blocked: None,
    };
    vec![
        Trace {
            flow: Flow { sport: 40000, dport: 5201, ..none.flow },
            seq: 4_000_000_000,
            len: 1448,
            path: PathKind::Loopback,
            device: Device { netns: 0, ifindex: 1 },
            rx_device: Some(Device { netns: 0, ifindex: 1 }),
            pid: Some(1234),
            tid: Some(1235),
            rx_pid: Some(99),
            rx_tid: Some(100),
            comm: Some("iperf\"3\\\u{1}é".into()),
            rx_comm: Some("srv".into()),
            cgroup: None,
            rx_cgroup: None,
            stages: vec![
                st(Stage::SendSyscall, 100, 0),
                st(Stage::DevQueue, 150, 0),
                st(Stage::NetifReceive, 170, 3),
                st(Stage::RecvSyscall, 1_000_000_000_000, 65535),
            ],
            complete: true,
            ..none.clone()
        },
        Trace {
            kind: TraceKind::Retrans,
            flow: Flow {
                v6: true,
                udp: true,
                src: v6("2001:db8::1"),
                dst: v6("::ffff:1.2.3.4"),
                sport: 0,
                dport: 65535,
            },
            stages: vec![st(Stage::DevQueue, 5, 1)],
            ..none.clone()
        },
        Trace {
            kind: TraceKind::Control(Kind::Syn),
            rx_device: Some(Device { netns: 0, ifindex: 2 }),
            pid: Some(0),
            comm: Some(String::new()),
            stages: vec![st(Stage::TcEgress, 7, 2)],
            ..none
        },
    ]
}

pub(crate) fn sample_header() -> HeaderJson {
    let hook = |hook: &str, error: Option<&str>| HookJson {
        hook: hook.into(),
        available: error.is_none(),
        error: error.map(String::from),
    };
    HeaderJson {
        ty: "header".into(),
        v: SCHEMA_VERSION,
        packetflow: "0.1.0".into(),
        kernel: "6.1.0-test".into(),
        hostname: "box".into(),
        start_wall_ns: 1_700_000_000_000_000_000,
        mono_to_wall_ns: -5,
        filters: serde_json::json!({"ports": [80], "hosts": [], "pid": null, "proto": "tcp", "ifindexes": [], "control": false}),
        hooks: BTreeMap::from([
            ("dev_queue".into(), hook("tp:net_dev_queue", None)),
            ("xdp".into(), hook("xdp", Some("no \"driver\""))),
        ]),
        stage_order: Stage::ALL.iter().map(|s| s.name().to_string()).collect(),
        connection_hooks: BTreeMap::new(),
    }
}

/// The bytes packetflow has always written for these lines (captured before the
/// writer and the reader shared these types): field order, escapes, nulls.
#[test]
fn lines_keep_their_bytes() {
    let mut names = sample_names();
    let traces = sample_traces();
    let line =
        |t: &Trace, names: &mut Names| serde_json::to_string(&TraceJson::new(t, names, &SAMPLE_AVAILABLE)).unwrap();
    assert_eq!(
        line(&traces[0], &mut names),
        r#"{"type":"trace","v":1,"kind":"data","proto":"tcp","family":"ipv4","src":"127.0.0.1","sport":40000,"dst":"10.1.2.3","dport":5201,"seq":4000000000,"len":1448,"path":"loopback","ifname":"lo","ifindex":1,"rx_ifname":"lo","pid":1234,"tid":1235,"comm":"iperf\"3\\\u0001é","rx_pid":99,"rx_comm":"srv","netns":0,"rx_netns":0,"complete":true,"missing":["nic_xmit"],"stages":[{"stage":"send_syscall","t_ns":100,"cpu":0},{"stage":"dev_queue","t_ns":150,"cpu":0},{"stage":"netif_receive","t_ns":170,"cpu":3},{"stage":"recv_syscall","t_ns":1000000000000,"cpu":65535}],"total_ns":999999999900}"#
    );
    assert_eq!(
        line(&traces[1], &mut names),
        r#"{"type":"trace","v":1,"kind":"retrans","proto":"udp","family":"ipv6","src":"2001:db8::1","sport":0,"dst":"::ffff:1.2.3.4","dport":65535,"seq":0,"len":0,"path":"nic","ifname":"eth0","ifindex":2,"rx_ifname":null,"pid":null,"tid":null,"comm":null,"rx_pid":null,"rx_comm":null,"netns":0,"complete":false,"missing":["send_syscall","nic_xmit","netif_receive","recv_syscall"],"stages":[{"stage":"dev_queue","t_ns":5,"cpu":1}],"total_ns":0}"#
    );

    let mut stats = Stats::default();
    for t in &traces {
        stats.record(t);
    }
    let lost = BTreeMap::from([(Stage::DevQueue, 3), (Stage::Xdp, 0)]);
    let counters = serde_json::json!({"emitted": {"dev_queue": 5}, "parsed_xdp": 1, "summary_evicted": 2});
    let corr = CorrStats {
        records: 1,
        traces: 2,
        incomplete: 3,
        flows_evicted: 4,
        records_evicted: 5,
        records_unmatched: 6,
        bad_records: 7,
        egress_unanchored: 8,
        stage_gaps: 9,
        traces_finished_early: 10,
        ..Default::default()
    };
    assert_eq!(
        summary(&stats, &lost, counters, &corr, &crate::model::drops::DropStats::default()).to_string(),
        r#"{"correlator":{"bad_records":7,"drops_traced":0,"drops_untraced":0,"egress_unanchored":8,"flows_evicted":4,"incomplete":3,"records":1,"records_evicted":5,"records_unmatched":6,"retransmits":0,"stage_gaps":9,"traces":2,"traces_finished_early":10},"counters":{"emitted":{"dev_queue":5},"parsed_xdp":1,"summary_evicted":2},"drops":[],"lost":{"dev_queue":3,"xdp":0},"other_kinds":{"retrans":1,"syn":1},"paths":{"loopback":{"complete":1,"end_to_end":{"count":1,"max_ns":100059316223,"min_ns":99992207360,"p50_ns":100059316223,"p90_ns":100059316223,"p99.9_ns":100059316223,"p99_ns":100059316223},"stages":{"dev_queue":{"count":1,"max_ns":50,"min_ns":50,"p50_ns":50,"p90_ns":50,"p99.9_ns":50,"p99_ns":50},"netif_receive":{"count":1,"max_ns":20,"min_ns":20,"p50_ns":20,"p90_ns":20,"p99.9_ns":20,"p99_ns":20},"recv_syscall":{"count":1,"max_ns":100059316223,"min_ns":99992207360,"p50_ns":100059316223,"p90_ns":100059316223,"p99.9_ns":100059316223,"p99_ns":100059316223},"send_syscall":{"count":0}},"traces":1}},"retransmits":{},"type":"summary","v":1}"#
    );
    assert_eq!(
        summary(
            &Stats::default(),
            &BTreeMap::new(),
            serde_json::Value::Null,
            &CorrStats::default(),
            &crate::model::drops::DropStats::default()
        )
        .to_string(),
        r#"{"correlator":{"bad_records":0,"drops_traced":0,"drops_untraced":0,"egress_unanchored":0,"flows_evicted":0,"incomplete":0,"records":0,"records_evicted":0,"records_unmatched":0,"retransmits":0,"stage_gaps":0,"traces":0,"traces_finished_early":0},"counters":null,"drops":[],"lost":{},"other_kinds":{},"paths":{},"retransmits":{},"type":"summary","v":1}"#
    );
    // As `header` hands it on: a JSON value.
    assert_eq!(
        serde_json::to_value(sample_header()).unwrap().to_string(),
        r#"{"filters":{"control":false,"hosts":[],"ifindexes":[],"pid":null,"ports":[80],"proto":"tcp"},"hooks":{"dev_queue":{"available":true,"error":null,"hook":"tp:net_dev_queue"},"xdp":{"available":false,"error":"no \"driver\"","hook":"xdp"}},"hostname":"box","kernel":"6.1.0-test","mono_to_wall_ns":-5,"packetflow":"0.1.0","stage_order":["send_syscall","sock_send","dev_queue","tc_egress","nic_xmit","xdp","netif_receive","tc_ingress","transport_rcv","sock_queue","copy_to_user","recv_syscall","ip_send","ip_rcv","woken","on_cpu"],"start_wall_ns":1700000000000000000,"type":"header","v":1}"#
    );
}

#[test]
fn failed_writes_are_counted() {
    // /dev/full: every write fails with ENOSPC.
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let mut sink = JsonSink::new(Box::new(full), Names::new(&[]), Vec::new());
    sink.line(&serde_json::json!({"type": "header"}));
    sink.finish(&serde_json::json!({"type": "summary"}));
    assert_eq!(sink.errors, 2);
}
