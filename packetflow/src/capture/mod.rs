//! `packetflow capture`: tcpdump's job from eBPF hooks. Incoming packets are taken at XDP,
//! outgoing ones at tcx egress (on a loopback device each packet is recorded once, at
//! ingress, as tcpdump does); the filter expression runs in the kernel before any copy.
//! Output: one tcpdump-like line per packet, or pcapng (`-w FILE`, `-w -` for stdout).
//! With `--stages`, the tracer runs too, and each packet of a finished trace carries its
//! stage timestamps in its pcapng comment. With `--drops`, packets the kernel drops on the
//! captured interfaces are kept too (skb:kfree_skb, `HOOK_DROP`), the reason and the
//! dropping code in their comment (docs/drops.md).

mod bypass;
pub mod decode;
pub mod expr;
pub mod frame;
mod list;
mod read;
mod writer;
pub mod xsk;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::sync_channel,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use packetflow_common::{
    capture::{CapHdr, DIR_IN, DIR_OUT},
    counters,
};

use writer::{HELD_MAX, Iface, Out, Packet, WriterState, write_loop};
pub use writer::{Rotation, TextStyle};

use crate::{
    cmd::capture::Args,
    error::user,
    format::pcapng,
    kernel::interfaces::{Role, XdpChoice},
    kernel::loader::{LoadOptions, Tracer},
    model::filter::FilterSpec,
    model::trace::{Trace, TraceKind},
    pipeline::run,
    pipeline::session::{self, Sink},
    pipeline::shards::{self, Shards},
    platform,
};

/// Finished traces, handed from the correlator to the capture writer.
struct TraceTap(std::sync::mpsc::SyncSender<Trace>);

impl Sink for TraceTap {
    fn trace(&mut self, t: &Trace) {
        if t.kind == TraceKind::Data {
            let _ = self.0.try_send(t.clone());
        }
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
        shards.drain(|item| {
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
    let rotating = a.file_size.is_some() || a.rotate_secs.is_some();
    if a.file_count.is_some() && !rotating {
        crate::user_bail!("-W keeps a ring of files: it needs -C SIZE or -G SECS");
    }
    if rotating && (a.write.as_deref() == Some("-") || a.read.is_some() || a.bypass) {
        crate::user_bail!("-C and -G rotate the files of a live capture: -w FILE, not stdout, -r or --bypass");
    }
    if a.list {
        list::run();
        return Ok(());
    }
    if let Some(file) = &a.read {
        return read::run(file, &a);
    }
    if a.bypass {
        return bypass::run(a).await;
    }
    let dirs = a.direction.mask();
    let snaplen = a.snaplen.unwrap_or(u32::MAX).min(packetflow_common::capture::CAPTURE_MAX as u32);
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
    let shards = Shards::new(rings.into_iter().map(|(_, r)| r).collect(), Duration::from_millis(10), stop_rx)?;
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
    if a.drops {
        tracer
            .attach_capture_drops()
            .map_err(|e| user(format!("cannot capture dropped packets: skb:kfree_skb would not attach ({e})")))?;
    }
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
            crate::kernel::drops::DropNamer::new(tracer.drop_reasons.clone()),
            vec![Box::new(TraceTap(trace_tx))],
        )
    });

    // The writer: interfaces first (pcapng), then packets as they come.
    let out: Out = match a.write.as_deref() {
        None => Out::Text(Box::new(std::io::BufWriter::new(std::io::stdout()))),
        Some(path) => {
            let first = a.rotation().map_or_else(|| path.to_string(), |r| r.name(0));
            let w = crate::format::output::writer(&first)?;
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
        namer: a.drops.then(|| crate::kernel::drops::DropNamer::new(tracer.drop_reasons.clone())),
        drops_elsewhere: 0,
        style: a.style(),
        rotation: a.rotation(),
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
            () = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            () = tokio::time::sleep(Duration::from_millis(50)) => {
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
    let lost = g(counters::CAP_LOST_XDP)
        + g(counters::CAP_LOST_TC)
        + g(counters::CAP_LOST_DROP)
        + overflow.load(Ordering::Relaxed);
    let end_wall = platform::host::realtime_ns();
    for (ifindex, i) in &mut state.ifaces {
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
    let received = g(counters::CAP_MATCHED_XDP) + g(counters::CAP_MATCHED_TC) + g(counters::CAP_MATCHED_DROP);
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
    if a.drops {
        eprintln!(
            "{} packets the kernel dropped captured ({} more dropped on interfaces not captured: not written)",
            g(counters::CAP_MATCHED_DROP).saturating_sub(state.drops_elsewhere),
            state.drops_elsewhere
        );
    }
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
