//! Connection establishment (`packetflow_common::conn`): the client's connect(), its SYN
//! and the socket's state changes; the listener's SYN and handshake ACK with its queue
//! lengths, the child socket queued, and accept() handing it over. Every record is
//! oriented client → server. These hooks run for connection set-up only (a SYN, a state
//! change, a connect or accept call), except two: the SYN check at `net_dev_queue` and
//! the listener check in cgroup_skb ingress run for every packet and leave after a few
//! loads when it is not a handshake segment.

use aya_ebpf::{
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{bpf_get_current_task, bpf_get_smp_processor_id, generated::bpf_skc_to_tcp_sock},
    macros::{btf_tracepoint, cgroup_skb, map, tracepoint},
    maps::LruHashMap,
    programs::{BtfTracePointContext, SkBuffContext, TracePointContext},
};
use packetflow_common::{
    ConnStage, Event, Kind,
    counters::{CONN_EMITTED, CONN_LOST},
};

use super::{current, packet::SkbCtxSource as CtxSource};
use crate::{
    emit::now,
    filter::{flow_matches, flow_matches_from, process_wanted},
    kernel::{L3At, Typed, Untyped, parse_skb, read, sock_flow_of, sock_protocol},
    maps::{count, filter, off, ring},
    parse::{IPPROTO_TCP, parse_l3},
    probes::syscalls::SYS_EXIT_RET_OFF,
};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: u32 = 10;
const TCP_NEW_SYN_RECV: i32 = 12;

/// A connect() call in progress: entry time and process in `ev`, and its socket once
/// the call has put it in SYN_SENT.
#[derive(Clone, Copy)]
struct ConnectNote {
    ev: Event,
    sk: u64,
}

/// connect() calls in progress, by thread.
#[map]
static CONNECTS: LruHashMap<u32, ConnectNote> = LruHashMap::with_max_entries(4096, 0);

/// The same calls by socket, from SYN_SENT until the first SYN leaves, which names the
/// connection and writes `connect`. By socket, not thread: a SYN can leave after the
/// call, from another context (it waited for the neighbour's address, say).
#[map]
static CONNECTING: LruHashMap<u64, Event> = LruHashMap::with_max_entries(4096, 0);

/// Client sockets → the connection's ends, as their SYN named them: a socket that gives
/// up has released its port by the time its state change is traced, and connect() has
/// cleared its peer by the time it returns.
#[map]
static SYN_TUPLES: LruHashMap<u64, Event> = LruHashMap::with_max_entries(4096, 0);

/// Writes a connection record (always a record: summary mode has no connection
/// histograms). Wakes the reader at once: set-up records are few, and a connection
/// waits on nothing else.
#[inline(always)]
fn emit_conn(ev: &mut Event, stage: ConnStage) {
    let cpu = unsafe { bpf_get_smp_processor_id() };
    ev.stage = stage as u8;
    ev.cpu = cpu as u16;
    match ring(cpu).output::<Event>(&*ev, BPF_RB_FORCE_WAKEUP as u64) {
        Ok(()) => count(CONN_EMITTED),
        Err(_) => count(CONN_LOST),
    }
}

/// Swaps the ends of `ev` (a packet or socket seen from the server's side).
#[inline(always)]
fn to_client_order(ev: &mut Event) {
    core::mem::swap(&mut ev.saddr, &mut ev.daddr);
    core::mem::swap(&mut ev.sport, &mut ev.dport);
}

/// syscalls:sys_enter_connect: note the call for the SYN that will name it.
#[tracepoint]
pub fn pf_conn_connect(_ctx: TracePointContext) -> u32 {
    let Some(f) = filter() else { return 0 };
    let (tgid, tid) = current();
    if !process_wanted(f, tgid) {
        return 0;
    }
    let mut ev = Event::ZERO;
    ev.ts_ns = now();
    ev.aux = tgid;
    ev.aux2 = tid;
    let _ = CONNECTS.insert(&tid, &ConnectNote { ev, sk: 0 }, 0);
    0
}

/// syscalls:sys_exit_connect: `connect_return`, for a call that put its socket in
/// SYN_SENT; the connection's ends from its SYN (`SYN_TUPLES`), else from the socket.
#[tracepoint]
pub fn pf_conn_connect_exit(ctx: TracePointContext) -> u32 {
    let _ = try_connect_exit(&ctx);
    0
}

#[inline(always)]
fn try_connect_exit(ctx: &TracePointContext) -> Result<(), ()> {
    let (_, tid) = current();
    let (sk, tgid, thread) = unsafe { CONNECTS.get(&tid) }.map(|n| (n.sk, n.ev.aux, n.ev.aux2)).ok_or(())?;
    let _ = CONNECTS.remove(&tid);
    if sk == 0 {
        return Ok(());
    }
    let f = filter().ok_or(())?;
    let mut ev = Event::ZERO;
    connection_of(sk, &mut ev)?;
    let _ = SYN_TUPLES.remove(&sk);
    (ev.aux, ev.aux2) = (tgid, thread);
    if !flow_matches_from(f, &ev, tgid) {
        return Ok(());
    }
    let off = unsafe { core::ptr::read_volatile(&SYS_EXIT_RET_OFF) } as usize;
    let ret: i64 = unsafe { ctx.read_at(off) }.unwrap_or(0);
    ev.seq = ret as i32 as u32;
    ev.ts_ns = now();
    emit_conn(&mut ev, ConnStage::ConnectReturn);
    Ok(())
}

/// The ends of client socket `sk`'s connection: as its SYN named them, else (the SYN has
/// not left yet: it waits for the neighbour's address) from the socket. Its own frame:
/// the socket read's window would not fit beside the caller's.
#[inline(never)]
fn connection_of(sk: u64, ev: &mut Event) -> Result<(), ()> {
    if let Some(syn) = unsafe { SYN_TUPLES.get(&sk) } {
        *ev = *syn;
        return Ok(());
    }
    sock_flow_of::<Untyped>(sk, IPPROTO_TCP, false, ev)
}

/// net:net_dev_queue: a SYN (`syn_sent`, and `connect` for the first SYN of a socket a
/// connect() call put in SYN_SENT) or a SYN-ACK (`synack_sent`) leaving a device.
#[btf_tracepoint(function = "net_dev_queue")]
pub fn pf_conn_syn_out(ctx: BtfTracePointContext) -> i32 {
    let _ = try_syn_out(ctx.arg(0));
    0
}

#[inline(always)]
fn try_syn_out(skb: u64) -> Result<(), ()> {
    // Two loads for every other packet: a SYN's socket is connecting (SYN_SENT), a
    // SYN-ACK's is a request socket (NEW_SYN_RECV) or, with a cookie, the listener.
    let sk = read::<Typed, u64>(skb, off!(skb_sk)).unwrap_or(0);
    if sk == 0 {
        return Ok(());
    }
    let state = i32::from(read::<Typed, u8>(sk, off!(sk_state))?);
    if state != TCP_SYN_SENT && state != TCP_NEW_SYN_RECV && state != TCP_LISTEN as i32 {
        return Ok(());
    }
    let f = filter().ok_or(())?;
    let mut ev = Event::ZERO;
    parse_skb::<Typed>(skb, L3At::NetworkHeader, &mut ev).map_err(|_| ())?;
    let kind = ev.kind();
    if ev.is_udp() || (kind != Kind::Syn && kind != Kind::SynAck) || !flow_matches(f, &ev) {
        return Ok(());
    }
    ev.seq = 0;
    ev.len = 0;
    ev.ts_ns = now();
    if kind == Kind::SynAck {
        to_client_order(&mut ev);
        emit_conn(&mut ev, ConnStage::SynAckSent);
        return Ok(());
    }
    let _ = SYN_TUPLES.insert(&sk, &ev, 0);
    if let Some(note) = unsafe { CONNECTING.get(&sk) }.copied() {
        let _ = CONNECTING.remove(&sk);
        let mut c = ev;
        c.ts_ns = note.ts_ns;
        c.aux = note.aux;
        c.aux2 = note.aux2;
        emit_conn(&mut c, ConnStage::Connect);
    }
    emit_conn(&mut ev, ConnStage::SynSent);
    Ok(())
}

/// sock:inet_sock_set_state(sk, oldstate, newstate): the client's socket established or
/// failed, and the server's child socket established (it is on the accept queue now);
/// a socket entering SYN_SENT names the connect() call it belongs to.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn pf_conn_state(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let _ = try_state(sk, old, new);
    0
}

#[inline(always)]
fn try_state(sk: u64, old: i32, new: i32) -> Result<(), ()> {
    if new == TCP_SYN_SENT {
        // Only connect() does this, in the calling thread: note which socket it is.
        let (_, tid) = current();
        if let Some(note) = CONNECTS.get_ptr_mut(&tid) {
            let note = unsafe { &mut *note };
            note.sk = sk;
            let _ = CONNECTING.insert(&sk, &note.ev, 0);
        }
        return Ok(());
    }
    let stage = match (old, new) {
        (TCP_SYN_SENT, TCP_ESTABLISHED) => ConnStage::Established,
        (TCP_SYN_SENT, TCP_CLOSE) => ConnStage::Failed,
        (TCP_SYN_RECV, TCP_ESTABLISHED) => ConnStage::Queued,
        _ => return Ok(()),
    };
    let f = filter().ok_or(())?;
    if sock_protocol::<Typed>(sk) != IPPROTO_TCP {
        return Ok(());
    }
    let mut ev = Event::ZERO;
    // The client's socket is the sender's end; the server's child the receiver's.
    sock_flow_of::<Typed>(sk, IPPROTO_TCP, stage == ConnStage::Queued, &mut ev)?;
    if stage == ConnStage::Failed
        && ev.sport == 0
        && let Some(syn) = unsafe { SYN_TUPLES.get(&sk) }
    {
        // Left for connect()'s return too (a non-blocking call's entry ages out).
        ev.sport = syn.sport;
    }
    if !flow_matches(f, &ev) {
        return Ok(());
    }
    if stage == ConnStage::Failed {
        ev.seq = read::<Typed, i32>(sk, off!(sk_err)).unwrap_or(0) as u32;
    }
    ev.ts_ns = now();
    emit_conn(&mut ev, stage);
    Ok(())
}

/// tcp:tcp_retransmit_skb(sk, skb, ...): a SYN sent again (the socket is in SYN_SENT).
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn pf_conn_syn_retrans(ctx: BtfTracePointContext) -> i32 {
    let _ = try_syn_retrans(ctx.arg(0));
    0
}

#[inline(always)]
fn try_syn_retrans(sk: u64) -> Result<(), ()> {
    if read::<Typed, u8>(sk, off!(sk_state))? as i32 != TCP_SYN_SENT {
        return Ok(());
    }
    let f = filter().ok_or(())?;
    let mut ev = Event::ZERO;
    sock_flow_of::<Typed>(sk, IPPROTO_TCP, false, &mut ev)?;
    if !flow_matches(f, &ev) {
        return Ok(());
    }
    ev.ts_ns = now();
    emit_conn(&mut ev, ConnStage::SynRetrans);
    Ok(())
}

/// tcp:tcp_retransmit_synack(sk, req): the server sent its SYN-ACK again. The request
/// socket starts with a `sock_common` holding the connection's ends.
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn pf_conn_synack_retrans(ctx: BtfTracePointContext) -> i32 {
    let _ = try_synack_retrans(ctx.arg(1));
    0
}

#[inline(always)]
fn try_synack_retrans(req: u64) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    let mut ev = Event::ZERO;
    sock_flow_of::<Typed>(req, IPPROTO_TCP, true, &mut ev)?;
    if !flow_matches(f, &ev) {
        return Ok(());
    }
    ev.ts_ns = now();
    emit_conn(&mut ev, ConnStage::SynAckRetrans);
    Ok(())
}

/// cgroup_skb ingress: a segment being handed to a listening socket, that is a SYN
/// (`syn_rcvd`) or a handshake ACK (`ack_rcvd`), with the listener's queues as the
/// kernel is about to check them. Runs before the TCP code acts on the segment.
#[cgroup_skb(ingress)]
pub fn pf_conn_listener(ctx: SkBuffContext) -> i32 {
    let _ = try_listener(&ctx);
    1
}

#[inline(always)]
fn try_listener(ctx: &SkBuffContext) -> Result<(), ()> {
    let skb = ctx.skb.skb;
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() || unsafe { (*sk).state } != TCP_LISTEN {
        return Ok(());
    }
    let f = filter().ok_or(())?;
    let linear = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    let src = CtxSource { linear: Some(linear), ..CtxSource::net(skb.cast(), ctx.len()) };
    let mut ev = Event::ZERO;
    parse_l3(&src, &mut ev).map_err(|_| ())?;
    let stage = match ev.kind() {
        Kind::Syn => ConnStage::SynRcvd,
        Kind::Ack | Kind::Data => ConnStage::AckRcvd,
        _ => return Ok(()),
    };
    if ev.is_udp() || !flow_matches(f, &ev) {
        return Ok(());
    }
    // A typed pointer to the listener: its queue fields are plain loads.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) } as u64;
    if tp == 0 {
        return Ok(());
    }
    ev.seq = read::<Typed, u32>(tp, off!(icsk_syn_qlen)).unwrap_or(0);
    ev.len = read::<Typed, u32>(tp, off!(sk_ack_backlog)).unwrap_or(0);
    ev.aux = read::<Typed, u32>(tp, off!(sk_max_ack_backlog)).unwrap_or(0);
    ev.aux2 = read::<Typed, u64>(tp, off!(sk_net))
        .and_then(|net| read::<Typed, u8>(net, off!(net_syncookies)))
        .unwrap_or(0) as u32;
    ev.ts_ns = now();
    emit_conn(&mut ev, stage);
    Ok(())
}

/// syscalls:sys_exit_accept and sys_exit_accept4: the new descriptor's socket, found
/// through the task's file table, is the connection handed to the application.
#[tracepoint]
pub fn pf_conn_accept_exit(ctx: TracePointContext) -> u32 {
    let _ = try_accept_exit(&ctx);
    0
}

#[inline(always)]
fn try_accept_exit(ctx: &TracePointContext) -> Result<(), ()> {
    let off = unsafe { core::ptr::read_volatile(&SYS_EXIT_RET_OFF) } as usize;
    let fd: i64 = unsafe { ctx.read_at(off) }.map_err(|_| ())?;
    if !(0..=1 << 20).contains(&fd) {
        return Ok(());
    }
    let f = filter().ok_or(())?;
    let (tgid, tid) = current();
    if !process_wanted(f, tgid) {
        return Ok(());
    }
    let task = unsafe { bpf_get_current_task() };
    let files = read::<Untyped, u64>(task, off!(task_files))?;
    let fdt = read::<Untyped, u64>(files, off!(files_fdt))?;
    let fds = read::<Untyped, u64>(fdt, off!(fdt_fd))?;
    let file = read::<Untyped, u64>(fds + 8 * fd as u64, 0)?;
    let sock = read::<Untyped, u64>(file, off!(file_private_data))?;
    let sk = read::<Untyped, u64>(sock, off!(socket_sk))?;
    if sock_protocol::<Untyped>(sk) != IPPROTO_TCP {
        return Ok(());
    }
    let mut ev = Event::ZERO;
    sock_flow_of::<Untyped>(sk, IPPROTO_TCP, true, &mut ev)?;
    if !flow_matches_from(f, &ev, tgid) {
        return Ok(());
    }
    ev.aux = tgid;
    ev.aux2 = tid;
    ev.ts_ns = now();
    emit_conn(&mut ev, ConnStage::Accepted);
    Ok(())
}
