//! `packetflow capture`: its flags (the capture itself is in `capture/`).

use packetflow_common::capture::{DIR_IN, DIR_OUT};

use crate::{kernel::interfaces::XdpChoice, model::stage_set::StageSet};

/// Examples printed at the end of `capture --help`.
pub const EXAMPLES: &str = "Examples:
  packetflow capture -i lo -c 10 port 8080          ten packets of port 8080, as lines
  packetflow capture -i eth0 --stages -w out.pcapng tcp port 443   with stage times per packet
  packetflow capture -i veth0 --bypass -w - | tshark -r -   AF_XDP: the stack never sees them
  packetflow capture -r old.pcap -A 'tcp port 80'    read a file: the same filter and lines";

/// Capture packets (XDP in, tcx out) to pcapng or tcpdump-like lines; filter in the kernel.
///
/// With --bypass, AF_XDP instead: matching packets coming in are taken from the kernel
/// (the stack never sees them), for a mirror port or an interface kept for capture.
#[derive(clap::Args)]
pub struct Args {
    /// Interface (repeatable; IFACE@NETNS for another namespace; `any` = all).
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub ifaces: Vec<String>,
    /// Write pcapng to FILE (`-` for stdout) instead of printing lines.
    #[arg(short = 'w', value_name = "FILE")]
    pub write: Option<String>,
    /// Read packets from a pcap or pcapng FILE (`-` for stdin) instead of capturing: the
    /// same filter and lines; with -w, the packets kept are written again as pcapng.
    #[arg(short = 'r', value_name = "FILE", conflicts_with_all = ["ifaces", "bypass", "stages", "drops", "duration"])]
    pub read: Option<String>,
    /// With -w: go on in a new file once this one holds SIZE MB (1,000,000 bytes):
    /// FILE, FILE1, FILE2, ... (with -W: FILE0 to FILE(N-1), in turn).
    #[arg(short = 'C', value_name = "SIZE", requires = "write", value_parser = clap::value_parser!(u64).range(1..))]
    pub file_size: Option<u64>,
    /// With -w: go on in a new file every SECS seconds; strftime conversions in FILE
    /// (%Y%m%d-%H%M%S) name each file by its start.
    #[arg(short = 'G', value_name = "SECS", requires = "write", value_parser = clap::value_parser!(u64).range(1..))]
    pub rotate_secs: Option<u64>,
    /// With -C or -G: keep at most N files, reused in turn (a ring).
    #[arg(short = 'W', value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub file_count: Option<u32>,
    /// Stop after COUNT packets.
    #[arg(short = 'c', long, value_name = "COUNT")]
    pub count: Option<u64>,
    /// Accepted for tcpdump's sake (-n, -nn): packetflow never resolves names or ports.
    #[arg(short = 'n', action = clap::ArgAction::Count)]
    pub numeric: u8,
    /// Lines: also each IP header's fields (TTL, id, flags, length); with -r, packet comments.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Lines: also the link-level header (MAC addresses, EtherType).
    #[arg(short = 'e')]
    pub link: bool,
    /// Lines: also the packet in hex (-xx: with its link-level header).
    #[arg(short = 'x', action = clap::ArgAction::Count)]
    pub hex: u8,
    /// Lines: also the packet in hex and ASCII (-XX: with its link-level header).
    #[arg(short = 'X', action = clap::ArgAction::Count)]
    pub hex_ascii: u8,
    /// Lines: also the packet in ASCII (web pages, text protocols).
    #[arg(short = 'A')]
    pub ascii: bool,
    /// One JSON object per packet instead of a line (time, interface, direction, lengths,
    /// addresses, ports, the line's summary; a drop's reason and stage times in `notes`).
    #[arg(long, conflicts_with = "write")]
    pub json: bool,
    /// List the interfaces: their state, the XDP modes each offers, AF_XDP zero-copy, and
    /// which program holds its XDP slot. Nothing is captured.
    #[arg(short = 'D', long = "list-interfaces")]
    pub list: bool,
    /// Bytes to keep of each packet [default: the whole packet, up to 65535 bytes, what
    /// the hooks can copy; with --bypass, up to one AF_XDP frame: 3840 bytes].
    #[arg(short = 's', value_name = "SNAPLEN", value_parser = clap::value_parser!(u32).range(1..))]
    pub snaplen: Option<u32>,
    /// Direction: in (XDP), out (tcx egress) or inout.
    #[arg(short = 'Q', value_enum, default_value = "inout")]
    pub direction: Direction,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = super::seconds)]
    pub duration: Option<std::time::Duration>,
    /// How to attach XDP: native (driver), generic (skb), auto (native, else generic), off.
    #[arg(long = "xdp-mode", value_name = "MODE", value_enum, default_value = "auto")]
    pub xdp: XdpChoice,
    /// Also trace: put each packet's stage timestamps in its pcapng comment
    /// (`--stages=LIST` for some stages only; see `trace --stages`).
    #[arg(long, value_name = "LIST", num_args = 0..=1, require_equals = true, default_missing_value = "all", value_parser = StageSet::parse)]
    pub stages: Option<StageSet>,
    /// Also keep the packets the kernel drops on these interfaces (skb:kfree_skb), with the
    /// reason and the dropping code in their comment (`drop=NO_SOCKET at
    /// __udp4_lib_rcv+0x4bc`); network-layer bytes behind a zero Ethernet header.
    #[arg(long)]
    pub drops: bool,
    /// Kernel bypass: AF_XDP sockets, one per receive queue of the one interface given;
    /// the XDP program redirects packets the filter selects to them. THE STACK NEVER SEES
    /// THOSE PACKETS: for a mirror port or an interface kept for capture. Incoming packets
    /// only; zero-copy where the driver offers it, copy mode otherwise.
    #[arg(long, conflicts_with_all = ["stages", "drops"])]
    pub bypass: bool,
    /// Filter, in pcap-filter syntax (host, net, port, portrange, src, dst, tcp, udp, icmp, icmp6, ip, ip6, and/or/not).
    #[arg(value_name = "EXPRESSION")]
    pub expression: Vec<String>,
}

/// `-Q`: which direction to capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    In,
    Out,
    Inout,
}

impl Args {
    /// `-C`/`-G`/`-W` (the first file is the one `-w` opens: `Rotation::name(0)`).
    pub fn rotation(&self) -> Option<crate::capture::Rotation> {
        let path = self.write.clone().filter(|p| p != "-")?;
        (self.file_size.is_some() || self.rotate_secs.is_some()).then(|| crate::capture::Rotation {
            path,
            max_bytes: self.file_size.map(|mb| mb * 1_000_000),
            every: self.rotate_secs.map(std::time::Duration::from_secs),
            ring: self.file_count,
            index: 0,
            opened: std::time::Instant::now(),
        })
    }

    /// The line options (-e, -v, -x, -X, -A).
    pub fn style(&self) -> crate::capture::TextStyle {
        crate::capture::TextStyle {
            link: self.link,
            verbose: self.verbose,
            hex: self.hex,
            hex_ascii: self.hex_ascii,
            ascii: self.ascii,
            json: self.json,
        }
    }
}

impl Direction {
    /// The kernel's `DIR_IN`/`DIR_OUT` bits.
    pub fn mask(self) -> u8 {
        match self {
            Direction::In => DIR_IN,
            Direction::Out => DIR_OUT,
            Direction::Inout => DIR_IN | DIR_OUT,
        }
    }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    crate::capture::run(a).await
}
