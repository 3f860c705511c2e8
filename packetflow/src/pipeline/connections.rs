//! Connection records → connection traces: joins the handshake steps of both ends by the
//! connection's two addresses (`model::connection`), and hands each connection on once
//! nothing more is expected of it, or it has been idle for `timeout_ns`.

use std::net::SocketAddr;

use packetflow_common::{ConnStage, Event};
use rustc_hash::FxHashMap as HashMap;

use crate::{
    model::connection::{Connection, Step},
    pipeline::comm::CommCache,
};

/// Connections held at most; past it the longest idle one is handed on as it is
/// (counted in `evicted`).
const MAX_OPEN: usize = 65_536;

pub struct Tracker {
    open: HashMap<(SocketAddr, SocketAddr), Connection>,
    comms: CommCache,
    /// A connection with no new step for this long is handed on as it is: SYN
    /// retransmissions back off to 16 s and more, so well above that.
    pub timeout_ns: u64,
    pub records: u64,
    pub evicted: u64,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            open: HashMap::default(),
            comms: CommCache::default(),
            timeout_ns: 30_000_000_000,
            records: 0,
            evicted: 0,
        }
    }
}

impl Tracker {
    /// Takes a connection record; `false` when `e` is not one (a packet-stage record).
    pub fn push(&mut self, e: &Event, emit: &mut impl FnMut(Connection)) -> bool {
        let Some(stage) = ConnStage::from_u8(e.stage) else { return false };
        self.records += 1;
        let fresh = Connection::new(e);
        let key = (fresh.client, fresh.server);
        // The same two ends again once the last connection is over (a port reused).
        if let Some(c) = self.open.get(&key)
            && c.done()
            && matches!(stage, ConnStage::Connect | ConnStage::SynRcvd)
            && c.has(stage)
            && let Some(old) = self.open.remove(&key)
        {
            emit(old);
        }
        if self.open.len() >= MAX_OPEN && !self.open.contains_key(&key) {
            self.evict_one(emit);
        }
        let c = self.open.entry(key).or_insert(fresh);
        let step = Step::of(e, stage);
        if let Some((pid, _)) = match step.detail {
            crate::model::connection::Detail::Task { pid, tid } => Some((pid, tid)),
            _ => None,
        } {
            // Read while the process most likely still runs.
            self.comms.note(pid);
            let comm = self.comms.get(pid);
            if stage == ConnStage::Connect {
                c.connect_comm = comm;
            } else {
                c.accept_comm = comm;
            }
        }
        c.add(step);
        true
    }

    fn evict_one(&mut self, emit: &mut impl FnMut(Connection)) {
        let oldest = self.open.iter().min_by_key(|(_, c)| c.steps.last().map_or(0, |s| s.ts_ns)).map(|(k, _)| *k);
        if let Some(c) = oldest.and_then(|k| self.open.remove(&k)) {
            self.evicted += 1;
            emit(c);
        }
    }

    /// Hands on the connections that are done and older than `watermark` (every record
    /// before it has arrived), and those idle for `timeout_ns`.
    pub fn advance(&mut self, watermark: u64, emit: &mut impl FnMut(Connection)) {
        let idle = watermark.saturating_sub(self.timeout_ns);
        let mut finished: Vec<_> = self
            .open
            .iter()
            .filter(|(_, c)| (c.done() && c.idle_since(watermark)) || c.idle_since(idle))
            .map(|(k, c)| (c.start_ns(), *k))
            .collect();
        finished.sort_unstable();
        for (_, k) in finished {
            if let Some(c) = self.open.remove(&k) {
                emit(c);
            }
        }
    }

    /// Hands on every connection left (end of the run).
    pub fn flush(&mut self, emit: &mut impl FnMut(Connection)) {
        let mut left: Vec<Connection> = self.open.drain().map(|(_, c)| c).collect();
        left.sort_by_key(Connection::start_ns);
        for c in left {
            emit(c);
        }
    }

    pub fn open(&self) -> usize {
        self.open.len()
    }
}
