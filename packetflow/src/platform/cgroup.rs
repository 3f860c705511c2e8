//! cgroup v2 for the process filters: `--cgroup PATH` resolved to the id the kernel
//! compares (the cgroup directory's inode) and its depth, a process's cgroup path (for
//! traces), and the cgroup `trace -- CMD` runs its command in.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::Result;

use crate::{error::user, platform::mounts, user_bail};

/// A cgroup v2: its path below the hierarchy's root ("/system.slice/nginx.service"), its
/// id (the directory's inode: what bpf_get_current_cgroup_id returns) and depth (root 0).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Cgroup {
    pub path: String,
    pub id: u64,
    pub level: u32,
}

impl Cgroup {
    /// `PATH` as the user gives it: a directory of the cgroup2 mount
    /// (/sys/fs/cgroup/system.slice/x.service) or a path below its root, as
    /// /proc/PID/cgroup writes it (/system.slice/x.service).
    pub fn resolve(path: &Path) -> Result<Cgroup> {
        let root = mounts::ensure_cgroup2()?;
        let rel = match path.strip_prefix(&root) {
            Ok(r) => r.to_path_buf(),
            Err(_) => path.strip_prefix("/").unwrap_or(path).to_path_buf(),
        };
        let dir = root.join(&rel);
        let meta = std::fs::metadata(&dir).map_err(|e| {
            user(format!(
                "--cgroup {}: no such cgroup under the cgroup2 hierarchy at {} ({e})",
                path.display(),
                root.display()
            ))
        })?;
        if !meta.is_dir() || !dir.join("cgroup.procs").exists() {
            user_bail!("--cgroup {}: {} is not a cgroup v2 directory", path.display(), dir.display());
        }
        let level = rel.components().count() as u32;
        Ok(Cgroup { path: format!("/{}", rel.display()), id: meta.ino(), level })
    }

    /// A new cgroup for `trace -- CMD`: packetflow-trace-PID below the root.
    pub fn create_for_command() -> Result<(Cgroup, PathBuf)> {
        let root = mounts::ensure_cgroup2()?;
        let dir = root.join(format!("packetflow-trace-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| user(format!("cannot create the cgroup {}: {e}", dir.display())))?;
        let cg = Cgroup::resolve(&dir)?;
        Ok((cg, dir))
    }
}

/// The cgroup v2 path of process `pid` ("/user.slice/session-2.scope"), from
/// /proc/PID/cgroup's "0::" line.
pub fn of_process(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}
