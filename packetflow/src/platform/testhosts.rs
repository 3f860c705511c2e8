//! Test hosts: two network namespaces joined by a veth pair, for the NIC path of the demo
//! and the tests. Addresses come from 198.18.0.0/15 (benchmarking range) and fd00::/8
//! only, and each namespace routes nowhere but its own veth: nothing can leave the machine.
//! Everything is removed on drop, also when a test panics.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

pub const ADDR_A: &str = "198.18.0.1";
pub const ADDR_B: &str = "198.18.0.2";
pub const ADDR6_A: &str = "fd00::1";
pub const ADDR6_B: &str = "fd00::2";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (iproute2 is needed for test hosts)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

pub struct TestHosts {
    pub ns_a: String,
    pub ns_b: String,
    pub veth_a: String,
    pub veth_b: String,
}

impl TestHosts {
    /// Creates namespaces `<prefix>a…`/`<prefix>b…` (unique per process and call) joined
    /// by a veth pair, with 198.18.0.1/24 + fd00::1/64 on side a and .2 / ::2 on side b.
    pub fn new(prefix: &str) -> Result<TestHosts> {
        let id = format!("{}{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed));
        let h = TestHosts {
            ns_a: format!("{prefix}a{id}"),
            ns_b: format!("{prefix}b{id}"),
            // Interface names are limited to 15 characters.
            veth_a: format!("pfa{id}"),
            veth_b: format!("pfb{id}"),
        };
        // Built up step by step; `h` cleans up whatever exists if a step fails.
        ip(&["netns", "add", &h.ns_a])?;
        ip(&["netns", "add", &h.ns_b])?;
        ip(&["link", "add", &h.veth_a, "netns", &h.ns_a, "type", "veth", "peer", "name", &h.veth_b, "netns", &h.ns_b])?;
        for (ns, dev, v4, v6) in [(&h.ns_a, &h.veth_a, ADDR_A, ADDR6_A), (&h.ns_b, &h.veth_b, ADDR_B, ADDR6_B)] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ip(&["-n", ns, "-6", "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        wait_link_up(&h.ns_a, &h.veth_a)?;
        wait_link_up(&h.ns_b, &h.veth_b)?;
        Ok(h)
    }

    pub fn path_a(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.ns_a))
    }

    pub fn path_b(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.ns_b))
    }

    /// A command that runs inside namespace `ns` (one of `ns_a`, `ns_b`).
    pub fn command(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        netns_command(&PathBuf::from(format!("/run/netns/{ns}")), program)
    }
}

/// A command whose process joins the network namespace at `path` before it runs. The
/// namespace file is opened now (close-on-exec); the child only calls setns(2).
pub fn netns_command(path: &std::path::Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let mut c = Command::new(program);
    match std::fs::File::open(path) {
        // SAFETY: the pre_exec closure runs in the forked child before exec and only calls setns(2)
        // (async-signal-safe) on an fd opened here.
        Ok(f) => unsafe {
            c.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        },
        // SAFETY: the pre_exec closure only builds an io::Error from an integer: async-signal-safe.
        Err(e) => unsafe {
            let errno = e.raw_os_error().unwrap_or(libc::ENOENT);
            c.pre_exec(move || Err(std::io::Error::from_raw_os_error(errno)));
        },
    }
    c
}

/// Waits (at most 5 s) until `dev` in `ns` is operationally up. The kernel turns a link's
/// carrier on through its linkwatch work, at most once a second per device and later
/// under load; until then the device's queue is the no-op one, which drops every packet:
/// a ping6 right after set-up failed about one time in twenty while other namespaces were
/// being created and deleted.
fn wait_link_up(ns: &str, dev: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let out = Command::new("ip").args(["-n", ns, "-o", "link", "show", "dev", dev]).output()?;
        if String::from_utf8_lossy(&out.stdout).contains(" state UP ") {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{dev} in {ns} did not come up within 5 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Drop for TestHosts {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth end inside it, and with it the pair.
        let _ = ip(&["netns", "del", &self.ns_a]);
        let _ = ip(&["netns", "del", &self.ns_b]);
    }
}
