//! The correlator's unit tests: record streams in, traces out, for the matching rules
//! (TCP byte ranges, UDP payload keys, sides, anchors, UDP flows from partial views,
//! finishing by watermark and timeout) and the per-stage bounds.

use packetflow_common::{
    Event, Kind, Stage,
    event::{F_END, F_LOOPBACK, F_UDP, KIND_SHIFT},
};

use super::{Correlator, Coverage, records::MAX_UDP_PER_STAGE};
use crate::model::trace::{Device, PathKind, Trace, TraceKind};

fn ev(stage: Stage, ts: u64, seq: u32, len: u32) -> Event {
    let mut e = Event::ZERO;
    e.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    e.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    e.sport = 40000;
    e.dport = 8080;
    e.stage = stage as u8;
    e.ts_ns = ts;
    e.seq = seq;
    e.len = len;
    e.flags = F_LOOPBACK;
    e.aux = 1;
    e.aux2 = 7;
    e
}

/// Every hook of a kernel without kprobes (no IP-layer stages).
fn all_global() -> Coverage {
    let mut c = Coverage {
        global: Stage::ALL.into_iter().filter(|s| !matches!(s, Stage::IpSend | Stage::IpRcv)).collect(),
        ..Coverage::default()
    };
    c.xdp.insert(Device { netns: 7, ifindex: 1 });
    c.tc_ingress.insert(Device { netns: 7, ifindex: 1 });
    c.tc_egress.insert(Device { netns: 7, ifindex: 1 });
    c
}

fn run(c: &mut Correlator, evs: &[Event]) -> Vec<Trace> {
    for e in evs {
        c.push(e);
    }
    let mut out = Vec::new();
    c.flush(&mut |t| out.push(t));
    out
}

/// Every stage once for bytes [seq, seq+len), 100 ns apart, in kernel order.
fn one_packet(t0: u64, seq: u32, len: u32) -> Vec<Event> {
    let order = [
        Stage::SendSyscall,
        Stage::SockSend,
        Stage::TcEgress,
        Stage::DevQueue,
        Stage::NicXmit,
        Stage::NetifReceive,
        Stage::Xdp,
        Stage::TcIngress,
        Stage::TransportRcv,
        Stage::SockQueue,
        Stage::CopyToUser,
        Stage::RecvSyscall,
    ];
    order
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let mut e = ev(s, t0 + i as u64 * 100, seq, len);
            if s == Stage::SockQueue || s == Stage::RecvSyscall {
                e.seq = seq.wrapping_add(len);
                e.len = 0;
                e.flags |= F_END;
            }
            e
        })
        .collect()
}

#[test]
fn joins_one_packet_with_every_stage() {
    let mut c = Correlator::new(all_global());
    let t = run(&mut c, &one_packet(1_000, 5000, 18));
    assert_eq!(t.len(), 1);
    assert!(t[0].complete);
    assert_eq!(t[0].stages.len(), 12);
    assert_eq!(t[0].total_ns(), 1100);
    assert_eq!(t[0].seq, 5000);
    assert_eq!(t[0].len, 18);
    assert_eq!(t[0].path, PathKind::Loopback);
}

#[test]
fn ip_stages_join_where_kprobes_serve_them() {
    let mut cov = all_global();
    cov.global.insert(Stage::IpSend);
    cov.global.insert(Stage::IpRcv);
    let mut c = Correlator::new(cov);
    let mut evs = one_packet(1_000, 5000, 18);
    evs.push(ev(Stage::IpSend, 1_150, 5000, 18));
    evs.push(ev(Stage::IpRcv, 1_750, 5000, 18));
    let t = run(&mut c, &evs);
    assert_eq!(t.len(), 1);
    assert!(t[0].complete);
    let names: Vec<&str> = t[0].stages.iter().map(|s| s.stage.name()).collect();
    assert_eq!(&names[..4], ["send_syscall", "sock_send", "ip_send", "tc_egress"]);
    assert!(names.windows(2).any(|w| w == ["tc_ingress", "ip_rcv"]), "{names:?}");
}

#[test]
fn records_arriving_out_of_order_still_join() {
    let mut c = Correlator::new(all_global());
    let mut evs = one_packet(1_000, 5000, 18);
    evs.reverse();
    let t = run(&mut c, &evs);
    assert_eq!(t.len(), 1);
    assert!(t[0].complete);
}

#[test]
fn one_syscall_many_segments_and_one_read_many_segments() {
    // A 3000-byte write sent as two segments, read back by one recv.
    let mut c = Correlator::new(all_global());
    let mut evs = vec![ev(Stage::SendSyscall, 100, 0, 3000), ev(Stage::SockSend, 110, 0, 3000)];
    for (i, (s, l)) in [(0u32, 1500u32), (1500, 1500)].iter().enumerate() {
        let t = 1_000 + i as u64 * 1_000;
        for (k, st) in [
            Stage::TcEgress,
            Stage::DevQueue,
            Stage::NicXmit,
            Stage::NetifReceive,
            Stage::Xdp,
            Stage::TcIngress,
            Stage::TransportRcv,
        ]
        .iter()
        .enumerate()
        {
            evs.push(ev(*st, t + k as u64 * 10, *s, *l));
        }
    }
    let mut q = ev(Stage::SockQueue, 2_500, 3000, 0);
    q.flags |= F_END;
    evs.push(q);
    evs.push(ev(Stage::CopyToUser, 3_000, 0, 3000));
    let mut r = ev(Stage::RecvSyscall, 3_100, 3000, 0);
    r.flags |= F_END;
    evs.push(r);
    let t = run(&mut c, &evs);
    assert_eq!(t.len(), 2);
    for tr in &t {
        assert!(tr.complete, "{tr:?}");
        assert_eq!(tr.time_of(Stage::SendSyscall), Some(100));
        assert_eq!(tr.time_of(Stage::RecvSyscall), Some(3_100));
    }
    assert_eq!(t[0].time_of(Stage::DevQueue), Some(1_010));
    assert_eq!(t[1].time_of(Stage::DevQueue), Some(2_010));
}

#[test]
fn gro_merge_attributes_by_last_byte() {
    // Two segments queued separately, merged by GRO into one netif_receive record.
    let mut c = Correlator::new(all_global());
    let evs = vec![
        ev(Stage::DevQueue, 100, 0, 100),
        ev(Stage::DevQueue, 200, 100, 100),
        ev(Stage::NetifReceive, 500, 0, 200),
    ];
    let t = run(&mut c, &evs);
    assert_eq!(t.len(), 2);
    assert!(t.iter().all(|t| t.time_of(Stage::NetifReceive) == Some(500)));
}

#[test]
fn a_packet_without_dev_queue_is_traced_from_tc_egress() {
    let mut c = Correlator::new(all_global());
    let mut evs = one_packet(1_000, 5000, 100);
    let second: Vec<Event> = one_packet(2_000, 5100, 100)
        .into_iter()
        .filter(|e| !matches!(Stage::from_u8(e.stage), Some(Stage::DevQueue | Stage::NicXmit)))
        .collect();
    evs.extend(second);
    evs.extend(one_packet(3_000, 5200, 100));
    // The complete packets finish first (before the orphan settles), so by the time
    // it is promoted higher bytes are done: it must still count as data.
    for e in &evs {
        c.push(e);
    }
    let mut t = Vec::new();
    c.advance(100_000, &mut |x| t.push(x));
    assert_eq!(t.len(), 2, "the two complete packets finish at once");
    c.flush(&mut |x| t.push(x));
    assert_eq!(
        t.iter().filter(|t| t.kind == TraceKind::Data).map(|t| t.len).sum::<u32>(),
        300,
        "every byte traced as data"
    );
    let orphan = t.iter().find(|t| t.seq == 5100).expect("the packet without dev_queue");
    assert!(!orphan.complete);
    assert_eq!(orphan.stages.len(), 10, "every stage but dev_queue and nic_xmit");
    assert_eq!(orphan.kind, TraceKind::Data);
    assert_eq!(c.stats.egress_unanchored, 1);
    assert!(t.iter().filter(|t| t.seq != 5100).all(|t| t.complete));
}

#[test]
fn retransmission_is_its_own_kind() {
    let mut c = Correlator::new(all_global());
    let evs = vec![ev(Stage::DevQueue, 100, 0, 100), ev(Stage::DevQueue, 300_000_000, 0, 100)];
    let t = run(&mut c, &evs);
    assert_eq!(t.len(), 2);
    assert_eq!(t[0].kind, TraceKind::Data);
    assert_eq!(t[1].kind, TraceKind::Retrans);
}

#[test]
fn anchors_arriving_out_of_order_are_not_retransmissions() {
    let mut c = Correlator::new(all_global());
    let evs = vec![ev(Stage::DevQueue, 200, 100, 100), ev(Stage::DevQueue, 100, 0, 100)];
    let t = run(&mut c, &evs);
    assert_eq!(t.len(), 2);
    assert!(t.iter().all(|t| t.kind == TraceKind::Data));
}

#[test]
fn udp_identical_payloads_pair_one_to_one_in_order() {
    let mut c = Correlator::new(all_global());
    let mut evs = Vec::new();
    for i in 0..3u64 {
        for (k, s) in [Stage::SendSyscall, Stage::SockSend, Stage::DevQueue, Stage::NetifReceive, Stage::RecvSyscall]
            .iter()
            .enumerate()
        {
            let mut e = ev(*s, 1_000 * (i + 1) + k as u64 * 10, 0xabcd, 18);
            e.flags |= F_UDP;
            evs.push(e);
        }
    }
    let t = run(&mut c, &evs);
    assert_eq!(t.len(), 3);
    for (i, tr) in t.iter().enumerate() {
        let base = 1_000 * (i as u64 + 1);
        assert_eq!(tr.time_of(Stage::SendSyscall), Some(base));
        assert_eq!(tr.time_of(Stage::RecvSyscall), Some(base + 40));
    }
}

#[test]
fn a_sender_interrupted_before_the_device_queue_keeps_its_own_tc_egress() {
    // Datagram 1 waits 72 µs between tcx egress and the device queue; datagram 2
    // (same payload) passes tcx egress 36 µs after datagram 1's dev_queue.
    let mut c = Correlator::new(all_global());
    let udp = |s, t| {
        let mut e = ev(s, t, 0xbeef, 18);
        e.flags |= F_UDP;
        e
    };
    let evs = vec![
        udp(Stage::TcEgress, 1_000),
        udp(Stage::DevQueue, 73_000),
        udp(Stage::TcEgress, 109_000),
        udp(Stage::DevQueue, 110_000),
    ];
    let t = run(&mut c, &evs);
    assert_eq!(t.len(), 2);
    assert_eq!(t[0].time_of(Stage::TcEgress), Some(1_000));
    assert_eq!(t[1].time_of(Stage::TcEgress), Some(109_000));
}

#[test]
fn udp_records_from_a_wildcard_socket_join_their_flow() {
    let mut c = Correlator::new(all_global());
    let mut evs = Vec::new();
    // The socket's record first: its flow is only known once the wire record is in.
    for (s, t) in [(Stage::CopyToUser, 200), (Stage::DevQueue, 100)] {
        let mut e = ev(s, t, 0x1234, 18);
        e.flags |= F_UDP;
        if s == Stage::CopyToUser {
            e.daddr = [0; 16];
        }
        evs.push(e);
    }
    let t = run(&mut c, &evs);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].time_of(Stage::CopyToUser), Some(200));
}

#[test]
fn an_unconnected_socket_read_without_the_sender_joins_by_payload() {
    let mut c = Correlator::new(all_global());
    let mut evs = Vec::new();
    for (s, t) in [(Stage::DevQueue, 100), (Stage::SockQueue, 150), (Stage::CopyToUser, 200)] {
        let mut e = ev(s, t, 0x1234, 18);
        e.flags |= F_UDP;
        if s == Stage::CopyToUser {
            // recv() on an unconnected socket: the local end only.
            (e.saddr, e.sport) = ([0; 16], 0);
        }
        evs.push(e);
    }
    let t = run(&mut c, &evs);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].time_of(Stage::CopyToUser), Some(200));
}

#[test]
fn a_datagram_never_queued_is_finished_without_waiting_for_the_timeout() {
    let mut c = Correlator::new(all_global());
    let udp = |stage: Stage, ts: u64, key: u32| {
        let mut e = ev(stage, ts, key, 64);
        e.flags |= F_UDP;
        e
    };
    // Datagram 1 is dropped at its socket; datagram 2, 5 ms later, is delivered.
    let mut evs = Vec::new();
    for (key, t0, queued) in [(0x1111u32, 1_000_000u64, false), (0x2222, 6_000_000, true)] {
        for e in one_packet(t0, key, 64) {
            let s = Stage::from_u8(e.stage).unwrap();
            if queued || !matches!(s, Stage::SockQueue | Stage::CopyToUser | Stage::RecvSyscall) {
                evs.push(udp(s, e.ts_ns, key));
            }
        }
    }
    for e in &evs {
        c.push(e);
    }
    let mut out = Vec::new();
    // Long before the timeout (1 s) has passed: both traces are out.
    c.advance(20_000_000, &mut |t| out.push(t));
    assert_eq!(out.len(), 2);
    assert!(!out[0].complete && out[0].time_of(Stage::SockQueue).is_none());
    assert!(out[1].complete);
}

#[test]
fn a_flood_of_records_stays_bounded() {
    let mut c = Correlator::new(all_global());
    for i in 0..(MAX_UDP_PER_STAGE as u64 + 5_000) {
        let mut e = ev(Stage::SockQueue, 1_000 + i, 0x1111, 64);
        e.flags |= F_UDP;
        c.push(&e);
    }
    let st = c.flows.values().next().unwrap();
    assert_eq!(st.list(Stage::SockQueue).udp.len, MAX_UDP_PER_STAGE);
    assert_eq!(c.stats.records_evicted, 5_000);
}

#[test]
fn missing_stage_is_missing_not_guessed() {
    let mut c = Correlator::new(all_global());
    let evs: Vec<Event> = one_packet(1_000, 0, 10).into_iter().filter(|e| e.stage != Stage::Xdp as u8).collect();
    let t = run(&mut c, &evs);
    assert_eq!(t.len(), 1);
    assert!(!t[0].complete);
    assert_eq!(t[0].time_of(Stage::Xdp), None);
    assert_eq!(c.stats.incomplete, 1);
}

#[test]
fn waits_for_the_watermark() {
    let mut c = Correlator::new(all_global());
    for e in one_packet(1_000, 0, 10) {
        c.push(&e);
    }
    let mut out = Vec::new();
    c.advance(1_500, &mut |t| out.push(t));
    assert!(out.is_empty(), "last stage at 2100 not yet covered by the watermark");
    c.advance(2_200, &mut |t| out.push(t));
    assert_eq!(out.len(), 1);
}

#[test]
fn sequence_wraparound() {
    let mut c = Correlator::new(all_global());
    let mut evs = one_packet(1_000, u32::MAX - 5, 10);
    evs.extend(one_packet(5_000, 4, 10));
    let t = run(&mut c, &evs);
    assert_eq!(t.len(), 2);
    assert!(t.iter().all(|t| t.complete));
    assert_eq!(t[0].seq, u32::MAX - 5);
    assert_eq!(t[1].seq, 4);
}

#[test]
fn control_segment_kind() {
    let mut c = Correlator::new(all_global());
    let mut e = ev(Stage::DevQueue, 100, 77, 0);
    e.flags |= (Kind::Ack as u8) << KIND_SHIFT;
    let t = run(&mut c, &[e]);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].kind, TraceKind::Control(Kind::Ack));
}

/// `woken`/`on_cpu` carry a copy of the sock_queue record: kept between it and the copy,
/// dropped when later than the copy (a wake-up for later data).
#[test]
fn the_wait_split_never_comes_after_the_copy() {
    for (woken, on_cpu, kept) in [(1_920, 1_950, true), (2_400, 2_500, false)] {
        let mut evs = one_packet(1_000, 5000, 18);
        let q = *evs.iter().find(|e| e.stage == Stage::SockQueue as u8).unwrap();
        for (s, ts) in [(Stage::Woken, woken), (Stage::OnCpu, on_cpu)] {
            let mut e = q;
            e.stage = s as u8;
            e.ts_ns = ts;
            evs.push(e);
        }
        let t = run(&mut Correlator::new(all_global()), &evs);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].time_of(Stage::Woken).is_some(), kept, "woken at {woken}");
        assert_eq!(t[0].time_of(Stage::OnCpu).is_some(), kept, "on_cpu at {on_cpu}");
        assert!(t[0].complete);
        let copy = t[0].time_of(Stage::CopyToUser).unwrap();
        for s in [Stage::Woken, Stage::OnCpu] {
            assert!(t[0].time_of(s).is_none_or(|w| w <= copy), "{s:?} after the copy");
        }
    }
}
