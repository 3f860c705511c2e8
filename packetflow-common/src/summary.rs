//! Summary mode: per-stage latency histograms kept in the kernel.
//!
//! Log-linear buckets: values below 64 ns each have a bucket; above, every power of two is
//! split into 32 buckets, so a bucket is at most 1/32 (3.1%) of its value wide and its
//! midpoint is within 1.6% of anything in it. 1184 buckets reach 2^41 ns (about 37 min).

use crate::{NUM_STAGES, assert_size};

pub const LINEAR: u64 = 64;
pub const SUB_BITS: u32 = 5;
pub const HIST_BUCKETS: usize = 1184;

/// Histogram slots per path: one per stage, then end-to-end.
pub const SLOTS_PER_PATH: u32 = NUM_STAGES as u32 + 1;
pub const E2E_SLOT: u32 = NUM_STAGES as u32;
/// Slot index = path * SLOTS_PER_PATH + stage; path 0 loopback, 1 nic.
pub const HIST_SLOTS: u32 = 2 * SLOTS_PER_PATH;

/// The bucket of a value in ns.
#[inline(always)]
pub fn bucket(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    if v >> (6 + (HIST_BUCKETS as u64 - LINEAR) / (1 << SUB_BITS)) != 0 {
        return HIST_BUCKETS - 1;
    }
    let octave = octave(v) as u32; // >= 6
    let sub = (v >> (octave - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    LINEAR as usize + ((octave - 6) as usize) * (1 << SUB_BITS) + sub as usize
}

/// floor(log2(v)) for 0 < v < 2^63, without branches or a count-leading-zeros
/// instruction: BPF has none, and LLVM's stand-in (smear the bits, then count them) took
/// about 40 instructions per value, 13 values per packet in summary mode. A binary search
/// whose compares are subtractions: `(C - x) >> 63` is 1 exactly when x > C.
#[inline(always)]
pub fn octave(v: u64) -> u64 {
    let mut x = v;
    let mut o = 0;
    let mut step = |c: u64, bits: u32| {
        let s = (c.wrapping_sub(x) >> 63) << bits;
        x >>= s;
        o |= s;
    };
    step(0xFFFF_FFFF, 5);
    step(0xFFFF, 4);
    step(0xFF, 3);
    step(0xF, 2);
    step(0x3, 1);
    o | (x >> 1)
}

/// The values a bucket holds: [low, high).
pub fn bucket_range(i: usize) -> (u64, u64) {
    if (i as u64) < LINEAR {
        return (i as u64, i as u64 + 1);
    }
    let k = i - LINEAR as usize;
    let octave = 6 + (k >> SUB_BITS) as u32;
    let sub = (k & ((1 << SUB_BITS) - 1)) as u64;
    let width = 1u64 << (octave - SUB_BITS);
    let low = (1u64 << octave) + sub * width;
    (low, low + width)
}

/// The stages summary mode times (by number: every stage before `woken`). The receive
/// wait split (`woken`, `on_cpu`) is full tracing's only: walking two more stages per
/// packet took the receive-syscall program past the verifier's million instructions.
pub const SUMMARY_STAGES: usize = crate::Stage::Woken as usize;

/// The order summary mode walks: kernel order without the stages it does not time.
pub const SUMMARY_ORDER: [crate::Stage; SUMMARY_STAGES] = {
    let mut out = [crate::Stage::SendSyscall; SUMMARY_STAGES];
    let mut i = 0;
    let mut j = 0;
    while i < crate::Stage::KERNEL_ORDER.len() {
        let s = crate::Stage::KERNEL_ORDER[i];
        if (s as usize) < SUMMARY_STAGES {
            out[j] = s;
            j += 1;
        }
        i += 1;
    }
    out
};

/// Per-packet state while a packet crosses the stages (summary mode): stage times,
/// keyed by the flow and the end of the packet's bytes (TCP) or its payload key (UDP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PktKey {
    pub flow: u64,
    pub end: u32,
    pub _pad: u32,
}
assert_size!(PktKey, 16);

/// One slot of the direct-mapped table of packets in flight: the packet it holds and
/// when that packet passed each stage.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PktSlot {
    pub key: PktKey,
    pub ts: [u64; SUMMARY_STAGES],
    /// `PATH_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
assert_size!(PktSlot, 136);

/// Slots in that table (a power of two): far more than the packets in flight at once, and
/// few enough (4096 x 136 B = 544 KiB) to stay in a CPU's cache: at 32768 slots (4.4 MB)
/// the first hook of every packet missed it (tcp_sendmsg 298 -> 211 ns per run here).
pub const PKT_SLOTS: u32 = 1 << 12;

pub const PATH_LOOPBACK: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_and_are_narrow() {
        for v in [0u64, 1, 63, 64, 65, 100, 1000, 12_345, 1 << 20, 987_654_321, 1 << 40] {
            let (lo, hi) = bucket_range(bucket(v));
            assert!(lo <= v && v < hi, "{v} not in [{lo}, {hi})");
            assert!((hi - lo) as f64 <= (lo as f64 / 32.0).max(1.0), "{v}: bucket too wide");
        }
        assert_eq!(bucket(u64::MAX), HIST_BUCKETS - 1);
        assert_eq!(bucket((1 << 41) - 1), HIST_BUCKETS - 1);
        assert_eq!(bucket(1 << 41), HIST_BUCKETS - 1);
        let mut prev = 0;
        for i in 0..HIST_BUCKETS {
            let (lo, hi) = bucket_range(i);
            assert_eq!(lo, prev, "buckets are contiguous at {i}");
            prev = hi;
        }
    }

    #[test]
    fn octave_is_floor_log2() {
        let mut v = 1u64;
        while v < 1 << 62 {
            for x in [v, v + 1, v * 2 - 1, v + v / 3] {
                assert_eq!(octave(x), 63 - u64::from(x.leading_zeros()), "{x}");
            }
            v *= 2;
        }
    }
}
