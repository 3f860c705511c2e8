//! A packet's trace: its flow, path, kind and the time it passed each stage. Built live by
//! the correlator (`pipeline::correlate`) or read back from a recording
//! (`format::recording`); everything downstream (statistics, reports, files) reads only this.

use packetflow_common::{Event, Kind, Stage};

/// Flow direction: the packet's sender first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    pub v6: bool,
    pub udp: bool,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    pub fn of(ev: &Event) -> Flow {
        Flow { v6: ev.is_v6(), udp: ev.is_udp(), src: ev.saddr, dst: ev.daddr, sport: ev.sport, dport: ev.dport }
    }

    /// A flow as a recording's line spells it.
    pub fn from_json(
        family: &str,
        proto: &str,
        src: std::net::IpAddr,
        sport: u16,
        dst: std::net::IpAddr,
        dport: u16,
    ) -> Flow {
        let addr = |a: std::net::IpAddr| -> [u8; 16] {
            match a {
                std::net::IpAddr::V4(v4) => {
                    let mut b = [0u8; 16];
                    b[..4].copy_from_slice(&v4.octets());
                    b
                }
                std::net::IpAddr::V6(v6) => v6.octets(),
            }
        };
        Flow { v6: family == "ipv6", udp: proto == "udp", src: addr(src), dst: addr(dst), sport, dport }
    }

    pub fn src_ip(&self) -> std::net::IpAddr {
        ip(self.v6, &self.src)
    }

    pub fn dst_ip(&self) -> std::net::IpAddr {
        ip(self.v6, &self.dst)
    }
}

pub fn ip(v6: bool, a: &[u8; 16]) -> std::net::IpAddr {
    if v6 { std::net::IpAddr::from(*a) } else { std::net::IpAddr::from([a[0], a[1], a[2], a[3]]) }
}

/// Which way the packet went: over loopback, or out of one interface and in at another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum PathKind {
    Loopback,
    Nic,
}

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Loopback => "loopback",
            PathKind::Nic => "nic",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TraceKind {
    Data,
    /// The same bytes sent again by TCP (retransmission): kept out of the statistics.
    Retrans,
    /// A TCP segment without payload (only with control tracing on).
    Control(Kind),
}

impl TraceKind {
    pub fn name(self) -> &'static str {
        match self {
            TraceKind::Data => "data",
            TraceKind::Retrans => "retrans",
            TraceKind::Control(k) => k.name(),
        }
    }
}

/// One stage of a finished trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageTime {
    pub stage: Stage,
    pub t_ns: u64,
    pub cpu: u16,
}

/// A network device: its namespace (the namespace file's inode) and its index there.
/// Indexes repeat across namespaces, so only the pair names one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Device {
    pub netns: u32,
    pub ifindex: u32,
}

/// One packet's way through the stages.
#[derive(Clone, Debug)]
pub struct Trace {
    pub kind: TraceKind,
    pub flow: Flow,
    /// TCP: sequence number of the first payload byte. UDP: the payload key.
    pub seq: u32,
    pub len: u32,
    pub path: PathKind,
    /// Device of the anchor (dev_queue, or netif_receive on a receive-only host).
    pub device: Device,
    /// Device the packet arrived on (netif_receive), when seen.
    pub rx_device: Option<Device>,
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    pub rx_pid: Option<u32>,
    pub rx_tid: Option<u32>,
    pub comm: Option<String>,
    pub rx_comm: Option<String>,
    /// The sending and receiving processes' cgroup v2 paths (/proc/PID/cgroup).
    pub cgroup: Option<String>,
    pub rx_cgroup: Option<String>,
    /// In time order.
    pub stages: Vec<StageTime>,
    /// Every expected stage was seen.
    pub complete: bool,
    /// The kernel dropped the packet after its last stage (docs/drops.md).
    pub drop: Option<crate::model::drops::PacketDrop>,
    /// TCP: when the stack sent these bytes again (tcp_retransmit_skb), after this copy.
    pub retransmits: Vec<u64>,
    /// When `woken`/`on_cpu` are traced: was a thread blocked in a receive call on the
    /// socket when the data was queued (false: the application was not waiting for it)?
    pub receiver_blocked: Option<bool>,
}

impl Trace {
    pub fn total_ns(&self) -> u64 {
        match (self.stages.first(), self.stages.last()) {
            (Some(a), Some(b)) => b.t_ns.saturating_sub(a.t_ns),
            _ => 0,
        }
    }

    /// With the drop a recording's trace line carries (`drop`), when it has one.
    pub fn with_drop(mut self, d: Option<&crate::format::ndjson::DropJson>) -> Result<Trace, String> {
        if let Some(d) = d {
            self.drop = Some(d.to_drop(self.flow, self.seq, self.len, self.kind.name())?);
        }
        Ok(self)
    }

    pub fn time_of(&self, stage: Stage) -> Option<u64> {
        self.stages.iter().find(|s| s.stage == stage).map(|s| s.t_ns)
    }
}
