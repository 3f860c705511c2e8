//! The stages of a packet's path, with stable numbers (they appear in ring-buffer records
//! and counter indices) and canonical names (they appear in every output).

/// One point on the path from the sending application to the receiving one.
///
/// The numbers are part of the record format: never renumber, only append.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// The application entered send/sendto/sendmsg/write/writev on the socket.
    SendSyscall = 0,
    /// The transport took the data (TCP: tcp_sendmsg_locked; UDP: cgroup_skb egress).
    SockSend = 1,
    /// Handed to the device layer (net:net_dev_queue).
    DevQueue = 2,
    /// TC egress program (tcx).
    TcEgress = 3,
    /// Driver transmit start (net:net_dev_start_xmit).
    NicXmit = 4,
    /// XDP on the receiving interface.
    Xdp = 5,
    /// Enters the stack (net:netif_receive_skb).
    NetifReceive = 6,
    /// TC ingress program (tcx).
    TcIngress = 7,
    /// TCP/UDP receive processing (tcp:tcp_probe; UDP: cgroup_skb ingress).
    TransportRcv = 8,
    /// Queued on the socket, reader woken (sock:sk_data_ready).
    SockQueue = 9,
    /// Data copied to the application (skb:skb_copy_datagram_iovec).
    CopyToUser = 10,
    /// The application's recv/read returned with the data.
    RecvSyscall = 11,
    /// IP output (kprobe ip_output / ip6_output), where the kernel allows kprobes. For TCP
    /// after `sock_send`; for UDP before it (cgroup egress runs inside IP output).
    IpSend = 12,
    /// IP receive, local delivery (kprobe ip_local_deliver / ip6_input), where the kernel
    /// allows kprobes.
    IpRcv = 13,
    /// The receiving thread, blocked on the socket when the data was queued, made runnable
    /// (sched:sched_wakeup). Only for packets a blocked reader waited for.
    Woken = 14,
    /// That thread starting to run on a CPU (sched:sched_switch).
    OnCpu = 15,
}

/// Number of stage slots in per-stage arrays (room for optional stages to come).
pub const NUM_STAGES: usize = 16;

impl Stage {
    /// All stages, by number (the optional IP-layer stages, added later, come last).
    pub const ALL: [Stage; 16] = [
        Stage::SendSyscall,
        Stage::SockSend,
        Stage::DevQueue,
        Stage::TcEgress,
        Stage::NicXmit,
        Stage::Xdp,
        Stage::NetifReceive,
        Stage::TcIngress,
        Stage::TransportRcv,
        Stage::SockQueue,
        Stage::CopyToUser,
        Stage::RecvSyscall,
        Stage::IpSend,
        Stage::IpRcv,
        Stage::Woken,
        Stage::OnCpu,
    ];

    /// The order in which the kernel passes the stages, used for every table: tcx egress
    /// runs in __dev_queue_xmit before the net_dev_queue tracepoint, and native XDP runs
    /// before the stack (generic XDP runs inside it, after netif_receive_skb: on such an
    /// interface the `xdp` row is the time since `netif_receive`). See docs/stages.md.
    pub const KERNEL_ORDER: [Stage; 16] = [
        Stage::SendSyscall,
        Stage::SockSend,
        Stage::IpSend,
        Stage::TcEgress,
        Stage::DevQueue,
        Stage::NicXmit,
        Stage::Xdp,
        Stage::NetifReceive,
        Stage::TcIngress,
        Stage::IpRcv,
        Stage::TransportRcv,
        Stage::SockQueue,
        Stage::Woken,
        Stage::OnCpu,
        Stage::CopyToUser,
        Stage::RecvSyscall,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stage::SendSyscall => "send_syscall",
            Stage::SockSend => "sock_send",
            Stage::DevQueue => "dev_queue",
            Stage::TcEgress => "tc_egress",
            Stage::NicXmit => "nic_xmit",
            Stage::Xdp => "xdp",
            Stage::NetifReceive => "netif_receive",
            Stage::TcIngress => "tc_ingress",
            Stage::TransportRcv => "transport_rcv",
            Stage::SockQueue => "sock_queue",
            Stage::CopyToUser => "copy_to_user",
            Stage::RecvSyscall => "recv_syscall",
            Stage::IpSend => "ip_send",
            Stage::IpRcv => "ip_rcv",
            Stage::Woken => "woken",
            Stage::OnCpu => "on_cpu",
        }
    }

    /// The IP-layer stages, served only where kprobes work.
    pub const fn is_optional(self) -> bool {
        matches!(self, Stage::IpSend | Stage::IpRcv)
    }

    /// Seen only for some packets of a path (a reader blocked on the socket): a trace
    /// without them is not incomplete.
    pub const fn is_per_packet(self) -> bool {
        matches!(self, Stage::Woken | Stage::OnCpu)
    }

    /// Served by programs on each traced interface (XDP, tcx), not by a global hook.
    pub const fn is_per_interface(self) -> bool {
        matches!(self, Stage::Xdp | Stage::TcEgress | Stage::TcIngress)
    }

    /// Position of this stage in `KERNEL_ORDER`.
    pub const fn kernel_pos(self) -> usize {
        let mut i = 0;
        while i < Self::KERNEL_ORDER.len() {
            if Self::KERNEL_ORDER[i] as u8 == self as u8 {
                return i;
            }
            i += 1;
        }
        0
    }

    pub const fn from_u8(v: u8) -> Option<Stage> {
        if (v as usize) < Self::ALL.len() { Some(Self::ALL[v as usize]) } else { None }
    }

    pub fn from_name(name: &str) -> Option<Stage> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// True for stages on the sending side of the path. A packet passes a sending-side stage
    /// with its first byte; it has passed a receiving-side stage once its last byte has.
    pub const fn is_egress(self) -> bool {
        (self as u8) <= Stage::NicXmit as u8 || matches!(self, Stage::IpSend)
    }
}
