//! Sandbox backends, leases and preflight.

pub mod engine;
pub mod lease;
pub mod preflight;
mod sys;
pub mod namespace;
pub mod ready;
pub mod state;
pub mod smolmachines;
