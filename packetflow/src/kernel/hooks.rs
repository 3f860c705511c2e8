//! The stage → hook table: which kernel hook serves each stage, the hook groups that
//! attach and detach together, and `Tracer::set_stages` keeping them matched to the
//! asked stages. The ways each hook is attached are in `hook_kinds.rs`; XDP and tcx,
//! attached per interface, in `interfaces.rs`.
//!
//! Stage → hook (also printed by `doctor` and recorded in the JSON header). Where a stage
//! lists several, `attach_kernel_hooks` tries them in order and the first that attaches
//! serves it (docs/stages.md says why each exists):
//!
//! | stage          | hook                                                                 |
//! |----------------|----------------------------------------------------------------------|
//! | send_syscall   | tracepoint syscalls:sys_enter_{write,writev,sendto,sendmsg,sendmmsg} |
//! | sock_send      | TCP: tp_btf tcp_sendmsg_locked, else kprobe tcp_sendmsg_locked;      |
//! |                | UDP: cgroup_skb/egress, else the same without asking for the task    |
//! | ip_send        | kprobe ip_output/ip6_output (optional: only where kprobes work)      |
//! | tc_egress      | tcx egress, per interface                                            |
//! | dev_queue      | tp_btf net_dev_queue                                                 |
//! | nic_xmit       | tp_btf net_dev_start_xmit                                            |
//! | xdp            | XDP (native where the driver has it, else generic), per interface   |
//! | netif_receive  | tp_btf netif_receive_skb                                             |
//! | tc_ingress     | tcx ingress, per interface                                           |
//! | ip_rcv         | kprobe ip_local_deliver/ip6_input (optional)                         |
//! | transport_rcv  | tp_btf tcp_probe (TCP), cgroup_skb/ingress (UDP)                     |
//! | sock_queue     | tp_btf sk_data_ready, else kprobe sock_def_readable                  |
//! | copy_to_user   | tp_btf skb_copy_datagram_iovec (TCP); UDP: tp_btf sock_recv_length,  |
//! |                | else kprobe skb_consume_udp                                          |
//! | recv_syscall   | tracepoint syscalls:sys_exit_{read,readv,recvfrom,recvmsg,recvmmsg}  |
//! | woken          | tp_btf sched_wakeup, for the reader the sock_queue hook found blocked |
//! | on_cpu         | tp_btf sched_switch, the same reader (probes/sched.rs)               |

use anyhow::Result;
use aya::programs::CgroupSkbAttachType;
use packetflow_common::{
    Stage,
    config::{PROTO_TCP, PROTO_UDP},
};

use crate::{
    kernel::{hook_kinds::Hook, loader::Tracer},
    model::stage_set::StageSet,
};

pub const SEND_SYSCALLS: &[&str] = &["write", "writev", "sendto", "sendmsg", "sendmmsg"];
pub const RECV_SYSCALLS: &[&str] = &["read", "readv", "recvfrom", "recvmsg", "recvmmsg"];

/// Each program and the stage whose records it writes (for the kernel's per-program
/// counters).
pub(super) const PROGRAM_STAGES: &[(&str, Stage)] = &[
    ("pf_sys_enter_send", Stage::SendSyscall),
    ("pf_sys_exit_send", Stage::SendSyscall),
    ("pf_tcp_sendmsg", Stage::SockSend),
    ("pf_kp_tcp_sendmsg", Stage::SockSend),
    ("pf_cg_egress", Stage::SockSend),
    ("pf_cg_egress_nopid", Stage::SockSend),
    ("pf_kp_ip_send", Stage::IpSend),
    ("pf_tc_egress", Stage::TcEgress),
    ("pf_cap_tc_egress", Stage::TcEgress),
    ("pf_dev_queue", Stage::DevQueue),
    ("pf_start_xmit", Stage::NicXmit),
    ("pf_xdp", Stage::Xdp),
    ("pf_cap_xdp", Stage::Xdp),
    ("pf_netif_receive", Stage::NetifReceive),
    ("pf_tc_ingress", Stage::TcIngress),
    ("pf_kp_ip_rcv", Stage::IpRcv),
    ("pf_tcp_probe", Stage::TransportRcv),
    ("pf_cg_ingress", Stage::TransportRcv),
    ("pf_sk_data_ready", Stage::SockQueue),
    ("pf_kp_sk_data_ready", Stage::SockQueue),
    ("pf_copy_to_user", Stage::CopyToUser),
    ("pf_sock_recv", Stage::CopyToUser),
    ("pf_kp_udp_copy", Stage::CopyToUser),
    ("pf_sys_exit_recv", Stage::RecvSyscall),
    ("pf_sched_wakeup", Stage::Woken),
    ("pf_sched_switch", Stage::OnCpu),
];

/// The global hooks, in groups that attach and detach together: each serves one stage
/// (for TCP or UDP, or both) and is attached when `StageSet` asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Group {
    SendSyscalls,
    TcpSend,
    UdpSend,
    IpSend,
    DevQueue,
    NicXmit,
    NetifReceive,
    IpRcv,
    TcpRcv,
    UdpRcv,
    SockQueue,
    TcpCopy,
    UdpCopy,
    RecvSyscalls,
    Woken,
    OnCpu,
}

impl Group {
    const ALL: [Group; 16] = [
        Group::SendSyscalls,
        Group::TcpSend,
        Group::UdpSend,
        Group::IpSend,
        Group::DevQueue,
        Group::NicXmit,
        Group::NetifReceive,
        Group::IpRcv,
        Group::TcpRcv,
        Group::UdpRcv,
        Group::SockQueue,
        Group::TcpCopy,
        Group::UdpCopy,
        Group::RecvSyscalls,
        Group::Woken,
        Group::OnCpu,
    ];

    /// Does stage set `a`, tracing protocols `protos` (`PROTO_*`), need this group? A
    /// protocol's own hooks (TCP's or UDP's) run for every packet of the other one too, so
    /// `--proto` leaves them off (three programs fewer per TCP message).
    fn wanted(self, a: StageSet, protos: u32) -> bool {
        let proto = match self {
            Group::TcpSend | Group::TcpRcv | Group::TcpCopy => PROTO_TCP,
            Group::UdpSend | Group::UdpRcv | Group::UdpCopy => PROTO_UDP,
            _ => PROTO_TCP | PROTO_UDP,
        };
        if protos & proto == 0 {
            return false;
        }
        match self {
            Group::SendSyscalls => a.contains(Stage::SendSyscall),
            Group::TcpSend | Group::UdpSend => a.needs(Stage::SockSend),
            Group::IpSend => a.needs(Stage::IpSend),
            Group::DevQueue => a.needs(Stage::DevQueue),
            Group::NicXmit => a.needs(Stage::NicXmit),
            Group::NetifReceive => a.needs(Stage::NetifReceive),
            Group::IpRcv => a.needs(Stage::IpRcv),
            Group::TcpRcv => a.contains(Stage::TransportRcv),
            // Also UDP's sock_queue source (the datagram handed to the socket).
            Group::UdpRcv => a.needs(Stage::TransportRcv),
            Group::SockQueue => a.needs(Stage::SockQueue),
            Group::TcpCopy | Group::UdpCopy => a.needs(Stage::CopyToUser),
            // Also where UDP's copy_to_user is written.
            Group::RecvSyscalls => a.needs(Stage::RecvSyscall),
            Group::Woken => a.contains(Stage::Woken),
            Group::OnCpu => a.contains(Stage::OnCpu),
        }
    }

    /// The ways to serve it, in order (the first that attaches serves); tracepoint
    /// groups (the syscalls) are attached by `Tracer::attach_group`.
    fn hooks(self) -> &'static [Hook] {
        match self {
            Group::SendSyscalls | Group::RecvSyscalls => &[],
            Group::TcpSend => &[
                Hook::TpBtf("pf_tcp_sendmsg", "tcp_sendmsg_locked"),
                Hook::Kprobe("pf_kp_tcp_sendmsg", &["tcp_sendmsg_locked"]),
            ],
            Group::UdpSend => &[
                Hook::Cgroup("pf_cg_egress", CgroupSkbAttachType::Egress),
                // Older kernels refuse bpf_get_current_pid_tgid in cgroup_skb programs.
                Hook::Cgroup("pf_cg_egress_nopid", CgroupSkbAttachType::Egress),
            ],
            Group::IpSend => &[Hook::Kprobe("pf_kp_ip_send", &["ip_output", "ip6_output"])],
            Group::DevQueue => &[Hook::TpBtf("pf_dev_queue", "net_dev_queue")],
            Group::NicXmit => &[Hook::TpBtf("pf_start_xmit", "net_dev_start_xmit")],
            Group::NetifReceive => &[Hook::TpBtf("pf_netif_receive", "netif_receive_skb")],
            Group::IpRcv => &[Hook::Kprobe("pf_kp_ip_rcv", &["ip_local_deliver", "ip6_input"])],
            Group::TcpRcv => &[Hook::TpBtf("pf_tcp_probe", "tcp_probe")],
            Group::UdpRcv => &[Hook::Cgroup("pf_cg_ingress", CgroupSkbAttachType::Ingress)],
            Group::SockQueue => &[
                Hook::TpBtf("pf_sk_data_ready", "sk_data_ready"),
                Hook::Kprobe("pf_kp_sk_data_ready", &["sock_def_readable"]),
            ],
            Group::TcpCopy => &[Hook::TpBtf("pf_copy_to_user", "skb_copy_datagram_iovec")],
            Group::Woken => &[Hook::TpBtf("pf_sched_wakeup", "sched_wakeup")],
            Group::OnCpu => &[Hook::TpBtf("pf_sched_switch", "sched_switch")],
            Group::UdpCopy => {
                &[Hook::TpBtf("pf_sock_recv", "sock_recv_length"), Hook::Kprobe("pf_kp_udp_copy", &["skb_consume_udp"])]
            }
        }
    }
}

/// A hook group as attached: its description and outcome, the programs loaded for it
/// (unloaded when it goes) and the links it made.
pub(super) struct AttachedGroup {
    pub(super) hook: String,
    pub(super) state: Result<(), String>,
    pub(super) programs: Vec<&'static str>,
    pub(super) links: usize,
}

/// How one stage is observed on this kernel.
#[derive(Clone, Debug)]
pub struct StageHook {
    pub hook: String,
    /// `Err(reason)` when the stage cannot be observed.
    pub state: Result<(), String>,
}

impl Tracer {
    /// Attaches the global hooks (tracepoints, tp_btf, cgroup_skb) that `asked` needs
    /// (`StageSet::needs`) and records which hook serves each asked stage. A stage whose
    /// hook fails is reported missing, not fatal; a stage not asked for has no program.
    pub fn attach_kernel_hooks(&mut self, asked: StageSet) -> Result<()> {
        self.set_stages(asked);
        let global: Vec<&StageHook> =
            self.stages.iter().filter(|(s, _)| !s.is_per_interface()).map(|(_, h)| h).collect();
        if !global.is_empty() && global.iter().all(|h| h.state.is_err()) {
            let why = global[0].state.clone().err().unwrap_or_default();
            crate::user_bail!("no tracing hook could be attached on this kernel ({why}); run `packetflow doctor`");
        }
        Ok(())
    }

    /// Makes the global hooks match `asked`: attaches the groups it needs that are not
    /// attached, detaches those it no longer needs, and leaves the others alone (their
    /// programs keep running: no gap). Per-interface stages (XDP, tcx) follow `asked`
    /// only for interfaces attached afterwards. Returns one line per change.
    pub fn set_stages(&mut self, asked: StageSet) -> Vec<String> {
        let mut lines = Vec::new();
        for g in Group::ALL {
            let working = self.groups.get(&g).map(|a| a.state.is_ok());
            let wanted = g.wanted(asked, self.protos);
            if working == Some(true) && wanted || working.is_none() && !wanted {
                continue;
            }
            // Wanted and failed before (tried again), or no longer wanted: take it away.
            if let Some(a) = self.groups.remove(&g) {
                for p in a.programs {
                    self.unload(p);
                }
                self.links -= a.links;
                if !wanted {
                    lines.push(format!("detached {}", a.hook));
                    continue;
                }
            }
            let before = self.links;
            let (hook, state, progs) = self.attach_group(g);
            lines.push(match &state {
                Ok(()) => format!("attached {hook}"),
                // (After `--user` dropped the privileges, say.)
                Err(e) => format!("could not attach {hook}: {e}"),
            });
            self.groups.insert(g, AttachedGroup { hook, state, programs: progs, links: self.links - before });
        }
        self.asked = asked;
        self.stage_table();
        // The parsed BTF (tens of MiB) is only needed while attaching: give it back.
        self.btf = None;
        // SAFETY: malloc_trim only returns free heap pages to the kernel. (glibc's; musl's
        // allocator, in the static build, returns freed pages by itself.)
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0)
        };
        lines
    }

    /// Attaches group `g`: (hook description, outcome, programs loaded for it).
    fn attach_group(&mut self, g: Group) -> (String, Result<(), String>, Vec<&'static str>) {
        fn names(prefix: &str, calls: &[&str]) -> Vec<String> {
            calls.iter().map(|c| format!("{prefix}{c}")).collect()
        }
        match g {
            Group::SendSyscalls => {
                let enter = names("sys_enter_", SEND_SYSCALLS);
                let exit = names("sys_exit_", SEND_SYSCALLS);
                let r = self
                    .tracepoint("pf_sys_enter_send", "syscalls", &enter)
                    .and_then(|()| self.tracepoint("pf_sys_exit_send", "syscalls", &exit));
                let hook = format!("tracepoint syscalls:sys_enter_{{{}}}", SEND_SYSCALLS.join(","));
                (hook, r, vec!["pf_sys_enter_send", "pf_sys_exit_send"])
            }
            Group::RecvSyscalls => {
                let r = self.tracepoint("pf_sys_exit_recv", "syscalls", &names("sys_exit_", RECV_SYSCALLS));
                let hook = format!("tracepoint syscalls:sys_exit_{{{}}}", RECV_SYSCALLS.join(","));
                (hook, r, vec!["pf_sys_exit_recv"])
            }
            _ => {
                let hooks = g.hooks();
                let (hook, r) = self.first_of(hooks);
                (hook, r, hooks.iter().map(Hook::program).collect())
            }
        }
    }

    /// `stages` from the attached groups: each asked global stage and its hook.
    fn stage_table(&mut self) {
        let get = |g: Group| -> (String, Result<(), String>) {
            match self.groups.get(&g) {
                Some(a) => (a.hook.clone(), a.state.clone()),
                None => ("not asked for".into(), Err("not asked for (--stages)".into())),
            }
        };
        // One stage served by a TCP hook and a UDP hook (or by one, `--proto`).
        let protos = self.protos;
        let both = |t: (String, Result<(), String>), u: (String, Result<(), String>)| {
            if protos & PROTO_UDP == 0 {
                return (format!("{} (TCP)", t.0), t.1);
            }
            if protos & PROTO_TCP == 0 {
                return (format!("{} (UDP)", u.0), u.1);
            }
            let hook = format!("{} (TCP), {} (UDP)", t.0, u.0);
            let state = match (&t.1, &u.1) {
                (Ok(()), Ok(())) => Ok(()),
                (Err(e), Ok(())) => Err(format!("TCP: {e}")),
                (Ok(()), Err(e)) => Err(format!("UDP: {e}")),
                (Err(a), Err(b)) => Err(format!("TCP: {a}; UDP: {b}")),
            };
            (hook, state)
        };
        let send = get(Group::SendSyscalls);
        let sock_send = both(get(Group::TcpSend), get(Group::UdpSend));
        let send_ok = match (&send.1, &sock_send.1) {
            (Err(e), _) => Err(e.clone()),
            (Ok(()), r) => r.clone(),
        };
        let rows = [
            (Stage::SendSyscall, (send.0, send_ok)),
            (Stage::SockSend, sock_send),
            (Stage::IpSend, get(Group::IpSend)),
            (Stage::DevQueue, get(Group::DevQueue)),
            (Stage::NicXmit, get(Group::NicXmit)),
            (Stage::NetifReceive, get(Group::NetifReceive)),
            (Stage::IpRcv, get(Group::IpRcv)),
            (Stage::TransportRcv, both(get(Group::TcpRcv), get(Group::UdpRcv))),
            (Stage::SockQueue, get(Group::SockQueue)),
            (Stage::CopyToUser, both(get(Group::TcpCopy), get(Group::UdpCopy))),
            (Stage::RecvSyscall, get(Group::RecvSyscalls)),
            (Stage::Woken, get(Group::Woken)),
            (Stage::OnCpu, get(Group::OnCpu)),
        ];
        self.stages.retain(|s, _| s.is_per_interface());
        for (s, (hook, state)) in rows {
            if self.asked.contains(s) {
                self.stages.insert(s, StageHook { hook, state });
            }
        }
        self.refresh_interface_stages();
    }

    /// One line per stage this kernel cannot serve, in kernel order; the optional
    /// IP-layer stages share a line when they are missing for one reason.
    pub fn unavailable(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut optional: Vec<(&str, &String)> = Vec::new();
        for s in Stage::KERNEL_ORDER {
            let Some(StageHook { state: Err(e), .. }) = self.stages.get(&s) else { continue };
            if s.is_optional() {
                optional.push((s.name(), e));
            } else {
                out.push(format!("stage {} unavailable: {e}", s.name()));
            }
        }
        match optional.as_slice() {
            [] => {}
            [(_, e), rest @ ..] if rest.iter().all(|(_, r)| r == e) => {
                let names: Vec<&str> = optional.iter().map(|(n, _)| *n).collect();
                out.push(format!("optional stages {} not traced: {e}", names.join(", ")));
            }
            _ => out.extend(optional.iter().map(|(n, e)| format!("optional stage {n} not traced: {e}"))),
        }
        out
    }
}
