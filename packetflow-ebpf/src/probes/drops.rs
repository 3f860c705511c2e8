//! Drops and retransmissions (`packetflow_common::drop`, docs/drops.md).
//!
//! `pf_drop` is skb:kfree_skb, which the kernel fires only for an skb it drops: a
//! consumed skb goes to skb:consume_skb, which nothing here attaches to, so the normal
//! path pays nothing. `pf_retrans` is tcp:tcp_retransmit_skb, once per segment TCP sends
//! again.

use aya_ebpf::{helpers::bpf_get_smp_processor_id, macros::btf_tracepoint, programs::BtfTracePointContext};
use packetflow_common::{
    Event, Offsets,
    config::{MODE_RECORDS, MODE_SUMMARY},
    counters::{DROP_EMITTED, DROP_LOST, RETRANS_EMITTED, RETRANS_LOST, UNWOKEN_RECORD_BYTES},
    drop::{DROP_STAGE, DropRecord, RETRANS_STAGE},
};

use crate::{
    emit::{now, wake_after},
    filter::{flow_matches, iface_matches},
    kernel::{L3At, Typed, device_info, parse_skb, read, sock_flow_of},
    maps::{WAKEUP_BYTES, count, filter, idle, off, ring},
    parse::IPPROTO_TCP,
};

/// `SKB_CONSUMED` in this kernel's `enum skb_drop_reason` (set by the loader from BTF;
/// kernels before 6.3 have no such value and never pass one).
#[unsafe(no_mangle)]
pub static SKB_CONSUMED: u32 = u32::MAX;

/// skb:kfree_skb(skb, location, reason[, rx_sk]).
#[btf_tracepoint(function = "kfree_skb")]
pub fn pf_drop(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let reason: u32 = ctx.arg(2);
    if reason == unsafe { core::ptr::read_volatile(&SKB_CONSUMED) } {
        return 0;
    }
    let _ = try_drop(ctx.arg(0), ctx.arg(1), reason);
    0
}

#[inline(never)]
fn try_drop(skb: u64, location: u64, reason: u32) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    let mut rec = DropRecord { ev: Event::ZERO, location, reason, _pad: [0; 13] };
    // Not IP, or not TCP/UDP (ARP, ICMP, ...): not traffic the filter can select.
    parse_skb::<Typed>(skb, L3At::NetworkHeader, &mut rec.ev).map_err(|_| ())?;
    if !flow_matches(f, &rec.ev) {
        return Ok(());
    }
    if let Ok(dev) = read::<Typed, u64>(skb, off!(skb_dev)) {
        device_info::<Typed>(dev, &mut rec.ev);
    }
    // An skb dropped before it had a device passes any interface filter.
    if rec.ev.aux != 0 && !iface_matches(f, rec.ev.aux) {
        return Ok(());
    }
    rec.ev.ts_ns = now();
    if f.mode & MODE_SUMMARY != 0 {
        crate::summary::dropped(&rec.ev, reason);
    }
    if f.mode & MODE_RECORDS == 0 {
        return Ok(());
    }
    let cpu = unsafe { bpf_get_smp_processor_id() };
    rec.ev.stage = DROP_STAGE;
    rec.ev.cpu = cpu as u16;
    // Batched wake-ups, as every record: a flood of drops must not wake the reader each.
    let flags = wake_after(UNWOKEN_RECORD_BYTES, core::mem::size_of::<DropRecord>() as u64 + 8, &WAKEUP_BYTES);
    match ring(cpu).output::<DropRecord>(&rec, flags) {
        Ok(()) => count(DROP_EMITTED),
        Err(_) => count(DROP_LOST),
    }
    Ok(())
}

/// tcp:tcp_retransmit_skb(sk, skb[, err]): TCP sent the segment `skb` (in its write
/// queue: the headers are in the copy that left, the bytes in `tcp_skb_cb`) again.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn pf_retrans(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let _ = try_retrans(ctx.arg(0), ctx.arg(1));
    0
}

#[inline(never)]
fn try_retrans(sk: u64, skb: u64) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    if f.mode & (MODE_RECORDS | MODE_SUMMARY) == 0 {
        return Ok(());
    }
    let mut ev = Event::ZERO;
    sock_flow_of::<Typed>(sk, IPPROTO_TCP, false, &mut ev)?;
    if !flow_matches(f, &ev) {
        return Ok(());
    }
    if f.mode & MODE_SUMMARY != 0 {
        crate::summary::retransmitted(&ev);
    }
    if f.mode & MODE_RECORDS == 0 {
        return Ok(());
    }
    let cb = off!(skb_cb);
    if cb == Offsets::MISSING {
        return Err(());
    }
    let seq: u32 = read::<Typed, _>(skb, cb)?;
    let end_seq: u32 = read::<Typed, _>(skb, cb + 4)?;
    ev.seq = seq;
    ev.len = end_seq.wrapping_sub(seq);
    ev.ts_ns = now();
    let cpu = unsafe { bpf_get_smp_processor_id() };
    ev.stage = RETRANS_STAGE;
    ev.cpu = cpu as u16;
    let flags = wake_after(UNWOKEN_RECORD_BYTES, core::mem::size_of::<Event>() as u64 + 8, &WAKEUP_BYTES);
    match ring(cpu).output::<Event>(&ev, flags) {
        Ok(()) => count(RETRANS_EMITTED),
        Err(_) => count(RETRANS_LOST),
    }
    Ok(())
}
