//! A TCP connection's establishment, as `trace --connections` joins it: every step seen
//! on either end (`ConnStage`, records described in packetflow-common/src/conn.rs), and
//! what follows from them: the outcome, the handshake time, the accept-queue wait, queue
//! overflows. `ConnStats` adds connections up per listener.

use std::{collections::BTreeMap, net::SocketAddr};

use hdrhistogram::Histogram;
use packetflow_common::{ConnStage, Event};

use crate::model::trace::ip;

const EINPROGRESS: i32 = 115;
const ECONNREFUSED: i32 = 111;
const ETIMEDOUT: i32 = 110;

/// A listener's queues when a SYN or handshake ACK reached it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queues {
    /// Request sockets waiting for their handshake ACK (the SYN queue).
    pub syn: u32,
    /// Established connections waiting for accept() (`ss -lnt` Recv-Q).
    pub accept: u32,
    /// The listen() backlog as the kernel applies it (`ss -lnt` Send-Q).
    pub limit: u32,
    /// The listener's network namespace's net.ipv4.tcp_syncookies.
    pub syncookies: u8,
}

impl Queues {
    /// The kernel drops a SYN or handshake ACK that finds more than `limit` connections
    /// waiting (`sk_acceptq_is_full`): so a backlog of 4 holds 5.
    pub fn accept_full(&self) -> bool {
        self.accept > self.limit
    }

    /// A SYN answered with a cookie instead of a request socket: always with
    /// tcp_syncookies=2, and with 1 once the SYN queue is full.
    pub fn cookie(&self) -> bool {
        self.syncookies == 2 || (self.syncookies == 1 && self.syn >= self.limit)
    }
}

/// What a step carries besides its time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detail {
    None,
    /// connect() or accept(): the process and thread.
    Task {
        pid: u32,
        tid: u32,
    },
    /// connect()'s return value.
    Ret(i32),
    /// The client socket's error when it gave up (errno).
    Error(i32),
    Queues(Queues),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub stage: ConnStage,
    pub ts_ns: u64,
    pub detail: Detail,
}

impl Step {
    /// The step a connection record describes.
    pub fn of(e: &Event, stage: ConnStage) -> Step {
        let detail = match stage {
            ConnStage::Connect | ConnStage::Accepted => Detail::Task { pid: e.aux, tid: e.aux2 },
            ConnStage::ConnectReturn => Detail::Ret(e.seq as i32),
            ConnStage::Failed => Detail::Error(e.seq as i32),
            ConnStage::SynRcvd | ConnStage::AckRcvd => {
                Detail::Queues(Queues { syn: e.seq, accept: e.len, limit: e.aux, syncookies: e.aux2 as u8 })
            }
            _ => Detail::None,
        };
        Step { stage, ts_ns: e.ts_ns, detail }
    }
}

/// Why a listener dropped a SYN or handshake ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// The accept queue was over its limit (ListenOverflows).
    AcceptQueueFull(Queues),
    /// Something else: a full SYN queue without SYN cookies, memory (ListenDrops counts
    /// these and the overflows).
    Other(Queues),
}

impl Drop {
    pub fn describe(self) -> String {
        match self {
            Drop::AcceptQueueFull(q) => format!("accept queue full: {} waiting, limit {}", q.accept, q.limit),
            Drop::Other(q) if q.syncookies != 2 && q.syn >= q.limit => {
                format!("SYN queue full: {} waiting, limit {}, syncookies {}", q.syn, q.limit, q.syncookies)
            }
            Drop::Other(q) => {
                format!("dropped by the listener ({} in the SYN queue, {} accept queue)", q.syn, q.accept)
            }
        }
    }
}

/// How a connection ended, as far as the trace saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// accept() returned it to the server application.
    Accepted,
    /// The client's socket is established; the server end was not seen (another host,
    /// or the listener's traffic not traced).
    Established,
    /// Established and on the accept queue, never accepted while traced.
    NotAccepted,
    /// The client is established, but the listener dropped its handshake ACK and never
    /// queued the connection (a half-open connection: the client learns it when it sends).
    HandshakeDropped,
    /// A RST answered the SYN: no listener on that port.
    Refused,
    /// The client gave up after its SYN retransmissions.
    TimedOut,
    /// The client's application closed the socket before any answer came.
    Abandoned,
    /// connect() failed otherwise (the error is on the trace).
    Failed,
    /// Not one of the above when the trace ended (the run stopped, or steps are missing).
    Incomplete,
}

impl Outcome {
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Established => "established",
            Outcome::NotAccepted => "not_accepted",
            Outcome::HandshakeDropped => "handshake_dropped",
            Outcome::Refused => "refused",
            Outcome::TimedOut => "timed_out",
            Outcome::Abandoned => "abandoned",
            Outcome::Failed => "failed",
            Outcome::Incomplete => "incomplete",
        }
    }
}

/// One connection: its two ends and every step seen, in time order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub steps: Vec<Step>,
    pub connect_comm: Option<String>,
    pub accept_comm: Option<String>,
}

impl Connection {
    pub fn new(e: &Event) -> Connection {
        Connection {
            client: SocketAddr::new(ip(e.is_v6(), &e.saddr), e.sport),
            server: SocketAddr::new(ip(e.is_v6(), &e.daddr), e.dport),
            steps: Vec::new(),
            connect_comm: None,
            accept_comm: None,
        }
    }

    /// Adds a step, keeping time order (records from different CPUs arrive out of order).
    pub fn add(&mut self, s: Step) {
        let at = self.steps.partition_point(|x| x.ts_ns <= s.ts_ns);
        self.steps.insert(at, s);
    }

    pub fn first(&self, stage: ConnStage) -> Option<&Step> {
        self.steps.iter().find(|s| s.stage == stage)
    }

    pub fn has(&self, stage: ConnStage) -> bool {
        self.first(stage).is_some()
    }

    pub fn count(&self, stage: ConnStage) -> usize {
        self.steps.iter().filter(|s| s.stage == stage).count()
    }

    fn last_ts(&self) -> u64 {
        self.steps.last().map_or(0, |s| s.ts_ns)
    }

    pub fn start_ns(&self) -> u64 {
        self.steps.first().map_or(0, |s| s.ts_ns)
    }

    /// (pid, tid) of a connect or accept step.
    pub fn task(&self, stage: ConnStage) -> Option<(u32, u32)> {
        match self.first(stage)?.detail {
            Detail::Task { pid, tid } => Some((pid, tid)),
            _ => None,
        }
    }

    pub fn connect_ret(&self) -> Option<i32> {
        match self.first(ConnStage::ConnectReturn)?.detail {
            Detail::Ret(r) => Some(r),
            _ => None,
        }
    }

    /// The client's error: from its socket (0: closed with none), or connect()'s return
    /// value.
    pub fn error(&self) -> Option<i32> {
        if let Some(Step { detail: Detail::Error(e), .. }) = self.first(ConnStage::Failed) {
            return Some(*e);
        }
        self.connect_ret().filter(|r| *r < 0 && *r != -EINPROGRESS).map(|r| -r)
    }

    pub fn outcome(&self) -> Outcome {
        if self.has(ConnStage::Accepted) {
            return Outcome::Accepted;
        }
        match self.error() {
            Some(ECONNREFUSED) => return Outcome::Refused,
            Some(ETIMEDOUT) => return Outcome::TimedOut,
            Some(0) => return Outcome::Abandoned,
            Some(_) => return Outcome::Failed,
            None => {}
        }
        if self.has(ConnStage::Queued) {
            Outcome::NotAccepted
        } else if self.has(ConnStage::Established) && self.drops().any(|(s, _)| s.stage == ConnStage::AckRcvd) {
            Outcome::HandshakeDropped
        } else if self.has(ConnStage::Established) {
            Outcome::Established
        } else {
            Outcome::Incomplete
        }
    }

    fn client_seen(&self) -> bool {
        self.steps.iter().any(|s| s.stage.is_client() && s.stage != ConnStage::SynSent)
    }

    fn server_seen(&self) -> bool {
        self.steps.iter().any(|s| {
            matches!(s.stage, ConnStage::SynRcvd | ConnStage::AckRcvd | ConnStage::Queued | ConnStage::Accepted)
        })
    }

    /// Nothing more is expected: each end seen has reached its last step (the client's
    /// connect() returned with an answer, the server's accept() returned or the client
    /// gave up).
    pub fn done(&self) -> bool {
        let answered = self.has(ConnStage::Established) || self.has(ConnStage::Failed);
        let client_done = !self.client_seen()
            || match self.connect_ret() {
                Some(r) if r == -EINPROGRESS => answered,
                Some(_) => true,
                None => !self.has(ConnStage::Connect) && answered,
            };
        let server_done = !self.server_seen() || self.has(ConnStage::Accepted) || self.has(ConnStage::Failed);
        (self.client_seen() || self.server_seen()) && client_done && server_done
    }

    /// From the first SYN (sent, or received where the client was not seen) to the
    /// connection on the server's accept queue, or else to the client established:
    /// retransmissions and drops included, as the application waits them out.
    pub fn handshake_ns(&self) -> Option<u64> {
        let start = [ConnStage::Connect, ConnStage::SynSent, ConnStage::SynRcvd]
            .iter()
            .filter_map(|s| self.first(*s).map(|x| x.ts_ns))
            .min()?;
        let end = self.first(ConnStage::Queued).or_else(|| self.first(ConnStage::Established))?.ts_ns;
        end.checked_sub(start)
    }

    /// From the child socket queued to accept() returning it.
    pub fn accept_wait_ns(&self) -> Option<u64> {
        let q = self.first(ConnStage::Queued)?.ts_ns;
        self.first(ConnStage::Accepted)?.ts_ns.checked_sub(q)
    }

    /// The SYNs and handshake ACKs of this connection the listener dropped, seen by
    /// what did not follow: a SYN no SYN-ACK answered before the next SYN, a handshake
    /// ACK after which no child socket was queued before the next ACK. Each with why,
    /// from the queues the segment found when it reached the listener. The kernel
    /// decides a few µs later (later still when the application holds the listener's
    /// lock: the segment waits in the socket's backlog), so a connection another CPU
    /// queued meanwhile can make a drop counted `Other` here an overflow to the kernel:
    /// the drops are exact, their split can be off where a queue was one short of full.
    pub fn drops(&self) -> impl Iterator<Item = (&Step, Drop)> {
        self.steps.iter().enumerate().filter_map(move |(i, s)| {
            let (Detail::Queues(q), answer) = (
                s.detail,
                match s.stage {
                    ConnStage::SynRcvd => ConnStage::SynAckSent,
                    ConnStage::AckRcvd => ConnStage::Queued,
                    _ => return None,
                },
            ) else {
                return None;
            };
            let answered = self.steps[i + 1..].iter().take_while(|x| x.stage != s.stage).any(|x| x.stage == answer);
            if answered {
                return None;
            }
            // The kernel checks the SYN queue first (no cookies: a full one drops the SYN).
            let syn_queue_full = s.stage == ConnStage::SynRcvd && q.syncookies == 0 && q.syn > q.limit;
            Some((s, if q.accept_full() && !syn_queue_full { Drop::AcceptQueueFull(q) } else { Drop::Other(q) }))
        })
    }

    /// Drops for a full accept queue (the kernel's ListenOverflows).
    pub fn overflows(&self) -> usize {
        self.drops().filter(|(_, d)| matches!(d, Drop::AcceptQueueFull(_))).count()
    }

    /// The listener's accept-queue length when this connection's handshake ACK got in
    /// (the connections ahead of it).
    pub fn queue_position(&self) -> Option<u32> {
        let q = self.first(ConnStage::Queued)?.ts_ns;
        self.steps.iter().rev().find_map(|s| match (s.stage, s.detail) {
            (ConnStage::AckRcvd, Detail::Queues(x)) if s.ts_ns <= q => Some(x.accept),
            _ => None,
        })
    }

    pub fn cookie(&self) -> bool {
        self.steps.iter().any(|s| matches!((s.stage, s.detail), (ConnStage::SynRcvd, Detail::Queues(q)) if q.cookie()))
    }

    /// Only segments reaching a listener without a SYN: no handshake, a late ACK of a
    /// connection already gone (the listener answers it with a RST).
    pub fn is_stray(&self) -> bool {
        self.steps.iter().all(|s| s.stage == ConnStage::AckRcvd)
    }

    /// Idle since `ts_ns`: no step after it.
    pub fn idle_since(&self, ts_ns: u64) -> bool {
        self.last_ts() <= ts_ns
    }
}

/// The name of an errno a connection can end with.
pub fn errno_name(e: i32) -> String {
    match e {
        ECONNREFUSED => "ECONNREFUSED".into(),
        ETIMEDOUT => "ETIMEDOUT".into(),
        101 => "ENETUNREACH".into(),
        113 => "EHOSTUNREACH".into(),
        104 => "ECONNRESET".into(),
        99 => "EADDRNOTAVAIL".into(),
        e => format!("errno {e}"),
    }
}

/// 1 ns to 100 s (longer set-ups are counted at 100 s), 2 significant digits: about
/// 30 KiB each, two per listener.
fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 2).expect("valid histogram bounds")
}

/// One listener's connections, added up.
#[derive(Clone, Debug)]
pub struct ListenerStats {
    pub outcomes: BTreeMap<Outcome, u64>,
    pub handshake: Histogram<u64>,
    pub accept_wait: Histogram<u64>,
    /// Highest accept-queue and SYN-queue lengths seen, and the latest.
    pub max_accept: u32,
    pub max_syn: u32,
    pub last: Option<Queues>,
    pub limit: u32,
    pub overflows: u64,
    /// Other SYNs and handshake ACKs the listener dropped (`Drop::Other`).
    pub other_drops: u64,
    pub syn_retransmits: u64,
    pub synack_retransmits: u64,
    pub cookies: u64,
}

impl Default for ListenerStats {
    fn default() -> Self {
        ListenerStats {
            outcomes: BTreeMap::new(),
            handshake: hist(),
            accept_wait: hist(),
            max_accept: 0,
            max_syn: 0,
            last: None,
            limit: 0,
            overflows: 0,
            other_drops: 0,
            syn_retransmits: 0,
            synack_retransmits: 0,
            cookies: 0,
        }
    }
}

impl ListenerStats {
    pub fn connections(&self) -> u64 {
        self.outcomes.values().sum()
    }
}

/// Listeners kept apart at most; connections to more go under `OTHER_LISTENERS` (a
/// tracer left running sees connections to any number of remote servers). With two
/// histograms each, 64 listeners hold about 4 MiB.
pub const MAX_LISTENERS: usize = 64;
/// The key they go under: 0.0.0.0:0.
pub const OTHER_LISTENERS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Connections per listener (the server's address as the clients named it).
#[derive(Clone, Debug, Default)]
pub struct ConnStats {
    pub listeners: BTreeMap<SocketAddr, ListenerStats>,
    /// Stray segments (`Connection::is_stray`): not connections, not counted in them.
    pub strays: u64,
}

impl ConnStats {
    pub fn record(&mut self, c: &Connection) {
        if c.is_stray() {
            self.strays += 1;
            return;
        }
        let key = if self.listeners.len() >= MAX_LISTENERS && !self.listeners.contains_key(&c.server) {
            OTHER_LISTENERS
        } else {
            c.server
        };
        let l = self.listeners.entry(key).or_default();
        *l.outcomes.entry(c.outcome()).or_default() += 1;
        if let Some(h) = c.handshake_ns() {
            l.handshake.saturating_record(h.max(1));
        }
        if let Some(w) = c.accept_wait_ns() {
            l.accept_wait.saturating_record(w.max(1));
        }
        for s in &c.steps {
            if let Detail::Queues(q) = s.detail {
                l.max_accept = l.max_accept.max(q.accept);
                l.max_syn = l.max_syn.max(q.syn);
                l.limit = q.limit;
                l.last = Some(q);
            }
        }
        let overflows = c.overflows() as u64;
        l.overflows += overflows;
        l.other_drops += c.drops().count() as u64 - overflows;
        l.syn_retransmits += c.count(ConnStage::SynRetrans) as u64;
        l.synack_retransmits += c.count(ConnStage::SynAckRetrans) as u64;
        l.cookies += u64::from(c.cookie());
    }

    pub fn connections(&self) -> u64 {
        self.listeners.values().map(ListenerStats::connections).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(stage: ConnStage, ts: u64) -> (Event, ConnStage) {
        let mut e = Event::ZERO;
        e.saddr[..4].copy_from_slice(&[198, 18, 0, 1]);
        e.daddr[..4].copy_from_slice(&[198, 18, 0, 2]);
        e.sport = 40000;
        e.dport = 8080;
        e.ts_ns = ts;
        (e, stage)
    }

    fn conn(steps: &[(ConnStage, u64, u32, u32, u32)]) -> Connection {
        let (e, _) = ev(ConnStage::Connect, 0);
        let mut c = Connection::new(&e);
        for &(stage, ts, seq, len, aux) in steps {
            let (mut e, _) = ev(stage, ts);
            (e.seq, e.len, e.aux) = (seq, len, aux);
            c.add(Step::of(&e, stage));
        }
        c
    }

    #[test]
    fn accepted_connection_times() {
        use ConnStage::*;
        let c = conn(&[
            (Connect, 100, 0, 0, 7),
            (SynSent, 110, 0, 0, 0),
            (SynRcvd, 120, 0, 2, 4),
            (SynAckSent, 130, 0, 0, 0),
            (Established, 140, 0, 0, 0),
            (ConnectReturn, 150, 0, 0, 7),
            (AckRcvd, 145, 0, 2, 4),
            (Queued, 148, 0, 0, 0),
            (Accepted, 1148, 0, 0, 9),
        ]);
        assert!(c.done());
        assert_eq!(c.outcome(), Outcome::Accepted);
        assert_eq!(c.handshake_ns(), Some(48));
        assert_eq!(c.accept_wait_ns(), Some(1000));
        assert_eq!(c.queue_position(), Some(2));
        assert_eq!(c.drops().count(), 0);
        assert_eq!(c.steps.iter().map(|s| s.ts_ns).collect::<Vec<_>>(), [100, 110, 120, 130, 140, 145, 148, 150, 1148]);
    }

    #[test]
    fn refused_and_overflow() {
        use ConnStage::*;
        let r = conn(&[(Connect, 1, 0, 0, 7), (SynSent, 2, 0, 0, 0), (Failed, 3, 111, 0, 0)]);
        assert!(!r.done(), "connect() has not returned yet");
        let mut r2 = r.clone();
        r2.add(Step::of(
            &{
                let (mut e, _) = ev(ConnectReturn, 4);
                e.seq = (-111i32) as u32;
                e
            },
            ConnectReturn,
        ));
        assert!(r2.done());
        assert_eq!(r2.outcome(), Outcome::Refused);

        let o = conn(&[
            (SynRcvd, 1, 0, 5, 4),
            (SynRcvd, 1_000_000_001, 4, 3, 4),
            (SynRcvd, 3_000_000_001, 0, 3, 4),
            (SynAckSent, 3_000_000_010, 0, 0, 0),
            (AckRcvd, 3_000_000_050, 1, 3, 4),
            (Queued, 3_000_000_100, 0, 0, 0),
        ]);
        assert_eq!(o.overflows(), 1, "5 waiting over a backlog of 4: dropped");
        let d: Vec<String> = o.drops().map(|(_, d)| d.describe()).collect();
        assert_eq!(d, ["accept queue full: 5 waiting, limit 4", "SYN queue full: 4 waiting, limit 4, syncookies 0"]);
        assert!(!o.done(), "not accepted yet");
        assert_eq!(o.outcome(), Outcome::NotAccepted);
        let mut s = ConnStats::default();
        s.record(&o);
        let l = &s.listeners[&o.server];
        assert_eq!((l.overflows, l.other_drops, l.max_accept, l.limit), (1, 1, 5, 4));
        assert_eq!(o.queue_position(), Some(3));
    }
}
