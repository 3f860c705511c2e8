//! The connection-establishment hooks (`trace --connections`): which program serves each
//! step of the handshake (`ConnStage`), attached together for the whole run. The
//! programs are in packetflow-ebpf/src/probes/connect.rs; the records they write are
//! described in packetflow-common/src/conn.rs.
//!
//! | step                        | hook                                                      |
//! |-----------------------------|-----------------------------------------------------------|
//! | connect                     | tracepoint syscalls:sys_enter_connect (written at the SYN) |
//! | syn_sent, synack_sent       | tp_btf net_dev_queue                                      |
//! | syn_retransmit              | tp_btf tcp_retransmit_skb (socket in SYN_SENT)            |
//! | syn_rcvd, ack_rcvd          | cgroup_skb/ingress on the listening socket                |
//! | synack_retransmit           | tp_btf tcp_retransmit_synack                              |
//! | established, queued, failed | tp_btf inet_sock_set_state                                |
//! | accepted                    | tracepoint syscalls:sys_exit_{accept,accept4}             |
//! | connect_return              | tracepoint syscalls:sys_exit_connect                      |

use aya::programs::CgroupSkbAttachType;
use packetflow_common::ConnStage;

use crate::kernel::{hook_kinds::Hook, loader::Tracer};

/// One program of the set and the steps it writes.
struct ConnHook {
    how: How,
    stages: &'static [ConnStage],
}

enum How {
    /// A tracepoint program on syscalls:`names`.
    Syscalls(&'static str, &'static [&'static str]),
    Other(Hook),
}

const HOOKS: &[ConnHook] = &[
    ConnHook { how: How::Syscalls("pf_conn_connect", &["sys_enter_connect"]), stages: &[ConnStage::Connect] },
    ConnHook {
        how: How::Other(Hook::TpBtf("pf_conn_syn_out", "net_dev_queue")),
        stages: &[ConnStage::Connect, ConnStage::SynSent, ConnStage::SynAckSent],
    },
    ConnHook {
        how: How::Other(Hook::TpBtf("pf_conn_syn_retrans", "tcp_retransmit_skb")),
        stages: &[ConnStage::SynRetrans],
    },
    ConnHook {
        how: How::Other(Hook::Cgroup("pf_conn_listener", CgroupSkbAttachType::Ingress)),
        stages: &[ConnStage::SynRcvd, ConnStage::AckRcvd],
    },
    ConnHook {
        how: How::Other(Hook::TpBtf("pf_conn_synack_retrans", "tcp_retransmit_synack")),
        stages: &[ConnStage::SynAckRetrans],
    },
    ConnHook {
        how: How::Other(Hook::TpBtf("pf_conn_state", "inet_sock_set_state")),
        stages: &[ConnStage::Established, ConnStage::Queued, ConnStage::Failed],
    },
    ConnHook {
        how: How::Syscalls("pf_conn_accept_exit", &["sys_exit_accept", "sys_exit_accept4"]),
        stages: &[ConnStage::Accepted],
    },
    ConnHook { how: How::Syscalls("pf_conn_connect_exit", &["sys_exit_connect"]), stages: &[ConnStage::ConnectReturn] },
];

/// How one step of the handshake is observed on this kernel.
#[derive(Clone, Debug)]
pub struct ConnHookState {
    pub stage: ConnStage,
    pub hook: String,
    pub state: Result<(), String>,
}

impl Tracer {
    /// Attaches every connection hook; a hook that fails leaves its steps missing (said
    /// per step in `conn_hooks`), not the run. Fails only when none attached.
    pub fn attach_connections(&mut self) -> anyhow::Result<()> {
        let mut per_stage: Vec<ConnHookState> = Vec::new();
        for h in HOOKS {
            let (hook, state) = match &h.how {
                How::Syscalls(prog, names) => {
                    let names: Vec<String> = names.iter().map(|n| (*n).to_string()).collect();
                    let hook = format!("tracepoint syscalls:{}", names.join(","));
                    (hook, self.tracepoint(prog, "syscalls", &names))
                }
                How::Other(hook) => self.first_of(std::slice::from_ref(hook)),
            };
            for s in h.stages {
                match per_stage.iter_mut().find(|p| p.stage == *s) {
                    // `connect` needs both its hooks.
                    Some(p) => {
                        p.hook = format!("{} + {hook}", p.hook);
                        if p.state.is_ok() {
                            p.state.clone_from(&state);
                        }
                    }
                    None => per_stage.push(ConnHookState { stage: *s, hook: hook.clone(), state: state.clone() }),
                }
            }
        }
        per_stage.sort_by_key(|p| p.stage);
        if per_stage.iter().all(|p| p.state.is_err()) {
            let why = per_stage[0].state.clone().err().unwrap_or_default();
            crate::user_bail!("no connection hook could be attached on this kernel ({why}); run `packetflow doctor`");
        }
        self.conn_hooks = per_stage;
        Ok(())
    }

    /// One line per handshake step this kernel cannot observe.
    pub fn conn_unavailable(&self) -> Vec<String> {
        self.conn_hooks
            .iter()
            .filter_map(|p| {
                p.state.as_ref().err().map(|e| format!("connection step {} unavailable: {e}", p.stage.name()))
            })
            .collect()
    }
}
