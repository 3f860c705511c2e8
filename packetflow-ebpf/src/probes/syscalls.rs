//! `send_syscall` and `recv_syscall`: the syscall tracepoints of the send and receive
//! families. Entry leaves a per-CPU note for the transport hook that follows in the same
//! syscall; exit turns the note `copy_to_user` left into the `recv_syscall` record.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use packetflow_common::Stage;

use super::current;
use crate::{
    emit::{emit, now},
    filter::{flow_matches, process_wanted},
    kernel::user_peer,
    maps::{filter, RECV_ENTER, RECV_SLOT, SEND_SLOT},
};
use packetflow_common::{
    event::{RECV_BUF, RECV_MSG},
    RecvEnter,
};

/// Offset of `ret` in the `sys_exit_*` tracepoint records (from tracefs at load time).
#[unsafe(no_mangle)]
pub static SYS_EXIT_RET_OFF: u32 = 16;

/// Attached to `syscalls:sys_enter_{write,writev,sendto,sendmsg,sendmmsg}`.
#[tracepoint]
pub fn pf_sys_enter_send(_ctx: TracePointContext) -> u32 {
    let Some(f) = filter() else { return 0 };
    let (tgid, tid) = current();
    if !process_wanted(f, tgid) {
        return 0;
    }
    if let Some(slot) = SEND_SLOT.get_ptr_mut(0) {
        unsafe {
            (*slot).tid = tid;
            (*slot).emitted = 0;
            (*slot).ts_ns = now();
        }
    }
    0
}

/// Attached to the matching `sys_exit_*`: the note is only valid inside its syscall.
#[tracepoint]
pub fn pf_sys_exit_send(_ctx: TracePointContext) -> u32 {
    let (_, tid) = current();
    if let Some(slot) = SEND_SLOT.get_ptr_mut(0) {
        unsafe {
            if (*slot).tid == tid {
                (*slot).tid = 0;
            }
        }
    }
    0
}

/// The socket receive calls' entry: where the caller's buffers are (see `RecvEnter`).
/// Only recvfrom/recvmsg/recvmmsg (socket-only calls): tracking read() would cost every
/// file read on the system; UDP received with read() has no `copy_to_user` stage.
#[inline(always)]
fn recv_enter(ctx: &TracePointContext, kind: u32, addr_arg: Option<usize>) -> u32 {
    let Some(f) = filter() else { return 0 };
    let (tgid, tid) = current();
    if !process_wanted(f, tgid) {
        return 0;
    }
    // sys_enter records: common header (8), syscall nr (8), then six 8-byte arguments.
    let arg = |i: usize| -> u64 { unsafe { ctx.read_at::<u64>(16 + 8 * i) }.unwrap_or(0) };
    let e = RecvEnter { tid, kind, ptr: arg(1), addr: addr_arg.map_or(0, arg) };
    let _ = RECV_ENTER.insert(&tid, &e, 0);
    0
}

/// `syscalls:sys_enter_recvfrom`: recvfrom(fd, buf, len, flags, addr, addrlen).
#[tracepoint]
pub fn pf_sys_enter_recvfrom(ctx: TracePointContext) -> u32 {
    recv_enter(&ctx, RECV_BUF, Some(4))
}

/// `syscalls:sys_enter_{recvmsg,recvmmsg}`: the msghdr (an mmsghdr starts with one).
#[tracepoint]
pub fn pf_sys_enter_recvmsg(ctx: TracePointContext) -> u32 {
    recv_enter(&ctx, RECV_MSG, None)
}

/// Attached to `syscalls:sys_exit_{recvfrom,recvmsg,recvmmsg}`: also forgets the entry.
#[tracepoint]
pub fn pf_sys_exit_recvmsg(ctx: TracePointContext) -> u32 {
    let (_, tid) = current();
    let _ = RECV_ENTER.remove(&tid);
    recv_exit(&ctx, tid)
}

/// Attached to `syscalls:sys_exit_{read,readv}`.
#[tracepoint]
pub fn pf_sys_exit_recv(ctx: TracePointContext) -> u32 {
    let (_, tid) = current();
    recv_exit(&ctx, tid)
}

/// `recv_syscall` (and UDP's `copy_to_user`) from the note the copy left on this CPU.
#[inline(always)]
fn recv_exit(ctx: &TracePointContext, tid: u32) -> u32 {
    let Some(slot) = RECV_SLOT.get_ptr_mut(0) else { return 0 };
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
        if !flow_matches(f, &ev) {
            return 0;
        }
        emit(&mut ev, Stage::CopyToUser);
    }
    ev.ts_ns = now();
    emit(&mut ev, Stage::RecvSyscall);
    0
}
