//! The capture's writer: packets to text lines or pcapng, in time order; with `--stages`,
//! each packet held until its trace arrives and its stage times go in its comment.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::Write,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::Duration,
};

use anyhow::Result;
use packetflow_common::capture::{CapHdr, DIR_IN, DIR_OUT, HOOK_DROP, HOOK_XDP};

use super::{decode, frame};
use crate::{
    format::pcapng,
    model::{stage_set::StageSet, trace::Trace},
    platform,
};

/// A captured packet, with its wall-clock time.
pub(super) struct Packet {
    pub(super) hdr: CapHdr,
    pub(super) wall_ns: u64,
    pub(super) data: Vec<u8>,
}

pub(super) struct Iface {
    pub(super) id: u32,
    pub(super) name: String,
    pub(super) captured: u64,
    pub(super) lost: u64,
}

/// What pairs a captured packet with its trace: its flow, and where its bytes sit in the
/// flow, as the tracer anchored it (TCP: sequence number; UDP: payload key) with its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Key {
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    udp: bool,
    /// TCP: the sequence number of the first byte; UDP: `payload_key` of the payload.
    seq: u32,
    len: u32,
}

fn packet_key(d: &[u8]) -> Option<Key> {
    let frame::Ip { src, dst, proto, l4, end, .. } = frame::ip(d)?;
    let sport = frame::be16(d, l4)?;
    let dport = frame::be16(d, l4 + 2)?;
    match proto {
        6 => {
            let seq = frame::be32(d, l4 + 4)?;
            let doff = ((*d.get(l4 + 12)? >> 4) as usize) * 4;
            let len = end.checked_sub(l4 + doff)? as u32;
            Some(Key { src, sport, dst, dport, udp: false, seq, len })
        }
        17 => {
            let len = usize::from(frame::be16(d, l4 + 4)?).checked_sub(8)?;
            let payload = d.get(l4 + 8..)?;
            let mut head = [0u8; 16];
            let n = len.min(16).min(payload.len());
            head[..n].copy_from_slice(&payload[..n]);
            let seq = packetflow_common::payload_key(&head, n as u32);
            Some(Key { src, sport, dst, dport, udp: true, seq, len: len as u32 })
        }
        _ => None,
    }
}

fn trace_key(t: &Trace) -> Key {
    let f = &t.flow;
    Key { src: f.src_ip(), sport: f.sport, dst: f.dst_ip(), dport: f.dport, udp: f.udp, seq: t.seq, len: t.len }
}

/// "stages: send_syscall 0.00 µs, sock_send +0.71 µs, ..." for a packet's comment.
fn stages_comment(t: &Trace, asked: StageSet) -> String {
    let mut parts = Vec::new();
    let mut prev: Option<u64> = None;
    for s in &t.stages {
        match prev {
            None => parts.push(format!("{} t={}", s.stage.name(), s.t_ns)),
            Some(p) => parts.push(format!("{} +{:.3} µs", s.stage.name(), (s.t_ns - p) as f64 / 1000.0)),
        }
        prev = Some(s.t_ns);
    }
    let missing: Vec<&str> = asked
        .stages()
        .filter(|x| !t.stages.iter().any(|s| s.stage == *x))
        .map(packetflow_common::Stage::name)
        .collect();
    let mut c =
        format!("packetflow stages ({} µs in all): {}", crate::report::tables::us(t.total_ns()), parts.join(", "));
    if !missing.is_empty() {
        c.push_str(&format!("; not seen: {}", missing.join(", ")));
    }
    c
}

pub(super) enum Out {
    Text(Box<dyn Write + Send>),
    Pcap(pcapng::Writer<Box<dyn Write + Send>>),
}

/// `-C`/`-W`/`-G`: when the pcapng output goes on in a new file, and its name. Files are
/// FILE, FILE1, FILE2, ... (tcpdump's `-C` names); with `-W N` FILE0 ... FILE(N-1),
/// then FILE0 again (a ring); a FILE with `%` conversions is put through strftime (local
/// time) when each file opens, as tcpdump does with `-G` (and then, without -C or -W,
/// gets no number).
pub struct Rotation {
    pub path: String,
    /// `-C`: bytes per file (MB of 1,000,000 bytes, as tcpdump).
    pub max_bytes: Option<u64>,
    /// `-G`: seconds per file.
    pub every: Option<Duration>,
    /// `-W`: at most this many files, reused in turn.
    pub ring: Option<u32>,
    /// The number of the file being written.
    pub index: u32,
    pub opened: std::time::Instant,
}

impl Rotation {
    /// The name of file number `index`.
    pub fn name(&self, index: u32) -> String {
        let timed = self.path.contains('%');
        let base = if timed { strftime(&self.path) } else { self.path.clone() };
        match self.ring {
            Some(n) => format!("{base}{}", index % n),
            // `-G` alone with a time in the name: the time tells the files apart.
            None if index == 0 || (timed && self.max_bytes.is_none()) => base,
            None => format!("{base}{index}"),
        }
    }

    fn due(&self, written: u64) -> bool {
        self.max_bytes.is_some_and(|m| written >= m) || self.every.is_some_and(|e| self.opened.elapsed() >= e)
    }

    /// The next file, created (a ring's old file is overwritten).
    fn open_next(&mut self) -> Result<Box<dyn Write + Send>> {
        self.index += 1;
        self.opened = std::time::Instant::now();
        crate::format::output::writer(&self.name(self.index))
    }
}

/// `path` with strftime's conversions, in local time.
fn strftime(path: &str) -> String {
    let Ok(fmt) = std::ffi::CString::new(path) else { return path.to_string() };
    let mut buf = vec![0u8; path.len() * 4 + 64];
    // SAFETY: time(NULL) and localtime_r write only into `now` and `tm`, which we own;
    // strftime writes at most `buf.len()` bytes into `buf` and returns how many.
    let n = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&raw const now, &raw mut tm);
        libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &raw const tm)
    };
    if n == 0 {
        return path.to_string();
    }
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

pub(super) struct WriterState {
    pub(super) out: Out,
    pub(super) ifaces: BTreeMap<u32, Iface>,
    pub(super) written: u64,
    pub(super) count: Option<u64>,
    pub(super) done: Arc<AtomicBool>,
    /// --stages: packets waiting for their trace, and traces waiting for their packet.
    pub(super) held: VecDeque<Packet>,
    pub(super) traces: HashMap<Key, Trace>,
    pub(super) stages: bool,
    /// The stages traced (a comment names those of them not seen).
    pub(super) asked: StageSet,
    pub(super) comment: String,
    /// Packets written (by `written`) when the output last flushed without error.
    pub(super) flushed: u64,
    /// --stages: packets written without waiting for their trace because [`HELD_MAX`]
    /// packets were already waiting.
    pub(super) held_overflow: u64,
    /// The write error that ended the capture.
    pub(super) error: Option<anyhow::Error>,
    /// `--drops`: names the reason and the dropping code of a dropped packet.
    pub(super) namer: Option<crate::kernel::drops::DropNamer>,
    /// Dropped packets on interfaces not captured (not written; said at the end).
    pub(super) drops_elsewhere: u64,
    pub(super) style: TextStyle,
    /// `-C`/`-G`: when to go on in a new file.
    pub(super) rotation: Option<Rotation>,
}

/// "NO_SOCKET at __udp4_lib_rcv+0x4bc" for a `HOOK_DROP` packet (its header's `_pad`).
fn drop_words(namer: &mut crate::kernel::drops::DropNamer, h: &CapHdr) -> String {
    let reason = u32::from_le_bytes([h._pad[0], h._pad[1], h._pad[2], h._pad[3]]);
    let low = u32::from_le_bytes([h._pad[4], h._pad[5], h._pad[6], h._pad[7]]);
    // Kernel text lies in the top 2 GiB on x86_64: the high half is all ones.
    let location = 0xffff_ffff_0000_0000 | u64::from(low);
    format!("{} at {}", namer.reason(reason), namer.location(location))
}

/// tcpdump's output options: `-e` (link header), `-v` (IP header fields), `-x`/`-xx`
/// (hex, without/with the link header), `-X`/`-XX` (hex and ASCII), `-A` (ASCII); and
/// `--json` (one JSON object per packet instead of a line).
#[derive(Clone, Copy, Debug, Default)]
pub struct TextStyle {
    pub link: bool,
    pub verbose: u8,
    pub hex: u8,
    pub hex_ascii: u8,
    pub ascii: bool,
    pub json: bool,
}

/// A packet as a line shows it.
pub(super) struct Line<'a> {
    pub wall_ns: u64,
    pub ifname: &'a str,
    /// "In ", "Out", "Drop" or "-  ".
    pub dir: &'a str,
    pub data: &'a [u8],
    /// The packet's length before truncation.
    pub len: u32,
    /// A drop's reason, stage times, a file's comment: on lines of their own.
    pub notes: &'a [&'a str],
}

/// One tcpdump-like line: local time, interface, direction, what the packet is; then
/// what `style` asks for, and the notes. With `style.json`, one JSON object instead
/// (`packet_json`).
pub(super) fn text_line(w: &mut dyn Write, l: &Line, style: &TextStyle) -> std::io::Result<()> {
    let Line { wall_ns, ifname, dir, data, len, notes } = *l;
    if style.json {
        serde_json::to_writer(&mut *w, &packet_json(l))?;
        return w.write_all(b"\n");
    }
    let secs = (wall_ns / 1_000_000_000) as i64;
    // SAFETY: localtime_r writes only into `tm`, a zeroed plain C struct we own; `secs`
    // outlives the call.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&raw const secs, &raw mut tm);
        tm
    };
    let mut what = decode::summary(data, len);
    if style.verbose > 0
        && let Some(details) = decode::ip_details(data)
        && let Some((first, rest)) = what.split_once(' ')
    {
        what = format!("{first} {details} {rest}");
    }
    writeln!(
        w,
        "{:02}:{:02}:{:02}.{:09} {ifname} {dir} {}{what}",
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        wall_ns % 1_000_000_000,
        if style.link { decode::link_header(data, len) } else { String::new() },
    )?;
    // Without the link header unless -xx/-XX (as tcpdump).
    let body = |all: bool| if all { data } else { data.get(14..).unwrap_or_default() };
    if style.hex_ascii > 0 {
        w.write_all(decode::hex_dump(body(style.hex_ascii > 1), true).as_bytes())?;
    } else if style.hex > 0 {
        w.write_all(decode::hex_dump(body(style.hex > 1), false).as_bytes())?;
    } else if style.ascii {
        writeln!(w, "{}", decode::printable(body(false), true))?;
    }
    for n in notes.iter().filter(|n| !n.is_empty()) {
        writeln!(w, "    {n}")?;
    }
    Ok(())
}

/// `capture --json`: a packet as one object (docs/capture.md, "JSON lines").
fn packet_json(l: &Line) -> serde_json::Value {
    let Line { wall_ns, ifname, dir, data, len, notes } = *l;
    let mut o = serde_json::json!({
        "type": "packet",
        "v": 1,
        "time_ns": wall_ns,
        "ifname": ifname,
        "dir": match dir.trim() { "In" => "in", "Out" => "out", "Drop" => "drop", _ => "unknown" },
        "len": len,
        "caplen": data.len(),
        "summary": decode::summary(data, len),
    });
    if let Some(t) = frame::ethertype(data) {
        o["ethertype"] = t.into();
    }
    if let Some(ip) = frame::ip(data) {
        o["src"] = ip.src.to_string().into();
        o["dst"] = ip.dst.to_string().into();
        o["proto"] = match ip.proto {
            6 => "tcp".into(),
            17 => "udp".into(),
            1 => "icmp".into(),
            58 => "icmp6".into(),
            p => p.into(),
        };
        if matches!(ip.proto, 6 | 17)
            && ip.frag == 0
            && let (Some(sp), Some(dp)) = (frame::be16(data, ip.l4), frame::be16(data, ip.l4 + 2))
        {
            o["sport"] = sp.into();
            o["dport"] = dp.into();
        }
    }
    let notes: Vec<&str> = notes.iter().copied().filter(|n| !n.is_empty()).collect();
    if !notes.is_empty() {
        o["notes"] = notes.into();
    }
    o
}

/// With `--stages`, at most this many packets wait for their traces; beyond that the
/// oldest is written at once, without its stages if its trace has not come (counted).
pub const HELD_MAX: usize = 65_536;

impl WriterState {
    fn emit(&mut self, p: &Packet, comment: &str) -> Result<()> {
        if self.count.is_some_and(|c| self.written >= c) {
            return Ok(());
        }
        let Some(iface) = self.ifaces.get_mut(&p.hdr.ifindex) else {
            if p.hdr.hook == HOOK_DROP {
                self.drops_elsewhere += 1;
            }
            return Ok(());
        };
        let dropped = match (&mut self.namer, p.hdr.hook == HOOK_DROP) {
            (Some(n), true) => format!("drop={}", drop_words(n, &p.hdr)),
            _ => String::new(),
        };
        iface.captured += 1;
        self.written += 1;
        match &mut self.out {
            Out::Text(w) => {
                let dir = match p.hdr.dir {
                    DIR_IN => "In ",
                    DIR_OUT => "Out",
                    _ => "Drop",
                };
                let notes = [dropped.as_str(), comment];
                let line =
                    Line { wall_ns: p.wall_ns, ifname: &iface.name, dir, data: &p.data, len: p.hdr.len, notes: &notes };
                text_line(w, &line, &self.style)?;
            }
            Out::Pcap(w) => {
                use std::fmt::Write as _;
                if let Some(r) = &mut self.rotation
                    && r.due(w.written)
                {
                    w.rotate(r.open_next()?)?;
                }
                let flags = match p.hdr.dir {
                    DIR_IN => pcapng::FLAG_INBOUND,
                    DIR_OUT => pcapng::FLAG_OUTBOUND,
                    _ => 0,
                };
                let hook = match p.hdr.hook {
                    HOOK_XDP => "xdp",
                    HOOK_DROP => "drop",
                    _ => "tc_egress",
                };
                // One string for every packet's comment, not one each.
                let c = &mut self.comment;
                c.clear();
                let _ = write!(c, "hook={hook} cpu={}", p.hdr.cpu);
                if !dropped.is_empty() {
                    c.push_str("; ");
                    c.push_str(&dropped);
                }
                if !comment.is_empty() {
                    c.push_str("; ");
                    c.push_str(comment);
                }
                w.packet(iface.id, p.wall_ns, &p.data, p.hdr.len, flags, c)?;
            }
        }
        if self.count.is_some_and(|c| self.written >= c) {
            self.done.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes held packets whose trace arrived or that waited long enough (in order).
    fn release(&mut self, now_wall: u64, all: bool) -> Result<()> {
        while let Some(p) = self.held.front() {
            let key = packet_key(&p.data);
            let trace = key.and_then(|k| self.traces.remove(&k));
            let expired = all || key.is_none() || p.wall_ns + 3_000_000_000 < now_wall;
            if trace.is_none() && !expired {
                break;
            }
            let p = self.held.pop_front().expect("front exists");
            let comment = trace.as_ref().map(|t| stages_comment(t, self.asked)).unwrap_or_default();
            self.emit(&p, &comment)?;
        }
        if self.traces.len() > 100_000 {
            self.traces.clear();
        }
        Ok(())
    }

    fn packets(&mut self, mut batch: Vec<Packet>) -> Result<()> {
        batch.sort_by_key(|p| p.hdr.ts_ns);
        for p in batch {
            if self.stages {
                if self.held.len() >= HELD_MAX {
                    let old = self.held.pop_front().expect("held is full");
                    if let Some(t) = packet_key(&old.data).and_then(|k| self.traces.remove(&k)) {
                        self.emit(&old, &stages_comment(&t, self.asked))?;
                    } else {
                        let before = self.written;
                        self.emit(&old, "")?;
                        self.held_overflow += self.written - before;
                    }
                }
                self.held.push_back(p);
            } else {
                self.emit(&p, "")?;
            }
        }
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<()> {
        match &mut self.out {
            Out::Text(w) => w.flush()?,
            Out::Pcap(w) => w.flush()?,
        }
        Ok(())
    }
}

/// Writes packets until the reader is done; a write error ends it (in `state.error`).
pub(super) fn write_loop(mut state: WriterState, rx: Receiver<Vec<Packet>>, traces: Receiver<Trace>) -> WriterState {
    if let Err(e) = write_all(&mut state, rx, traces) {
        state.error = Some(e);
    }
    state
}

fn write_all(state: &mut WriterState, rx: Receiver<Vec<Packet>>, traces: Receiver<Trace>) -> Result<()> {
    loop {
        let r = rx.recv_timeout(Duration::from_millis(50));
        if state.stages {
            while let Ok(t) = traces.try_recv() {
                state.traces.insert(trace_key(&t), t);
            }
        }
        match r {
            Ok(batch) => state.packets(batch)?,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if state.stages {
            state.release(platform::host::realtime_ns(), false)?;
        }
        state.flush()?;
        state.flushed = state.written;
    }
    if state.stages {
        while let Ok(t) = traces.recv_timeout(Duration::from_millis(200)) {
            state.traces.insert(trace_key(&t), t);
        }
        state.release(u64::MAX, true)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::sync_channel;

    use super::*;

    fn state(out: Box<dyn Write + Send>, stages: bool) -> WriterState {
        let mut ifaces = BTreeMap::new();
        ifaces.insert(1, Iface { id: 0, name: "lo".into(), captured: 0, lost: 0 });
        WriterState {
            out: Out::Text(out),
            ifaces,
            written: 0,
            count: None,
            done: Arc::default(),
            held: VecDeque::new(),
            traces: HashMap::new(),
            stages,
            asked: StageSet::ALL,
            comment: String::new(),
            namer: None,
            drops_elsewhere: 0,
            flushed: 0,
            held_overflow: 0,
            error: None,
            style: TextStyle::default(),
            rotation: None,
        }
    }

    fn packet(n: u64) -> Packet {
        let hdr = CapHdr { ts_ns: n, len: 0, caplen: 0, ifindex: 1, dir: 0, hook: 0, cpu: 0, _pad: [0; 8] };
        Packet { hdr, wall_ns: n, data: Vec::new() }
    }

    #[test]
    fn stages_hold_a_bounded_number_of_packets() {
        let mut s = state(Box::new(std::io::sink()), true);
        s.packets((0..HELD_MAX as u64 + 10).map(packet).collect()).unwrap();
        assert_eq!(s.held.len(), HELD_MAX);
        assert_eq!((s.written, s.held_overflow), (10, 10));
        s.release(u64::MAX, true).unwrap();
        assert_eq!((s.written, s.held_overflow), (HELD_MAX as u64 + 10, 10));
    }

    #[test]
    fn a_write_error_ends_the_writer_with_the_error_and_the_counts() {
        // /dev/full: every write fails with ENOSPC, as on a full disk.
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let s = state(Box::new(full), false);
        let (tx, rx) = sync_channel(4);
        let (_ttx, trx) = sync_channel(1);
        tx.send(vec![packet(1), packet(2)]).unwrap();
        // The writer stops by itself, with the sender still open.
        let w = std::thread::spawn(move || write_loop(s, rx, trx));
        let s = w.join().unwrap();
        let e = s.error.expect("the write error is kept");
        assert!(format!("{e:#}").contains("No space left on device"), "{e:#}");
        assert_eq!((s.written, s.flushed), (1, 0));
        drop(tx);
    }

    #[test]
    fn packet_keys_match_trace_keys() {
        let mut f = vec![0u8; 14];
        f[12] = 8;
        f.extend([0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2]);
        f.extend([0x9c, 0x40, 0x1f, 0x90, 0, 26, 0, 0]);
        f.extend(b"Hello from client!");
        let k = packet_key(&f).unwrap();
        let mut head = [0u8; 16];
        head.copy_from_slice(&b"Hello from client!"[..16]);
        assert_eq!(k.seq, packetflow_common::payload_key(&head, 16));
        assert_eq!((k.sport, k.dport, k.udp, k.len), (40000, 8080, true, 18));
    }
}
