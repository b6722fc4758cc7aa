//! Egress proxy: the bottle's only way out. Filled in by the proxy issue (#3).

use std::net::SocketAddr;
use std::path::PathBuf;

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
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the standalone proxy is not available yet (issue #3)")]
    NotAvailable,
}

/// Runs the proxy in the foreground until SIGINT/SIGTERM. Not available until issue #3 lands.
pub fn run_standalone(_opts: StandaloneOptions) -> Result<(), ProxyError> {
    Err(ProxyError::NotAvailable)
}
