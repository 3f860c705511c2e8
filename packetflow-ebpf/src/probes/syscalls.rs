//! `send_syscall` and `recv_syscall`: the syscall tracepoints of the send and receive
//! families. Entry leaves a per-CPU note for the transport hook that follows in the same
//! syscall; exit turns the note `copy_to_user` left into the `recv_syscall` record.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use packetflow_common::Stage;

use super::current;
use crate::{
    emit::{emit, now},
    filter::{flow_matches_from, process_claims, process_wanted},
    kernel::user_peer,
    maps::{RECV_SLOT, SEND_SLOT, filter, idle, send_slot_of},
};

/// Offset of `ret` in the `sys_exit_*` tracepoint records (from tracefs at load time).
#[unsafe(no_mangle)]
pub static SYS_EXIT_RET_OFF: u32 = 16;

/// Attached to `syscalls:sys_enter_{write,writev,sendto,sendmsg,sendmmsg}`.
#[tracepoint]
pub fn pf_sys_enter_send(_ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    let Some(f) = filter() else { return 0 };
    let (tgid, tid) = current();
    if !process_wanted(f, tgid) {
        return 0;
    }
    if let Some(slot) = SEND_SLOT.get_ptr_mut(0) {
        unsafe {
            (*slot).tid = tid;
            (*slot).tgid = tgid;
            (*slot).emitted = 0;
            (*slot).ts_ns = now();
            (*slot).claims = (f.procs != 0 && process_claims(f, tgid)) as u32;
        }
    }
    0
}

/// Attached to the matching `sys_exit_*`: the note is only valid inside its syscall
/// (also when the thread moved CPUs: a stale note must never date a later send).
#[tracepoint]
pub fn pf_sys_exit_send(_ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    let (tgid, tid) = current();
    let Some(slot) = SEND_SLOT.get_ptr_mut(0) else { return 0 };
    unsafe {
        if (*slot).tid == tid {
            (*slot).tid = 0;
            return 0;
        }
    }
    let Some(f) = filter() else { return 0 };
    if !process_wanted(f, tgid) {
        return 0;
    }
    let moved = send_slot_of(tid);
    if !moved.is_null() {
        unsafe { (*moved).tid = 0 };
    }
    0
}

/// Attached to `syscalls:sys_exit_{read,readv,recvfrom,recvmsg,recvmmsg}`.
#[tracepoint]
pub fn pf_sys_exit_recv(ctx: TracePointContext) -> u32 {
    if idle() {
        return 0;
    }
    let (_, tid) = current();
    recv_exit(&ctx, tid)
}

/// `recv_syscall` (and UDP's `copy_to_user`) from the note the copy left on this CPU.
#[inline(always)]
fn recv_exit(ctx: &TracePointContext, tid: u32) -> u32 {
    let Some(slot) = RECV_SLOT.get_ptr_mut(0) else {
        return 0;
    };
    let slot = unsafe { &mut *slot };
    if slot.tid != tid || tid == 0 {
        return 0;
    }
    slot.tid = 0;
    let off = unsafe { core::ptr::read_volatile(&SYS_EXIT_RET_OFF) } as usize;
    let ret: i64 = unsafe { ctx.read_at(off) }.unwrap_or(-1);
    if ret <= 0 {
        return 0;
    }
    let mut ev = slot.ev;
    if slot.pending_copy != 0 {
        // UDP: the source address is in the caller's buffer now.
        if slot.name != 0 {
            user_peer(slot.name, &mut ev);
        }
        let Some(f) = filter() else { return 0 };
        if !flow_matches_from(f, &ev, ev.aux) {
            return 0;
        }
        emit(&mut ev, Stage::CopyToUser);
        super::sched::unwatch(tid);
    }
    ev.ts_ns = now();
    emit(&mut ev, Stage::RecvSyscall);
    0
}
