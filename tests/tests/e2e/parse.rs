//! Packet parsing in the XDP and TC programs, run with BPF_PROG_TEST_RUN on crafted
//! frames: valid IPv4/IPv6 TCP/UDP, and malformed ones. Every frame must come back with
//! the pass verdict (XDP_PASS; TC_ACT_UNSPEC = tcx "next", so later programs still run),
//! byte for byte unchanged, and be counted as parsed or unparsed as it deserves.

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use packetflow::kernel::loader::{LoadOptions, Tracer};
use packetflow_common::counters::{PARSED_TC, PARSED_XDP, UNPARSED_TC, UNPARSED_XDP};
use packetflow_tests::require_root;

const XDP_PASS: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX; // -1

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    f.extend(ethertype.to_be_bytes());
    f
}

fn csum_ignored_ipv4(proto: u8, payload_len: usize, ihl_words: u8) -> Vec<u8> {
    let hlen = ihl_words as usize * 4;
    let total = (hlen + payload_len) as u16;
    let mut h = vec![0x40 | ihl_words, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2];
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h.resize(hlen, 1); // options: NOPs
    h
}

fn ipv6(next: u8, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend((payload_len as u16).to_be_bytes());
    h.extend([next, 64]);
    h.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    h.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    h
}

fn tcp(payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0x9c, 0x40, 0x1f, 0x90, 0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0];
    t.extend(payload);
    t
}

fn udp(payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0x9c, 0x40, 0x1f, 0x90];
    u.extend(((8 + payload.len()) as u16).to_be_bytes());
    u.extend([0, 0]);
    u.extend(payload);
    u
}

/// (name, frame, should parse)
fn frames() -> Vec<(&'static str, Vec<u8>, bool)> {
    let hello = b"Hello from client!";
    let v4 = |proto: u8, l4: Vec<u8>, ihl: u8| {
        let mut f = eth(0x0800);
        f.extend(csum_ignored_ipv4(proto, l4.len(), ihl));
        f.extend(l4);
        f
    };
    let v6 = |next: u8, l4: Vec<u8>| {
        let mut f = eth(0x86dd);
        f.extend(ipv6(next, l4.len()));
        f.extend(l4);
        f
    };
    let mut out = vec![
        ("ipv4 tcp", v4(6, tcp(hello), 5), true),
        ("ipv4 udp", v4(17, udp(hello), 5), true),
        ("ipv6 tcp", v6(6, tcp(hello)), true),
        ("ipv6 udp", v6(17, udp(hello)), true),
        ("ipv4 options tcp", v4(6, tcp(hello), 8), true),
        ("ipv4 pure ack", v4(6, tcp(&[]), 5), true),
    ];
    // IPv6 with a hop-by-hop and a destination-options extension header before UDP.
    let mut ext = vec![60, 0, 1, 4, 0, 0, 0, 0]; // hop-by-hop -> dest opts, PadN
    ext.extend([17, 0, 1, 4, 0, 0, 0, 0]); // dest opts -> UDP
    ext.extend(udp(hello));
    out.push(("ipv6 ext headers udp", v6(0, ext), true));
    // VLAN-tagged IPv4 TCP.
    let mut vlan = eth(0x8100);
    vlan.extend([0, 7, 0x08, 0x00]);
    vlan.extend(csum_ignored_ipv4(6, 20 + hello.len(), 5));
    vlan.extend(tcp(hello));
    out.push(("vlan ipv4 tcp", vlan, true));

    let full = v4(6, tcp(hello), 5);
    out.push(("truncated ethernet", full[..10].to_vec(), false));
    out.push(("truncated ipv4 header", full[..14 + 12].to_vec(), false));
    out.push(("truncated tcp header", full[..14 + 20 + 8].to_vec(), false));
    let v6full = v6(6, tcp(hello));
    out.push(("truncated ipv6 header", v6full[..14 + 30].to_vec(), false));
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x43; // IHL 3 < 5
    out.push(("ipv4 ihl too small", bad_ihl, false));
    let mut bad_doff = full.clone();
    bad_doff[14 + 20 + 12] = 0x20; // data offset 8 bytes < 20
    out.push(("tcp data offset too small", bad_doff, false));
    let mut arp = eth(0x0806);
    arp.extend([0u8; 28]);
    out.push(("arp (not ip)", arp, false));
    let mut icmp = eth(0x0800);
    icmp.extend(csum_ignored_ipv4(1, 8, 5));
    icmp.extend([8, 0, 0, 0, 0, 1, 0, 1]);
    out.push(("icmp (not tcp/udp)", icmp, false));
    let mut frag = v4(17, udp(hello), 5);
    frag[14 + 6] = 0x00;
    frag[14 + 7] = 0x10; // fragment offset 16*8: a later fragment
    out.push(("ipv4 later fragment", frag, false));
    out.push(("one byte", vec![0xff], false));
    out
}

fn counters(t: &Tracer, idx: u32) -> u64 {
    t.counters().expect("counters")[idx as usize]
}

#[test]
fn crafted_and_malformed_frames_pass_unchanged_and_are_counted() {
    require_root();
    let mut t = Tracer::load(&LoadOptions { ring_bytes: 4096, ..Default::default() }).expect("load");
    // Tracing on (the programs parse nothing while it is off), for a port no crafted frame
    // uses: every frame is parsed and counted, and no record is written.
    let none = packetflow::model::filter::FilterSpec { ports: vec![1], ..Default::default() };
    t.set_filter(&none.to_kernel(0).unwrap()).unwrap();
    for name in ["pf_xdp", "pf_tc_ingress", "pf_tc_egress"] {
        match t.ebpf_mut().program_mut(name).expect(name) {
            aya::programs::Program::Xdp(p) => p.load().expect("load xdp"),
            aya::programs::Program::SchedClassifier(p) => p.load().expect("load tc"),
            _ => unreachable!(),
        }
    }
    let mut refused = Vec::new();
    for (name, frame, parses) in frames() {
        for prog in ["pf_xdp", "pf_tc_ingress", "pf_tc_egress"] {
            let xdp = prog == "pf_xdp";
            let (p_idx, u_idx) = if xdp { (PARSED_XDP, UNPARSED_XDP) } else { (PARSED_TC, UNPARSED_TC) };
            let before = (counters(&t, p_idx), counters(&t, u_idx));
            let mut out = vec![0u8; frame.len() + 256];
            let r = {
                let opts = TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() };
                match t.ebpf_mut().program_mut(prog).expect(prog) {
                    aya::programs::Program::Xdp(p) => TestRun::test_run(p as &mut Xdp, opts),
                    aya::programs::Program::SchedClassifier(p) => TestRun::test_run(p as &mut SchedClassifier, opts),
                    _ => unreachable!(),
                }
            };
            // The kernel refuses to run test frames shorter than an Ethernet header
            // (nothing to pass on); our programs never see those.
            if frame.len() < 14 {
                if let Ok(r) = &r {
                    let want = if xdp { XDP_PASS } else { TC_ACT_UNSPEC };
                    assert_eq!(r.return_value, want, "{name} via {prog}");
                }
                continue;
            }
            let r = match r {
                Ok(r) => r,
                // The kernel builds no sk_buff from a frame whose IP header is cut short
                // (EINVAL before our program runs). The XDP run of the same frame covers the
                // parser, which is shared.
                Err(e) if !xdp && !parses && errno(&e) == Some(libc::EINVAL) => {
                    refused.push(format!("{name} via {prog}"));
                    continue;
                }
                Err(e) => panic!("{name} via {prog}: test run failed: {e} ({:?})", errno(&e)),
            };
            let want = if xdp { XDP_PASS } else { TC_ACT_UNSPEC };
            assert_eq!(r.return_value, want, "{name} via {prog}: verdict");
            assert_eq!(&out[..r.data_size_out as usize], &frame[..], "{name} via {prog}: frame changed");
            let after = (counters(&t, p_idx), counters(&t, u_idx));
            let expect = if parses { (before.0 + 1, before.1) } else { (before.0, before.1 + 1) };
            assert_eq!(after, expect, "{name} via {prog}: parsed/unparsed counters");
        }
    }
    println!("frames the kernel would not turn into an sk_buff for TC: {refused:?}");
    assert!(refused.len() <= 4, "too many frames refused by the kernel: {refused:?}");
}

fn errno(e: &aya::programs::ProgramError) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        cur = c.source();
    }
    None
}

#[test]
fn interface_programs_write_a_record_for_a_matching_packet() {
    require_root();
    let mut t = Tracer::load(&LoadOptions { ring_bytes: 1 << 16, ..Default::default() }).expect("load");
    let mut rings = t.take_rings().expect("rings");
    t.set_filter(&packetflow::model::filter::FilterSpec::default().to_kernel(0).unwrap()).unwrap();
    for name in ["pf_xdp", "pf_tc_ingress", "pf_tc_egress"] {
        match t.ebpf_mut().program_mut(name).expect(name) {
            aya::programs::Program::Xdp(p) => p.load().expect("load xdp"),
            aya::programs::Program::SchedClassifier(p) => p.load().expect("load tc"),
            _ => unreachable!(),
        }
    }
    let (name, frame, _) = frames().into_iter().next().expect("ipv4 tcp");
    for prog in ["pf_xdp", "pf_tc_ingress", "pf_tc_egress"] {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() };
        let r = match t.ebpf_mut().program_mut(prog).unwrap() {
            aya::programs::Program::Xdp(p) => TestRun::test_run(p as &mut Xdp, opts),
            aya::programs::Program::SchedClassifier(p) => TestRun::test_run(p as &mut SchedClassifier, opts),
            _ => unreachable!(),
        };
        r.unwrap_or_else(|e| panic!("{name} via {prog}: {e}"));
    }
    let stage_of = |s: packetflow_common::Stage| counters(&t, packetflow_common::counters::EMITTED + s as u32);
    use packetflow_common::Stage;
    assert_eq!((stage_of(Stage::Xdp), stage_of(Stage::TcIngress), stage_of(Stage::TcEgress)), (1, 1, 1));
    let mut seen = Vec::new();
    for (_, r) in &mut rings {
        while let Some(item) = r.next() {
            let ev: packetflow_common::Event = packetflow::pipeline::shards::record(&item).expect("a whole record");
            seen.push((ev.stage, ev.sport, ev.dport, ev.len));
        }
    }
    seen.sort_unstable();
    let s = |x: Stage| (x as u8, 40000u16, 8080u16, 18u32);
    assert_eq!(seen, vec![s(Stage::TcEgress), s(Stage::Xdp), s(Stage::TcIngress)]);
}
