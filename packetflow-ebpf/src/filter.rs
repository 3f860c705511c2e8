//! The in-kernel filter: evaluated before any ring-buffer write.

use aya_ebpf::{
    helpers::{bpf_get_current_comm, generated::bpf_get_current_ancestor_cgroup_id},
    macros::map,
    maps::LruHashMap,
};
use packetflow_common::{
    Event, Filter, Kind, MAX_FILTER_HOSTS, MAX_FILTER_IFACES, MAX_FILTER_PORTS,
    config::{MAX_FILTER_PIDS, PROC_CGROUP, PROC_COMM, PROC_PIDS, PROTO_TCP, PROTO_UDP},
    event::F_V6,
};

/// Flows a process of the process filter (`--pid`, `--comm`, `--cgroup`) touched: by a
/// hash of the two endpoints and the protocol (the same for both directions). With a
/// process filter, only these flows are traced, at every stage.
#[map]
static OWNED: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65_536, 0);

#[inline(always)]
fn flow_key(ev: &Event) -> u64 {
    crate::summary::endpoint_hash(&ev.saddr, ev.sport)
        ^ crate::summary::endpoint_hash(&ev.daddr, ev.dport)
        ^ ev.is_udp() as u64
}

/// Process-context hooks: does the current process meet every process criterion?
/// (Tracing programs only: cgroup_skb may not call the task helpers on older kernels.)
#[inline(always)]
pub fn process_claims(f: &Filter, tgid: u32) -> bool {
    if f.procs & PROC_PIDS != 0 {
        let mut hit = false;
        for i in 0..MAX_FILTER_PIDS {
            if (i as u32) < f.npids && f.pids[i] == tgid {
                hit = true;
            }
        }
        if !hit {
            return false;
        }
    }
    if f.procs & PROC_COMM != 0 {
        match bpf_get_current_comm() {
            Ok(c) if c == f.comm => {}
            _ => return false,
        }
    }
    if f.procs & PROC_CGROUP != 0 {
        // The current task's ancestor at the filter cgroup's depth: the cgroup itself
        // for a task in it, one of its descendants' ancestors for the rest below it.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(f.cgroup_level as i32) };
        if id != f.cgroup_id {
            return false;
        }
    }
    true
}

/// `flow_matches` at a process-context hook of process `tgid`: a process the process
/// filter selects claims the flow first (from its first packet on, every stage of the
/// flow is traced, the other end's too).
#[inline(always)]
pub fn flow_matches_from(f: &Filter, ev: &Event, tgid: u32) -> bool {
    if f.procs != 0 && process_claims(f, tgid) {
        claim(ev);
    }
    flow_matches(f, ev)
}

/// Marks `ev`'s flow as one the process filter selects.
#[inline(always)]
pub fn claim(ev: &Event) {
    let _ = OWNED.insert(&flow_key(ev), &1, 0);
}

/// Both arrays sit at 8-byte aligned offsets of their structs, so word loads are safe.
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let a = a.as_ptr().cast::<u32>();
    let b = b.as_ptr().cast::<u32>();
    unsafe { (*a ^ *b) | (*a.add(1) ^ *b.add(1)) | (*a.add(2) ^ *b.add(2)) | (*a.add(3) ^ *b.add(3)) == 0 }
}

/// Protocol, ports, hosts and sampling: the criteria every hook can check.
#[inline(always)]
pub fn flow_matches(f: &Filter, ev: &Event) -> bool {
    if f.sample > 1 {
        // Symmetric in the two endpoints: a connection's two directions go together.
        let h = crate::summary::endpoint_hash(&ev.saddr, ev.sport) ^ crate::summary::endpoint_hash(&ev.daddr, ev.dport);
        let h = (h ^ f.sample_seed as u64).wrapping_mul(0x94d0_49bb_1331_11eb);
        if ((h >> 32) as u32) % f.sample != 0 {
            return false;
        }
    }
    let bit = if ev.is_udp() { PROTO_UDP } else { PROTO_TCP };
    if f.protos & bit == 0 {
        return false;
    }
    if f.nports != 0 {
        let mut hit = false;
        for i in 0..MAX_FILTER_PORTS {
            if (i as u32) < f.nports && (f.ports[i] == ev.sport || f.ports[i] == ev.dport) {
                hit = true;
            }
        }
        if !hit {
            return false;
        }
    }
    if f.nhosts != 0 {
        let v6 = (ev.flags & F_V6 != 0) as u8;
        let mut hit = false;
        for i in 0..MAX_FILTER_HOSTS {
            if (i as u32) < f.nhosts
                && f.host_v6[i] == v6
                && (same_addr(&f.hosts[i], &ev.saddr) || same_addr(&f.hosts[i], &ev.daddr))
            {
                hit = true;
            }
        }
        if !hit {
            return false;
        }
    }
    if f.procs != 0 && unsafe { OWNED.get(&flow_key(ev)) }.is_none() {
        return false;
    }
    true
}

/// Segments without payload are traced only when control tracing is on.
#[inline(always)]
pub fn kind_wanted(f: &Filter, ev: &Event) -> bool {
    ev.kind() == Kind::Data || f.control != 0
}

/// Device stages: the interface filter.
#[inline(always)]
pub fn iface_matches(f: &Filter, ifindex: u32) -> bool {
    if f.nifaces == 0 {
        return true;
    }
    let mut hit = false;
    for i in 0..MAX_FILTER_IFACES {
        if (i as u32) < f.nifaces && f.ifaces[i] == ifindex {
            hit = true;
        }
    }
    hit
}

/// Process-context stages: never the tracer itself. (Process filters act through the
/// flows their processes claim: `flow_matches_from`.)
#[inline(always)]
pub fn process_wanted(f: &Filter, tgid: u32) -> bool {
    tgid != f.own_tgid
}
