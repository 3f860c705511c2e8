//! `--stages LIST`: which stages a run traces. A stage not asked for gets no program,
//! unless another asked stage needs its hook (`StageSet::needs`); such a helper hook runs
//! with its own records turned off (the kernel filter's `stages` mask).

use anyhow::Result;
use packetflow_common::Stage;
use serde::{Serialize, Serializer};

use crate::user_bail;

/// A set of stages, as a bit mask by stage number (the kernel filter's `stages`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageSet(u16);

/// The named sets: (name, what it answers, stages).
pub const NAMED: [(&str, &str, &[Stage]); 6] = [
    ("all", "every stage", &Stage::KERNEL_ORDER),
    (
        "overview",
        "stack, qdisc, transmit->receive and socket/application time",
        &[
            Stage::SendSyscall,
            Stage::DevQueue,
            Stage::NicXmit,
            Stage::NetifReceive,
            Stage::SockQueue,
            Stage::RecvSyscall,
        ],
    ),
    ("send", "the send path's queueing", Stage::KERNEL_ORDER.split_at(6).0),
    ("receive", "the receive path", Stage::KERNEL_ORDER.split_at(4).1),
    (
        "socket",
        "the socket-queue wait (queued -> woken -> on CPU -> copied -> returned)",
        &[Stage::DevQueue, Stage::SockQueue, Stage::Woken, Stage::OnCpu, Stage::CopyToUser, Stage::RecvSyscall],
    ),
    ("none", "no packet stage (with --connections: connection set-up only)", &[]),
];

impl Default for StageSet {
    fn default() -> Self {
        StageSet::ALL
    }
}

impl StageSet {
    pub const ALL: StageSet = StageSet(((1u32 << Stage::ALL.len()) - 1) as u16);

    pub fn of(stages: &[Stage]) -> StageSet {
        StageSet(stages.iter().fold(0, |m, s| m | 1 << *s as u16))
    }

    /// "overview", "send,sock_queue", "dev_queue,netif_receive": stage names and named
    /// sets, joined by commas (the union).
    pub fn parse(list: &str) -> Result<StageSet> {
        let mut set = StageSet(0);
        for word in list.split(',').map(str::trim) {
            if let Some((_, _, stages)) = NAMED.iter().find(|(n, _, _)| *n == word) {
                set.0 |= StageSet::of(stages).0;
            } else if let Some(s) = Stage::from_name(word) {
                set.0 |= 1 << s as u16;
            } else {
                let names: Vec<&str> = Stage::KERNEL_ORDER.iter().map(|s| s.name()).collect();
                let sets: Vec<&str> = NAMED.iter().map(|(n, _, _)| *n).collect();
                user_bail!(
                    "unknown stage or stage set '{}' (stages: {}; sets: {})",
                    crate::format::output::printable(word),
                    names.join(", "),
                    sets.join(", ")
                );
            }
        }
        Ok(set)
    }

    /// This set without the stages only full tracing has (`woken`, `on_cpu`: summary mode
    /// does not split the socket-queue wait, docs/stages.md).
    #[must_use]
    pub fn for_summary(self) -> StageSet {
        StageSet(self.0 & !(1 << Stage::Woken as u16 | 1 << Stage::OnCpu as u16))
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, s: Stage) -> bool {
        self.0 & 1 << s as u16 != 0
    }

    pub fn mask(self) -> u16 {
        self.0
    }

    /// The stages, in kernel order.
    pub fn stages(self) -> impl Iterator<Item = Stage> {
        Stage::KERNEL_ORDER.into_iter().filter(move |s| self.contains(*s))
    }

    /// Per-packet tracing (full mode, `capture --stages`) joins each packet's records at
    /// `dev_queue` (docs/stages.md): a set without it cannot be traced that way.
    pub fn check_joinable(self) -> Result<()> {
        if !self.contains(Stage::DevQueue) {
            user_bail!("per-packet tracing joins each packet's records at dev_queue: add dev_queue to the stages");
        }
        Ok(())
    }

    /// The per-interface stages it holds (XDP, tcx).
    #[must_use]
    pub fn per_interface(self) -> StageSet {
        StageSet(self.stages().filter(|s| s.is_per_interface()).fold(0, |m, s| m | 1 << s as u16))
    }

    /// The last stage in kernel order: where summary mode adds a packet up.
    pub fn finish(self) -> Stage {
        self.stages().last().unwrap_or(Stage::RecvSyscall)
    }

    /// Must the hook that serves `s` be attached? When `s` is asked for, or when an asked
    /// stage's record is written by that hook: the transport hook writes `send_syscall`
    /// (only it knows which bytes the call handed in), the copy hooks leave
    /// `recv_syscall`'s note, UDP's `copy_to_user` is written at the receive syscall's
    /// exit, and UDP's `sock_queue` takes its datagram from `transport_rcv`'s hook.
    pub fn needs(self, s: Stage) -> bool {
        self.contains(s)
            || match s {
                Stage::SockSend => self.contains(Stage::SendSyscall),
                Stage::CopyToUser => self.contains(Stage::RecvSyscall),
                Stage::RecvSyscall => self.contains(Stage::CopyToUser),
                // UDP's sock_queue record comes from its transport hook.
                Stage::TransportRcv => self.needs(Stage::SockQueue),
                // The sock_queue hook finds the blocked reader they follow.
                Stage::SockQueue => self.contains(Stage::Woken) || self.contains(Stage::OnCpu),
                _ => false,
            }
    }

    /// "all", or the stage names in kernel order.
    pub fn describe(self) -> String {
        if self == StageSet::ALL {
            return "all".into();
        }
        if self.is_empty() {
            return "none".into();
        }
        self.stages().map(Stage::name).collect::<Vec<_>>().join(",")
    }
}

impl Serialize for StageSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.stages().map(Stage::name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_sets() {
        let s = StageSet::parse("socket,nic_xmit").unwrap();
        let names: Vec<&str> = s.stages().map(Stage::name).collect();
        assert_eq!(names, ["dev_queue", "nic_xmit", "sock_queue", "woken", "on_cpu", "copy_to_user", "recv_syscall"]);
        assert_eq!(s.finish(), Stage::RecvSyscall);
        assert_eq!(StageSet::parse("all").unwrap(), StageSet::ALL);
        assert_eq!(StageSet::parse("send").unwrap().finish(), Stage::NicXmit);
        let e = StageSet::parse("dev_queue,bogus").unwrap_err().to_string();
        assert!(e.contains("'bogus'") && e.contains("overview"), "{e}");
        assert!(StageSet::parse("").is_err());
    }

    #[test]
    fn helper_hooks() {
        let s = StageSet::parse("send_syscall,dev_queue,recv_syscall").unwrap();
        assert!(s.needs(Stage::SockSend) && s.needs(Stage::CopyToUser) && !s.contains(Stage::SockSend));
        assert!(!s.needs(Stage::TransportRcv) && !s.needs(Stage::NicXmit));
        assert!(StageSet::parse("sock_queue").unwrap().needs(Stage::TransportRcv));
        // The blocked reader is found by the sock_queue hook (UDP's needs its transport's).
        let w = StageSet::parse("dev_queue,woken").unwrap();
        assert!(w.needs(Stage::SockQueue) && w.needs(Stage::TransportRcv) && !w.contains(Stage::SockQueue));
    }

    #[test]
    fn joinable_and_per_interface() {
        assert!(StageSet::parse("socket").unwrap().check_joinable().is_ok());
        let e = StageSet::parse("sock_queue").unwrap().check_joinable().unwrap_err().to_string();
        assert!(e.contains("add dev_queue"), "{e}");
        assert_eq!(StageSet::ALL.per_interface(), StageSet::of(&[Stage::Xdp, Stage::TcEgress, Stage::TcIngress]));
        assert_eq!(StageSet::parse("overview").unwrap().per_interface(), StageSet::of(&[]));
    }

    #[test]
    fn every_named_set_is_in_kernel_order_and_anchored() {
        for (name, _, stages) in NAMED {
            if stages.is_empty() {
                continue; // "none": connections only, no packet to anchor
            }
            let set = StageSet::of(stages);
            assert!(set.contains(Stage::DevQueue), "{name}: full tracing anchors at dev_queue");
            assert_eq!(set.stages().collect::<Vec<_>>(), stages, "{name}");
        }
    }
}
