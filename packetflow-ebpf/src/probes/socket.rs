//! The socket-side stages: `sock_send`, `transport_rcv`, `sock_queue`, `copy_to_user`, and
//! the `send_syscall` record, which the transport hook writes because only it knows which
//! bytes (TCP) or datagram (UDP) the syscall handed in.
//!
//! TCP records carry stream byte ranges read from the socket (write_seq, rcv_nxt,
//! copied_seq), so segmentation and coalescing never mis-attribute bytes. UDP has no
//! sequence: datagrams are keyed by their payload (see `parse.rs`).

use aya_ebpf::{
    helpers::generated::bpf_probe_read_user,
    macros::{btf_tracepoint, cgroup_skb, kprobe},
    programs::{BtfTracePointContext, ProbeContext, SkBuffContext},
};
use packetflow_common::{
    Event, Offsets, Stage,
    counters::{RECV_SLOT_MISS, SEND_SLOT_MISS, UNPARSED_SKB},
    event::{F_END, RECV_IOV, RECV_MSG},
    payload_key,
};

use super::{current, packet::SkbCtxSource as CtxSource};
use crate::{
    emit::{emit, now},
    filter::{claim, flow_matches, flow_matches_from, kind_wanted, process_wanted},
    kernel::{Kmem, L3At, Typed, Untyped, parse_skb, read, sock_flow_of, sock_local_port, sock_protocol, user_ptr},
    maps::{RECV_SLOT, SEND_SLOT, UDP_RX_SLOT, count, filter, idle, off, send_slot_of},
    parse::{IPPROTO_TCP, IPPROTO_UDP, parse_l3},
};

/// The `send_syscall` record for data a transport hook just took, from the note the
/// syscall's entry left on this CPU (or, for a thread that has moved since, on the CPU
/// it entered on). `once`: TCP writes one per syscall (its byte range covers the whole
/// call); UDP one per datagram.
#[inline(always)]
fn send_syscall(ev: &mut Event, tid: u32, once: bool) {
    let Some(mut slot) = SEND_SLOT.get_ptr_mut(0) else {
        return;
    };
    if unsafe { (*slot).tid } != tid {
        slot = send_slot_of(tid);
        if slot.is_null() {
            count(SEND_SLOT_MISS);
            return;
        }
    }
    let slot = unsafe { &mut *slot };
    if once && slot.emitted != 0 {
        return;
    }
    slot.emitted = 1;
    let ts = ev.ts_ns;
    ev.ts_ns = slot.ts_ns;
    emit(ev, Stage::SendSyscall);
    ev.ts_ns = ts;
}

/// tcp:tcp_sendmsg_locked(sk, msg, skb, size_goal): once per chunk of a send call.
#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn pf_tcp_sendmsg(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_tcp_sendmsg::<Typed>(ctx.arg(0), ctx.arg(1));
    0
}

/// kprobe tcp_sendmsg_locked(sk, msg, size): the same where the tracepoint does not exist
/// (before 6.12?), once per send call rather than per chunk.
#[kprobe]
pub fn pf_kp_tcp_sendmsg(ctx: ProbeContext) -> u32 {
    if idle() {
        return 0;
    }
    if let (Some(sk), Some(msg)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) {
        let _ = try_tcp_sendmsg::<Untyped>(sk, msg);
    }
    0
}

#[inline(always)]
fn try_tcp_sendmsg<M: Kmem>(sk: u64, msg: u64) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    let (tgid, tid) = current();
    if !process_wanted(f, tgid) {
        return Ok(());
    }
    let mut ev = Event::ZERO;
    sock_flow_of::<M>(sk, IPPROTO_TCP, false, &mut ev)?;
    if !flow_matches_from(f, &ev, tgid) {
        return Ok(());
    }
    // A tcp_sock field: beyond the `struct sock` the pointer is typed as.
    ev.seq = read::<Untyped, _>(sk, off!(tcp_write_seq))?;
    let left: u64 = read::<M, _>(msg, off!(msg_iter_count))?;
    ev.len = if left > u32::MAX as u64 { u32::MAX } else { left as u32 };
    ev.aux = tgid;
    ev.aux2 = tid;
    ev.ts_ns = now();
    send_syscall(&mut ev, tid, true);
    emit(&mut ev, Stage::SockSend);
    Ok(())
}

/// tcp:tcp_probe(sk, skb): a segment entering tcp_rcv_established.
#[btf_tracepoint(function = "tcp_probe")]
pub fn pf_tcp_probe(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_tcp_probe(&ctx);
    0
}

#[inline(always)]
fn try_tcp_probe(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    let skb: u64 = ctx.arg(1);
    let mut ev = Event::ZERO;
    if parse_skb::<Typed>(skb, L3At::NetworkHeader, &mut ev).is_err() {
        count(UNPARSED_SKB);
        return Err(());
    }
    if !flow_matches(f, &ev) || !kind_wanted(f, &ev) {
        return Ok(());
    }
    // The byte range from TCP's control block: when the stack coalesced segments (in the
    // socket backlog), the headers describe only the first one.
    let cb = off!(skb_cb);
    if cb != Offsets::MISSING && ev.len > 0 {
        let seq: u32 = read::<Typed, _>(skb, cb)?;
        let end_seq: u32 = read::<Typed, _>(skb, cb + 4)?;
        let n = end_seq.wrapping_sub(seq);
        if seq == ev.seq && n > ev.len && n < 1 << 30 {
            ev.len = n;
        }
    }
    ev.ts_ns = now();
    emit(&mut ev, Stage::TransportRcv);
    Ok(())
}

/// sock:sk_data_ready(sk): data queued on the socket, reader woken.
#[btf_tracepoint(function = "sk_data_ready")]
pub fn pf_sk_data_ready(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_sk_data_ready::<Typed>(ctx.arg(0));
    0
}

/// kprobe sock_def_readable(sk): the same where the tracepoint does not exist (it came in
/// 6.6); sock_def_readable is what sk_data_ready points to for TCP and UDP sockets.
#[kprobe]
pub fn pf_kp_sk_data_ready(ctx: ProbeContext) -> u32 {
    if idle() {
        return 0;
    }
    if let Some(sk) = ctx.arg::<u64>(0) {
        let _ = try_sk_data_ready::<Untyped>(sk);
    }
    0
}

#[inline(always)]
fn try_sk_data_ready<M: Kmem>(sk: u64) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    match sock_protocol::<M>(sk) {
        IPPROTO_TCP => {
            let mut ev = Event::ZERO;
            sock_flow_of::<M>(sk, IPPROTO_TCP, true, &mut ev)?;
            if !flow_matches(f, &ev) {
                return Ok(());
            }
            // Everything before rcv_nxt is now queued (a tcp_sock field: untyped).
            ev.seq = read::<Untyped, _>(sk, off!(tcp_rcv_nxt))?;
            ev.flags |= F_END;
            ev.ts_ns = now();
            super::sched::watch(f, sk, &mut ev);
            emit(&mut ev, Stage::SockQueue);
        }
        IPPROTO_UDP => {
            // The datagram cgroup_skb ingress just passed to this socket on this CPU.
            let slot = UDP_RX_SLOT.get_ptr_mut(0).ok_or(())?;
            let slot = unsafe { &mut *slot };
            if slot.ts_ns == 0 || slot.dport != sock_local_port::<M>(sk) {
                return Ok(());
            }
            let mut ev = *slot;
            slot.ts_ns = 0;
            ev.ts_ns = now();
            super::sched::watch(f, sk, &mut ev);
            emit(&mut ev, Stage::SockQueue);
        }
        _ => {}
    }
    Ok(())
}

/// skb:skb_copy_datagram_iovec(skb, len): `len` bytes of `skb` copied to the reader.
#[btf_tracepoint(function = "skb_copy_datagram_iovec")]
pub fn pf_copy_to_user(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_copy_to_user(&ctx);
    0
}

#[inline(always)]
fn try_copy_to_user(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    let (tgid, tid) = current();
    if !process_wanted(f, tgid) {
        return Ok(());
    }
    let skb: u64 = ctx.arg(0);
    let len: i32 = ctx.arg(1);
    if len <= 0 {
        return Ok(());
    }
    // TCP only: UDP's copy is seen at sock_recv_length (see pf_sock_recv).
    let sk: u64 = read::<Typed, _>(skb, off!(skb_sk)).unwrap_or(0);
    if sk == 0 || sock_protocol::<Typed>(sk) != IPPROTO_TCP {
        return Ok(());
    }
    let mut ev = Event::ZERO;
    // A TCP copy starts at the socket's copied_seq.
    sock_flow_of::<Typed>(sk, IPPROTO_TCP, true, &mut ev)?;
    if !flow_matches_from(f, &ev, tgid) {
        return Ok(());
    }
    ev.seq = read::<Untyped, _>(sk, off!(tcp_copied_seq))?;
    ev.len = len as u32;
    ev.aux = tgid;
    ev.aux2 = tid;
    ev.ts_ns = now();
    emit(&mut ev, Stage::CopyToUser);
    super::sched::unwatch(tid);
    stash_for_recv_syscall(&ev, tid)
}

/// sock:sock_recv_length(sk, ret, flags): sock_recvmsg handed `ret` bytes to the caller.
/// UDP's `copy_to_user`: udp_recvmsg copies linear datagrams without the
/// skb_copy_datagram_iovec tracepoint, so the datagram is identified from what the
/// application received: its buffer (payload key) and source address, found through the
/// syscall's registers (bpf_task_pt_regs), for read, readv, recvfrom, recvmsg, recvmmsg.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn pf_sock_recv(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_sock_recv(&ctx);
    0
}

const MSG_PEEK: i32 = 2;

#[inline(always)]
fn try_sock_recv(ctx: &BtfTracePointContext) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    let (tgid, tid) = current();
    if !process_wanted(f, tgid) {
        return Ok(());
    }
    let sk: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if ret <= 0 || flags & MSG_PEEK != 0 || sock_protocol::<Typed>(sk) != IPPROTO_UDP {
        return Ok(());
    }
    // Which receive call this is, and where its buffers are: the syscall's own registers.
    let Some((kind, ptr, addr)) = crate::kernel::recv_call() else {
        count(RECV_SLOT_MISS);
        return Ok(());
    };
    let mut ev = Event::ZERO;
    sock_flow_of::<Typed>(sk, IPPROTO_UDP, true, &mut ev)?;
    // (user_msghdr: msg_name at 0, msg_iov at 16; iovec: iov_base at 0.)
    let (buf, name) = match kind {
        RECV_MSG => (user_ptr(user_ptr(ptr + 16)), user_ptr(ptr)),
        RECV_IOV => (user_ptr(ptr), 0),
        _ => (ptr, addr),
    };
    let n = if ret < 16 { ret as u32 } else { 16 };
    let mut p = [0u8; 32];
    let r = unsafe { bpf_probe_read_user(p.as_mut_ptr().cast(), n & 31, buf as *const _) };
    if r != 0 {
        return Err(());
    }
    let mut head = [0u8; 16];
    head.copy_from_slice(&p[..16]);
    ev.seq = payload_key(&head, n);
    ev.len = ret as u32;
    ev.aux = tgid;
    ev.aux2 = tid;
    ev.ts_ns = now();
    // An unconnected socket learns the peer only when the kernel copies the source
    // address to the caller, after this hook: the record is finished at syscall exit.
    let name = if ev.sport == 0 { name } else { 0 };
    leave_datagram_for_exit(&ev, tid, 1, name)
}

/// Leaves UDP datagram `ev` for the receive syscall's exit on this CPU (which writes
/// `copy_to_user` when `pending_copy`, then `recv_syscall`).
#[inline(always)]
fn leave_datagram_for_exit(ev: &Event, tid: u32, pending_copy: u32, name: u64) -> Result<(), ()> {
    let slot = RECV_SLOT.get_ptr_mut(0).ok_or(())?;
    let slot = unsafe { &mut *slot };
    if slot.tid != 0 && slot.tid != tid {
        count(RECV_SLOT_MISS);
    }
    slot.tid = tid;
    slot.pending_copy = pending_copy;
    slot.name = name;
    slot.ev = *ev;
    Ok(())
}

/// kprobe skb_consume_udp(sk, skb, len): UDP's `copy_to_user` where the sock_recv_length
/// tracepoint does not exist (it came in 6.3?). udp_recvmsg calls it once the datagram is
/// copied; the skb still holds the headers, so the flow and payload key come from it.
#[kprobe]
pub fn pf_kp_udp_copy(ctx: ProbeContext) -> u32 {
    if idle() {
        return 0;
    }
    if let (Some(skb), Some(len)) = (ctx.arg::<u64>(1), ctx.arg::<i32>(2)) {
        let _ = try_udp_copy(skb, len);
    }
    0
}

#[inline(always)]
fn try_udp_copy(skb: u64, len: i32) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    let (tgid, tid) = current();
    if len <= 0 || !process_wanted(f, tgid) {
        return Ok(());
    }
    let mut ev = Event::ZERO;
    if parse_skb::<Untyped>(skb, L3At::NetworkHeader, &mut ev).is_err() || !ev.is_udp() {
        return Ok(());
    }
    if !flow_matches_from(f, &ev, tgid) {
        return Ok(());
    }
    ev.aux = tgid;
    ev.aux2 = tid;
    ev.ts_ns = now();
    emit(&mut ev, Stage::CopyToUser);
    super::sched::unwatch(tid);
    // recv_syscall follows at the syscall's exit, with the same datagram key.
    leave_datagram_for_exit(&ev, tid, 0, 0)
}

/// Leaves the end of TCP range `ev` for the recv syscall's exit on this CPU.
#[inline(always)]
fn stash_for_recv_syscall(ev: &Event, tid: u32) -> Result<(), ()> {
    let slot = RECV_SLOT.get_ptr_mut(0).ok_or(())?;
    let slot = unsafe { &mut *slot };
    if slot.tid != 0 && slot.tid != tid {
        count(RECV_SLOT_MISS);
    }
    slot.tid = tid;
    slot.pending_copy = 0;
    slot.name = 0;
    slot.ev = *ev;
    slot.ev.seq = ev.seq.wrapping_add(ev.len);
    slot.ev.flags |= F_END;
    Ok(())
}

/// cgroup_skb egress: the IP output path of a local socket. UDP's `sock_send` (TCP's
/// comes from tcp_sendmsg_locked, which knows the stream position).
#[cgroup_skb(egress)]
pub fn pf_cg_egress(ctx: SkBuffContext) -> i32 {
    if idle() {
        return 1;
    }
    let _ = try_cg_egress::<true>(&ctx);
    1
}

/// The same where cgroup_skb programs may not call bpf_get_current_pid_tgid (6.1 says
/// "unknown func"): the sender comes from this CPU's send-syscall note, which is only set
/// inside a send syscall (a datagram sent outside one gets no process).
#[cgroup_skb(egress)]
pub fn pf_cg_egress_nopid(ctx: SkBuffContext) -> i32 {
    if idle() {
        return 1;
    }
    let _ = try_cg_egress::<false>(&ctx);
    1
}

#[inline(always)]
fn try_cg_egress<const ASK: bool>(ctx: &SkBuffContext) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    let mut ev = Event::ZERO;
    cg_udp(ctx, &mut ev)?;
    let (tgid, tid) = if ASK {
        current()
    } else {
        match SEND_SLOT.get_ptr_mut(0) {
            Some(s) => unsafe { ((*s).tgid, (*s).tid) },
            None => (0, 0),
        }
    };
    // The process filter was decided at the send syscall (`SendSlot::claims`).
    if f.procs != 0
        && let Some(s) = SEND_SLOT.get_ptr_mut(0)
        && unsafe { (*s).tid == tid && (*s).claims != 0 }
    {
        claim(&ev);
    }
    if !flow_matches(f, &ev) || !process_wanted(f, tgid) {
        return Ok(());
    }
    ev.aux = tgid;
    ev.aux2 = tid;
    ev.ts_ns = now();
    send_syscall(&mut ev, tid, false);
    emit(&mut ev, Stage::SockSend);
    Ok(())
}

/// cgroup_skb ingress: a datagram being handed to its socket. UDP's `transport_rcv`.
#[cgroup_skb(ingress)]
pub fn pf_cg_ingress(ctx: SkBuffContext) -> i32 {
    if idle() {
        return 1;
    }
    let _ = try_cg_ingress(&ctx);
    1
}

#[inline(always)]
fn try_cg_ingress(ctx: &SkBuffContext) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    let mut ev = Event::ZERO;
    cg_udp(ctx, &mut ev)?;
    if !flow_matches(f, &ev) {
        return Ok(());
    }
    ev.ts_ns = now();
    if let Some(slot) = UDP_RX_SLOT.get_ptr_mut(0) {
        unsafe { *slot = ev };
    }
    emit(&mut ev, Stage::TransportRcv);
    Ok(())
}

/// A UDP datagram seen by a cgroup_skb program (whose data starts at the IP header).
#[inline(always)]
fn cg_udp(ctx: &SkBuffContext, ev: &mut Event) -> Result<(), ()> {
    let skb = ctx.skb.skb;
    // cgroup_skb's data starts at the IP header.
    let linear = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    // These programs see every TCP segment too: those leave before any parsing (an IPv6
    // packet with extension headers is parsed in full).
    let mut ip = [0u8; 10];
    if super::packet::direct(linear.0, linear.1, 0, &mut ip)
        && ((ip[0] >> 4 == 4 && ip[9] == IPPROTO_TCP) || (ip[0] >> 4 == 6 && ip[6] == IPPROTO_TCP))
    {
        return Err(());
    }
    let src = CtxSource { linear: Some(linear), ..CtxSource::net(skb.cast(), ctx.len()) };
    parse_l3(&src, ev).map_err(|_| ())?;
    if !ev.is_udp() {
        return Err(());
    }
    Ok(())
}
