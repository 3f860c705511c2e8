//! Capabilities the tracer needs, and the memlock limit older kernels charge BPF memory to.

use anyhow::Result;

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

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF memory to it (< 5.11).
pub fn raise_memlock() {
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit(2) reads `lim`, an rlimit we own.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const lim) };
}
