//! packetflow's end-to-end tests, as one test binary (`e2e`) with a module per area: one
//! link instead of one per area (the areas share the harness, packetflow and aya, so
//! each binary linked nearly the same code). Test names are `area::test`; select an area
//! with a libtest filter, e.g. `cargo test -p packetflow-tests --test e2e -- demo::`.
//!
//! The harness is the crate's library, tests/src/lib.rs (`packetflow_tests`). Every test
//! loads the real programs into this kernel, so they run as root and one at a time
//! (`--test-threads=1`; `cargo xtask test` does both). `cargo xtask vm-test` runs some of
//! these areas in QEMU guests (xtask/src/vm.rs `VM_TESTS`).

// Counters read back from the Prometheus text are f64 holding integers: the tests compare
// them exactly on purpose (sent = traced + each counted loss).
#![allow(clippy::float_cmp)]

mod bulk;
mod bypass;
mod capture;
mod cli;
mod connections;
mod cost;
mod daemon;
mod demo;
mod dist;
mod drops;
mod filter;
mod fixture;
mod interfaces;
mod parse;
mod pipeline;
mod processes;
mod recording;
mod stages;
mod summary;
mod tbf;
mod wait;
