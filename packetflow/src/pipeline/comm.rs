//! A small cache of process names (`/proc/PID/comm`) and cgroup v2 paths
//! (`/proc/PID/cgroup`) for the processes seen at the process stages, read once per
//! process while it most likely still runs.

use rustc_hash::FxHashMap as HashMap;

/// Command names and cgroups by process id (`None`: the process had gone or the file
/// was unreadable).
#[derive(Default)]
pub struct CommCache {
    names: HashMap<u32, (Option<String>, Option<String>)>,
}

impl CommCache {
    /// Reads the name of `pid` unless it was read before. Past 65,536 processes the
    /// cache starts again empty.
    pub fn note(&mut self, pid: u32) {
        if self.names.contains_key(&pid) {
            return;
        }
        if self.names.len() > 65_536 {
            self.names.clear();
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end().to_string());
        self.names.insert(pid, (comm, crate::platform::cgroup::of_process(pid)));
    }

    /// The name read for `pid`, if any.
    pub fn get(&self, pid: u32) -> Option<String> {
        self.names.get(&pid).and_then(|n| n.0.clone())
    }

    /// The cgroup v2 path read for `pid`, if any.
    pub fn cgroup(&self, pid: u32) -> Option<String> {
        self.names.get(&pid).and_then(|n| n.1.clone())
    }
}
