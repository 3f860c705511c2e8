//! Loading the embedded eBPF object and attaching its programs.
//!
//! Every attachment is a bpf_link (tracepoints, tp_btf, cgroup, tcx, XDP link): the kernel
//! detaches it when the last fd closes, so even SIGKILL leaves nothing behind. Nothing is
//! pinned. [`Tracer`] owns the object; dropping it detaches everything.
//!
//! Stage → hook (also printed by `doctor` and recorded in the JSON header). Where a stage
//! lists several, `attach_kernel_hooks` tries them in order and the first that attaches
//! serves it (docs/stages.md says why each exists):
//!
//! | stage          | hook                                                                 |
//! |----------------|----------------------------------------------------------------------|
//! | send_syscall   | tracepoint syscalls:sys_enter_{write,writev,sendto,sendmsg,sendmmsg} |
//! | sock_send      | TCP: tp_btf tcp_sendmsg_locked, else kprobe tcp_sendmsg_locked;      |
//! |                | UDP: cgroup_skb/egress, else the same without asking for the task    |
//! | ip_send        | kprobe ip_output/ip6_output (optional: only where kprobes work)      |
//! | tc_egress      | tcx egress, per interface                                            |
//! | dev_queue      | tp_btf net_dev_queue                                                 |
//! | nic_xmit       | tp_btf net_dev_start_xmit                                            |
//! | xdp            | XDP (native where the driver has it, else generic), per interface   |
//! | netif_receive  | tp_btf netif_receive_skb                                             |
//! | tc_ingress     | tcx ingress, per interface                                           |
//! | ip_rcv         | kprobe ip_local_deliver/ip6_input (optional)                         |
//! | transport_rcv  | tp_btf tcp_probe (TCP), cgroup_skb/ingress (UDP)                     |
//! | sock_queue     | tp_btf sk_data_ready, else kprobe sock_def_readable                  |
//! | copy_to_user   | tp_btf skb_copy_datagram_iovec (TCP); UDP: tp_btf sock_recv_length,  |
//! |                | else kprobe skb_consume_udp                                          |
//! | recv_syscall   | tracepoint syscalls:sys_exit_{read,readv,recvfrom,recvmsg,recvmmsg}  |

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, KProbe, LinkOrder, ProgramError,
        SchedClassifier, TcAttachType, TracePoint, Xdp, XdpMode, tc::TcAttachOptions,
    },
};
use packetflow_common::{
    Filter, Offsets, RING_SHARDS, Stage,
    capture::CaptureConfig,
    config::{PROTO_TCP, PROTO_UDP},
    counters::NUM_COUNTERS,
    summary::HIST_BUCKETS,
};

use crate::{error::user, kernel::btf::Btf, model::stage_set::StageSet, platform};

/// The compiled `packetflow-ebpf` object, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/packetflow"));

pub const SEND_SYSCALLS: &[&str] = &["write", "writev", "sendto", "sendmsg", "sendmmsg"];
pub const RECV_SYSCALLS: &[&str] = &["read", "readv", "recvfrom", "recvmsg", "recvmmsg"];

/// Each program and the stage whose records it writes (for the kernel's per-program
/// counters).
const PROGRAM_STAGES: &[(&str, Stage)] = &[
    ("pf_sys_enter_send", Stage::SendSyscall),
    ("pf_sys_exit_send", Stage::SendSyscall),
    ("pf_tcp_sendmsg", Stage::SockSend),
    ("pf_kp_tcp_sendmsg", Stage::SockSend),
    ("pf_cg_egress", Stage::SockSend),
    ("pf_cg_egress_nopid", Stage::SockSend),
    ("pf_kp_ip_send", Stage::IpSend),
    ("pf_tc_egress", Stage::TcEgress),
    ("pf_cap_tc_egress", Stage::TcEgress),
    ("pf_dev_queue", Stage::DevQueue),
    ("pf_start_xmit", Stage::NicXmit),
    ("pf_xdp", Stage::Xdp),
    ("pf_cap_xdp", Stage::Xdp),
    ("pf_netif_receive", Stage::NetifReceive),
    ("pf_tc_ingress", Stage::TcIngress),
    ("pf_kp_ip_rcv", Stage::IpRcv),
    ("pf_tcp_probe", Stage::TransportRcv),
    ("pf_cg_ingress", Stage::TransportRcv),
    ("pf_sk_data_ready", Stage::SockQueue),
    ("pf_kp_sk_data_ready", Stage::SockQueue),
    ("pf_copy_to_user", Stage::CopyToUser),
    ("pf_sock_recv", Stage::CopyToUser),
    ("pf_kp_udp_copy", Stage::CopyToUser),
    ("pf_sys_exit_recv", Stage::RecvSyscall),
];

/// How often the kernel skipped program `fd` because a BPF program was already running
/// on that CPU (`bpf_prog_info.recursion_misses`, Linux 5.12+; 0 where unknown).
fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: bpf_prog_info is plain integers; all-zero is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let attr =
        InfoAttr { bpf_fd: fd.as_raw_fd() as u32, info_len: size_of_val(&info) as u32, info: &raw mut info as u64 };
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &attr, size_of::<InfoAttr>()) };
    if r == 0 { info.recursion_misses } else { 0 }
}

/// One way to serve a hook: a tp_btf program on a tracepoint, a kprobe on kernel
/// functions, or a cgroup_skb program on the root cgroup.
enum Hook {
    TpBtf(&'static str, &'static str),
    Kprobe(&'static str, &'static [&'static str]),
    Cgroup(&'static str, CgroupSkbAttachType),
}

impl Hook {
    fn program(&self) -> &'static str {
        match self {
            Hook::TpBtf(p, _) | Hook::Kprobe(p, _) | Hook::Cgroup(p, _) => p,
        }
    }

    fn describe(&self) -> String {
        match self {
            Hook::TpBtf(_, tp) => format!("tp_btf {tp}"),
            Hook::Kprobe(_, funcs) => format!("kprobe {}", funcs.join("/")),
            Hook::Cgroup("pf_cg_egress_nopid", _) => "cgroup_skb/egress (sender from the send-syscall note)".into(),
            Hook::Cgroup(_, CgroupSkbAttachType::Egress) => "cgroup_skb/egress".into(),
            Hook::Cgroup(_, _) => "cgroup_skb/ingress".into(),
        }
    }
}

/// The global hooks, in groups that attach and detach together: each serves one stage
/// (for TCP or UDP, or both) and is attached when `StageSet` asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Group {
    SendSyscalls,
    TcpSend,
    UdpSend,
    IpSend,
    DevQueue,
    NicXmit,
    NetifReceive,
    IpRcv,
    TcpRcv,
    UdpRcv,
    SockQueue,
    TcpCopy,
    UdpCopy,
    RecvSyscalls,
}

impl Group {
    const ALL: [Group; 14] = [
        Group::SendSyscalls,
        Group::TcpSend,
        Group::UdpSend,
        Group::IpSend,
        Group::DevQueue,
        Group::NicXmit,
        Group::NetifReceive,
        Group::IpRcv,
        Group::TcpRcv,
        Group::UdpRcv,
        Group::SockQueue,
        Group::TcpCopy,
        Group::UdpCopy,
        Group::RecvSyscalls,
    ];

    /// Does stage set `a`, tracing protocols `protos` (`PROTO_*`), need this group? A
    /// protocol's own hooks (TCP's or UDP's) run for every packet of the other one too, so
    /// `--proto` leaves them off (three programs fewer per TCP message).
    fn wanted(self, a: StageSet, protos: u32) -> bool {
        let proto = match self {
            Group::TcpSend | Group::TcpRcv | Group::TcpCopy => PROTO_TCP,
            Group::UdpSend | Group::UdpRcv | Group::UdpCopy => PROTO_UDP,
            _ => PROTO_TCP | PROTO_UDP,
        };
        if protos & proto == 0 {
            return false;
        }
        match self {
            Group::SendSyscalls => a.contains(Stage::SendSyscall),
            Group::TcpSend | Group::UdpSend => a.needs(Stage::SockSend),
            Group::IpSend => a.needs(Stage::IpSend),
            Group::DevQueue => a.needs(Stage::DevQueue),
            Group::NicXmit => a.needs(Stage::NicXmit),
            Group::NetifReceive => a.needs(Stage::NetifReceive),
            Group::IpRcv => a.needs(Stage::IpRcv),
            Group::TcpRcv => a.contains(Stage::TransportRcv),
            // Also UDP's sock_queue source (the datagram handed to the socket).
            Group::UdpRcv => a.needs(Stage::TransportRcv),
            Group::SockQueue => a.needs(Stage::SockQueue),
            Group::TcpCopy | Group::UdpCopy => a.needs(Stage::CopyToUser),
            // Also where UDP's copy_to_user is written.
            Group::RecvSyscalls => a.needs(Stage::RecvSyscall),
        }
    }

    /// The ways to serve it, in order (the first that attaches serves); tracepoint
    /// groups (the syscalls) are attached by `Tracer::attach_group`.
    fn hooks(self) -> &'static [Hook] {
        match self {
            Group::SendSyscalls | Group::RecvSyscalls => &[],
            Group::TcpSend => &[
                Hook::TpBtf("pf_tcp_sendmsg", "tcp_sendmsg_locked"),
                Hook::Kprobe("pf_kp_tcp_sendmsg", &["tcp_sendmsg_locked"]),
            ],
            Group::UdpSend => &[
                Hook::Cgroup("pf_cg_egress", CgroupSkbAttachType::Egress),
                // Older kernels refuse bpf_get_current_pid_tgid in cgroup_skb programs.
                Hook::Cgroup("pf_cg_egress_nopid", CgroupSkbAttachType::Egress),
            ],
            Group::IpSend => &[Hook::Kprobe("pf_kp_ip_send", &["ip_output", "ip6_output"])],
            Group::DevQueue => &[Hook::TpBtf("pf_dev_queue", "net_dev_queue")],
            Group::NicXmit => &[Hook::TpBtf("pf_start_xmit", "net_dev_start_xmit")],
            Group::NetifReceive => &[Hook::TpBtf("pf_netif_receive", "netif_receive_skb")],
            Group::IpRcv => &[Hook::Kprobe("pf_kp_ip_rcv", &["ip_local_deliver", "ip6_input"])],
            Group::TcpRcv => &[Hook::TpBtf("pf_tcp_probe", "tcp_probe")],
            Group::UdpRcv => &[Hook::Cgroup("pf_cg_ingress", CgroupSkbAttachType::Ingress)],
            Group::SockQueue => &[
                Hook::TpBtf("pf_sk_data_ready", "sk_data_ready"),
                Hook::Kprobe("pf_kp_sk_data_ready", &["sock_def_readable"]),
            ],
            Group::TcpCopy => &[Hook::TpBtf("pf_copy_to_user", "skb_copy_datagram_iovec")],
            Group::UdpCopy => {
                &[Hook::TpBtf("pf_sock_recv", "sock_recv_length"), Hook::Kprobe("pf_kp_udp_copy", &["skb_consume_udp"])]
            }
        }
    }
}

/// A hook group as attached: its description and outcome, the programs loaded for it
/// (unloaded when it goes) and the links it made.
struct AttachedGroup {
    hook: String,
    state: Result<(), String>,
    programs: Vec<&'static str>,
    links: usize,
}

/// How one stage is observed on this kernel.
#[derive(Clone, Debug)]
pub struct StageHook {
    pub hook: String,
    /// `Err(reason)` when the stage cannot be observed.
    pub state: Result<(), String>,
}

/// XDP and TC on one interface.
#[derive(Clone, Debug)]
pub struct Attached {
    pub netns: Option<std::path::PathBuf>,
    pub netns_inode: u32,
    pub ifname: String,
    pub ifindex: u32,
    /// "native" or "generic", or the reason XDP is not attached.
    pub xdp: Result<&'static str, String>,
    pub tc_ingress: Result<(), String>,
    pub tc_egress: Result<(), String>,
    /// The interface (or its namespace) was deleted while attached: its links died with
    /// it, and its stages say so.
    pub lost: bool,
}

/// Which programs go on an interface: the tracer's, or capture's (which also trace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Trace,
    Capture,
}

impl Role {
    fn programs(self) -> [&'static str; 3] {
        match self {
            Role::Trace => ["pf_xdp", "pf_tc_ingress", "pf_tc_egress"],
            Role::Capture => ["pf_cap_xdp", "pf_tc_ingress", "pf_cap_tc_egress"],
        }
    }
}

/// How to attach XDP: `--xdp-mode` and the daemon's `xdp_mode` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpChoice {
    Auto,
    Native,
    Generic,
    Off,
}

pub struct LoadOptions {
    /// Bytes per ring-buffer shard (a power of two, at least one page).
    pub ring_bytes: u32,
    /// Bytes per capture ring shard; 0 when not capturing.
    pub capture_ring_bytes: u32,
    /// Tracer programs attached but returning at once (the bench's measure of what the
    /// attachments alone cost).
    pub idle: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { ring_bytes: 4 << 20, capture_ring_bytes: 0, idle: false }
    }
}

pub struct Tracer {
    /// `None` once detached.
    ebpf: Option<Ebpf>,
    /// Taken out of the object at load, so they outlive the programs.
    counters: PerCpuArray<MapData, u64>,
    filter: Array<MapData, Filter>,
    capture: Array<MapData, CaptureConfig>,
    hist: PerCpuArray<MapData, [u64; HIST_BUCKETS]>,
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    pub offsets: Offsets,
    /// The asked stages (`--stages`) and how each is served; a stage not asked for has
    /// no entry.
    pub stages: BTreeMap<Stage, StageHook>,
    pub asked: StageSet,
    /// The protocols the filter traces (`PROTO_*` bits, from the last `set_filter`): a
    /// hook only one protocol uses is attached only when that one is traced.
    pub protos: u32,
    pub interfaces: Vec<Attached>,
    /// Shards some CPU writes to.
    pub used_shards: Vec<usize>,
    /// Attachments made (each a bpf_link the kernel drops when this process exits).
    pub links: usize,
    /// Tracepoint (perf event) links, held here so `detach_all` can close them in
    /// parallel: each close waits for an RCU grace period (~75 ms here), and 15 of them
    /// in a row made SIGTERM take over a second.
    tp_links: Vec<(&'static str, aya::programs::trace_point::TracePointLink)>,
    /// The global hook groups attached.
    groups: BTreeMap<Group, AttachedGroup>,
    /// The kernel's BTF for loading tp_btf programs: tens of MiB parsed, so dropped once
    /// the kernel hooks are attached (and read again if ever needed).
    btf: Option<aya::Btf>,
    /// The kernel's per-program run statistics, on while the tracer lives or sampled.
    run_stats: std::sync::Arc<std::sync::Mutex<RunStats>>,
}

/// The kernel's per-program run statistics (kernel.bpf_stats): on while a
/// BPF_ENABLE_STATS fd is open; closing it, even by a crash, restores what was there.
/// They cost every BPF program run (ours and anyone's) two sched_clock reads, a
/// paravirtual clock on a VM: on this project's VM about 20 ns per run, 15 points of p50
/// overhead on a loopback ping-pong with every stage traced (docs/stages.md, "Cost").
/// So a tracer left running samples them (`set` on and off: the daemon's
/// `cost_sample_secs`): programs' runs and time then count only inside the windows, and
/// `sampled` says how long those were.
#[derive(Debug)]
pub struct RunStats {
    fd: Option<std::os::fd::OwnedFd>,
    /// They can be turned on (root, and not `disable`d).
    available: bool,
    done: std::time::Duration,
    since: Option<std::time::Instant>,
}

impl RunStats {
    fn enable() -> Option<std::os::fd::OwnedFd> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime).ok()
    }

    /// Turned on now, if the kernel lets us.
    fn start() -> RunStats {
        let fd = Self::enable();
        RunStats {
            available: fd.is_some(),
            since: fd.as_ref().map(|_| std::time::Instant::now()),
            fd,
            done: std::time::Duration::ZERO,
        }
    }

    pub fn set(&mut self, on: bool) {
        if !self.available || on == self.fd.is_some() {
            return;
        }
        if on {
            self.fd = Self::enable();
            self.since = self.fd.as_ref().map(|_| std::time::Instant::now());
        } else {
            self.fd = None;
            self.done += self.since.take().map_or(std::time::Duration::ZERO, |s| s.elapsed());
        }
    }

    /// Off for good: no cost figures (`program_costs` is None).
    pub fn disable(&mut self) {
        self.set(false);
        self.available = false;
    }

    pub fn available(&self) -> bool {
        self.available
    }

    /// Counts time from now (when the programs are attached).
    pub fn reset_clock(&mut self) {
        self.done = std::time::Duration::ZERO;
        self.since = self.fd.as_ref().map(|_| std::time::Instant::now());
    }

    /// How long they have been on, in all.
    pub fn sampled(&self) -> std::time::Duration {
        self.done + self.since.map_or(std::time::Duration::ZERO, |s| s.elapsed())
    }
}

/// One program's kernel time so far (with the run statistics on).
#[derive(Clone, Debug)]
pub struct ProgramCost {
    pub name: String,
    pub stage: Option<Stage>,
    pub runs: u64,
    pub ns: u64,
}

fn describe(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            // Debugging aid: the whole verifier log.
            if let Some(p) = std::env::var_os("PACKETFLOW_VERIFIER_LOG") {
                use std::io::Write;
                if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(p) {
                    let _ = writeln!(f, "=== load failed: {io_error}\n{log}");
                }
            }
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            format!("{io_error}; verifier: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" / "))
        }
        other => {
            let mut s = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(e) = src {
                s = format!("{s}: {e}");
                src = e.source();
            }
            s
        }
    }
}

fn ring_name(i: usize) -> &'static str {
    ["RB0", "RB1", "RB2", "RB3", "RB4", "RB5", "RB6", "RB7"][i]
}

fn cap_ring_name(i: usize) -> &'static str {
    ["CR0", "CR1", "CR2", "CR3", "CR4", "CR5", "CR6", "CR7"][i]
}

/// Offset of `ret` in the sys_exit tracepoint records, from tracefs.
fn sys_exit_ret_offset() -> u32 {
    let path = format!("{}/events/syscalls/sys_exit_read/format", platform::mounts::TRACEFS);
    std::fs::read_to_string(path)
        .ok()
        .and_then(|f| {
            f.lines()
                .find(|l| l.contains(" ret;"))
                .and_then(|l| l.split(';').find_map(|p| p.trim().strip_prefix("offset:")).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(16)
}

impl Tracer {
    /// Loads the object with this kernel's struct offsets. Nothing is attached yet.
    pub fn load(opts: &LoadOptions) -> Result<Tracer> {
        if !Path::new(Btf::VMLINUX).exists() {
            crate::user_bail!(
                "this kernel has no BTF ({} is missing); packetflow needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
                Btf::VMLINUX
            );
        }
        platform::privileges::raise_memlock();
        let tracefs = platform::mounts::ensure_tracefs();
        if let platform::mounts::MountState::Failed(why) = &tracefs {
            return Err(user(format!("tracefs is needed for the syscall tracepoints: {why}")));
        }
        let btf = Btf::from_sys_fs()?;
        let offsets = btf.offsets();
        let aya_btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;
        let ring_bytes = opts.ring_bytes.max(4096).next_power_of_two();
        let wake = (ring_bytes / 4) as u64;
        let ret_off = sys_exit_ret_offset();
        let cpus = platform::host::possible_cpus();
        let nr_cpus: u32 = cpus.iter().max().map_or(1, |c| c + 1);
        let used: Vec<usize> =
            (0..RING_SHARDS).filter(|s| cpus.iter().any(|c| *c as usize % RING_SHARDS == *s)).collect();
        let idle = u8::from(opts.idle);
        let mut loader = EbpfLoader::new();
        loader
            .btf(Some(&aya_btf))
            .override_global("OFFSETS", &offsets, true)
            .override_global("WAKEUP_BYTES", &wake, true)
            .override_global("SYS_EXIT_RET_OFF", &ret_off, true)
            .override_global("NR_CPUS", &nr_cpus, true)
            .override_global("IDLE", &idle, true);
        let cap_bytes =
            if opts.capture_ring_bytes == 0 { 4096 } else { opts.capture_ring_bytes.max(1 << 20).next_power_of_two() };
        // The capture shards wake their reader by their own size: with the trace rings'
        // threshold (1 KiB when `capture` runs without --stages) every seventh small
        // packet was a wake-up, and the reader's wake-ups starved the traffic it captured.
        let cap_wake = (cap_bytes / 4) as u64;
        loader.override_global("CAP_WAKEUP_BYTES", &cap_wake, true);
        for s in 0..RING_SHARDS {
            loader.map_max_entries(ring_name(s), if used.contains(&s) { ring_bytes } else { 4096 });
            loader.map_max_entries(cap_ring_name(s), if used.contains(&s) { cap_bytes } else { 4096 });
        }
        // One capture staging buffer per possible CPU (64 KiB each), only when capturing.
        let ncpu = if opts.capture_ring_bytes == 0 { 1 } else { cpus.iter().max().copied().unwrap_or(0) + 1 };
        loader.map_max_entries("CAP_SCRATCH", ncpu);
        let mut ebpf = loader.load(OBJECT).map_err(|e| {
            if e.to_string().contains("Operation not permitted") {
                user("the kernel refused to create BPF maps (EPERM): run packetflow as root or with CAP_BPF")
            } else {
                anyhow!("loading the eBPF object: {e}")
            }
        })?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
        let counters =
            PerCpuArray::try_from(ebpf.take_map("COUNTERS").ok_or_else(|| anyhow!("COUNTERS map missing"))?)?;
        let filter = Array::try_from(ebpf.take_map("FILTER").ok_or_else(|| anyhow!("FILTER map missing"))?)?;
        let capture = Array::try_from(ebpf.take_map("CAP_CONFIG").ok_or_else(|| anyhow!("CAP_CONFIG map missing"))?)?;
        let hist = PerCpuArray::try_from(ebpf.take_map("HIST").ok_or_else(|| anyhow!("HIST map missing"))?)?;
        let t = Tracer {
            ebpf: Some(ebpf),
            counters,
            filter,
            capture,
            hist,
            _logger: logger,
            offsets,
            stages: BTreeMap::new(),
            asked: StageSet::ALL,
            protos: PROTO_TCP | PROTO_UDP,
            interfaces: Vec::new(),
            used_shards: used,
            links: 0,
            tp_links: Vec::new(),
            groups: BTreeMap::new(),
            btf: Some(aya_btf),
            // Root (CAP_SYS_ADMIN) only; without it the cost is reported unknown.
            run_stats: std::sync::Arc::new(std::sync::Mutex::new(RunStats::start())),
        };
        Ok(t)
    }

    /// Writes the in-kernel filter (`enabled` is set here).
    /// Global hooks follow its protocols at the next `set_stages`.
    pub fn set_filter(&mut self, f: &Filter) -> Result<()> {
        let mut f = *f;
        f.enabled = 1;
        self.filter.set(0, f, 0)?;
        self.protos = f.protos;
        Ok(())
    }

    /// Writes the capture settings (the filter's primitives and truth table).
    pub fn set_capture(&mut self, c: &crate::capture::expr::Compiled) -> Result<()> {
        let mut table: Array<_, u8> =
            Array::try_from(self.ebpf_mut().map_mut("CAP_TABLE").ok_or_else(|| anyhow!("CAP_TABLE map missing"))?)?;
        for (i, v) in c.table.iter().enumerate() {
            table.set(i as u32, *v, 0)?;
        }
        // The table first, then the config that switches capture on.
        self.capture.set(0, c.config, 0)?;
        Ok(())
    }

    /// The capture ring shards (taken out of the object).
    pub fn take_capture_rings(&mut self) -> Result<Vec<(usize, RingBuf<MapData>)>> {
        let mut out = Vec::new();
        for s in self.used_shards.clone() {
            let map =
                self.ebpf_mut().take_map(cap_ring_name(s)).ok_or_else(|| anyhow!("{} missing", cap_ring_name(s)))?;
            out.push((s, RingBuf::try_from(map)?));
        }
        Ok(out)
    }

    /// The in-kernel histograms (summary mode), summed over CPUs, as statistics.
    pub fn kernel_stats(&self) -> crate::model::stats::Stats {
        use packetflow_common::summary::{E2E_SLOT, SLOTS_PER_PATH, bucket_range};
        let mut stats = crate::model::stats::Stats::default();
        for (p, path) in
            [crate::model::trace::PathKind::Loopback, crate::model::trace::PathKind::Nic].into_iter().enumerate()
        {
            let mut ps = crate::model::stats::PathStats::default();
            for slot in 0..SLOTS_PER_PATH {
                let Ok(per_cpu) = self.hist.get(&(p as u32 * SLOTS_PER_PATH + slot), 0) else {
                    continue;
                };
                let mut h = crate::model::stats::hist();
                for buckets in per_cpu.iter() {
                    for (i, &n) in buckets.iter().enumerate() {
                        if n > 0 {
                            let (lo, hi) = bucket_range(i);
                            let _ = h.record_n(((lo + hi - 1) / 2).max(1), n);
                        }
                    }
                }
                if h.is_empty() {
                    continue;
                }
                if slot == E2E_SLOT {
                    ps.traces = h.len();
                    ps.complete = h.len();
                    ps.e2e = h;
                } else if let Some(s) = Stage::from_u8(slot as u8) {
                    ps.stages.insert(s, h);
                }
            }
            if ps.traces > 0 {
                // The first stage of every packet has no delta: show it as seen.
                if let Some(first) = self.asked.stages().next() {
                    ps.stages.entry(first).or_insert_with(crate::model::stats::hist);
                }
                stats.paths.insert(path, ps);
            }
        }
        stats
    }

    /// Capture losses per ifindex (records that did not fit the ring).
    pub fn capture_losses(&self) -> std::collections::HashMap<u32, u64> {
        let Some(m) = self.ebpf.as_ref().and_then(|e| e.map("CAP_IF_LOST")) else {
            return Default::default();
        };
        let Ok(h) = aya::maps::HashMap::<_, u32, u64>::try_from(m) else {
            return Default::default();
        };
        h.iter().filter_map(Result::ok).collect()
    }

    /// Sum over CPUs of every counter in `COUNTERS`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        let arr = &self.counters;
        let mut out = vec![0u64; NUM_COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(vals) = arr.get(&(i as u32), 0) {
                *slot = vals.iter().sum();
            }
        }
        Ok(out)
    }

    /// The ring-buffer shards, for the reader (taken out of the object).
    pub fn take_rings(&mut self) -> Result<Vec<(usize, RingBuf<MapData>)>> {
        let mut out = Vec::new();
        for s in self.used_shards.clone() {
            let map = self.ebpf_mut().take_map(ring_name(s)).ok_or_else(|| anyhow!("{} missing", ring_name(s)))?;
            out.push((s, RingBuf::try_from(map)?));
        }
        Ok(out)
    }

    /// Program `prog` of the object, as its type.
    fn program<'a, T>(&'a mut self, prog: &str) -> Result<&'a mut T, String>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let p = self.ebpf_mut().program_mut(prog).ok_or("program missing")?;
        p.try_into().map_err(|e: ProgramError| e.to_string())
    }

    fn tracepoint(&mut self, prog: &'static str, category: &str, names: &[String]) -> Result<(), String> {
        let p: &mut TracePoint = self.program(prog)?;
        p.load().map_err(|e| describe(&e))?;
        let mut links = Vec::new();
        let mut r = Ok(());
        for n in names {
            match p.attach(category, n).and_then(|id| p.take_link(id)) {
                Ok(l) => links.push(l),
                Err(e) => {
                    r = Err(format!("{category}:{n}: {}", describe(&e)));
                    break;
                }
            }
        }
        self.links += links.len();
        self.tp_links.extend(links.into_iter().map(|l| (prog, l)));
        r
    }

    fn tp_btf(&mut self, prog: &str, tp: &str) -> Result<(), String> {
        if self.btf.is_none() {
            self.btf = Some(aya::Btf::from_sys_fs().map_err(|e| format!("reading kernel BTF: {e}"))?);
        }
        let btf = self.btf.as_ref().expect("just read");
        let p: &mut BtfTracePoint = self
            .ebpf
            .as_mut()
            .ok_or("detached")?
            .program_mut(prog)
            .ok_or("program missing")?
            .try_into()
            .map_err(|e: ProgramError| e.to_string())?;
        let t0 = std::time::Instant::now();
        p.load(tp, btf).map_err(|e| describe(&e))?;
        if std::env::var_os("PACKETFLOW_DEBUG_LOAD").is_some() {
            eprintln!("loaded {prog} in {:?}", t0.elapsed());
        }
        p.attach().map_err(|e| describe(&e))?;
        self.links += 1;
        Ok(())
    }

    /// Tries `hooks` in order; returns the description of the one that attached (or of
    /// the first, when none did) and the outcome, with every failure's reason.
    fn first_of(&mut self, hooks: &[Hook]) -> (String, Result<(), String>) {
        let mut errs = Vec::new();
        for h in hooks {
            let r = match h {
                Hook::TpBtf(prog, tp) => self.tp_btf(prog, tp),
                Hook::Kprobe(prog, funcs) => self.kprobe(prog, funcs),
                Hook::Cgroup(prog, kind) => self.cgroup(prog, *kind),
            };
            match r {
                Ok(()) => return (h.describe(), Ok(())),
                Err(e) if hooks.len() == 1 => errs.push(e),
                Err(e) => errs.push(format!("{}: {e}", h.describe())),
            }
        }
        (hooks.first().map(Hook::describe).unwrap_or_default(), Err(errs.join("; ")))
    }

    /// Loads kprobe `prog` and attaches it to each of `funcs` (all must attach).
    fn kprobe(&mut self, prog: &str, funcs: &[&str]) -> Result<(), String> {
        let p: &mut KProbe = self.program(prog)?;
        p.load().map_err(|e| describe(&e))?;
        let mut n = 0;
        let mut r = Ok(());
        for f in funcs {
            match p.attach(f, 0) {
                Ok(_) => n += 1,
                Err(_) if !Path::new("/sys/bus/event_source/devices/kprobe").exists() => {
                    r = Err("this kernel has no kprobes (no kprobe event source: CONFIG_KPROBES off)".into());
                    break;
                }
                Err(e) => {
                    r = Err(format!("{f}: {}", describe(&e)));
                    break;
                }
            }
        }
        self.links += n;
        r
    }

    fn cgroup(&mut self, prog: &str, kind: CgroupSkbAttachType) -> Result<(), String> {
        let root = platform::mounts::ensure_cgroup2().map_err(|e| format!("{e:#}"))?;
        let fd = std::fs::File::open(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let p: &mut CgroupSkb = self.program(prog)?;
        p.load().map_err(|e| describe(&e))?;
        // With bpf_link every attachment coexists; link_create takes no mode flags.
        p.attach(&fd, kind, CgroupAttachMode::Single).map_err(|e| describe(&e))?;
        self.links += 1;
        Ok(())
    }

    /// Attaches the global hooks (tracepoints, tp_btf, cgroup_skb) that `asked` needs
    /// (`StageSet::needs`) and records which hook serves each asked stage. A stage whose
    /// hook fails is reported missing, not fatal; a stage not asked for has no program.
    pub fn attach_kernel_hooks(&mut self, asked: StageSet) -> Result<()> {
        self.set_stages(asked);
        let global: Vec<&StageHook> =
            self.stages.iter().filter(|(s, _)| !s.is_per_interface()).map(|(_, h)| h).collect();
        if !global.is_empty() && global.iter().all(|h| h.state.is_err()) {
            let why = global[0].state.clone().err().unwrap_or_default();
            crate::user_bail!("no tracing hook could be attached on this kernel ({why}); run `packetflow doctor`");
        }
        Ok(())
    }

    /// Makes the global hooks match `asked`: attaches the groups it needs that are not
    /// attached, detaches those it no longer needs, and leaves the others alone (their
    /// programs keep running: no gap). Per-interface stages (XDP, tcx) follow `asked`
    /// only for interfaces attached afterwards. Returns one line per change.
    pub fn set_stages(&mut self, asked: StageSet) -> Vec<String> {
        let mut lines = Vec::new();
        for g in Group::ALL {
            let working = self.groups.get(&g).map(|a| a.state.is_ok());
            let wanted = g.wanted(asked, self.protos);
            if working == Some(true) && wanted || working.is_none() && !wanted {
                continue;
            }
            // Wanted and failed before (tried again), or no longer wanted: take it away.
            if let Some(a) = self.groups.remove(&g) {
                for p in a.programs {
                    self.unload(p);
                }
                self.links -= a.links;
                if !wanted {
                    lines.push(format!("detached {}", a.hook));
                    continue;
                }
            }
            let before = self.links;
            let (hook, state, progs) = self.attach_group(g);
            lines.push(match &state {
                Ok(()) => format!("attached {hook}"),
                // (After `--user` dropped the privileges, say.)
                Err(e) => format!("could not attach {hook}: {e}"),
            });
            self.groups.insert(g, AttachedGroup { hook, state, programs: progs, links: self.links - before });
        }
        self.asked = asked;
        self.stage_table();
        // The parsed BTF (tens of MiB) is only needed while attaching: give it back.
        self.btf = None;
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe { libc::malloc_trim(0) };
        lines
    }

    /// Attaches group `g`: (hook description, outcome, programs loaded for it).
    fn attach_group(&mut self, g: Group) -> (String, Result<(), String>, Vec<&'static str>) {
        fn names(prefix: &str, calls: &[&str]) -> Vec<String> {
            calls.iter().map(|c| format!("{prefix}{c}")).collect()
        }
        match g {
            Group::SendSyscalls => {
                let enter = names("sys_enter_", SEND_SYSCALLS);
                let exit = names("sys_exit_", SEND_SYSCALLS);
                let r = self
                    .tracepoint("pf_sys_enter_send", "syscalls", &enter)
                    .and_then(|()| self.tracepoint("pf_sys_exit_send", "syscalls", &exit));
                let hook = format!("tracepoint syscalls:sys_enter_{{{}}}", SEND_SYSCALLS.join(","));
                (hook, r, vec!["pf_sys_enter_send", "pf_sys_exit_send"])
            }
            Group::RecvSyscalls => {
                let r = self.tracepoint("pf_sys_exit_recv", "syscalls", &names("sys_exit_", RECV_SYSCALLS));
                let hook = format!("tracepoint syscalls:sys_exit_{{{}}}", RECV_SYSCALLS.join(","));
                (hook, r, vec!["pf_sys_exit_recv"])
            }
            _ => {
                let hooks = g.hooks();
                let (hook, r) = self.first_of(hooks);
                (hook, r, hooks.iter().map(Hook::program).collect())
            }
        }
    }

    /// Detaches and unloads program `name` (its links go with it).
    fn unload(&mut self, name: &'static str) {
        self.tp_links.retain(|(n, _)| *n != name);
        let Some(p) = self.ebpf.as_mut().and_then(|e| e.program_mut(name)) else { return };
        if p.fd().is_err() {
            return;
        }
        // Only fails for a program that is not loaded.
        let _ = match p {
            aya::programs::Program::TracePoint(p) => p.unload(),
            aya::programs::Program::BtfTracePoint(p) => p.unload(),
            aya::programs::Program::KProbe(p) => p.unload(),
            aya::programs::Program::CgroupSkb(p) => p.unload(),
            _ => Ok(()),
        };
    }

    /// `stages` from the attached groups: each asked global stage and its hook.
    fn stage_table(&mut self) {
        let get = |g: Group| -> (String, Result<(), String>) {
            match self.groups.get(&g) {
                Some(a) => (a.hook.clone(), a.state.clone()),
                None => ("not asked for".into(), Err("not asked for (--stages)".into())),
            }
        };
        // One stage served by a TCP hook and a UDP hook (or by one, `--proto`).
        let protos = self.protos;
        let both = |t: (String, Result<(), String>), u: (String, Result<(), String>)| {
            if protos & PROTO_UDP == 0 {
                return (format!("{} (TCP)", t.0), t.1);
            }
            if protos & PROTO_TCP == 0 {
                return (format!("{} (UDP)", u.0), u.1);
            }
            let hook = format!("{} (TCP), {} (UDP)", t.0, u.0);
            let state = match (&t.1, &u.1) {
                (Ok(()), Ok(())) => Ok(()),
                (Err(e), Ok(())) => Err(format!("TCP: {e}")),
                (Ok(()), Err(e)) => Err(format!("UDP: {e}")),
                (Err(a), Err(b)) => Err(format!("TCP: {a}; UDP: {b}")),
            };
            (hook, state)
        };
        let send = get(Group::SendSyscalls);
        let sock_send = both(get(Group::TcpSend), get(Group::UdpSend));
        let send_ok = match (&send.1, &sock_send.1) {
            (Err(e), _) => Err(e.clone()),
            (Ok(()), r) => r.clone(),
        };
        let rows = [
            (Stage::SendSyscall, (send.0, send_ok)),
            (Stage::SockSend, sock_send),
            (Stage::IpSend, get(Group::IpSend)),
            (Stage::DevQueue, get(Group::DevQueue)),
            (Stage::NicXmit, get(Group::NicXmit)),
            (Stage::NetifReceive, get(Group::NetifReceive)),
            (Stage::IpRcv, get(Group::IpRcv)),
            (Stage::TransportRcv, both(get(Group::TcpRcv), get(Group::UdpRcv))),
            (Stage::SockQueue, get(Group::SockQueue)),
            (Stage::CopyToUser, both(get(Group::TcpCopy), get(Group::UdpCopy))),
            (Stage::RecvSyscall, get(Group::RecvSyscalls)),
        ];
        self.stages.retain(|s, _| s.is_per_interface());
        for (s, (hook, state)) in rows {
            if self.asked.contains(s) {
                self.stages.insert(s, StageHook { hook, state });
            }
        }
        self.refresh_interface_stages();
    }

    /// One line per stage this kernel cannot serve, in kernel order; the optional
    /// IP-layer stages share a line when they are missing for one reason.
    pub fn unavailable(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut optional: Vec<(&str, &String)> = Vec::new();
        for s in Stage::KERNEL_ORDER {
            let Some(StageHook { state: Err(e), .. }) = self.stages.get(&s) else { continue };
            if s.is_optional() {
                optional.push((s.name(), e));
            } else {
                out.push(format!("stage {} unavailable: {e}", s.name()));
            }
        }
        match optional.as_slice() {
            [] => {}
            [(_, e), rest @ ..] if rest.iter().all(|(_, r)| r == e) => {
                let names: Vec<&str> = optional.iter().map(|(n, _)| *n).collect();
                out.push(format!("optional stages {} not traced: {e}", names.join(", ")));
            }
            _ => out.extend(optional.iter().map(|(n, e)| format!("optional stage {n} not traced: {e}"))),
        }
        out
    }

    /// Attaches XDP and tcx ingress/egress to `ifname` in network namespace `netns`
    /// (the current one when `None`). Failures are recorded, not fatal, except an
    /// unknown interface.
    pub fn attach_interface(&mut self, netns: Option<&Path>, ifname: &str, xdp: XdpChoice) -> Result<&Attached> {
        self.attach_interface_as(Role::Trace, netns, ifname, xdp)
    }

    /// As `attach_interface`, with `role`'s programs.
    pub fn attach_interface_as(
        &mut self,
        role: Role,
        netns: Option<&Path>,
        ifname: &str,
        xdp: XdpChoice,
    ) -> Result<&Attached> {
        let [xdp_name, ti_name, te_name] = role.programs();
        let asked = self.asked;
        // Capture needs its programs whatever the stages; the tracer only the asked ones
        // (a stage not asked for has no program loaded).
        let want = move |s: Stage| role == Role::Capture || asked.contains(s);
        for (name, stage) in role.programs().into_iter().zip([Stage::Xdp, Stage::TcIngress, Stage::TcEgress]) {
            if !want(stage) {
                continue;
            }
            let prog = self.ebpf_mut().program_mut(name).ok_or_else(|| anyhow!("{name} missing"))?;
            if prog.fd().is_err() {
                let r = match prog {
                    aya::programs::Program::Xdp(p) => p.load(),
                    aya::programs::Program::SchedClassifier(p) => p.load(),
                    _ => Ok(()),
                };
                r.map_err(|e| anyhow!("loading {name}: {}", describe(&e)))?;
            }
        }
        let netns_inode = platform::netns::netns_inode(netns.unwrap_or(Path::new("/proc/self/ns/net"))).unwrap_or(0);
        let [x, ti, te] = self.ebpf_mut().programs_mut().fold([None, None, None], |mut acc, (n, p)| {
            if n == xdp_name {
                acc[0] = Some(p);
            } else if n == ti_name {
                acc[1] = Some(p);
            } else if n == te_name {
                acc[2] = Some(p);
            }
            acc
        });
        let (Some(x), Some(ti), Some(te)) = (x, ti, te) else {
            return Err(anyhow!("interface programs missing"));
        };
        let x: &mut Xdp = x.try_into()?;
        let ti: &mut SchedClassifier = ti.try_into()?;
        let te: &mut SchedClassifier = te.try_into()?;
        let name = ifname.to_string();
        let ns_owned = netns.map(Path::to_path_buf);
        let attached = platform::netns::in_netns(netns, move || {
            let Some(ifindex) = platform::interfaces::ifindex(&name) else {
                let where_ =
                    ns_owned.as_ref().map(|p| format!(" in network namespace {}", p.display())).unwrap_or_default();
                crate::user_bail!("unknown interface '{name}'{where_}");
            };
            let not_asked = || "not asked for (--stages)".to_string();
            let xdp_state = if want(Stage::Xdp) { attach_xdp(x, ifindex, xdp) } else { Err(not_asked()) };
            let tcx = |p: &mut SchedClassifier, t: TcAttachType, s: Stage| {
                if !want(s) {
                    return Err(not_asked());
                }
                p.attach_with_options(&name, t, TcAttachOptions::TcxOrder(LinkOrder::default()))
                    .map(|_| ())
                    .map_err(|e| describe(&e))
            };
            let tc_ingress = tcx(ti, TcAttachType::Ingress, Stage::TcIngress);
            let tc_egress = tcx(te, TcAttachType::Egress, Stage::TcEgress);
            Ok(Attached {
                netns: ns_owned,
                netns_inode,
                ifname: name,
                ifindex,
                xdp: xdp_state,
                tc_ingress,
                tc_egress,
                lost: false,
            })
        })?;
        self.links += [attached.xdp.is_ok(), attached.tc_ingress.is_ok(), attached.tc_egress.is_ok()]
            .iter()
            .filter(|ok| **ok)
            .count();
        self.interfaces.push(attached);
        self.refresh_interface_stages();
        Ok(self.interfaces.last().expect("just pushed"))
    }

    fn refresh_interface_stages(&mut self) {
        let list =
            |f: &dyn Fn(&Attached) -> Option<String>| -> Vec<String> { self.interfaces.iter().filter_map(f).collect() };
        let xdp = list(&|a| a.xdp.as_ref().ok().map(|m| format!("{} ({m})", a.ifname)));
        let ti = list(&|a| a.tc_ingress.is_ok().then(|| a.ifname.clone()));
        let te = list(&|a| a.tc_egress.is_ok().then(|| a.ifname.clone()));
        let errs = |f: &dyn Fn(&Attached) -> Option<String>| list(f).join("; ");
        let mk = |kind: &str, ok: Vec<String>, err: String| StageHook {
            hook: if ok.is_empty() { format!("{kind} (not attached)") } else { format!("{kind} on {}", ok.join(", ")) },
            state: if ok.is_empty() {
                Err(if err.is_empty() { "no interface attached".into() } else { err })
            } else {
                Ok(())
            },
        };
        let xdp = mk("XDP", xdp, errs(&|a| a.xdp.as_ref().err().map(|e| format!("{}: {e}", a.ifname))));
        let ti = mk("tcx ingress", ti, errs(&|a| a.tc_ingress.as_ref().err().map(|e| format!("{}: {e}", a.ifname))));
        let te = mk("tcx egress", te, errs(&|a| a.tc_egress.as_ref().err().map(|e| format!("{}: {e}", a.ifname))));
        for (s, h) in [(Stage::Xdp, xdp), (Stage::TcIngress, ti), (Stage::TcEgress, te)] {
            if self.asked.contains(s) {
                self.stages.insert(s, h);
            } else {
                self.stages.remove(&s);
            }
        }
    }

    /// Finds attached interfaces that are gone (deleted, renumbered, or their namespace
    /// deleted): their links died with them. Marks each lost, takes its links out of the
    /// count and its stages off the list; returns one line per interface lost.
    pub fn check_interfaces(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        for a in self.interfaces.iter_mut().filter(|a| !a.lost) {
            let gone = a.netns.as_deref().is_some_and(|p| !p.exists())
                || match platform::netns::in_netns(a.netns.as_deref(), || {
                    let inode = platform::netns::netns_inode(Path::new("/proc/thread-self/ns/net")).unwrap_or(0);
                    Ok((inode, platform::interfaces::ifindex(&a.ifname)))
                }) {
                    Ok((inode, i)) => i != Some(a.ifindex) || (a.netns_inode != 0 && inode != a.netns_inode),
                    // Cannot look (no privileges left after --user): not known to be gone.
                    Err(_) => false,
                };
            if !gone {
                continue;
            }
            let ok = [a.xdp.is_ok(), a.tc_ingress.is_ok(), a.tc_egress.is_ok()].iter().filter(|o| **o).count();
            self.links -= ok;
            a.lost = true;
            let why = "interface deleted".to_string();
            a.xdp = Err(why.clone());
            a.tc_ingress = Err(why.clone());
            a.tc_egress = Err(why);
            let where_ = a.netns.as_ref().map(|p| format!("@{}", p.display())).unwrap_or_default();
            lines.push(format!("lost interface {}{where_}: its stages stop", a.ifname));
        }
        if !lines.is_empty() {
            self.refresh_interface_stages();
        }
        lines
    }

    /// Per stage, the runs of its programs that the kernel skipped (a BPF program was
    /// already running on that CPU): records never written, so lost. Read before
    /// `detach_all`.
    pub fn recursion_misses(&self) -> BTreeMap<Stage, u64> {
        let mut out = BTreeMap::new();
        let Some(ebpf) = self.ebpf.as_ref() else { return out };
        for (name, prog) in ebpf.programs() {
            let Some((_, stage)) = PROGRAM_STAGES.iter().find(|(n, _)| *n == name) else { continue };
            if let Ok(fd) = prog.fd() {
                use std::os::fd::AsFd;
                *out.entry(*stage).or_default() += recursion_misses(fd.as_fd());
            }
        }
        out
    }

    /// The run statistics' switch, for a sampler (`run::Running::start`).
    pub fn run_stats(&self) -> std::sync::Arc<std::sync::Mutex<RunStats>> {
        self.run_stats.clone()
    }

    /// How long the run statistics have been on since the tracer started.
    pub fn stats_sampled(&self) -> std::time::Duration {
        self.run_stats.lock().expect("run stats lock").sampled()
    }

    /// Every loaded program's runs and kernel time while the run statistics were on
    /// (`stats_sampled`) since the tracer started (None when they could not be turned on).
    pub fn program_costs(&self) -> Option<Vec<ProgramCost>> {
        if !self.run_stats.lock().expect("run stats lock").available() {
            return None;
        }
        let ebpf = self.ebpf.as_ref()?;
        let costs = ebpf
            .programs()
            .filter_map(|(name, prog)| {
                let info = prog.info().ok()?;
                let stage = PROGRAM_STAGES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
                Some(ProgramCost {
                    name: name.to_string(),
                    stage,
                    runs: info.run_count(),
                    ns: info.run_time().as_nanos() as u64,
                })
            })
            .filter(|c| c.runs > 0)
            .collect();
        Some(costs)
    }

    /// Is `ifname` in namespace `netns` attached (and not lost)?
    pub fn has_interface(&self, netns: Option<&Path>, ifname: &str) -> bool {
        self.interfaces.iter().any(|a| !a.lost && a.netns.as_deref() == netns && a.ifname == ifname)
    }

    /// What the correlator may expect to see, from what is attached.
    pub fn coverage(&self) -> crate::pipeline::correlate::Coverage {
        let mut c = crate::pipeline::correlate::Coverage::default();
        for (s, h) in &self.stages {
            if h.state.is_ok() && !s.is_per_interface() {
                c.global.insert(*s);
            }
        }
        for a in &self.interfaces {
            let key = (a.netns_inode, a.ifindex);
            if a.xdp.is_ok() {
                c.xdp.insert(key);
            }
            if a.tc_ingress.is_ok() {
                c.tc_ingress.insert(key);
            }
            if a.tc_egress.is_ok() {
                c.tc_egress.insert(key);
            }
        }
        c
    }

    /// Detaches and unloads every program. The rings, counters and filter stay readable.
    pub fn detach_all(&mut self) {
        let links = std::mem::take(&mut self.tp_links);
        std::thread::scope(|s| {
            for (_, l) in links {
                s.spawn(move || drop(l));
            }
        });
        self.ebpf = None;
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        self.ebpf.as_mut().expect("programs already detached")
    }
}

fn attach_xdp(x: &mut Xdp, ifindex: u32, choice: XdpChoice) -> Result<&'static str, String> {
    let try_mode =
        |x: &mut Xdp, mode: XdpMode| x.attach_to_if_index(ifindex, mode).map(|_| ()).map_err(|e| describe(&e));
    match choice {
        XdpChoice::Off => Err("disabled".into()),
        XdpChoice::Native => try_mode(x, XdpMode::Driver).map(|()| "native"),
        XdpChoice::Generic => try_mode(x, XdpMode::Skb).map(|()| "generic"),
        XdpChoice::Auto => match try_mode(x, XdpMode::Driver) {
            Ok(()) => Ok("native"),
            Err(native) => {
                try_mode(x, XdpMode::Skb).map(|()| "generic").map_err(|g| format!("native: {native}; generic: {g}"))
            }
        },
    }
}
