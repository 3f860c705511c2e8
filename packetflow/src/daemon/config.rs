//! The daemon's configuration: a TOML file (every key optional, defaults below and in
//! dist/packetflow.toml), then command-line flags on top.
//!
//! Errors name the file, the line and the key: `packetflow.toml:3: sample: must be at
//! least 1`. Unknown keys are errors (a typo must not silently fall back to a default).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::{
    error::user,
    kernel::interfaces::XdpChoice,
    model::{
        filter::{FilterSpec, Proto},
        stage_set::StageSet,
    },
};

/// Bounds (inclusive) of the numeric keys; dist/packetflow.toml names them too.
pub const SAMPLE: (u64, u64) = (1, 1_000_000);
/// 1 ms to 10 minutes.
pub const TIMEOUT_MS: (u64, u64) = (1, 600_000);
/// Up to 10 minutes (no trace lasts longer than `timeout_ms` allows).
pub const SLOW_US: (u64, u64) = (0, 600_000_000);
pub const COST_SAMPLE_SECS: (u64, u64) = (0, 3600);
/// 1 MiB to 64 GiB.
pub const ROTATE_MB: (u64, u64) = (1, 65_536);
/// 1 s to 30 days.
pub const ROTATE_SECS: (u64, u64) = (1, 2_592_000);
/// Up to 16 TiB (and at least `rotate_mb`).
pub const MAX_TOTAL_MB: (u64, u64) = (1, 16 << 20);
/// 1 MiB to 64 GiB.
pub const CORRELATOR_BUDGET_MB: (u64, u64) = (1, 65_536);
/// 1 to 4194304 (PID_MAX_LIMIT on 64-bit kernels).
pub const PID: (u32, u32) = (1, 4_194_304);

/// Where the daemon looks for its file when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/packetflow/packetflow.toml";

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// In-kernel histograms, no per-packet records (the cheapest; no trace files).
    Summary,
    /// Per-packet records joined into traces in userspace (needed for trace files).
    Full,
}

/// Every option of the daemon. Field docs give the default.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Prometheus endpoint (`/metrics`). Default 127.0.0.1:9464.
    pub metrics_addr: SocketAddr,
    /// Must be true to bind `metrics_addr` to a non-loopback address (the endpoint has no
    /// authentication). Default false.
    pub metrics_public: bool,
    /// Unix socket `packetflow status` talks to (mode 0600). Default
    /// /run/packetflow/packetflow.sock.
    pub control_socket: PathBuf,
    /// Interfaces that get XDP and tcx (IFACE, IFACE@NETNS, or `any`). Default `["lo"]`.
    pub interfaces: Vec<String>,
    /// XDP attach mode: auto, native, generic or off. Default auto.
    pub xdp_mode: XdpChoice,
    /// summary or full. Default: summary, or full when `trace_dir` is set.
    pub mode: Option<Mode>,
    /// Only flows with one of these ports on either end. Default: all.
    pub ports: Vec<u16>,
    /// Only flows with one of these addresses on either end. Default: all.
    pub hosts: Vec<IpAddr>,
    /// tcp or udp. Default: both.
    pub proto: Option<Proto>,
    /// Only flows this process touched (every stage). Default: all.
    pub pid: Option<u32>,
    /// More processes, as `pid`.
    pub pids: Vec<u32>,
    /// Only flows a process with this command name touched. Default: all.
    pub comm: Option<String>,
    /// Only flows a process in this cgroup v2 (or below) touched. Default: all.
    pub cgroup: Option<PathBuf>,
    /// Trace 1 flow in N. Default 1 (every flow).
    pub sample: u32,
    /// Also trace TCP connection set-up (`trace --connections`): per listener histograms
    /// of handshake time and accept-queue wait, queue depths, overflows. Default false.
    pub connections: bool,
    /// Stages to trace: names and sets, comma separated, as `trace --stages`
    /// (docs/stages.md, "Stage sets"). A stage not asked for has no program attached.
    /// Default "overview": the cheapest set that still separates stack, qdisc/device,
    /// transmit -> receive and socket/application time (BENCHMARKS.md, "Cost against the
    /// stages attached").
    pub stages: String,
    /// Give up on a packet's missing stages after this many ms (full mode). Default 1000.
    pub timeout_ms: u64,
    /// The memory the correlator may hold for packets in flight, MiB (full mode;
    /// docs/daemon.md, "Memory bound"). Default 16.
    pub correlator_budget_mb: u64,
    /// Write NDJSON traces (the `trace --json` format) into this directory (full mode).
    /// Default: none.
    pub trace_dir: Option<PathBuf>,
    /// Only write traces whose end-to-end time is at least this many µs. Default 0 (all).
    pub slow_us: u64,
    /// Start a new trace file when the current one reaches this many MiB. Default 64.
    pub rotate_mb: u64,
    /// ... or is this many seconds old. Default 3600.
    pub rotate_secs: u64,
    /// Delete the oldest trace files when the directory holds more than this many MiB.
    /// Default 1024.
    pub max_total_mb: u64,
    /// The tracer's own cost (status, /metrics) comes from the kernel's BPF run
    /// statistics, which cost every program run two clock reads: they are on for one
    /// second in every this many. 1: always on; 0: never (no cost figures). Default 10.
    pub cost_sample_secs: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            metrics_public: false,
            control_socket: PathBuf::from("/run/packetflow/packetflow.sock"),
            interfaces: vec!["lo".into()],
            xdp_mode: XdpChoice::Auto,
            mode: None,
            ports: Vec::new(),
            hosts: Vec::new(),
            proto: None,
            pid: None,
            pids: Vec::new(),
            comm: None,
            cgroup: None,
            sample: 1,
            connections: false,
            stages: "overview".into(),
            timeout_ms: 1000,
            correlator_budget_mb: crate::pipeline::correlate::DEFAULT_BUDGET_MB as u64,
            trace_dir: None,
            slow_us: 0,
            rotate_mb: 64,
            rotate_secs: 3600,
            max_total_mb: 1024,
            cost_sample_secs: 10,
        }
    }
}

/// Command-line flags that override the file (`None`/empty: keep the file's value).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub metrics_addr: Option<SocketAddr>,
    pub metrics_public: bool,
    pub control_socket: Option<PathBuf>,
    pub interfaces: Vec<String>,
    pub xdp_mode: Option<XdpChoice>,
    pub mode: Option<Mode>,
    pub ports: Vec<u16>,
    pub hosts: Vec<IpAddr>,
    pub proto: Option<Proto>,
    pub pids: Vec<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<PathBuf>,
    pub sample: Option<u32>,
    pub trace_dir: Option<PathBuf>,
    pub slow_us: Option<u64>,
}

impl Config {
    /// Reads `path` (`None`: the default path when it exists, else the defaults) and
    /// applies `o`. Every error is one sentence with file:line and key.
    pub fn load(path: Option<&Path>, o: &Overrides) -> Result<Config> {
        let mut c = match path {
            Some(p) => Self::from_file(p)?,
            None if Path::new(DEFAULT_PATH).exists() => Self::from_file(Path::new(DEFAULT_PATH))?,
            None => Config::default(),
        };
        c.apply(o);
        c.check(path.map(|p| p.display().to_string()).as_deref(), "")?;
        Ok(c)
    }

    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| user(format!("cannot read config file {}: {e}", path.display())))?;
        let name = path.display().to_string();
        let c = Self::parse(&text, &name)?;
        c.check(Some(&name), &text)?;
        Ok(c)
    }

    /// Parses TOML text; `name` is used in error messages.
    pub fn parse(text: &str, name: &str) -> Result<Config> {
        toml::from_str::<Config>(text).map_err(|e| {
            let msg = e.message().trim().to_string();
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    let key = key_on_line(text, line);
                    // serde names unknown keys itself; bad values need the key added.
                    let key = key.filter(|k| !msg.contains(k.as_str()));
                    match key {
                        Some(k) => user(format!("{name}:{line}: {k}: {msg}")),
                        None => user(format!("{name}:{line}: {msg}")),
                    }
                }
                None => user(format!("{name}: {msg}")),
            }
        })
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(a) = o.metrics_addr {
            self.metrics_addr = a;
        }
        self.metrics_public |= o.metrics_public;
        if let Some(p) = &o.control_socket {
            self.control_socket = p.clone();
        }
        if !o.interfaces.is_empty() {
            self.interfaces = o.interfaces.clone();
        }
        if let Some(m) = o.xdp_mode {
            self.xdp_mode = m;
        }
        if o.mode.is_some() {
            self.mode = o.mode;
        }
        if !o.ports.is_empty() {
            self.ports = o.ports.clone();
        }
        if !o.hosts.is_empty() {
            self.hosts = o.hosts.clone();
        }
        if o.proto.is_some() {
            self.proto = o.proto;
        }
        if !o.pids.is_empty() {
            (self.pid, self.pids) = (None, o.pids.clone());
        }
        if o.comm.is_some() {
            self.comm = o.comm.clone();
        }
        if o.cgroup.is_some() {
            self.cgroup = o.cgroup.clone();
        }
        if let Some(s) = o.sample {
            self.sample = s;
        }
        if o.trace_dir.is_some() {
            self.trace_dir = o.trace_dir.clone();
        }
        if let Some(s) = o.slow_us {
            self.slow_us = s;
        }
    }

    /// Values serde cannot check. `text` (the file, when there is one) locates the key.
    fn check(&self, name: Option<&str>, text: &str) -> Result<()> {
        let bad = |key: &str, why: &str| {
            let at = match (name, line_of_key(text, key)) {
                (Some(n), Some(l)) => format!("{n}:{l}: "),
                (Some(n), None) if !text.is_empty() => format!("{n}: "),
                _ => String::new(),
            };
            Err(user(format!("{at}{key}: {why}")))
        };
        if self.sample == 0 {
            return bad("sample", "must be at least 1 (1 = every flow)");
        }
        for (key, v, (min, max)) in [
            ("sample", u64::from(self.sample), SAMPLE),
            ("timeout_ms", self.timeout_ms, TIMEOUT_MS),
            ("correlator_budget_mb", self.correlator_budget_mb, CORRELATOR_BUDGET_MB),
            ("slow_us", self.slow_us, SLOW_US),
            ("rotate_mb", self.rotate_mb, ROTATE_MB),
            ("rotate_secs", self.rotate_secs, ROTATE_SECS),
            ("max_total_mb", self.max_total_mb, MAX_TOTAL_MB),
            ("cost_sample_secs", u64::from(self.cost_sample_secs), COST_SAMPLE_SECS),
        ] {
            if v < min {
                return bad(key, &format!("must be at least {min}"));
            }
            if v > max {
                return bad(key, &format!("must be at most {max}"));
            }
        }
        if let Some(pid) = self.pid
            && !(PID.0..=PID.1).contains(&pid)
        {
            return bad("pid", &format!("must be between {} and {} (the kernel's largest pid_max)", PID.0, PID.1));
        }
        if let Some(pid) = self.pids.iter().find(|p| !(PID.0..=PID.1).contains(*p)) {
            return bad("pids", &format!("{pid} is not between {} and {}", PID.0, PID.1));
        }
        if let Some(c) = &self.comm
            && (c.is_empty() || c.len() > 15)
        {
            return bad("comm", "a command name is 1 to 15 bytes (the kernel's comm; see /proc/PID/comm)");
        }
        if let Some(p) = &self.cgroup
            && let Err(e) = crate::platform::cgroup::Cgroup::resolve(p)
        {
            return bad("cgroup", &format!("{e:#}"));
        }
        if self.max_total_mb < self.rotate_mb {
            return bad("max_total_mb", "must be at least rotate_mb (one full file must fit)");
        }
        if self.interfaces.is_empty() {
            return bad("interfaces", "needs at least one interface (\"lo\" is the default)");
        }
        if self.mode == Some(Mode::Summary) && self.trace_dir.is_some() {
            return bad("trace_dir", "needs mode = \"full\": summary mode keeps no per-packet records");
        }
        if self.control_socket.as_os_str().is_empty() {
            return bad("control_socket", "must be a path");
        }
        let stages = match StageSet::parse(&self.stages) {
            Ok(s) => s,
            Err(e) => return bad("stages", &e.to_string()),
        };
        if self.mode() == Mode::Full
            && let Err(e) = stages.check_joinable()
        {
            return bad("stages", &e.to_string());
        }
        let filter = self.filter();
        filter.to_kernel(0).map_err(|e| {
            let key = if e.to_string().contains("port") { "ports" } else { "hosts" };
            match bad(key, &e.to_string()) {
                Err(e) => e,
                Ok(()) => unreachable!(),
            }
        })?;
        Ok(())
    }

    pub fn mode(&self) -> Mode {
        self.mode.unwrap_or(if self.trace_dir.is_some() { Mode::Full } else { Mode::Summary })
    }

    /// The trace filter these settings describe (interfaces are resolved by the daemon).
    pub fn filter(&self) -> FilterSpec {
        let summary = self.mode() == Mode::Summary;
        FilterSpec {
            ports: self.ports.clone(),
            hosts: self.hosts.clone(),
            pids: self.pid.into_iter().chain(self.pids.iter().copied()).collect(),
            comm: self.comm.clone(),
            // Checked by `validate`.
            cgroup: self.cgroup.as_deref().and_then(|p| crate::platform::cgroup::Cgroup::resolve(p).ok()),
            proto: self.proto,
            ifindexes: Vec::new(),
            control: false,
            summary,
            no_records: summary,
            sample: self.sample,
            // Checked by `validate`.
            stages: StageSet::parse(&self.stages).unwrap_or_default(),
        }
    }

    /// The keys whose change needs a restart, when `new` differs from `self` in them.
    pub fn restart_keys(&self, new: &Config) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.metrics_addr != new.metrics_addr || self.metrics_public != new.metrics_public {
            v.push("metrics_addr");
        }
        if self.control_socket != new.control_socket {
            v.push("control_socket");
        }
        if self.interfaces != new.interfaces || self.xdp_mode != new.xdp_mode {
            v.push("interfaces");
        }
        if self.mode() != new.mode() {
            v.push("mode");
        }
        if self.stages != new.stages {
            // Global stages change live (`Running::set_stages`); per-interface ones (XDP,
            // tcx) and full mode's (its trace files and traces) need a restart.
            let (a, b) = (StageSet::parse(&self.stages).ok(), StageSet::parse(&new.stages).ok());
            let interfaces_same = a.zip(b).is_some_and(|(a, b)| a.per_interface() == b.per_interface());
            if self.mode() == Mode::Full || !interfaces_same {
                v.push("stages");
            }
        }
        if self.trace_dir != new.trace_dir {
            v.push("trace_dir");
        }
        if self.connections != new.connections {
            v.push("connections");
        }
        if self.cost_sample_secs != new.cost_sample_secs {
            v.push("cost_sample_secs");
        }
        if self.timeout_ms != new.timeout_ms {
            v.push("timeout_ms");
        }
        if self.correlator_budget_mb != new.correlator_budget_mb {
            v.push("correlator_budget_mb");
        }
        v
    }
}

/// The key assigned on line `line` (1-based), if that line is `key = ...`.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let (k, _) = l.split_once('=')?;
    let k = k.trim().trim_matches('"');
    (!k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')).then(|| k.to_string())
}

/// The line (1-based) on which `key` is assigned.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines().position(|l| l.split_once('=').is_some_and(|(k, _)| k.trim().trim_matches('"') == key)).map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, "f.toml").and_then(|c| c.check(Some("f.toml"), text).map(|()| c)).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_values() {
        let c = Config::parse("", "f").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.mode(), Mode::Summary);
        let c = Config::parse("ports = [80, 443]\ntrace_dir = \"/tmp/x\"\nproto = \"udp\"\n", "f").unwrap();
        assert_eq!(c.ports, vec![80, 443]);
        assert_eq!(c.mode(), Mode::Full);
        assert_eq!(c.filter().proto, Some(Proto::Udp));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        assert!(err("ports = [80\nsample = 2\n").starts_with("f.toml:"), "{}", err("ports = [80\n"));
        let e = err("sample = 2\nbogus_key = 1\n");
        assert!(e.starts_with("f.toml:2:") && e.contains("bogus_key"), "{e}");
        let e = err("\nmetrics_addr = \"nowhere\"\n");
        assert!(e.starts_with("f.toml:2: metrics_addr:"), "{e}");
        let e = err("ports = [1]\nsample = 0\n");
        assert_eq!(e, "f.toml:2: sample: must be at least 1 (1 = every flow)");
        let e = err("mode = \"summary\"\n\ntrace_dir = \"/x\"\n");
        assert!(e.starts_with("f.toml:3: trace_dir:"), "{e}");
        let e = err("ports = [70000]\n");
        assert!(e.starts_with("f.toml:1:") && e.contains("ports"), "{e}");
    }

    #[test]
    fn numbers_are_bounded() {
        // 2^44 MiB would wrap to 0 bytes when shifted into bytes.
        assert_eq!(err("sample = 2\nrotate_mb = 17592186044416\n"), "f.toml:2: rotate_mb: must be at most 65536");
        assert_eq!(err("rotate_mb = 0\n"), "f.toml:1: rotate_mb: must be at least 1");
        assert_eq!(err("timeout_ms = 18446744073709551615\n"), "f.toml:1: timeout_ms: must be at most 600000");
        assert_eq!(err("timeout_ms = 0\n"), "f.toml:1: timeout_ms: must be at least 1");
        assert_eq!(err("correlator_budget_mb = 0\n"), "f.toml:1: correlator_budget_mb: must be at least 1");
        assert_eq!(
            err("correlator_budget_mb = 17592186044416\n"),
            "f.toml:1: correlator_budget_mb: must be at most 65536"
        );
        assert_eq!(err("\nslow_us = 18446744073709551\n"), "f.toml:2: slow_us: must be at most 600000000");
        assert_eq!(err("rotate_secs = 99999999999\n"), "f.toml:1: rotate_secs: must be at most 2592000");
        assert_eq!(
            err("max_total_mb = 17592186044416\n"),
            format!("f.toml:1: max_total_mb: must be at most {}", 16u64 << 20)
        );
        assert_eq!(err("sample = 4000000000\n"), "f.toml:1: sample: must be at most 1000000");
        assert!(err("pid = 0\n").starts_with("f.toml:1: pid: must be between 1 and 4194304"));
        assert!(err("pid = 5000000\n").starts_with("f.toml:1: pid: must be between"));
        assert!(err("pids = [1, 0]\n").contains("pids: 0 is not between"), "{}", err("pids = [1, 0]\n"));
        assert!(err("comm = \"a-name-longer-than-15\"\n").contains("comm: a command name is 1 to 15 bytes"));
        // The process keys become the kernel filter's process criteria.
        let c = Config::parse("pid = 7\npids = [8, 9]\ncomm = \"nginx\"\n", "f").unwrap();
        let f = c.filter();
        assert_eq!((f.pids, f.comm.as_deref()), (vec![7, 8, 9], Some("nginx")));
        // The largest values are fine, and do not overflow once turned into bytes and ns.
        let text = "rotate_mb = 65536\nmax_total_mb = 16777216\ntimeout_ms = 600000\nslow_us = 600000000\nrotate_secs = 2592000\nsample = 1000000\npid = 4194304\n";
        let c = Config::parse(text, "f").unwrap();
        c.check(Some("f"), text).unwrap();
        assert!((c.max_total_mb << 20) > (c.rotate_mb << 20));
    }

    #[test]
    fn flags_override_the_file() {
        let mut c = Config::parse("ports = [1]\nsample = 3\n", "f").unwrap();
        c.apply(&Overrides { ports: vec![2], slow_us: Some(5), ..Default::default() });
        assert_eq!((c.ports.clone(), c.sample, c.slow_us), (vec![2], 3, 5));
    }

    #[test]
    fn restart_keys_are_named() {
        let a = Config::default();
        let b = Config { ports: vec![9], ..Config::default() };
        assert!(a.restart_keys(&b).is_empty());
        let b = Config { interfaces: vec!["eth0".into()], ..Config::default() };
        assert_eq!(a.restart_keys(&b), vec!["interfaces"]);
        // Global stages reload live in summary mode; XDP/tcx stages and full mode restart.
        let a = Config { stages: "socket".into(), ..Config::default() };
        let b = Config { stages: "socket,nic_xmit".into(), ..Config::default() };
        assert!(a.restart_keys(&b).is_empty());
        let b = Config { stages: "socket,xdp".into(), ..Config::default() };
        assert_eq!(a.restart_keys(&b), vec!["stages"]);
        let full = |stages: &str| Config { stages: stages.into(), mode: Some(Mode::Full), ..Config::default() };
        assert_eq!(full("socket").restart_keys(&full("all")), vec!["stages"]);
    }
}
