//! From ring buffers to traces: shard readers, the correlator, sinks, one tracing run.

pub mod accounting;
mod comm;
pub mod connections;
pub mod correlate;
pub mod names;
pub mod run;
pub mod session;
pub mod shards;
