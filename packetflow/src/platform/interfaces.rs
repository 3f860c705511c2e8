//! Interfaces of the current thread's network namespace: index, name, list.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::netns::in_netns;
use crate::user_bail;

/// Index of interface `name` in the current thread's namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a NUL-terminated CString that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Name of interface `index` in the current thread's namespace.
pub fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname(3) may write.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname(3) returned `p` = `buf`, NUL-terminated within its IF_NAMESIZE bytes.
    Some(unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Interfaces of the current thread's namespace: (index, name, is-loopback).
pub fn interfaces() -> Vec<(u32, String, bool)> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs(3) writes a list head into `ifap`; freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut ifap) } != 0 {
        return out;
    }
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: `p` walks the list getifaddrs(3) returned, non-null here, not yet freed.
        let ifa = unsafe { &*p };
        // SAFETY: each entry of the getifaddrs(3) list has a NUL-terminated name, alive until
        // freeifaddrs.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        if !out.iter().any(|(_, n, _): &(u32, String, bool)| *n == name)
            && let Some(i) = ifindex(&name)
        {
            out.push((i, name, ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0));
        }
        p = ifa.ifa_next;
    }
    // SAFETY: `ifap` came from getifaddrs(3) and is freed once; no reference into it survives.
    unsafe { libc::freeifaddrs(ifap) };
    out.sort();
    out
}

/// An interface as `-i` named it, found.
#[derive(Clone, Debug)]
pub struct Named {
    /// Its network namespace (`None`: ours).
    pub netns: Option<PathBuf>,
    pub name: String,
    pub index: u32,
    pub loopback: bool,
    /// Found through `any`, not by its name.
    pub via_any: bool,
}

/// The interfaces `specs` name: IFACE or IFACE@NETNS (a name in /run/netns, or a path),
/// `any` or `any@NETNS` for every interface of a namespace; `netns` is the namespace of a
/// spec without @. Unknown interfaces and namespaces are user errors.
pub fn find(specs: &[String], netns: Option<&Path>) -> Result<Vec<Named>> {
    let mut out = Vec::new();
    for spec in specs {
        let (name, ns) = match spec.split_once('@') {
            Some((n, ns)) => (n.to_string(), Some(super::netns::path(ns))),
            None => (spec.clone(), netns.map(PathBuf::from)),
        };
        if let Some(p) = &ns
            && !p.exists()
        {
            user_bail!("network namespace {} does not exist", p.display());
        }
        let all = in_netns(ns.as_deref(), || Ok(interfaces()))?;
        let found = |(index, name, loopback): (u32, String, bool), via_any| Named {
            netns: ns.clone(),
            name,
            index,
            loopback,
            via_any,
        };
        if name == "any" {
            out.extend(all.into_iter().map(|i| found(i, true)));
            continue;
        }
        let Some(i) = all.into_iter().find(|(_, n, _)| *n == name) else {
            let where_ = ns.as_ref().map(|p| format!(" in network namespace {}", p.display())).unwrap_or_default();
            user_bail!("unknown interface '{name}'{where_}");
        };
        out.push(found(i, false));
    }
    Ok(out)
}

/// What the tracer attaches to (`find`; loopback when nothing is named), and the indexes
/// the device stages are limited to: those named, none for `any` or the default.
#[allow(clippy::type_complexity)]
pub fn resolve(named: &[String], netns: Option<&Path>) -> Result<(Vec<(Option<PathBuf>, String)>, Vec<u32>)> {
    let specs: Vec<String> = if named.is_empty() { vec!["lo".into()] } else { named.to_vec() };
    let found = find(&specs, netns)?;
    let ifindexes =
        if named.is_empty() { Vec::new() } else { found.iter().filter(|n| !n.via_any).map(|n| n.index).collect() };
    Ok((found.into_iter().map(|n| (n.netns, n.name)).collect(), ifindexes))
}

/// The namespaces that `-i any` (or `any@NETNS`) names, for `RunOptions::any_in`.
pub fn any_namespaces(named: &[String], netns: Option<&std::path::Path>) -> Vec<Option<PathBuf>> {
    named
        .iter()
        .filter_map(|spec| match spec.split_once('@') {
            Some(("any", ns)) => Some(Some(super::netns::path(ns))),
            None if spec == "any" => Some(netns.map(PathBuf::from)),
            _ => None,
        })
        .collect()
}

/// ioctl `req` on an `ifreq` naming `ifname` (after `fill` set its other fields), in the
/// calling thread's network namespace: the ifreq the kernel filled, or None.
pub fn ifreq(ifname: &str, req: libc::c_ulong, fill: impl FnOnce(&mut libc::ifreq)) -> Option<libc::ifreq> {
    // SAFETY: a zeroed ifreq (valid as all zeros) naming the interface, filled by the
    // kernel; the socket is ours and closed before returning.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return None;
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, b) in ifr.ifr_name.iter_mut().zip(ifname.bytes().take(libc::IFNAMSIZ - 1)) {
            *d = b as libc::c_char;
        }
        fill(&mut ifr);
        let r = libc::ioctl(s, req as _, &raw mut ifr);
        libc::close(s);
        (r >= 0).then_some(ifr)
    }
}
