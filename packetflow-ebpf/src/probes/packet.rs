//! `xdp`, `tc_egress` and `tc_ingress`: programs on the interfaces themselves. They parse
//! the frame, count it as parsed or not, and always let it go on untouched: XDP_PASS, and
//! TC_ACT_UNSPEC (tcx's "next"), so programs attached after ours still run.

use aya_ebpf::{
    bindings::bpf_hdr_start_off::{BPF_HDR_START_MAC, BPF_HDR_START_NET},
    bindings::{TC_ACT_UNSPEC, xdp_action::XDP_PASS},
    helpers::generated::{bpf_skb_load_bytes_relative, bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use packetflow_common::{
    Event, Stage,
    counters::{CONTROL_SKIPPED, PARSED_TC, PARSED_XDP, UNPARSED_TC, UNPARSED_XDP},
};

use crate::{
    emit::{emit, now},
    filter::{flow_matches, iface_matches, kind_wanted},
    maps::{count, filter, idle},
    parse::{ETH_P_IP, ETH_P_IPV6, Source, Unparsed, l2_skip, parse_l3},
};

struct XdpSource<'a> {
    ctx: &'a XdpContext,
    l3_off: u32,
    l3_len: u32,
}

impl Source for XdpSource<'_> {
    #[inline(always)]
    fn read(&self, off: u32, buf: &mut [u8]) -> Result<(), Unparsed> {
        xdp_read(self.ctx, self.l3_off + off, buf).then_some(()).ok_or(Unparsed::Malformed)
    }
    #[inline(always)]
    fn l3_len(&self) -> u32 {
        self.l3_len
    }
}

#[inline(always)]
fn xdp_load(ctx: &XdpContext, off: u32, buf: &mut [u8]) -> bool {
    unsafe { bpf_xdp_load_bytes(ctx.ctx, off, buf.as_mut_ptr().cast(), buf.len() as u32) == 0 }
}

/// Frame bytes from the linear part directly, else (fragments) through the helper.
#[inline(always)]
pub(crate) fn xdp_read(ctx: &XdpContext, off: u32, buf: &mut [u8]) -> bool {
    direct(ctx.data(), ctx.data_end(), off, buf) || xdp_load(ctx, off, buf)
}

/// Copies `buf.len()` bytes at `data + off` straight out of the packet when `data_end`
/// shows they are there (the verifier follows the check): a helper call saved, which on a
/// machine with return-thunk mitigations costs more than the copy.
#[inline(always)]
pub(crate) fn direct(data: usize, data_end: usize, off: u32, buf: &mut [u8]) -> bool {
    let start = data + off as usize;
    // For one byte LLVM turns `start + 1 > end` into `start >= end`, from which the
    // verifier proves nothing: single bytes go through the helper.
    if buf.len() < 2 || start + buf.len() > data_end {
        return false;
    }
    for (i, b) in buf.iter_mut().enumerate() {
        *b = unsafe { *((start + i) as *const u8) };
    }
    true
}

/// A TC or cgroup_skb `__sk_buff`, read relative to its network header: where `data`
/// points differs by hook and device (L2 on TC, L3 on cgroup_skb, and L3 on TC ingress
/// after generic XDP on some devices), the network header does not.
pub(crate) struct SkbCtxSource {
    pub(crate) skb: *mut core::ffi::c_void,
    /// BPF_HDR_START_NET, or BPF_HDR_START_MAC for frames with an in-band VLAN tag.
    pub(crate) hdr: u32,
    /// Offset of the IP header from `hdr`.
    pub(crate) base: u32,
    /// An upper bound (skb->len counts from `data`); the IP length fields bound it.
    pub(crate) l3_len: u32,
    /// `(data, data_end)` where `data` is where this source starts (cgroup_skb: the IP
    /// header): bytes there are read directly.
    pub(crate) linear: Option<(usize, usize)>,
}

impl SkbCtxSource {
    pub(crate) fn net(skb: *mut core::ffi::c_void, l3_len: u32) -> SkbCtxSource {
        SkbCtxSource { skb, hdr: BPF_HDR_START_NET, base: 0, l3_len, linear: None }
    }
}

#[inline(always)]
fn skb_load(skb: *mut core::ffi::c_void, hdr: u32, off: u32, buf: &mut [u8]) -> bool {
    unsafe { bpf_skb_load_bytes_relative(skb, off, buf.as_mut_ptr().cast(), buf.len() as u32, hdr) == 0 }
}

impl Source for SkbCtxSource {
    #[inline(always)]
    fn read(&self, off: u32, buf: &mut [u8]) -> Result<(), Unparsed> {
        if let Some((data, end)) = self.linear
            && direct(data, end, off, buf)
        {
            return Ok(());
        }
        if skb_load(self.skb, self.hdr, self.base + off, buf) { Ok(()) } else { Err(Unparsed::Malformed) }
    }
    #[inline(always)]
    fn l3_len(&self) -> u32 {
        self.l3_len
    }
}

/// Parse result counted as parsed/unparsed; `None` for frames that are not traced.
#[inline(always)]
fn counted<S: Source>(src: &S, parsed: u32, unparsed: u32) -> Option<Event> {
    let mut ev = Event::ZERO;
    match parse_l3(src, &mut ev) {
        Ok(()) => {
            count(parsed);
            Some(ev)
        }
        Err(_) => {
            count(unparsed);
            None
        }
    }
}

/// Filters and emits an event parsed at an interface hook.
#[inline(always)]
fn interface_stage(mut ev: Event, ifindex: u32, stage: Stage) {
    let Some(f) = filter() else { return };
    if !flow_matches(f, &ev) || !iface_matches(f, ifindex) {
        return;
    }
    if !kind_wanted(f, &ev) {
        count(CONTROL_SKIPPED);
        return;
    }
    ev.aux = ifindex;
    ev.ts_ns = now();
    emit(&mut ev, stage);
}

#[xdp(frags)]
pub fn pf_xdp(ctx: XdpContext) -> u32 {
    if idle() {
        return XDP_PASS;
    }
    try_xdp(&ctx);
    XDP_PASS
}

/// Not inlined: the capture programs call it too, and each half of those keeps its own
/// stack frame (the verifier allows 512 bytes per call chain).
#[inline(never)]
pub(crate) fn try_xdp(ctx: &XdpContext) {
    // Not tracing (a capture without --stages): nothing to parse for.
    if filter().is_none() {
        return;
    }
    let total = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as u32;
    let l3 = l2_skip(|off, buf| xdp_read(ctx, off, buf));
    let ev = match l3 {
        Ok((l3_off, _)) if l3_off <= total => {
            let src = XdpSource { ctx, l3_off, l3_len: total - l3_off };
            counted(&src, PARSED_XDP, UNPARSED_XDP)
        }
        _ => {
            count(UNPARSED_XDP);
            None
        }
    };
    if let Some(ev) = ev {
        interface_stage(ev, ctx.ingress_ifindex() as u32, Stage::Xdp);
    }
}

#[classifier]
pub fn pf_tc_egress(ctx: TcContext) -> i32 {
    if idle() {
        return TC_ACT_UNSPEC;
    }
    try_tc(&ctx, Stage::TcEgress);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn pf_tc_ingress(ctx: TcContext) -> i32 {
    if idle() {
        return TC_ACT_UNSPEC;
    }
    try_tc(&ctx, Stage::TcIngress);
    TC_ACT_UNSPEC
}

#[inline(never)]
pub(crate) fn try_tc(ctx: &TcContext, stage: Stage) {
    if filter().is_none() {
        return;
    }
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    let skb = ctx.skb.skb.cast();
    let ev = if proto == ETH_P_IP || proto == ETH_P_IPV6 {
        counted(&SkbCtxSource::net(skb, ctx.len()), PARSED_TC, UNPARSED_TC)
    } else {
        // An in-band VLAN tag (not offloaded): walk the frame from its MAC header.
        match l2_skip(|off, buf| skb_load(skb, BPF_HDR_START_MAC, off, buf)) {
            Ok((base, _)) => {
                let src = SkbCtxSource { skb, hdr: BPF_HDR_START_MAC, base, l3_len: ctx.len(), linear: None };
                counted(&src, PARSED_TC, UNPARSED_TC)
            }
            Err(_) => {
                count(UNPARSED_TC);
                None
            }
        }
    };
    if let Some(ev) = ev {
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        interface_stage(ev, ifindex, stage);
    }
}
