//! The system around the tracer: capabilities, the filesystems it needs (tracefs, bpffs,
//! cgroup2), network namespaces, and clocks.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::error::user;

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

pub fn cap_name(cap: u32) -> &'static str {
    match cap {
        CAP_NET_ADMIN => "CAP_NET_ADMIN",
        CAP_SYS_ADMIN => "CAP_SYS_ADMIN",
        CAP_PERFMON => "CAP_PERFMON",
        CAP_BPF => "CAP_BPF",
        _ => "CAP_?",
    }
}

/// The effective capability set of this process (from /proc/self/status).
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub fn has_cap(cap: u32) -> bool {
    effective_caps() & (1 << cap) != 0
}

/// Fails with one sentence naming the missing capabilities when `what` cannot run.
pub fn require_caps(what: &str, caps: &[u32]) -> Result<()> {
    let eff = effective_caps();
    let missing: Vec<&str> = caps.iter().filter(|&&c| eff & (1 << c) == 0).map(|&c| cap_name(c)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let all: Vec<&str> = caps.iter().map(|&c| cap_name(c)).collect();
    Err(user(format!(
        "packetflow {what} needs {} (missing: {}); run it as root, e.g. with sudo",
        all.join(", "),
        missing.join(", ")
    )))
}

/// The capabilities every tracing subcommand needs. CAP_SYS_ADMIN is needed only to
/// mount tracefs when it is missing and to enter other network namespaces; those steps
/// fail with their own sentence without it.
pub const TRACE_CAPS: &[u32] = &[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN];

const TRACEFS_MAGIC: i64 = 0x7472_6163;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const SECURITYFS_MAGIC: i64 = 0x7365_6375;

fn fs_magic(path: &str) -> Option<i64> {
    let c = std::ffi::CString::new(path).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

fn mount(fstype: &str, target: &str) -> std::io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let src = std::ffi::CString::new(fstype).unwrap();
    let tgt = std::ffi::CString::new(target).unwrap();
    let r = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// How a filesystem the tracer relies on was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountState {
    Present,
    Mounted,
    Failed(String),
}

impl MountState {
    pub fn ok(&self) -> bool {
        !matches!(self, MountState::Failed(_))
    }
}

fn ensure(fstype: &str, target: &str, magic: i64) -> MountState {
    if fs_magic(target) == Some(magic) {
        return MountState::Present;
    }
    match mount(fstype, target) {
        Ok(()) if fs_magic(target) == Some(magic) => MountState::Mounted,
        Ok(()) => MountState::Failed(format!("mounted {fstype} on {target} but it does not show")),
        Err(e) => MountState::Failed(format!("cannot mount {fstype} on {target}: {e}")),
    }
}

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts tracefs at /sys/kernel/tracing when it is missing.
pub fn ensure_tracefs() -> MountState {
    ensure("tracefs", TRACEFS, TRACEFS_MAGIC)
}

/// Mounts bpffs at /sys/fs/bpf when it is missing.
pub fn ensure_bpffs() -> MountState {
    ensure("bpf", BPFFS, BPF_FS_MAGIC)
}

/// Kernel lockdown mode ("none", "integrity", "confidentiality"), mounting securityfs
/// when needed; `None` when the kernel does not say.
pub fn lockdown() -> Option<String> {
    let _ = ensure("securityfs", "/sys/kernel/security", SECURITYFS_MAGIC);
    let s = std::fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
    // "none [integrity] confidentiality": the bracketed word is in force.
    let start = s.find('[')?;
    let end = s[start..].find(']')? + start;
    Some(s[start + 1..end].to_string())
}

/// The cgroup v2 hierarchy's root (unified or hybrid layout).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, target, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target))
    })
}

/// Mounts a cgroup2 hierarchy when the system has none.
pub fn ensure_cgroup2() -> Result<PathBuf> {
    if let Some(p) = cgroup2_root() {
        return Ok(p);
    }
    let target = "/sys/fs/cgroup";
    let t = if fs_magic(target).is_some_and(|m| m == 0x6367_7270) { target } else { "/run/packetflow-cgroup2" };
    mount("cgroup2", t).with_context(|| format!("mounting cgroup2 on {t}"))?;
    Ok(PathBuf::from(t))
}

pub fn kernel_release() -> String {
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    unsafe { libc::uname(&mut u) };
    let r = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    r.to_string_lossy().into_owned()
}

pub fn hostname() -> String {
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    unsafe { libc::uname(&mut u) };
    let r = unsafe { std::ffi::CStr::from_ptr(u.nodename.as_ptr()) };
    r.to_string_lossy().into_owned()
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

pub fn realtime_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wall clock minus monotonic clock, in ns: add to a kernel timestamp for wall time.
pub fn mono_to_wall_offset() -> i64 {
    // Bracket the realtime read to cancel most of the call cost.
    let a = monotonic_ns();
    let w = realtime_ns();
    let b = monotonic_ns();
    w as i64 - ((a + b) / 2) as i64
}

/// CPUs the kernel may ever bring online (/sys/devices/system/cpu/possible).
pub fn possible_cpus() -> Vec<u32> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_else(|_| "0".into());
    let mut cpus = Vec::new();
    for part in s.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    cpus.extend(a..=b);
                }
            }
            None => cpus.extend(part.parse::<u32>().ok()),
        }
    }
    if cpus.is_empty() {
        cpus.push(0);
    }
    cpus
}

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF memory to it (< 5.11).
pub fn raise_memlock() {
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
}

/// Inode of a network namespace file (`/proc/self/ns/net`, `/run/netns/NAME`).
pub fn netns_inode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino() as u32)
}

/// Runs `f` on a thread that has joined the network namespace at `ns` (the calling
/// thread's namespace is untouched). `None` runs it in the current namespace.
pub fn in_netns<T: Send>(ns: Option<&Path>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let Some(ns) = ns else { return f() };
    let file = File::open(ns).map_err(|e| user(format!("cannot open network namespace {}: {e}", ns.display())))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(user(format!("cannot enter network namespace {}: {e}", ns.display())));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("thread in network namespace {} panicked", ns.display())))
    })
}

/// Index of interface `name` in the current thread's namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Name of interface `index` in the current thread's namespace.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    Some(unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Interfaces of the current thread's namespace: (index, name, is-loopback).
pub fn interfaces() -> Vec<(u32, String, bool)> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut p = ifap;
    while !p.is_null() {
        let ifa = unsafe { &*p };
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        if !out.iter().any(|(_, n, _): &(u32, String, bool)| *n == name)
            && let Some(i) = ifindex(&name)
        {
            out.push((i, name, ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0));
        }
        p = ifa.ifa_next;
    }
    unsafe { libc::freeifaddrs(ifap) };
    out.sort();
    out
}

/// (uid, gid) of user `name`, from the passwd database.
pub fn lookup_user(name: &str) -> Result<(u32, u32)> {
    let c = std::ffi::CString::new(name).map_err(|_| user(format!("bad user name '{name}'")))?;
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let r = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() {
        crate::user_bail!("unknown user '{name}' (--user needs an existing account, e.g. nobody)");
    }
    Ok((pw.pw_uid, pw.pw_gid))
}

/// Becomes `uid`/`gid` with no supplementary groups and no capabilities. Every thread
/// follows (glibc applies set*id process-wide). Already-open fds (programs, links, maps,
/// rings, sockets) keep working: the kernel checked privileges when they were opened.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    let fail = |what: &str| Err(anyhow::anyhow!("dropping privileges: {what}: {}", std::io::Error::last_os_error()));
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return fail("setgroups");
    }
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return fail("setresgid");
    }
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return fail("setresuid");
    }
    // Without PR_SET_KEEPCAPS, leaving uid 0 clears every capability set; check it.
    if uid != 0 && effective_caps() != 0 {
        return fail("capabilities survived setresuid");
    }
    Ok(())
}
