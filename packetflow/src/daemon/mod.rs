//! `packetflow daemon`: the long-running service. One tracing run (`run::Running`) that
//! never ends on its own, plus:
//!
//! - a snapshot of the pipeline, refreshed every second, behind `/metrics`
//!   (`metrics.rs`) and the control socket (`packetflow status`);
//! - NDJSON trace files with rotation and a disk cap (`trace_files.rs`), full mode only;
//! - SIGHUP: reload the config; filters, sampling, `slow_us` and rotation apply at once
//!   (the filter is a map write: nothing is detached), and in summary mode `stages`
//!   (`Running::set_stages`: only the hooks that change); a bad file is rejected and the old
//!   settings stay; settings that need a restart are named and kept;
//! - SIGTERM/SIGINT: detach, drain, flush, exit 0 (bounded to 2 s);
//! - `--user`: after everything is attached, become that user with no capabilities.
//!
//! Every attachment is a bpf_link and nothing is pinned, so even SIGKILL leaves nothing
//! attached: the kernel drops the links with the process's fds.

pub mod config;
pub mod http;
pub mod metrics;

use std::{
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener},
    signal::unix::{SignalKind, signal},
};

use crate::{
    cmd::daemon::Args,
    daemon::config::{Config, Mode},
    daemon::metrics::Snapshot,
    error::user,
    format::ndjson,
    format::trace_files::{self, TraceFiles},
    kernel::xdp_owner,
    pipeline::accounting,
    pipeline::names::Names,
    pipeline::run::{self, RunOptions, Running},
    platform,
    platform::interfaces,
    report::tables,
    user_bail,
};

/// How long SIGTERM may take before the daemon exits anyway (the kernel detaches the
/// links when the process is gone).
const STOP_BUDGET: Duration = Duration::from_millis(1800);

/// The trace files' live settings and counters, once the writer exists (full mode).
type Files = Mutex<Option<(Arc<Mutex<trace_files::Settings>>, Arc<trace_files::Counters>)>>;

fn log(msg: impl AsRef<str>) {
    eprintln!("packetflow: {}", msg.as_ref());
}

pub async fn run(a: Args) -> Result<()> {
    let mut cfg = Config::load(a.config.as_deref(), &a.overrides())?;
    run::preflight("daemon")?;
    let mut stop = run::StopSignals::new()?;
    let drop_to = a.user.as_deref().map(platform::users::lookup_user).transpose()?;

    // Everything that can fail on bad input fails before a program is loaded.
    if !cfg.metrics_addr.ip().is_loopback() {
        if !cfg.metrics_public {
            user_bail!(
                "metrics_addr {} is not a loopback address and /metrics has no authentication; set metrics_public = true (or pass --metrics-public) to expose it",
                cfg.metrics_addr
            );
        }
        log(format!("warning: serving /metrics without authentication on {}", cfg.metrics_addr));
    }
    let metrics_listener = TcpListener::bind(cfg.metrics_addr)
        .await
        .map_err(|e| user(format!("cannot serve metrics on {}: {e}", cfg.metrics_addr)))?;
    let control = bind_control(&cfg.control_socket)?;
    let (attach_to, _) = interfaces::resolve(&cfg.interfaces, None)?;
    // XDP goes on only when the xdp stage is asked for (not in the default `overview`).
    if cfg.xdp_mode != crate::kernel::interfaces::XdpChoice::Off
        && cfg.filter().stages.contains(packetflow_common::Stage::Xdp)
    {
        for (ns, name) in &attach_to {
            check_xdp(ns.as_deref(), name, a.force)?;
        }
    }
    if let Some(dir) = &cfg.trace_dir {
        crate::format::output::ensure_dir(dir, "trace_dir")?;
        if let Some((uid, gid)) = drop_to {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                .map_err(|e| user(format!("cannot hand {} to the --user account: {e}", dir.display())))?;
        }
    }

    let files: Arc<Files> = Arc::default();
    let more_sinks: Option<run::MoreSinks> = match (&cfg.trace_dir, cfg.mode()) {
        (Some(dir), Mode::Full) => {
            let (dir, files, c) = (dir.clone(), files.clone(), cfg.clone());
            Some(Box::new(move |tracer, filter| {
                let available = tracer.stages.iter().filter(|(_, h)| h.state.is_ok()).map(|(s, _)| *s).collect();
                let header = ndjson::header(tracer, serde_json::to_value(filter).unwrap_or_default());
                let tf = TraceFiles::new(dir, file_settings(&c, header), Names::new(&tracer.interfaces), available);
                *files.lock().expect("files lock") = Some((tf.settings.clone(), tf.counters.clone()));
                vec![Box::new(tf) as Box<dyn crate::pipeline::session::Sink>]
            }))
        }
        _ => None,
    };
    let ring_bytes = RunOptions::default().ring_bytes;
    let mut running = Running::start(RunOptions {
        filter: cfg.filter(),
        interfaces: attach_to,
        any_in: interfaces::any_namespaces(&cfg.interfaces, None),
        xdp: cfg.xdp_mode,
        timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
        budget_mb: cfg.correlator_budget_mb as usize,
        more_sinks,
        ring_bytes,
        connections: cfg.connections,
        // Turning the statistics back on needs CAP_SYS_ADMIN, which --user gives up.
        run_stats: crate::pipeline::run::StatsSampling::from_secs(match (&drop_to, cfg.cost_sample_secs) {
            (Some(_), n) if n > 1 => {
                log(format!(
                    "cost_sample_secs = {n}: with --user the run statistics could not be turned back on, so they stay on"
                ));
                1
            }
            (_, n) => n,
        }),
        ..Default::default()
    })
    .await?;
    for line in running.tracer.unavailable().into_iter().chain(running.tracer.conn_unavailable()) {
        log(line);
    }
    if let Some((uid, gid)) = drop_to {
        platform::users::drop_privileges(uid, gid)?;
        log(format!("running as {} (uid {uid}, gid {gid}) with no capabilities", a.user.as_deref().unwrap_or("?")));
    }

    let started = Instant::now();
    let snap: Arc<Mutex<Option<Snapshot>>> = Arc::default();
    let status: Arc<Mutex<Status>> = Arc::default();
    let mut reloads = (0u64, 0u64);
    let refresh = |running: &Running, cfg: &Config, reloads: (u64, u64)| {
        let s = snapshot(running, &files, reloads, ring_bytes);
        *status.lock().expect("status lock") =
            Status { text: render_status(&s, cfg, started), json: status_json(&s, cfg, started).to_string() };
        *snap.lock().expect("snapshot lock") = Some(s);
    };
    refresh(&running, &cfg, reloads);
    let registry = Arc::new(metrics::registry(snap.clone()));
    let metrics_task = tokio::spawn(http::serve(metrics_listener, registry));
    let control_task = tokio::spawn(serve_control(control, status.clone()));
    log(format!(
        "ready: {} programs attached, mode {}, {}; metrics on http://{}/metrics; control socket {}",
        running.tracer.links,
        mode_name(cfg.mode()),
        describe_filter(&cfg),
        cfg.metrics_addr,
        cfg.control_socket.display()
    ));

    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let why = loop {
        tokio::select! {
            why = stop.recv() => break why,
            _ = hup.recv() => {
                match reload(&a, &cfg, &mut running, &files) {
                    Ok(new) => {
                        cfg = new;
                        reloads.0 += 1;
                        log(format!("configuration reloaded: {}", describe_filter(&cfg)));
                    }
                    Err(e) => {
                        reloads.1 += 1;
                        log(format!("configuration rejected, the previous one stays in force: {}", crate::error::report(&e).1));
                    }
                }
                refresh(&running, &cfg, reloads);
            }
            _ = tick.tick() => {
                for line in running.watch_interfaces() {
                    log(line);
                }
                refresh(&running, &cfg, reloads);
            }
        }
    };
    log(format!("{why}: detaching"));
    metrics_task.abort();
    control_task.abort();
    match tokio::time::timeout(STOP_BUDGET, running.finish()).await {
        Ok(Ok(f)) => log(format!("stopped; {}", accounting::loss_line(&f))),
        Ok(Err(e)) => log(format!("stopping: {e:#}")),
        Err(_) => log("stopping took too long; exiting (the kernel detaches what is left)"),
    }
    if std::fs::symlink_metadata(&cfg.control_socket).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&cfg.control_socket);
    }
    Ok(())
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Summary => "summary (in-kernel histograms)",
        Mode::Full => "full (per-packet traces)",
    }
}

fn describe_filter(c: &Config) -> String {
    let mut parts = c.filter().describe();
    if c.slow_us > 0 {
        parts.push(format!("trace files keep packets >= {} µs", c.slow_us));
    }
    if parts.is_empty() { "all TCP and UDP".into() } else { parts.join(", ") }
}

fn file_settings(c: &Config, header: serde_json::Value) -> trace_files::Settings {
    trace_files::Settings {
        slow_ns: c.slow_us.saturating_mul(1000),
        rotate_bytes: c.rotate_mb << 20,
        rotate_age: Duration::from_secs(c.rotate_secs),
        max_total_bytes: c.max_total_mb << 20,
        header,
    }
}

/// Reads the config again and applies what can change while running. Returns the
/// settings now in force (restart-only keys keep their old values).
fn reload(a: &Args, old: &Config, running: &mut Running, files: &Files) -> Result<Config> {
    let mut new = Config::load(a.config.as_deref(), &a.overrides())?;
    let keep = old.restart_keys(&new);
    if !keep.is_empty() {
        log(format!("{} changed: that needs a restart; keeping the running values", keep.join(", ")));
        new.metrics_addr = old.metrics_addr;
        new.metrics_public = old.metrics_public;
        new.control_socket = old.control_socket.clone();
        new.interfaces = old.interfaces.clone();
        new.xdp_mode = old.xdp_mode;
        new.mode = Some(old.mode());
        new.trace_dir = old.trace_dir.clone();
        new.timeout_ms = old.timeout_ms;
        new.correlator_budget_mb = old.correlator_budget_mb;
        new.connections = old.connections;
        if keep.contains(&"stages") {
            new.stages = old.stages.clone();
        }
    }
    let filter = new.filter();
    let kf = filter.to_kernel(std::process::id())?;
    // A protocol's own hooks follow `proto` (`hooks::Group::wanted`).
    if new.stages != old.stages || kf.protos != running.tracer.protos {
        running.tracer.protos = kf.protos;
        for line in running.set_stages(filter.stages) {
            log(format!("stages {}: {line}", filter.stages.describe()));
        }
    }
    running.tracer.set_filter(&kf).context("writing the new filter")?;
    if let Some((settings, _)) = files.lock().expect("files lock").as_ref() {
        let mut s = settings.lock().expect("settings lock");
        let mut header = s.header.clone();
        header["filters"] = serde_json::to_value(&filter).unwrap_or_default();
        *s = file_settings(&new, header);
    }
    Ok(new)
}

fn snapshot(running: &Running, files: &Files, reloads: (u64, u64), ring_bytes: u32) -> Snapshot {
    let sh = &running.shared;
    let ring_fill = running
        .tracer
        .used_shards
        .iter()
        .map(|&s| (s, sh.ring_backlog_bytes[s].swap(0, Ordering::Relaxed) as f64 / f64::from(ring_bytes)))
        .collect();
    let fc = files.lock().expect("files lock").as_ref().map(|(_, c)| c.clone());
    let f = |get: fn(&trace_files::Counters) -> u64| fc.as_deref().map_or(0, get);
    Snapshot {
        taken: Instant::now(),
        stats: running.stats(),
        counters: running.tracer.counters().unwrap_or_default(),
        missed: running.tracer.recursion_misses(),
        programs: running.tracer.program_costs(),
        tracing_for: running.started.elapsed(),
        stats_sampled: running.tracer.stats_sampled(),
        corr: *sh.corr.lock().expect("corr lock"),
        reader_overflow: sh.overflow_records.load(Ordering::Relaxed),
        reader_overflow_anchors: sh.overflow_anchors.load(Ordering::Relaxed),
        corr_bytes: (sh.corr_bytes.load(Ordering::Relaxed), sh.corr_budget.load(Ordering::Relaxed)),
        ring_fill,
        stages: running.tracer.stages.clone(),
        interfaces: running.tracer.interfaces.clone(),
        links: running.tracer.links,
        trace_lines_written: f(|c| c.lines_written.load(Ordering::Relaxed)),
        trace_lines_dropped: f(|c| c.lines_dropped.load(Ordering::Relaxed)),
        trace_files_deleted: f(|c| c.files_deleted.load(Ordering::Relaxed)),
        trace_write_errors: f(|c| c.write_errors.load(Ordering::Relaxed)),
        reloads_applied: reloads.0,
        reloads_rejected: reloads.1,
        conns: sh.conns.lock().expect("conns lock").clone(),
        conns_traced: !running.tracer.conn_hooks.is_empty(),
        drops: running.drops(),
    }
}

/// The control socket's two answers: `status` (text) and `status json` (one line).
#[derive(Default)]
struct Status {
    text: String,
    json: String,
}

/// `packetflow status --json`: the daemon's facts and the run's summary (the same object
/// as a trace file's `summary` line: per path and stage percentiles, losses, drops).
fn status_json(s: &Snapshot, c: &Config, started: Instant) -> serde_json::Value {
    let lost = accounting::with_misses(accounting::lost_per_stage(&s.counters), &s.missed);
    let counters = accounting::counters_json(&s.counters, s.reader_overflow);
    let mut summary = ndjson::summary(&s.stats, &lost, counters, &s.corr, &s.drops);
    let hooks: serde_json::Map<String, serde_json::Value> = s
        .stages
        .iter()
        .map(|(stage, h)| {
            let state = match &h.state {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("unavailable: {e}"),
            };
            (stage.name().to_string(), serde_json::json!({"hook": h.hook, "state": state}))
        })
        .collect();
    let daemon = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_s": started.elapsed().as_secs(),
        "mode": match c.mode() { Mode::Summary => "summary", Mode::Full => "full" },
        "filter": describe_filter(c),
        "metrics": format!("http://{}/metrics", c.metrics_addr),
        "attachments": s.links,
        "hooks": hooks,
        "tracing_cost_ns": s.programs.as_ref().map(|p| p.iter().map(|p| p.ns).sum::<u64>()),
        "reloads": {"applied": s.reloads_applied, "rejected": s.reloads_rejected},
    });
    if let Some(o) = summary.as_object_mut() {
        o.insert("type".into(), "status".into());
        o.insert("daemon".into(), daemon);
    }
    summary
}

/// What `packetflow status` prints.
fn render_status(s: &Snapshot, c: &Config, started: Instant) -> String {
    let mut out = String::new();
    let up = started.elapsed().as_secs();
    out.push_str(&format!(
        "packetflow daemon {}, pid {}, up {}h{:02}m{:02}s; mode {}; {}\n",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        up / 3600,
        up / 60 % 60,
        up % 60,
        mode_name(c.mode()),
        describe_filter(c)
    ));
    out.push_str(&format!("metrics: http://{}/metrics\n", c.metrics_addr));
    if let Some(dir) = &c.trace_dir {
        let files = trace_files::list(dir);
        let bytes: u64 = files.iter().map(|(_, n)| n).sum();
        out.push_str(&format!(
            "trace files: {} ({} files, {:.1} MiB of {} MiB; {} lines written, {} dropped, {} files deleted, {} write errors)\n",
            dir.display(),
            files.len(),
            bytes as f64 / f64::from(1 << 20),
            c.max_total_mb,
            s.trace_lines_written,
            s.trace_lines_dropped,
            s.trace_files_deleted,
            s.trace_write_errors
        ));
    }
    out.push('\n');
    let lost = accounting::with_misses(accounting::lost_per_stage(&s.counters), &s.missed);
    out.push_str(&tables::path_tables(&s.stats, &lost));
    if s.conns_traced {
        out.push_str(&format!("\nconnection set-up per listener:\n{}", tables::connection_table(&s.conns)));
    }
    out.push_str(&format!("\n{}", tables::drop_table(&s.drops)));
    match &s.programs {
        Some(progs) => {
            let ns: u64 = progs.iter().map(|p| p.ns).sum();
            out.push_str(&format!(
                "
tracing cost: {:.2}% of one CPU since start ({:.1} ms of kernel time in {:.0} s of run statistics over {:.0} s: cost_sample_secs)
",
                ns as f64 / s.stats_sampled.as_nanos().max(1) as f64 * 100.0,
                ns as f64 / 1e6,
                s.stats_sampled.as_secs_f64(),
                s.tracing_for.as_secs_f64(),
            ));
            for p in progs {
                out.push_str(&format!("  {:<20} {:>12} runs {:>8} ns/run\n", p.name, p.runs, p.ns / p.runs.max(1)));
            }
        }
        None => out.push_str(
            "
tracing cost: unknown (the kernel's BPF run statistics are off: cost_sample_secs = 0, or could not be turned on)
",
        ),
    }
    out.push_str(&format!("\nhooks ({} attachments):\n", s.links));
    for (stage, h) in &s.stages {
        let state = match &h.state {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("unavailable: {e}"),
        };
        out.push_str(&format!("  {:<14} {}: {state}\n", stage.name(), h.hook));
    }
    let lost_total: u64 = lost.values().sum();
    out.push_str(&format!(
        "\nlosses: {lost_total} events lost in the kernel{}; {} records dropped by a slow reader; {} flows and {} records evicted from the correlator\n",
        if lost_total > 0 {
            format!(
                " ({})",
                lost.iter().filter(|(_, n)| **n > 0).map(|(s, n)| format!("{} {n}", s.name())).collect::<Vec<_>>().join(", ")
            )
        } else {
            String::new()
        },
        s.reader_overflow,
        s.corr.flows_evicted,
        s.corr.records_evicted
    ));
    out.push_str(&format!("config reloads: {} applied, {} rejected\n", s.reloads_applied, s.reloads_rejected));
    out
}

/// Refuses to replace another program's XDP attachment on `ifname` unless `force`.
fn check_xdp(ns: Option<&Path>, ifname: &str, force: bool) -> Result<()> {
    let name = ifname.to_string();
    platform::netns::in_netns(ns, move || {
        let Some(ifindex) = platform::interfaces::ifindex(&name) else {
            return Ok(());
        };
        let Some(h) =
            xdp_owner::holder(ifindex).with_context(|| format!("asking the kernel about {name}'s XDP program"))?
        else {
            return Ok(());
        };
        if !force {
            user_bail!(
                "interface {name} already has an {}; packetflow will not replace it: pass --force to detach it, or set xdp_mode = \"off\"",
                h.describe()
            );
        }
        if let Err(e) = xdp_owner::remove(ifindex, &name, &h) {
            // A refusal is its own sentence; any other failure says what was being done.
            return Err(if e.is::<crate::error::UserError>() {
                e
            } else {
                e.context(format!("detaching the {} from {name}", h.describe()))
            });
        }
        log(format!("--force: detached the {} from {name}", h.describe()));
        Ok(())
    })
}

/// Binds the control socket (mode 0600 in a 0700 directory). A live daemon on the same
/// path is a user error; a stale socket file is replaced.
fn bind_control(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|e| user(format!("cannot create {}: {e}", dir.display())))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    // Only a socket nobody answers on is removed: never a file, a directory or a symlink
    // someone put at the path (the daemon runs as root).
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                user_bail!("another packetflow daemon is running (it answers on {})", path.display());
            }
            std::fs::remove_file(path)
                .map_err(|e| user(format!("cannot remove the stale control socket {}: {e}", path.display())))?;
        }
        Ok(_) => user_bail!(
            "control_socket {} exists and is not a socket; packetflow will not replace it (remove it, or choose another path)",
            path.display()
        ),
        Err(_) => {}
    }
    // Created 0600 from the start: no window where others could connect.
    // SAFETY: umask(2) has no memory preconditions; the old mask is restored right after bind.
    let old = unsafe { libc::umask(0o177) };
    let l = UnixListener::bind(path);
    // SAFETY: umask(2) has no memory preconditions.
    unsafe { libc::umask(old) };
    l.map_err(|e| user(format!("cannot create control socket {}: {e}", path.display())))
}

async fn serve_control(l: UnixListener, status: Arc<Mutex<Status>>) {
    loop {
        let Ok((conn, _)) = l.accept().await else {
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let (r, mut w) = conn.into_split();
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(5), BufReader::new(r).read_line(&mut line)).await;
            let reply = match (read, line.trim()) {
                (Ok(Ok(_)), "status") => status.lock().expect("status lock").text.clone(),
                (Ok(Ok(_)), "status json") => format!("{}\n", status.lock().expect("status lock").json),
                (Ok(Ok(_)), cmd) => format!("unknown command '{cmd}' (try: status, status json)\n"),
                _ => return,
            };
            let _ = w.write_all(reply.as_bytes()).await;
            let _ = w.shutdown().await;
        });
    }
}
