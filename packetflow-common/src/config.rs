//! Configuration handed from userspace to the programs.
//!
//! `Offsets` is a read-only global fixed at load time: the byte offsets of the kernel struct
//! fields the programs read, looked up in the running kernel's BTF (never compiled in).
//! `Filter` lives in a one-entry array map so a running tracer can change it.

use crate::assert_size;

/// Byte offsets of kernel struct fields, from `/sys/kernel/btf/vmlinux` at start-up.
/// `u32::MAX` marks a field this kernel does not have; hooks needing it stay detached.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    // struct sk_buff
    pub skb_head: u32,
    pub skb_data: u32,
    pub skb_len: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    // struct net_device
    pub dev_ifindex: u32,
    pub dev_flags: u32,
    pub dev_nd_net: u32,
    // struct net
    pub net_ns_inum: u32,
    // struct sock / sock_common
    pub sk_family: u32,
    pub sk_daddr: u32,
    pub sk_rcv_saddr: u32,
    pub sk_dport: u32,
    pub sk_num: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub sk_protocol: u32,
    /// `sk_buff.cb`: on TCP receive it holds `struct tcp_skb_cb` (seq, end_seq first).
    pub skb_cb: u32,
    // struct tcp_sock
    pub tcp_write_seq: u32,
    pub tcp_rcv_nxt: u32,
    pub tcp_copied_seq: u32,
    // struct msghdr -> msg_iter.count
    pub msg_iter_count: u32,
    /// `sk_buff._skb_refdst` (the route, low bit a flag) and `dst_entry.dev`: the device
    /// a packet will leave by, before IP output has copied it into `skb->dev`.
    pub skb_refdst: u32,
    pub dst_dev: u32,
    // Connection establishment (`conn.rs`): a socket's state and error, a listener's
    // queues, its netns's tcp_syncookies, and the path from a task's fd to its socket.
    pub sk_state: u32,
    pub sk_err: u32,
    pub sk_ack_backlog: u32,
    pub sk_max_ack_backlog: u32,
    /// `inet_connection_sock.icsk_accept_queue.qlen`: request sockets (the SYN queue).
    pub icsk_syn_qlen: u32,
    pub sk_net: u32,
    pub net_syncookies: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdt_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    // The reader blocked on a socket (`woken`, `on_cpu`): sock.sk_wq →
    // socket_wq.wait.head → the first wait_queue_entry's `private` (its task) → pid, tgid.
    pub sk_wq: u32,
    pub wq_head: u32,
    pub wqe_entry: u32,
    pub wqe_private: u32,
    pub task_pid: u32,
    pub task_tgid: u32,
    // A socket watched by epoll: its wait entry is an eppoll_entry's `wait`; `base` →
    // epitem.ep → eventpoll.wq.head, where the threads in epoll_wait sleep.
    pub epe_wait: u32,
    pub epe_base: u32,
    pub epi_ep: u32,
    pub ep_wq_head: u32,
    /// sk_buff.data_len (the paged part's length: what lies outside the linear buffer).
    pub skb_data_len: u32,
    pub _pad: u32,
}
assert_size!(Offsets, 200);

impl Offsets {
    pub const MISSING: u32 = u32::MAX;
    pub const UNSET: Offsets = Offsets {
        skb_head: u32::MAX,
        skb_data: u32::MAX,
        skb_len: u32::MAX,
        skb_network_header: u32::MAX,
        skb_transport_header: u32::MAX,
        skb_dev: u32::MAX,
        skb_sk: u32::MAX,
        dev_ifindex: u32::MAX,
        dev_flags: u32::MAX,
        dev_nd_net: u32::MAX,
        net_ns_inum: u32::MAX,
        sk_family: u32::MAX,
        sk_daddr: u32::MAX,
        sk_rcv_saddr: u32::MAX,
        sk_dport: u32::MAX,
        sk_num: u32::MAX,
        sk_v6_daddr: u32::MAX,
        sk_v6_rcv_saddr: u32::MAX,
        sk_protocol: u32::MAX,
        skb_cb: u32::MAX,
        tcp_write_seq: u32::MAX,
        tcp_rcv_nxt: u32::MAX,
        tcp_copied_seq: u32::MAX,
        msg_iter_count: u32::MAX,
        skb_refdst: u32::MAX,
        dst_dev: u32::MAX,
        sk_state: u32::MAX,
        sk_err: u32::MAX,
        sk_ack_backlog: u32::MAX,
        sk_max_ack_backlog: u32::MAX,
        icsk_syn_qlen: u32::MAX,
        sk_net: u32::MAX,
        net_syncookies: u32::MAX,
        task_files: u32::MAX,
        files_fdt: u32::MAX,
        fdt_fd: u32::MAX,
        file_private_data: u32::MAX,
        socket_sk: u32::MAX,
        sk_wq: u32::MAX,
        wq_head: u32::MAX,
        wqe_entry: u32::MAX,
        wqe_private: u32::MAX,
        task_pid: u32::MAX,
        task_tgid: u32::MAX,
        epe_wait: u32::MAX,
        epe_base: u32::MAX,
        epi_ep: u32::MAX,
        ep_wq_head: u32::MAX,
        skb_data_len: u32::MAX,
        _pad: 0,
    };
}

pub const MAX_FILTER_PORTS: usize = 8;
pub const MAX_FILTER_HOSTS: usize = 4;
pub const MAX_FILTER_IFACES: usize = 8;

/// Per-packet records into the ring buffers (full tracing).
pub const MODE_RECORDS: u32 = 1;
/// In-kernel per-stage histograms (summary mode): no per-packet records.
pub const MODE_SUMMARY: u32 = 2;

pub const PROTO_TCP: u32 = 1;
pub const PROTO_UDP: u32 = 2;

/// What to trace. A packet is traced when it matches every non-empty criterion; a port or
/// host matches on either end of the flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Not zero once userspace has written the filter; hooks do nothing before that.
    pub enabled: u32,
    /// The tracer's own process: never traced at process-context hooks.
    pub own_tgid: u32,
    /// `PROC_*` bits: which process criteria are set. With any, a flow is traced once a
    /// process that meets them all touched its socket (docs/filters.md).
    pub procs: u32,
    /// `PROTO_*` bits; a protocol whose bit is clear is not traced.
    pub protos: u32,
    pub nports: u32,
    pub nhosts: u32,
    pub nifaces: u32,
    /// Not zero: also trace ACK/SYN/FIN/RST segments as their own kind.
    pub control: u32,
    /// `MODE_*` bits: per-packet records to the rings, and/or in-kernel histograms.
    pub mode: u32,
    /// Trace 1 flow in `sample` (0 or 1: every flow). Decided by a hash of the flow's
    /// two endpoints, so both directions of a connection are in or out together.
    pub sample: u32,
    pub sample_seed: u32,
    /// Bit `1 << stage` set: that stage's records are written (`--stages`). A hook that
    /// serves an asked stage as a helper (the transport hook writes `send_syscall`) runs
    /// with its own stage's bit clear.
    pub stages: u16,
    /// Summary mode adds a packet up when it reaches this stage: the last asked stage in
    /// kernel order.
    pub finish: u8,
    pub _pad: u8,
    pub ports: [u16; MAX_FILTER_PORTS],
    pub hosts: [[u8; 16]; MAX_FILTER_HOSTS],
    /// 1 where `hosts[i]` is IPv6.
    pub host_v6: [u8; MAX_FILTER_HOSTS],
    /// Device stages: only these ifindexes.
    pub ifaces: [u32; MAX_FILTER_IFACES],
    pub npids: u32,
    /// `--cgroup`: the cgroup v2 id (its directory's inode) and its depth below the root;
    /// a process in it or below it matches.
    pub cgroup_id: u64,
    pub cgroup_level: u32,
    pub _pad2: u32,
    /// `--pid` (repeatable): process ids (tgids).
    pub pids: [u32; MAX_FILTER_PIDS],
    /// `--comm`: the command name, NUL-padded (the kernel's 16-byte `comm`).
    pub comm: [u8; 16],
}
assert_size!(Filter, 232);

/// `Filter::procs` bits.
pub const PROC_PIDS: u32 = 1;
pub const PROC_COMM: u32 = 2;
pub const PROC_CGROUP: u32 = 4;
pub const MAX_FILTER_PIDS: usize = 8;

impl Filter {
    pub const NONE: Filter = Filter {
        enabled: 0,
        own_tgid: 0,
        procs: 0,
        protos: PROTO_TCP | PROTO_UDP,
        nports: 0,
        nhosts: 0,
        nifaces: 0,
        control: 0,
        mode: MODE_RECORDS,
        sample: 1,
        sample_seed: 0,
        stages: ((1u32 << crate::Stage::ALL.len()) - 1) as u16,
        finish: crate::Stage::RecvSyscall as u8,
        _pad: 0,
        ports: [0; MAX_FILTER_PORTS],
        hosts: [[0; 16]; MAX_FILTER_HOSTS],
        host_v6: [0; MAX_FILTER_HOSTS],
        ifaces: [0; MAX_FILTER_IFACES],
        npids: 0,
        cgroup_id: 0,
        cgroup_level: 0,
        _pad2: 0,
        pids: [0; MAX_FILTER_PIDS],
        comm: [0; 16],
    };
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integer fields only, padding written out as fields (size pinned by
    // assert_size!): no uninitialised byte, and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Offsets {}
    // SAFETY: repr(C), integer fields only, padding written out as fields (size pinned by
    // assert_size!): no uninitialised byte, and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Filter {}
}
