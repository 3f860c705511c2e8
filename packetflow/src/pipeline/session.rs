//! The running pipeline: ring-buffer readers → correlator → sinks.
//!
//! ```text
//! kernel hooks ──► ring shards RB0..RB7 ──► reader task per shard (tokio AsyncFd)
//!        ──► bounded channel (overflow counted) ──► correlator thread ──► sinks
//!                                                   (traces)              (stats, JSON, ...)
//! ```
//!
//! Readers start before any program is attached, so nothing emitted at start-up is lost.
//! They wake when a shard passes a fill threshold (the programs write with
//! BPF_RB_NO_WAKEUP below it) and otherwise poll every `poll` interval. They never block:
//! when the correlator falls behind, a batch that does not fit is dropped and counted.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    time::Duration,
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use packetflow_common::{
    Event, RING_SHARDS,
    drop::{DROP_DETAIL_STAGE, DROP_STAGE, DropRecord, RETRANS_STAGE},
};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    model::connection::{ConnStats, Connection},
    model::drops::{DropStats, PacketDrop},
    model::stats::Stats,
    model::trace::{Flow, Trace},
    pipeline::connections::Tracker,
    pipeline::correlate::{CorrStats, Correlator, Coverage},
    pipeline::shards::{self, Shards},
    platform,
};

/// Records waiting for the correlator, at most (64 B each: 4 MiB). Past this, readers
/// drop whole batches (counted in `overflow_records`) instead of queueing without bound.
const MAX_QUEUED_RECORDS: u64 = 64 * 1024;

/// Readers deliver everything older than their drain start minus this margin.
const WATERMARK_MARGIN_NS: u64 = 2_000_000;

struct Batch {
    shard: usize,
    events: Vec<Event>,
    watermark: u64,
    last: bool,
}

/// Where finished traces go (besides the statistics, which every session keeps).
pub trait Sink: Send {
    fn trace(&mut self, t: &Trace);
    /// A finished connection trace (`trace --connections`).
    fn connection(&mut self, _c: &Connection) {}
    /// A drop of a packet that has no trace (a dropped traced packet's drop is on its
    /// trace, `Trace::drop`).
    fn untraced_drop(&mut self, _d: &PacketDrop) {}
    /// Called once, after the last trace, with the run's summary.
    fn finish(&mut self, _summary: &serde_json::Value) {}
}

/// State shared between the pipeline and whoever displays it.
#[derive(Default)]
pub struct Shared {
    pub stats: Mutex<Stats>,
    /// Connection traces per listener (`trace --connections`).
    pub conns: Mutex<ConnStats>,
    /// Drops by reason, stage and location; retransmits by port.
    pub drops: Mutex<DropStats>,
    /// Connection records taken, and connections handed on before they were done
    /// because too many were open (`Tracker::evicted`).
    pub conn_records: AtomicU64,
    pub conns_evicted: AtomicU64,
    pub corr: Mutex<CorrStats>,
    /// Records dropped because the correlator was behind (reader never blocks).
    pub overflow_records: AtomicU64,
    /// Of those, device-queue records: each was a packet's anchor, so a packet that will
    /// have no trace (traced + lost = sent, docs/daemon.md).
    pub overflow_anchors: AtomicU64,
    /// Ring records of unexpected size.
    pub bad_records: AtomicU64,
    pub data_traces: AtomicU64,
    /// Set once `count` data traces are done.
    pub count_reached: AtomicBool,
    pub count_notify: tokio::sync::Notify,
    pub flows: AtomicU64,
    /// The correlator's estimated memory (`Correlator::held_bytes`) and its budget.
    pub corr_bytes: AtomicU64,
    pub corr_budget: AtomicU64,
    /// Per shard: the most bytes one drain found waiting since this was last taken (the
    /// ring's fill level when the reader woke).
    pub ring_backlog_bytes: [AtomicU64; RING_SHARDS],
    /// Records handed to the correlator and not yet processed.
    pub queued_records: AtomicU64,
    /// A new coverage for the correlator (interfaces lost or added while running).
    pub coverage: Mutex<Option<Coverage>>,
}

pub struct Readers {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    rx: Option<Receiver<Batch>>,
    shards: Vec<usize>,
    pub shared: Arc<Shared>,
}

/// Starts one reader task per ring shard. Call before attaching programs.
pub fn start_readers(rings: Vec<(usize, RingBuf<MapData>)>, poll: Duration) -> Result<Readers> {
    let (tx, rx) = sync_channel::<Batch>(4096);
    let (stop, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared::default());
    let mut tasks = Vec::new();
    let mut shards = Vec::new();
    for (shard, ring) in rings {
        let ring = Shards::new(vec![ring], poll, stop_rx.clone())?;
        shards.push(shard);
        tasks.push(tokio::spawn(read_shard(shard, ring, tx.clone(), shared.clone())));
    }
    Ok(Readers { stop, tasks, rx: Some(rx), shards, shared })
}

async fn read_shard(shard: usize, mut ring: Shards, tx: SyncSender<Batch>, shared: Arc<Shared>) {
    loop {
        let last = ring.stopping();
        let watermark = platform::host::monotonic_ns().saturating_sub(WATERMARK_MARGIN_NS);
        let mut events = Vec::new();
        ring.drain(|item| match shards::record::<Event>(item) {
            Some(e) if item.len() == size_of::<Event>() => events.push(e),
            // A drop: passed on as two records (`DropRecord::detail`).
            _ if item.len() == size_of::<DropRecord>() => match shards::record::<DropRecord>(item) {
                Some(d) if d.ev.stage == DROP_STAGE => events.extend([d.ev, d.detail()]),
                _ => {
                    shared.bad_records.fetch_add(1, Ordering::Relaxed);
                }
            },
            _ => {
                shared.bad_records.fetch_add(1, Ordering::Relaxed);
            }
        });
        let n = events.len() as u64;
        // Each record takes its size plus an 8-byte header in the ring.
        shared.ring_backlog_bytes[shard].fetch_max(n * (std::mem::size_of::<Event>() as u64 + 8), Ordering::Relaxed);
        if shared.queued_records.load(Ordering::Relaxed) + n > MAX_QUEUED_RECORDS {
            // Over the bound: drop the records, still pass the watermark (and final marker).
            drop_counted(&shared, &events);
            events = Vec::new();
        }
        shared.queued_records.fetch_add(events.len() as u64, Ordering::Relaxed);
        match tx.try_send(Batch { shard, events, watermark, last }) {
            Ok(()) => {}
            Err(TrySendError::Full(b)) => {
                shared.queued_records.fetch_sub(b.events.len() as u64, Ordering::Relaxed);
                drop_counted(&shared, &b.events);
                if b.last {
                    // The final marker must get through: wait for room.
                    let tx = tx.clone();
                    let _ = tokio::task::spawn_blocking(move || tx.send(Batch { events: Vec::new(), ..b })).await;
                }
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
        if last {
            return;
        }
        ring.wait().await;
    }
}

/// Counts a batch the reader could not queue (and the packet anchors in it).
fn drop_counted(shared: &Shared, events: &[Event]) {
    let anchors = events.iter().filter(|e| e.stage == packetflow_common::Stage::DevQueue as u8).count();
    shared.overflow_records.fetch_add(events.len() as u64, Ordering::Relaxed);
    shared.overflow_anchors.fetch_add(anchors as u64, Ordering::Relaxed);
}

/// Hands the drops no trace took to the statistics and the sinks.
fn emit_untraced(corr: &mut Correlator, shared: &Shared, sinks: &std::cell::RefCell<Vec<Box<dyn Sink>>>) {
    for d in corr.take_untraced_drops() {
        shared.drops.lock().expect("drops lock").record(&d);
        for s in sinks.borrow_mut().iter_mut() {
            s.untraced_drop(&d);
        }
    }
}

pub struct CorrelatorHandle {
    thread: std::thread::JoinHandle<(Correlator, Vec<Box<dyn Sink>>)>,
}

impl Readers {
    /// Starts the correlator thread, which feeds finished traces to the statistics and
    /// to `sinks`. `count`: after this many data traces, `count_reached` is set.
    pub fn start_correlator(
        &mut self,
        coverage: Coverage,
        timeout: Duration,
        budget_mb: usize,
        count: Option<u64>,
        namer: crate::kernel::drops::DropNamer,
        sinks: Vec<Box<dyn Sink>>,
    ) -> CorrelatorHandle {
        let rx = self.rx.take().expect("correlator started once");
        let shared = self.shared.clone();
        let shards = self.shards.clone();
        let thread = std::thread::Builder::new()
            .name("correlator".into())
            .spawn(move || {
                let mut corr = Correlator::new(coverage);
                corr.namer = namer;
                // Debugging aid: every raw record, one line each (docs/stages.md).
                let mut dump = std::env::var_os("PACKETFLOW_DUMP_RECORDS")
                    .and_then(|p| std::fs::File::create(p).ok())
                    .map(std::io::BufWriter::new);
                corr.timeout_ns = timeout.as_nanos() as u64;
                corr.budget_bytes = budget_mb << 20;
                shared.corr_budget.store(corr.budget_bytes as u64, Ordering::Relaxed);
                // Send-side records precede their anchor (by as much as the socket's send
                // queue holds them): keep records well past a pending trace's timeout.
                corr.retention_ns = corr.retention_ns.max(2 * corr.timeout_ns);
                let mut wms = [u64::MAX; RING_SHARDS];
                for s in &shards {
                    wms[*s] = 0;
                }
                let mut done = [false; RING_SHARDS];
                let mut conns = Tracker::default();
                let sinks = std::cell::RefCell::new(sinks);
                let mut emit_conn = |c: Connection| {
                    shared.conns.lock().expect("conns lock").record(&c);
                    if c.is_stray() {
                        return;
                    }
                    for s in sinks.borrow_mut().iter_mut() {
                        s.connection(&c);
                    }
                };
                let mut emit = |t: Trace| {
                    shared.stats.lock().expect("stats lock").record(&t);
                    if let Some(d) = &t.drop {
                        shared.drops.lock().expect("drops lock").record(d);
                    }
                    for s in sinks.borrow_mut().iter_mut() {
                        s.trace(&t);
                    }
                    if t.kind == crate::model::trace::TraceKind::Data {
                        let n = shared.data_traces.fetch_add(1, Ordering::Relaxed) + 1;
                        if count.is_some_and(|c| n >= c) && !shared.count_reached.swap(true, Ordering::Relaxed) {
                            shared.count_notify.notify_one();
                        }
                    }
                };
                loop {
                    match rx.recv_timeout(Duration::from_millis(50)) {
                        Ok(b) => {
                            shared.queued_records.fetch_sub(b.events.len() as u64, Ordering::Relaxed);
                            let mut it = b.events.iter();
                            while let Some(e) = it.next() {
                                if let Some(d) = dump.as_mut() {
                                    use std::io::Write;
                                    let _ = writeln!(
                                        d,
                                        "{} {} cpu{} {}:{}>{}:{} seq={} len={} flags={:#x} aux={} aux2={}",
                                        e.ts_ns,
                                        packetflow_common::Stage::from_u8(e.stage)
                                            .map(packetflow_common::Stage::name)
                                            .or_else(|| packetflow_common::ConnStage::from_u8(e.stage)
                                                .map(packetflow_common::ConnStage::name))
                                            .unwrap_or("?"),
                                        e.cpu,
                                        crate::model::trace::ip(e.is_v6(), &e.saddr),
                                        e.sport,
                                        crate::model::trace::ip(e.is_v6(), &e.daddr),
                                        e.dport,
                                        e.seq,
                                        e.len,
                                        e.flags,
                                        e.aux,
                                        e.aux2
                                    );
                                }
                                match e.stage {
                                    DROP_STAGE => match it.next() {
                                        Some(detail) if detail.stage == DROP_DETAIL_STAGE => corr.push_drop(e, detail),
                                        _ => corr.stats.bad_records += 1,
                                    },
                                    RETRANS_STAGE => {
                                        shared.drops.lock().expect("drops lock").retransmit(&Flow::of(e));
                                        corr.push_retrans(e);
                                    }
                                    _ => {
                                        if !conns.push(e, &mut emit_conn) {
                                            corr.push(e);
                                        }
                                    }
                                }
                            }
                            wms[b.shard] = wms[b.shard].max(b.watermark);
                            if b.last {
                                done[b.shard] = true;
                                wms[b.shard] = u64::MAX;
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    if let Ok(mut c) = shared.coverage.try_lock()
                        && let Some(c) = c.take()
                    {
                        corr.coverage = c;
                    }
                    let wm = wms.iter().copied().min().unwrap_or(0);
                    corr.advance(wm, &mut emit);
                    emit_untraced(&mut corr, &shared, &sinks);
                    conns.advance(wm, &mut emit_conn);
                    shared.conn_records.store(conns.records, Ordering::Relaxed);
                    shared.conns_evicted.store(conns.evicted, Ordering::Relaxed);
                    *shared.corr.lock().expect("corr lock") = corr.stats;
                    shared.flows.store(corr.flows() as u64, Ordering::Relaxed);
                    shared.corr_bytes.store(corr.held_bytes() as u64, Ordering::Relaxed);
                    if shards.iter().all(|s| done[*s]) {
                        break;
                    }
                }
                corr.flush(&mut emit);
                emit_untraced(&mut corr, &shared, &sinks);
                conns.flush(&mut emit_conn);
                shared.conn_records.store(conns.records, Ordering::Relaxed);
                shared.conns_evicted.store(conns.evicted, Ordering::Relaxed);
                *shared.corr.lock().expect("corr lock") = corr.stats;
                (corr, sinks.into_inner())
            })
            .expect("spawning the correlator thread");
        CorrelatorHandle { thread }
    }

    /// Asks the readers for a final drain and waits for them. Detach the programs first
    /// so the final drain sees everything.
    pub async fn stop(self, corr: CorrelatorHandle) -> Result<(Correlator, Vec<Box<dyn Sink>>)> {
        let Readers { stop, tasks, .. } = self;
        let _ = stop.send(true);
        for t in tasks {
            let _ = t.await;
        }
        tokio::task::spawn_blocking(move || corr.thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the correlator thread panicked"))
    }
}
