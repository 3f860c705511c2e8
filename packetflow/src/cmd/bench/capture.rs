//! The capture section: tcpdump, packetflow's ring-buffer capture and its AF_XDP capture
//! (`--bypass`) at the same offered rates from `packetflow blast` (XDP live frames), which
//! outruns all three on this machine.
//!
//! Setup, the same for every tool: blast sends 64-byte UDP frames from the veth's far end
//! on CPU 0 to a MAC that is not the receiver's (as a mirror port sees traffic), so the
//! receiving stack drops what no tool takes at once. The receiving veth has GRO on, so its
//! NAPI takes XDP frames with or without an XDP program. That NAPI runs in softirq on
//! CPU 0, right after each batch the generator sends (where a NIC's receive interrupt
//! would run); the tool's process runs on CPU 1. So a tool's in-kernel work (XDP program,
//! skb and AF_PACKET copy, copy into the UMEM) slows the generator, and its process can
//! fall behind and drop. A tool's cost: its process's CPU time plus CPU 0's softirq time,
//! per million frames.
//!
//! Threaded NAPI on CPU 1 was tried first: in this VM every frame then cost a cross-CPU
//! wake-up, every tool (and no tool) lost frames from 250 k/s on, and the wake-ups, not
//! the tools, made up the cost.

use super::*;

const TOOLS: [&str; 4] = ["none", "tcpdump", "ring", "bypass"];
const PORT: u16 = 9;

/// CPU time of a process, every thread summed, seconds: the scheduler's own run time
/// (/proc/PID/task/*/schedstat), exact, where utime/stime are tick samples that missed
/// short runs altogether.
fn cpu_secs(pid: u32) -> f64 {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    ns as f64 / 1e9
}

/// Softirq time of CPU `cpu` so far, seconds (/proc/stat).
fn softirq_secs(cpu: usize) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let want = format!("cpu{cpu} ");
    let ticks: u64 = stat
        .lines()
        .find(|l| l.starts_with(&want))
        .and_then(|l| l.split_whitespace().nth(7)?.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The receiving veth as every tool finds it: GRO on.
fn prepare_receiver(h: &TestHosts) -> Result<()> {
    let st = testhosts::netns_command(&h.path_b(), "ethtool").args(["-K", &h.veth_b, "gro", "on"]).status()?;
    if !st.success() {
        bail!("ethtool -K {} gro on failed", h.veth_b);
    }
    Ok(())
}

/// One run's numbers.
#[derive(Default, Clone, Copy)]
struct Step {
    sent: u64,
    captured: u64,
    /// The tool's own drop count.
    dropped: u64,
    /// The tool process's CPU seconds, and CPU 0's softirq seconds.
    process: f64,
    softirq: f64,
}

impl Step {
    fn lossless(&self) -> bool {
        self.sent > 0 && self.captured >= self.sent && self.dropped == 0
    }
}

/// Starts `tool` on the receiving veth (None for "none").
fn start_tool(tool: &str, h: &TestHosts, me: &Path, log: &mut Vec<String>) -> Result<Option<Proc>> {
    let mut x = match tool {
        "tcpdump" => {
            let mut x = testhosts::netns_command(&h.path_b(), "tcpdump");
            x.args(["-i", &h.veth_b, "-Q", "in", "-n", "-w", "/dev/null"]);
            x
        }
        "ring" | "bypass" => {
            let mut x = Command::new(me);
            x.args(["capture", "-i", &format!("{}@{}", h.veth_b, h.ns_b), "-Q", "in", "-w", "/dev/null"]);
            if tool == "bypass" {
                x.arg("--bypass");
            }
            x
        }
        _ => return Ok(None),
    };
    x.args(["udp", "port", &PORT.to_string()]);
    pin(&mut x, SERVER_CPU);
    let line = show(&x);
    if !log.contains(&line) {
        log.push(line);
    }
    let k = Proc(x.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?);
    std::thread::sleep(Duration::from_millis(if tool == "tcpdump" { 800 } else { 2500 }));
    Ok(Some(k))
}

fn blast_once(h: &TestHosts, me: &Path, rate: Option<u64>, secs: u32, log: &mut Vec<String>) -> Result<Value> {
    let mut x = Command::new(me);
    x.args(["blast", "-i", &format!("{}@{}", h.veth_a, h.ns_a), "--json", "--src", testhosts::ADDR_A]);
    x.args(["--dst", testhosts::ADDR_B, "--dst-mac", "02:00:00:00:00:01", "--dport", &PORT.to_string()]);
    x.args(["--size", "64", "--duration", &secs.to_string()]);
    if let Some(r) = rate {
        x.args(["--rate", &r.to_string()]);
    }
    let line = match rate {
        Some(r) => show(&x).replace(&format!("--rate {r}"), "--rate RATE"),
        None => show(&x),
    };
    if !log.contains(&line) {
        log.push(line);
    }
    let o = x.output()?;
    if !o.status.success() {
        bail!("blast failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(serde_json::from_slice(&o.stdout)?)
}

type Value = serde_json::Value;

fn run_step(tool: &str, h: &TestHosts, me: &Path, rate: Option<u64>, secs: u32, log: &mut Vec<String>) -> Result<Step> {
    let mut kid = start_tool(tool, h, me, log)?;
    let cpu = |kid: &Option<Proc>| (kid.as_ref().map_or(0.0, |k| cpu_secs(k.0.id())), softirq_secs(CLIENT_CPU));
    let before = cpu(&kid);
    let sent = blast_once(h, me, rate, secs, log)?;
    std::thread::sleep(Duration::from_millis(300));
    let after = cpu(&kid);
    let mut step = Step {
        sent: sent["frames"].as_u64().unwrap_or(0),
        process: after.0 - before.0,
        softirq: after.1 - before.1,
        ..Step::default()
    };
    if let Some(mut k) = kid.take() {
        k.sigint();
        let mut err = String::new();
        if let Some(e) = k.0.stderr.as_mut() {
            let _ = std::io::Read::read_to_string(e, &mut err);
        }
        let _ = k.0.wait();
        let count = |what: &str| -> u64 {
            err.lines().find(|l| l.contains(what)).and_then(|l| l.split_whitespace().next()?.parse().ok()).unwrap_or(0)
        };
        step.captured = count("packets captured");
        step.dropped = count(if tool == "tcpdump" { "dropped by kernel" } else { "dropped by packetflow" });
    }
    Ok(step)
}

pub(super) async fn capture_rate(c: &Cfg, paths: &Paths, md: &mut String, log: &mut Vec<String>) -> Result<()> {
    let h = &paths.hosts;
    prepare_receiver(h)?;
    let me = std::env::current_exe()?;
    let secs = c.secs.max(2);
    md.push_str(
        "\n## Capture: highest lossless rate, 64 B UDP frames from `packetflow blast` over veth\n\n\
         Generator on CPU 0 (XDP live frames, to a MAC that is not the receiver's, as a mirror port sees \
         traffic); the receiving veth's NAPI in softirq on CPU 0 after each batch sent (a tool's work in \
         the kernel slows the generator: *sent* is what it reached), the capture tool's process on CPU 1. \
         Each tool filters `udp port 9` (every frame). *lost* = sent − captured. *CPU s/M* = the tool \
         process's CPU time + CPU 0's softirq time, per million frames sent (with no capture the \
         softirq time alone is the stack's skb and drop). The steps stop for a tool at its first loss.\n\n",
    );
    md.push_str(
        "| offered | no capture: sent | CPU s/M | tcpdump: sent | captured | own drops | lost | CPU s/M | ring buffer: sent | captured | own drops | lost | CPU s/M | AF_XDP: sent | captured | own drops | lost | CPU s/M |\n",
    );
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let rates: [Option<u64>; 9] = [
        Some(100_000),
        Some(250_000),
        Some(500_000),
        Some(750_000),
        Some(1_000_000),
        Some(1_500_000),
        Some(2_000_000),
        Some(3_000_000),
        None,
    ];
    let mut alive = [true; 4];
    let mut best: [Option<Step>; 4] = [None; 4];
    let mut gen_max = 0.0f64;
    for rate in rates {
        if !alive[1..].iter().any(|a| *a) {
            break;
        }
        let shown = rate.map_or("max".to_string(), |r| r.to_string());
        eprintln!("capture rate: {shown} frames/s");
        let mut row = vec![shown];
        for (i, tool) in TOOLS.into_iter().enumerate() {
            if !alive[i] {
                row.extend(std::iter::repeat_n("-".to_string(), if i == 0 { 2 } else { 5 }));
                continue;
            }
            let s = run_step(tool, h, &me, rate, secs, log)?;
            let per_s = s.sent as f64 / f64::from(secs);
            let m = s.sent as f64 / 1e6;
            let per_m = format!("{:.2} + {:.2}", s.process / m, s.softirq / m);
            if i == 0 {
                gen_max = gen_max.max(per_s);
                row.extend([format!("{per_s:.0}/s"), format!("{:.2}", s.softirq / m)]);
                continue;
            }
            if s.lossless() {
                if best[i].is_none_or(|b| b.sent < s.sent) {
                    best[i] = Some(s);
                }
            } else {
                alive[i] = false;
            }
            row.extend([
                format!("{per_s:.0}/s"),
                s.captured.to_string(),
                s.dropped.to_string(),
                s.sent.saturating_sub(s.captured).to_string(),
                per_m,
            ]);
        }
        let _ = writeln!(md, "| {} |", row.join(" | "));
    }
    let rate_of = |i: usize| best[i].map_or(0.0, |s| s.sent as f64 / f64::from(secs));
    let cpu_of = |i: usize| best[i].map_or(f64::NAN, |s| (s.process + s.softirq) / (s.sent as f64 / 1e6));
    let (t, r, b) = (rate_of(1), rate_of(2), rate_of(3));
    let ratio = |x: f64, y: f64| if y > 0.0 { format!("{:.2}x", x / y) } else { "n/a".into() };
    let _ = writeln!(
        md,
        "\nHighest lossless rate: tcpdump **{t:.0}/s**, ring buffer **{r:.0}/s** ({} tcpdump's), AF_XDP **{b:.0}/s** ({} tcpdump's); \
         the generator alone reached **{gen_max:.0}/s**. CPU per million frames at each tool's highest lossless rate: \
         tcpdump {:.2} s, ring buffer {:.2} s, AF_XDP {:.2} s (AF_XDP / tcpdump: {}). A tool still lossless at `max` \
         was limited by the generator, not by itself.",
        ratio(r, t),
        ratio(b, t),
        cpu_of(1),
        cpu_of(2),
        cpu_of(3),
        ratio(cpu_of(3), cpu_of(1)),
    );
    Ok(())
}
