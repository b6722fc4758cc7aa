//! The smolmachines backend, pre-boot half: running the smolvm engine (`cli`, over the subprocess seam `runner`), the
//! machine plan with its egress confinement (`plan`), and verification of the engine's state database (`db`). Trusts
//! a version-verified smolvm (research/smolvm.md, 1.32.2); trusts neither its defaults nor the contents of its
//! database. `tests/smolvm_egress_harness.rs` proves the confinement against smolvm's real network stack.
//!
//! The launch recipe: `plan::plan(spec)` → `Smolvm::create` → `db::verify_or_patch` (adds the interceptor
//! requirement smolvm only records at the first start, and repairs any widened field) → bottle proxy listening on
//! the interceptor address → `db::verify` → `Smolvm::start`.

/// bot-bottle's own smolvm state directory, under its state root (`state::state_root`), passed as `--state-dir` on
/// every call: sweeps see only bot-bottle's machines, never the user's. The leading `.` keeps it apart from every
/// bottle name. The preflight checks this directory, not smolvm's default.
pub const STATE_SUBDIR: &str = ".smolvm";

pub mod backend;
pub mod cli;
pub mod db;
pub mod plan;
pub mod runner;

pub use cli::{CliError, Deleted, EngineError, ErrorCode, MachineInfo, Smolvm, StartError, Timeouts};
pub use db::{DbError, DbPathError, Verified, verify, verify_or_patch};
pub use plan::{
    ExpectedEgress, InterceptorToken, MachineName, MachinePlan, MachineSpec, PlanError, WorkspaceMount, plan,
};
