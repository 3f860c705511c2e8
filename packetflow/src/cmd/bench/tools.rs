//! The load generators and the peer tracer the bench measures with: sockperf and bpftrace
//! processes (killed on drop), pinned to fixed CPUs, and the parsing of what they print.

use super::{Command, Context, Duration, Path, Proc, Result, Stdio, bail, platform, testhosts};

pub(super) fn cmd_in(ns: Option<&Path>, program: &str) -> Command {
    match ns {
        Some(p) => testhosts::netns_command(p, program),
        None => Command::new(program),
    }
}

/// The CPUs the server and the client of a request/response load run on: two different
/// ones, the same in every mode. Left to the scheduler, the two landed on one CPU in some
/// runs and on two in others (with a tracer's threads busy or not), and that placement,
/// not the tracing, decided the latency.
pub(super) const SERVER_CPU: usize = 1;

pub(super) const CLIENT_CPU: usize = 0;

/// Runs `c` on `cpu` only (when the machine has it).
pub(super) fn pin(c: &mut Command, cpu: usize) -> &mut Command {
    use std::os::unix::process::CommandExt;
    if cpu < platform::host::possible_cpus().len() {
        // SAFETY: the pre_exec closure runs in the forked child before exec and calls only
        // async-signal-safe functions (sched_setaffinity) on a zeroed cpu_set_t it owns.
        unsafe {
            c.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    c
}

pub(super) fn show(c: &Command) -> String {
    std::iter::once(c.get_program().to_string_lossy().into_owned())
        .chain(c.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// sockperf's percentile lines: "---> percentile 50.000 =   24.957".
pub(super) fn sockperf_percentile(out: &str, p: &str) -> Option<f64> {
    out.lines()
        .find(|l| l.contains(&format!("percentile {p} =")))
        .and_then(|l| l.rsplit('=').next()?.trim().parse().ok())
}

pub(super) fn sockperf_server(ns: Option<&Path>, addr: &str, port: u16, tcp: bool) -> Result<Proc> {
    let mut c = cmd_in(ns, "sockperf");
    pin(&mut c, SERVER_CPU).args(["server", "-i", addr, "-p", &port.to_string()]);
    if tcp {
        c.arg("--tcp");
    }
    let k = Proc(c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("sockperf (Debian package sockperf)")?);
    std::thread::sleep(Duration::from_millis(300));
    Ok(k)
}

/// sockperf's message counts: "[Total Run] RunTime=2.100 sec; Warm up time=400 msec;
/// SentMessages=150001; ReceivedMessages=150000": one-way messages, both directions.
pub(super) fn sockperf_messages(out: &str) -> Option<u64> {
    let line = out.lines().find(|l| l.contains("[Total Run]"))?;
    let n = |key: &str| -> Option<u64> {
        let rest = line.split(key).nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    Some(n("SentMessages=")? + n("ReceivedMessages=")?)
}

/// One sockperf ping-pong run: (p50, p99) one-way latency in µs, and the one-way
/// messages it exchanged.
pub(super) fn ping_pong(
    ns: Option<&Path>,
    addr: &str,
    port: u16,
    tcp: bool,
    secs: u32,
    log: &mut Vec<String>,
) -> Result<(f64, f64, u64)> {
    let mut c = cmd_in(ns, "sockperf");
    pin(&mut c, CLIENT_CPU).args([
        "ping-pong",
        "-i",
        addr,
        "-p",
        &port.to_string(),
        "-m",
        "64",
        "-t",
        &secs.to_string(),
    ]);
    if tcp {
        c.arg("--tcp");
    }
    let line = show(&c);
    if !log.contains(&line) {
        log.push(line);
    }
    let o = c.output()?;
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    match (sockperf_percentile(&out, "50.000"), sockperf_percentile(&out, "99.000")) {
        (Some(a), Some(b)) => Ok((a, b, sockperf_messages(&out).unwrap_or(0))),
        _ => bail!("sockperf ping-pong gave no percentiles: {}", out.lines().last().unwrap_or_default()),
    }
}

/// The peer row: a bpftrace script anyone might write for two intervals (queue time,
/// transmit -> receive) on three tracepoints, skb-keyed maps, in-kernel histograms.
pub(super) struct Peer(#[allow(dead_code)] Proc);

impl Peer {
    const SCRIPT: &str = "\
tracepoint:net:net_dev_queue { @q[args->skbaddr] = nsecs; }
tracepoint:net:net_dev_start_xmit /@q[args->skbaddr]/ {
  @queue_ns = hist(nsecs - @q[args->skbaddr]); delete(@q[args->skbaddr]); @x[args->skbaddr] = nsecs;
}
tracepoint:net:netif_receive_skb /@x[args->skbaddr]/ {
  @xmit_to_rcv_ns = hist(nsecs - @x[args->skbaddr]); delete(@x[args->skbaddr]);
}
";

    /// Starts the script and waits until its probes are attached.
    pub(super) fn start(log: &mut Vec<String>) -> Result<Peer> {
        use std::io::{BufRead, BufReader};
        let path = std::env::temp_dir().join(format!("packetflow-bench-peer-{}.bt", std::process::id()));
        std::fs::write(&path, Self::SCRIPT)?;
        let mut c = Command::new("bpftrace");
        c.arg(&path);
        let line = format!("{} # {}", show(&c), Self::SCRIPT.replace('\n', " "));
        if !log.contains(&line) {
            log.push(line);
        }
        let mut kid =
            Proc(c.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().context("bpftrace (Debian package bpftrace)")?);
        let mut out = BufReader::new(kid.0.stdout.take().context("bpftrace stdout")?);
        let mut first = String::new();
        out.read_line(&mut first)?;
        if !first.starts_with("Attaching") {
            bail!("bpftrace did not attach its probes: {first:?}");
        }
        // Its output is read by nobody from here: the maps print only at exit.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        std::thread::sleep(Duration::from_millis(300));
        Ok(Peer(kid))
    }
}

/// A sockperf throughput client: 64-byte messages to `addr:port` at `mps` for `secs`,
/// its command line logged once; its output.
pub(super) fn sockperf_tp(
    cl: &mut Command,
    addr: &str,
    port: u16,
    mps: u32,
    secs: u32,
    log: &mut Vec<String>,
) -> Result<std::process::Output> {
    cl.args(["tp", "-i", addr, "-p", &port.to_string(), "-m", "64", &format!("--mps={mps}"), "-t", &secs.to_string()]);
    let line = show(cl);
    if !log.contains(&line) {
        log.push(line);
    }
    Ok(cl.stdin(Stdio::null()).output()?)
}
