//! `dev_queue`, `nic_xmit` and `netif_receive`: the net:* tracepoints (as tp_btf), which
//! hand us the kernel `sk_buff` (and, for start_xmit, the device).

use aya_ebpf::{
    macros::{btf_tracepoint, kprobe},
    programs::{BtfTracePointContext, ProbeContext},
};
use packetflow_common::{
    Event, Stage,
    counters::{CONTROL_SKIPPED, UNPARSED_SKB},
};

use crate::{
    emit::{emit, now},
    filter::{flow_matches, iface_matches, kind_wanted},
    kernel::{Kmem, L3At, Typed, Untyped, device_info, parse_skb, read},
    maps::{count, filter, idle, off},
    parse::Unparsed,
};

#[btf_tracepoint(function = "net_dev_queue")]
pub fn pf_dev_queue(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let skb: u64 = ctx.arg(0);
    let _ = device_stage::<Typed>(skb, 0, L3At::NetworkHeader, Stage::DevQueue);
    0
}

#[btf_tracepoint(function = "net_dev_start_xmit")]
pub fn pf_start_xmit(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let skb: u64 = ctx.arg(0);
    let dev: u64 = ctx.arg(1);
    let _ = device_stage::<Typed>(skb, dev, L3At::NetworkHeader, Stage::NicXmit);
    0
}

#[btf_tracepoint(function = "netif_receive_skb")]
pub fn pf_netif_receive(ctx: BtfTracePointContext) -> i32 {
    if idle() {
        return 0;
    }
    let skb: u64 = ctx.arg(0);
    let _ = device_stage::<Typed>(skb, 0, L3At::Data, Stage::NetifReceive);
    0
}

/// kprobe ip_output / ip6_output(net, sk, skb): `ip_send`, where kprobes work (not on
/// kernels built without CONFIG_KPROBES, like the one this was developed on).
#[kprobe]
pub fn pf_kp_ip_send(ctx: ProbeContext) -> u32 {
    if idle() {
        return 0;
    }
    if let Some(skb) = ctx.arg::<u64>(2) {
        // ip_output sets skb->dev from the route only after this entry: ask the route.
        let dev = read::<Untyped, u64>(skb, off!(skb_refdst))
            .and_then(|d| read::<Untyped, u64>(d & !1, off!(dst_dev)))
            .unwrap_or(0);
        let _ = device_stage::<Untyped>(skb, dev, L3At::NetworkHeader, Stage::IpSend);
    }
    0
}

/// kprobe ip_local_deliver / ip6_input(skb): `ip_rcv`, the IP layer handing a packet for
/// this host on towards the transport. Not ip_rcv/ipv6_rcv: a NAPI driver (veth with XDP,
/// most NICs) delivers GRO lists through ip_list_rcv/ipv6_list_rcv, which never call them,
/// while both the single and the list path end in these two (they are `dst->input`).
#[kprobe]
pub fn pf_kp_ip_rcv(ctx: ProbeContext) -> u32 {
    if idle() {
        return 0;
    }
    if let Some(skb) = ctx.arg::<u64>(0) {
        let _ = device_stage::<Untyped>(skb, 0, L3At::NetworkHeader, Stage::IpRcv);
    }
    0
}

/// `dev == 0`: take the device from `skb->dev`.
#[inline(always)]
fn device_stage<M: Kmem>(skb: u64, dev: u64, at: L3At, stage: Stage) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    let mut ev = Event::ZERO;
    if let Err(e) = parse_skb::<M>(skb, at, &mut ev) {
        if e == Unparsed::Malformed {
            count(UNPARSED_SKB);
        }
        return Err(());
    }
    if !flow_matches(f, &ev) {
        return Ok(());
    }
    if !kind_wanted(f, &ev) {
        count(CONTROL_SKIPPED);
        return Ok(());
    }
    let dev = if dev != 0 { dev } else { read::<M, u64>(skb, off!(skb_dev))? };
    device_info::<M>(dev, &mut ev);
    if !iface_matches(f, ev.aux) {
        return Ok(());
    }
    ev.ts_ns = now();
    emit(&mut ev, stage);
    Ok(())
}
