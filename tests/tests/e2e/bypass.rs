//! `capture --bypass` (AF_XDP) and `blast` (XDP live frames) between test hosts: frames
//! the generator sent arrive byte for byte; only frames the filter selects are taken, the
//! rest still reach their socket; every receive queue gets a socket; a SIGKILL leaves no
//! XDP program and no socket behind; bad input is one sentence.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use packetflow_tests::*;
use serde_json::Value;

/// `capture --bypass` running in the background; its stderr collected.
struct Bypass {
    p: Proc,
    err: std::sync::mpsc::Receiver<String>,
}

fn start_bypass(args: &[&str]) -> Bypass {
    use std::io::{BufRead, BufReader};
    let mut c = Command::new(bin())
        .args(["capture", "--bypass"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("capture --bypass");
    let err = c.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(err);
        let (mut all, mut line) = (String::new(), String::new());
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            if line.starts_with("capturing on") {
                let _ = tx.send(line.clone());
            }
            all.push_str(&line);
            line.clear();
        }
        let _ = tx.send(all);
    });
    let first = rx.recv_timeout(Duration::from_secs(30)).expect("capture --bypass starts");
    assert!(first.starts_with("capturing on"), "capture --bypass failed to start: {first}");
    Bypass { p: Proc(c), err: rx }
}

impl Bypass {
    /// SIGINT; the whole stderr.
    fn stop(mut self) -> String {
        std::thread::sleep(Duration::from_millis(300));
        let st = self.p.interrupt(Duration::from_secs(15)).expect("capture --bypass stops on SIGINT");
        let err = self.err.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        assert!(st.success(), "capture --bypass failed: {err}");
        err
    }
}

/// `capture --bypass` on test host b's veth, written to `out`, with `filter`.
fn bypass_on_b(h: &TestHosts, out: &Path, filter: &str) -> Bypass {
    let iface = format!("{}@{}", h.veth_b, h.path_b().display());
    let mut args = vec!["-i", &iface, "-w", out.to_str().unwrap()];
    args.extend(filter.split_whitespace());
    start_bypass(&args)
}

/// "N <what>" in the capture's closing lines.
fn count_of(err: &str, what: &str) -> u64 {
    err.lines()
        .find_map(|l| l.strip_suffix(what).and_then(|n| n.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no '{what}' line in: {err}"))
}

fn mac(ns: &Path, dev: &str) -> String {
    let o = testhosts::netns_command(ns, "ip").args(["-j", "link", "show", "dev", dev]).output().unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).expect("ip -j link");
    v[0]["address"].as_str().expect("a MAC address").to_string()
}

/// `packetflow blast` from `dev` in `ns`; its JSON result.
fn blast(ns: &Path, dev: &str, extra: &[&str]) -> Value {
    let o = Command::new(bin())
        .args(["blast", "-i", &format!("{dev}@{}", ns.display()), "--json"])
        .args(["--src", testhosts::ADDR_A, "--dst", testhosts::ADDR_B])
        .args(extra)
        .output()
        .expect("blast");
    assert!(o.status.success(), "blast failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("blast --json")
}

/// The frame `blast` sends as frame `seq` of CPU `cpu` (written out here, not taken from
/// packetflow): Ethernet, IPv4 (DF, TTL 64), UDP with checksum 0, the numbers, zeros.
fn expected_frame(size: usize, dst: [u8; 6], src: [u8; 6], sport: u16, dport: u16, cpu: u32, seq: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(size);
    f.extend(dst);
    f.extend(src);
    f.extend([0x08, 0x00]);
    let ip_len = (size - 14) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip.extend([198, 18, 0, 1, 198, 18, 0, 2]);
    let mut sum: u32 = ip.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend(ip);
    f.extend(sport.to_be_bytes());
    f.extend(dport.to_be_bytes());
    f.extend((ip_len - 20).to_be_bytes());
    f.extend([0, 0]);
    f.extend(cpu.to_be_bytes());
    f.extend(seq.to_be_bytes());
    f.resize(size, 0);
    f
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s.split(':').map(|x| u8::from_str_radix(x, 16).unwrap()).collect();
    v.try_into().unwrap()
}

/// Every frame of a pcapng file, as bytes (tshark -x in JSON).
fn frames(file: &Path) -> Vec<Vec<u8>> {
    let o = Command::new("tshark").arg("-r").arg(file).args(["-T", "json", "-x"]).output().expect("tshark");
    assert!(o.status.success(), "tshark: {}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).expect("tshark json");
    v.as_array()
        .expect("packets")
        .iter()
        .map(|p| {
            let hex = p["_source"]["layers"]["frame_raw"][0].as_str().expect("frame_raw");
            (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect()
        })
        .collect()
}

/// Checks a capture of blast's frames: each frame exactly as sent, each (cpu, number)
/// once, the numbers of each CPU without a gap; returns frames per CPU.
fn check_frames(file: &Path, size: usize, dst: &str, src: &str, dport: u16, flows: u16) -> BTreeMap<u32, u64> {
    let (dst, src) = (parse_mac(dst), parse_mac(src));
    let mut seen: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for f in frames(file) {
        assert_eq!(f.len(), size, "frame length");
        let cpu = u32::from_be_bytes(f[42..46].try_into().unwrap());
        let seq = u64::from_be_bytes(f[46..54].try_into().unwrap());
        let sport = 10000 + (seq % u64::from(flows)) as u16;
        assert_eq!(f, expected_frame(size, dst, src, sport, dport, cpu, seq), "frame {seq} of cpu {cpu}");
        seen.entry(cpu).or_default().push(seq);
    }
    seen.into_iter()
        .map(|(cpu, mut v)| {
            v.sort_unstable();
            let n = v.len() as u64;
            // Each CPU numbers its frames from 0: no gap, no repeat.
            assert_eq!(v, (0..n).collect::<Vec<_>>(), "cpu {cpu}: frames missing or twice");
            (cpu, n)
        })
        .collect()
}

#[test]
fn generated_frames_arrive_byte_for_byte() {
    require_root();
    let h = TestHosts::new("pfxsk").expect("test hosts");
    let port = unique_port();
    let out = tmp("bypass-bytes.pcapng");
    let cap = bypass_on_b(&h, &out, &format!("udp port {port}"));
    let (dst, src) = (mac(&h.path_b(), &h.veth_b), mac(&h.path_a(), &h.veth_a));
    // 20,000 frames of 64 B over four flows at 50 k/s: well below any loss.
    let sent = blast(
        &h.path_a(),
        &h.veth_a,
        &["--dst-mac", &dst, "--dport", &port.to_string(), "--flows", "4", "-c", "20000", "--rate", "50000"],
    );
    let err = cap.stop();
    println!("{sent}\n{err}");
    let frames_sent = sent["frames"].as_u64().unwrap();
    assert_eq!(frames_sent, 20000);
    assert_eq!(count_of(&err, " packets dropped by packetflow"), 0, "{err}");
    let per_cpu = check_frames(&out, 64, &dst, &src, port, 4);
    let captured: u64 = per_cpu.values().sum();
    assert_eq!(captured, count_of(&err, " packets captured"), "{err}");
    assert_eq!(captured, frames_sent, "every frame sent was captured: {per_cpu:?}\n{err}");
    assert!(err.contains("AF_XDP, copy mode") || err.contains("AF_XDP, zero-copy mode"), "{err}");
}

#[test]
fn only_matching_frames_are_taken_and_the_rest_reach_their_socket() {
    require_root();
    let h = TestHosts::new("pfxsf").expect("test hosts");
    let (taken, kept) = (unique_port(), unique_port());
    let bind = |port: u16| {
        let ns = h.path_b();
        platform_socket(&ns, port)
    };
    let (s_taken, s_kept) = (bind(taken), bind(kept));
    let out = tmp("bypass-filter.pcapng");
    let cap = bypass_on_b(&h, &out, &format!("udp dst port {taken}"));
    // 50 datagrams to each port from the other host.
    let o = h
        .command(&h.ns_a, "python3")
        .args([
            "-c",
            &format!(
                "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range(50):\n  s.sendto(b'taken %d'%i,('{b}',{taken}))\n  s.sendto(b'kept %d'%i,('{b}',{kept}))\n  time.sleep(0.002)",
                b = testhosts::ADDR_B
            ),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = cap.stop();
    let got = |s: &std::net::UdpSocket| {
        let mut n = 0;
        let mut buf = [0u8; 64];
        while s.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    };
    assert_eq!(got(&s_kept), 50, "every datagram the filter did not select reached its socket");
    assert_eq!(got(&s_taken), 0, "a datagram the filter selected reached the stack: {err}");
    assert_eq!(count_of(&err, " packets captured"), 50, "{err}");
    let all = frames(&out);
    assert_eq!(all.len(), 50);
    for f in &all {
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), taken, "only the filtered port is captured");
    }
}

/// A UDP socket bound to ADDR_B:port inside `ns`, non-blocking.
fn platform_socket(ns: &Path, port: u16) -> std::net::UdpSocket {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&ns).unwrap();
        // SAFETY: setns(2) on this short-lived thread only; the socket keeps its namespace.
        assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) }, 0);
        let s = std::net::UdpSocket::bind((testhosts::ADDR_B, port)).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    })
    .join()
    .unwrap()
}

#[test]
fn every_receive_queue_gets_a_socket() {
    require_root();
    if std::thread::available_parallelism().map_or(1, std::num::NonZero::get) < 2 {
        skip("one CPU: blast cannot reach a second receive queue");
        return;
    }
    // Two namespaces joined by a veth with two queues each way.
    let id = std::process::id() % 100_000;
    let (na, nb, va, vb) = (format!("pfxqa{id}"), format!("pfxqb{id}"), format!("pxqa{id}"), format!("pxqb{id}"));
    let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    let quiet_del = |ns: &str| Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
    let _ = quiet_del(&na);
    let _ = quiet_del(&nb);
    ip(&["netns", "add", &na]);
    ip(&["netns", "add", &nb]);
    struct Gone(String, String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            let _ = Command::new("ip").args(["netns", "del", &self.1]).status();
        }
    }
    let _gone = Gone(na.clone(), nb.clone());
    ip(&[
        "link",
        "add",
        &va,
        "netns",
        &na,
        "numrxqueues",
        "2",
        "numtxqueues",
        "2",
        "type",
        "veth",
        "peer",
        "name",
        &vb,
        "netns",
        &nb,
        "numrxqueues",
        "2",
        "numtxqueues",
        "2",
    ]);
    ip(&["-n", &na, "addr", "add", "198.18.0.1/24", "dev", &va]);
    ip(&["-n", &nb, "addr", "add", "198.18.0.2/24", "dev", &vb]);
    ip(&["-n", &na, "link", "set", &va, "up"]);
    ip(&["-n", &nb, "link", "set", &vb, "up"]);
    let (pa, pb) = (testhosts_path(&na), testhosts_path(&nb));
    let port = unique_port();
    let out = tmp("bypass-queues.pcapng");
    let cap = start_bypass(&[
        "-i",
        &format!("{vb}@{}", pb.display()),
        "-w",
        out.to_str().unwrap(),
        "udp",
        "port",
        &port.to_string(),
    ]);
    let dst = mac(&pb, &vb);
    let sent = blast(
        &pa,
        &va,
        &["--dst-mac", &dst, "--dport", &port.to_string(), "-c", "20000", "--rate", "40000", "--threads", "2"],
    );
    let err = cap.stop();
    println!("{sent}\n{err}");
    assert!(err.contains("queues 0-1"), "a socket on each of the two queues: {err}");
    let per_cpu = check_frames(&out, 64, &dst, &mac(&pa, &va), port, 1);
    // The veth puts a frame on the peer's queue of the sending CPU: frames from both
    // CPUs captured means both queues' sockets delivered.
    assert_eq!(per_cpu.len(), 2, "frames from both sending CPUs (queues): {per_cpu:?}");
    let captured: u64 = per_cpu.values().sum();
    assert_eq!(captured, sent["frames"].as_u64().unwrap(), "{per_cpu:?} {err}");
    assert_eq!(count_of(&err, " packets dropped by packetflow"), 0, "{err}");
}

fn testhosts_path(ns: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/run/netns/{ns}"))
}

/// The XDP program on `dev` in `ns`, as `ip link` shows it (empty when none).
fn xdp_on(ns: &Path, dev: &str) -> String {
    let o = testhosts::netns_command(ns, "ip").args(["-d", "link", "show", "dev", dev]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains("xdp")).collect::<Vec<_>>().join("\n")
}

#[test]
fn sigkill_leaves_no_xdp_program_and_no_socket() {
    require_root();
    let h = TestHosts::new("pfxsk9").expect("test hosts");
    let iface = format!("{}@{}", h.veth_b, h.path_b().display());
    let port = unique_port();
    let cap = start_bypass(&["-i", &iface, "-w", "/dev/null", "udp", "port", &port.to_string()]);
    assert!(!xdp_on(&h.path_b(), &h.veth_b).is_empty(), "the XDP program is attached while it runs");
    let mut p = cap.p;
    p.0.kill().unwrap();
    p.wait(Duration::from_secs(10)).expect("killed");
    // The kernel releases links and sockets of a dead process when its files close.
    let t0 = std::time::Instant::now();
    while !xdp_on(&h.path_b(), &h.veth_b).is_empty() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(xdp_on(&h.path_b(), &h.veth_b), "", "no XDP program left on the interface");
    // No socket left: a new capture binds the same queue (EBUSY otherwise) and captures.
    let again = start_bypass(&["-i", &iface, "-w", "/dev/null", "udp", "port", &port.to_string()]);
    let dst = mac(&h.path_b(), &h.veth_b);
    blast(&h.path_a(), &h.veth_a, &["--dst-mac", &dst, "--dport", &port.to_string(), "-c", "10"]);
    let err = again.stop();
    assert_eq!(count_of(&err, " packets captured"), 10, "{err}");
}

#[test]
fn bad_input_is_one_sentence_and_a_full_disk_ends_with_the_statistics() {
    require_root();
    let one_sentence = |args: &[&str], want: &str| {
        let o = Command::new(bin()).arg("capture").args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    // lo has no native XDP.
    one_sentence(&["--bypass", "-i", "lo", "--xdp-mode", "native"], "XDP would not attach");
    one_sentence(&["--bypass", "-i", "lo", "-s", "9000"], "more than one AF_XDP frame holds");
    one_sentence(&["--bypass", "-i", "lo", "-Q", "out"], "coming in only");
    one_sentence(&["--bypass", "-i", "lo", "-i", "lo"], "one interface");
    one_sentence(&["--bypass", "-i", "nosuchif0"], "unknown interface");
    // -w onto a full disk: the capture ends by itself, with its statistics and the reason.
    let h = TestHosts::new("pfxsd").expect("test hosts");
    let disk = Tmpfs::mount("bypass-full", "256k");
    let out = disk.0.join("out.pcapng");
    let port = unique_port();
    let cap = bypass_on_b(&h, &out, &format!("udp port {port}"));
    let dst = mac(&h.path_b(), &h.veth_b);
    // 20,000 frames of 100 B: 2 MB for a 256 KiB disk.
    blast(
        &h.path_a(),
        &h.veth_a,
        &["--dst-mac", &dst, "--dport", &port.to_string(), "-c", "20000", "--size", "100", "--rate", "100000"],
    );
    let mut p = cap.p;
    let st = p.wait(Duration::from_secs(20)).expect("the capture stops by itself when the disk is full");
    let err = cap.err.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("packets captured") && err.contains("packets dropped by packetflow"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
