//! The latency and throughput sections: sockperf ping-pong per path, protocol and mode;
//! iperf3 over loopback.

use super::*;

/// sockperf ping-pong p50/p99 per path, protocol and mode.
pub(super) async fn latency(c: &Cfg, paths: &Paths, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    md.push_str("\n## Request/response latency (sockperf ping-pong, 64 B, one-way µs)\n\n");
    md.push_str(
        "| path | proto | mode | p50 µs | p99 µs | p50 overhead | p99 overhead |\n|---|---|---|---|---|---|---|\n",
    );
    let modes = [Mode::Off, Mode::Peer, Mode::Idle, Mode::Summary, Mode::SummaryStats, Mode::Full, Mode::NoMatch];
    let mut port = 41000u16;
    for path in ["loopback", "nic"] {
        for tcp in [true, false] {
            port += 10;
            let (srv_ns, cli_ns, addr, ifaces) = endpoints(path, paths);
            let _srv = sockperf_server(srv_ns.as_deref(), addr, port, tcp)?;
            let mut res: BTreeMap<Mode, Vec<(f64, f64)>> = BTreeMap::new();
            let run = |log: &mut Vec<String>| {
                ping_pong(cli_ns.as_deref(), addr, port, tcp, c.secs, log).map(|(p50, p99, _)| (p50, p99))
            };
            for round in 0..c.rounds {
                eprintln!("latency: {path} {} round {}/{}", if tcp { "TCP" } else { "UDP" }, round + 1, c.rounds);
                res.entry(Mode::Off).or_default().push(run(log)?);
                let peer = Peer::start(log)?;
                res.entry(Mode::Peer).or_default().push(run(log)?);
                drop(peer);
                // Idle programs are a load of their own (the flag is frozen into them).
                let idle = start_tracer(ifaces.clone(), Mode::Idle, port).await?;
                res.entry(Mode::Idle).or_default().push(run(log)?);
                idle.finish().await?;
                // One tracer for the traced modes of a round; the filter switches the mode.
                // Their order turns round by round, so none is always the first after the
                // tracer starts.
                let mut running = start_tracer(ifaces.clone(), Mode::Full, port).await?;
                let mut traced = [Mode::Summary, Mode::Full, Mode::NoMatch];
                traced.rotate_left(round % 3);
                for m in traced {
                    running.tracer.set_filter(&m.filter(port).to_kernel(std::process::id())?)?;
                    res.entry(m).or_default().push(run(log)?);
                }
                running.finish().await?;
                let stats = start_tracer(ifaces.clone(), Mode::SummaryStats, port).await?;
                res.entry(Mode::SummaryStats).or_default().push(run(log)?);
                stats.finish().await?;
            }
            let off = res
                .get(&Mode::Off)
                .map(|v| (median(v.iter().map(|x| x.0).collect()), median(v.iter().map(|x| x.1).collect())));
            for m in modes {
                let v = &res[&m];
                let (p50, p99) = (median(v.iter().map(|x| x.0).collect()), median(v.iter().map(|x| x.1).collect()));
                let (o50, o99) = off.unwrap_or((p50, p99));
                let _ = writeln!(
                    md,
                    "| {path} | {} | {} | {p50:.2} | {p99:.2} | {:+.1}% | {:+.1}% |",
                    if tcp { "TCP" } else { "UDP" },
                    m.name(),
                    (p50 / o50 - 1.0) * 100.0,
                    (p99 / o99 - 1.0) * 100.0
                );
            }
        }
    }
    Ok(())
}

/// iperf3 over loopback: off vs full tracing, Gbit/s.
pub(super) async fn throughput(c: &Cfg, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    md.push_str(
        "\n## Bulk throughput (iperf3, TCP over loopback)\n\n| mode | Gbit/s | ratio to off |\n|---|---|---|\n",
    );
    let port = 42000u16;
    let mut res: BTreeMap<Mode, Vec<f64>> = BTreeMap::new();
    for round in 0..c.rounds {
        eprintln!("throughput: round {}/{}", round + 1, c.rounds);
        for m in [Mode::Off, Mode::Idle, Mode::Full] {
            let running =
                if m == Mode::Off { None } else { Some(start_tracer(vec![(None, "lo".into())], m, port).await?) };
            let _srv = Proc(
                pin(&mut Command::new("iperf3"), SERVER_CPU)
                    .args(["-s", "-1", "-p", &port.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("iperf3")?,
            );
            std::thread::sleep(Duration::from_millis(300));
            let mut cl = Command::new("iperf3");
            pin(&mut cl, CLIENT_CPU).args([
                "-c",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                &c.secs.to_string(),
                "-J",
            ]);
            let line = show(&cl);
            if !log.contains(&line) {
                log.push(line);
            }
            let o = cl.output()?;
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).context("iperf3 -J output")?;
            let bps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 bits_per_second")?;
            res.entry(m).or_default().push(bps / 1e9);
            if let Some(r) = running {
                let f = r.finish().await?;
                if m == Mode::Full && f.lost.values().sum::<u64>() + f.overflow_records > 0 {
                    eprintln!(
                        "note: full tracing lost {} records during iperf3",
                        f.lost.values().sum::<u64>() + f.overflow_records
                    );
                }
            }
        }
    }
    let off = median(res[&Mode::Off].clone());
    for m in [Mode::Off, Mode::Idle, Mode::Full] {
        let g = median(res[&m].clone());
        let _ = writeln!(md, "| {} | {g:.2} | {:.3} |", m.name(), g / off);
    }
    Ok(())
}
