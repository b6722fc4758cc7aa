//! The `Proxy` handle: configuration, the live policy (swapped atomically on reload), and the shared parts every
//! connection uses (CA, upstream TLS, audit log, credentials, connection slots).

use std::collections::HashMap;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bottle_policy::Policy;
use tokio::sync::Semaphore;

use crate::ask::Reviewer;
use crate::audit::{AuditError, AuditLog, Event, Verdict};
use crate::ca::{Ca, CaError};
use crate::credentials::{CredentialError, Credentials};
use crate::upstream::{RootsError, UpstreamTls};

const STATE_DIR_MODE: u32 = 0o700;

/// Resource bounds. Defaults suit one bottle on a small machine.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Client connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request head (request line + headers), HTTP/1.1 and HTTP/2 alike.
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Slowloris: a request head must arrive within this.
    pub header_read_timeout: Duration,
    /// A connection (or tunnel) on which no byte moved for this long is closed.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// TLS handshakes, both sides, and reading the ClientHello.
    pub handshake_timeout: Duration,
    pub leaf_cache_entries: usize,
    pub max_h2_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_header_bytes: 64 * 1024,
            max_headers: 128,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            leaf_cache_entries: 1024,
            max_h2_streams: 128,
        }
    }
}

pub struct ProxyConfig {
    pub policy: Policy,
    /// Bottle name for the audit log.
    pub bottle: String,
    /// Holds `audit.jsonl`, and `ca.pem`/`ca-key.pem` when the CA is minted here.
    pub state_dir: PathBuf,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// Mint a fresh CA whose key stays in this process; only `ca.pem` is written (a bottle's proxy). Not with
    /// `ca_cert`/`ca_key`.
    pub ephemeral_ca: bool,
    /// Extra PEM files trusted for upstream TLS, beside the system roots.
    pub upstream_ca: Vec<PathBuf>,
    pub limits: Limits,
    /// Where `from_env` credentials are read; `None` reads the process environment. Tests pass a map.
    pub secret_env: Option<HashMap<String, String>>,
    /// Placeholders derived from this seed instead of random ones: the same in every bottle given the same seed, so
    /// an agent that remembers which key it approved (Claude Code keeps its last characters in its kept home) is not
    /// asked again. The seed stays in this process; a placeholder says nothing of the real value.
    pub placeholder_seed: Option<Vec<u8>>,
    /// Answers ask mode's questions; a policy with `unknown = "ask"` needs one.
    pub reviewer: Option<Arc<dyn Reviewer>>,
}

impl ProxyConfig {
    pub fn new(policy: Policy, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            policy,
            bottle: "bottle".into(),
            state_dir: state_dir.into(),
            ca_cert: None,
            ca_key: None,
            ephemeral_ca: false,
            upstream_ca: Vec::new(),
            limits: Limits::default(),
            secret_env: None,
            placeholder_seed: None,
            reviewer: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    UpstreamRoots(#[from] RootsError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot accept connections")]
    Accept(#[source] std::io::Error),
    #[error("cannot start the proxy runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install signal handlers")]
    Signal(#[source] std::io::Error),
    #[error("cannot write to stdout")]
    Stdout(#[source] std::io::Error),
    #[error(
        "the policy asks about unknown hosts (unknown = \"ask\") but nothing can answer here: run it in a bottle (`bot-bottle run`), or set [network.ask] reviewer"
    )]
    NoReviewer,
}

pub(crate) struct Inner {
    policy: ArcSwap<Policy>,
    pub ca: Ca,
    pub tls: UpstreamTls,
    pub audit: Arc<AuditLog>,
    pub creds: Credentials,
    pub limits: Limits,
    pub slots: Arc<Semaphore>,
    pub reviewer: Option<Arc<dyn Reviewer>>,
    /// Bumped by every reload: spliced connections re-decide their host then.
    changes: tokio::sync::watch::Sender<u64>,
}

/// The egress proxy. Cheap to clone; all clones share one policy, CA, audit log and connection budget.
#[derive(Clone)]
pub struct Proxy {
    pub(crate) inner: Arc<Inner>,
}

impl Proxy {
    /// Sets up everything that can fail before the first connection: state directory, CA, upstream roots,
    /// credentials (a required one whose source is missing is an error), audit log.
    pub fn new(config: ProxyConfig) -> Result<Self, ProxyError> {
        if config.policy.network.unknown == bottle_policy::Unknown::Ask && config.reviewer.is_none() {
            return Err(ProxyError::NoReviewer);
        }
        raise_file_limit();
        DirBuilder::new()
            .recursive(true)
            .mode(STATE_DIR_MODE)
            .create(&config.state_dir)
            .map_err(|source| ProxyError::StateDir {
                path: config.state_dir.clone(),
                source,
            })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = match (config.ephemeral_ca, &config.ca_cert, &config.ca_key) {
            (true, None, None) => Ca::mint_ephemeral(
                &config.state_dir,
                &config.bottle,
                Arc::clone(&provider),
                config.limits.leaf_cache_entries,
            )?,
            (true, _, _) => return Err(CaError::EphemeralWithFiles.into()),
            (false, cert, key) => Ca::load_or_mint(
                &config.state_dir,
                cert.as_deref(),
                key.as_deref(),
                &config.bottle,
                Arc::clone(&provider),
                config.limits.leaf_cache_entries,
            )?,
        };
        let tls = UpstreamTls::new(&config.upstream_ca, provider)?;
        let seed = config.placeholder_seed.as_deref();
        let creds = match &config.secret_env {
            Some(map) => Credentials::load(&config.policy.credentials, &|k| map.get(k).cloned(), seed)?,
            None => Credentials::load(&config.policy.credentials, &|k| std::env::var(k).ok(), seed)?,
        };
        let audit = Arc::new(AuditLog::open(&config.state_dir.join("audit.jsonl"), &config.bottle)?);
        Ok(Self {
            inner: Arc::new(Inner {
                policy: ArcSwap::from_pointee(config.policy),
                ca,
                tls,
                audit,
                creds,
                slots: Arc::new(Semaphore::new(
                    config.limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
                )),
                limits: config.limits,
                reviewer: config.reviewer,
                changes: tokio::sync::watch::channel(0).0,
            }),
        })
    }

    /// Starts loading the system trust store in the background (it takes tens of milliseconds), for a
    /// long-lived proxy. A bottle's proxy does not: the first dial that needs the store starts the load itself.
    pub fn warm_upstream_roots(&self) -> Result<(), ProxyError> {
        self.inner.tls.warm().map_err(ProxyError::UpstreamRoots)
    }

    /// `(variable, placeholder)` pairs to put in the bottle's environment instead of the real secrets.
    pub fn placeholders(&self) -> Vec<(String, String)> {
        self.inner.creds.placeholders()
    }

    /// The CA certificate (PEM) the bottle must trust.
    pub fn ca_cert_pem(&self) -> &str {
        self.inner.ca.cert_pem()
    }

    pub fn ca_cert_path(&self) -> &Path {
        self.inner.ca.cert_path()
    }

    pub fn audit_path(&self) -> &Path {
        self.inner.audit.path()
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.inner.policy.load_full()
    }

    /// Swaps in a new (already validated) policy; requests decided after this see it, including requests inside
    /// tunnels opened before. Credentials stay as resolved at start: placeholders are already in the bottle.
    pub fn reload(&self, policy: Policy) {
        if policy.credentials != self.inner.policy.load().credentials {
            tracing::warn!("credential changes in a reloaded policy take effect only when the bottle restarts");
        }
        self.inner.policy.store(Arc::new(policy));
        self.inner.changes.send_modify(|generation| *generation += 1);
        tracing::info!("policy reloaded");
        self.audit_event("reload", Verdict::Allow, "policy-reloaded");
    }

    /// Resolves once a reloaded policy denies `target:port`: a connection spliced to it (a passthrough tunnel, an
    /// upgraded stream) is then cut, since no later request on it would be decided. Never resolves otherwise.
    pub(crate) async fn denied_later(
        &self,
        target: &crate::decide::Target,
        port: u16,
        granted: bool,
    ) -> crate::decide::DenyReason {
        // A connection a reviewer let through (ask mode) was never covered by the policy: only a denial cuts it.
        let cuts = |policy: &Policy| match crate::decide::decide_target(&policy.network, target, port) {
            Err(crate::decide::DenyReason::HostNotAllowed) if granted => None,
            Err(reason) => Some(reason),
            Ok(_) => None,
        };
        let mut changes = self.inner.changes.subscribe();
        // A reload between the connection's decision and this subscription is seen here.
        if let Some(reason) = cuts(&self.inner.policy.load()) {
            return reason;
        }
        loop {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Some(reason) = cuts(&self.inner.policy.load()) {
                return reason;
            }
        }
    }

    /// Records a change to the bottle's policy made from outside it: what, and who asked.
    pub fn record_change(&self, what: &str) {
        self.audit_event("policy-change", Verdict::Allow, what);
    }

    pub(crate) fn audit_event(&self, event: &'static str, decision: Verdict, rule: &str) {
        let _ = self.inner.audit.write(&Event {
            event,
            client: Arc::from("proxy"),
            decision,
            rule: rule.to_string(),
            ..Event::default()
        });
    }
}

/// SECURITY (availability): the proxy is the bottle's only way out, and each connection costs descriptors; at a
/// default soft limit of 1,024 a busy agent made `accept` fail (#12). Raise the soft limit to the hard limit once,
/// in the proxy's own process (the bottle was cloned before and keeps its own limits).
fn raise_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::info!(error = %e, "cannot raise the open-file limit");
        }
    }
}
