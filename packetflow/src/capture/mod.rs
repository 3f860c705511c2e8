//! `packetflow capture`: tcpdump's job from eBPF hooks. Incoming packets are taken at XDP,
//! outgoing ones at tcx egress (on a loopback device each packet is recorded once, at
//! ingress, as tcpdump does); the filter expression runs in the kernel before any copy.
//! Output: one tcpdump-like line per packet, or pcapng (`-w FILE`, `-w -` for stdout).
//! With `--stages`, the tracer runs too, and each packet of a finished trace carries its
//! stage timestamps in its pcapng comment.

pub mod decode;
pub mod expr;
pub mod frame;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::Write,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, sync_channel},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use packetflow_common::{
    capture::{CapHdr, DIR_IN, DIR_OUT, HOOK_XDP},
    counters,
};

use crate::{
    cmd::capture::Args,
    error::user,
    format::pcapng,
    kernel::interfaces::{Role, XdpChoice},
    kernel::loader::{LoadOptions, Tracer},
    model::filter::FilterSpec,
    model::stage_set::StageSet,
    model::trace::{Trace, TraceKind},
    pipeline::run,
    pipeline::session::{self, Sink},
    pipeline::shards::{self, Shards},
    platform,
};

/// A captured packet, with its wall-clock time.
struct Packet {
    hdr: CapHdr,
    wall_ns: u64,
    data: Vec<u8>,
}

struct Iface {
    id: u32,
    name: String,
    captured: u64,
    lost: u64,
}

/// The packet's trace key: (src, sport, dst, dport, udp, seq/key, len) — as the tracer
/// would have anchored it.
type Key = (IpAddr, u16, IpAddr, u16, bool, u32, u32);

fn packet_key(d: &[u8]) -> Option<Key> {
    let frame::Ip { src, dst, proto, l4, end, .. } = frame::ip(d)?;
    let sport = frame::be16(d, l4)?;
    let dport = frame::be16(d, l4 + 2)?;
    match proto {
        6 => {
            let seq = frame::be32(d, l4 + 4)?;
            let doff = ((*d.get(l4 + 12)? >> 4) as usize) * 4;
            let len = end.checked_sub(l4 + doff)? as u32;
            Some((src, sport, dst, dport, false, seq, len))
        }
        17 => {
            let len = usize::from(frame::be16(d, l4 + 4)?).checked_sub(8)?;
            let payload = d.get(l4 + 8..)?;
            let mut head = [0u8; 16];
            let n = len.min(16).min(payload.len());
            head[..n].copy_from_slice(&payload[..n]);
            Some((src, sport, dst, dport, true, packetflow_common::payload_key(&head, n as u32), len as u32))
        }
        _ => None,
    }
}

fn trace_key(t: &Trace) -> Key {
    (t.flow.src_ip(), t.flow.sport, t.flow.dst_ip(), t.flow.dport, t.flow.udp, t.seq, t.len)
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
    let missing: Vec<&str> =
        asked.stages().filter(|x| !t.stages.iter().any(|s| s.stage == *x)).map(|s| s.name()).collect();
    let mut c =
        format!("packetflow stages ({} µs in all): {}", crate::report::tables::us(t.total_ns()), parts.join(", "));
    if !missing.is_empty() {
        c.push_str(&format!("; not seen: {}", missing.join(", ")));
    }
    c
}

/// Finished traces, handed from the correlator to the capture writer.
struct TraceTap(std::sync::mpsc::SyncSender<Trace>);

impl Sink for TraceTap {
    fn trace(&mut self, t: &Trace) {
        if t.kind == TraceKind::Data {
            let _ = self.0.try_send(t.clone());
        }
    }
}

enum Out {
    Text(Box<dyn Write + Send>),
    Pcap(pcapng::Writer<Box<dyn Write + Send>>),
}

struct WriterState {
    out: Out,
    ifaces: BTreeMap<u32, Iface>,
    written: u64,
    count: Option<u64>,
    done: Arc<AtomicBool>,
    /// --stages: packets waiting for their trace, and traces waiting for their packet.
    held: VecDeque<Packet>,
    traces: HashMap<Key, Trace>,
    stages: bool,
    /// The stages traced (a comment names those of them not seen).
    asked: StageSet,
    comment: String,
    /// Packets written (by `written`) when the output last flushed without error.
    flushed: u64,
    /// --stages: packets written without waiting for their trace because [`HELD_MAX`]
    /// packets were already waiting.
    held_overflow: u64,
    /// The write error that ended the capture.
    error: Option<anyhow::Error>,
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
            return Ok(());
        };
        iface.captured += 1;
        self.written += 1;
        match &mut self.out {
            Out::Text(w) => {
                let t = p.wall_ns;
                let secs = (t / 1_000_000_000) as i64;
                let tm = unsafe {
                    let mut tm: libc::tm = std::mem::zeroed();
                    libc::localtime_r(&secs, &mut tm);
                    tm
                };
                let dir = if p.hdr.dir == DIR_IN { "In " } else { "Out" };
                writeln!(
                    w,
                    "{:02}:{:02}:{:02}.{:09} {} {dir} {}",
                    tm.tm_hour,
                    tm.tm_min,
                    tm.tm_sec,
                    t % 1_000_000_000,
                    iface.name,
                    decode::summary(&p.data, p.hdr.len)
                )?;
                if !comment.is_empty() {
                    writeln!(w, "    {comment}")?;
                }
            }
            Out::Pcap(w) => {
                use std::fmt::Write as _;
                let flags = if p.hdr.dir == DIR_IN { pcapng::FLAG_INBOUND } else { pcapng::FLAG_OUTBOUND };
                let hook = if p.hdr.hook == HOOK_XDP { "xdp" } else { "tc_egress" };
                // One string for every packet's comment, not one each.
                let c = &mut self.comment;
                c.clear();
                let _ = write!(c, "hook={hook} cpu={}", p.hdr.cpu);
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
                    match packet_key(&old.data).and_then(|k| self.traces.remove(&k)) {
                        Some(t) => self.emit(&old, &stages_comment(&t, self.asked))?,
                        None => {
                            let before = self.written;
                            self.emit(&old, "")?;
                            self.held_overflow += self.written - before;
                        }
                    }
                }
                self.held.push_back(p);
            } else {
                self.emit(&p, "")?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        match &mut self.out {
            Out::Text(w) => w.flush()?,
            Out::Pcap(w) => w.flush()?,
        }
        Ok(())
    }
}

/// Reads every capture shard; hands batches to the writer (which sorts them by time).
async fn read_rings(
    mut shards: Shards,
    tx: std::sync::mpsc::SyncSender<Vec<Packet>>,
    offset: i64,
    overflow: Arc<AtomicU64>,
) -> Result<()> {
    loop {
        let last = shards.stopping();
        let mut batch = Vec::new();
        shards.drain(|_, item| {
            let Some(hdr) = shards::record::<CapHdr>(item) else { return };
            let data = &item[size_of::<CapHdr>()..];
            let data = data[..(hdr.caplen as usize).min(data.len())].to_vec();
            batch.push(Packet { wall_ns: (hdr.ts_ns as i64 + offset) as u64, hdr, data });
        });
        if !batch.is_empty() {
            let n = batch.len() as u64;
            if tx.try_send(batch).is_err() {
                overflow.fetch_add(n, Ordering::Relaxed);
            }
        }
        if last {
            return Ok(());
        }
        shards.wait().await;
    }
}

pub async fn run(a: Args) -> Result<()> {
    let dirs = a.direction.mask();
    let snaplen = a.snaplen.min(packetflow_common::capture::CAPTURE_MAX as u32);
    run::preflight("capture")?;
    if let Some(stages) = a.stages {
        stages.check_joinable()?;
    }
    let mut stop = run::StopSignals::new()?;
    if a.ifaces.is_empty() {
        crate::user_bail!(
            "capture needs an interface: -i IFACE (repeatable, IFACE@NETNS for another namespace, or -i any)"
        );
    }
    let expression = a.expression.join(" ");
    let mut compiled = expr::compile(&expression, snaplen).map_err(|e| user(e.to_string()))?;
    let cfg = &mut compiled.config;
    cfg.dirs = u32::from(dirs);

    // Interfaces: (namespace, name, ifindex, loopback).
    let mut targets: Vec<(Option<PathBuf>, String, u32, bool)> = platform::interfaces::find(&a.ifaces, None)?
        .into_iter()
        .map(|n| (n.netns, n.name, n.index, n.loopback))
        .collect();
    targets.dedup_by(|x, y| x.0 == y.0 && x.1 == y.1);
    for (i, x) in targets.iter().enumerate() {
        if let Some(y) = targets[..i].iter().find(|y| y.2 == x.2 && y.0 != x.0) {
            crate::user_bail!(
                "{} and {} have the same ifindex {} in different namespaces; capture them in separate runs",
                x.1,
                y.1,
                x.2
            );
        }
    }
    let lo: Vec<u32> = targets.iter().filter(|t| t.3).map(|t| t.2).collect();
    for (k, i) in lo.iter().take(4).enumerate() {
        cfg.skip_out[k] = *i;
    }

    let mut tracer = Tracer::load(&LoadOptions {
        ring_bytes: if a.stages.is_some() { 4 << 20 } else { 4096 },
        capture_ring_bytes: 8 << 20,
        idle: false,
    })?;
    let offset = platform::host::mono_to_wall_offset();
    let rings = tracer.take_capture_rings()?;
    let (tx, rx) = sync_channel::<Vec<Packet>>(1024);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let overflow = Arc::new(AtomicU64::new(0));
    let shards = Shards::new(rings, Duration::from_millis(10), stop_rx)?;
    let reader = tokio::spawn(read_rings(shards, tx, offset, overflow.clone()));

    // --stages: the tracer, filtered to TCP/UDP of the interfaces captured.
    let (trace_tx, trace_rx) = sync_channel::<Trace>(65536);
    let mut tracing = None;
    if let Some(stages) = a.stages {
        let trace_rings = tracer.take_rings()?;
        let readers = session::start_readers(trace_rings, Duration::from_millis(10))?;
        let spec = FilterSpec { stages, ..FilterSpec::default() };
        tracer.set_filter(&spec.to_kernel(std::process::id())?)?;
        tracer.attach_kernel_hooks(stages)?;
        tracing = Some(readers);
    }
    let snaplen = compiled.config.snaplen;
    tracer.set_capture(&compiled)?;
    for (ns, name, _, is_lo) in &targets {
        let xdp = if dirs & DIR_IN != 0 { a.xdp } else { XdpChoice::Off };
        let att = tracer.attach_interface_as(Role::Capture, ns.as_deref(), name, xdp)?;
        if dirs & DIR_IN != 0
            && let Err(e) = &att.xdp
        {
            crate::user_bail!("cannot capture packets coming in on {name}: XDP would not attach ({e})");
        }
        if (dirs & DIR_OUT != 0 && !is_lo)
            && let Err(e) = &att.tc_egress
        {
            crate::user_bail!("cannot capture packets going out on {name}: tcx egress would not attach ({e})");
        }
    }
    let corr = tracing.as_mut().map(|r| {
        r.start_correlator(
            tracer.coverage(),
            Duration::from_secs(1),
            crate::pipeline::correlate::DEFAULT_BUDGET_MB,
            None,
            vec![Box::new(TraceTap(trace_tx))],
        )
    });

    // The writer: interfaces first (pcapng), then packets as they come.
    let out: Out = match a.write.as_deref() {
        None => Out::Text(Box::new(std::io::BufWriter::new(std::io::stdout()))),
        Some(path) => {
            let w = crate::format::output::writer(path)?;
            let os = format!("Linux {}", platform::host::kernel_release());
            Out::Pcap(pcapng::Writer::new(w, &format!("packetflow {}", env!("CARGO_PKG_VERSION")), &os)?)
        }
    };
    let mut state = WriterState {
        out,
        ifaces: BTreeMap::new(),
        written: 0,
        count: a.count,
        done: Arc::new(AtomicBool::new(false)),
        held: VecDeque::new(),
        traces: HashMap::new(),
        stages: a.stages.is_some(),
        asked: a.stages.unwrap_or_default(),
        comment: String::new(),
        flushed: 0,
        held_overflow: 0,
        error: None,
    };
    for (ns, name, ifindex, is_lo) in &targets {
        let ns_ino = platform::netns::netns_inode(ns.as_deref().unwrap_or(std::path::Path::new("/proc/self/ns/net")))
            .unwrap_or(0);
        let id = match &mut state.out {
            Out::Pcap(w) => w.interface(
                name,
                snaplen,
                &format!(
                    "ifindex {ifindex}, netns inode {ns_ino}{}",
                    if *is_lo { ", loopback (recorded at ingress)" } else { "" }
                ),
            )?,
            Out::Text(_) => state.ifaces.len() as u32,
        };
        state.ifaces.insert(*ifindex, Iface { id, name: name.clone(), captured: 0, lost: 0 });
    }
    let start_wall = platform::host::realtime_ns();
    let quiet_stdout = a.write.as_deref() == Some("-");
    eprintln!(
        "capturing on {} ({}){}",
        targets.iter().map(|t| t.1.as_str()).collect::<Vec<_>>().join(", "),
        if expression.is_empty() { "all packets".to_string() } else { expression.clone() },
        if quiet_stdout { "" } else { "; Ctrl-C to stop" }
    );
    let done = state.done.clone();
    let writer = std::thread::spawn(move || write_loop(state, rx, trace_rx));

    let deadline = a.duration.map(|d| tokio::time::Instant::now() + d);
    let mut checked = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                // Done: the count reached, or the writer failed (disk full).
                if done.load(Ordering::Relaxed) || writer.is_finished() {
                    break;
                }
                // Interfaces deleted meanwhile: said once; the others go on.
                if checked.elapsed() >= Duration::from_secs(1) {
                    checked = tokio::time::Instant::now();
                    for line in tracer.check_interfaces() {
                        eprintln!("{line}");
                    }
                }
            }
        }
    }
    let counters = tracer.counters().unwrap_or_default();
    let if_lost = tracer.capture_losses();
    tracer.detach_all();
    let _ = stop_tx.send(true);
    reader.await.context("capture reader")??;
    if let (Some(r), Some(c)) = (tracing, corr) {
        let _ = r.stop(c).await;
    }
    let mut state = writer.join().map_err(|_| anyhow::anyhow!("the capture writer panicked"))?;
    let g = |i: u32| counters.get(i as usize).copied().unwrap_or(0);
    let lost = g(counters::CAP_LOST_XDP) + g(counters::CAP_LOST_TC) + overflow.load(Ordering::Relaxed);
    let end_wall = platform::host::realtime_ns();
    for (ifindex, i) in state.ifaces.iter_mut() {
        i.lost = if_lost.get(ifindex).copied().unwrap_or(0);
    }
    if state.error.is_none() {
        let stats = match &mut state.out {
            Out::Pcap(w) => {
                state.ifaces.values().try_for_each(|i| w.stats(i.id, start_wall, end_wall, i.captured, i.lost))
            }
            Out::Text(_) => Ok(()),
        };
        if let Err(e) = stats.map_err(anyhow::Error::from).and_then(|()| state.flush()) {
            state.error = Some(e);
        }
    }
    let received = g(counters::CAP_MATCHED_XDP) + g(counters::CAP_MATCHED_TC);
    match &state.error {
        None => eprintln!("{} packets captured", state.written),
        Some(_) => eprintln!(
            "{} packets captured ({} of them not written: the write failed)",
            state.flushed,
            state.written - state.flushed
        ),
    }
    eprintln!("{received} packets received by filter");
    eprintln!("{lost} packets dropped by packetflow");
    if a.stages.is_some() {
        eprintln!(
            "{} packets written without their stages: more than {HELD_MAX} were waiting for traces",
            state.held_overflow
        );
    }
    match state.error {
        None => Ok(()),
        Some(e) => Err(e.context(format!("writing {} failed", a.write.as_deref().unwrap_or("to stdout")))),
    }
}

/// Writes packets until the reader is done; a write error ends it (in `state.error`).
fn write_loop(mut state: WriterState, rx: Receiver<Vec<Packet>>, traces: Receiver<Trace>) -> WriterState {
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
            flushed: 0,
            held_overflow: 0,
            error: None,
        }
    }

    fn packet(n: u64) -> Packet {
        let hdr = CapHdr { ifindex: 1, ts_ns: n, ..unsafe { std::mem::zeroed() } };
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
        assert_eq!(k.5, packetflow_common::payload_key(&head, 16));
        assert_eq!((k.1, k.3, k.4, k.6), (40000, 8080, true, 18));
    }
}
