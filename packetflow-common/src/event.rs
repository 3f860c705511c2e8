//! The one record every tracing hook writes into the ring buffers.

use crate::assert_size;

/// One packet (or byte range of a stream) seen at one stage. Exactly 64 bytes.
///
/// Addresses and ports are oriented in the packet's direction (`src` is the sender), also
/// at hooks that only see a socket. IPv4 addresses sit in the first four bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the hook ran; for `send_syscall`, when the
    /// syscall was entered.
    pub ts_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    /// TCP: sequence number of the first payload byte (of the end, with [`F_END`]).
    /// UDP: a key derived from the payload bytes, stable from send to receive.
    pub seq: u32,
    /// Payload bytes covered.
    pub len: u32,
    /// A [`crate::Stage`] number.
    pub stage: u8,
    /// `F_*` bits plus the [`Kind`] in bits 4..7.
    pub flags: u8,
    pub cpu: u16,
    /// Device stages: ifindex. Process stages: tgid (pid).
    pub aux: u32,
    /// Device stages: network namespace inode (0 when the hook cannot tell).
    /// Process stages: tid.
    pub aux2: u32,
}
assert_size!(Event, 64);

pub const F_V6: u8 = 1;
pub const F_UDP: u8 = 2;
/// The device is a loopback device.
pub const F_LOOPBACK: u8 = 4;
/// `seq` is the end of the covered range (one past its last byte); `len` is meaningless.
pub const F_END: u8 = 8;
pub const KIND_SHIFT: u8 = 4;
/// `sock_queue`: no thread was blocked in a receive call on the socket when the data was
/// queued (so no `woken`/`on_cpu` follow). Above the 3 bits of the kind.
pub const F_NO_WAITER: u8 = 0x80;

/// What a TCP segment carries. Only `Data` is traced by default; the others are counted.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Data = 0,
    Ack = 1,
    Syn = 2,
    Fin = 3,
    Rst = 4,
    /// SYN with ACK: the server's half of the handshake.
    SynAck = 5,
}

impl Kind {
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Data => "data",
            Kind::Ack => "ack",
            Kind::Syn => "syn",
            Kind::Fin => "fin",
            Kind::Rst => "rst",
            Kind::SynAck => "synack",
        }
    }
    pub const fn from_u8(v: u8) -> Kind {
        match v {
            1 => Kind::Ack,
            2 => Kind::Syn,
            3 => Kind::Fin,
            4 => Kind::Rst,
            5 => Kind::SynAck,
            _ => Kind::Data,
        }
    }
}

impl Event {
    pub const ZERO: Event = Event {
        ts_ns: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        seq: 0,
        len: 0,
        stage: 0,
        flags: 0,
        cpu: 0,
        aux: 0,
        aux2: 0,
    };

    pub const fn kind(&self) -> Kind {
        Kind::from_u8((self.flags >> KIND_SHIFT) & 7)
    }
    pub const fn is_v6(&self) -> bool {
        self.flags & F_V6 != 0
    }
    pub const fn is_udp(&self) -> bool {
        self.flags & F_UDP != 0
    }
}

/// Per-CPU note left by `sys_enter_{write,sendto,...}` for the transport hook that follows
/// in the same syscall: which thread entered, when, and whether its `send_syscall` record
/// has been written yet.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SendSlot {
    pub tid: u32,
    pub emitted: u32,
    pub ts_ns: u64,
    /// The sender's process (for hooks that cannot ask, e.g. cgroup_skb before 6.?).
    pub tgid: u32,
    /// Not zero: the sender meets the process filter (decided at the syscall, where the
    /// helpers that read the task's name and cgroup are allowed; cgroup_skb reads it).
    pub claims: u32,
}
assert_size!(SendSlot, 24);

/// Per-CPU note left by `copy_to_user` for the `sys_exit_{read,recvfrom,...}` that follows:
/// the thread and the range it was handed so far.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecvSlot {
    pub tid: u32,
    /// 1: `ev` is a UDP `copy_to_user` record still to be written at syscall exit, once
    /// the kernel has copied the datagram's source address to `name`.
    pub pending_copy: u32,
    /// User address of the caller's source-address buffer (0 when none).
    pub name: u64,
    pub ev: Event,
}
assert_size!(RecvSlot, 80);

/// How a receive call hands over its buffer (from the syscall's registers).
pub const RECV_BUF: u32 = 0;
pub const RECV_IOV: u32 = 1;
pub const RECV_MSG: u32 = 2;

/// The UDP datagram key: FNV-1a over the first `n` (at most 16) payload bytes. The
/// kernel computes it from packets and from the receiver's buffer; they must agree.
#[inline(always)]
pub fn payload_key(b: &[u8; 16], n: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < 16 {
        if (i as u32) < n {
            h = (h ^ u32::from(b[i])).wrapping_mul(0x0100_0193);
        }
        i += 1;
    }
    h
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, padding written out as fields (size pinned by
    // assert_size!): no uninitialised byte, and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: repr(C), integer fields only, padding written out as fields (size pinned by
    // assert_size!): no uninitialised byte, and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::SendSlot {}
    // SAFETY: repr(C), integer fields only, padding written out as fields (size pinned by
    // assert_size!): no uninitialised byte, and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::RecvSlot {}
}
