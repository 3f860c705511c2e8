//! `packetflow capture` cross-checked against tcpdump on the same live packets: the packet
//! lists match (direction, addresses, ports, TCP sequence, length, payload bytes), every
//! filter primitive selects what tcpdump's same expression selects, malformed frames are
//! captured as they are and passed on, and tshark reads the pcapng without complaint.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use packetflow_tests::*;

/// tshark's per-packet fields we compare.
const FIELDS: &[&str] = &[
    "eth.type",
    "ip.src",
    "ip.dst",
    "ipv6.src",
    "ipv6.dst",
    "tcp.srcport",
    "tcp.dstport",
    "tcp.seq_raw",
    "udp.srcport",
    "udp.dstport",
    "icmp.type",
    "icmpv6.type",
    "frame.len",
    "frame.cap_len",
    "data.data",
    "tcp.payload",
];

/// Packets no test sends: a fresh veth's IPv6 autoconfiguration (MLD reports, router
/// solicitations from its fe80:: address, and MLD reports from the unspecified address ::
/// while duplicate address detection runs) goes out on the kernel's timers for seconds
/// after the link comes up, so one capture may catch one that the other, started or
/// stopped a few milliseconds apart, did not. Both lists leave them out.
const NOT_AUTOCONF: &str = "!(ipv6.src == fe80::/10) && !(ipv6.src == ::)";

/// The packet list of a capture file, one line of fields per packet (tshark -T fields),
/// without IPv6 autoconfiguration noise.
fn fields(file: &Path, filter: Option<&str>) -> Vec<String> {
    let mut c = Command::new("tshark");
    c.arg("-r").arg(file).args(["-T", "fields", "-E", "separator=|"]);
    for f in FIELDS {
        c.args(["-e", f]);
    }
    match filter {
        Some(f) => c.args(["-Y", &format!("({f}) && {NOT_AUTOCONF}")]),
        None => c.args(["-Y", NOT_AUTOCONF]),
    };
    let o = c.stderr(Stdio::piped()).output().expect("tshark (installed by cargo xtask setup)");
    assert!(o.status.success(), "tshark -r {}: {}", file.display(), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect()
}

/// tshark's complaints about a file (its warning about running as root is not about the file).
fn tshark_complaints(file: &Path) -> String {
    let o = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("tshark");
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stderr).lines().filter(|l| !l.contains("Running as user")).collect::<Vec<_>>().join("\n")
}

/// A capture with packetflow: started, then stopped by SIGINT after `traffic` ran.
struct Pf {
    p: Proc,
    err: std::sync::mpsc::Receiver<String>,
}

fn start_pf(args: &[&str]) -> Pf {
    start_pf_to(args, Stdio::null())
}

/// `start_pf` with the capture's stdout going to `stdout`.
fn start_pf_to(args: &[&str], stdout: impl Into<Stdio>) -> Pf {
    use std::io::{BufRead, BufReader};
    let mut c =
        Command::new(bin()).arg("capture").args(args).stdout(stdout).stderr(Stdio::piped()).spawn().expect("capture");
    let err = c.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(err);
        let mut all = String::new();
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            if line.starts_with("capturing on") {
                let _ = tx.send(String::new());
            }
            all.push_str(&line);
            line.clear();
        }
        let _ = tx.send(all);
    });
    let pf = Pf { p: Proc(c), err: rx };
    let first = pf.err.recv_timeout(Duration::from_secs(30)).expect("capture starts");
    assert!(first.is_empty(), "capture failed to start: {first}");
    pf
}

impl Pf {
    fn stop(mut self) -> String {
        let st = self.p.interrupt(Duration::from_secs(15)).expect("capture stops on SIGINT");
        let err = self.err.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        assert!(st.success(), "capture failed: {err}");
        err
    }

    /// Waits for a capture that ends by itself (`-c`, `--duration`); its stderr.
    fn finish(mut self) -> String {
        let st = self.p.wait(Duration::from_secs(60)).expect("capture ends by itself");
        let err = self.err.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        assert!(st.success(), "capture failed: {err}");
        err
    }
}

/// tcpdump on `iface` (inside `ns` when given), one direction, unfiltered, into `file`.
fn start_tcpdump(ns: Option<&Path>, iface: &str, dir: &str, file: &Path) -> Proc {
    let mut c = match ns {
        Some(p) => testhosts::netns_command(p, "tcpdump"),
        None => Command::new("tcpdump"),
    };
    let mut c = c
        .args(["-i", iface, "-Q", dir, "-n", "-s", "262144", "-U", "--immediate-mode", "-w"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (installed by cargo xtask setup)");
    // tcpdump says "listening on IFACE" once its socket is bound: wait for it, or the
    // first packets of a busy machine's test land before tcpdump sees anything.
    let err = c.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader};
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("listening on") {
                let _ = tx.send(());
            }
        }
    });
    let p = Proc(c);
    rx.recv_timeout(Duration::from_secs(30)).expect("tcpdump starts listening");
    p
}

fn stop_tcpdump(mut p: Proc) {
    std::thread::sleep(Duration::from_millis(300));
    p.interrupt(Duration::from_secs(10)).expect("tcpdump stops");
}

/// Mixed traffic between the test hosts: TCP and UDP seed exchanges over IPv4 and IPv6,
/// pings both ways. Bounded: a few dozen packets.
fn mixed_traffic(h: &TestHosts, port: u16) {
    for (addr, udp) in
        [(testhosts::ADDR_B, false), (testhosts::ADDR_B, true), (testhosts::ADDR6_B, false), (testhosts::ADDR6_B, true)]
    {
        let bind = if addr.contains(':') { "::" } else { "0.0.0.0" };
        let _srv = serve(Some(&h.path_b()), bind, port, udp);
        client(Some(&h.path_a()), addr, port, 3, 100, udp);
    }
    for target in [testhosts::ADDR_B, testhosts::ADDR6_B] {
        let _ = h.command(&h.ns_a, "ping").args(["-c", "2", "-i", "0.2", "-W", "1", target]).output();
    }
}

/// What of the test's own traffic (`mixed_traffic` on `port`) a packet list holds: the
/// kinds seen, of "tcp4", "udp4", "tcp6", "udp6", "icmp", "icmp6". A cross-check of two
/// empty lists, or of lists of other packets only, compares nothing.
fn own_kinds(list: &[String], port: u16) -> std::collections::BTreeSet<&'static str> {
    let field = |f: &[&str], name: &str| -> Vec<String> {
        let i = FIELDS.iter().position(|n| *n == name).expect("field");
        f.get(i).map(|v| v.split(',').map(str::to_string).collect()).unwrap_or_default()
    };
    let mut kinds = std::collections::BTreeSet::new();
    for line in list {
        let f: Vec<&str> = line.split('|').collect();
        let v6 = !field(&f, "ipv6.src").concat().is_empty();
        let has_port = |a: &str, b: &str| field(&f, a).iter().chain(&field(&f, b)).any(|p| *p == port.to_string());
        if has_port("tcp.srcport", "tcp.dstport") {
            kinds.insert(if v6 { "tcp6" } else { "tcp4" });
        } else if has_port("udp.srcport", "udp.dstport") {
            kinds.insert(if v6 { "udp6" } else { "udp4" });
        } else if field(&f, "icmp.type").iter().any(|t| t == "0" || t == "8") {
            kinds.insert("icmp");
        } else if field(&f, "icmpv6.type").iter().any(|t| t == "128" || t == "129") {
            kinds.insert("icmp6");
        }
    }
    kinds
}

fn pf_list(file: &Path, dir: &str) -> Vec<String> {
    let f = if dir == "in" { "frame.packet_flags_direction == 1" } else { "frame.packet_flags_direction == 2" };
    fields(file, Some(f))
}

#[test]
fn lo_capture_matches_tcpdump_packet_for_packet() {
    require_root();
    let port = unique_port();
    let pf = tmp("lo-pf.pcapng");
    let td = tmp("lo-td.pcap");
    let cap = start_pf(&["-i", "lo", "-w", pf.to_str().unwrap(), "port", &port.to_string()]);
    let dump = start_tcpdump(None, "lo", "in", &td);
    std::thread::sleep(Duration::from_secs(1));
    let _srv = serve(None, "127.0.0.1", port, false);
    client(None, "127.0.0.1", port, 10, 200, false);
    std::thread::sleep(Duration::from_millis(300));
    stop_tcpdump(dump);
    let err = cap.stop();
    assert!(err.contains("packets captured") && err.contains("0 packets dropped by packetflow"), "{err}");
    assert_eq!(tshark_complaints(&pf), "", "tshark warnings");
    let theirs = fields(&td, Some(&format!("tcp.port == {port}")));
    let ours = pf_list(&pf, "in");
    assert!(theirs.len() >= 23, "tcpdump saw {} packets", theirs.len());
    assert_eq!(ours, theirs, "packetflow and tcpdump disagree on lo");
    assert!(pf_list(&pf, "out").is_empty(), "loopback packets are recorded once, at ingress");
}

#[test]
fn veth_capture_matches_tcpdump_in_both_directions() {
    require_root();
    let h = TestHosts::new("pfcap").expect("test hosts");
    let port = unique_port();
    let pf = tmp("veth-pf.pcapng");
    let (tin, tout) = (tmp("veth-in.pcap"), tmp("veth-out.pcap"));
    let cap = start_pf(&["-i", &format!("{}@{}", h.veth_b, h.ns_b), "-w", pf.to_str().unwrap()]);
    let d_in = start_tcpdump(Some(&h.path_b()), &h.veth_b, "in", &tin);
    let d_out = start_tcpdump(Some(&h.path_b()), &h.veth_b, "out", &tout);
    std::thread::sleep(Duration::from_secs(1));
    mixed_traffic(&h, port);
    std::thread::sleep(Duration::from_millis(300));
    stop_tcpdump(d_in);
    stop_tcpdump(d_out);
    cap.stop();
    assert_eq!(tshark_complaints(&pf), "");
    for (dir, td) in [("in", &tin), ("out", &tout)] {
        let theirs = fields(td, None);
        let ours = pf_list(&pf, dir);
        assert!(theirs.len() >= 20, "{dir}: tcpdump saw {}", theirs.len());
        let all: Vec<&str> = vec!["icmp", "icmp6", "tcp4", "tcp6", "udp4", "udp6"];
        assert_eq!(own_kinds(&theirs, port).into_iter().collect::<Vec<_>>(), all, "{dir}: the test's traffic");
        assert_eq!(ours, theirs, "direction {dir}: packetflow and tcpdump disagree");
    }
}

#[test]
fn each_filter_primitive_selects_what_tcpdump_selects() {
    require_root();
    let h = TestHosts::new("pfflt").expect("test hosts");
    let port = unique_port();
    let p = port.to_string();
    let lo_port = (port - 5).to_string();
    let hi_port = (port + 5).to_string();
    let range = format!("{lo_port}-{hi_port}");
    let expressions: Vec<Vec<&str>> = vec![
        vec!["host", testhosts::ADDR_A],
        vec!["src", "host", testhosts::ADDR_B],
        vec!["dst", "host", testhosts::ADDR6_B],
        vec!["net", "198.18.0.0/24"],
        vec!["net", "fd00::/64"],
        vec!["port", &p],
        vec!["dst", "port", &p],
        vec!["portrange", &range],
        vec!["tcp"],
        vec!["udp"],
        vec!["icmp"],
        vec!["icmp6"],
        vec!["ip"],
        vec!["ip6"],
        vec!["tcp", "and", "dst", "port", &p],
        vec!["udp", "or", "icmp"],
        vec!["not", "tcp"],
        vec!["host", testhosts::ADDR_B, "and", "(", "tcp", "or", "icmp", ")"],
        vec!["!udp", "&&", "!icmp6"],
        vec!["host", testhosts::ADDR_A, "or", testhosts::ADDR6_A],
    ];
    for expr in expressions {
        let text = expr.join(" ");
        let pf = tmp("flt-pf.pcapng");
        let (tin, tout) = (tmp("flt-in.pcap"), tmp("flt-out.pcap"));
        let mut args =
            vec!["-i".to_string(), format!("{}@{}", h.veth_b, h.ns_b), "-w".into(), pf.to_str().unwrap().into()];
        args.extend(expr.iter().map(std::string::ToString::to_string));
        let cap = start_pf(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let d_in = start_tcpdump(Some(&h.path_b()), &h.veth_b, "in", &tin);
        let d_out = start_tcpdump(Some(&h.path_b()), &h.veth_b, "out", &tout);
        std::thread::sleep(Duration::from_millis(800));
        mixed_traffic(&h, port);
        std::thread::sleep(Duration::from_millis(300));
        stop_tcpdump(d_in);
        stop_tcpdump(d_out);
        cap.stop();
        let mut selected = Vec::new();
        for (dir, td) in [("in", &tin), ("out", &tout)] {
            // tcpdump's own filter, applied by libpcap to the same packets.
            let filtered = tmp("flt-td.pcap");
            let st = Command::new("tcpdump")
                .arg("-r")
                .arg(td)
                .arg("-w")
                .arg(&filtered)
                .args(&expr)
                .stderr(Stdio::null())
                .status()
                .expect("tcpdump -r");
            assert!(st.success(), "tcpdump rejected '{text}'");
            let theirs = fields(&filtered, None);
            let ours = pf_list(&pf, dir);
            assert_eq!(ours, theirs, "'{text}', direction {dir}");
            selected.extend(ours);
        }
        // Each expression selects some of the test's own traffic (in one direction at
        // least): agreeing on two empty lists checks nothing.
        assert!(!own_kinds(&selected, port).is_empty(), "'{text}' selected none of the test's traffic: {selected:?}");
    }
}

#[test]
fn malformed_frames_are_captured_as_they_are_and_passed_on() {
    require_root();
    let h = TestHosts::new("pfbad").expect("test hosts");
    let pf = tmp("bad-pf.pcapng");
    let td = tmp("bad-td.pcap");
    let cap = start_pf(&["-i", &format!("{}@{}", h.veth_b, h.ns_b), "-Q", "in", "-w", pf.to_str().unwrap()]);
    let dump = start_tcpdump(Some(&h.path_b()), &h.veth_b, "in", &td);
    std::thread::sleep(Duration::from_secs(1));
    let dst = [0xffu8; 6];
    let src = [0x02u8, 0, 0, 0, 0, 0xaa];
    let frame = |ethertype: u16, body: &[u8]| {
        let mut f = dst.to_vec();
        f.extend(src);
        f.extend(ethertype.to_be_bytes());
        f.extend(body);
        f
    };
    let frames = vec![
        frame(0x0800, &[0x45, 0, 0, 60, 0, 0]), // IPv4 header cut short
        frame(0x0800, &[0x43, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2]), // IHL 3
        frame(0x86dd, &[0x60, 0, 0, 0, 0, 8, 17]), // IPv6 header cut short
        frame(0x88b5, b"local experimental ethertype"), // not IP at all
        frame(0x0800, &[0x45, 0, 0, 40, 0, 0, 0x20, 0, 64, 6, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2, 0x9c]), // TCP cut
    ];
    let sent = frames.clone();
    let ifname = h.veth_a.clone();
    packetflow::platform::netns::in_netns(Some(&h.path_a()), move || {
        // SAFETY: socket(2) has no memory preconditions; the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from((libc::ETH_P_ALL as u16).to_be())) };
        assert!(fd >= 0, "raw socket");
        let ifindex = packetflow::platform::interfaces::ifindex(&ifname).expect("veth");
        for f in &sent {
            // SAFETY: a plain C struct of integers and arrays: all-zero bytes are a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            // SAFETY: sendto(2) reads `f.len()` bytes of `f` and the sockaddr_ll `sll`, both alive
            // across the call.
            let r = unsafe {
                libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, f.len() as isize, "sending a crafted frame");
        }
        // SAFETY: `fd` is the raw socket opened above, closed once.
        unsafe { libc::close(fd) };
        Ok(())
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop_tcpdump(dump);
    cap.stop();
    // Captured byte for byte (frame.cap_len and the bytes), and passed on: tcpdump, which
    // sees packets after XDP, got every one too.
    // Every frame's bytes, as tshark reads them.
    let bytes = |file: &PathBuf| -> Vec<String> {
        let o = Command::new("tshark").arg("-r").arg(file).args(["-T", "json", "-x"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("tshark json");
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p["_source"]["layers"]["frame_raw"][0].as_str().expect("frame_raw").to_string())
            // Only the crafted frames (source MAC 02:00:00:00:00:aa): the veth's own IPv6
            // autoconfiguration may land in one capture and not the other (NOT_AUTOCONF).
            .filter(|f| f.get(12..24) == Some("0200000000aa"))
            .collect()
    };
    let ours = bytes(&pf);
    let theirs = bytes(&td);
    assert_eq!(ours, theirs, "captured bytes differ from what tcpdump saw after XDP");
    let hex = |f: &[u8]| {
        f.iter().fold(String::new(), |mut s, b| {
            let _ = std::fmt::Write::write_fmt(&mut s, format_args!("{b:02x}"));
            s
        })
    };
    for f in &frames {
        assert!(ours.contains(&hex(f)), "frame {} not captured as sent", hex(f));
    }
}

#[test]
fn pcapng_to_stdout_pipes_into_tshark_and_carries_statistics() {
    require_root();
    let port = unique_port();
    let out = tmp("stdout.pcapng");
    // --duration bounds the run should fewer than 6 packets ever match.
    let c = start_pf_to(
        &["-i", "lo", "-w", "-", "-c", "6", "--duration", "30", "port", &port.to_string()],
        std::fs::File::create(&out).unwrap(),
    );
    let _srv = serve(None, "127.0.0.1", port, false);
    client(None, "127.0.0.1", port, 3, 50, false);
    let err = c.finish();
    assert!(err.contains("6 packets captured"), "{err}");
    let tshark = Command::new("tshark").args(["-r", "-"]).stdin(std::fs::File::open(&out).unwrap()).output().unwrap();
    assert!(tshark.status.success());
    assert_eq!(String::from_utf8_lossy(&tshark.stdout).lines().count(), 6);
    // Walk the blocks: section header, interface description (ns resolution, name),
    // six enhanced packets with direction flags, an interface statistics block.
    let data = std::fs::read(&out).unwrap();
    let (mut off, mut types) = (0usize, Vec::new());
    let mut isb_counts = None;
    while off + 12 <= data.len() {
        let ty = u32::from_le_bytes(data[off..off + 4].try_into().unwrap());
        let len = u32::from_le_bytes(data[off + 4..off + 8].try_into().unwrap()) as usize;
        if ty == 5 {
            // options after interface id (4) and timestamp (8)
            let mut o = off + 20;
            let mut recv = None;
            while o + 4 <= off + len - 4 {
                let code = u16::from_le_bytes([data[o], data[o + 1]]);
                let l = u16::from_le_bytes([data[o + 2], data[o + 3]]) as usize;
                if code == 0 {
                    break;
                }
                if code == 4 {
                    recv = Some(u64::from_le_bytes(data[o + 4..o + 12].try_into().unwrap()));
                }
                o += 4 + l + (4 - l % 4) % 4;
            }
            isb_counts = recv;
        }
        types.push(ty);
        off += len;
    }
    assert_eq!(types.first(), Some(&0x0A0D0D0A));
    assert_eq!(types.iter().filter(|t| **t == 1).count(), 1);
    assert_eq!(types.iter().filter(|t| **t == 6).count(), 6);
    assert_eq!(isb_counts, Some(6), "interface statistics: packets received");
    let tsres = fields(&out, None);
    assert_eq!(tsres.len(), 6);
}

#[test]
fn text_output_and_bad_expressions() {
    require_root();
    let port = unique_port();
    let text = tmp("text.out");
    let c = start_pf_to(
        &["-i", "lo", "-c", "4", "--duration", "30", "tcp", "port", &port.to_string()],
        std::fs::File::create(&text).unwrap(),
    );
    let _srv = serve(None, "127.0.0.1", port, false);
    client(None, "127.0.0.1", port, 2, 18, false);
    c.finish();
    let out = std::fs::read_to_string(&text).unwrap();
    assert_eq!(out.lines().count(), 4, "{out}");
    let first = out.lines().next().unwrap();
    assert!(first.contains(" lo In  IP 127.0.0.1.") && first.contains("Flags [S]"), "{first}");
    for bad in ["port 80 and fooo", "host 999.1.1.1", "(tcp", "ether host 1:2:3:4:5:6"] {
        let mut args = vec!["capture", "-i", "lo"];
        args.extend(bad.split(' '));
        let o = packetflow(&args);
        assert_eq!(o.status.code(), Some(2), "{bad}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("bad filter expression") && e.lines().count() == 1, "{bad}: {e}");
    }
    let o = packetflow(&["capture", "port", "80"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn stages_land_in_packet_comments() {
    require_root();
    let port = unique_port();
    let out = tmp("stages.pcapng");
    let cap = start_pf(&["-i", "lo", "--stages", "-w", out.to_str().unwrap(), "port", &port.to_string()]);
    std::thread::sleep(Duration::from_millis(500));
    let _srv = serve(None, "127.0.0.1", port, false);
    client(None, "127.0.0.1", port, 5, 40, false);
    std::thread::sleep(Duration::from_millis(1500));
    cap.stop();
    let o = Command::new("tshark")
        .arg("-r")
        .arg(&out)
        .args(["-Y", "tcp.len > 0", "-T", "fields", "-e", "frame.comment"])
        .output()
        .unwrap();
    let comments = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = comments.lines().collect();
    assert_eq!(lines.len(), 10, "{comments}");
    for l in lines {
        assert!(l.contains("packetflow stages") && l.contains("recv_syscall +"), "{l}");
    }
}

/// `--drops`: a datagram to a closed port is captured twice, at XDP as it came in and as
/// the kernel dropped it (the reason and the dropping code in its comment), with the same
/// payload.
#[test]
fn dropped_packets_are_kept_with_their_reason() {
    require_root();
    let port = unique_port();
    let out = tmp("drops.pcapng");
    let cap = start_pf(&["-i", "lo", "--drops", "-w", out.to_str().unwrap(), "udp", "port", &port.to_string()]);
    std::thread::sleep(Duration::from_millis(300));
    udp_burst(port, 10, 100);
    std::thread::sleep(Duration::from_millis(500));
    let err = cap.stop();
    let o = Command::new("tshark")
        .arg("-r")
        .arg(&out)
        .args(["-T", "fields", "-E", "separator=|", "-e", "frame.comment", "-e", "udp.dstport", "-e", "data.data"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let drops: Vec<&str> = lines.iter().copied().filter(|l| l.contains("hook=drop")).collect();
    let xdp: Vec<&str> = lines.iter().copied().filter(|l| l.contains("hook=xdp")).collect();
    assert_eq!((drops.len(), xdp.len()), (10, 10), "{text}");
    for d in &drops {
        assert!(d.contains("drop=NO_SOCKET at __udp4_lib_rcv"), "{d}");
    }
    let payloads = |v: &[&str]| {
        let mut p: Vec<String> = v.iter().map(|l| l.rsplit('|').next().unwrap().to_string()).collect();
        p.sort();
        p
    };
    assert_eq!(payloads(&drops), payloads(&xdp), "the dropped packets' bytes are the ones that came in");
    assert!(err.contains("10 packets the kernel dropped captured"), "{err}");
    assert!(tshark_complaints(&out).is_empty(), "{}", tshark_complaints(&out));
}

/// Sends `n` UDP datagrams of `size` bytes to 127.0.0.1:`port` (bounded in count).
fn udp_burst(port: u16, n: usize, size: usize) {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let msg = vec![b'x'; size];
    for _ in 0..n {
        let _ = s.send_to(&msg, ("127.0.0.1", port));
    }
}

#[test]
fn a_full_disk_ends_the_capture_with_its_statistics_and_exit_1() {
    require_root();
    let port = unique_port();
    let disk = Tmpfs::mount("capture-full", "256k");
    let out = disk.0.join("out.pcapng");
    let mut cap = start_pf(&["-i", "lo", "-w", out.to_str().unwrap(), "udp", "port", &port.to_string()]);
    std::thread::sleep(Duration::from_millis(500));
    // 1 MiB of packets for a 256 KiB disk, at most 20 s: the capture must end by itself.
    let t0 = std::time::Instant::now();
    let mut status = None;
    while status.is_none() && t0.elapsed() < Duration::from_secs(20) {
        udp_burst(port, 50, 1000);
        status = cap.p.wait(Duration::from_millis(100));
    }
    let status = status.expect("the capture stops by itself when the disk is full");
    let err = cap.err.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("packets captured (") && err.contains("not written: the write failed"), "{err}");
    assert!(err.contains("packets received by filter") && err.contains("packets dropped by packetflow"), "{err}");
    let last = err.trim().lines().last().unwrap();
    assert!(last.starts_with(&format!("packetflow: writing {} failed: ", out.display())), "{err}");
    assert!(last.contains("No space left on device"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn outputs_are_not_written_through_symlinks_and_are_0640() {
    use std::os::unix::{fs::PermissionsExt, process::CommandExt};
    require_root();
    let dir = tmp("capture-links");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let link = dir.join("out.pcapng");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let o = packetflow(&["capture", "-i", "lo", "-c", "1", "--duration", "5", "-w", link.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert_eq!(
        e.trim(),
        format!("packetflow: refusing to write {}: it is a symbolic link (name the file itself)", link.display())
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    // A new file: mode 0640 (with umask 0, so the mode is the program's own choice).
    let port = unique_port();
    let new = dir.join("new.pcapng");
    let mut c = Command::new(bin());
    c.args(["capture", "-i", "lo", "--duration", "1", "-w", new.to_str().unwrap(), "port", &port.to_string()]);
    // SAFETY: the pre_exec closure runs in the forked child before exec and calls only umask(2),
    // async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let o = c.stdin(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(&new).unwrap().permissions().mode() & 0o777, 0o640);
}

/// `capture -r`: a capture read back gives the same packets (rewritten with -w: every
/// field, direction and comment), the same filter selects what tshark's does, stdin reads
/// as a file, a tcpdump pcap reads as tcpdump reads it, and -A/-e/-x/-v print what they
/// should; bad files are one sentence and exit 2.
#[test]
fn read_back_round_trips_and_reads_tcpdump_files() {
    require_root();
    let port = unique_port();
    let (pf, td, back) = (tmp("r-pf.pcapng"), tmp("r-td.pcap"), tmp("r-back.pcapng"));
    let cap = start_pf(&["-i", "lo", "--stages", "-w", pf.to_str().unwrap(), "port", &port.to_string()]);
    let dump = start_tcpdump(None, "lo", "in", &td);
    std::thread::sleep(Duration::from_secs(1));
    {
        let _srv = serve(None, "127.0.0.1", port, false);
        client(None, "127.0.0.1", port, 5, 100, false);
    }
    udp_burst(port, 5, 60);
    std::thread::sleep(Duration::from_millis(1500));
    stop_tcpdump(dump);
    cap.stop();
    let read = |args: &[&str], stdin: Option<&Path>| {
        let mut c = Command::new(bin());
        c.arg("capture").args(args);
        if let Some(f) = stdin {
            c.stdin(std::fs::File::open(f).unwrap());
        }
        let o = c.output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let file = pf.to_str().unwrap();

    // -w: the same packets, directions and comments.
    let (code, _, err) = read(&["-r", file, "-w", back.to_str().unwrap()], None);
    assert_eq!(code, Some(0), "{err}");
    assert!(fields(&pf, None).len() >= 20, "{} packets", fields(&pf, None).len());
    assert_eq!(fields(&back, None), fields(&pf, None));
    let extra = |f: &Path| {
        let o = Command::new("tshark")
            .arg("-r")
            .arg(f)
            .args([
                "-T",
                "fields",
                "-e",
                "frame.time_epoch",
                "-e",
                "frame.packet_flags_direction",
                "-e",
                "frame.comment",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(extra(&back), extra(&pf));
    assert!(extra(&back).contains("packetflow stages"), "comments kept");
    assert_eq!(tshark_complaints(&back), "");

    // The filter: what tshark selects, in lines.
    let (code, lines, err) = read(&["-r", file, "udp"], None);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(lines.lines().count(), fields(&pf, Some("udp")).len(), "{lines}");
    assert_eq!(lines.lines().count(), 5);
    assert!(lines.lines().all(|l| l.contains(" lo In  IP 127.0.0.1.") && l.contains(": UDP, length 60")), "{lines}");
    let (_, tcp_data, _) = read(&["-r", file, "tcp", "and", "dst", "port", &port.to_string()], None);
    let want = fields(&pf, Some(&format!("tcp.dstport == {port}"))).len();
    assert_eq!(tcp_data.lines().count(), want, "{tcp_data}");
    let (_, two, _) = read(&["-r", file, "-c", "2", "udp"], None);
    assert_eq!(two.lines().count(), 2);

    // stdin reads as the file does.
    let (code, all, _) = read(&["-r", file], None);
    let (code2, from_stdin, err) = read(&["-r", "-"], Some(&pf));
    assert_eq!((code, code2), (Some(0), Some(0)), "{err}");
    assert_eq!(from_stdin, all);

    // tcpdump's own pcap (microseconds, no interface names): as many lines as tcpdump -r.
    let expr = format!("tcp port {port}");
    let theirs = Command::new("tcpdump").arg("-r").arg(&td).arg("-n").arg(&expr).output().unwrap();
    let (code, ours, err) = read(&["-r", td.to_str().unwrap(), "tcp", "port", &port.to_string()], None);
    assert_eq!(code, Some(0), "{err}");
    let n = String::from_utf8_lossy(&theirs.stdout).lines().count();
    assert!(n >= 15, "tcpdump read {n} packets");
    assert_eq!(ours.lines().count(), n, "{ours}");

    // tcpdump's line options.
    let (_, a, _) = read(&["-r", file, "-A", "tcp", "and", "dst", "port", &port.to_string()], None);
    assert!(a.contains("Hello from client!"), "{a}");
    let (_, e, _) = read(&["-r", file, "-e", "-v", "-c", "1"], None);
    assert!(e.contains("ethertype IPv4 (0x0800)") && e.contains("ttl 64"), "{e}");
    assert!(e.contains("    hook=xdp"), "-v prints the packet's comment: {e}");
    let (_, x, _) = read(&["-r", file, "-x", "-c", "1"], None);
    assert!(x.lines().nth(1).is_some_and(|l| l.starts_with("\t0x0000:  45")), "hex from the IP header: {x}");
    let (_, xx, _) = read(&["-r", file, "-XX", "-c", "1"], None);
    assert!(
        xx.lines().nth(1).is_some_and(|l| l.starts_with("\t0x0000:  0000 0000 0000")),
        "with the link header: {xx}"
    );

    // --json: one object per packet, the file's comment in `notes`.
    let (code, objects, err) = read(&["-r", file, "--json", "udp"], None);
    assert_eq!(code, Some(0), "{err}");
    let objects: Vec<serde_json::Value> = objects.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!(objects.len(), 5);
    for o in &objects {
        assert_eq!(
            (o["type"].as_str(), o["proto"].as_str(), o["dir"].as_str()),
            (Some("packet"), Some("udp"), Some("in"))
        );
        assert_eq!(
            (o["dport"].as_u64(), o["len"].as_u64(), o["ifname"].as_str()),
            (Some(u64::from(port)), Some(102), Some("lo"))
        );
        assert!(o["notes"][0].as_str().is_some_and(|n| n.starts_with("hook=xdp")), "{o}");
    }
    // ... and live.
    let live = std::thread::spawn(move || {
        Command::new(bin())
            .args(["capture", "-i", "lo", "-c", "3", "--json", "udp", "port", &port.to_string()])
            .output()
    });
    // Bursts until the capture (started in the thread) has its three packets; bounded.
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(500));
        if live.is_finished() {
            break;
        }
        udp_burst(port, 3, 60);
    }
    assert!(live.is_finished(), "capture -c 3 --json did not end");
    let o = live.join().unwrap().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["dport"].as_u64() == Some(u64::from(port)) && l["caplen"] == 102));

    // Bad files.
    let text = tmp("r-text.txt");
    std::fs::write(&text, "GET / HTTP/1.1\r\n\r\n").unwrap();
    let (code, _, err) = read(&["-r", text.to_str().unwrap()], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a pcap or pcapng file") && err.lines().count() == 1, "{err}");
    let (code, _, err) = read(&["-r", "/nonexistent.pcap"], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot open /nonexistent.pcap"), "{err}");
    let bytes = std::fs::read(&pf).unwrap();
    let cut = tmp("r-cut.pcapng");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let (code, some, err) = read(&["-r", cut.to_str().unwrap()], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("corrupt at byte"), "{err}");
    assert!(some.lines().count() > 5, "the packets before the damage are printed");
}

/// `-C 1 -W 3`: a ring of three files of 1 MB, each a whole pcapng file tshark reads
/// alone; `-G 1`: a new file every second, named by strftime.
#[test]
fn files_rotate_by_size_in_a_ring_and_by_time() {
    require_root();
    let port = unique_port();
    let dir = tmp("rotate");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("ring.pcapng");
    let cap =
        start_pf(&["-i", "lo", "-w", base.to_str().unwrap(), "-C", "1", "-W", "3", "udp", "port", &port.to_string()]);
    // 5,000 datagrams of 1,000 bytes: about 5 MB of pcapng, five files' worth.
    for _ in 0..50 {
        udp_burst(port, 100, 1000);
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    cap.stop();
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["ring.pcapng0", "ring.pcapng1", "ring.pcapng2"], "a ring of three");
    for n in &names {
        let p = dir.join(n);
        let size = std::fs::metadata(&p).unwrap().len();
        assert!(size <= 1_000_000 + 1200, "{n}: {size} bytes");
        assert_eq!(tshark_complaints(&p), "", "{n}");
        assert!(!fields(&p, Some("udp")).is_empty(), "{n} holds packets");
    }
    let full = names.iter().filter(|n| std::fs::metadata(dir.join(n)).unwrap().len() >= 999_000).count();
    assert!(full >= 2, "at least two files filled: {names:?}");

    let timed = dir.join("t-%H%M%S.pcapng");
    let cap = start_pf(&["-i", "lo", "-w", timed.to_str().unwrap(), "-G", "1", "udp", "port", &port.to_string()]);
    for _ in 0..25 {
        udp_burst(port, 2, 100);
        std::thread::sleep(Duration::from_millis(100));
    }
    cap.stop();
    let timed: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("t-"))
        .collect();
    assert!(timed.len() >= 2, "a file per second: {timed:?}");
    assert!(timed.iter().all(|n| n.len() == "t-HHMMSS.pcapng".len()), "named by their start only: {timed:?}");
    for n in &timed {
        assert_eq!(tshark_complaints(&dir.join(n)), "", "{n}");
    }
    let o = packetflow(&["capture", "-i", "lo", "-W", "2", "-w", base.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "-W without -C or -G");
}
