//! The filesystems the tracer relies on (tracefs, bpffs, securityfs, cgroup2): found, or mounted.

use std::path::PathBuf;

use anyhow::{Context, Result};

const TRACEFS_MAGIC: i64 = 0x7472_6163;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const SECURITYFS_MAGIC: i64 = 0x7365_6375;

fn fs_magic(path: &str) -> Option<i64> {
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: a plain C struct of integers and arrays: all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a statfs we own.
    (unsafe { libc::statfs(c.as_ptr(), &raw mut st) } == 0).then_some(st.f_type as i64)
}

fn mount(fstype: &str, target: &str) -> std::io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let src = std::ffi::CString::new(fstype).unwrap();
    let tgt = std::ffi::CString::new(target).unwrap();
    // SAFETY: every string is a NUL-terminated CString that outlives the call; no data argument.
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
