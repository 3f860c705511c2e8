//! Reading kernel structs (`sk_buff`, `net_device`, `sock`) through the offsets userspace
//! found in the running kernel's BTF.

use aya_ebpf::helpers::generated::{bpf_probe_read_kernel, bpf_probe_read_user};
use packetflow_common::{
    Event, Kind, Offsets,
    counters::READ_FAILED,
    event::{F_LOOPBACK, F_UDP, F_V6, KIND_SHIFT},
};

use crate::{
    maps::{count, off},
    parse::{IPPROTO_TCP, IPPROTO_UDP, Source, Unparsed, parse_l3},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IFF_LOOPBACK: u32 = 8;

/// How a program may read the kernel structs it was handed.
pub trait Kmem {
    /// `true` where the pointers are BTF-typed: tp_btf arguments and the struct pointers
    /// loaded through them. A plain load through such a pointer is checked against the
    /// kernel's BTF by the verifier and made fault-safe (PROBE_MEM): no helper call. Only
    /// fields inside the pointer's own struct type qualify (not `tcp_sock` fields of a
    /// `struct sock *`), and packet bytes never do (`head`/`data` are not struct pointers).
    /// `false` (kprobe arguments are plain numbers): `bpf_probe_read_kernel`.
    const TYPED: bool;
}

/// tp_btf arguments.
pub struct Typed;
impl Kmem for Typed {
    const TYPED: bool = true;
}

/// kprobe arguments, and fields the verifier cannot type.
pub struct Untyped;
impl Kmem for Untyped {
    const TYPED: bool = false;
}

/// Reads a `T` at `base + off`. Fails when the field is missing on this kernel or `base` is
/// null; an untyped read also fails (and counts) when the memory cannot be read.
#[inline(always)]
pub fn read<M: Kmem, T: Copy>(base: u64, off: u32) -> Result<T, ()> {
    if off == Offsets::MISSING || base == 0 {
        return Err(());
    }
    if M::TYPED {
        // Volatile: one load of exactly this field, never merged with a neighbour's (the
        // verifier allows a load only within one member).
        return Ok(unsafe { core::ptr::read_volatile((base + off as u64) as *const T) });
    }
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    let r = unsafe {
        bpf_probe_read_kernel(v.as_mut_ptr().cast(), core::mem::size_of::<T>() as u32, (base + off as u64) as *const _)
    };
    if r != 0 {
        count(READ_FAILED);
        return Err(());
    }
    Ok(unsafe { v.assume_init() })
}

/// Several fields of one struct. Untyped: read with one helper call, `N` bytes from the
/// lowest of their offsets (a field outside the window, on a kernel with another layout,
/// is read alone). Typed: each field is its own plain load, and the window stays unused.
pub struct Window<M: Kmem, const N: usize> {
    base: u64,
    lo: u32,
    buf: [u8; N],
    _m: core::marker::PhantomData<M>,
}

impl<M: Kmem, const N: usize> Window<M, N> {
    /// Reads the window covering `offs` of the struct at `base`. Filled in place (not
    /// returned by value): a copy of the buffer would double its stack use, and older
    /// verifiers (6.1) cap a call chain's stack at 512 bytes.
    #[inline(always)]
    pub fn read_into(&mut self, base: u64, offs: &[u32]) -> Result<(), ()> {
        if base == 0 {
            return Err(());
        }
        self.base = base;
        if M::TYPED {
            return Ok(());
        }
        let mut lo = u32::MAX;
        for &o in offs {
            if o != Offsets::MISSING && o < lo {
                lo = o;
            }
        }
        self.lo = lo;
        if lo == u32::MAX {
            return Ok(());
        }
        let r =
            unsafe { bpf_probe_read_kernel(self.buf.as_mut_ptr().cast(), N as u32, (base + lo as u64) as *const _) };
        if r != 0 {
            count(READ_FAILED);
            return Err(());
        }
        Ok(())
    }

    #[inline(always)]
    pub const fn new() -> Self {
        Window { base: 0, lo: u32::MAX, buf: [0; N], _m: core::marker::PhantomData }
    }

    #[inline(always)]
    pub fn get<T: Copy>(&self, off: u32) -> Result<T, ()> {
        if off == Offsets::MISSING {
            return Err(());
        }
        if !M::TYPED {
            let size = core::mem::size_of::<T>();
            let i = off.wrapping_sub(self.lo) as usize;
            if off >= self.lo
                && let Some(b) = self.buf.get(i..i + size)
            {
                return Ok(unsafe { core::ptr::read_unaligned(b.as_ptr().cast::<T>()) });
            }
        }
        read::<M, T>(self.base, off)
    }
}

/// Packet bytes of a kernel `sk_buff`, from its IP header on.
pub struct SkbSource {
    l3: u64,
    l3_len: u32,
}

impl Source for SkbSource {
    #[inline(always)]
    fn read(&self, off: u32, buf: &mut [u8]) -> Result<(), Unparsed> {
        if off as u64 + buf.len() as u64 > self.l3_len as u64 {
            return Err(Unparsed::Malformed);
        }
        let r = unsafe {
            bpf_probe_read_kernel(buf.as_mut_ptr().cast(), buf.len() as u32, (self.l3 + off as u64) as *const _)
        };
        if r != 0 { Err(Unparsed::Malformed) } else { Ok(()) }
    }
    #[inline(always)]
    fn l3_len(&self) -> u32 {
        self.l3_len
    }
}

/// Where a hook finds the IP header of its `sk_buff`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L3At {
    /// `head + network_header`: set on transmit and after IP receive.
    NetworkHeader,
    /// `data`: on receive before the stack resets the network header.
    Data,
}

/// Parses the packet in kernel `sk_buff` `skb` into `ev`.
#[inline(always)]
pub fn parse_skb<M: Kmem>(skb: u64, at: L3At, ev: &mut Event) -> Result<(), Unparsed> {
    let mut l3 = (0u64, 0u32);
    skb_l3::<M>(skb, at, &mut l3)?;
    let src = SkbSource { l3: l3.0, l3_len: l3.1 };
    parse_l3(&src, ev)
}

/// Where the IP header of `skb` starts and how many bytes follow it. Its own function
/// (a BPF-to-BPF call): the window it reads lives in its own stack frame.
#[inline(never)]
fn skb_l3<M: Kmem>(skb: u64, at: L3At, out: &mut (u64, u32)) -> Result<(), Unparsed> {
    let mut w = Window::<M, 96>::new();
    w.read_into(skb, &[off!(skb_len), off!(skb_data), off!(skb_head), off!(skb_network_header)])
        .map_err(|_| Unparsed::Malformed)?;
    let data: u64 = w.get(off!(skb_data)).map_err(|_| Unparsed::Malformed)?;
    let len: u32 = w.get(off!(skb_len)).map_err(|_| Unparsed::Malformed)?;
    let l3 = match at {
        L3At::Data => data,
        L3At::NetworkHeader => {
            let head: u64 = w.get(off!(skb_head)).map_err(|_| Unparsed::Malformed)?;
            let nh: u16 = w.get(off!(skb_network_header)).map_err(|_| Unparsed::Malformed)?;
            if nh == 0xffff {
                return Err(Unparsed::Other);
            }
            head + nh as u64
        }
    };
    let end = data + len as u64;
    if l3 >= end || end - l3 > u32::MAX as u64 {
        return Err(Unparsed::Malformed);
    }
    *out = (l3, (end - l3) as u32);
    Ok(())
}

/// Fills the device fields of `ev` (ifindex, netns inode, loopback flag) from `dev`.
#[inline(always)]
pub fn device_info<M: Kmem>(dev: u64, ev: &mut Event) {
    ev.aux = read::<M, u32>(dev, off!(dev_ifindex)).unwrap_or(0);
    if read::<M, u32>(dev, off!(dev_flags)).unwrap_or(0) & IFF_LOOPBACK != 0 {
        ev.flags |= F_LOOPBACK;
    }
    // nd_net is a possible_net_t: the struct net pointer is its only member.
    if let Ok(net) = read::<M, u64>(dev, off!(dev_nd_net)) {
        ev.aux2 = read::<M, u32>(net, off!(net_ns_inum)).unwrap_or(0);
    }
}

/// Transport protocol of socket `sk` (6 TCP, 17 UDP, other values for anything else).
#[inline(always)]
pub fn sock_protocol<M: Kmem>(sk: u64) -> u8 {
    read::<M, u16>(sk, off!(sk_protocol)).unwrap_or(0) as u8
}

/// Local port of socket `sk` (host order).
#[inline(always)]
pub fn sock_local_port<M: Kmem>(sk: u64) -> u16 {
    read::<M, u16>(sk, off!(sk_num)).unwrap_or(0)
}

/// Fills the flow of `ev` from socket `sk` (of protocol `proto`), oriented as data the
/// socket sends (`rx == false`: src is the local end) or receives (`rx == true`: src is
/// the peer). IPv4-mapped IPv6 sockets are reported as IPv4, as their packets are.
#[inline(always)]
pub fn sock_flow_of<M: Kmem>(sk: u64, proto: u8, rx: bool, ev: &mut Event) -> Result<(), ()> {
    match proto {
        IPPROTO_TCP => ev.flags |= (Kind::Data as u8) << KIND_SHIFT,
        IPPROTO_UDP => ev.flags |= F_UDP,
        _ => return Err(()),
    }
    // sock_common's addresses, ports and family in one read.
    let mut w = Window::<M, 96>::new();
    w.read_into(
        sk,
        &[
            off!(sk_daddr),
            off!(sk_rcv_saddr),
            off!(sk_dport),
            off!(sk_num),
            off!(sk_family),
            off!(sk_v6_daddr),
            off!(sk_v6_rcv_saddr),
        ],
    )?;
    let family: u16 = w.get(off!(sk_family))?;
    let local_port: u16 = w.get(off!(sk_num))?;
    let peer_port: u16 = u16::from_be(w.get(off!(sk_dport))?);
    // Read as if sending (saddr = local), then swap for the receive direction.
    match family {
        AF_INET => {
            let l: [u8; 4] = w.get(off!(sk_rcv_saddr))?;
            let p: [u8; 4] = w.get(off!(sk_daddr))?;
            ev.saddr[..4].copy_from_slice(&l);
            ev.daddr[..4].copy_from_slice(&p);
        }
        AF_INET6 => {
            ev.saddr = w.get(off!(sk_v6_rcv_saddr))?;
            ev.daddr = w.get(off!(sk_v6_daddr))?;
            if is_v4_mapped(&ev.daddr) && (is_v4_mapped(&ev.saddr) || is_zero(&ev.saddr)) {
                unmap(&mut ev.saddr);
                unmap(&mut ev.daddr);
            } else {
                ev.flags |= F_V6;
            }
        }
        _ => return Err(()),
    }
    ev.sport = local_port;
    ev.dport = peer_port;
    if rx {
        core::mem::swap(&mut ev.saddr, &mut ev.daddr);
        core::mem::swap(&mut ev.sport, &mut ev.dport);
    }
    Ok(())
}

/// `::ffff:a.b.c.d` -> `a.b.c.d` in the first four bytes.
#[inline(always)]
fn unmap(a: &mut [u8; 16]) {
    let v4 = [a[12], a[13], a[14], a[15]];
    *a = [0; 16];
    a[..4].copy_from_slice(&v4);
}

#[inline(always)]
fn is_zero(a: &[u8; 16]) -> bool {
    a.iter().fold(0u8, |acc, &b| acc | b) == 0
}

#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0 && a[10] == 0xff && a[11] == 0xff
}

// User memory (the caller's buffers in receive syscalls).

/// Reads a pointer-sized value at user address `at` (0 when unreadable).
#[inline(always)]
pub fn user_ptr(at: u64) -> u64 {
    let mut v = 0u64;
    let r = unsafe { bpf_probe_read_user((&mut v as *mut u64).cast(), 8, at as *const _) };
    if r == 0 { v } else { 0 }
}

/// Fills the source of `ev` from a user `sockaddr_in`/`sockaddr_in6`.
#[inline(always)]
pub fn user_peer(addr: u64, ev: &mut Event) {
    let mut sa = [0u8; 24];
    if unsafe { bpf_probe_read_user(sa.as_mut_ptr().cast(), 24, addr as *const _) } != 0 {
        return;
    }
    let family = u16::from_ne_bytes([sa[0], sa[1]]);
    ev.sport = u16::from_be_bytes([sa[2], sa[3]]);
    if family == 2 {
        ev.saddr[..4].copy_from_slice(&sa[4..8]);
        return;
    }
    ev.saddr.copy_from_slice(&sa[8..24]);
    let mapped = ev.saddr[..10].iter().fold(0u8, |a, b| a | b) == 0 && ev.saddr[10] == 0xff && ev.saddr[11] == 0xff;
    if mapped {
        // An IPv6 socket receiving IPv4: report both ends as IPv4, as the packets are.
        let v4 = [ev.saddr[12], ev.saddr[13], ev.saddr[14], ev.saddr[15]];
        ev.saddr = [0; 16];
        ev.saddr[..4].copy_from_slice(&v4);
        let d = [ev.daddr[12], ev.daddr[13], ev.daddr[14], ev.daddr[15]];
        let dst_mapped = ev.daddr[10] == 0xff && ev.daddr[11] == 0xff;
        ev.daddr = [0; 16];
        if dst_mapped {
            ev.daddr[..4].copy_from_slice(&d);
        }
        ev.flags &= !F_V6;
    }
}

/// The receive syscall the current task is in: (`RECV_*` kind, buffer/iovec/msghdr user
/// pointer, recvfrom's address buffer), from the task's saved syscall registers. `None`
/// for other syscalls and architectures without a mapping here.
#[inline(always)]
pub fn recv_call() -> Option<(u32, u64, u64)> {
    use aya_ebpf::helpers::generated::{bpf_get_current_task_btf, bpf_task_pt_regs};
    use packetflow_common::event::{RECV_BUF, RECV_IOV, RECV_MSG};
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    if regs == 0 {
        return None;
    }
    use arch::*;
    let (nr, a1, a4) = syscall_regs(regs)?;
    let kind = match nr {
        READ | RECVFROM => RECV_BUF,
        READV => RECV_IOV,
        RECVMSG | RECVMMSG => RECV_MSG,
        _ => return None,
    };
    Some((kind, a1, if nr == RECVFROM { a4 } else { 0 }))
}

/// Receive syscall numbers and where pt_regs keeps (syscall number, argument 1,
/// argument 4) on x86_64: orig_ax, si, r8.
#[cfg(bpf_target_arch = "x86_64")]
mod arch {
    pub const READ: u64 = 0;
    pub const READV: u64 = 19;
    pub const RECVFROM: u64 = 45;
    pub const RECVMSG: u64 = 47;
    pub const RECVMMSG: u64 = 299;

    #[inline(always)]
    pub fn syscall_regs(regs: u64) -> Option<(u64, u64, u64)> {
        use aya_ebpf::{bindings::pt_regs, helpers::bpf_probe_read_kernel};
        let r: pt_regs = unsafe { bpf_probe_read_kernel(regs as *const pt_regs) }.ok()?;
        Some((r.orig_rax, r.rsi, r.r8))
    }
}

/// The same for arm64, whose pt_regs is regs[0..31], sp, pc, pstate, orig_x0, syscallno.
#[cfg(bpf_target_arch = "aarch64")]
mod arch {
    pub const READ: u64 = 63;
    pub const READV: u64 = 65;
    pub const RECVFROM: u64 = 207;
    pub const RECVMSG: u64 = 212;
    pub const RECVMMSG: u64 = 243;

    #[inline(always)]
    pub fn syscall_regs(regs: u64) -> Option<(u64, u64, u64)> {
        use aya_ebpf::helpers::bpf_probe_read_kernel;
        let r: [u64; 36] = unsafe { bpf_probe_read_kernel(regs as *const [u64; 36]) }.ok()?;
        Some((r[35] & 0xffff_ffff, r[1], r[4]))
    }
}

/// Other architectures: no mapping, so copy_to_user is not attributed there.
#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
mod arch {
    pub const READ: u64 = u64::MAX;
    pub const READV: u64 = u64::MAX;
    pub const RECVFROM: u64 = u64::MAX;
    pub const RECVMSG: u64 = u64::MAX;
    pub const RECVMMSG: u64 = u64::MAX;

    #[inline(always)]
    pub fn syscall_regs(_regs: u64) -> Option<(u64, u64, u64)> {
        None
    }
}
