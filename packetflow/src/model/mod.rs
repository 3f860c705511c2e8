//! What live and offline code share: traces, histograms, stage sets, traffic filters.

pub mod connection;
pub mod drops;
pub mod filter;
pub mod stage_set;
pub mod stats;
pub mod trace;
