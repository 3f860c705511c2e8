//! The in-kernel filter: evaluated before any ring-buffer write.

use packetflow_common::{
    Event, Filter, Kind, MAX_FILTER_HOSTS, MAX_FILTER_IFACES, MAX_FILTER_PORTS,
    config::{PROTO_TCP, PROTO_UDP},
    event::F_V6,
};

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

/// Process-context stages: never the tracer itself; only `--pid` when given.
#[inline(always)]
pub fn process_wanted(f: &Filter, tgid: u32) -> bool {
    tgid != f.own_tgid && (f.pid == 0 || f.pid == tgid)
}
