//! The receive wait split (`woken`, `on_cpu`): when data is queued on a socket
//! (`sock_queue`) and a thread is blocked in a receive call on it, that thread is
//! watched (`watch`, called from the sock_queue hook) until the scheduler wakes it
//! (sched:sched_wakeup: `woken`) and runs it (sched:sched_switch: `on_cpu`).
//!
//! The scheduler tracepoints fire for every wake-up and context switch of the machine:
//! both programs first read `WATCHING`, the number of threads watched now, and leave when
//! it is 0, so a thread no traced packet waits for costs one array read per switch.

use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::{Array, LruHashMap},
    programs::BtfTracePointContext,
};
use packetflow_common::{Event, Filter, Stage, event::F_NO_WAITER};

use crate::{
    emit::{emit, now},
    kernel::{Typed, Untyped, read},
    maps::{idle, off},
};

/// Addresses of the wake functions whose wait-queue entry's `private` is the waiting task
/// (woken_wake_function, receiver_wake_function, autoremove_wake_function,
/// default_wake_function, ep_autoremove_wake_function; from /proc/kallsyms at load, 0
/// when unknown). A poll entry has another function and no task: no watch.
#[unsafe(no_mangle)]
pub static WAKE_FNS: [u64; 5] = [0; 5];

/// ep_poll_callback: the socket's waiter is an epoll instance; the thread to watch is the
/// first one sleeping in epoll_wait on it.
#[unsafe(no_mangle)]
pub static EP_POLL_CALLBACK: u64 = 0;

/// A thread blocked on a socket that traced data was queued on.
#[derive(Clone, Copy)]
struct Watch {
    /// The `sock_queue` record of that data (its flow and bytes name the packet).
    ev: Event,
    woken: u64,
}

#[map]
static WATCHED: LruHashMap<u32, Watch> = LruHashMap::with_max_entries(1024, 0);

/// How many threads `WATCHED` holds (the gate the scheduler hooks read first).
#[map]
static WATCHING: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
fn watching() -> bool {
    WATCHING.get(0).is_some_and(|n| unsafe { core::ptr::read_volatile(n) } != 0)
}

#[inline(always)]
fn add_watching(d: i64) {
    if let Some(n) = WATCHING.get_ptr_mut(0) {
        // Several CPUs queue and switch at once: an atomic add.
        // (core's AtomicU64 has no fetch_add for BPF: the intrinsic, which LLVM emits as
        // the BPF atomic add.)
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(n, d as u64)
        };
    }
}

/// The thread blocked in a receive call on socket `sk`, if any: the first entry of the
/// socket's wait queue, when its wake function is one whose `private` is the task; or,
/// for a socket an epoll instance watches, the first thread sleeping in epoll_wait on it.
#[inline(never)]
fn blocked_reader(sk: u64) -> Option<(u32, u32)> {
    let wq: u64 = read::<Untyped, u64>(sk, off!(sk_wq)).ok()?;
    let head = wq.checked_add(u64::from(off!(wq_head)))?;
    let first: u64 = read::<Untyped, u64>(head, 0).ok()?;
    if first == head || first == 0 {
        return None;
    }
    let mut entry = first - u64::from(off!(wqe_entry));
    // `func` follows `private` in wait_queue_entry (flags, private, func, entry).
    let mut func: u64 = read::<Untyped, u64>(entry, off!(wqe_private) + 8).ok()?;
    let ep_cb = unsafe { core::ptr::read_volatile(&EP_POLL_CALLBACK) };
    if ep_cb != 0 && func == ep_cb {
        // entry is an eppoll_entry's `wait`: its epitem's eventpoll's wait queue holds
        // the threads in epoll_wait.
        let epi: u64 = read::<Untyped, u64>(entry - u64::from(off!(epe_wait)), off!(epe_base)).ok()?;
        let ep: u64 = read::<Untyped, u64>(epi, off!(epi_ep)).ok()?;
        let head = ep.checked_add(u64::from(off!(ep_wq_head)))?;
        let first: u64 = read::<Untyped, u64>(head, 0).ok()?;
        if first == head || first == 0 {
            return None;
        }
        entry = first - u64::from(off!(wqe_entry));
        func = read::<Untyped, u64>(entry, off!(wqe_private) + 8).ok()?;
    }
    let fns = unsafe { core::ptr::read_volatile(&WAKE_FNS) };
    if func == 0 || !fns.contains(&func) {
        return None;
    }
    let task: u64 = read::<Untyped, u64>(entry, off!(wqe_private)).ok()?;
    let tid: u32 = read::<Untyped, u32>(task, off!(task_pid)).ok()?;
    let tgid: u32 = read::<Untyped, u32>(task, off!(task_tgid)).ok()?;
    Some((tgid, tid))
}

/// Called by the sock_queue hook with its record (before it is written): when `woken` or
/// `on_cpu` is asked, watches the blocked reader, or marks the record `F_NO_WAITER` when
/// there is none.
#[inline(always)]
pub fn watch(f: &Filter, sk: u64, ev: &mut Event) {
    if f.stages & (1 << Stage::Woken as u16 | 1 << Stage::OnCpu as u16) == 0 {
        return;
    }
    match blocked_reader(sk) {
        None => ev.flags |= F_NO_WAITER,
        Some((tgid, tid)) => {
            let mut w = Watch { ev: *ev, woken: 0 };
            w.ev.aux = tgid;
            w.ev.aux2 = tid;
            let new = unsafe { WATCHED.get(&tid) }.is_none();
            if WATCHED.insert(&tid, &w, 0).is_ok() && new {
                add_watching(1);
            }
        }
    }
}

/// Called where thread `tid` copies received data (every `copy_to_user` hook): a watch
/// on it ends there. The thread was running when that data was queued (woken for earlier
/// data, still on the socket's wait queue), so it never waited for it; left watched, its
/// next wake-up, for later data, would be written as this data's `woken`, after its copy.
#[inline(always)]
pub fn unwatch(tid: u32) {
    if !watching() {
        return;
    }
    if unsafe { WATCHED.get(&tid) }.is_some() && WATCHED.remove(&tid).is_ok() {
        add_watching(-1);
    }
}

/// Both scheduler hooks start here: nothing to do (None) unless some thread is watched;
/// else the thread id of `task`, to look up.
#[inline(always)]
fn gate(task: u64) -> Option<u32> {
    if idle() || !watching() {
        return None;
    }
    read::<Typed, u32>(task, off!(task_pid)).ok()
}

/// sched:sched_wakeup(p): a watched thread made runnable.
#[btf_tracepoint(function = "sched_wakeup")]
pub fn pf_sched_wakeup(ctx: BtfTracePointContext) -> i32 {
    let Some(tid) = gate(ctx.arg(0)) else { return 0 };
    if let Some(w) = WATCHED.get_ptr_mut(&tid) {
        let w = unsafe { &mut *w };
        if w.woken == 0 {
            w.woken = now();
            let mut ev = w.ev;
            ev.ts_ns = w.woken;
            emit(&mut ev, Stage::Woken);
        }
    }
    0
}

/// sched:sched_switch(preempt, prev, next, prev_state): a watched thread starts to run.
#[btf_tracepoint(function = "sched_switch")]
pub fn pf_sched_switch(ctx: BtfTracePointContext) -> i32 {
    let Some(tid) = gate(ctx.arg(2)) else { return 0 };
    if let Some(w) = unsafe { WATCHED.get(&tid) } {
        // A thread that ran without a wake-up seen (it was preempted, not sleeping)
        // gets `on_cpu` only.
        let mut ev = w.ev;
        if WATCHED.remove(&tid).is_ok() {
            add_watching(-1);
        }
        ev.ts_ns = now();
        emit(&mut ev, Stage::OnCpu);
    }
    0
}
