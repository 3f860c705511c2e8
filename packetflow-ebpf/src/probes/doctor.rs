//! Tiny programs `packetflow doctor` loads and attaches to find out, by trying, which
//! program types this kernel accepts. They do nothing but pass.

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action::XDP_PASS},
    macros::{btf_tracepoint, classifier, fentry, kprobe, map, raw_tracepoint, tracepoint, xdp},
    maps::RingBuf,
    programs::{
        BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext, TcContext, TracePointContext,
        XdpContext,
    },
};
use aya_log_ebpf::info;

/// Doctor's own ring buffer: `pf_probe_tp` writes one record per call to prove delivery.
#[map]
static PROBE_RB: RingBuf = RingBuf::with_byte_size(4096, 0);

#[tracepoint]
pub fn pf_probe_tp(ctx: TracePointContext) -> u32 {
    let pid = super::current().0;
    let _ = PROBE_RB.output::<u32>(&pid, 0);
    info!(&ctx, "packetflow doctor probe ran in pid {}", pid);
    0
}

#[raw_tracepoint(tracepoint = "net_dev_queue")]
pub fn pf_probe_raw_tp(_ctx: RawTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "net_dev_queue")]
pub fn pf_probe_tp_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[kprobe]
pub fn pf_probe_kprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[fentry(function = "tcp_sendmsg")]
pub fn pf_probe_fentry(_ctx: FEntryContext) -> u32 {
    0
}

#[xdp]
pub fn pf_probe_xdp(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[classifier]
pub fn pf_probe_tc(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}
