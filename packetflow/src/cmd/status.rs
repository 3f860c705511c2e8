//! `packetflow status`: asks the running daemon over its control socket and prints the answer.

use std::{
    io::{Read, Write},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::error::user;

/// Ask the running daemon for its per-stage table, hooks and loss counters.
#[derive(clap::Args)]
pub struct Args {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = "/run/packetflow/packetflow.sock")]
    pub socket: PathBuf,
    /// Print one JSON object: the daemon's facts (`daemon`) and the run's summary (per path
    /// and stage percentiles in ns, losses, drops; the fields of a trace file's summary).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &Args) -> Result<()> {
    let socket = &a.socket;
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => " (is the daemon running?)",
            std::io::ErrorKind::PermissionDenied => " (the control socket is root-only)",
            _ => "",
        };
        user(format!("cannot reach the packetflow daemon at {}: {e}{hint}", socket.display()))
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(if a.json { b"status json\n" } else { b"status\n" })?;
    let mut out = String::new();
    s.read_to_string(&mut out).context("reading the daemon's answer")?;
    print!("{out}");
    Ok(())
}
