//! Sandbox backends, leases and preflight.

pub mod backend;
pub mod cgroup;
pub mod container;
pub mod engine;
pub mod lease;
pub mod namespace;
pub mod preflight;
pub mod ready;
pub mod smolmachines;
pub mod state;
mod sys;
