//! `packetflow doctor`: finds out, by trying, what this kernel lets packetflow do.
//!
//! Every program-type row loads a tiny program and attaches it (then detaches it); the
//! verdict is what the kernel answered, with the errno when it refused. Nothing is decided
//! from the kernel version.

use std::{path::Path, time::Duration};

use anyhow::Result;
use aya::{
    Ebpf,
    maps::RingBuf,
    programs::{
        BtfTracePoint, FEntry, KProbe, LinkOrder, RawTracePoint, SchedClassifier, TcAttachType, TracePoint, Xdp,
        XdpMode, tc::TcAttachOptions,
    },
};

use crate::{
    kernel::btf::Btf,
    kernel::interfaces::XdpChoice,
    kernel::loader::{LoadOptions, Tracer},
    platform,
    platform::testhosts::TestHosts,
    report::tables::render,
};

fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINVAL => "EINVAL",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::ENOSPC => "ENOSPC",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESRCH => "ESRCH",
        524 => "ENOTSUPP",
        _ => "errno",
    }
}

/// The first OS error in an error's chain, as "EPERM (1)".
fn errno_of(e: &(dyn std::error::Error + 'static)) -> Option<(i32, String)> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && let Some(n) = io.raw_os_error()
        {
            return Some((n, format!("{} ({n})", errno_name(n))));
        }
        cur = c.source();
    }
    None
}

struct Row {
    what: String,
    ok: bool,
    detail: String,
}

fn verdict<E: std::error::Error + 'static>(
    r: Result<(), E>,
    why_refused: impl Fn(i32) -> Option<&'static str>,
) -> (bool, String) {
    match r {
        Ok(()) => (true, "works".into()),
        Err(e) => {
            let (word, extra) = match errno_of(&e) {
                Some((n, name)) => (
                    if n == libc::EPERM || n == libc::EACCES {
                        format!("refused: {name}")
                    } else {
                        format!("unavailable: {name}")
                    },
                    why_refused(n).map(|s| format!(" — {s}")).unwrap_or_default(),
                ),
                None => (format!("unavailable: {e}"), String::new()),
            };
            (false, format!("{word}{extra}"))
        }
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or_else(|| anyhow::anyhow!("{name} missing from the object"))?;
    Ok(p.try_into()?)
}

/// Check what this kernel lets packetflow do (by trying), and say what is missing.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object (checks, stage hooks, notes, tracing_works) instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(a: Args) -> Result<()> {
    let mut rows: Vec<Row> = Vec::new();
    let push =
        |rows: &mut Vec<Row>, what: &str, ok: bool, detail: String| rows.push(Row { what: what.into(), ok, detail });
    push(&mut rows, "kernel", true, platform::host::kernel_release());
    let btf_ok = Path::new(Btf::VMLINUX).exists() && Btf::from_sys_fs().is_ok();
    push(
        &mut rows,
        "BTF",
        btf_ok,
        if btf_ok { format!("{} present", Btf::VMLINUX) } else { format!("{} missing or unreadable", Btf::VMLINUX) },
    );
    let lockdown = platform::mounts::lockdown();
    push(
        &mut rows,
        "lockdown",
        true,
        lockdown.clone().unwrap_or_else(|| "not reported (no securityfs lockdown file)".into()),
    );
    let caps: Vec<String> = [
        platform::privileges::CAP_BPF,
        platform::privileges::CAP_PERFMON,
        platform::privileges::CAP_NET_ADMIN,
        platform::privileges::CAP_SYS_ADMIN,
    ]
    .iter()
    .map(|&c| {
        format!("{} {}", platform::privileges::cap_name(c), if platform::privileges::has_cap(c) { "yes" } else { "NO" })
    })
    .collect();
    let caps_ok = platform::privileges::require_caps("doctor", platform::privileges::TRACE_CAPS).is_ok();
    push(&mut rows, "capabilities", caps_ok, caps.join(", "));
    let fs_row = |st: platform::mounts::MountState, path: &str| match st {
        platform::mounts::MountState::Present => (true, format!("mounted at {path}")),
        platform::mounts::MountState::Mounted => (true, format!("was missing; mounted at {path}")),
        platform::mounts::MountState::Failed(e) => (false, e),
    };
    let (ok, d) = fs_row(platform::mounts::ensure_tracefs(), platform::mounts::TRACEFS);
    push(&mut rows, "tracefs", ok, d);
    let (ok, d) = fs_row(platform::mounts::ensure_bpffs(), platform::mounts::BPFFS);
    push(&mut rows, "bpffs", ok, d);
    match platform::mounts::ensure_cgroup2() {
        Ok(p) => push(&mut rows, "cgroup2", true, format!("mounted at {}", p.display())),
        Err(e) => push(&mut rows, "cgroup2", false, format!("{e:#}")),
    }

    let mut probes: Vec<(&str, bool, String)> = Vec::new();
    let mut stage_rows: Vec<Vec<String>> = Vec::new();
    if caps_ok && btf_ok {
        probe_program_types(&mut probes).await;
        match stage_table().await {
            Ok(r) => stage_rows = r,
            Err(e) => probes.push(("tracer", false, format!("{e:#}"))),
        }
    }
    for (what, ok, detail) in &probes {
        push(&mut rows, what, *ok, detail.clone());
    }

    let works = |name: &str| probes.iter().any(|(w, ok, _)| *w == name && *ok);
    let mut notes = Vec::new();
    if !works("kprobe") && !works("fentry") {
        notes.push(
            "kprobe and fentry are not usable here; packetflow uses tracepoints (tp_btf, tracepoint), XDP, tcx and cgroup_skb instead, without the optional IP-layer stages (ip_send, ip_rcv).",
        );
    } else if !works("kprobe") {
        notes.push("kprobes are not usable here: the optional IP-layer stages (ip_send, ip_rcv) are absent.");
    }
    let tracing_works = (works("tp_btf") || works("raw_tp")) && works("ring buffer");
    if a.json {
        let check = |r: &Row| serde_json::json!({"check": r.what, "ok": r.ok, "detail": r.detail});
        let stage = |r: &Vec<String>| serde_json::json!({"stage": r[0], "hook": r[1], "status": r[2]});
        let doc = serde_json::json!({
            "checks": rows.iter().map(check).collect::<Vec<_>>(),
            "stages": stage_rows.iter().map(stage).collect::<Vec<_>>(),
            "notes": notes,
            "tracing_works": caps_ok && btf_ok && tracing_works,
        });
        println!("{doc}");
    } else {
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| vec![r.what.clone(), if r.ok { "ok" } else { "NO" }.into(), r.detail.clone()])
            .collect();
        print!("{}", render(&["check".into(), String::new(), "result".into()], &table));
        if !stage_rows.is_empty() {
            println!();
            print!("{}", render(&["stage".into(), "hook on this kernel".into(), "status".into()], &stage_rows));
        }
        println!();
    }

    if !caps_ok {
        platform::privileges::require_caps("doctor", platform::privileges::TRACE_CAPS)?;
    }
    if !btf_ok {
        crate::user_bail!(
            "this kernel has no readable BTF at {}; packetflow cannot find kernel struct layouts",
            Btf::VMLINUX
        );
    }
    if !a.json {
        for n in &notes {
            println!("{n}");
        }
    }
    if !tracing_works {
        crate::user_bail!(
            "tracing cannot work here: {}",
            probes
                .iter()
                .filter(|(w, ok, _)| !ok && matches!(*w, "tp_btf" | "raw_tp" | "ring buffer"))
                .map(|(w, _, d)| format!("{w} {d}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    if !a.json {
        println!("tracing can work on this machine.");
    }
    Ok(())
}

async fn probe_program_types(out: &mut Vec<(&'static str, bool, String)>) {
    let mut tracer = match Tracer::load(&LoadOptions { ring_bytes: 4096, ..Default::default() }) {
        Ok(t) => t,
        Err(e) => {
            out.push(("load", false, format!("{e:#}")));
            return;
        }
    };
    let btf = match aya::Btf::from_sys_fs() {
        Ok(b) => b,
        Err(e) => {
            out.push(("BTF", false, e.to_string()));
            return;
        }
    };
    let lockdown_note = |n: i32| (n == libc::EPERM).then_some("kernel lockdown forbids it");
    let ebpf = tracer.ebpf_mut();

    // tracepoint + ring buffer + aya-log in one go: the probe writes a record and a log line.
    let mut ring_ok = (false, "not tried".to_string());
    let tp = (|| -> Result<()> {
        let p: &mut TracePoint = program(ebpf, "pf_probe_tp")?;
        p.load()?;
        p.attach("syscalls", "sys_enter_getppid")?;
        Ok(())
    })();
    match tp {
        Ok(()) => {
            out.push(("tracepoint", true, "works".into()));
            // SAFETY: getppid(2) takes no arguments and cannot fail: a syscall the probe program
            // observes.
            unsafe { libc::getppid() };
            let me = std::process::id();
            ring_ok = match ebpf.take_map("PROBE_RB").map(RingBuf::try_from) {
                Some(Ok(mut rb)) => {
                    let mut seen = false;
                    for _ in 0..50 {
                        while let Some(item) = rb.next() {
                            if item.len() >= 4 && u32::from_ne_bytes([item[0], item[1], item[2], item[3]]) == me {
                                seen = true;
                            }
                        }
                        if seen {
                            break;
                        }
                        // SAFETY: getppid(2) takes no arguments and cannot fail: a syscall the
                        // probe program observes.
                        unsafe { libc::getppid() };
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if seen {
                        (true, "works (a record written in the kernel was read back)".into())
                    } else {
                        (false, "no record arrived".into())
                    }
                }
                Some(Err(e)) => (false, e.to_string()),
                None => (false, "PROBE_RB map missing".into()),
            };
        }
        Err(e) => {
            let (ok, d) = verdict(Err::<(), _>(AnyErr(e)), lockdown_note);
            out.push(("tracepoint", ok, d));
        }
    }
    out.push(("ring buffer", ring_ok.0, ring_ok.1));

    let r = (|| -> Result<()> {
        let p: &mut RawTracePoint = program(ebpf, "pf_probe_raw_tp")?;
        p.load()?;
        p.attach("net_dev_queue")?;
        Ok(())
    })();
    let (ok, d) = verdict(r.map_err(AnyErr), lockdown_note);
    out.push(("raw_tp", ok, d));

    let r = (|| -> Result<()> {
        let p: &mut BtfTracePoint = program(ebpf, "pf_probe_tp_btf")?;
        p.load("net_dev_queue", &btf)?;
        p.attach()?;
        Ok(())
    })();
    let (ok, d) = verdict(r.map_err(AnyErr), lockdown_note);
    out.push(("tp_btf", ok, d));

    let r = (|| -> Result<()> {
        let p: &mut KProbe = program(ebpf, "pf_probe_kprobe")?;
        p.load()?;
        p.attach("tcp_sendmsg", 0)?;
        Ok(())
    })();
    let (ok, d) = verdict(r.map_err(AnyErr), |n| {
        (n == libc::ENOENT).then_some("no kprobe support in this kernel (CONFIG_KPROBES off)")
    });
    out.push(("kprobe", ok, d));

    let r = (|| -> Result<()> {
        let p: &mut FEntry = program(ebpf, "pf_probe_fentry")?;
        p.load("tcp_sendmsg", &btf)?;
        p.attach()?;
        Ok(())
    })();
    let (ok, d) = verdict(r.map_err(AnyErr), lockdown_note);
    out.push(("fentry", ok, d));

    let r = (|| -> Result<()> {
        let p: &mut Xdp = program(ebpf, "pf_probe_xdp")?;
        p.load()?;
        let lo = platform::interfaces::ifindex("lo").ok_or_else(|| anyhow::anyhow!("no lo interface"))?;
        p.attach_to_if_index(lo, XdpMode::Skb)?;
        p.unload()?;
        Ok(())
    })();
    let (ok, d) = verdict(r.map_err(AnyErr), |n| (n == libc::EBUSY).then_some("another XDP program holds lo"));
    out.push(("XDP generic (lo)", ok, d));

    let native = match TestHosts::new("pfdoc") {
        Ok(h) => {
            let ns = h.path_a();
            let veth = h.veth_a.clone();
            let r = (|| -> Result<()> {
                let p: &mut Xdp = program(ebpf, "pf_probe_xdp")?;
                p.load()?;
                platform::netns::in_netns(Some(&ns), || {
                    let i = platform::interfaces::ifindex(&veth).ok_or_else(|| anyhow::anyhow!("veth vanished"))?;
                    p.attach_to_if_index(i, XdpMode::Driver)?;
                    Ok(())
                })
            })();
            let v = verdict(r.map_err(AnyErr), |_| None);
            // Detach before the namespaces go.
            if let Some(aya::programs::Program::Xdp(p)) = ebpf.program_mut("pf_probe_xdp") {
                let _ = p.unload();
            }
            out.push(("XDP native (veth)", v.0, v.1));
            // capture --bypass: an AF_XDP socket on the veth's first queue.
            let r = platform::netns::in_netns(Some(&ns), || {
                let i = platform::interfaces::ifindex(&veth).ok_or_else(|| anyhow::anyhow!("veth vanished"))?;
                Ok(crate::capture::xsk::Xsk::open(i, 0, 2048, false)?.mode)
            });
            out.push(match r {
                Ok(crate::capture::xsk::Mode::ZeroCopy) => ("AF_XDP (veth)", true, "zero-copy".into()),
                Ok(crate::capture::xsk::Mode::Copy) => (
                    "AF_XDP (veth)",
                    true,
                    "copy mode (veth has no zero-copy; a NIC driver with AF_XDP zero-copy gets it)".into(),
                ),
                Err(e) => {
                    let (ok, d) = verdict(Err::<(), _>(AnyErr(e)), |n| {
                        (n == libc::EAFNOSUPPORT).then_some("no AF_XDP sockets (CONFIG_XDP_SOCKETS off)")
                    });
                    ("AF_XDP (veth)", ok, d)
                }
            });
            // blast: one XDP live-frame run out of the veth.
            let r = (|| -> Result<()> {
                let p: &mut Xdp = program(ebpf, "pf_blast")?;
                p.load()?;
                let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(p.fd()?));
                platform::netns::in_netns(Some(&ns), || {
                    let i = platform::interfaces::ifindex(&veth).ok_or_else(|| anyhow::anyhow!("veth vanished"))?;
                    Ok(crate::cmd::blast::live_run(fd, &[0u8; 60], i, 1)?)
                })
            })();
            let (ok, d) = verdict(r.map_err(AnyErr), |n| (n == libc::EINVAL).then_some("needs Linux 5.18+"));
            out.push(("XDP live frames (blast)", ok, d));
            None
        }
        Err(e) => Some((false, format!("could not create a veth test host: {e:#}"))),
    };
    if let Some((ok, d)) = native {
        out.push(("XDP native (veth)", ok, d));
    }
    // Zero-copy per interface, as each driver tells the kernel (no socket is bound).
    out.push(match crate::capture::xsk::zero_copy_interfaces() {
        Ok(list) => {
            let names: Vec<String> = list
                .iter()
                .map(|(i, zc)| {
                    let name = platform::interfaces::ifname(*i).unwrap_or_else(|| format!("ifindex {i}"));
                    format!("{name}: {}", if *zc { "zero-copy" } else { "copy mode" })
                })
                .collect();
            ("AF_XDP per interface", true, names.join(", "))
        }
        Err(e) => (
            "AF_XDP per interface",
            true,
            format!("the kernel does not say which drivers have zero-copy (no netdev netlink family before 6.3: {e})"),
        ),
    });

    let r = (|| -> Result<()> {
        let p: &mut SchedClassifier = program(ebpf, "pf_probe_tc")?;
        p.load()?;
        p.attach_with_options("lo", TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default()))?;
        Ok(())
    })();
    let (ok, d) = verdict(r.map_err(AnyErr), |_| None);
    out.push(("tcx (lo)", ok, d));
    drop(tracer);
}

/// The stage → hook table of a real tracer (inert: its filter is never enabled), then
/// the connection steps' hooks.
async fn stage_table() -> Result<Vec<Vec<String>>> {
    let mut t = Tracer::load(&LoadOptions { ring_bytes: 4096, ..Default::default() })?;
    // `trace --connections`' hooks first: the kernel's BTF is still at hand.
    let conns = t.attach_connections();
    t.attach_drops();
    t.attach_kernel_hooks(crate::model::stage_set::StageSet::ALL)?;
    t.attach_interface(None, "lo", XdpChoice::Auto)?;
    let state = |s: &Result<(), String>| match s {
        Ok(()) => "available".to_string(),
        Err(e) => format!("missing: {e}"),
    };
    let mut rows: Vec<Vec<String>> = packetflow_common::Stage::KERNEL_ORDER
        .iter()
        .filter_map(|s| t.stages.get(s).map(|h| (s, h)))
        .map(|(s, h)| vec![s.name().to_string(), h.hook.clone(), state(&h.state)])
        .collect();
    match conns {
        Ok(()) => rows.extend(
            t.conn_hooks
                .iter()
                .map(|h| vec![format!("{} (--connections)", h.stage.name()), h.hook.clone(), state(&h.state)]),
        ),
        Err(e) => rows.push(vec!["--connections".into(), "-".into(), format!("missing: {e:#}")]),
    }
    rows.extend(t.drop_hooks.iter().map(|h| vec![h.what.to_string(), h.hook.clone(), state(&h.state)]));
    if t.drop_reasons.is_empty() {
        rows.push(vec![
            "drop reasons".into(),
            "BTF enum skb_drop_reason".into(),
            "missing: reasons print as numbers".into(),
        ]);
    }
    Ok(rows)
}

/// anyhow::Error as a std error whose source chain can be searched for an errno.
#[derive(Debug)]
struct AnyErr(anyhow::Error);

impl std::fmt::Display for AnyErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for AnyErr {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}
