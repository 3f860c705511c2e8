//! Drops and retransmissions seen from userspace: the two hooks (skb:kfree_skb and
//! tcp:tcp_retransmit_skb, both tp_btf; programs in packetflow-ebpf/src/probes/drops.rs),
//! the names of the kernel's drop reasons (its BTF's `enum skb_drop_reason`, read at
//! start) and of the code that dropped (/proc/kallsyms), and summary mode's in-kernel
//! drop counts. docs/drops.md says what a drop record carries and how a trace gets it.

use std::collections::HashMap;

use packetflow_common::{
    Stage,
    drop::{DROP_REASON_SLOTS, DROP_STAGE_SLOTS},
};

use crate::kernel::{btf::Btf, hook_kinds::Hook, loader::Tracer};

/// The kernel's drop reasons by value, names without the `SKB_DROP_REASON_` prefix.
#[derive(Clone, Debug, Default)]
pub struct DropReasons {
    names: HashMap<u32, String>,
    /// `SKB_CONSUMED`'s value (kernels before 6.3 have none).
    pub consumed: Option<u32>,
}

impl DropReasons {
    pub fn from_btf(btf: &Btf) -> DropReasons {
        let mut r = DropReasons::default();
        for (v, name) in btf.enum_values("skb_drop_reason") {
            if name == "SKB_CONSUMED" {
                r.consumed = Some(v);
            }
            let short = name.strip_prefix("SKB_DROP_REASON_").or(name.strip_prefix("SKB_")).unwrap_or(&name);
            r.names.insert(v, short.to_string());
        }
        r
    }

    /// The reason's name; a value this kernel's enum lacks (a subsystem's reason, with
    /// its id in the upper 16 bits) as `SUBSYS_<id>_<n>`, else as its number.
    pub fn name(&self, v: u32) -> String {
        match self.names.get(&v) {
            Some(n) => n.clone(),
            None if v >> 16 != 0 => format!("SUBSYS_{}_{}", v >> 16, v & 0xffff),
            None => format!("REASON_{v}"),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Kernel addresses to `symbol+0xoffset`, from /proc/kallsyms, one scan of the file per
/// address not seen before (a run meets few drop sites; the file is 120k lines here, 30
/// ms to read), cached. Without readable addresses (kptr_restrict), the address in hex.
#[derive(Default)]
pub struct Symbols {
    cache: HashMap<u64, String>,
}

/// Addresses kept at most; past this, new ones print in hex.
const MAX_SYMBOLS: usize = 4096;

impl Symbols {
    pub fn name(&mut self, addr: u64) -> String {
        if let Some(n) = self.cache.get(&addr) {
            return n.clone();
        }
        let n = if self.cache.len() < MAX_SYMBOLS { lookup(addr) } else { None };
        let n = n.unwrap_or_else(|| format!("{addr:#x}"));
        if self.cache.len() < MAX_SYMBOLS {
            self.cache.insert(addr, n.clone());
        }
        n
    }
}

/// /proc/kallsyms, read whole (None when unreadable).
fn kallsyms() -> Option<String> {
    std::fs::read_to_string("/proc/kallsyms").ok()
}

/// (address, type letter, name) of each line of /proc/kallsyms' text.
fn symbols(text: &str) -> impl Iterator<Item = (u64, &str, &str)> {
    text.lines().filter_map(|line| {
        let mut f = line.split_ascii_whitespace();
        let (a, kind, name) = (f.next()?, f.next()?, f.next()?);
        Some((u64::from_str_radix(a, 16).ok()?, kind, name))
    })
}

/// The text symbol at or below `addr` in /proc/kallsyms.
fn lookup(addr: u64) -> Option<String> {
    let text = kallsyms()?;
    let (a, name) = symbols(&text)
        .filter(|(a, kind, _)| matches!(*kind, "t" | "T") && *a != 0 && *a <= addr)
        // The highest address; of several names at it, the first in the file.
        .min_by_key(|(a, _, _)| std::cmp::Reverse(*a))
        .map(|(a, _, name)| (a, name))?;
    // Past any function by a megabyte: not a text address this file knows.
    (addr - a < 1 << 20).then(|| format!("{name}+{:#x}", addr - a))
}

/// The addresses of `names` in /proc/kallsyms (0 for a name not found or an address
/// hidden by kptr_restrict).
pub fn kallsyms_addrs<const N: usize>(names: [&str; N]) -> [u64; N] {
    let mut out = [0u64; N];
    let Some(text) = kallsyms() else { return out };
    for (a, _, name) in symbols(&text) {
        if let Some(i) = names.iter().position(|n| *n == name) {
            out[i] = a;
        }
    }
    out
}

/// The drop and retransmission hooks, and how each attached.
#[derive(Clone, Debug)]
pub struct DropHookState {
    pub what: &'static str,
    pub hook: String,
    pub state: Result<(), String>,
}

const HOOKS: [(&str, Hook); 2] =
    [("drops", Hook::TpBtf("pf_drop", "kfree_skb")), ("retransmits", Hook::TpBtf("pf_retrans", "tcp_retransmit_skb"))];

impl Tracer {
    /// Attaches the drop and retransmission hooks; one that fails is said in
    /// `drop_hooks` (doctor, the run's start lines), never fails the run.
    pub fn attach_drops(&mut self) {
        self.drop_hooks = HOOKS
            .iter()
            .map(|(what, h)| {
                let (hook, state) = self.first_of(std::slice::from_ref(h));
                DropHookState { what, hook, state }
            })
            .collect();
    }

    /// `capture --drops`: the capture's drop program (probes/capture.rs `pf_cap_drop`).
    pub fn attach_capture_drops(&mut self) -> Result<(), String> {
        self.first_of(&[Hook::TpBtf("pf_cap_drop", "kfree_skb")]).1
    }

    /// One line per drop or retransmission hook this kernel cannot serve.
    pub fn drops_unavailable(&self) -> Vec<String> {
        self.drop_hooks
            .iter()
            .filter_map(|h| h.state.as_ref().err().map(|e| format!("{} not traced ({}): {e}", h.what, h.hook)))
            .collect()
    }

    /// Summary mode's drop counts, summed over CPUs: (reason, last stage reached) → count.
    pub fn kernel_drops(&self) -> Vec<(u32, Option<Stage>, u64)> {
        let Some(map) = &self.drop_counts else { return Vec::new() };
        let mut out = Vec::new();
        for i in 0..DROP_REASON_SLOTS * DROP_STAGE_SLOTS {
            let Ok(v) = map.get(&i, 0) else { continue };
            let n: u64 = v.iter().sum();
            if n > 0 {
                let stage = Stage::from_u8((i % DROP_STAGE_SLOTS) as u8);
                out.push((i / DROP_STAGE_SLOTS, stage, n));
            }
        }
        out
    }

    /// Summary mode's retransmits: (the flow's lower port, segments); port 0 holds those
    /// beyond the ports counted apart.
    pub fn kernel_retransmits(&self) -> Vec<(u16, u64)> {
        let Some(map) = &self.retrans_counts else { return Vec::new() };
        map.iter().flatten().map(|(port, n)| (port as u16, n)).collect()
    }
}

/// Names a drop record's reason and location (`PacketDrop`).
#[derive(Default)]
pub struct DropNamer {
    pub reasons: std::sync::Arc<DropReasons>,
    pub symbols: Symbols,
}

impl DropNamer {
    pub fn new(reasons: std::sync::Arc<DropReasons>) -> DropNamer {
        DropNamer { reasons, symbols: Symbols::default() }
    }

    pub fn reason(&self, v: u32) -> String {
        self.reasons.name(v)
    }

    pub fn location(&mut self, addr: u64) -> String {
        self.symbols.name(addr)
    }
}
