//! Reading recordings (the NDJSON packetflow writes) back, one line at a time, into the
//! types the writer writes (`format::ndjson`).
//!
//! Memory does not grow with the file: lines are read and handed on one by one. What the
//! reader does with damaged input (docs/trace-format.md, "Reading"):
//!
//! * empty input, no header on line 1, or a header of another schema version: refused
//!   with one sentence (a newer packetflow reads older versions; this one reads version 1);
//! * a line that is not valid JSON, a trace missing a required field, or one whose stages
//!   are out of time order or contradict the kernel's order: skipped, counted, and
//!   reported with its line number;
//! * a last line cut short (no newline at the end, not valid JSON): skipped and reported
//!   as truncated;
//! * fields this version does not know: ignored (a newer writer may add fields without a
//!   version bump); lines of an unknown `type`: skipped and counted.

use std::{
    io::{BufRead, Read},
    net::IpAddr,
};

use anyhow::Result;
use packetflow_common::Stage;

use crate::{
    error::user,
    format::ndjson::{HeaderJson, SCHEMA_VERSION, SummaryJson, TraceJson},
    model::trace::{Device, Flow, PathKind, StageTime, Trace, TraceKind},
};

impl TraceJson {
    /// The trace as the live pipeline had it (for identical statistics), if the line
    /// holds a possible one.
    pub fn to_trace(&self) -> Result<Trace, String> {
        let kind = match &*self.kind {
            "data" => TraceKind::Data,
            "retrans" => TraceKind::Retrans,
            "ack" => TraceKind::Control(packetflow_common::Kind::Ack),
            "syn" => TraceKind::Control(packetflow_common::Kind::Syn),
            "synack" => TraceKind::Control(packetflow_common::Kind::SynAck),
            "fin" => TraceKind::Control(packetflow_common::Kind::Fin),
            "rst" => TraceKind::Control(packetflow_common::Kind::Rst),
            k => return Err(format!("unknown kind '{k}'")),
        };
        let path = match &*self.path {
            "loopback" => PathKind::Loopback,
            "nic" => PathKind::Nic,
            p => return Err(format!("unknown path '{p}'")),
        };
        let addr = |a: &IpAddr| -> [u8; 16] {
            match a {
                IpAddr::V4(v4) => {
                    let mut b = [0u8; 16];
                    b[..4].copy_from_slice(&v4.octets());
                    b
                }
                IpAddr::V6(v6) => v6.octets(),
            }
        };
        let mut stages = Vec::with_capacity(self.stages.len());
        for s in &self.stages {
            let stage = Stage::from_name(&s.stage).ok_or_else(|| format!("unknown stage '{}'", s.stage))?;
            stages.push(StageTime { stage, t_ns: s.t_ns, cpu: s.cpu });
        }
        if stages.windows(2).any(|w| w[1].t_ns < w[0].t_ns) {
            return Err("stages are not in time order".into());
        }
        if let Some(e) = kernel_order_error(&stages) {
            return Err(e);
        }
        Trace {
            kind,
            flow: Flow {
                v6: self.family == "ipv6",
                udp: self.proto == "udp",
                src: addr(&self.src),
                dst: addr(&self.dst),
                sport: self.sport,
                dport: self.dport,
            },
            seq: self.seq,
            len: self.len,
            path,
            device: Device { netns: 0, ifindex: self.ifindex },
            rx_device: None,
            pid: self.pid,
            tid: None,
            rx_pid: self.rx_pid,
            rx_tid: None,
            comm: self.comm.clone(),
            rx_comm: self.rx_comm.clone(),
            cgroup: self.cgroup.clone(),
            rx_cgroup: self.rx_cgroup.clone(),
            stages,
            complete: self.complete,
            drop: None,
            retransmits: self.retransmits.clone(),
            receiver_blocked: self.receiver.as_deref().map(|r| r == "blocked"),
        }
        .with_drop(self.drop.as_ref())
    }
}

/// Why stages (in time order) cannot be one packet's path, if they cannot: the kernel
/// passes every sending-side stage (`Stage::is_egress`) before any receiving-side one,
/// `send_syscall` first and `recv_syscall` last (`Stage::KERNEL_ORDER`; equal times are no
/// contradiction). Within a side the order may differ from the table order (docs/stages.md).
fn kernel_order_error(stages: &[StageTime]) -> Option<String> {
    let contradiction = |a: &StageTime, b: &StageTime| {
        Some(format!(
            "stages contradict the kernel's order: {} at {} ns comes after {} at {} ns",
            b.stage.name(),
            b.t_ns,
            a.stage.name(),
            a.t_ns
        ))
    };
    let (first, last) = (stages.first()?, stages.last()?);
    // The first receiving-side stage (the earliest: `stages` are in time order).
    let mut rx: Option<&StageTime> = None;
    for s in stages {
        if s.stage == Stage::SendSyscall && s.t_ns > first.t_ns {
            return contradiction(first, s);
        }
        if s.stage == Stage::RecvSyscall && s.t_ns < last.t_ns {
            return contradiction(s, last);
        }
        match rx {
            Some(r) if s.stage.is_egress() && r.t_ns < s.t_ns => return contradiction(r, s),
            None if !s.stage.is_egress() => rx = Some(s),
            _ => {}
        }
    }
    None
}

pub enum Line {
    Trace(Box<Trace>),
    /// A dropped packet without a trace (`drop` line).
    Drop(Box<crate::model::drops::PacketDrop>),
    Summary(Box<SummaryJson>),
    Connection(Box<crate::model::connection::Connection>),
}

/// Problems met and survived while reading.
#[derive(Default, Debug)]
pub struct ReadNotes {
    pub lines: u64,
    pub skipped: u64,
    pub unknown_type: u64,
    pub truncated_last: bool,
    /// The first few problems, "line N: what" (all are counted).
    pub warnings: Vec<String>,
}

impl ReadNotes {
    fn warn(&mut self, msg: String) {
        if self.warnings.len() < 10 {
            self.warnings.push(msg);
        }
    }
}

/// Streams a recording. `name` is used in messages ("trace.ndjson", "stdin").
pub struct Reader<R: BufRead> {
    r: R,
    name: String,
    buf: Vec<u8>,
    pub header: HeaderJson,
    pub notes: ReadNotes,
    /// Bytes read so far (for progress).
    pub bytes: u64,
}

impl<R: BufRead> Reader<R> {
    /// Reads and checks the header line.
    pub fn new(mut r: R, name: &str) -> Result<Reader<R>> {
        let mut buf = Vec::new();
        let n = r.by_ref().take(1 << 24).read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Err(user(format!("{name} is empty: not a packetflow recording")));
        }
        let line: serde_json::Value = serde_json::from_slice(&buf).map_err(|_| {
            user(format!("{name}, line 1: not a packetflow recording (the first line is not a JSON header)"))
        })?;
        let no_header = || user(format!("{name}, line 1: not a packetflow recording (no header line)"));
        if line.get("type").and_then(|t| t.as_str()) != Some("header") {
            return Err(no_header());
        }
        let header: HeaderJson = serde_json::from_value(line).map_err(|_| no_header())?;
        let v = header.v;
        if v != SCHEMA_VERSION {
            let hint = if v > SCHEMA_VERSION { "upgrade packetflow to read it" } else { "it cannot be read" };
            return Err(user(format!(
                "{name} is a schema version {v} recording; this packetflow reads version {SCHEMA_VERSION} ({hint})"
            )));
        }
        let bytes = n as u64;
        Ok(Reader {
            r,
            name: name.to_string(),
            buf,
            header,
            notes: ReadNotes { lines: 1, ..Default::default() },
            bytes,
        })
    }

    /// The next trace or summary; `None` at the end. Damaged lines are skipped (and noted).
    pub fn next_line(&mut self) -> Result<Option<Line>> {
        loop {
            self.buf.clear();
            // A line longer than 16 MiB is not a packetflow line: cut it and skip it.
            let n = self.r.by_ref().take(1 << 24).read_until(b'\n', &mut self.buf)?;
            if n == 0 {
                return Ok(None);
            }
            self.bytes += n as u64;
            self.notes.lines += 1;
            let no = self.notes.lines;
            let complete_line = self.buf.last() == Some(&b'\n');
            let text = trim(&self.buf);
            if text.is_empty() {
                continue;
            }
            let v: serde_json::Value = match serde_json::from_slice(text) {
                Ok(v) => v,
                Err(_) if !complete_line => {
                    self.notes.truncated_last = true;
                    self.notes.skipped += 1;
                    self.notes.warn(format!(
                        "{}, line {no}: truncated last line (the recording was cut short), skipped",
                        self.name
                    ));
                    continue;
                }
                Err(e) => {
                    self.notes.skipped += 1;
                    self.notes.warn(format!("{}, line {no}: not valid JSON ({e}), skipped", self.name));
                    continue;
                }
            };
            match v.get("type").and_then(|t| t.as_str()) {
                Some("trace") => {
                    match serde_json::from_value::<TraceJson>(v).map_err(|e| e.to_string()).and_then(|t| t.to_trace()) {
                        Ok(t) => return Ok(Some(Line::Trace(Box::new(t)))),
                        Err(e) => {
                            self.notes.skipped += 1;
                            self.notes.warn(format!("{}, line {no}: not a valid trace ({e}), skipped", self.name));
                        }
                    }
                }
                // Every summary field but `type` reads leniently, so this does not fail.
                Some("summary") => match serde_json::from_value::<SummaryJson>(v) {
                    Ok(s) => return Ok(Some(Line::Summary(Box::new(s)))),
                    Err(e) => {
                        self.notes.skipped += 1;
                        self.notes.warn(format!("{}, line {no}: not a valid summary ({e}), skipped", self.name));
                    }
                },
                Some("connection") => {
                    let c = serde_json::from_value::<crate::format::ndjson::ConnectionJson>(v)
                        .map_err(|e| e.to_string())
                        .and_then(|c| c.to_connection());
                    match c {
                        Ok(c) => return Ok(Some(Line::Connection(Box::new(c)))),
                        Err(e) => {
                            self.notes.skipped += 1;
                            self.notes.warn(format!("{}, line {no}: not a valid connection ({e}), skipped", self.name));
                        }
                    }
                }
                Some("drop") => {
                    match serde_json::from_value::<crate::format::ndjson::DropLineJson>(v)
                        .map_err(|e| e.to_string())
                        .and_then(|d| d.to_drop())
                    {
                        Ok(d) => return Ok(Some(Line::Drop(Box::new(d)))),
                        Err(e) => {
                            self.notes.skipped += 1;
                            self.notes.warn(format!("{}, line {no}: not a valid drop ({e}), skipped", self.name));
                        }
                    }
                }
                Some("header") => {
                    self.notes.skipped += 1;
                    self.notes
                        .warn(format!("{}, line {no}: a second header (two recordings joined?), skipped", self.name));
                }
                _ => {
                    self.notes.unknown_type += 1;
                    self.notes.warn(format!("{}, line {no}: unknown line type, skipped", self.name));
                }
            }
        }
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(start, |i| i + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = r#"{"type":"header","v":1,"packetflow":"0.1.0"}"#;
    const TRACE: &str = r#"{"type":"trace","v":1,"kind":"data","proto":"tcp","family":"ipv4","src":"127.0.0.1","sport":1,"dst":"127.0.0.1","dport":2,"seq":5,"len":10,"path":"loopback","ifname":"lo","complete":true,"stages":[{"stage":"dev_queue","t_ns":10,"cpu":0},{"stage":"netif_receive","t_ns":20,"cpu":1}],"total_ns":10}"#;

    fn read_all(input: &str) -> Result<(usize, ReadNotes)> {
        let mut r = Reader::new(input.as_bytes(), "test")?;
        let mut n = 0;
        while let Some(l) = r.next_line()? {
            if matches!(l, Line::Trace(_)) {
                n += 1;
            }
        }
        Ok((n, r.notes))
    }

    /// A writer whose bytes the test reads once the sink is done.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn reads_back_what_the_writer_wrote() {
        use crate::{
            format::ndjson::{self, JsonSink, tests::*},
            model::stats::Stats,
            pipeline::{correlate::CorrStats, session::Sink},
        };
        let out = Shared::default();
        let mut sink = JsonSink::new(Box::new(out.clone()), sample_names(), SAMPLE_AVAILABLE.to_vec());
        sink.line(&serde_json::to_value(sample_header()).unwrap());
        let traces = sample_traces();
        let mut stats = Stats::default();
        for t in &traces {
            sink.trace(t);
            stats.record(t);
        }
        let lost = std::collections::BTreeMap::from([(Stage::DevQueue, 3)]);
        let corr = CorrStats { records: 7, egress_unanchored: 2, ..Default::default() };
        sink.finish(&ndjson::summary(
            &stats,
            &lost,
            serde_json::json!({"parsed_xdp": 1}),
            &corr,
            &crate::model::drops::DropStats::default(),
        ));
        assert_eq!(sink.errors, 0);

        let bytes = out.0.lock().unwrap().clone();
        let mut r = Reader::new(&bytes[..], "test").unwrap();
        assert_eq!((r.header.v, r.header.hostname.as_str()), (SCHEMA_VERSION, "box"));
        assert_eq!(r.header.hooks["xdp"].error.as_deref(), Some("no \"driver\""));
        for mut want in traces {
            // What a recording does not carry back: namespaces, device indexes beyond the
            // first, thread ids.
            (want.device.netns, want.rx_device, want.tid, want.rx_tid) = (0, None, None, None);
            match r.next_line().unwrap() {
                Some(Line::Trace(t)) => assert_eq!(format!("{t:?}"), format!("{want:?}")),
                _ => panic!("expected a trace"),
            }
        }
        match r.next_line().unwrap() {
            Some(Line::Summary(s)) => {
                assert_eq!(s.lost, [("dev_queue".to_string(), 3)].into());
                assert_eq!((s.correlator.records, s.correlator.egress_unanchored), (7, 2));
                assert_eq!(s.paths["loopback"].traces, 1);
                assert_eq!(s.counters, serde_json::json!({"parsed_xdp": 1}));
            }
            _ => panic!("expected the summary"),
        }
        assert!(r.next_line().unwrap().is_none());
        assert_eq!((r.notes.lines, r.notes.skipped, r.notes.unknown_type), (5, 0, 0));
    }

    #[test]
    fn reads_a_recording() {
        let (n, notes) = read_all(&format!("{HEADER}\n{TRACE}\n{TRACE}\n")).unwrap();
        assert_eq!(n, 2);
        assert_eq!(notes.skipped, 0);
    }

    #[test]
    fn refuses_empty_headerless_and_other_versions() {
        let e = read_all("").unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = read_all(&format!("{TRACE}\n")).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("no header"), "{e}");
        let e = read_all("garbage\n").unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        let e = read_all(&HEADER.replace("\"v\":1", "\"v\":2")).unwrap_err().to_string();
        assert!(e.contains("version 2") && e.contains("upgrade"), "{e}");
    }

    #[test]
    fn skips_and_counts_damage_with_line_numbers() {
        let cut = &TRACE[..40];
        let input = format!(
            "{HEADER}\n{TRACE}\nnot json\n{}\n{TRACE}\n{cut}",
            TRACE.replace("\"len\":10", "\"len\":10,\"future_field\":[1,2]")
        );
        let (n, notes) = read_all(&input).unwrap();
        assert_eq!(n, 3, "the unknown field is ignored, not fatal");
        assert_eq!(notes.skipped, 2);
        assert!(notes.truncated_last);
        assert!(notes.warnings[0].contains("line 3"), "{:?}", notes.warnings);
        assert!(
            notes.warnings[1].contains("line 6") && notes.warnings[1].contains("truncated"),
            "{:?}",
            notes.warnings
        );
    }

    #[test]
    fn rejects_impossible_traces_without_panicking() {
        for bad in [
            TRACE.replace("dev_queue", "warp_drive"),
            TRACE.replace("\"t_ns\":20", "\"t_ns\":5"),
            TRACE.replace("127.0.0.1", "nope"),
            TRACE.replace("\"sport\":1", "\"sport\":70000"),
            // A receiving-side stage before a sending-side one.
            TRACE.replace("dev_queue", "transport_rcv").replace("netif_receive", "nic_xmit"),
        ] {
            let (n, notes) = read_all(&format!("{HEADER}\n{bad}\n")).unwrap();
            assert_eq!((n, notes.skipped), (0, 1), "{bad}");
        }
    }

    #[test]
    fn refuses_stages_against_the_kernel_order_naming_the_line() {
        // recv_syscall first and send_syscall last, times increasing: once an end-to-end
        // at the histograms' 100 s ceiling (and a subtraction overflow in debug builds).
        let swapped = TRACE
            .replace("\"stage\":\"dev_queue\",\"t_ns\":10", "\"stage\":\"recv_syscall\",\"t_ns\":10")
            .replace("\"stage\":\"netif_receive\",\"t_ns\":20", "\"stage\":\"send_syscall\",\"t_ns\":20");
        assert_ne!(swapped, TRACE);
        let (n, notes) = read_all(&format!("{HEADER}\n{TRACE}\n{swapped}\n{TRACE}\n")).unwrap();
        assert_eq!((n, notes.skipped), (2, 1));
        let w = &notes.warnings[0];
        assert!(w.contains("line 3") && w.contains("contradict the kernel's order"), "{w}");
        assert!(w.contains("send_syscall at 20 ns comes after recv_syscall at 10 ns"), "{w}");

        let stage = |s: &str, t: u64| StageTime { stage: Stage::from_name(s).unwrap(), t_ns: t, cpu: 0 };
        let order = |v: &[(&str, u64)]| kernel_order_error(&v.iter().map(|(s, t)| stage(s, *t)).collect::<Vec<_>>());
        // What the kernel does: within a side the table order may differ (UDP ip_send
        // before sock_send, generic XDP after netif_receive); equal times are no contradiction.
        assert_eq!(order(&[("send_syscall", 1), ("ip_send", 2), ("sock_send", 3), ("dev_queue", 4)]), None);
        assert_eq!(order(&[("dev_queue", 1), ("nic_xmit", 2), ("netif_receive", 3), ("xdp", 4)]), None);
        assert_eq!(order(&[("transport_rcv", 5), ("nic_xmit", 5), ("recv_syscall", 5)]), None);
        assert_eq!(order(&[]), None);
        for bad in [
            &[("sock_send", 1), ("send_syscall", 2)][..],
            &[("recv_syscall", 1), ("copy_to_user", 2)],
            &[("dev_queue", 1), ("netif_receive", 2), ("nic_xmit", 3)],
            &[("xdp", 1), ("tc_egress", 2), ("recv_syscall", 3)],
        ] {
            assert!(order(bad).is_some_and(|e| e.contains("contradict")), "{bad:?}");
        }
    }
}
