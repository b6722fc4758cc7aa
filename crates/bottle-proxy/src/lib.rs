//! Egress proxy: the bottle's only way out. Explicit (absolute-form HTTP and CONNECT) and transparent modes, TLS
//! interception with the bottle's CA, per-request policy, credential injection, an audit line per decision.
//!
//! SECURITY: it fails closed. Every path that cannot decide ends in a 403, a 400 or a closed connection with an
//! audit record; nothing is tunnelled uninspected except passthrough hosts, and only after their SNI matched.

mod ask;
mod audit;
mod body;
mod bundle;
mod ca;
mod connect;
mod credentials;
mod decide;
mod deny;
mod exchange;
mod framing;
mod hello;
mod http1;
mod idle;
mod interceptor;
mod listener;
mod mitm;
mod proxy;
mod rewind;
mod secrets;
mod session;
mod standalone;
mod switch;
mod transparent;
mod upstream;
mod write_through;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use ask::{Answer, Decision, Question, Reviewer};
pub use audit::{AUDIT_FAILING_FILE, AuditError};
pub use bundle::{Bundle, Listen};
pub use ca::{CA_CERT_FILE, CA_KEY_FILE, CaError};
pub use credentials::{CredentialError, PLACEHOLDER_PREFIX};
pub use deny::DENIED_HEADER;
pub use interceptor::{Interceptor, Refusal, Route};
pub use proxy::{Limits, Proxy, ProxyConfig, ProxyError};
pub use upstream::RootsError;

/// Checks `--upstream-ca` files before anything starts (each must hold a PEM certificate), so that a bad one is
/// refused as a bad flag rather than after a bottle was half-launched.
pub fn check_upstream_ca(paths: &[PathBuf]) -> Result<(), (PathBuf, RootsError)> {
    for path in paths {
        upstream::read_extra_ca(std::slice::from_ref(path)).map_err(|e| (path.clone(), e))?;
    }
    Ok(())
}

/// The parsers that read bottle-controlled bytes, for the stable-Rust fuzz harness (`tests/fuzz.rs`,
/// `fuzz/README.md`). Not an API: no stability promise, hidden from the docs.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::decide::{DenyReason, Target, check_path, check_same_host, decide_target, parse_authority};
    pub use crate::framing::FramingViolation;
    pub use crate::hello::{Hello, HelloError, read as read_client_hello};

    /// The smuggling guard's framing tracker, fed the client's bytes in order.
    pub struct Tracker(crate::framing::Tracker);

    impl Default for Tracker {
        fn default() -> Self {
            Self(crate::framing::Tracker::new())
        }
    }

    impl Tracker {
        pub fn feed(&mut self, data: &[u8]) -> Result<(), FramingViolation> {
            self.0.feed(data)
        }
    }
}

/// What `bot-bottle proxy` hands the library.
pub struct StandaloneOptions {
    pub policy: bottle_policy::Policy,
    /// The policy file, if any, for live reload (SIGHUP re-reads it with the same command-line overrides).
    pub policy_path: Option<PathBuf>,
    pub overrides: bottle_policy::Overrides,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub upstream_ca: Vec<PathBuf>,
    /// Bottle name for the audit log.
    pub bottle: String,
    /// Answers ask mode's questions (`unknown = "ask"` is refused without one).
    pub reviewer: Option<std::sync::Arc<dyn Reviewer>>,
}

/// Runs the proxy in the foreground until SIGINT/SIGTERM. Prints exactly one line to stdout,
/// `listening on <addr>`; everything else goes through `tracing`.
pub fn run_standalone(opts: StandaloneOptions) -> Result<(), ProxyError> {
    standalone::run(opts)
}
