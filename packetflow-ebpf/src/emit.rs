//! Writing records and counting what could not be written.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
};
use packetflow_common::{
    Event, Stage,
    config::{MODE_RECORDS, MODE_SUMMARY},
    counters::{EMITTED, LOST},
};

use crate::maps::{COUNTERS, WAKEUP_BYTES, filter, ring};

#[inline(always)]
pub fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// Writes `ev` as a record of `stage` to this CPU's ring shard (full tracing) and/or
/// notes it for the in-kernel histograms (summary mode). `ev.ts_ns` must be set.
#[inline(always)]
pub fn emit(ev: &mut Event, stage: Stage) {
    let mode = filter().map_or(MODE_RECORDS, |f| f.mode);
    if mode & MODE_SUMMARY != 0 {
        crate::summary::update(ev, stage);
    }
    if mode & MODE_RECORDS == 0 {
        return;
    }
    let cpu = unsafe { bpf_get_smp_processor_id() };
    ev.stage = stage as u8;
    ev.cpu = cpu as u16;
    let rb = ring(cpu);
    let wake = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    let flags = if rb.query(BPF_RB_AVAIL_DATA as u64) >= wake { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    match rb.output::<Event>(&*ev, flags as u64) {
        Ok(()) => count(EMITTED + stage as u32),
        Err(_) => count(LOST + stage as u32),
    }
}
