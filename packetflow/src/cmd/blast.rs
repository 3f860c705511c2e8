//! `packetflow blast`: a UDP frame generator fast enough to load a capture tool on this
//! machine. Its XDP program (packetflow-ebpf/src/probes/blast.rs) is run with
//! BPF_PROG_TEST_RUN and live frames (Linux 5.18+): the kernel sends every frame the
//! program returns XDP_TX for out of the interface, straight to its driver (no socket,
//! no skb, no qdisc). A veth hands them to its peer, which must be ready for XDP frames
//! (an XDP program attached there, or GRO on): otherwise the veth refuses them, and the
//! device's own count of frames sent says how many it took.
//!
//! Each frame: Ethernet, IPv4, UDP (checksum 0) to `--dst:--dport`, the source port one
//! of `--flows` in turn, and `[cpu: u32 BE][frame number on that CPU: u64 BE]` at the
//! start of the payload, the rest zero. So every frame sent is unique and can be checked
//! byte for byte.

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use aya::{
    maps::{Array, PerCpuArray, PerCpuValues},
    programs::Xdp,
};
use packetflow_common::blast::{BlastConfig, BlastState, MIN_FRAME, PAYLOAD_OFF, SPORT_OFF};

use crate::{
    kernel::loader::{LoadOptions, Tracer, describe},
    platform,
};

/// Send UDP frames out of an interface at millions per second (XDP live frames).
///
/// For benchmarks and tests on interfaces you own (a veth pair, a lab port): it sends
/// exactly what it is told, as fast as the driver takes it, to whatever address is given.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Interface to send out of (IFACE@NETNS for another namespace).
    #[arg(short = 'i', long = "interface", value_name = "IFACE")]
    pub iface: String,
    /// Source IPv4 address.
    #[arg(long, value_name = "ADDR")]
    pub src: Ipv4Addr,
    /// Destination IPv4 address.
    #[arg(long, value_name = "ADDR")]
    pub dst: Ipv4Addr,
    /// Destination MAC [default: the interface's peer for a veth is not known here, so
    /// ff:ff:ff:ff:ff:ff].
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    pub dst_mac: Option<[u8; 6]>,
    /// Destination UDP port.
    #[arg(long, value_name = "PORT", default_value_t = 9)]
    pub dport: u16,
    /// First UDP source port; frames use `--flows` ports from here, in turn.
    #[arg(long, value_name = "PORT", default_value_t = 10000)]
    pub sport: u16,
    /// Number of flows (source ports).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub flows: u32,
    /// Frame size in bytes, without the FCS (60 to 1514).
    #[arg(long, value_name = "BYTES", default_value_t = 64, value_parser = clap::value_parser!(u32).range(MIN_FRAME as i64..=1514))]
    pub size: u32,
    /// Frames per second in all [default: as fast as it can].
    #[arg(long, value_name = "PPS")]
    pub rate: Option<u64>,
    /// Frames to send in all.
    #[arg(short = 'c', long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Seconds to send for [default: 1 when no --count].
    #[arg(long, value_name = "SECS", value_parser = super::seconds)]
    pub duration: Option<Duration>,
    /// Sending threads, one per CPU from CPU 0 (a veth peer gets one receive queue per
    /// sending CPU, when it has that many).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bytes: Vec<u8> = parts.iter().filter_map(|p| u8::from_str_radix(p, 16).ok()).collect();
    match <[u8; 6]>::try_from(bytes) {
        Ok(m) if parts.len() == 6 => Ok(m),
        _ => Err(format!("'{s}' is not a MAC address (expected six hex bytes, e.g. 02:00:00:00:00:01)")),
    }
}

/// The frame every run starts from (the program then writes its port and numbers).
pub fn template(src_mac: [u8; 6], a: &Args) -> Vec<u8> {
    let size = a.size as usize;
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&a.dst_mac.unwrap_or([0xff; 6]));
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (size - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&a.src.octets());
    ip[16..20].copy_from_slice(&a.dst.octets());
    let sum = checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp = &mut f[SPORT_OFF..PAYLOAD_OFF];
    udp[0..2].copy_from_slice(&a.sport.to_be_bytes());
    udp[2..4].copy_from_slice(&a.dport.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

/// The IPv4 header checksum.
fn checksum(h: &[u8]) -> u16 {
    let mut s: u32 = h.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// BPF_PROG_TEST_RUN's part of `union bpf_attr` (linux/bpf.h), up to `batch_size`.
#[repr(C, align(8))]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md`: the run's context (the device and queue the frame "came in" on).
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// Runs the program `repeat` times on `frame` with live frames out of `ifindex`.
pub(crate) fn live_run(prog_fd: i32, frame: &[u8], ifindex: u32, repeat: u32) -> std::io::Result<()> {
    let mut ctx = XdpMd { data_end: frame.len() as u32, ingress_ifindex: ifindex, ..XdpMd::default() };
    let mut attr = TestRun {
        prog_fd: prog_fd as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: size_of::<XdpMd>() as u32,
        ctx_in: (&raw mut ctx) as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..TestRun::default()
    };
    // SAFETY: bpf(2) with a test-run attr whose pointers (frame, ctx) outlive the call.
    let r =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &raw mut attr, size_of::<TestRun>() as libc::c_uint) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// The interface's MAC address, in the calling thread's namespace.
fn mac_of(ifname: &str) -> Option<[u8; 6]> {
    let r = platform::interfaces::ifreq(ifname, libc::SIOCGIFHWADDR, |_| {})?;
    // SAFETY: SIOCGIFHWADDR fills the union's `ifru_hwaddr`.
    let d = unsafe { r.ifr_ifru.ifru_hwaddr.sa_data };
    Some([d[0] as u8, d[1] as u8, d[2] as u8, d[3] as u8, d[4] as u8, d[5] as u8])
}

/// (tx packets, tx dropped) of `ifname` from /proc/thread-self/net/dev (the calling
/// thread's namespace).
fn tx_counts(ifname: &str) -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else { continue };
        if name.trim() != ifname {
            continue;
        }
        let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop ...
        return (v.get(9).copied().unwrap_or(0), v.get(11).copied().unwrap_or(0));
    }
    (0, 0)
}

fn pin_to(cpu: usize) {
    // SAFETY: a cpu_set_t we own, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
    }
}

/// What a blast sent.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Sent {
    /// Frames the program handed to the driver.
    pub frames: u64,
    pub secs: f64,
    /// The device's own counters over the run.
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

pub fn run(a: Args) -> Result<()> {
    crate::pipeline::run::preflight("blast")?;
    let (ns, ifname) = match a.iface.split_once('@') {
        Some((i, n)) => (Some(platform::netns::path(n)), i.to_string()),
        None => (None, a.iface.clone()),
    };
    let cpus = platform::host::possible_cpus();
    if a.threads as usize > cpus.len() {
        crate::user_bail!("--threads {} is more than this machine's {} CPUs", a.threads, cpus.len());
    }
    let (ifindex, src_mac) = platform::netns::in_netns(ns.as_deref(), || {
        let Some(i) = platform::interfaces::ifindex(&ifname) else {
            crate::user_bail!("unknown interface '{ifname}'");
        };
        Ok((i, mac_of(&ifname).unwrap_or([0; 6])))
    })?;
    let frame = template(src_mac, &a);
    let mut tracer = Tracer::load(&LoadOptions { ring_bytes: 4096, capture_ring_bytes: 0, idle: true })?;
    let ebpf = tracer.ebpf_mut();
    let mut cfg = Array::<_, BlastConfig>::try_from(ebpf.map_mut("BLAST_CONFIG").context("BLAST_CONFIG missing")?)?;
    cfg.set(0, BlastConfig { flows: a.flows, base_port: u32::from(a.sport) }, 0)?;
    let prog: &mut Xdp = ebpf.program_mut("pf_blast").context("pf_blast missing")?.try_into()?;
    prog.load().map_err(|e| anyhow!("loading pf_blast: {}", describe(&e)))?;
    let fd = prog.fd()?.as_fd().as_raw_fd();

    // Each sending thread is pinned to a CPU and sends on that CPU's schedule.
    let senders: Vec<u32> = cpus.iter().copied().take(a.threads as usize).collect();
    let duration = a.duration.or(if a.count.is_none() { Some(Duration::from_secs(1)) } else { None });
    let start = platform::host::monotonic_ns();
    let mut states = Vec::new();
    let nr = cpus.iter().max().map_or(1, |c| *c as usize + 1);
    for c in 0..nr {
        let k = senders.iter().position(|s| *s as usize == c);
        let per = |total: u64| {
            let (n, i) = (senders.len() as u64, k.unwrap_or(0) as u64);
            total / n + u64::from(i < total % n)
        };
        states.push(match k {
            None => BlastState::default(),
            Some(_) => BlastState {
                sent: 0,
                limit: a.count.map_or(u64::MAX, per),
                interval_ns: a.rate.map_or(0, |r| (1_000_000_000 * senders.len() as u64 / r.max(1)).max(1)),
                next_ns: start,
                stop_ns: duration.map_or(u64::MAX, |d| start + d.as_nanos() as u64),
            },
        });
    }
    let mut state =
        PerCpuArray::<_, BlastState>::try_from(ebpf.map_mut("BLAST_STATE").context("BLAST_STATE missing")?)?;
    state.set(0, PerCpuValues::try_from(states.clone())?, 0)?;
    let read = |m: &PerCpuArray<_, BlastState>| -> Vec<BlastState> {
        m.get(&0, 0).map(|v| v.iter().copied().collect()).unwrap_or_default()
    };
    let finished = |st: &[BlastState]| {
        let now = platform::host::monotonic_ns();
        senders.iter().all(|c| st.get(*c as usize).is_none_or(|s| s.sent >= s.limit || now >= s.stop_ns))
    };

    let before = platform::netns::in_netns(ns.as_deref(), || Ok(tx_counts(&ifname)))?;
    let t0 = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let failed = std::sync::Mutex::new(None::<std::io::Error>);
    std::thread::scope(|s| {
        // Two threads per CPU: while one waits out its call's fixed cost (below), the
        // other's call runs, so the CPU's schedule has no 24 ms holes.
        for &cpu in senders.iter().chain(senders.iter()) {
            let (ns, frame, done, failed) = (ns.clone(), &frame, &done, &failed);
            s.spawn(move || {
                let _ = platform::netns::in_netns(ns.as_deref(), || {
                    pin_to(cpu as usize);
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Err(e) = live_run(fd, frame, ifindex, RUNS_PER_CALL) {
                            *failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                            done.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Ok(())
                });
            });
        }
        // Watch the schedule; a line a second on long runs.
        let mut shown = 0u64;
        let mut last = 0u64;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
            let st = read(&state);
            if finished(&st) {
                done.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let secs = t0.elapsed().as_secs();
            if secs > shown && duration.is_none_or(|d| d > Duration::from_secs(2)) {
                shown = secs;
                let sent: u64 = st.iter().map(|s| s.sent).sum();
                eprintln!("blast: {secs} s, {sent} frames sent ({:.3} Mpps)", (sent - last) as f64 / 1e6);
                last = sent;
            }
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        crate::user_bail!(
            "cannot send on {ifname}: the kernel refused an XDP live-frame run ({e}); blast needs Linux 5.18+ and an interface whose driver transmits XDP frames"
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = platform::netns::in_netns(ns.as_deref(), || Ok(tx_counts(&ifname)))?;
    let st = read(&state);
    let sent = Sent {
        frames: st.iter().map(|s| s.sent).sum(),
        secs,
        tx_packets: after.0.saturating_sub(before.0),
        tx_dropped: after.1.saturating_sub(before.1),
    };
    if a.json {
        println!("{}", serde_json::to_string(&sent)?);
    } else {
        println!(
            "sent {} frames of {} B in {:.2} s: {:.3} Mpps; {ifname} counted {} sent, {} dropped",
            sent.frames,
            a.size,
            secs,
            sent.frames as f64 / secs / 1e6,
            sent.tx_packets,
            sent.tx_dropped
        );
        let refused = sent.frames.saturating_sub(sent.tx_packets + sent.tx_dropped);
        if refused > 0 {
            eprintln!(
                "{refused} frames neither sent nor counted dropped by {ifname} (a veth whose peer has neither an XDP program nor GRO on refuses them)"
            );
        }
    }
    Ok(())
}

/// Program runs per BPF_PROG_TEST_RUN call. Each call costs a fixed ~24 ms here (the
/// kernel sets up and tears down a page pool for the run), so calls are long; the
/// program's schedule, not the calls, keeps the rate and the count.
const RUNS_PER_CALL: u32 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_a_valid_udp_frame() {
        let a = Args {
            iface: "x".into(),
            src: Ipv4Addr::new(198, 18, 0, 1),
            dst: Ipv4Addr::new(198, 18, 0, 2),
            dst_mac: Some([2, 0, 0, 0, 0, 2]),
            dport: 9,
            sport: 10000,
            flows: 1,
            size: 64,
            rate: None,
            count: None,
            duration: None,
            threads: 1,
            json: false,
        };
        let f = template([2, 0, 0, 0, 0, 1], &a);
        assert_eq!(f.len(), 64);
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 2]);
        // A header whose checksum is right sums to zero.
        assert_eq!(checksum(&f[14..34]), 0);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 50);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 30);
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Ok([2, 0, 0, 0, 0, 10]));
        assert!(parse_mac("02:00:00").is_err());
    }
}
