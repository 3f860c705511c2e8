//! One tracing run, as `trace` and `demo` use it: load, start readers, filter, attach,
//! correlate; then detach, drain and summarize.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, Result};
use packetflow_common::Stage;

use crate::{
    format::ndjson::{self, JsonSink},
    kernel::interfaces::XdpChoice,
    kernel::loader::{LoadOptions, Tracer},
    model::filter::FilterSpec,
    model::stats::Stats,
    pipeline::accounting::{Cost, counters_json, lost_per_stage, with_misses},
    pipeline::correlate::CorrStats,
    pipeline::names::Names,
    pipeline::session::{self, CorrelatorHandle, Readers, Shared, Sink},
    platform,
};

pub struct RunOptions {
    pub filter: FilterSpec,
    /// (network namespace, interface name) pairs that get XDP and TC.
    pub interfaces: Vec<(Option<PathBuf>, String)>,
    /// Namespaces named with `-i any`: interfaces that appear there later are attached
    /// too (`Running::watch_interfaces`).
    pub any_in: Vec<Option<PathBuf>>,
    pub xdp: XdpChoice,
    /// NDJSON output: a path, or "-" for stdout.
    pub json: Option<String>,
    /// Chrome Trace Event output (Perfetto).
    pub chrome_trace: Option<String>,
    /// Extra network namespaces whose interface names traces may mention.
    pub netns_names: Vec<PathBuf>,
    pub timeout: Duration,
    /// The correlator's memory budget (`Correlator::budget_bytes`), MiB.
    pub budget_mb: usize,
    pub count: Option<u64>,
    /// `--json` writes trace lines only for traces at least this slow (end to end; 0: all).
    pub slow_ns: u64,
    pub poll: Duration,
    pub ring_bytes: u32,
    /// Programs attached but idle (`LoadOptions::idle`): for the bench only.
    pub idle: bool,
    /// More sinks, made once the programs are attached (the daemon's trace files).
    pub more_sinks: Option<MoreSinks>,
    /// When the kernel's run statistics are on (`run_stats::RunStats`).
    pub run_stats: StatsSampling,
    /// Also trace TCP connection establishment (`kernel::connections`).
    pub connections: bool,
}

/// When the kernel's per-program run statistics are on: they cost every program run two
/// clock reads (`run_stats::RunStats`), so a tracer left running samples them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsSampling {
    /// On for the whole run (trace, demo: their cost line is exact).
    Always,
    /// Never on: no cost figures.
    Never,
    /// On for the first second of every `every` seconds (the daemon).
    Sampled { every: u32 },
}

impl StatsSampling {
    /// The daemon's `cost_sample_secs`: 0 never, 1 always, N one second in N.
    pub fn from_secs(n: u32) -> StatsSampling {
        match n {
            0 => StatsSampling::Never,
            1 => StatsSampling::Always,
            every => StatsSampling::Sampled { every },
        }
    }
}

pub type MoreSinks = Box<dyn FnOnce(&Tracer, &FilterSpec) -> Vec<Box<dyn Sink>> + Send>;

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            filter: FilterSpec::default(),
            interfaces: vec![(None, "lo".into())],
            any_in: Vec::new(),
            xdp: XdpChoice::Auto,
            json: None,
            chrome_trace: None,
            netns_names: Vec::new(),
            timeout: Duration::from_secs(1),
            budget_mb: crate::pipeline::correlate::DEFAULT_BUDGET_MB,
            count: None,
            slow_ns: 0,
            poll: Duration::from_millis(10),
            ring_bytes: LoadOptions::default().ring_bytes,
            idle: false,
            more_sinks: None,
            run_stats: StatsSampling::Always,
            connections: false,
        }
    }
}

pub struct Running {
    pub tracer: Tracer,
    /// When the programs were attached (the tracer's cost is over the time since).
    pub started: std::time::Instant,
    any_in: Vec<Option<PathBuf>>,
    xdp: XdpChoice,
    /// Interfaces `watch_interfaces` tried to attach (each is tried once).
    tried: std::collections::HashSet<(Option<PathBuf>, String)>,
    readers: Readers,
    corr: CorrelatorHandle,
    pub shared: Arc<Shared>,
    summary: bool,
    records: bool,
    /// Turns the run statistics on and off (`StatsSampling::Sampled`).
    sampler: Option<tokio::task::JoinHandle<()>>,
}

/// What a finished run leaves.
pub struct Finished {
    /// From the per-packet traces (or, with records off, the kernel's histograms).
    pub stats: Stats,
    /// The kernel's histograms, in summary mode.
    pub kernel_stats: Option<Stats>,
    pub corr: CorrStats,
    pub counters: Vec<u64>,
    pub lost: BTreeMap<Stage, u64>,
    pub overflow_records: u64,
    pub summary: serde_json::Value,
    pub stages: BTreeMap<Stage, crate::kernel::hooks::StageHook>,
    pub interfaces: Vec<crate::kernel::interfaces::Attached>,
    /// The tracer's own kernel time over the run (None: run statistics unavailable).
    pub cost: Option<Cost>,
    /// Connection traces per listener (`RunOptions::connections`).
    pub conns: crate::model::connection::ConnStats,
    /// How each handshake step was observed (empty without `connections`).
    pub conn_hooks: Vec<crate::kernel::connections::ConnHookState>,
    /// Drops by reason, stage and location; retransmits by port (summary mode: the
    /// kernel's counts, by reason and stage).
    pub drops: crate::model::drops::DropStats,
}

/// Starts the sampler `how` asks for (`StatsSampling`); the statistics are on now.
fn start_sampling(tracer: &Tracer, how: StatsSampling) -> Option<tokio::task::JoinHandle<()>> {
    let stats = tracer.run_stats();
    stats.lock().expect("run stats lock").reset_clock();
    let every = match how {
        StatsSampling::Always => return None,
        StatsSampling::Never => {
            stats.lock().expect("run stats lock").disable();
            return None;
        }
        StatsSampling::Sampled { every } => every,
    };
    // Weak: the switch goes with the tracer, even if `finish` is never called.
    let stats = Arc::downgrade(&stats);
    Some(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(s) = stats.upgrade() else { return };
            s.lock().expect("run stats lock").set(false);
            drop(s);
            tokio::time::sleep(Duration::from_secs(u64::from(every) - 1)).await;
            let Some(s) = stats.upgrade() else { return };
            s.lock().expect("run stats lock").set(true);
        }
    }))
}

impl Running {
    pub async fn start(o: RunOptions) -> Result<Running> {
        if o.filter.stages.is_empty() && !o.connections {
            crate::user_bail!("--stages none traces no packet: it goes with --connections");
        }
        let packets = !o.filter.stages.is_empty();
        if !o.filter.no_records && packets {
            o.filter.stages.check_joinable()?;
        }
        let dbg = std::env::var_os("PACKETFLOW_DEBUG_LOAD").is_some();
        let t0 = std::time::Instant::now();
        let mut tracer = Tracer::load(&LoadOptions { ring_bytes: o.ring_bytes, capture_ring_bytes: 0, idle: o.idle })?;
        if dbg {
            eprintln!("object loaded in {:?}", t0.elapsed());
        }
        let rings = tracer.take_rings()?;
        let mut readers = session::start_readers(rings, o.poll)?;
        let mut filter = o.filter.clone();
        if filter.no_records {
            // Summary mode times no woken/on_cpu: their scheduler hooks would run for nothing.
            filter.stages = filter.stages.for_summary();
        }
        // Interface filter: only when the user named interfaces explicitly.
        if !filter.ifindexes.is_empty() {
            filter.ifindexes.sort_unstable();
            filter.ifindexes.dedup();
        }
        let kf = filter.to_kernel(std::process::id())?;
        tracer.set_filter(&kf)?;
        if o.connections {
            // First: the kernel's BTF is still at hand (set_stages lets it go).
            tracer.attach_connections()?;
        }
        if packets {
            tracer.attach_drops();
            tracer.attach_kernel_hooks(filter.stages)?;
        }
        if dbg {
            eprintln!("kernel hooks attached at {:?}", t0.elapsed());
        }
        // Connections only (`--stages none`): no program on any interface.
        for (ns, name) in o.interfaces.iter().filter(|_| packets) {
            tracer.attach_interface(ns.as_deref(), name, o.xdp)?;
        }
        if dbg {
            eprintln!("interfaces attached at {:?}", t0.elapsed());
        }
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        if let Some(path) = &o.json {
            let out = crate::format::output::writer(path)?;
            let mut names = Names::new(&tracer.interfaces);
            for p in &o.netns_names {
                names.add_netns(p);
            }
            let available: Vec<Stage> =
                tracer.stages.iter().filter(|(_, h)| h.state.is_ok()).map(|(s, _)| *s).collect();
            let mut sink = JsonSink::new(out, names, available);
            sink.slow_ns = o.slow_ns;
            sink.line(&ndjson::header(&tracer, serde_json::to_value(&filter)?));
            sinks.push(Box::new(sink));
        }
        if let Some(path) = &o.chrome_trace {
            sinks.push(Box::new(crate::format::chrome::ChromeTrace::new(crate::format::output::writer(path)?)));
        }
        if let Some(more) = o.more_sinks {
            sinks.extend(more(&tracer, &filter));
        }
        let namer = crate::kernel::drops::DropNamer::new(tracer.drop_reasons.clone());
        let corr = readers.start_correlator(tracer.coverage(), o.timeout, o.budget_mb, o.count, namer, sinks);
        let shared = readers.shared.clone();
        let sampler = start_sampling(&tracer, o.run_stats);
        Ok(Running {
            sampler,
            tracer,
            started: std::time::Instant::now(),
            any_in: if packets { o.any_in } else { Vec::new() },
            xdp: o.xdp,
            tried: std::collections::HashSet::default(),
            readers,
            corr,
            shared,
            summary: o.filter.summary,
            records: !o.filter.no_records,
        })
    }

    /// Attaches and detaches global hooks so they serve `stages` (the kept ones run on,
    /// their histograms with no gap); the correlator expects the new set from now on.
    /// Write the filter with the same set afterwards. One line per hook changed.
    pub fn set_stages(&mut self, stages: crate::model::stage_set::StageSet) -> Vec<String> {
        let stages = if self.records { stages } else { stages.for_summary() };
        let lines = self.tracer.set_stages(stages);
        *self.shared.coverage.lock().expect("coverage lock") = Some(self.tracer.coverage());
        lines
    }

    /// Notices interfaces deleted since the last call (their stages stop; the run goes
    /// on) and, under `-i any`, attaches interfaces that appeared. One line per change.
    /// Call every second or so.
    pub fn watch_interfaces(&mut self) -> Vec<String> {
        let mut lines = self.tracer.check_interfaces();
        for ns in &self.any_in {
            let Ok(now) = platform::netns::in_netns(ns.as_deref(), || Ok(platform::interfaces::interfaces())) else {
                continue;
            };
            for (_, name, _) in now {
                if self.tracer.has_interface(ns.as_deref(), &name) || !self.tried.insert((ns.clone(), name.clone())) {
                    continue;
                }
                lines.push(match self.tracer.attach_interface(ns.as_deref(), &name, self.xdp) {
                    Ok(_) => format!("new interface {name}: attached"),
                    Err(e) => format!("new interface {name}: not attached: {}", crate::error::report(&e).1),
                });
            }
        }
        if !lines.is_empty() {
            *self.shared.coverage.lock().expect("coverage lock") = Some(self.tracer.coverage());
        }
        lines
    }

    /// Drops and retransmits so far: the correlator's, or the kernel's in summary mode.
    pub fn drops(&self) -> crate::model::drops::DropStats {
        if self.records {
            return self.shared.drops.lock().expect("drops lock").clone();
        }
        let mut d = crate::model::drops::DropStats::default();
        for (reason, stage, n) in self.tracer.kernel_drops() {
            d.add(&self.tracer.drop_reasons.name(reason), stage.map_or("-", Stage::name), "-", n);
        }
        d.retransmits.extend(self.tracer.kernel_retransmits());
        d
    }

    /// The statistics so far: the correlator's, or the kernel's in summary mode.
    pub fn stats(&self) -> Stats {
        if self.records { self.shared.stats.lock().expect("stats lock").clone() } else { self.tracer.kernel_stats() }
    }

    /// Per stage, records lost in the kernel: a full ring, or a run the kernel skipped.
    pub fn lost(&self) -> BTreeMap<Stage, u64> {
        with_misses(lost_per_stage(&self.tracer.counters().unwrap_or_default()), &self.tracer.recursion_misses())
    }

    /// Waits until at least `n` data traces are finished, or `max` passes.
    pub async fn wait_traces(&self, n: u64, max: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        while self.shared.data_traces.load(Ordering::Relaxed) < n {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Waits until at least `n` connection traces are finished, or `max` passes.
    pub async fn wait_connections(&self, n: u64, max: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        while self.shared.conns.lock().expect("conns lock").connections() < n {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Detaches every program, drains the rings, finishes every trace and writes the
    /// summary to the sinks.
    pub async fn finish(self) -> Result<Finished> {
        let Running {
            mut tracer,
            readers,
            corr,
            shared,
            summary,
            records,
            started,
            sampler,
            any_in: _,
            xdp: _,
            tried: _,
        } = self;
        if let Some(s) = sampler {
            s.abort();
        }
        let missed = tracer.recursion_misses();
        let cost = tracer.program_costs().map(|p| Cost::of(&p, started.elapsed(), tracer.stats_sampled()));
        tracer.detach_all();
        let (_corr, mut sinks) = readers.stop(corr).await.context("stopping the pipeline")?;
        let counters = tracer.counters().unwrap_or_default();
        let kernel_stats = summary.then(|| tracer.kernel_stats());
        let stats = match (&kernel_stats, records) {
            (Some(k), false) => k.clone(),
            _ => shared.stats.lock().expect("stats lock").clone(),
        };
        let corr = *shared.corr.lock().expect("corr lock");
        let overflow = shared.overflow_records.load(Ordering::Relaxed);
        let lost = with_misses(lost_per_stage(&counters), &missed);
        let mut counts = counters_json(&counters, overflow);
        if let Some(c) = &cost {
            counts["tracing_kernel_ns"] = c.kernel_ns.into();
            counts["tracing_program_runs"] = c.runs.into();
        }
        counts["recursion_misses"] =
            serde_json::json!(missed.iter().map(|(s, n)| (s.name(), *n)).collect::<BTreeMap<_, _>>());
        let mut drops = shared.drops.lock().expect("drops lock").clone();
        if !records {
            for (reason, stage, n) in tracer.kernel_drops() {
                drops.add(&tracer.drop_reasons.name(reason), stage.map_or("-", Stage::name), "-", n);
            }
        }
        let summary = ndjson::summary(&stats, &lost, counts, &corr, &drops);
        for s in &mut sinks {
            s.finish(&summary);
        }
        Ok(Finished {
            stats,
            kernel_stats,
            corr,
            counters,
            lost,
            overflow_records: overflow,
            summary,
            stages: tracer.stages.clone(),
            interfaces: tracer.interfaces.clone(),
            cost,
            conns: shared.conns.lock().expect("conns lock").clone(),
            conn_hooks: tracer.conn_hooks.clone(),
            drops,
        })
    }
}

/// The stop signals, Ctrl-C and SIGTERM, handled alike. Create it once, before the run
/// starts, and wait on it in the run's loop: a listener made anew at every turn of a loop
/// missed a signal that came between two turns (tokio tells a listener only of signals
/// after its creation), and the process, its handler installed, then never stopped.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn new() -> Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// The next stop signal (cancel-safe: a signal delivered meanwhile is kept).
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Checks privileges and mounts for any tracing subcommand.
pub fn preflight(what: &str) -> Result<()> {
    platform::privileges::require_caps(what, platform::privileges::TRACE_CAPS)?;
    let _ = platform::mounts::ensure_bpffs();
    Ok(())
}
