//! One file per group of hooks. Every entry point is a thin wrapper that ignores the
//! outcome of its `try_*` body and lets the packet or the call go on.

mod blast;
mod capture;
mod connect;
mod device;
mod doctor;
mod drops;
mod packet;
mod sched;
mod socket;
mod syscalls;

use aya_ebpf::helpers::bpf_get_current_pid_tgid;

/// (tgid, tid) of the current task.
#[inline(always)]
pub(crate) fn current() -> (u32, u32) {
    let v = bpf_get_current_pid_tgid();
    ((v >> 32) as u32, v as u32)
}
