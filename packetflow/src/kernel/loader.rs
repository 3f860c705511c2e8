//! Loading the embedded eBPF object: [`Tracer::load`] with this kernel's struct offsets
//! (from BTF), the rings and maps taken out of the object, the filter and capture
//! settings, and detaching everything. Which hook serves each stage is in `hooks.rs`,
//! the per-interface programs in `interfaces.rs`, reading the maps back in `readout.rs`.
//!
//! Every attachment is a bpf_link (tracepoints, tp_btf, cgroup, tcx, XDP link): the kernel
//! detaches it when the last fd closes, so even SIGKILL leaves nothing behind. Nothing is
//! pinned. [`Tracer`] owns the object; dropping it detaches everything.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::ProgramError,
};
use packetflow_common::{
    Filter, Offsets, RING_SHARDS, Stage,
    capture::CaptureConfig,
    config::{PROTO_TCP, PROTO_UDP},
    summary::HIST_BUCKETS,
};

use crate::{
    error::user,
    kernel::{
        btf::Btf,
        hooks::{AttachedGroup, Group, StageHook},
        interfaces::Attached,
        run_stats::RunStats,
    },
    model::stage_set::StageSet,
    platform,
};

/// The compiled `packetflow-ebpf` object, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/packetflow"));

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

/// The loaded object and what is attached. Its methods sit beside what they handle:
/// `hooks.rs` and `hook_kinds.rs` (global hooks), `interfaces.rs` (XDP, tcx), `readout.rs`
/// (maps read back), `run_stats.rs` (the tracer's own cost).
pub struct Tracer {
    /// `None` once detached.
    pub(super) ebpf: Option<Ebpf>,
    /// Taken out of the object at load, so they outlive the programs.
    pub(super) counters: PerCpuArray<MapData, u64>,
    filter: Array<MapData, Filter>,
    capture: Array<MapData, CaptureConfig>,
    pub(super) hist: PerCpuArray<MapData, [u64; HIST_BUCKETS]>,
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
    pub(super) tp_links: Vec<(&'static str, aya::programs::trace_point::TracePointLink)>,
    /// The global hook groups attached.
    pub(super) groups: BTreeMap<Group, AttachedGroup>,
    /// The kernel's BTF for loading tp_btf programs: tens of MiB parsed, so dropped once
    /// the kernel hooks are attached (and read again if ever needed).
    pub(super) btf: Option<aya::Btf>,
    /// The kernel's per-program run statistics, on while the tracer lives or sampled.
    pub(super) run_stats: std::sync::Arc<std::sync::Mutex<RunStats>>,
    /// The connection hooks (`attach_connections`), per handshake step; empty when
    /// connections are not traced.
    pub conn_hooks: Vec<crate::kernel::connections::ConnHookState>,
    /// The drop and retransmission hooks (`attach_drops`); empty until attached.
    pub drop_hooks: Vec<crate::kernel::drops::DropHookState>,
    /// This kernel's drop reasons (from BTF).
    pub drop_reasons: std::sync::Arc<crate::kernel::drops::DropReasons>,
    /// Summary mode's drop counts (`kernel_drops`).
    pub(super) drop_counts: Option<PerCpuArray<MapData, u64>>,
    /// Summary mode's retransmits by port (`Tracer::kernel_retransmits`).
    pub(super) retrans_counts: Option<aya::maps::HashMap<MapData, u32, u64>>,
}

/// A program error with its causes, or a load error with the verifier log's last lines.
pub(crate) fn describe(e: &ProgramError) -> String {
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
        let drop_reasons = crate::kernel::drops::DropReasons::from_btf(&btf);
        let consumed = drop_reasons.consumed.unwrap_or(u32::MAX);
        // The wake functions whose wait entries hold the waiting task (probes/sched.rs).
        let [a, b, c, d, e, ep_poll_callback] = crate::kernel::drops::kallsyms_addrs([
            "woken_wake_function",
            "receiver_wake_function",
            "autoremove_wake_function",
            "default_wake_function",
            "ep_autoremove_wake_function",
            "ep_poll_callback",
        ]);
        let wake_fns = [a, b, c, d, e];
        drop(btf);
        let aya_btf = aya::Btf::from_sys_fs().context("reading kernel BTF")?;
        let ring_bytes = opts.ring_bytes.max(4096).next_power_of_two();
        let wake = u64::from(ring_bytes / 4);
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
            .override_global("IDLE", &idle, true)
            .override_global("SKB_CONSUMED", &consumed, true)
            .override_global("WAKE_FNS", &wake_fns, true)
            .override_global("EP_POLL_CALLBACK", &ep_poll_callback, true);
        let cap_bytes =
            if opts.capture_ring_bytes == 0 { 4096 } else { opts.capture_ring_bytes.max(1 << 20).next_power_of_two() };
        // The capture shards wake their reader by their own size: with the trace rings'
        // threshold (1 KiB when `capture` runs without --stages) every seventh small
        // packet was a wake-up, and the reader's wake-ups starved the traffic it captured.
        let cap_wake = u64::from(cap_bytes / 4);
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
        let drop_counts = ebpf.take_map("DROP_COUNTS").map(PerCpuArray::try_from).transpose()?;
        let retrans_counts = ebpf.take_map("RETRANS_COUNTS").map(aya::maps::HashMap::try_from).transpose()?;
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
            conn_hooks: Vec::new(),
            drop_hooks: Vec::new(),
            drop_reasons: std::sync::Arc::new(drop_reasons),
            drop_counts,
            retrans_counts,
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

    /// The ring-buffer shards, for the reader (taken out of the object).
    pub fn take_rings(&mut self) -> Result<Vec<(usize, RingBuf<MapData>)>> {
        let mut out = Vec::new();
        for s in self.used_shards.clone() {
            let map = self.ebpf_mut().take_map(ring_name(s)).ok_or_else(|| anyhow!("{} missing", ring_name(s)))?;
            out.push((s, RingBuf::try_from(map)?));
        }
        Ok(out)
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
