//! Summary mode: stage times gathered per packet in the kernel and, when the packet
//! reaches its last asked stage (`recv_syscall` by default), turned into per-stage
//! latency histograms (no ring records). Userspace reads and merges the per-CPU
//! histograms once a second.
//!
//! A packet is keyed by its flow and the end of its bytes (TCP) or its payload key (UDP):
//! every hook can compute that. Its stage times live in a direct-mapped table (an array
//! indexed by the key's hash): finding a packet is an inlined array access, where a hash
//! map took a helper call per hook and an LRU insert per packet, which made summary mode
//! dearer than full tracing. A packet whose slot another packet takes (a hash collision;
//! or one that never reaches its last stage: received on another host, dropped) is counted
//! in SUMMARY_EVICTED and left out. Slots are not locked: two packets colliding at the
//! same instant on two CPUs could mix their times, and `add_up` drops any time that runs
//! backwards.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use packetflow_common::{
    Event, Stage,
    counters::SUMMARY_EVICTED,
    drop::{DROP_REASON_SLOTS, DROP_STAGE_SLOTS, RETRANS_PORTS},
    event::{F_END, F_LOOPBACK},
    summary::{
        E2E_SLOT, HIST_BUCKETS, HIST_SLOTS, PATH_LOOPBACK, PKT_SLOTS, PktKey, PktSlot, SLOTS_PER_PATH, SUMMARY_ORDER,
        SUMMARY_STAGES, bucket,
    },
};

use crate::maps::count;

#[map]
static PKT_STATE: Array<PktSlot> = Array::with_max_entries(PKT_SLOTS, 0);

#[map]
static HIST: PerCpuArray<[u64; HIST_BUCKETS]> = PerCpuArray::with_max_entries(HIST_SLOTS, 0);

/// Summary mode's drops: per reason (at most `DROP_REASON_SLOTS - 1`, larger ones in the
/// last slot) and the last stage the packet reached (`DROP_STAGE_SLOTS - 1`: none known).
#[map]
static DROP_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_REASON_SLOTS * DROP_STAGE_SLOTS, 0);

/// A hash of one endpoint.
#[inline(always)]
pub fn endpoint_hash(addr: &[u8; 16], port: u16) -> u64 {
    let w = addr.as_ptr().cast::<u32>();
    // Both callers pass 8-byte aligned arrays of an Event.
    let (a, b, c, d) = unsafe { (*w as u64, *w.add(1) as u64, *w.add(2) as u64, *w.add(3) as u64) };
    let mut h = (a ^ (b << 32) ^ c.rotate_left(17) ^ (d << 7) ^ port as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 29;
    h.wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

#[inline(always)]
fn key(ev: &Event) -> PktKey {
    let src = endpoint_hash(&ev.saddr, ev.sport);
    let dst = endpoint_hash(&ev.daddr, ev.dport);
    // Direction matters: the response's packets are other packets.
    let flow = src.rotate_left(1) ^ dst ^ ev.is_udp() as u64;
    let end = if ev.is_udp() {
        ev.seq ^ ev.len.rotate_left(16)
    } else if ev.flags & F_END != 0 {
        ev.seq
    } else {
        ev.seq.wrapping_add(ev.len)
    };
    PktKey { flow, end, _pad: 0 }
}

/// The slot a packet's times live in.
#[inline(always)]
fn slot_of(k: &PktKey) -> Option<*mut PktSlot> {
    let h = (k.flow ^ (k.end as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    PKT_STATE.get_ptr_mut((h >> 40) as u32 & (PKT_SLOTS - 1))
}

/// Summary mode's retransmits by the flow's lower port (userspace: `Tracer::kernel_drops`).
#[map]
static RETRANS_COUNTS: HashMap<u32, u64> = HashMap::with_max_entries(RETRANS_PORTS, 0);

/// Counts a retransmitted segment of flow `ev` (port 0: a port beyond `RETRANS_PORTS`).
#[inline(always)]
pub fn retransmitted(ev: &Event) {
    let port = u32::from(if ev.sport < ev.dport { ev.sport } else { ev.dport });
    let key = if RETRANS_COUNTS.get_ptr_mut(&port).is_some()
        || RETRANS_COUNTS.insert(&port, &0, u64::from(BPF_NOEXIST)).is_ok()
    {
        port
    } else {
        // Full, or another CPU added the port just now (then it is there for the next).
        if RETRANS_COUNTS.get_ptr_mut(&0).is_none() {
            let _ = RETRANS_COUNTS.insert(&0, &0, u64::from(BPF_NOEXIST));
        }
        0
    };
    if let Some(n) = RETRANS_COUNTS.get_ptr_mut(&key) {
        // Several CPUs retransmit on one port at once: the BPF atomic add.
        unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(n, 1) };
    }
}

/// Counts a drop of `ev`'s packet by `reason` and the last stage it reached (from its
/// slot, which it leaves: a dropped packet is not counted as evicted later).
#[inline(always)]
pub fn dropped(ev: &Event, reason: u32) {
    let k = key(ev);
    let mut last = DROP_STAGE_SLOTS - 1;
    if let Some(slot) = slot_of(&k) {
        let slot = unsafe { &mut *slot };
        if slot.key == k {
            let mut best = 0u64;
            for i in 0..SUMMARY_STAGES {
                if slot.ts[i] > best {
                    best = slot.ts[i];
                    last = i as u32;
                }
            }
            slot.key.flow = 0;
        }
    }
    let r = if reason < DROP_REASON_SLOTS { reason } else { DROP_REASON_SLOTS - 1 };
    if let Some(n) = DROP_COUNTS.get_ptr_mut(r * DROP_STAGE_SLOTS + last) {
        unsafe { *n += 1 };
    }
}

/// Notes `ev` at `stage` for its packet; at stage `finish` (the last asked stage in
/// kernel order: `recv_syscall` unless `--stages` leaves it out) the packet is added up.
#[inline(always)]
pub fn update(ev: &Event, stage: Stage, finish: u8) {
    let k = key(ev);
    let Some(slot) = slot_of(&k) else { return };
    let slot = unsafe { &mut *slot };
    if slot.key != k {
        // Empty, or another packet's: this packet starts here.
        if slot.key.flow != 0 {
            count(SUMMARY_EVICTED);
        }
        slot.key = k;
        slot.ts = [0; SUMMARY_STAGES];
        slot.flags = 0;
    }
    let i = stage as usize;
    if i < SUMMARY_STAGES {
        slot.ts[i] = ev.ts_ns;
    }
    if ev.flags & F_LOOPBACK != 0 {
        slot.flags |= PATH_LOOPBACK;
    }
    if stage as u8 == finish {
        add_up(slot);
        slot.key.flow = 0;
    }
}

#[inline(always)]
fn add(slot: u32, v: u64) {
    if let Some(h) = HIST.get_ptr_mut(slot) {
        // Through a volatile read, so the compiler keeps the bounds check below in a form
        // the verifier sees (it would otherwise fold it into `bucket`'s own clamp).
        let b = bucket(v);
        let b = unsafe { core::ptr::read_volatile(&b) };
        if b < HIST_BUCKETS {
            unsafe { (*h)[b] += 1 };
        }
    }
}

/// Stage deltas in the order the kernel passes the stages (generic XDP, seen after
/// netif_receive, and UDP's ip_send, seen before sock_send, are taken in the order they
/// happened), as the full tracer computes them.
#[inline(never)]
fn add_up(st: &PktSlot) {
    let path = if st.flags & PATH_LOOPBACK != 0 { 0 } else { 1 };
    let base = path * SLOTS_PER_PATH;
    // The order to walk: kernel order, with the two pairs whose order depends on the
    // packet swapped up front (branching inside the loop multiplies the verifier's work).
    let mut order = [0u8; SUMMARY_ORDER.len()];
    for (i, s) in SUMMARY_ORDER.iter().enumerate() {
        order[i] = *s as u8;
    }
    let ts = |s: Stage| st.ts[s as usize];
    const XDP: usize = Stage::Xdp.kernel_pos();
    const NETIF: usize = Stage::NetifReceive.kernel_pos();
    const IP_SEND: usize = Stage::IpSend.kernel_pos();
    const SOCK_SEND: usize = Stage::SockSend.kernel_pos();
    if ts(Stage::Xdp) > ts(Stage::NetifReceive) && ts(Stage::NetifReceive) != 0 {
        order.swap(XDP, NETIF);
    }
    if ts(Stage::IpSend) < ts(Stage::SockSend) && ts(Stage::IpSend) != 0 {
        order.swap(IP_SEND, SOCK_SEND);
    }
    let mut prev = 0u64;
    let mut first = 0u64;
    for k in 0..order.len() {
        let s = order[k] as usize;
        let t = st.ts.get(s).copied().unwrap_or(0);
        if t == 0 || t < prev {
            continue;
        }
        if prev != 0 {
            add(base + s as u32, t - prev);
        } else {
            first = t;
        }
        prev = t;
    }
    let send = st.ts[Stage::SendSyscall as usize];
    let recv = st.ts[Stage::RecvSyscall as usize];
    let e2e = if send != 0 && recv >= send { recv - send } else { prev - first };
    add(base + E2E_SLOT, e2e);
}
