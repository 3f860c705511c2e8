//! One file per subcommand: its flags (a clap `Args` struct) and its `run`. `main.rs` only
//! parses and dispatches. Flags that several subcommands share are flattened groups here.

pub mod bench;
pub mod blast;
pub mod capture;
pub mod cli;
pub mod daemon;
pub mod demo;
pub mod docs;
pub mod doctor;
pub mod report;
pub mod seed;
pub mod status;
pub mod trace;

use std::{net::IpAddr, time::Duration};

use crate::model::filter::Proto;

/// Which traffic to trace (`trace`, `daemon`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct FilterArgs {
    /// Only flows with this port on either end (repeatable).
    #[arg(long = "port", value_name = "P")]
    pub ports: Vec<u16>,
    /// Only flows with this address on either end (repeatable).
    #[arg(long = "host", value_name = "ADDR")]
    pub hosts: Vec<IpAddr>,
    /// Only flows this process touched (send, receive, connect, accept), at every stage
    /// (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only flows a process with this command name touched (/proc/PID/comm, at most 15
    /// bytes).
    #[arg(long, value_name = "NAME")]
    pub comm: Option<String>,
    /// Only flows a process in this cgroup v2 (or below it) touched: a directory of the
    /// cgroup2 mount or a path as /proc/PID/cgroup shows it. Decided in the kernel.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<std::path::PathBuf>,
    /// Only this protocol; the other one's own hooks are not attached (cheaper).
    #[arg(long, value_enum)]
    pub proto: Option<Proto>,
}

/// The runtime of the async subcommands: two workers, as many as the smallest machine
/// we run on has CPUs.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// `--duration SECS`: a positive, finite number of seconds.
pub fn seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(d) if d > 0.0 && d.is_finite() => Ok(Duration::from_secs_f64(d)),
        _ => Err("must be a positive number of seconds".into()),
    }
}

/// `--timeout-ms MS`: milliseconds, at least 1 (0 is taken as 1).
pub fn millis(s: &str) -> Result<Duration, String> {
    let ms: u64 = s.parse().map_err(|_| "must be a whole number of milliseconds".to_string())?;
    Ok(Duration::from_millis(ms.max(1)))
}
