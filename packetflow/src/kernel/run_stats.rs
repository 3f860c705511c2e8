//! The tracer's own cost: switching the kernel's BPF run statistics ([`RunStats`]) and
//! reading each program's runs and kernel time ([`ProgramCost`]).

use packetflow_common::Stage;

use crate::kernel::{hooks::PROGRAM_STAGES, loader::Tracer};

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
    pub(super) fn start() -> RunStats {
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

impl Tracer {
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
}
