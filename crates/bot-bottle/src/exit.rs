//! Exit codes: bot-bottle's own failures use 2 and 119–125 so that an agent's exit code (passed through by `run`
//! and `exec`) stays distinguishable, as docker does with 125–127. Documented in README.md (a test walks the table).

use bottle_policy::PolicyError;
use bottle_proxy::ProxyError;
use bottle_sandbox::backend::{BackendError, FailureClass};
use bottle_sandbox::lease::LeaseError;
use bottle_sandbox::state::StateError;

/// Bad command line (clap's convention), or a bad value in bot-bottle's environment (`BOT_BOTTLE_POOL`).
pub const USAGE: u8 = 2;
/// The named bottle does not exist, is not in a state for the verb (not running, still running), or the name is
/// taken.
pub const TARGET: u8 = 119;
/// The verb exists but is not available yet, or not on this platform.
pub const UNAVAILABLE: u8 = 120;
/// The policy (file, preset or flags) is invalid.
pub const POLICY: u8 = 121;
/// The host cannot confine the bottle with the chosen backend (see `bot-bottle doctor`).
pub const PREFLIGHT: u8 = 122;
/// The sandbox failed to start, or its confinement could not be verified.
pub const SANDBOX: u8 = 123;
/// The egress proxy failed to start or stopped.
pub const PROXY: u8 = 124;
/// Any other bot-bottle failure.
pub const INTERNAL: u8 = 125;

/// The command line or bot-bottle's environment is wrong: what, and what would be valid.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// The bottle a verb names is not in a state for it (still running, not running).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WrongState(pub String);

/// A bottle's launch failed inside the sandbox (seen by `run -d`, which waits for the supervisor's record).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SandboxFailed(pub String);

/// A verb that a later issue fills in. Never pretends to work.
#[derive(Debug, thiserror::Error)]
#[error("`bot-bottle {verb}` is not available yet: {reason}")]
pub struct Unavailable {
    pub verb: &'static str,
    pub reason: &'static str,
}

/// The host failed a preflight check the chosen backend requires.
#[derive(Debug, thiserror::Error)]
#[error("the {backend} backend cannot run on this host; run `bot-bottle doctor --backend {backend}` for remedies")]
pub struct PreflightFailed {
    pub backend: bottle_policy::Backend,
}

/// Maps the typed root cause of an error chain to its exit code.
pub fn classify(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<BackendError>() {
            return match e.class() {
                FailureClass::Preflight => PREFLIGHT,
                FailureClass::Sandbox => SANDBOX,
                FailureClass::Proxy => PROXY,
                FailureClass::Unsupported => UNAVAILABLE,
                FailureClass::Target => TARGET,
            };
        }
        if cause.is::<PolicyError>() {
            return POLICY;
        }
        if cause.is::<Usage>() {
            return USAGE;
        }
        if cause.is::<WrongState>() {
            return TARGET;
        }
        if cause.is::<SandboxFailed>() {
            return SANDBOX;
        }
        if let Some(e) = cause.downcast_ref::<StateError>() {
            return match e {
                StateError::NotFound(_) | StateError::NotRunning(_) | StateError::Exists(_) => TARGET,
                _ => INTERNAL,
            };
        }
        if let Some(e) = cause.downcast_ref::<LeaseError>() {
            return match e {
                LeaseError::NameInUse { .. } => TARGET,
                _ => INTERNAL,
            };
        }
        if cause.is::<Unavailable>() {
            return UNAVAILABLE;
        }
        if cause.is::<PreflightFailed>() {
            return PREFLIGHT;
        }
        if cause.is::<ProxyError>() {
            return PROXY;
        }
    }
    INTERNAL
}

pub fn kind(code: u8) -> &'static str {
    match code {
        USAGE => "usage",
        TARGET => "target",
        UNAVAILABLE => "unavailable",
        POLICY => "policy",
        PREFLIGHT => "preflight",
        SANDBOX => "sandbox",
        PROXY => "proxy",
        // The agent's command could not start (not found, not executable), as a shell reports it.
        126 | 127 => "start",
        _ => "internal",
    }
}
