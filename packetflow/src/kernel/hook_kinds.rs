//! The ways a global hook is attached: a tracepoint, a tp_btf program, a kprobe or a
//! cgroup_skb program (`Hook`), trying a group's hooks in order (`Tracer::first_of`),
//! and unloading a program when its group goes.

use std::path::Path;

use aya::programs::{
    BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, KProbe, ProgramError, TracePoint,
};

use crate::{
    kernel::loader::{Tracer, describe},
    platform,
};

/// One way to serve a hook: a tp_btf program on a tracepoint, a kprobe on kernel
/// functions, or a cgroup_skb program on the root cgroup.
pub(super) enum Hook {
    TpBtf(&'static str, &'static str),
    Kprobe(&'static str, &'static [&'static str]),
    Cgroup(&'static str, CgroupSkbAttachType),
}

impl Hook {
    pub(super) fn program(&self) -> &'static str {
        match self {
            Hook::TpBtf(p, _) | Hook::Kprobe(p, _) | Hook::Cgroup(p, _) => p,
        }
    }

    fn describe(&self) -> String {
        match self {
            Hook::TpBtf(_, tp) => format!("tp_btf {tp}"),
            Hook::Kprobe(_, funcs) => format!("kprobe {}", funcs.join("/")),
            Hook::Cgroup("pf_cg_egress_nopid", _) => "cgroup_skb/egress (sender from the send-syscall note)".into(),
            Hook::Cgroup(_, CgroupSkbAttachType::Egress) => "cgroup_skb/egress".into(),
            Hook::Cgroup(_, _) => "cgroup_skb/ingress".into(),
        }
    }
}

impl Tracer {
    /// Program `prog` of the object, as its type.
    fn program<'a, T>(&'a mut self, prog: &str) -> Result<&'a mut T, String>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let p = self.ebpf_mut().program_mut(prog).ok_or("program missing")?;
        p.try_into().map_err(|e: ProgramError| e.to_string())
    }

    pub(super) fn tracepoint(&mut self, prog: &'static str, category: &str, names: &[String]) -> Result<(), String> {
        let p: &mut TracePoint = self.program(prog)?;
        p.load().map_err(|e| describe(&e))?;
        let mut links = Vec::new();
        let mut r = Ok(());
        for n in names {
            match p.attach(category, n).and_then(|id| p.take_link(id)) {
                Ok(l) => links.push(l),
                Err(e) => {
                    r = Err(format!("{category}:{n}: {}", describe(&e)));
                    break;
                }
            }
        }
        self.links += links.len();
        self.tp_links.extend(links.into_iter().map(|l| (prog, l)));
        r
    }

    fn tp_btf(&mut self, prog: &str, tp: &str) -> Result<(), String> {
        if self.btf.is_none() {
            self.btf = Some(aya::Btf::from_sys_fs().map_err(|e| format!("reading kernel BTF: {e}"))?);
        }
        let btf = self.btf.as_ref().expect("just read");
        let p: &mut BtfTracePoint = self
            .ebpf
            .as_mut()
            .ok_or("detached")?
            .program_mut(prog)
            .ok_or("program missing")?
            .try_into()
            .map_err(|e: ProgramError| e.to_string())?;
        let t0 = std::time::Instant::now();
        p.load(tp, btf).map_err(|e| describe(&e))?;
        if std::env::var_os("PACKETFLOW_DEBUG_LOAD").is_some() {
            eprintln!("loaded {prog} in {:?}", t0.elapsed());
        }
        p.attach().map_err(|e| describe(&e))?;
        self.links += 1;
        Ok(())
    }

    /// Tries `hooks` in order; returns the description of the one that attached (or of
    /// the first, when none did) and the outcome, with every failure's reason.
    pub(super) fn first_of(&mut self, hooks: &[Hook]) -> (String, Result<(), String>) {
        let mut errs = Vec::new();
        for h in hooks {
            let r = match h {
                Hook::TpBtf(prog, tp) => self.tp_btf(prog, tp),
                Hook::Kprobe(prog, funcs) => self.kprobe(prog, funcs),
                Hook::Cgroup(prog, kind) => self.cgroup(prog, *kind),
            };
            match r {
                Ok(()) => return (h.describe(), Ok(())),
                Err(e) if hooks.len() == 1 => errs.push(e),
                Err(e) => errs.push(format!("{}: {e}", h.describe())),
            }
        }
        (hooks.first().map(Hook::describe).unwrap_or_default(), Err(errs.join("; ")))
    }

    /// Loads kprobe `prog` and attaches it to each of `funcs` (all must attach).
    fn kprobe(&mut self, prog: &str, funcs: &[&str]) -> Result<(), String> {
        let p: &mut KProbe = self.program(prog)?;
        p.load().map_err(|e| describe(&e))?;
        let mut n = 0;
        let mut r = Ok(());
        for f in funcs {
            match p.attach(f, 0) {
                Ok(_) => n += 1,
                Err(_) if !Path::new("/sys/bus/event_source/devices/kprobe").exists() => {
                    r = Err("this kernel has no kprobes (no kprobe event source: CONFIG_KPROBES off)".into());
                    break;
                }
                Err(e) => {
                    r = Err(format!("{f}: {}", describe(&e)));
                    break;
                }
            }
        }
        self.links += n;
        r
    }

    fn cgroup(&mut self, prog: &str, kind: CgroupSkbAttachType) -> Result<(), String> {
        let root = platform::mounts::ensure_cgroup2().map_err(|e| format!("{e:#}"))?;
        let fd = std::fs::File::open(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let p: &mut CgroupSkb = self.program(prog)?;
        p.load().map_err(|e| describe(&e))?;
        // With bpf_link every attachment coexists; link_create takes no mode flags.
        p.attach(&fd, kind, CgroupAttachMode::Single).map_err(|e| describe(&e))?;
        self.links += 1;
        Ok(())
    }

    /// Detaches and unloads program `name` (its links go with it).
    pub(super) fn unload(&mut self, name: &'static str) {
        self.tp_links.retain(|(n, _)| *n != name);
        let Some(p) = self.ebpf.as_mut().and_then(|e| e.program_mut(name)) else { return };
        if p.fd().is_err() {
            return;
        }
        // Only fails for a program that is not loaded.
        let _ = match p {
            aya::programs::Program::TracePoint(p) => p.unload(),
            aya::programs::Program::BtfTracePoint(p) => p.unload(),
            aya::programs::Program::KProbe(p) => p.unload(),
            aya::programs::Program::CgroupSkb(p) => p.unload(),
            _ => Ok(()),
        };
    }
}
