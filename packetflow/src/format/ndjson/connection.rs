//! The `connection` line: one TCP connection's establishment (`model::connection`), with
//! every step seen on either end. Written by `JsonSink::connection`, read back by
//! `format::recording` (`to_connection`), so `report` sees what `trace` saw.

use std::net::{IpAddr, SocketAddr};

use packetflow_common::ConnStage;
use serde::{Deserialize, Serialize};

use super::{Name, SCHEMA_VERSION};
use crate::model::connection::{Connection, Detail, Queues, Step, errno_name};

#[derive(Serialize, Deserialize)]
pub struct ConnectionJson {
    #[serde(rename = "type")]
    pub ty: Name,
    #[serde(skip_deserializing)]
    pub v: u64,
    #[serde(skip_deserializing)]
    pub family: Name,
    pub client: IpAddr,
    pub client_port: u16,
    pub server: IpAddr,
    pub server_port: u16,
    #[serde(skip_deserializing)]
    pub outcome: Name,
    /// The client's error (`ECONNREFUSED`, ...), when it failed.
    #[serde(skip_deserializing)]
    pub error: Option<String>,
    #[serde(skip_deserializing)]
    pub handshake_ns: Option<u64>,
    #[serde(skip_deserializing)]
    pub accept_wait_ns: Option<u64>,
    /// Connections ahead of this one on the accept queue when it got in.
    #[serde(skip_deserializing)]
    pub queue_position: Option<u32>,
    #[serde(skip_deserializing)]
    pub syn_retransmits: usize,
    #[serde(skip_deserializing)]
    pub synack_retransmits: usize,
    /// SYNs and handshake ACKs of this connection dropped for a full accept queue.
    #[serde(skip_deserializing)]
    pub overflows: usize,
    /// Every SYN and handshake ACK of it the listener dropped (overflows included).
    #[serde(skip_deserializing)]
    pub drops: usize,
    #[serde(skip_deserializing)]
    pub syn_cookie: bool,
    #[serde(skip_deserializing)]
    pub connect_pid: Option<u32>,
    #[serde(default)]
    pub connect_comm: Option<String>,
    #[serde(skip_deserializing)]
    pub accept_pid: Option<u32>,
    #[serde(default)]
    pub accept_comm: Option<String>,
    pub steps: Vec<StepJson>,
}

/// One step; the optional fields are those its kind carries (packetflow-common/src/conn.rs).
#[derive(Serialize, Deserialize)]
pub struct StepJson {
    pub step: Name,
    pub t_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syn_queue: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_queue: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syncookies: Option<u8>,
    /// Why the listener dropped this segment ("accept queue full: 5 waiting, limit 4"):
    /// `model::connection::Drop`.
    #[serde(default, skip_serializing_if = "Option::is_none", skip_deserializing)]
    pub dropped: Option<String>,
}

impl StepJson {
    fn new(s: &Step) -> StepJson {
        let mut j = StepJson {
            step: s.stage.name().into(),
            t_ns: s.ts_ns,
            pid: None,
            tid: None,
            ret: None,
            errno: None,
            syn_queue: None,
            accept_queue: None,
            limit: None,
            syncookies: None,
            dropped: None,
        };
        match s.detail {
            Detail::None => {}
            Detail::Task { pid, tid } => (j.pid, j.tid) = (Some(pid), Some(tid)),
            Detail::Ret(r) => j.ret = Some(r),
            Detail::Error(e) => j.errno = Some(e),
            Detail::Queues(q) => {
                (j.syn_queue, j.accept_queue, j.limit, j.syncookies) =
                    (Some(q.syn), Some(q.accept), Some(q.limit), Some(q.syncookies));
            }
        }
        j
    }

    fn to_step(&self) -> Result<Step, String> {
        let stage = ConnStage::from_name(&self.step).ok_or_else(|| format!("unknown step '{}'", self.step))?;
        let detail = match stage {
            ConnStage::Connect | ConnStage::Accepted => {
                Detail::Task { pid: self.pid.unwrap_or(0), tid: self.tid.unwrap_or(0) }
            }
            ConnStage::ConnectReturn => Detail::Ret(self.ret.unwrap_or(0)),
            ConnStage::Failed => Detail::Error(self.errno.unwrap_or(0)),
            ConnStage::SynRcvd | ConnStage::AckRcvd => Detail::Queues(Queues {
                syn: self.syn_queue.unwrap_or(0),
                accept: self.accept_queue.unwrap_or(0),
                limit: self.limit.unwrap_or(0),
                syncookies: self.syncookies.unwrap_or(0),
            }),
            _ => Detail::None,
        };
        Ok(Step { stage, ts_ns: self.t_ns, detail })
    }
}

impl ConnectionJson {
    pub fn new(c: &Connection) -> ConnectionJson {
        ConnectionJson {
            ty: "connection".into(),
            v: SCHEMA_VERSION,
            family: if c.client.is_ipv6() { "ipv6" } else { "ipv4" }.into(),
            client: c.client.ip(),
            client_port: c.client.port(),
            server: c.server.ip(),
            server_port: c.server.port(),
            outcome: c.outcome().name().into(),
            error: c.error().map(errno_name),
            handshake_ns: c.handshake_ns(),
            accept_wait_ns: c.accept_wait_ns(),
            queue_position: c.queue_position(),
            syn_retransmits: c.count(ConnStage::SynRetrans),
            synack_retransmits: c.count(ConnStage::SynAckRetrans),
            overflows: c.overflows(),
            drops: c.drops().count(),
            syn_cookie: c.cookie(),
            connect_pid: c.task(ConnStage::Connect).map(|t| t.0),
            connect_comm: c.connect_comm.clone(),
            accept_pid: c.task(ConnStage::Accepted).map(|t| t.0),
            accept_comm: c.accept_comm.clone(),
            steps: c
                .steps
                .iter()
                .map(|s| {
                    let mut j = StepJson::new(s);
                    j.dropped = c.drops().find(|(d, _)| std::ptr::eq(*d, s)).map(|(_, d)| d.describe());
                    j
                })
                .collect(),
        }
    }

    /// The connection as the live pipeline had it.
    pub fn to_connection(&self) -> Result<Connection, String> {
        let mut steps = self.steps.iter().map(StepJson::to_step).collect::<Result<Vec<_>, _>>()?;
        steps.sort_by_key(|s| s.ts_ns);
        Ok(Connection {
            client: SocketAddr::new(self.client, self.client_port),
            server: SocketAddr::new(self.server, self.server_port),
            steps,
            connect_comm: self.connect_comm.clone(),
            accept_comm: self.accept_comm.clone(),
        })
    }
}
