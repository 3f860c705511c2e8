//! Harness for packetflow's end-to-end tests: the binary under test, root checks, test
//! hosts, traffic, and reading the NDJSON the tracer writes.
//!
//! Every test here loads the real programs into this kernel and sends real packets on
//! loopback or between test hosts (network namespaces joined by veth, addresses from
//! 198.18.0.0/15 and fd00::/8). Traffic loops are bounded in count and time.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

pub use packetflow::platform::{
    process::Proc,
    testhosts::{self, TestHosts},
};
use serde_json::Value;

/// The `packetflow` binary: `$PACKETFLOW_BIN` (set by `cargo xtask test`), else the one
/// next to this test executable's directory.
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PACKETFLOW_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let p = exe.parent().and_then(|d| d.parent()).map(|d| d.join("packetflow")).expect("target dir");
    assert!(p.exists(), "{} is missing: run `cargo build -p packetflow` first, or use `cargo xtask test`", p.display());
    p
}

/// End-to-end tests load eBPF programs: they need root. Failing (not skipping) keeps a
/// run without privileges from looking green.
pub fn require_root() {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    assert!(unsafe { libc::geteuid() } == 0, "end-to-end tests load eBPF programs and must run as root");
}

/// The line that marks a test as skipped: `PACKETFLOW-SKIP: <test name>: <reason>`.
pub const SKIP_MARKER: &str = "PACKETFLOW-SKIP: ";

/// Records that the running test cannot check what it is for here, and why (e.g.
/// "kprobes unavailable"); the test then returns. libtest counts it as passed;
/// `cargo xtask test` counts it as skipped and lists the reasons. The marker goes to the
/// file `$PACKETFLOW_SKIP_FILE` names (set by xtask; libtest captures a passing test's
/// output) and to stdout.
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    let line = format!("{SKIP_MARKER}{}: {reason}", thread.name().unwrap_or("(unnamed test)"));
    println!("{line}");
    if let Some(path) = std::env::var_os("PACKETFLOW_SKIP_FILE") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("PACKETFLOW_SKIP_FILE {}: {e}", PathBuf::from(&path).display()));
        writeln!(f, "{line}").expect("writing the skip marker");
    }
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A port no other test in this run uses (the tracer's hooks are global: tests tell
/// their traffic apart by port).
pub fn unique_port() -> u16 {
    // Below the ephemeral range (32768+), so no client socket lands on a test port.
    let base = 10000 + (std::process::id() % 1000) as u16 * 20;
    base + NEXT_PORT.fetch_add(1, Ordering::Relaxed)
}

/// `packetflow ARGS` with output captured.
pub fn packetflow(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).stdin(Stdio::null()).output().expect("running packetflow")
}

/// Starts `packetflow trace ARGS --json FILE` and waits until its hooks are attached
/// (it prints "tracing (" then).
pub fn start_trace(args: &[&str], json: &std::path::Path) -> Proc {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(bin())
        .arg("trace")
        .args(args)
        .arg("--json")
        .arg(json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting packetflow trace");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            if line.starts_with("tracing (") {
                let _ = tx.send(());
            }
            print!("[trace] {line}");
            line.clear();
        }
    });
    let p = Proc(child);
    rx.recv_timeout(Duration::from_secs(30)).expect("packetflow trace did not start within 30 s");
    p
}

/// A seed server (`packetflow serve`), inside namespace `ns` when given.
pub fn serve(ns: Option<&std::path::Path>, bind: &str, port: u16, udp: bool) -> Proc {
    use std::io::{BufRead, BufReader};
    let mut cmd = match ns {
        Some(p) => testhosts::netns_command(p, bin()),
        None => Command::new(bin()),
    };
    cmd.args(["serve", "--port", &port.to_string(), "--bind", bind]);
    if udp {
        cmd.arg("--udp");
    }
    let mut child = cmd.stdout(Stdio::piped()).stdin(Stdio::null()).spawn().expect("starting packetflow serve");
    let mut r = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    r.read_line(&mut line).expect("server output");
    assert!(line.starts_with("Server listening"), "server said: {line}");
    std::thread::spawn(move || std::io::copy(&mut r, &mut std::io::sink()));
    Proc(child)
}

/// Runs the seed client to completion (inside `ns` when given); returns its stdout.
pub fn client(ns: Option<&std::path::Path>, addr: &str, port: u16, count: u64, size: usize, udp: bool) -> String {
    let mut cmd = match ns {
        Some(p) => testhosts::netns_command(p, bin()),
        None => Command::new(bin()),
    };
    cmd.args(["client", addr, "--port", &port.to_string(), "--count", &count.to_string(), "--size", &size.to_string()]);
    if udp {
        cmd.arg("--udp");
    }
    let out = cmd.stdin(Stdio::null()).output().expect("running packetflow client");
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every JSON line of an NDJSON file.
pub fn read_ndjson(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}"))).collect()
}

/// The `trace` objects of an NDJSON file.
pub fn traces(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|v| v["type"] == "trace").collect()
}

pub fn summary(lines: &[Value]) -> &Value {
    lines.iter().rev().find(|v| v["type"] == "summary").expect("a summary line")
}

/// Stage names of a trace, in its (time) order.
pub fn stage_names(t: &Value) -> Vec<String> {
    t["stages"].as_array().expect("stages").iter().map(|s| s["stage"].as_str().expect("name").to_string()).collect()
}

/// A temporary file path unique to this process and `name`.
pub fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("packetflow-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// The order in which the kernel passes the stages (see docs/stages.md): tcx egress runs in
/// __dev_queue_xmit before the net_dev_queue tracepoint; native XDP runs before the stack
/// (before netif_receive_skb), generic XDP inside it (after the tracepoint).
/// The IP-layer stages (kprobes, where the kernel has them) sit after `sock_send` and
/// after `tc_ingress`.
pub fn kernel_order(xdp_generic: bool) -> Vec<&'static str> {
    let mut v = vec!["send_syscall", "sock_send", "ip_send", "tc_egress", "dev_queue", "nic_xmit"];
    if xdp_generic {
        v.extend(["netif_receive", "xdp"]);
    } else {
        v.extend(["xdp", "netif_receive"]);
    }
    v.extend([
        "tc_ingress",
        "ip_rcv",
        "transport_rcv",
        "sock_queue",
        "woken",
        "on_cpu",
        "copy_to_user",
        "recv_syscall",
    ]);
    v
}

/// Checks one trace: timestamps never go backwards in kernel order, and the total is
/// last minus first.
pub fn assert_monotonic(t: &Value, xdp_generic: bool) {
    let mut order = kernel_order(xdp_generic);
    if t["proto"] == "udp" {
        // UDP's sock_send is the cgroup egress hook, which runs inside IP output.
        order.swap(1, 2);
    }
    let stages = t["stages"].as_array().expect("stages");
    let time = |name: &str| stages.iter().find(|s| s["stage"] == name).map(|s| s["t_ns"].as_u64().expect("t_ns"));
    let mut last = 0u64;
    for name in &order {
        if let Some(ts) = time(name) {
            assert!(ts >= last, "{name} at {ts} before the previous stage at {last}: {t}");
            last = ts;
        }
    }
    let first = stages.first().and_then(|s| s["t_ns"].as_u64()).expect("first");
    let end = stages.last().and_then(|s| s["t_ns"].as_u64()).expect("last");
    assert_eq!(t["total_ns"].as_u64(), Some(end - first), "total_ns");
}

/// What the kernel under test offers beyond the tracepoints every supported kernel has:
/// `$PACKETFLOW_KERNEL_HAS`, a comma list of `tcx` (6.6+) and `kprobes` (CONFIG_KPROBES,
/// no lockdown). Unset: `tcx`, this project's CI machine (6.18, kprobes off). `cargo
/// xtask vm-test` sets it for each kernel it boots.
pub fn kernel_has(feature: &str) -> bool {
    match std::env::var("PACKETFLOW_KERNEL_HAS") {
        Ok(v) => v.split(',').any(|f| f.trim() == feature),
        Err(_) => feature == "tcx",
    }
}

/// The stages the kernel under test must serve: every tracepoint-served one (with a
/// kprobe fallback where the tracepoint is missing), the tcx ones where tcx exists, the
/// IP-layer ones where kprobes work.
pub fn expected_stages() -> Vec<&'static str> {
    kernel_order(false)
        .into_iter()
        .filter(|s| match *s {
            "tc_egress" | "tc_ingress" => kernel_has("tcx"),
            "ip_send" | "ip_rcv" => kernel_has("kprobes"),
            // Only where a reader was blocked when its data was queued.
            "woken" | "on_cpu" => false,
            _ => true,
        })
        .collect()
}

/// Stages the header says this kernel serves.
pub fn available_stages(lines: &[Value]) -> Vec<String> {
    let hooks = lines[0]["hooks"].as_object().expect("header hooks");
    hooks.iter().filter(|(_, h)| h["available"] == true).map(|(s, _)| s.clone()).collect()
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend(x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A small tmpfs mounted on a fresh directory (a disk that fills up on demand); unmounted
/// on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax: "256k") on `tmp(name)`.
    pub fn mount(name: &str, size: &str) -> Tmpfs {
        let dir = tmp(name);
        let _ = Command::new("umount").arg(&dir).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("tmpfs mount point");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mounting a tmpfs on {}", dir.display());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Sets a socket's receive buffer: SO_RCVBUF (`force` false; the kernel doubles it and
/// applies its minimum) or SO_RCVBUFFORCE (root: past rmem_max).
pub fn set_rcvbuf(sock: &impl std::os::fd::AsRawFd, bytes: i32, force: bool) {
    let opt = if force { libc::SO_RCVBUFFORCE } else { libc::SO_RCVBUF };
    let v: libc::c_int = bytes;
    // SAFETY: a valid socket and a c_int option of the size given.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setting the receive buffer: {}", std::io::Error::last_os_error());
}
