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
    /// In time order.
    pub stages: Vec<StageTime>,
    /// Every expected stage was seen.
    pub complete: bool,
}

impl Trace {
    pub fn total_ns(&self) -> u64 {
        match (self.stages.first(), self.stages.last()) {
            (Some(a), Some(b)) => b.t_ns.saturating_sub(a.t_ns),
            _ => 0,
        }
    }

    pub fn time_of(&self, stage: Stage) -> Option<u64> {
        self.stages.iter().find(|s| s.stage == stage).map(|s| s.t_ns)
    }
}
