//! `packetflow blast`: the generator's XDP program. It is attached nowhere: userspace runs
//! it with BPF_PROG_TEST_RUN and live frames, which hands each frame it returns XDP_TX for
//! to the device the run names (`ndo_xdp_xmit`), no socket and no skb on the way. A run
//! sends only when this CPU's schedule says so (`BlastState`), else drops its own frame
//! (nothing leaves). A frame sent carries this CPU and its number in the UDP payload (so
//! every frame is unique and can be checked byte for byte), and a UDP source port among
//! `flows`. Frame layout (built by userspace, packetflow/src/cmd/blast.rs): Ethernet,
//! IPv4 without options, UDP with checksum 0, payload.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_TX},
    helpers::bpf_get_smp_processor_id,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use packetflow_common::blast::{BlastConfig, BlastState, CATCH_UP_NS, PAYLOAD_OFF, SPORT_OFF};

use crate::emit::now;

#[map]
static BLAST_CONFIG: Array<BlastConfig> = Array::with_max_entries(1, 0);

#[map]
static BLAST_STATE: PerCpuArray<BlastState> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn pf_blast(ctx: XdpContext) -> u32 {
    let (Some(cfg), Some(st)) = (BLAST_CONFIG.get(0), BLAST_STATE.get_ptr_mut(0)) else { return XDP_DROP };
    // SAFETY: a per-CPU slot: no other writer while this runs.
    let st = unsafe { &mut *st };
    if st.sent >= st.limit {
        return XDP_DROP;
    }
    let t = now();
    if t >= st.stop_ns {
        return XDP_DROP;
    }
    if st.interval_ns != 0 {
        if t < st.next_ns {
            return XDP_DROP;
        }
        // Behind by more than CATCH_UP_NS: start again from now rather than burst.
        let from = if st.next_ns + CATCH_UP_NS < t { t } else { st.next_ns };
        st.next_ns = from + st.interval_ns;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + PAYLOAD_OFF + 12 > end {
        return XDP_DROP;
    }
    let seq = st.sent;
    st.sent = seq + 1;
    let flows = u64::from(cfg.flows.max(1));
    let sport = (u64::from(cfg.base_port) + seq % flows) as u16;
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // SAFETY: the bytes written lie inside [data, data_end), checked above.
    unsafe {
        core::ptr::write_unaligned((data + SPORT_OFF) as *mut [u8; 2], sport.to_be_bytes());
        core::ptr::write_unaligned((data + PAYLOAD_OFF) as *mut [u8; 4], cpu.to_be_bytes());
        core::ptr::write_unaligned((data + PAYLOAD_OFF + 4) as *mut [u8; 8], seq.to_be_bytes());
    }
    XDP_TX
}
