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
    let octave = 63 - v.leading_zeros(); // >= 6
    let sub = (v >> (octave - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    let i = LINEAR as usize + ((octave - 6) as usize) * (1 << SUB_BITS) + sub as usize;
    if i < HIST_BUCKETS { i } else { HIST_BUCKETS - 1 }
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
    pub ts: [u64; 14],
    /// `PATH_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
assert_size!(PktSlot, 136);

/// Slots in that table (a power of two): far more than the packets in flight at once.
pub const PKT_SLOTS: u32 = 1 << 15;

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
        let mut prev = 0;
        for i in 0..HIST_BUCKETS {
            let (lo, hi) = bucket_range(i);
            assert_eq!(lo, prev, "buckets are contiguous at {i}");
            prev = hi;
        }
    }
}
