//! `bot-bottle proxy`: the proxy in the foreground. One line on stdout (`listening on <addr>`), SIGHUP re-reads
//! the policy (a bad file is refused and the old policy stays), SIGINT/SIGTERM stop it.

use std::io::Write;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::Instrument;

use crate::StandaloneOptions;
use crate::audit::Verdict;
use crate::proxy::{Limits, Proxy, ProxyConfig, ProxyError};

/// How long in-flight connections get after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Two workers: the proxy is I/O bound, and the machine is shared with the bottle.
const WORKER_THREADS: usize = 2;

pub fn run(opts: StandaloneOptions) -> Result<(), ProxyError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .map_err(ProxyError::Runtime)?;
    let span = tracing::info_span!("bottle", id = %opts.bottle);
    let result = runtime.block_on(serve(opts).instrument(span));
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

async fn serve(opts: StandaloneOptions) -> Result<(), ProxyError> {
    let config = ProxyConfig {
        policy: opts.policy,
        bottle: opts.bottle,
        state_dir: opts.state_dir,
        ca_cert: opts.ca_cert,
        ca_key: opts.ca_key,
        // A standalone proxy keeps its CA across restarts (clients were told to trust it).
        ephemeral_ca: false,
        upstream_ca: opts.upstream_ca,
        limits: Limits::default(),
        secret_env: None,
        placeholder_seed: None,
        reviewer: opts.reviewer,
    };
    let proxy = Proxy::new(config)?;
    proxy.warm_upstream_roots()?;
    // Handlers first: a SIGHUP that arrives just after "listening" must reload, not kill the process.
    let mut hup = signal(SignalKind::hangup()).map_err(ProxyError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ProxyError::Signal)?;
    let mut term = signal(SignalKind::terminate()).map_err(ProxyError::Signal)?;
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ProxyError::Bind {
            addr: opts.listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(ProxyError::Accept)?;
    // The one line of user output: the launcher (and people) read the address from it.
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {addr}")
        .and_then(|()| out.flush())
        .map_err(ProxyError::Stdout)?;
    drop(out);
    tracing::info!(%addr, ca = %proxy.ca_cert_path().display(), "proxy ready");
    let serving = proxy.serve_tcp(listener);
    tokio::pin!(serving);
    loop {
        tokio::select! {
            result = &mut serving => return result,
            _ = hup.recv() => reload(&proxy, opts.policy_path.as_deref(), &opts.overrides),
            _ = int.recv() => break,
            _ = term.recv() => break,
        }
    }
    tracing::info!("shutting down");
    Ok(())
}

fn reload(proxy: &Proxy, path: Option<&std::path::Path>, overrides: &bottle_policy::Overrides) {
    let loaded = match path {
        Some(p) => bottle_policy::load_file(p, overrides),
        None => bottle_policy::from_flags(overrides),
    };
    match loaded {
        Ok(policy) if policy.network.unknown == bottle_policy::Unknown::Ask && proxy.inner.reviewer.is_none() => {
            tracing::error!(error = %ProxyError::NoReviewer, "policy reload refused; the previous policy stays in force");
            proxy.audit_event("reload", Verdict::Error, "reload-refused");
        }
        Ok(policy) => proxy.reload(policy),
        Err(e) => {
            tracing::error!(error = %e, "policy reload refused; the previous policy stays in force");
            proxy.audit_event("reload", Verdict::Error, "reload-refused");
        }
    }
}
