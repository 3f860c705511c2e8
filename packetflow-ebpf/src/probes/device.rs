//! `dev_queue`, `nic_xmit` and `netif_receive`: the net:* tracepoints (as tp_btf), which
//! hand us the kernel `sk_buff` (and, for start_xmit, the device).

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use packetflow_common::{
    Event, Stage,
    counters::{CONTROL_SKIPPED, UNPARSED_SKB},
};

use crate::{
    emit::{count, emit, now},
    filter::{flow_matches, iface_matches, kind_wanted},
    kernel::{L3At, device_info, parse_skb, read},
    maps::{filter, off},
    parse::Unparsed,
};

#[btf_tracepoint(function = "net_dev_queue")]
pub fn pf_dev_queue(ctx: BtfTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let _ = device_stage(skb, 0, L3At::NetworkHeader, Stage::DevQueue);
    0
}

#[btf_tracepoint(function = "net_dev_start_xmit")]
pub fn pf_start_xmit(ctx: BtfTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let dev: u64 = ctx.arg(1);
    let _ = device_stage(skb, dev, L3At::NetworkHeader, Stage::NicXmit);
    0
}

#[btf_tracepoint(function = "netif_receive_skb")]
pub fn pf_netif_receive(ctx: BtfTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let _ = device_stage(skb, 0, L3At::Data, Stage::NetifReceive);
    0
}

/// `dev == 0`: take the device from `skb->dev`.
#[inline(always)]
fn device_stage(skb: u64, dev: u64, at: L3At, stage: Stage) -> Result<(), ()> {
    let f = filter().ok_or(())?;
    let mut ev = Event::ZERO;
    if let Err(e) = parse_skb(skb, at, &mut ev) {
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
    let dev = if dev != 0 { dev } else { read::<u64>(skb, off!(skb_dev))? };
    device_info(dev, &mut ev);
    if !iface_matches(f, ev.aux) {
        return Ok(());
    }
    ev.ts_ns = now();
    emit(&mut ev, stage);
    Ok(())
}
