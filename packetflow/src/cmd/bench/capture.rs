//! The capture section: each capture tool at the same generator rates.

use super::*;

/// Each capture tool at the same generator rates: the rate the sender achieved while the
/// tool captured (on a 2-core machine the tool's CPU use slows the sender), beside the
/// rate it achieves with no capture at all, and what each tool captured and dropped. The
/// steps stop at a tool's first loss. (Machine-wide CPU per packet was tried as a
/// finer measure: sockperf paces by spinning, and the noise swamped it.)
pub(super) async fn capture_rate(c: &Cfg, paths: &Paths, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    const TOOLS: [&str; 3] = ["none", "packetflow", "tcpdump"];
    let port = 45000u16;
    let h = &paths.hosts;
    let _srv = sockperf_server(Some(&h.path_b()), testhosts::ADDR_B, port, false)?;
    let me = std::env::current_exe()?;
    md.push_str(
        "\n## Capture: highest lossless packet rate (sockperf UDP 64 B over veth, capture at the receiving end)\n\n",
    );
    md.push_str("| offered msg/s | no capture: sent msg/s | packetflow: sent msg/s | captured | dropped | tcpdump: sent msg/s | captured | dropped |\n|---|---|---|---|---|---|---|---|\n");
    let mut best = [0u32; 3];
    let mut alive = [true; 3];
    let count = |s: &str, what: &str| -> u64 {
        s.lines().find(|l| l.contains(what)).and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0)
    };
    for mps in [25_000u32, 50_000, 100_000, 200_000, 300_000, 400_000, 600_000, 800_000] {
        if !alive[1] && !alive[2] {
            break;
        }
        eprintln!("capture rate: {mps} msg/s");
        let mut row = vec![mps.to_string()];
        for (i, tool) in TOOLS.into_iter().enumerate() {
            if !alive[i] {
                row.extend(["-".to_string(), "-".into(), "-".into()]);
                continue;
            }
            let cap = match tool {
                "packetflow" => {
                    let mut x = Command::new(&me);
                    x.args(["capture", "-i", &format!("{}@{}", h.veth_b, h.ns_b), "-Q", "in", "-w", "/dev/null"]);
                    Some(x)
                }
                "tcpdump" => {
                    let mut x = testhosts::netns_command(&h.path_b(), "tcpdump");
                    x.args(["-i", &h.veth_b, "-Q", "in", "-n", "-w", "/dev/null"]);
                    Some(x)
                }
                _ => None,
            };
            let mut kid = match cap {
                Some(mut x) => {
                    x.args(["udp", "port", &port.to_string()]);
                    let line = show(&x);
                    if !log.contains(&line) {
                        log.push(line);
                    }
                    let k = Proc(x.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?);
                    std::thread::sleep(Duration::from_millis(if tool == "packetflow" { 2500 } else { 800 }));
                    Some(k)
                }
                None => None,
            };
            let mut cl = testhosts::netns_command(&h.path_a(), "sockperf");
            let o = sockperf_tp(&mut cl, testhosts::ADDR_B, port, mps, c.secs, log)?;
            let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
            // "Total of 200048 messages sent in 2.000 sec"
            let sent: u64 = out
                .lines()
                .find(|l| l.contains("messages sent in"))
                .and_then(|l| l.split("Total of").nth(1)?.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            // What counts is the rate that actually went through, not the rate asked for.
            let rate = (sent as f64 / f64::from(c.secs)) as u32;
            let Some(mut kid) = kid.take() else {
                best[i] = best[i].max(rate);
                row.push(rate.to_string());
                continue;
            };
            std::thread::sleep(Duration::from_millis(500));
            kid.sigint();
            let mut err = String::new();
            if let Some(e) = kid.0.stderr.as_mut() {
                let _ = std::io::Read::read_to_string(e, &mut err);
            }
            let _ = kid.0.wait();
            let captured = count(&err, "packets captured");
            let dropped = count(&err, if tool == "packetflow" { "dropped by packetflow" } else { "dropped by kernel" });
            let lossless = dropped == 0 && captured >= sent && sent > 0;
            if lossless {
                best[i] = best[i].max(rate);
            } else {
                alive[i] = false;
            }
            row.extend([rate.to_string(), captured.to_string(), dropped.to_string()]);
        }
        let _ = writeln!(md, "| {} |", row.join(" | "));
    }
    let ratio = if best[2] > 0 { format!("{:.2}x", f64::from(best[1]) / f64::from(best[2])) } else { "n/a".into() };
    let _ = writeln!(
        md,
        "\nHighest lossless rate: packetflow **{} msg/s**, tcpdump **{} msg/s** (ratio {ratio}): the highest rate sockperf\nachieved while the tool captured every packet it sent and reported no drop; the sender alone reached **{} msg/s**.\nWhere neither tool ever dropped, this is the sender's limit with the tool's CPU use beside it, not the tool's.",
        best[1], best[2], best[0]
    );
    Ok(())
}
