//! The programs attached per interface: XDP (native where the driver has it, else
//! generic) and tcx ingress/egress, for the tracer or for capture ([`Role`]); the stage
//! rows they serve, and finding interfaces that went away.

use std::path::Path;

use anyhow::{Result, anyhow};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode, tc::TcAttachOptions};
use packetflow_common::Stage;

use crate::{
    kernel::{
        hooks::StageHook,
        loader::{Tracer, describe},
    },
    platform,
};

/// XDP and TC on one interface.
#[derive(Clone, Debug)]
pub struct Attached {
    pub netns: Option<std::path::PathBuf>,
    pub netns_inode: u32,
    pub ifname: String,
    pub ifindex: u32,
    /// "native" or "generic", or the reason XDP is not attached.
    pub xdp: Result<&'static str, String>,
    pub tc_ingress: Result<(), String>,
    pub tc_egress: Result<(), String>,
    /// The interface (or its namespace) was deleted while attached: its links died with
    /// it, and its stages say so.
    pub lost: bool,
}

/// Which programs go on an interface: the tracer's, or capture's (which also trace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Trace,
    Capture,
}

impl Role {
    fn programs(self) -> [&'static str; 3] {
        match self {
            Role::Trace => ["pf_xdp", "pf_tc_ingress", "pf_tc_egress"],
            Role::Capture => ["pf_cap_xdp", "pf_tc_ingress", "pf_cap_tc_egress"],
        }
    }
}

/// How to attach XDP: `--xdp-mode` and the daemon's `xdp_mode` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpChoice {
    Auto,
    Native,
    Generic,
    Off,
}

impl Tracer {
    /// Attaches XDP and tcx ingress/egress to `ifname` in network namespace `netns`
    /// (the current one when `None`). Failures are recorded, not fatal, except an
    /// unknown interface.
    pub fn attach_interface(&mut self, netns: Option<&Path>, ifname: &str, xdp: XdpChoice) -> Result<&Attached> {
        self.attach_interface_as(Role::Trace, netns, ifname, xdp)
    }

    /// As `attach_interface`, with `role`'s programs.
    pub fn attach_interface_as(
        &mut self,
        role: Role,
        netns: Option<&Path>,
        ifname: &str,
        xdp: XdpChoice,
    ) -> Result<&Attached> {
        let [xdp_name, ti_name, te_name] = role.programs();
        let asked = self.asked;
        // Capture needs its programs whatever the stages; the tracer only the asked ones
        // (a stage not asked for has no program loaded).
        let want = move |s: Stage| role == Role::Capture || asked.contains(s);
        for (name, stage) in role.programs().into_iter().zip([Stage::Xdp, Stage::TcIngress, Stage::TcEgress]) {
            if !want(stage) {
                continue;
            }
            let prog = self.ebpf_mut().program_mut(name).ok_or_else(|| anyhow!("{name} missing"))?;
            if prog.fd().is_err() {
                let r = match prog {
                    aya::programs::Program::Xdp(p) => p.load(),
                    aya::programs::Program::SchedClassifier(p) => p.load(),
                    _ => Ok(()),
                };
                r.map_err(|e| anyhow!("loading {name}: {}", describe(&e)))?;
            }
        }
        let netns_inode = platform::netns::netns_inode(netns.unwrap_or(Path::new("/proc/self/ns/net"))).unwrap_or(0);
        let [x, ti, te] = self.ebpf_mut().programs_mut().fold([None, None, None], |mut acc, (n, p)| {
            if n == xdp_name {
                acc[0] = Some(p);
            } else if n == ti_name {
                acc[1] = Some(p);
            } else if n == te_name {
                acc[2] = Some(p);
            }
            acc
        });
        let (Some(x), Some(ti), Some(te)) = (x, ti, te) else {
            return Err(anyhow!("interface programs missing"));
        };
        let x: &mut Xdp = x.try_into()?;
        let ti: &mut SchedClassifier = ti.try_into()?;
        let te: &mut SchedClassifier = te.try_into()?;
        let name = ifname.to_string();
        let ns_owned = netns.map(Path::to_path_buf);
        let attached = platform::netns::in_netns(netns, move || {
            let Some(ifindex) = platform::interfaces::ifindex(&name) else {
                let where_ =
                    ns_owned.as_ref().map(|p| format!(" in network namespace {}", p.display())).unwrap_or_default();
                crate::user_bail!("unknown interface '{name}'{where_}");
            };
            let not_asked = || "not asked for (--stages)".to_string();
            let xdp_state = if want(Stage::Xdp) { attach_xdp(x, ifindex, xdp) } else { Err(not_asked()) };
            let tcx = |p: &mut SchedClassifier, t: TcAttachType, s: Stage| {
                if !want(s) {
                    return Err(not_asked());
                }
                p.attach_with_options(&name, t, TcAttachOptions::TcxOrder(LinkOrder::default()))
                    .map(|_| ())
                    .map_err(|e| describe(&e))
            };
            let tc_ingress = tcx(ti, TcAttachType::Ingress, Stage::TcIngress);
            let tc_egress = tcx(te, TcAttachType::Egress, Stage::TcEgress);
            Ok(Attached {
                netns: ns_owned,
                netns_inode,
                ifname: name,
                ifindex,
                xdp: xdp_state,
                tc_ingress,
                tc_egress,
                lost: false,
            })
        })?;
        self.links += [attached.xdp.is_ok(), attached.tc_ingress.is_ok(), attached.tc_egress.is_ok()]
            .iter()
            .filter(|ok| **ok)
            .count();
        self.interfaces.push(attached);
        self.refresh_interface_stages();
        Ok(self.interfaces.last().expect("just pushed"))
    }

    pub(super) fn refresh_interface_stages(&mut self) {
        let list =
            |f: &dyn Fn(&Attached) -> Option<String>| -> Vec<String> { self.interfaces.iter().filter_map(f).collect() };
        let xdp = list(&|a| a.xdp.as_ref().ok().map(|m| format!("{} ({m})", a.ifname)));
        let ti = list(&|a| a.tc_ingress.is_ok().then(|| a.ifname.clone()));
        let te = list(&|a| a.tc_egress.is_ok().then(|| a.ifname.clone()));
        let errs = |f: &dyn Fn(&Attached) -> Option<String>| list(f).join("; ");
        let mk = |kind: &str, ok: Vec<String>, err: String| StageHook {
            hook: if ok.is_empty() { format!("{kind} (not attached)") } else { format!("{kind} on {}", ok.join(", ")) },
            state: if ok.is_empty() {
                Err(if err.is_empty() { "no interface attached".into() } else { err })
            } else {
                Ok(())
            },
        };
        let xdp = mk("XDP", xdp, errs(&|a| a.xdp.as_ref().err().map(|e| format!("{}: {e}", a.ifname))));
        let ti = mk("tcx ingress", ti, errs(&|a| a.tc_ingress.as_ref().err().map(|e| format!("{}: {e}", a.ifname))));
        let te = mk("tcx egress", te, errs(&|a| a.tc_egress.as_ref().err().map(|e| format!("{}: {e}", a.ifname))));
        for (s, h) in [(Stage::Xdp, xdp), (Stage::TcIngress, ti), (Stage::TcEgress, te)] {
            if self.asked.contains(s) {
                self.stages.insert(s, h);
            } else {
                self.stages.remove(&s);
            }
        }
    }

    /// Finds attached interfaces that are gone (deleted, renumbered, or their namespace
    /// deleted): their links died with them. Marks each lost, takes its links out of the
    /// count and its stages off the list; returns one line per interface lost.
    pub fn check_interfaces(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        for a in self.interfaces.iter_mut().filter(|a| !a.lost) {
            let gone = a.netns.as_deref().is_some_and(|p| !p.exists())
                || match platform::netns::in_netns(a.netns.as_deref(), || {
                    let inode = platform::netns::netns_inode(Path::new("/proc/thread-self/ns/net")).unwrap_or(0);
                    Ok((inode, platform::interfaces::ifindex(&a.ifname)))
                }) {
                    Ok((inode, i)) => i != Some(a.ifindex) || (a.netns_inode != 0 && inode != a.netns_inode),
                    // Cannot look (no privileges left after --user): not known to be gone.
                    Err(_) => false,
                };
            if !gone {
                continue;
            }
            let ok = [a.xdp.is_ok(), a.tc_ingress.is_ok(), a.tc_egress.is_ok()].iter().filter(|o| **o).count();
            self.links -= ok;
            a.lost = true;
            let why = "interface deleted".to_string();
            a.xdp = Err(why.clone());
            a.tc_ingress = Err(why.clone());
            a.tc_egress = Err(why);
            let where_ = a.netns.as_ref().map(|p| format!("@{}", p.display())).unwrap_or_default();
            lines.push(format!("lost interface {}{where_}: its stages stop", a.ifname));
        }
        if !lines.is_empty() {
            self.refresh_interface_stages();
        }
        lines
    }

    /// `capture --bypass`: attaches `pf_cap_xsk` (XDP only) to `ifname` in `netns`;
    /// returns the XDP mode ("native" or "generic") or why it would not attach.
    pub fn attach_bypass(&mut self, netns: Option<&Path>, ifname: &str, xdp: XdpChoice) -> Result<&'static str> {
        let prog = self.ebpf_mut().program_mut("pf_cap_xsk").ok_or_else(|| anyhow!("pf_cap_xsk missing"))?;
        let x: &mut Xdp = prog.try_into()?;
        x.load().map_err(|e| anyhow!("loading pf_cap_xsk: {}", describe(&e)))?;
        let name = ifname.to_string();
        let mode = platform::netns::in_netns(netns, move || {
            let Some(ifindex) = platform::interfaces::ifindex(&name) else {
                crate::user_bail!("unknown interface '{name}'");
            };
            attach_xdp(x, ifindex, xdp).map_err(|e| anyhow!(e))
        })?;
        self.links += 1;
        Ok(mode)
    }

    /// Is `ifname` in namespace `netns` attached (and not lost)?
    pub fn has_interface(&self, netns: Option<&Path>, ifname: &str) -> bool {
        self.interfaces.iter().any(|a| !a.lost && a.netns.as_deref() == netns && a.ifname == ifname)
    }
}

fn attach_xdp(x: &mut Xdp, ifindex: u32, choice: XdpChoice) -> Result<&'static str, String> {
    let try_mode =
        |x: &mut Xdp, mode: XdpMode| x.attach_to_if_index(ifindex, mode).map(|_| ()).map_err(|e| describe(&e));
    match choice {
        XdpChoice::Off => Err("disabled".into()),
        XdpChoice::Native => try_mode(x, XdpMode::Driver).map(|()| "native"),
        XdpChoice::Generic => try_mode(x, XdpMode::Skb).map(|()| "generic"),
        XdpChoice::Auto => match try_mode(x, XdpMode::Driver) {
            Ok(()) => Ok("native"),
            Err(native) => {
                try_mode(x, XdpMode::Skb).map(|()| "generic").map_err(|g| format!("native: {native}; generic: {g}"))
            }
        },
    }
}
