//! Connection establishment records: the TCP handshake seen from both ends, from the
//! client's connect() to the server's accept(). They travel in the same 64-byte [`Event`]
//! as the packet stages, with a stage number from [`ConnStage`] (at least
//! [`ConnStage::BASE`], so they never collide with a packet [`crate::Stage`]).
//!
//! Every connection record is oriented client → server: `saddr`/`sport` is the end that
//! called connect(), `daddr`/`dport` the listener's, whatever the direction of the packet
//! or the side of the socket the hook saw. The other fields, per stage:
//!
//! | stage                        | `seq`                | `len`               | `aux`        | `aux2`          |
//! |------------------------------|----------------------|---------------------|--------------|-----------------|
//! | `connect`, `accepted`        |                      |                     | tgid         | tid             |
//! | `connect_return`             | return value (i32)   |                     | tgid         | tid             |
//! | `syn_rcvd`, `ack_rcvd`       | SYN-queue length     | accept-queue length | listen limit | tcp_syncookies  |
//! | `failed`                     | the socket's error   |                     |              |                 |
//!
//! Queue lengths are the listener's at the moment the segment reached it, before the
//! kernel acted on it: a SYN that finds `len > aux` (the accept queue over its limit, the
//! kernel's `sk_acceptq_is_full`) is dropped, and so is a handshake ACK.
//!
//! [`Event`]: crate::Event

/// One step of a TCP connection's establishment. Numbers are part of the record format:
/// never renumber, only append.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConnStage {
    /// The client entered connect() (syscalls:sys_enter_connect); written when its SYN
    /// leaves, which names the connection.
    Connect = 32,
    /// A SYN left the client (net:net_dev_queue): the first, and each retransmission.
    SynSent = 33,
    /// The client retransmitted its SYN (tcp:tcp_retransmit_skb in SYN_SENT).
    SynRetrans = 34,
    /// A SYN reached the listener (cgroup_skb ingress on the listening socket).
    SynRcvd = 35,
    /// A SYN-ACK left the server (net:net_dev_queue).
    SynAckSent = 36,
    /// The server retransmitted its SYN-ACK (tcp:tcp_retransmit_synack).
    SynAckRetrans = 37,
    /// The client's socket became established: the SYN-ACK arrived, the ACK is sent
    /// (sock:inet_sock_set_state SYN_SENT → ESTABLISHED).
    Established = 38,
    /// A handshake ACK reached the listener (cgroup_skb ingress on the listening socket).
    AckRcvd = 39,
    /// The server's child socket was created and put on the accept queue
    /// (sock:inet_sock_set_state SYN_RECV → ESTABLISHED).
    Queued = 40,
    /// accept()/accept4() returned the connection to the application.
    Accepted = 41,
    /// connect() returned.
    ConnectReturn = 42,
    /// The client's socket gave up before it was established (SYN_SENT → CLOSE): refused
    /// (a RST), timed out, unreachable.
    Failed = 43,
}

impl ConnStage {
    pub const BASE: u8 = 32;

    pub const ALL: [ConnStage; 12] = [
        ConnStage::Connect,
        ConnStage::SynSent,
        ConnStage::SynRetrans,
        ConnStage::SynRcvd,
        ConnStage::SynAckSent,
        ConnStage::SynAckRetrans,
        ConnStage::Established,
        ConnStage::AckRcvd,
        ConnStage::Queued,
        ConnStage::Accepted,
        ConnStage::ConnectReturn,
        ConnStage::Failed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            ConnStage::Connect => "connect",
            ConnStage::SynSent => "syn_sent",
            ConnStage::SynRetrans => "syn_retransmit",
            ConnStage::SynRcvd => "syn_rcvd",
            ConnStage::SynAckSent => "synack_sent",
            ConnStage::SynAckRetrans => "synack_retransmit",
            ConnStage::Established => "established",
            ConnStage::AckRcvd => "ack_rcvd",
            ConnStage::Queued => "queued",
            ConnStage::Accepted => "accepted",
            ConnStage::ConnectReturn => "connect_return",
            ConnStage::Failed => "failed",
        }
    }

    pub const fn from_u8(v: u8) -> Option<ConnStage> {
        if v >= Self::BASE && ((v - Self::BASE) as usize) < Self::ALL.len() {
            Some(Self::ALL[(v - Self::BASE) as usize])
        } else {
            None
        }
    }

    pub fn from_name(name: &str) -> Option<ConnStage> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Seen on the client's side (its process, its socket, its SYN).
    pub const fn is_client(self) -> bool {
        matches!(
            self,
            ConnStage::Connect
                | ConnStage::SynSent
                | ConnStage::SynRetrans
                | ConnStage::Established
                | ConnStage::ConnectReturn
                | ConnStage::Failed
        )
    }
}
