//! Interface names for (netns inode, ifindex) pairs, looked up once and cached.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use crate::{kernel::interfaces::Attached, model::trace::Device, platform};

#[derive(Default)]
pub struct Names {
    ifnames: HashMap<Device, String>,
    own_netns: u32,
    netns_paths: HashMap<u32, PathBuf>,
}

impl Names {
    pub fn new(attached: &[Attached]) -> Names {
        let mut n = Names {
            own_netns: platform::netns::netns_inode(Path::new("/proc/self/ns/net")).unwrap_or(0),
            ..Default::default()
        };
        for a in attached {
            n.ifnames.insert(Device { netns: a.netns_inode, ifindex: a.ifindex }, a.ifname.clone());
            if let Some(p) = &a.netns {
                n.netns_paths.insert(a.netns_inode, p.clone());
            }
        }
        n
    }

    /// Registers a named network namespace (e.g. a test host) for name lookups.
    pub fn add_netns(&mut self, path: &Path) {
        if let Some(i) = platform::netns::netns_inode(path) {
            self.netns_paths.insert(i, path.to_path_buf());
        }
    }

    fn find_netns(&mut self, inode: u32) -> Option<PathBuf> {
        if let Some(p) = self.netns_paths.get(&inode) {
            return Some(p.clone());
        }
        let dir = std::fs::read_dir("/run/netns").ok()?;
        for e in dir.flatten() {
            if platform::netns::netns_inode(&e.path()) == Some(inode) {
                self.netns_paths.insert(inode, e.path());
                return Some(e.path());
            }
        }
        None
    }

    pub fn ifname(&mut self, dev: Device) -> String {
        let Device { netns, ifindex } = dev;
        if let Some(n) = self.ifnames.get(&dev) {
            return n.clone();
        }
        let name = if netns == 0 || netns == self.own_netns {
            platform::interfaces::ifname(ifindex)
        } else {
            self.find_netns(netns).and_then(|p| {
                platform::netns::in_netns(Some(&p), move || Ok(platform::interfaces::ifname(ifindex))).ok().flatten()
            })
        };
        let name = name.unwrap_or_else(|| format!("if{ifindex}"));
        self.ifnames.insert(dev, name.clone());
        name
    }
}
