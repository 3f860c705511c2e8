//! The system around the tracer, one topic per file.

pub mod cgroup;
pub mod host;
pub mod interfaces;
pub mod mounts;
pub mod netns;
pub mod privileges;
pub mod process;
pub mod testhosts;
pub mod users;
