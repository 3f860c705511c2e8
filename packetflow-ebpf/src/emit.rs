//! Writing records and counting what could not be written.

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
};
use packetflow_common::{
    Event, Stage,
    config::{MODE_RECORDS, MODE_SUMMARY},
    counters::{EMITTED, LOST, UNWOKEN_RECORD_BYTES},
};

/// What one record takes in a ring: the record and the ring's 8-byte header.
const RECORD_BYTES: u64 = core::mem::size_of::<Event>() as u64 + 8;

use crate::maps::{COUNTERS, WAKEUP_BYTES, count, filter, ring};

#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// The flags for a ring write of `bytes` (record and ring header): wake the reader once
/// this CPU has written `*threshold` bytes (a quarter ring) since it last did; below that
/// the reader finds the records on its periodic poll. Kept in the per-CPU counter slot
/// `slot` rather than asked of the ring (bpf_ringbuf_query): a helper call per record
/// costs more than the whole count.
#[inline(always)]
pub fn wake_after(slot: u32, bytes: u64, threshold: &'static u64) -> u64 {
    let Some(n) = COUNTERS.get_ptr_mut(slot) else { return BPF_RB_NO_WAKEUP as u64 };
    let wake = unsafe { core::ptr::read_volatile(threshold) };
    unsafe {
        *n += bytes;
        if *n >= wake {
            *n = 0;
            return BPF_RB_FORCE_WAKEUP as u64;
        }
    }
    BPF_RB_NO_WAKEUP as u64
}

/// Writes `ev` as a record of `stage` to this CPU's ring shard (full tracing) and/or
/// notes it for the in-kernel histograms (summary mode). `ev.ts_ns` must be set.
#[inline(always)]
pub fn emit(ev: &mut Event, stage: Stage) {
    let (mode, asked, finish) = match filter() {
        Some(f) => (f.mode, f.stages, f.finish),
        None => (MODE_RECORDS, u16::MAX, Stage::RecvSyscall as u8),
    };
    // A stage not asked for (`--stages`) whose hook runs for another stage's sake.
    if asked & (1 << stage as u16) == 0 {
        return;
    }
    if mode & MODE_SUMMARY != 0 {
        crate::summary::update(ev, stage, finish);
    }
    if mode & MODE_RECORDS == 0 {
        return;
    }
    let cpu = unsafe { bpf_get_smp_processor_id() };
    ev.stage = stage as u8;
    ev.cpu = cpu as u16;
    let flags = wake_after(UNWOKEN_RECORD_BYTES, RECORD_BYTES, &WAKEUP_BYTES);
    match ring(cpu).output::<Event>(&*ev, flags) {
        Ok(()) => count(EMITTED + stage as u32),
        Err(_) => count(LOST + stage as u32),
    }
}
