//! Reading the kernel's maps back: the counters, capture losses, the summary-mode
//! histograms as [`Stats`](crate::model::stats::Stats), the runs the kernel skipped
//! (recursion misses), and the coverage the correlator may expect from what is attached.

use std::collections::BTreeMap;

use anyhow::Result;
use packetflow_common::{Stage, counters::NUM_COUNTERS};

use crate::kernel::{hooks::PROGRAM_STAGES, loader::Tracer};

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

impl Tracer {
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
            return std::collections::HashMap::default();
        };
        let Ok(h) = aya::maps::HashMap::<_, u32, u64>::try_from(m) else {
            return std::collections::HashMap::default();
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

    /// What the correlator may expect to see, from what is attached.
    pub fn coverage(&self) -> crate::pipeline::correlate::Coverage {
        let mut c = crate::pipeline::correlate::Coverage::default();
        for (s, h) in &self.stages {
            if h.state.is_ok() && !s.is_per_interface() {
                c.global.insert(*s);
            }
        }
        for a in &self.interfaces {
            let key = crate::model::trace::Device { netns: a.netns_inode, ifindex: a.ifindex };
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
}
