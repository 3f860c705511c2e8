//! Packet capture: XDP for packets coming in (`pf_cap_xdp`), tcx egress for packets going
//! out (`pf_cap_tc_egress`). These programs also do the tracer's work for their stage
//! (an interface holds one XDP program): `capture --stages` attaches them instead of
//! `pf_xdp`/`pf_tc_egress`, and plain tracing never pays for the filter's verification.
//! A packet
//! the filter selects is copied (up to the snaplen, at most CAPTURE_MAX bytes) behind a
//! `CapHdr` into this CPU's capture ring shard. The packet always goes on untouched.
//!
//! The filter follows libpcap's semantics (see packetflow/src/expr.rs): the frame's
//! EtherType at offset 12 (no VLAN skipping), IPv6's fixed next header, ports of TCP, UDP
//! and SCTP on first IPv4 fragments, ARP/RARP addresses for IPv4 `host`/`net`.

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action::XDP_PASS},
    helpers::{
        bpf_get_smp_processor_id,
        generated::{
            bpf_probe_read_kernel, bpf_skb_load_bytes, bpf_xdp_adjust_meta, bpf_xdp_get_buff_len, bpf_xdp_load_bytes,
        },
    },
    macros::{btf_tracepoint, classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray, XskMap},
    programs::{BtfTracePointContext, TcContext, XdpContext},
};
use packetflow_common::{
    Stage,
    capture::{
        CAP_BUF, CAPTURE_MAX, CapHdr, CaptureConfig, DIR_IN, DIR_OUT, ETH_IP, ETH_IP6, HOOK_DROP, HOOK_TC_EGRESS,
        HOOK_XDP, MAX_PRIMS, Pkt, TABLE_SIZE, XSK_MAX_QUEUES, XSK_META_MAGIC, matches, summarize,
    },
    counters::{
        CAP_LOST_DROP, CAP_LOST_TC, CAP_LOST_XDP, CAP_MATCHED_DROP, CAP_MATCHED_TC, CAP_MATCHED_XDP, CAP_SEEN_TC,
        CAP_SEEN_XDP, CAP_XSK_NO_SOCKET, UNWOKEN_CAPTURE_BYTES,
    },
};

use super::packet::{direct, xdp_read};
use crate::{
    emit::{now, wake_after},
    kernel::{Typed, read},
    maps::{CAP_WAKEUP_BYTES, cap_ring, count, off},
};

#[map]
static CAP_CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// One staging buffer per CPU (the loader sizes the map to the possible CPUs). Capture
/// programs run with bottom halves off, so two never share a CPU's buffer at once.
/// Records lost to a full ring, per ifindex (for the pcapng interface statistics).
#[map]
static CAP_IF_LOST: HashMap<u32, u64> = HashMap::with_max_entries(256, 0);

#[inline(always)]
fn lost_on(ifindex: u32) {
    match CAP_IF_LOST.get_ptr_mut(&ifindex) {
        Some(p) => unsafe { *p += 1 },
        None => {
            let _ = CAP_IF_LOST.insert(&ifindex, &1, 0);
        }
    }
}

#[map]
static CAP_SCRATCH: Array<[u8; CAP_BUF]> = Array::with_max_entries(1, 0);

/// The truth table: entry `mask` is 1 when that combination of primitive results is
/// captured (see packetflow-common's capture.rs).
#[map]
static CAP_TABLE: Array<u8> = Array::with_max_entries(TABLE_SIZE, 0);

/// Where `selected` puts the truth-table key: in a map value, not on the stack. A key
/// on the stack that the verifier knows to be a constant (every path through the
/// primitives gives one) is marked precise when the lookup of a constant key is checked,
/// and then no two paths prune: 2^MAX_PRIMS of them ran out the 1M-instruction budget.
#[map]
static CAP_KEY: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn selected(cfg: &CaptureConfig, k: &Pkt) -> bool {
    let mut mask = 0u32;
    for i in 0..MAX_PRIMS {
        if (i as u32) < cfg.nprims && matches(&cfg.prims[i], k) {
            mask |= 1 << i;
        }
    }
    let Some(key) = CAP_KEY.get_ptr_mut(0) else { return false };
    unsafe { *key = mask };
    let v = unsafe {
        aya_ebpf::helpers::generated::bpf_map_lookup_elem(
            &CAP_TABLE as *const _ as *mut core::ffi::c_void,
            key as *const core::ffi::c_void,
        )
    } as *const u8;
    !v.is_null() && unsafe { *v } != 0
}

/// Copies `caplen` bytes of the packet behind a header into this CPU's capture shard.
#[inline(always)]
fn record(
    len: u32,
    ifindex: u32,
    dir: u8,
    hook: u8,
    snaplen: u32,
    extra: [u8; 8],
    load: impl Fn(&mut [u8]) -> bool,
) -> bool {
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(buf) = CAP_SCRATCH.get_ptr_mut(cpu) else {
        return false;
    };
    let buf = unsafe { &mut *buf };
    let mut caplen = if len < snaplen { len } else { snaplen };
    if caplen as usize > CAPTURE_MAX {
        caplen = CAPTURE_MAX as u32;
    }
    let n = (caplen as usize) & 0xffff;
    if n == 0 || n > CAPTURE_MAX {
        return false;
    }
    let hdr = CapHdr { ts_ns: now(), len, caplen: n as u32, ifindex, dir, hook, cpu: cpu as u16, _pad: extra };
    let (h, data) = buf.split_at_mut(32);
    let Some(data) = data.get_mut(..n) else {
        return false;
    };
    if !load(data) {
        return false;
    }
    unsafe { core::ptr::write_unaligned(h.as_mut_ptr().cast::<CapHdr>(), hdr) };
    let flags = wake_after(UNWOKEN_CAPTURE_BYTES, 32 + n as u64 + 8, &CAP_WAKEUP_BYTES);
    let Some(out) = buf.get(..32 + n) else {
        return false;
    };
    cap_ring(cpu).output::<[u8]>(out, flags).is_ok()
}

#[xdp(frags)]
pub fn pf_cap_xdp(ctx: XdpContext) -> u32 {
    super::packet::try_xdp(&ctx);
    capture_xdp(&ctx);
    XDP_PASS
}

/// `capture --bypass`: the AF_XDP socket of each receive queue, by queue index.
#[map]
static CAP_XSKS: XskMap = XskMap::with_max_entries(XSK_MAX_QUEUES, 0);

/// `capture --bypass`: a frame the filter selects is redirected to its receive queue's
/// AF_XDP socket, and the stack never sees it; every other frame passes, untouched. No
/// tracing here (the frames it takes would never reach the later stages anyway).
#[xdp]
pub fn pf_cap_xsk(ctx: XdpContext) -> u32 {
    bypass(&ctx)
}

#[inline(never)]
fn bypass(ctx: &XdpContext) -> u32 {
    let Some(cfg) = CAP_CONFIG.get(0) else { return XDP_PASS };
    if cfg.enabled == 0 {
        return XDP_PASS;
    }
    count(CAP_SEEN_XDP);
    if !selected(cfg, &summarize(|off, buf| xdp_read(ctx, off, buf))) {
        return XDP_PASS;
    }
    count(CAP_MATCHED_XDP);
    let queue = ctx.rx_queue_index();
    if CAP_XSKS.get(queue).is_none() {
        count(CAP_XSK_NO_SOCKET);
        return XDP_PASS;
    }
    stamp(ctx);
    // XDP_PASS in the flags: should the socket go away meanwhile, the frame goes on.
    match CAP_XSKS.redirect(queue, u64::from(XDP_PASS)) {
        Ok(action) | Err(action) => action,
    }
}

/// The kernel's time in the frame's metadata (`XSK_META_MAGIC` says it is there), where
/// the driver has room for it; the frame's own bytes are not touched.
#[inline(always)]
fn stamp(ctx: &XdpContext) {
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -16) } != 0 {
        return;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + 16 > data {
        return;
    }
    unsafe {
        core::ptr::write_unaligned(meta as *mut u64, now());
        core::ptr::write_unaligned((meta + 8) as *mut u64, XSK_META_MAGIC);
    }
}

#[classifier]
pub fn pf_cap_tc_egress(ctx: TcContext) -> i32 {
    super::packet::try_tc(&ctx, Stage::TcEgress);
    capture_tc_egress(&ctx);
    TC_ACT_UNSPEC
}

/// Capture at XDP: packets coming in. A BPF-to-BPF call, not inlined: the verifier then
/// checks it once, not once for every state the tracing half leaves behind.
#[inline(never)]
fn capture_xdp(ctx: &XdpContext) {
    let Some(cfg) = CAP_CONFIG.get(0) else { return };
    if cfg.enabled == 0 || cfg.dirs & DIR_IN as u32 == 0 {
        return;
    }
    count(CAP_SEEN_XDP);
    let load = |off: u32, buf: &mut [u8]| unsafe {
        bpf_xdp_load_bytes(ctx.ctx, off, buf.as_mut_ptr().cast(), buf.len() as u32) == 0
    };
    if !selected(cfg, &summarize(|off, buf| xdp_read(ctx, off, buf))) {
        return;
    }
    count(CAP_MATCHED_XDP);
    let len = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as u32;
    let ifindex = ctx.ingress_ifindex() as u32;
    if !record(len, ifindex, DIR_IN, HOOK_XDP, cfg.snaplen, [0; 8], |d| load(0, d)) {
        count(CAP_LOST_XDP);
        lost_on(ifindex);
    }
}

/// Capture at tcx egress: packets going out (not inlined, as `capture_xdp`).
#[inline(never)]
fn capture_tc_egress(ctx: &TcContext) {
    let Some(cfg) = CAP_CONFIG.get(0) else { return };
    if cfg.enabled == 0 || cfg.dirs & DIR_OUT as u32 == 0 {
        return;
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if cfg.skip_out.iter().any(|&i| i != 0 && i == ifindex) {
        return;
    }
    count(CAP_SEEN_TC);
    let skb = ctx.skb.skb.cast::<core::ffi::c_void>();
    let load = |off: u32, buf: &mut [u8]| unsafe {
        bpf_skb_load_bytes(skb, off, buf.as_mut_ptr().cast(), buf.len() as u32) == 0
    };
    let peek = |off: u32, buf: &mut [u8]| direct(ctx.data(), ctx.data_end(), off, buf) || load(off, buf);
    if !selected(cfg, &summarize(peek)) {
        return;
    }
    count(CAP_MATCHED_TC);
    if !record(ctx.len(), ifindex, DIR_OUT, HOOK_TC_EGRESS, cfg.snaplen, [0; 8], |d| load(0, d)) {
        count(CAP_LOST_TC);
        lost_on(ifindex);
    }
}

/// `capture --drops`: skb:kfree_skb, a packet the kernel dropped (never a consumed one:
/// those go to skb:consume_skb). Its network-layer bytes (the linear part) are captured
/// behind a synthesized Ethernet header, with the reason and where it was dropped
/// (`HOOK_DROP`), when the filter selects it.
#[btf_tracepoint(function = "kfree_skb")]
pub fn pf_cap_drop(ctx: BtfTracePointContext) -> i32 {
    let reason: u32 = ctx.arg(2);
    if reason == unsafe { core::ptr::read_volatile(&super::drops::SKB_CONSUMED) } {
        return 0;
    }
    capture_drop(ctx.arg(0), ctx.arg(1), reason);
    0
}

#[inline(never)]
fn capture_drop(skb: u64, location: u64, reason: u32) {
    let Some(cfg) = CAP_CONFIG.get(0) else { return };
    if cfg.enabled == 0 {
        return;
    }
    let (Ok(head), Ok(data), Ok(len), Ok(data_len), Ok(nh)) = (
        read::<Typed, u64>(skb, off!(skb_head)),
        read::<Typed, u64>(skb, off!(skb_data)),
        read::<Typed, u32>(skb, off!(skb_len)),
        read::<Typed, u32>(skb, off!(skb_data_len)),
        read::<Typed, u16>(skb, off!(skb_network_header)),
    ) else {
        return;
    };
    if nh == u16::MAX || data < head {
        return;
    }
    let l3 = head + u64::from(nh);
    let linear_end = data + u64::from(len.saturating_sub(data_len));
    if l3 >= linear_end || linear_end - l3 > 65535 {
        return;
    }
    // Network-layer bytes in the linear part, and in the whole packet.
    let linear = (linear_end - l3) as u32;
    let total = (data + u64::from(len)).saturating_sub(l3) as u32;
    let mut v = [0u8; 1];
    if unsafe { bpf_probe_read_kernel(v.as_mut_ptr().cast(), 1, l3 as *const _) } != 0 {
        return;
    }
    let eth: u16 = match v[0] >> 4 {
        4 => ETH_IP,
        6 => ETH_IP6,
        _ => return,
    };
    // The filter reads the EtherType at 12, everything else from 14 on.
    let peek = |off: u32, buf: &mut [u8]| -> bool {
        if off < 14 {
            if off == 12 && buf.len() == 2 {
                buf.copy_from_slice(&eth.to_be_bytes());
                return true;
            }
            return false;
        }
        unsafe {
            bpf_probe_read_kernel(buf.as_mut_ptr().cast(), buf.len() as u32, (l3 + u64::from(off - 14)) as *const _)
                == 0
        }
    };
    if !selected(cfg, &summarize(peek)) {
        return;
    }
    count(CAP_MATCHED_DROP);
    let ifindex =
        read::<Typed, u64>(skb, off!(skb_dev)).and_then(|dev| read::<Typed, u32>(dev, off!(dev_ifindex))).unwrap_or(0);
    let mut extra = [0u8; 8];
    extra[..4].copy_from_slice(&reason.to_le_bytes());
    extra[4..].copy_from_slice(&(location as u32).to_le_bytes());
    // At least the synthesized header; at most the linear part.
    let snap = cfg.snaplen.min(14 + linear).max(14);
    let load = |d: &mut [u8]| -> bool {
        let Some(h) = d.get_mut(..14) else { return false };
        h[..12].fill(0);
        h[12..].copy_from_slice(&eth.to_be_bytes());
        // Through a volatile read and an unsigned bound the verifier can follow (it
        // otherwise saw a path where the length went below the header's 14 bytes).
        let rest = d.len().wrapping_sub(14);
        let rest = unsafe { core::ptr::read_volatile(&rest) };
        if rest == 0 {
            return true;
        }
        if rest > CAPTURE_MAX - 14 {
            return false;
        }
        let Some(r) = d.get_mut(14..14 + rest) else { return false };
        unsafe { bpf_probe_read_kernel(r.as_mut_ptr().cast(), rest as u32, l3 as *const _) == 0 }
    };
    if !record(14 + total, ifindex, 0, HOOK_DROP, snap, extra, load) {
        count(CAP_LOST_DROP);
        lost_on(ifindex);
    }
}
