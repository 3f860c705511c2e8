//! `capture --bypass`: kernel-bypass capture with AF_XDP. One socket per receive queue of
//! the interface (capture/xsk.rs); the XDP program `pf_cap_xsk` runs the capture filter
//! and redirects the frames it selects to their queue's socket, everything else passes to
//! the stack untouched. One thread reads every socket and writes each frame straight from
//! the UMEM to pcapng or a text line, then hands the frame back to the fill ring.
//!
//! Frames the filter selects are taken from the kernel: the stack never sees them. That
//! is what a mirror port or an interface kept for capture wants, and why the flag says so.
//! Losses: the sockets' XDP_STATISTICS (at exit, in the pcapng interface statistics and
//! in "N packets dropped by packetflow").

use std::{
    io::Write,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::XskMap;
use packetflow_common::counters;

use super::{
    expr,
    writer::{Line, Out, TextStyle, text_line},
    xsk::{self, HEADROOM, MAX_CHUNK, Mode, Stats, Xsk},
};
use crate::{
    cmd::capture::{Args, Direction},
    error::user,
    format::pcapng,
    kernel::loader::{LoadOptions, Tracer},
    pipeline::run,
    platform,
};

/// The longest packet a UMEM frame can hold.
pub const MAX_FRAME: u32 = MAX_CHUNK - HEADROOM;

/// What the reading thread owns and hands back at the end.
struct Reader {
    socks: Vec<Xsk>,
    out: Out,
    ifname: String,
    snaplen: usize,
    count: Option<u64>,
    written: u64,
    /// Monotonic to wall clock, ns.
    offset: i64,
    error: Option<anyhow::Error>,
    /// Frames whose time the reader took itself (the driver had no room for metadata).
    stamped_here: u64,
    style: TextStyle,
}

impl Reader {
    /// Reads until `stop`, the count, or a write error.
    fn run(mut self, stop: Arc<AtomicBool>, done: Arc<AtomicBool>) -> Reader {
        let mut fds: Vec<libc::pollfd> = self
            .socks
            .iter()
            .map(|s| libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&s.fd()), events: libc::POLLIN, revents: 0 })
            .collect();
        let Reader { socks, out, ifname, snaplen, count, written, offset, error, stamped_here, style } = &mut self;
        let mut idle = 0u32;
        while !stop.load(Ordering::Relaxed) && error.is_none() {
            let now = platform::host::realtime_ns();
            let mut got = 0;
            for s in socks.iter_mut() {
                got += s.receive(256, |bytes, ts| {
                    if error.is_some() || count.is_some_and(|c| *written >= c) {
                        return;
                    }
                    let ts = if let Some(mono) = ts {
                        (mono as i64 + *offset) as u64
                    } else {
                        *stamped_here += 1;
                        now
                    };
                    let data = &bytes[..bytes.len().min(*snaplen)];
                    let r = match out {
                        Out::Pcap(w) => w.packet(0, ts, data, bytes.len() as u32, pcapng::FLAG_INBOUND, ""),
                        Out::Text(w) => text_line(
                            w,
                            &Line { wall_ns: ts, ifname, dir: "In ", data, len: bytes.len() as u32, notes: &[] },
                            style,
                        ),
                    };
                    match r {
                        Ok(()) => *written += 1,
                        Err(e) => *error = Some(e.into()),
                    }
                });
            }
            if count.is_some_and(|c| *written >= c) {
                done.store(true, Ordering::Relaxed);
                break;
            }
            if got > 0 {
                idle = 0;
                continue;
            }
            // Nothing waiting: flush what was written, then wait. A short sleep first,
            // so that under load one wake-up takes a batch (the rings hold 8 ms of
            // small frames at 2 Mpps, 40 sleeps' worth); after 10 ms with nothing, poll
            // the sockets, which costs nothing while idle but a wake-up per packet.
            let flushed = match out {
                Out::Pcap(w) => w.flush(),
                Out::Text(w) => w.flush(),
            };
            if let Err(e) = flushed {
                *error = Some(e.into());
            }
            idle += 1;
            if idle < 50 {
                std::thread::sleep(Duration::from_micros(200));
            } else {
                // SAFETY: `fds` holds our sockets' fds, open for as long as `socks` lives.
                unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            }
        }
        self
    }

    fn stats(&self) -> Stats {
        let mut all = Stats::default();
        for s in &self.socks {
            if let Ok(x) = s.stats() {
                all.add(&x);
            }
        }
        all
    }
}

/// "0-3", or "0" for one queue.
fn queue_list(n: u32) -> String {
    if n == 1 { "0".to_string() } else { format!("0-{}", n - 1) }
}

/// The sockets, one per receive queue of `ifname` (in namespace `ns`), and the MTU.
fn open_sockets(ns: Option<&std::path::Path>, ifname: &str, ifindex: u32) -> Result<(Vec<Xsk>, u32)> {
    let name = ifname.to_string();
    platform::netns::in_netns(ns, move || {
        let queues = xsk::rx_queues(&name);
        let mtu = xsk::mtu(&name).unwrap_or(1500);
        let chunk = xsk::chunk_for_mtu(mtu);
        let mut socks = Vec::new();
        for q in 0..queues.min(packetflow_common::capture::XSK_MAX_QUEUES) {
            match Xsk::open(ifindex, q, chunk, false) {
                Ok(s) => socks.push(s),
                Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => crate::user_bail!(
                    "this kernel has no AF_XDP sockets (CONFIG_XDP_SOCKETS is off): capture --bypass cannot run here; capture without --bypass can"
                ),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => crate::user_bail!(
                    "cannot bind an AF_XDP socket to {name} queue {q}: another AF_XDP socket holds it ({e})"
                ),
                Err(e) => crate::user_bail!("cannot open an AF_XDP socket on {name} queue {q}: {e}"),
            }
        }
        Ok((socks, mtu))
    })
}

pub async fn run(a: Args) -> Result<()> {
    run::preflight("capture")?;
    if a.direction == Direction::Out {
        crate::user_bail!("--bypass captures packets coming in only (AF_XDP receives); leave out -Q out");
    }
    if a.ifaces.len() != 1 || a.ifaces[0] == "any" {
        crate::user_bail!("--bypass takes one interface: -i IFACE (IFACE@NETNS for another namespace)");
    }
    if let Some(s) = a.snaplen
        && s > MAX_FRAME
    {
        crate::user_bail!(
            "-s {s} is more than one AF_XDP frame holds: --bypass keeps at most {MAX_FRAME} bytes of a packet"
        );
    }
    let snaplen = a.snaplen.unwrap_or(MAX_FRAME);
    let mut stop_signals = run::StopSignals::new()?;
    let expression = a.expression.join(" ");
    let compiled = expr::compile(&expression, snaplen).map_err(|e| user(e.to_string()))?;
    let named = platform::interfaces::find(&a.ifaces, None)?;
    let [iface] = named.as_slice() else {
        crate::user_bail!("--bypass takes one interface; {} matched {}", a.ifaces[0], named.len());
    };
    let (ns, ifname, ifindex): (Option<PathBuf>, String, u32) = (iface.netns.clone(), iface.name.clone(), iface.index);

    let mut tracer = Tracer::load(&LoadOptions { ring_bytes: 4096, capture_ring_bytes: 0, idle: false })?;
    tracer.set_capture(&compiled)?;
    let (socks, mtu) = open_sockets(ns.as_deref(), &ifname, ifindex)?;
    {
        let map = tracer.ebpf_mut().map_mut("CAP_XSKS").context("CAP_XSKS map missing")?;
        let mut map = XskMap::try_from(map)?;
        for s in &socks {
            map.set(s.queue, s.fd(), 0).with_context(|| format!("registering the socket of queue {}", s.queue))?;
        }
    }
    let xdp_mode = tracer
        .attach_bypass(ns.as_deref(), &ifname, a.xdp)
        .map_err(|e| user(format!("cannot capture on {ifname} with --bypass: XDP would not attach ({e})")))?;
    let mode = if socks.iter().all(|s| s.mode == Mode::ZeroCopy) { "zero-copy" } else { "copy" };
    let queues = queue_list(socks.len() as u32);

    let out: Out = match a.write.as_deref() {
        None => Out::Text(Box::new(std::io::BufWriter::new(std::io::stdout()))),
        Some(path) => {
            let w = crate::format::output::writer(path)?;
            let os = format!("Linux {}", platform::host::kernel_release());
            let mut w = pcapng::Writer::new(w, &format!("packetflow {}", env!("CARGO_PKG_VERSION")), &os)?;
            let ns_ino =
                platform::netns::netns_inode(ns.as_deref().unwrap_or(std::path::Path::new("/proc/self/ns/net")))
                    .unwrap_or(0);
            w.interface(
                &ifname,
                snaplen,
                &format!("ifindex {ifindex}, netns inode {ns_ino}, AF_XDP {mode} mode, queues {queues}"),
            )?;
            Out::Pcap(w)
        }
    };
    if mtu + 18 > MAX_FRAME {
        eprintln!(
            "{ifname}'s MTU {mtu} is more than an AF_XDP frame holds ({MAX_FRAME} bytes with Ethernet and a VLAN tag): longer packets are dropped, counted below"
        );
    }
    let start_wall = platform::host::realtime_ns();
    eprintln!(
        "capturing on {ifname} ({}) with AF_XDP, {mode} mode, queues {queues}, XDP {xdp_mode}: packets the filter selects are taken from the kernel and the stack never sees them{}",
        if expression.is_empty() { "all packets".to_string() } else { expression.clone() },
        if a.write.as_deref() == Some("-") { "" } else { "; Ctrl-C to stop" }
    );
    let reader = Reader {
        socks,
        out,
        ifname: ifname.clone(),
        snaplen: snaplen as usize,
        count: a.count,
        written: 0,
        offset: platform::host::mono_to_wall_offset(),
        error: None,
        stamped_here: 0,
        style: a.style(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let thread = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::Builder::new().name("pf-xsk".into()).spawn(move || reader.run(stop, done))?
    };
    let deadline = a.duration.map(|d| tokio::time::Instant::now() + d);
    loop {
        tokio::select! {
            _ = stop_signals.recv() => break,
            () = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                if done.load(Ordering::Relaxed) || thread.is_finished() {
                    break;
                }
            }
        }
    }
    // Detach first, so frames stop coming, then let the reader take what is queued.
    let counters = tracer.counters().unwrap_or_default();
    tracer.detach_all();
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    let mut reader = thread.join().map_err(|_| anyhow::anyhow!("the AF_XDP reader panicked"))?;
    let stats = reader.stats();
    let end_wall = platform::host::realtime_ns();
    let lost = stats.lost();
    if reader.error.is_none() {
        let r = match &mut reader.out {
            Out::Pcap(w) => w.stats(0, start_wall, end_wall, reader.written, lost).and_then(|()| w.flush()),
            Out::Text(w) => w.flush(),
        };
        if let Err(e) = r {
            reader.error = Some(e.into());
        }
    }
    let g = |i: u32| counters.get(i as usize).copied().unwrap_or(0);
    eprintln!("{} packets captured", reader.written);
    eprintln!("{} packets received by filter", g(counters::CAP_MATCHED_XDP));
    eprintln!("{lost} packets dropped by packetflow");
    eprintln!(
        "AF_XDP: {} dropped by the kernel, {} with the receive ring full, {} times the fill ring was empty, {} invalid descriptors",
        stats.rx_dropped, stats.rx_ring_full, stats.fill_ring_empty, stats.rx_invalid_descs
    );
    let no_socket = g(counters::CAP_XSK_NO_SOCKET);
    if no_socket > 0 {
        eprintln!("{no_socket} matching packets came in on queues without a socket: passed to the stack, not captured");
    }
    if reader.stamped_here > 0 {
        eprintln!(
            "{} packets timestamped on arrival in packetflow, not in the kernel (the driver leaves no room for XDP metadata)",
            reader.stamped_here
        );
    }
    let _ = std::io::stderr().flush();
    match reader.error {
        None => Ok(()),
        Some(e) => Err(e.context(format!("writing {} failed", a.write.as_deref().unwrap_or("to stdout")))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_read_as_a_range() {
        assert_eq!(queue_list(1), "0");
        assert_eq!(queue_list(4), "0-3");
    }
}
