//! What the tracer costs the kernel: per hook (bpf_stats), per stage set, and the highest
//! record rate full tracing sustains without loss.

use super::*;

/// Average ns per run of every attached program (kernel.bpf_stats) in full tracing,
/// summary mode, with a filter that matches nothing and idle, over a sockperf TCP
/// ping-pong on loopback; beside them an empty tp_btf program on net_dev_queue, which measures what
/// any program costs on this machine before it does anything.
pub(super) async fn hook_cost(c: &Cfg, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    const MODES: [Mode; 4] = [Mode::Full, Mode::Summary, Mode::NoMatch, Mode::Idle];
    const EMPTY: &str = "pf_probe_tp_btf";
    let port = 43000u16;
    let _srv = sockperf_server(None, "127.0.0.1", port, true)?;
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling kernel BPF statistics")?;
    let snapshot = || -> BTreeMap<String, (u64, u64)> {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .filter_map(|p| {
                let name = p.name_as_str()?.to_string();
                name.starts_with("pf_").then(|| (name, (p.run_time().as_nanos() as u64, p.run_count())))
            })
            .fold(BTreeMap::new(), |mut m, (n, v)| {
                let e: &mut (u64, u64) = m.entry(n).or_default();
                e.0 += v.0;
                e.1 += v.1;
                m
            })
    };
    let mut table: BTreeMap<String, [(u64, u64); MODES.len()]> = BTreeMap::new();
    let mut full_rate = 0f64;
    let mut attached: Vec<String> = Vec::new();
    for (i, m) in MODES.into_iter().enumerate() {
        eprintln!("hook cost: {}", m.name());
        let mut running = start_tracer(vec![(None, "lo".into())], m, port).await?;
        let btf = aya::Btf::from_sys_fs()?;
        let empty: &mut aya::programs::BtfTracePoint = running
            .tracer
            .ebpf_mut()
            .program_mut(EMPTY)
            .context("the empty program is missing from the object")?
            .try_into()?;
        empty.load("net_dev_queue", &btf)?;
        empty.attach()?;
        let before = snapshot();
        attached.extend(before.keys().filter(|n| !attached.contains(n)).cloned().collect::<Vec<_>>());
        let c0 = running.tracer.counters()?;
        let t0 = Instant::now();
        ping_pong(None, "127.0.0.1", port, true, c.secs, log)?;
        let after = snapshot();
        let c1 = running.tracer.counters()?;
        if m == Mode::Full {
            let emitted: u64 = (0..Stage::ALL.len() as u32)
                .map(|s| c1[(counters::EMITTED + s) as usize] - c0[(counters::EMITTED + s) as usize])
                .sum();
            full_rate = emitted as f64 / t0.elapsed().as_secs_f64();
        }
        for (name, (t, n)) in after {
            let (t0, n0) = before.get(&name).copied().unwrap_or((0, 0));
            table.entry(name).or_default()[i] = (t - t0, n - n0);
        }
        running.finish().await?;
    }
    md.push_str(
        "\n## Cost per hook (kernel.bpf_stats: run_time_ns / run_cnt, during sockperf TCP ping-pong on loopback)\n\n",
    );
    md.push_str(
        "Programs run for every packet or call on the machine, traced or not; \"no match\" is the cost when\nthe filter rejects the packet; \"idle\" is the same programs loaded to return at once, and\n`pf_probe_tp_btf` an empty program on net_dev_queue: what a program costs here (entry, exit,\nthe statistics' own clock reads) before it does anything.\n\n",
    );
    md.push_str(
        "| program | runs (full) | avg ns (full) | avg ns (summary) | avg ns (no match) | avg ns (idle) |\n|---|---|---|---|---|---|\n",
    );
    let avg = |x: (u64, u64)| if x.1 == 0 { "-".to_string() } else { format!("{:.0}", x.0 as f64 / x.1 as f64) };
    let mut total = [(0u64, 0u64); MODES.len()];
    for (name, r) in &table {
        if r.iter().all(|x| x.1 == 0) {
            continue;
        }
        let cells: Vec<String> = r.iter().map(|x| avg(*x)).collect();
        let _ = writeln!(md, "| {name} | {} | {} |", r[0].1, cells.join(" | "));
        if name != EMPTY {
            for (t, x) in total.iter_mut().zip(r) {
                t.0 += x.0;
                t.1 += x.1;
            }
        }
    }
    let cells: Vec<String> = total.iter().map(|x| format!("**{}**", avg(*x))).collect();
    let _ = writeln!(md, "| **all hooks** | {} | {} |", total[0].1, cells.join(" | "));
    let _ = writeln!(md, "\nRecords written during the full run: {full_rate:.0}/s.");
    // Hooks for what normal traffic never does (a drop, a retransmission): attached in
    // every mode, they must not have run at all.
    let never: Vec<&String> =
        attached.iter().filter(|n| table.get(*n).is_none_or(|r| r.iter().all(|x| x.1 == 0))).collect();
    let _ = writeln!(
        md,
        "\nAttached and never run during these loads (no drop, no retransmission): {}. \
         `pf_sched_switch` and `pf_sched_wakeup` run for every context switch and wake-up of the \
         machine; with no traced packet waiting for a thread (\"no match\") they leave after one array read.",
        if never.is_empty() {
            "none".to_string()
        } else {
            never.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        }
    );
    Ok(())
}

/// Cost against the stages attached (`--stages`): sockperf TCP ping-pong on loopback per
/// named stage set and per single stage: idle (the set's hooks attached, programs
/// returning at once: what attaching them costs), summary and full mode (one tracer per
/// set and round; the filter switches the mode), with the kernel time of every
/// packetflow program per one-way message (kernel.bpf_stats). Full mode needs dev_queue
/// in the set (`StageSet::check_joinable`): a single stage without it has no full cell.
pub(super) async fn stage_cost(c: &Cfg, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    let sets: Vec<String> = ["all", "overview", "receive", "send", "socket"]
        .into_iter()
        .map(String::from)
        .chain(Stage::KERNEL_ORDER.iter().map(|s| s.name().to_string()))
        .collect();
    let port = 45000u16;
    let _srv = sockperf_server(None, "127.0.0.1", port, true)?;
    let filter = |summary: bool, stages| FilterSpec {
        ports: vec![port],
        summary,
        no_records: summary,
        stages,
        ..Default::default()
    };
    let kernel_ns = |r: &Running| -> u64 { r.tracer.program_costs().unwrap_or_default().iter().map(|p| p.ns).sum() };
    let mut off = Vec::new();
    // Per set and mode: p50s and ns per one-way message; programs that ran.
    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum M {
        Idle,
        Summary,
        Full,
    }
    let mut res: BTreeMap<(usize, M), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let mut programs = vec![0usize; sets.len()];
    let measure = |r: &Running, log: &mut Vec<String>| -> Result<(f64, f64)> {
        let ns0 = kernel_ns(r);
        let (p50, _, msgs) = ping_pong(None, "127.0.0.1", port, true, c.secs, log)?;
        Ok((p50, (kernel_ns(r) - ns0) as f64 / msgs.max(1) as f64))
    };
    // Single stages get at most 3 rounds: 14 of them at 5 rounds would double the bench.
    const NAMED: usize = 5;
    for round in 0..c.rounds {
        for (i, name) in sets.iter().enumerate() {
            if i >= NAMED && round >= 3 {
                continue;
            }
            eprintln!("stages: round {}/{}: {name}", round + 1, c.rounds);
            if i % 4 == 0 {
                off.push(ping_pong(None, "127.0.0.1", port, true, c.secs, log)?.0);
            }
            let set = crate::model::stage_set::StageSet::parse(name)?;
            let start = |idle: bool| {
                Running::start(RunOptions {
                    filter: filter(true, set),
                    interfaces: vec![(None, "lo".into())],
                    idle,
                    ..Default::default()
                })
            };
            // A stage served only by hooks this kernel lacks (kprobes) cannot start.
            let idle = match start(true).await {
                Ok(r) => r,
                Err(e) if i >= NAMED => {
                    eprintln!("stages: {name}: {e:#}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (p50, per) = measure(&idle, log)?;
            let e = res.entry((i, M::Idle)).or_default();
            e.0.push(p50);
            e.1.push(per);
            idle.finish().await?;
            let mut running = start(false).await?;
            let mut modes = if set.check_joinable().is_ok() { vec![M::Summary, M::Full] } else { vec![M::Summary] };
            let n = modes.len();
            modes.rotate_left(round % n);
            for m in modes {
                running.tracer.set_filter(&filter(m == M::Summary, set).to_kernel(std::process::id())?)?;
                let (p50, per) = measure(&running, log)?;
                let e = res.entry((i, m)).or_default();
                e.0.push(p50);
                e.1.push(per);
            }
            programs[i] = running.tracer.program_costs().map_or(0, |p| p.len());
            running.finish().await?;
        }
    }
    let off = median(off);
    md.push_str("\n## Cost against the stages attached (`--stages`; sockperf TCP ping-pong on loopback, 64 B)\n\n");
    md.push_str(
        "Idle: the set's hooks attached, every program returning at once (what attaching them costs).\nKernel ns per message: every packetflow program's run time (kernel.bpf_stats) over the run, per one-way\nmessage sockperf exchanged (requests and replies). Programs: those that ran. Full tracing joins a packet's\nrecords at dev_queue, so a set without it has no full cells. Single stages: at most 3 rounds. The kernel's run statistics are on throughout\n(the kernel ns columns need them; they add two clock reads to every program run, which the latency table\nabove leaves out).\n\n",
    );
    let _ = writeln!(md, "Untraced p50: {off:.2} µs.\n");
    md.push_str("| stages | programs | idle p50 overhead | summary p50 overhead | summary kernel ns / message | full p50 overhead | full kernel ns / message |\n|---|---|---|---|---|---|---|\n");
    for (i, name) in sets.iter().enumerate() {
        let cell = |m: M| match res.get(&(i, m)) {
            Some((p50s, per)) => {
                (format!("{:+.1}%", (median(p50s.clone()) / off - 1.0) * 100.0), format!("{:.0}", median(per.clone())))
            }
            None => ("–".to_string(), "–".to_string()),
        };
        let ((io, _), (so, sn), (fo, fne)) = (cell(M::Idle), cell(M::Summary), cell(M::Full));
        let _ = writeln!(md, "| {name} | {} | {io} | {so} | {sn} | {fo} | {fne} |", programs[i]);
    }
    Ok(())
}

/// The highest record rate full tracing sustains without losing any: sockperf UDP
/// throughput over loopback, raised step by step until something is lost.
pub(super) async fn event_rate(c: &Cfg, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    let port = 44000u16;
    let _srv = sockperf_server(None, "127.0.0.1", port, false)?;
    md.push_str("\n## Highest lossless record rate (full tracing, sockperf UDP throughput on loopback)\n\n");
    md.push_str("Lost: records a full ring refused, a busy reader dropped, or the correlator evicted before a trace\nused them.\n\n");
    md.push_str("| offered msg/s | records/s | lost records |\n|---|---|---|\n");
    let mut best = 0f64;
    for mps in [20_000u32, 30_000, 40_000, 50_000, 70_000, 100_000, 150_000, 200_000] {
        eprintln!("event rate: {mps} msg/s");
        let running = start_tracer(vec![(None, "lo".into())], Mode::Full, port).await?;
        let c0 = running.tracer.counters()?;
        let t0 = Instant::now();
        let mut cl = Command::new("sockperf");
        let o = sockperf_tp(pin(&mut cl, CLIENT_CPU), "127.0.0.1", port, mps, c.secs, log)?;
        // The sending window sockperf reports ("Total of N messages sent in 3.000 sec"):
        // the run takes two seconds more (start-up, warm-up, wind-down), all but idle.
        let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        let secs = out
            .lines()
            .find_map(|l| l.split("messages sent in").nth(1)?.split_whitespace().next()?.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .unwrap_or_else(|| t0.elapsed().as_secs_f64());
        let c1 = running.tracer.counters()?;
        let f = running.finish().await?;
        let emitted: u64 = (0..Stage::ALL.len() as u32)
            .map(|s| c1[(counters::EMITTED + s) as usize] - c0[(counters::EMITTED + s) as usize])
            .sum();
        // Records the correlator had to evict before a trace used them are lost too.
        let lost = f.lost.values().sum::<u64>() + f.overflow_records + f.corr.records_evicted;
        let rate = emitted as f64 / secs;
        let _ = writeln!(md, "| {mps} | {rate:.0} | {lost} |");
        if lost > 0 {
            break;
        }
        best = best.max(rate);
    }
    let _ = writeln!(md, "\nHighest lossless: **{best:.0} records/s**.");
    Ok(())
}
