//! The trace filter as the user writes it, and as the kernel programs read it.

use std::net::IpAddr;

use anyhow::Result;
use packetflow_common::{
    Filter, MAX_FILTER_HOSTS, MAX_FILTER_IFACES, MAX_FILTER_PORTS,
    config::{MAX_FILTER_PIDS, MODE_RECORDS, MODE_SUMMARY, PROC_CGROUP, PROC_COMM, PROC_PIDS, PROTO_TCP, PROTO_UDP},
};
use serde::{Deserialize, Serialize};

use crate::user_bail;

/// A transport protocol, as `--proto` and the daemon's `proto` key name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct FilterSpec {
    pub ports: Vec<u16>,
    pub hosts: Vec<IpAddr>,
    /// Process filters: a flow is traced once a process with one of these pids, this
    /// command name and in this cgroup (each when given) touched its socket.
    pub pids: Vec<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<crate::platform::cgroup::Cgroup>,
    /// Both when `None`.
    pub proto: Option<Proto>,
    /// Interface indexes for the device stages (names are resolved by the caller).
    pub ifindexes: Vec<u32>,
    pub control: bool,
    /// In-kernel histograms (summary mode).
    pub summary: bool,
    /// No per-packet records (with `summary`: summary mode only).
    pub no_records: bool,
    /// Trace 1 flow in N (1: all).
    pub sample: u32,
    /// The stages whose records are written (`--stages`).
    pub stages: crate::model::stage_set::StageSet,
}

impl FilterSpec {
    /// Which traffic, in words ("port 80,443", "tcp", "1 flow in 10"); empty for all of it.
    pub fn describe(&self) -> Vec<String> {
        let list = |v: Vec<String>| v.join(",");
        let mut parts = Vec::new();
        if !self.ports.is_empty() {
            parts.push(format!("port {}", list(self.ports.iter().map(u16::to_string).collect())));
        }
        if !self.hosts.is_empty() {
            parts.push(format!("host {}", list(self.hosts.iter().map(IpAddr::to_string).collect())));
        }
        if !self.pids.is_empty() {
            parts.push(format!("pid {}", list(self.pids.iter().map(u32::to_string).collect())));
        }
        if let Some(c) = &self.comm {
            parts.push(format!("comm {c}"));
        }
        if let Some(c) = &self.cgroup {
            parts.push(format!("cgroup {}", c.path));
        }
        if let Some(p) = self.proto {
            parts.push(p.name().into());
        }
        if self.sample > 1 {
            parts.push(format!("1 flow in {}", self.sample));
        }
        parts
    }

    /// The kernel's view; fails with a sentence when the spec does not fit.
    pub fn to_kernel(&self, own_tgid: u32) -> Result<Filter> {
        let mut f = Filter::NONE;
        f.own_tgid = own_tgid;
        if self.pids.len() > MAX_FILTER_PIDS {
            user_bail!("at most {MAX_FILTER_PIDS} --pid filters are supported, got {}", self.pids.len());
        }
        for (i, p) in self.pids.iter().enumerate() {
            f.pids[i] = *p;
        }
        f.npids = self.pids.len() as u32;
        if !self.pids.is_empty() {
            f.procs |= PROC_PIDS;
        }
        if let Some(c) = &self.comm {
            // The kernel keeps 15 bytes and a NUL (TASK_COMM_LEN).
            if c.is_empty() || c.len() > 15 || c.contains('\0') {
                user_bail!("--comm {c:?}: a command name is 1 to 15 bytes (the kernel's comm; see /proc/PID/comm)");
            }
            f.comm[..c.len()].copy_from_slice(c.as_bytes());
            f.procs |= PROC_COMM;
        }
        if let Some(c) = &self.cgroup {
            (f.cgroup_id, f.cgroup_level) = (c.id, c.level);
            f.procs |= PROC_CGROUP;
        }
        f.protos = match self.proto {
            None => PROTO_TCP | PROTO_UDP,
            Some(Proto::Tcp) => PROTO_TCP,
            Some(Proto::Udp) => PROTO_UDP,
        };
        if self.ports.len() > MAX_FILTER_PORTS {
            user_bail!("at most {MAX_FILTER_PORTS} --port filters are supported, got {}", self.ports.len());
        }
        for (i, p) in self.ports.iter().enumerate() {
            f.ports[i] = *p;
        }
        f.nports = self.ports.len() as u32;
        if self.hosts.len() > MAX_FILTER_HOSTS {
            user_bail!("at most {MAX_FILTER_HOSTS} --host filters are supported, got {}", self.hosts.len());
        }
        for (i, h) in self.hosts.iter().enumerate() {
            match h {
                IpAddr::V4(a) => f.hosts[i][..4].copy_from_slice(&a.octets()),
                IpAddr::V6(a) => {
                    if let Some(v4) = a.to_ipv4_mapped() {
                        f.hosts[i][..4].copy_from_slice(&v4.octets());
                    } else {
                        f.hosts[i] = a.octets();
                        f.host_v6[i] = 1;
                    }
                }
            }
        }
        f.nhosts = self.hosts.len() as u32;
        if self.ifindexes.len() > MAX_FILTER_IFACES {
            user_bail!("at most {MAX_FILTER_IFACES} interfaces can be traced at once, got {}", self.ifindexes.len());
        }
        for (i, x) in self.ifindexes.iter().enumerate() {
            f.ifaces[i] = *x;
        }
        f.nifaces = self.ifindexes.len() as u32;
        f.control = u32::from(self.control);
        f.mode = if self.summary { MODE_SUMMARY } else { 0 } | if self.no_records { 0 } else { MODE_RECORDS };
        f.sample = self.sample.max(1);
        f.sample_seed = std::process::id().wrapping_mul(0x9e37_79b9);
        // Summary mode times no woken/on_cpu (nothing would end their watches).
        let stages = if self.no_records { self.stages.for_summary() } else { self.stages };
        f.stages = stages.mask();
        f.finish = stages.finish() as u8;
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_kernel_filter() {
        let s = FilterSpec {
            ports: vec![8080, 53],
            hosts: vec!["127.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap(), "::ffff:1.2.3.4".parse().unwrap()],
            pids: vec![42, 43],
            comm: Some("nginx".into()),
            proto: Some(Proto::Udp),
            ..Default::default()
        };
        let f = s.to_kernel(7).unwrap();
        assert_eq!((f.nports, f.ports[0], f.ports[1]), (2, 8080, 53));
        assert_eq!(f.nhosts, 3);
        assert_eq!(&f.hosts[0][..4], &[127, 0, 0, 1]);
        assert_eq!(f.host_v6, [0, 1, 0, 0]);
        assert_eq!(&f.hosts[2][..4], &[1, 2, 3, 4]);
        assert_eq!((f.npids, f.pids[0], f.pids[1], f.own_tgid, f.protos), (2, 42, 43, 7, PROTO_UDP));
        assert_eq!((f.procs, &f.comm[..6]), (PROC_PIDS | PROC_COMM, &b"nginx\0"[..]));
        let long = FilterSpec { comm: Some("a-very-long-command".into()), ..Default::default() };
        assert!(long.to_kernel(7).is_err());
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let s = FilterSpec { ports: (1..=9).collect(), ..Default::default() };
        assert!(s.to_kernel(1).is_err());
        // An unknown protocol cannot reach a FilterSpec: --proto and the config refuse it.
        assert!(<Proto as clap::ValueEnum>::from_str("sctp", false).is_err());
        assert!(toml::from_str::<std::collections::HashMap<String, Proto>>("p = \"sctp\"").is_err());
    }
}
