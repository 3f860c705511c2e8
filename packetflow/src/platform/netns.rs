//! Network namespaces: their inodes, and running code inside one.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::Result;

use crate::error::user;

/// Inode of a network namespace file (`/proc/self/ns/net`, `/run/netns/NAME`).
pub fn netns_inode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino() as u32)
}

/// Runs `f` on a thread that has joined the network namespace at `ns` (the calling
/// thread's namespace is untouched). `None` runs it in the current namespace.
pub fn in_netns<T: Send>(ns: Option<&Path>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let Some(ns) = ns else { return f() };
    let file = File::open(ns).map_err(|e| user(format!("cannot open network namespace {}: {e}", ns.display())))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns(2) on a thread of our own that only runs `f` and ends: the caller's
            // thread keeps its namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(user(format!("cannot enter network namespace {}: {e}", ns.display())));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("thread in network namespace {} panicked", ns.display())))
    })
}

/// A namespace given by name (in /run/netns) or by path.
pub fn path(s: &str) -> PathBuf {
    if s.contains('/') { PathBuf::from(s) } else { PathBuf::from("/run/netns").join(s) }
}
