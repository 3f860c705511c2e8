//! packetflow: where a packet's time goes inside Linux.
//!
//! The folders follow the data (ARCHITECTURE.md has the map): `kernel` loads and attaches
//! the eBPF programs and reads their maps; `pipeline` reads the ring buffers, joins records
//! into per-packet traces (`pipeline::correlate`) and hands them to sinks; `model` holds
//! what live and offline code share (traces, histograms, stage sets, filters); `format`
//! writes and reads files (NDJSON, Perfetto, pcapng); `report` turns traces into tables and
//! charts; `capture` is the packet capture; `daemon` the service; `cmd` one file per
//! subcommand; `platform` the system around the tracer.

pub mod capture;
pub mod cmd;
pub mod daemon;
pub mod error;
pub mod format;
pub mod kernel;
pub mod model;
pub mod pipeline;
pub mod platform;
pub mod report;
