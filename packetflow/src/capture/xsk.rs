//! AF_XDP receive sockets for `capture --bypass`: one per receive queue, each with its own
//! UMEM (the frames), fill and completion rings and an RX ring, in need_wakeup mode. The
//! kernel's XDP program (`pf_cap_xsk`) redirects selected frames to the socket of the queue
//! they came in on; the reader borrows each frame straight from the UMEM
//! ([`Xsk::receive`]) and hands it back to the fill ring once written. No copy and no
//! allocation per frame in userspace.
//!
//! The ring protocol (Documentation/networking/af_xdp.rst): each ring is a power-of-two
//! array shared with the kernel, with a producer and a consumer index. We consume RX (the
//! kernel produces) and produce FILL (the kernel consumes). Indices run freely and are
//! masked on use; the producer publishes with a release store, the consumer reads it with
//! an acquire load.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicU32, Ordering},
};

use packetflow_common::capture::XSK_META_MAGIC;

/// Not in the libc crate's Linux constants.
const AF_XDP: libc::c_int = 44;
/// The largest UMEM frame (one page): the longest packet a socket can take is this less
/// the kernel's XDP headroom.
pub const MAX_CHUNK: u32 = 4096;
/// The kernel's headroom in front of each frame in copy mode (XDP_PACKET_HEADROOM).
pub const HEADROOM: u32 = 256;
/// UMEM bytes per socket: 16,384 frames of 2 KiB (8,192 of 4 KiB for an MTU over
/// 1,774). The fill and RX rings hold every frame, so all can be lent out at once (8 ms
/// of 64-byte frames at 2 Mpps before the reader must hand any back) and the fill ring
/// always has room for what comes back.
const UMEM_BYTES: u32 = 32 << 20;

/// The UMEM frame size for an interface of this MTU: 2 KiB while a frame (Ethernet and
/// a VLAN tag) fits behind the headroom, else 4 KiB.
pub fn chunk_for_mtu(mtu: u32) -> u32 {
    if mtu + 18 <= 2048 - HEADROOM { 2048 } else { MAX_CHUNK }
}
/// The completion ring must exist even for a receive-only socket.
const COMP: u32 = 64;

/// One mmapped ring: `T` is `u64` (fill, completion) or `libc::xdp_desc` (RX).
struct Ring<T> {
    map: *mut libc::c_void,
    map_len: usize,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    flags: *const AtomicU32,
    desc: *mut T,
    mask: u32,
    /// Our copy of the index we own (consumer for RX, producer for fill).
    local: u32,
}

// SAFETY: the ring's memory is owned by this value (unmapped on drop) and used by one
// thread at a time.
unsafe impl<T> Send for Ring<T> {}

impl<T: Copy> Ring<T> {
    /// Maps the ring at `pgoff` of socket `fd`, `size` entries, with the kernel's offsets.
    fn map(fd: BorrowedFd, pgoff: u64, size: u32, off: &libc::xdp_ring_offset) -> io::Result<Ring<T>> {
        let map_len = off.desc as usize + size as usize * size_of::<T>();
        // SAFETY: a fresh shared mapping of the socket's ring; the kernel checks the
        // offset and length against the ring it set up.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                pgoff as libc::off_t,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let at = |o: u64| (map as usize + o as usize) as *const AtomicU32;
        Ok(Ring {
            map,
            map_len,
            producer: at(off.producer),
            consumer: at(off.consumer),
            flags: at(off.flags),
            desc: (map as usize + off.desc as usize) as *mut T,
            mask: size - 1,
            // A fresh ring: both indices start at 0.
            local: 0,
        })
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: inside the mapping for as long as `self` lives.
        unsafe { &*self.producer }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as `producer`.
        unsafe { &*self.consumer }
    }

    fn needs_wakeup(&self) -> bool {
        // SAFETY: as `producer`.
        let flags = unsafe { (*self.flags).load(Ordering::Relaxed) };
        flags & libc::XDP_RING_NEED_WAKEUP != 0
    }

    fn slot(&self, i: u32) -> *mut T {
        // SAFETY: masked into the ring's `mask + 1` entries, all inside the mapping.
        unsafe { self.desc.add((i & self.mask) as usize) }
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// How a socket is bound: the driver's zero-copy, or the kernel copying into the UMEM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    ZeroCopy,
    Copy,
}

/// The socket's loss counters (XDP_STATISTICS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames the kernel dropped for this socket: no fill-ring frame, too long, ...
    pub rx_dropped: u64,
    pub rx_invalid_descs: u64,
    /// Frames dropped because the RX ring was full (the reader fell behind).
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty (the reader had not handed frames back).
    pub fill_ring_empty: u64,
}

impl Stats {
    /// Frames lost between the XDP program and the reader.
    pub fn lost(&self) -> u64 {
        self.rx_dropped + self.rx_ring_full + self.rx_invalid_descs
    }

    pub fn add(&mut self, o: &Stats) {
        self.rx_dropped += o.rx_dropped;
        self.rx_invalid_descs += o.rx_invalid_descs;
        self.rx_ring_full += o.rx_ring_full;
        self.fill_ring_empty += o.fill_ring_empty;
    }
}

/// One AF_XDP socket bound to one receive queue, with its UMEM.
pub struct Xsk {
    fd: OwnedFd,
    pub queue: u32,
    pub mode: Mode,
    umem: *mut u8,
    /// Bytes per frame, and frames.
    chunk: u32,
    frames: u32,
    rx: Ring<libc::xdp_desc>,
    fill: Ring<u64>,
    _comp: Ring<u64>,
}

// SAFETY: the UMEM and rings are owned by the socket value and used by one thread.
unsafe impl Send for Xsk {}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn setsockopt<T>(fd: BorrowedFd, opt: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: `v` is a plain C value of the size passed.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            opt,
            std::ptr::from_ref::<T>(v).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
}

/// `getsockopt` into a zeroed `T`; returns it and the length the kernel wrote.
fn getsockopt<T>(fd: BorrowedFd, opt: libc::c_int) -> io::Result<(T, usize)> {
    // SAFETY: `T` is a plain C struct (all-zero valid); the kernel writes at most `len`.
    unsafe {
        let mut v: T = std::mem::zeroed();
        let mut len = size_of::<T>() as libc::socklen_t;
        check(libc::getsockopt(fd.as_raw_fd(), libc::SOL_XDP, opt, (&raw mut v).cast(), &raw mut len))?;
        Ok((v, len as usize))
    }
}

impl Xsk {
    /// A socket on `ifindex`'s receive queue `queue`, in the calling thread's network
    /// namespace, with UMEM frames of `chunk` bytes (2048 or 4096): zero-copy where the
    /// driver offers it (unless `copy`), else copy mode.
    pub fn open(ifindex: u32, queue: u32, chunk: u32, copy: bool) -> io::Result<Xsk> {
        let frames = UMEM_BYTES / chunk;
        // SAFETY: plain syscalls; the fd is owned at once.
        let fd = unsafe { libc::socket(AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        check(fd)?;
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = UMEM_BYTES as usize;
        // SAFETY: a fresh anonymous mapping, unmapped in Drop.
        let umem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if umem == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let opened = Self::setup(fd.as_fd(), umem.cast(), chunk, ifindex, queue, copy);
        match opened {
            Ok((rx, fill, comp, mode)) => {
                let mut x = Xsk { fd, queue, mode, umem: umem.cast(), chunk, frames, rx, fill, _comp: comp };
                x.lend_all();
                Ok(x)
            }
            Err(e) => {
                // SAFETY: our mapping, not used after this.
                unsafe { libc::munmap(umem, len) };
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn setup(
        fd: BorrowedFd,
        umem: *mut u8,
        chunk: u32,
        ifindex: u32,
        queue: u32,
        copy: bool,
    ) -> io::Result<(Ring<libc::xdp_desc>, Ring<u64>, Ring<u64>, Mode)> {
        let frames = UMEM_BYTES / chunk;
        // SAFETY: all-zero is a valid xdp_umem_reg.
        let mut reg: libc::xdp_umem_reg = unsafe { std::mem::zeroed() };
        reg.addr = umem as u64;
        reg.len = u64::from(UMEM_BYTES);
        reg.chunk_size = chunk;
        setsockopt(fd, libc::XDP_UMEM_REG, &reg)?;
        setsockopt(fd, libc::XDP_UMEM_FILL_RING, &frames)?;
        setsockopt(fd, libc::XDP_UMEM_COMPLETION_RING, &COMP)?;
        setsockopt(fd, libc::XDP_RX_RING, &frames)?;
        let (off, got) = getsockopt::<libc::xdp_mmap_offsets>(fd, libc::XDP_MMAP_OFFSETS)?;
        if got < size_of::<libc::xdp_mmap_offsets>() {
            // Kernels before 5.4: no ring flags, so no need_wakeup.
            return Err(io::Error::new(io::ErrorKind::Unsupported, "AF_XDP without need_wakeup (kernel before 5.4)"));
        }
        let rx = Ring::map(fd, libc::XDP_PGOFF_RX_RING as u64, frames, &off.rx)?;
        let fill = Ring::map(fd, libc::XDP_UMEM_PGOFF_FILL_RING, frames, &off.fr)?;
        let comp = Ring::map(fd, libc::XDP_UMEM_PGOFF_COMPLETION_RING, COMP, &off.cr)?;
        let bind = |flags: u16| {
            let sa = libc::sockaddr_xdp {
                sxdp_family: AF_XDP as u16,
                sxdp_flags: flags | libc::XDP_USE_NEED_WAKEUP,
                sxdp_ifindex: ifindex,
                sxdp_queue_id: queue,
                sxdp_shared_umem_fd: 0,
            };
            // SAFETY: a sockaddr_xdp of the size passed.
            check(unsafe {
                libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), size_of::<libc::sockaddr_xdp>() as libc::socklen_t)
            })
        };
        let mode = if !copy && bind(libc::XDP_ZEROCOPY).is_ok() {
            Mode::ZeroCopy
        } else {
            bind(libc::XDP_COPY)?;
            Mode::Copy
        };
        Ok((rx, fill, comp, mode))
    }

    /// Puts every UMEM frame on the fill ring.
    fn lend_all(&mut self) {
        let p = self.fill.local;
        for i in 0..self.frames {
            // SAFETY: a fill-ring slot we own (the ring is empty and holds every frame).
            unsafe { *self.fill.slot(p + i) = u64::from(i * self.chunk) };
        }
        self.fill.local = p + self.frames;
        self.fill.producer().store(self.fill.local, Ordering::Release);
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Hands each frame waiting on the RX ring (at most `max`) to `f(bytes, kernel time in
    /// monotonic ns if the XDP program left it)`, then gives the frames back to the fill
    /// ring. Returns how many frames it handed on.
    pub fn receive(&mut self, max: u32, mut f: impl FnMut(&[u8], Option<u64>)) -> u32 {
        let ready = self.rx.producer().load(Ordering::Acquire).wrapping_sub(self.rx.local);
        let n = ready.min(max);
        for i in 0..n {
            // SAFETY: a descriptor the kernel published (below the producer index).
            let d = unsafe { *self.rx.slot(self.rx.local + i) };
            let addr = d.addr as usize;
            let chunk = self.chunk as usize;
            let base = addr & !(chunk - 1);
            // The kernel never hands out a frame past the UMEM or across a chunk; should it,
            // the frame is skipped (and its chunk still goes back).
            let base = base.min((self.frames as usize - 1) * chunk);
            if addr + d.len as usize <= base + chunk && addr >= base {
                self.hand_on(addr, base, d.len as usize, &mut f);
            }
            // SAFETY: a fill slot we own: the fill ring holds every frame, and this one is
            // not on it.
            unsafe { *self.fill.slot(self.fill.local + i) = base as u64 };
        }
        if n > 0 {
            self.rx.local = self.rx.local.wrapping_add(n);
            self.rx.consumer().store(self.rx.local, Ordering::Release);
            self.fill.local = self.fill.local.wrapping_add(n);
            self.fill.producer().store(self.fill.local, Ordering::Release);
        }
        if self.fill.needs_wakeup() {
            // need_wakeup: the driver waits for a syscall before it takes fill frames again.
            // SAFETY: a zero-length, non-blocking recvfrom on our socket.
            unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
        }
        n
    }

    /// `f(frame, kernel time)` for the frame at `addr` (`len` bytes) of the chunk at `base`.
    fn hand_on(&self, addr: usize, base: usize, len: usize, f: &mut impl FnMut(&[u8], Option<u64>)) {
        // SAFETY: inside this frame's chunk of our UMEM (checked by the caller), which the
        // kernel wrote before publishing the descriptor and leaves alone until the frame
        // is lent again.
        let bytes = unsafe { std::slice::from_raw_parts(self.umem.add(addr), len) };
        let mut ts = None;
        if addr >= base + 16 {
            // SAFETY: the 16 bytes before the frame, inside its chunk (checked).
            unsafe {
                let magic = self.umem.add(addr - 8);
                if magic.cast::<[u8; 8]>().read() == XSK_META_MAGIC.to_ne_bytes() {
                    // Cleared, so a later frame without metadata in this chunk is not
                    // taken for one with it.
                    magic.cast::<[u8; 8]>().write([0; 8]);
                    ts = Some(u64::from_ne_bytes(self.umem.add(addr - 16).cast::<[u8; 8]>().read()));
                }
            }
        }
        f(bytes, ts);
    }

    /// The socket's loss counters.
    pub fn stats(&self) -> io::Result<Stats> {
        let (s, _) = getsockopt::<libc::xdp_statistics>(self.fd.as_fd(), libc::XDP_STATISTICS)?;
        Ok(Stats {
            rx_dropped: s.rx_dropped,
            rx_invalid_descs: s.rx_invalid_descs,
            rx_ring_full: s.rx_ring_full,
            fill_ring_empty: s.rx_fill_ring_empty_descs,
        })
    }
}

impl Drop for Xsk {
    fn drop(&mut self) {
        // SAFETY: our UMEM mapping; the socket (closed after this, as a field) no longer
        // writes into it once closed, and nothing else refers to it.
        unsafe { libc::munmap(self.umem.cast(), UMEM_BYTES as usize) };
    }
}

/// The MTU of interface `ifname`, in the calling thread's namespace.
pub fn mtu(ifname: &str) -> Option<u32> {
    // SAFETY: SIOCGIFMTU fills the union's `ifru_mtu`.
    crate::platform::interfaces::ifreq(ifname, libc::SIOCGIFMTU, |_| {}).map(|r| unsafe { r.ifr_ifru.ifru_mtu } as u32)
}

/// Receive queues of interface `ifname` (ethtool's channel counts; 1 when the driver does
/// not say), in the calling thread's namespace.
pub fn rx_queues(ifname: &str) -> u32 {
    /// `struct ethtool_channels`.
    #[repr(C)]
    #[derive(Default)]
    struct Channels {
        cmd: u32,
        max_rx: u32,
        max_tx: u32,
        max_other: u32,
        max_combined: u32,
        rx: u32,
        tx: u32,
        other: u32,
        combined: u32,
    }
    const ETHTOOL_GCHANNELS: u32 = 0x3c;
    let mut ch = Channels { cmd: ETHTOOL_GCHANNELS, ..Channels::default() };
    let asked = crate::platform::interfaces::ifreq(ifname, libc::SIOCETHTOOL, |r| {
        r.ifr_ifru.ifru_data = (&raw mut ch).cast();
    });
    if asked.is_none() {
        return 1;
    }
    ch.rx.max(ch.combined).max(1)
}

/// Which interfaces of the calling thread's namespace have AF_XDP zero-copy, as their
/// drivers tell the kernel (`xdp-features`, Linux 6.3+): (ifindex, zero-copy). Err when
/// the kernel has no such family.
pub fn zero_copy_interfaces() -> io::Result<Vec<(u32, bool)>> {
    const NETDEV_XDP_ACT_XSK_ZEROCOPY: u64 = 1 << 3;
    Ok(xdp_features()?.into_iter().map(|(i, f)| (i, f & NETDEV_XDP_ACT_XSK_ZEROCOPY != 0)).collect())
}

/// What each interface's driver says it can do with XDP (`xdp-features` of the netdev
/// generic-netlink family, Linux 6.3+): (ifindex, `NETDEV_XDP_ACT_*` bits).
pub fn xdp_features() -> io::Result<Vec<(u32, u64)>> {
    use crate::kernel::xdp_owner::{NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, attrs, put_attr};
    const NETLINK_GENERIC: libc::c_int = 16;
    const GENL_ID_CTRL: u16 = 0x10;
    const CTRL_CMD_GETFAMILY: u8 = 3;
    const CTRL_ATTR_FAMILY_ID: u16 = 1;
    const CTRL_ATTR_FAMILY_NAME: u16 = 2;
    const NETDEV_CMD_DEV_GET: u8 = 1;
    const NETDEV_A_DEV_IFINDEX: u16 = 1;
    const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_DONE: u16 = 3;

    // SAFETY: socket(2) has no memory preconditions; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_GENERIC) };
    check(fd)?;
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let send = |kind: u16, flags: u16, cmd: u8, body: &[u8]| -> io::Result<()> {
        let mut m = Vec::with_capacity(64);
        m.extend(((16 + 4 + body.len()) as u32).to_ne_bytes());
        m.extend(kind.to_ne_bytes());
        m.extend(flags.to_ne_bytes());
        m.extend([1u8, 0, 0, 0, 0, 0, 0, 0]); // seq 1, pid 0 (the kernel)
        m.extend([cmd, 1, 0, 0]); // genlmsghdr: cmd, version 1
        m.extend(body);
        // SAFETY: send(2) reads `m.len()` bytes of `m`.
        check(unsafe { libc::send(fd.as_raw_fd(), m.as_ptr().cast(), m.len(), 0) } as libc::c_int)
    };
    // Each message of the replies (its payload after the genl header) until DONE or an ACK.
    let mut buf = vec![0u8; 64 << 10];
    let mut replies = |each: &mut dyn FnMut(&[u8])| -> io::Result<()> {
        loop {
            // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            check(n as libc::c_int)?;
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = (u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize).clamp(16, rest.len());
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let payload = &rest[16..len];
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let errno = payload.get(..4).map_or(0, |b| -i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                        return if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(errno)) };
                    }
                    _ => each(payload.get(4..).unwrap_or_default()),
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    };
    let mut name = Vec::new();
    put_attr(&mut name, CTRL_ATTR_FAMILY_NAME, b"netdev\0");
    // With an ACK asked for, the reply is followed by it, which ends `replies`.
    send(GENL_ID_CTRL, NLM_F_REQUEST | NLM_F_ACK, CTRL_CMD_GETFAMILY, &name)?;
    let mut family = None;
    replies(&mut |a| {
        for (t, v) in attrs(a) {
            if t == CTRL_ATTR_FAMILY_ID && v.len() >= 2 {
                family = Some(u16::from_ne_bytes([v[0], v[1]]));
            }
        }
    })?;
    let family = family.ok_or_else(|| io::Error::other("no netdev family id in the reply"))?;
    send(family, NLM_F_REQUEST | NLM_F_DUMP, NETDEV_CMD_DEV_GET, &[])?;
    let mut out = Vec::new();
    replies(&mut |a| {
        let (mut ifindex, mut features) = (0u32, 0u64);
        for (t, v) in attrs(a) {
            match t {
                NETDEV_A_DEV_IFINDEX if v.len() >= 4 => ifindex = u32::from_ne_bytes(v[..4].try_into().expect("4")),
                NETDEV_A_DEV_XDP_FEATURES if v.len() >= 8 => {
                    features = u64::from_ne_bytes(v[..8].try_into().expect("8"));
                }
                _ => {}
            }
        }
        out.push((ifindex, features));
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_mtus_get_2k_frames() {
        assert_eq!(chunk_for_mtu(1500), 2048);
        assert_eq!(chunk_for_mtu(1774), 2048);
        assert_eq!(chunk_for_mtu(1775), 4096);
        assert_eq!(chunk_for_mtu(9000), 4096);
    }

    #[test]
    fn stats_lost_counts_every_drop_kind() {
        let s = Stats { rx_dropped: 1, rx_invalid_descs: 2, rx_ring_full: 4, fill_ring_empty: 8 };
        assert_eq!(s.lost(), 7);
        let mut t = Stats::default();
        t.add(&s);
        t.add(&s);
        assert_eq!(t.fill_ring_empty, 16);
    }
}
