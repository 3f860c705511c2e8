//! Every map and global the programs share.

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use packetflow_common::{Event, Filter, Offsets, RecvSlot, SendSlot, counters::NUM_COUNTERS};

/// Kernel struct offsets, written by the loader before the programs are verified
/// (a frozen global: the verifier sees the values, and code for absent fields is pruned).
#[unsafe(no_mangle)]
pub static OFFSETS: Offsets = Offsets::UNSET;

/// Bytes of unread data in a ring shard above which a write wakes the reader; below it
/// the reader finds the records on its periodic poll (batched wakeups).
#[unsafe(no_mangle)]
pub static WAKEUP_BYTES: u64 = 1 << 20;

/// The same for the capture shards (`CR*`), which are sized on their own.
#[unsafe(no_mangle)]
pub static CAP_WAKEUP_BYTES: u64 = 1 << 20;

/// Non-zero when the loader asks for idle programs: every tracer entry point returns at
/// once, so the hooks are attached but do nothing (`cargo xtask bench` measures what the
/// attachment alone costs). Frozen like `OFFSETS`: in normal runs the verifier prunes the
/// check away.
#[unsafe(no_mangle)]
pub static IDLE: u8 = 0;

#[inline(always)]
pub fn idle() -> bool {
    unsafe { core::ptr::read_volatile(&IDLE) != 0 }
}

#[map]
pub static FILTER: Array<Filter> = Array::with_max_entries(1, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

/// Adds one to this CPU's counter `idx` (`packetflow_common::counters`).
#[inline(always)]
pub fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: a per-CPU slot, written only by this CPU with preemption off (BPF
        // programs do not migrate), so no other writer races this add.
        unsafe { *p += 1 };
    }
}

#[map]
pub static SEND_SLOT: PerCpuArray<SendSlot> = PerCpuArray::with_max_entries(1, 0);

/// Possible CPUs (set by the loader): how many `SEND_SLOT`s a search for a thread's note
/// looks at (at most `MAX_SLOT_SEARCH`).
#[unsafe(no_mangle)]
pub static NR_CPUS: u32 = 1;
pub const MAX_SLOT_SEARCH: u32 = 64;

/// Thread `tid`'s send-syscall note on whichever CPU holds it (the newest, if several):
/// for a thread that moved CPUs between its syscall's entry and the transport hook (it
/// slept on the socket lock, say). Null when no CPU holds one.
#[inline(always)]
pub fn send_slot_of(tid: u32) -> *mut SendSlot {
    let n = unsafe { core::ptr::read_volatile(&NR_CPUS) };
    let key = 0u32;
    let mut best: *mut SendSlot = core::ptr::null_mut();
    let mut best_ts = 0u64;
    for cpu in 0..MAX_SLOT_SEARCH {
        if cpu >= n {
            break;
        }
        let p = unsafe {
            aya_ebpf::helpers::generated::bpf_map_lookup_percpu_elem(
                &SEND_SLOT as *const _ as *mut core::ffi::c_void,
                &key as *const u32 as *const core::ffi::c_void,
                cpu,
            )
        } as *mut SendSlot;
        if p.is_null() {
            continue;
        }
        let (t, ts) = unsafe { ((*p).tid, (*p).ts_ns) };
        if t == tid && ts > best_ts {
            best = p;
            best_ts = ts;
        }
    }
    best
}

#[map]
pub static RECV_SLOT: PerCpuArray<RecvSlot> = PerCpuArray::with_max_entries(1, 0);

/// The UDP datagram cgroup_skb ingress just handed to a socket on this CPU, for the
/// `sk_data_ready` that follows it in the same softirq.
#[map]
pub static UDP_RX_SLOT: PerCpuArray<Event> = PerCpuArray::with_max_entries(1, 0);

// Ring-buffer shards: a record goes to shard `cpu % 8`. The loader sizes the shards that
// some CPU uses and shrinks the others to one page.
#[map]
pub static RB0: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map]
pub static RB1: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map]
pub static RB2: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map]
pub static RB3: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map]
pub static RB4: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map]
pub static RB5: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map]
pub static RB6: RingBuf = RingBuf::with_byte_size(1 << 22, 0);
#[map]
pub static RB7: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

// Capture records (header + packet bytes) have their own shards: CR0..CR7.
#[map]
pub static CR0: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
pub static CR1: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
pub static CR2: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
pub static CR3: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
pub static CR4: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
pub static CR5: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
pub static CR6: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
pub static CR7: RingBuf = RingBuf::with_byte_size(4096, 0);

#[inline(always)]
pub fn cap_ring(cpu: u32) -> &'static RingBuf {
    match cpu & 7 {
        0 => &CR0,
        1 => &CR1,
        2 => &CR2,
        3 => &CR3,
        4 => &CR4,
        5 => &CR5,
        6 => &CR6,
        _ => &CR7,
    }
}

#[inline(always)]
pub fn ring(cpu: u32) -> &'static RingBuf {
    match cpu & 7 {
        0 => &RB0,
        1 => &RB1,
        2 => &RB2,
        3 => &RB3,
        4 => &RB4,
        5 => &RB5,
        6 => &RB6,
        _ => &RB7,
    }
}

/// The filter, once userspace has enabled it.
#[inline(always)]
pub fn filter() -> Option<&'static Filter> {
    let f = FILTER.get(0)?;
    if f.enabled == 0 { None } else { Some(f) }
}

/// One field of the frozen `OFFSETS` global.
macro_rules! off {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(&$crate::maps::OFFSETS.$field) }
    };
}
pub(crate) use off;
