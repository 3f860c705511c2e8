//! Drop and retransmission records (issue 18, docs/drops.md).
//!
//! A drop is written as one 128-byte ring record, [`DropRecord`]: an [`Event`] with stage
//! [`DROP_STAGE`] that names the packet like a device stage does (the flow, `seq`/`len`
//! as at `dev_queue`, the kind in `flags`; `aux` the ifindex of `skb->dev`, 0 when the
//! skb had none yet; `aux2` that device's namespace inode), then where and why the kernel
//! freed it. The reader hands the pair on as two `Event`s (`DropRecord::detail`), so the
//! batches stay a list of `Event`s.
//!
//! A retransmission is a plain `Event` with stage [`RETRANS_STAGE`]: the flow from the
//! socket, `seq`/`len` the segment's bytes (from its `tcp_skb_cb`), `aux` the kernel's
//! return value of the retransmission (0: sent).

use crate::{Event, assert_size};

/// Stage number of a drop record (never a `Stage`, never a `ConnStage`).
pub const DROP_STAGE: u8 = 48;
/// Stage number of the second half of a drop, as the reader passes it on.
pub const DROP_DETAIL_STAGE: u8 = 49;
/// Stage number of a retransmission record.
pub const RETRANS_STAGE: u8 = 50;

/// Drop reasons counted per reason in summary mode (a larger one, such as a subsystem's
/// reason with its id in the upper 16 bits, is counted in the last slot).
pub const DROP_REASON_SLOTS: u32 = 256;
/// Per reason: one slot per stage (the last one the packet reached), then "none".
pub const DROP_STAGE_SLOTS: u32 = crate::NUM_STAGES as u32 + 1;

/// Summary mode's retransmits: ports counted apart at most (`RETRANS_COUNTS`, keyed by
/// the flow's lower port; the rest, and any that lost a race for a new entry, under 0).
pub const RETRANS_PORTS: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DropRecord {
    pub ev: Event,
    /// The kernel address that freed the skb (the tracepoint's `location`).
    pub location: u64,
    /// `enum skb_drop_reason` (names from the kernel's BTF).
    pub reason: u32,
    pub _pad: [u32; 13],
}
assert_size!(DropRecord, 128);

impl DropRecord {
    /// The second half as an `Event`: `ts_ns` holds the location, `seq` the reason.
    pub const fn detail(&self) -> Event {
        Event { ts_ns: self.location, seq: self.reason, stage: DROP_DETAIL_STAGE, ..Event::ZERO }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), integer fields only, padding written out as fields (size pinned by
// assert_size!): no uninitialised byte, and every bit pattern is a valid value.
unsafe impl aya::Pod for DropRecord {}
