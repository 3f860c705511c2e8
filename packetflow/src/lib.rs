//! packetflow: where a packet's time goes inside Linux.
//!
//! See ARCHITECTURE.md for the map of the code; in short: `loader` loads and attaches the
//! eBPF programs, `session` reads their ring buffers, `correlate` joins the records into
//! per-packet traces, `stats` and `json` turn traces into tables and files, and the
//! subcommands (`trace`, `capture`, `daemon`, `report`, `demo`, `doctor`, `seed`) put it together.

pub mod bench;
pub mod btf;
pub mod capture;
pub mod charts;
pub mod chrome;
pub mod config;
pub mod correlate;
pub mod daemon;
pub mod decode;
pub mod demo;
pub mod doctor;
pub mod error;
pub mod expr;
pub mod filter;
pub mod json;
pub mod loader;
pub mod metrics;
pub mod names;
pub mod netns;
pub mod output;
pub mod pcapng;
pub mod recording;
pub mod report;
pub mod run;
pub mod seed;
pub mod session;
pub mod stage_set;
pub mod stats;
pub mod sys;
pub mod trace;
pub mod trace_files;
pub mod xdp_owner;
