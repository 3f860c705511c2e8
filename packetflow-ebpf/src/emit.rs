//! Writing records and counting what could not be written.

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
};
use packetflow_common::{
    Event, Stage,
    config::{MODE_RECORDS, MODE_SUMMARY},
    counters::{EMITTED, LOST, UNWOKEN_RECORDS},
};

/// What one record takes in a ring: the record and the ring's 8-byte header.
const RECORD_BYTES: u64 = core::mem::size_of::<Event>() as u64 + 8;

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
    // Wake the reader once this CPU has written a quarter ring (WAKEUP_BYTES) since the
    // last wake-up; below that it finds the records on its periodic poll. Counted in a
    // per-CPU slot rather than asked of the ring (bpf_ringbuf_query): a helper call per
    // record costs more than the whole count.
    let mut flags = BPF_RB_NO_WAKEUP;
    if let Some(n) = COUNTERS.get_ptr_mut(UNWOKEN_RECORDS) {
        let wake = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
        unsafe {
            *n += 1;
            if *n * RECORD_BYTES >= wake {
                *n = 0;
                flags = BPF_RB_FORCE_WAKEUP;
            }
        }
    }
    match ring(cpu).output::<Event>(&*ev, flags as u64) {
        Ok(()) => count(EMITTED + stage as u32),
        Err(_) => count(LOST + stage as u32),
    }
}
