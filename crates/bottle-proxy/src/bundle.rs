//! A bottle's proxy bundle: the runtime its proxy runs on, the proxy with the bottle's ephemeral CA and credential
//! placeholders, the listeners it serves, and its shutdown. One per bottle, built the same way for every backend.
//!
//! Trusts the launcher to hand it listeners it bound itself (or that the bottle init handed over).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{Interceptor, Proxy, ProxyConfig, ProxyError};

/// How long the proxy's tasks get to finish at teardown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// How the bundle serves a listener.
pub enum Listen {
    /// An HTTP proxy: CONNECT and absolute-form requests.
    Proxy,
    /// smolvm's egress interceptor.
    Interceptor(Interceptor),
    /// Nobody may use it: every connection is refused and audited.
    Refuse,
}

pub struct Bundle {
    runtime: Option<tokio::runtime::Runtime>,
    proxy: Proxy,
}

impl Bundle {
    /// Starts the runtime (one worker: a bottle's proxy serves one agent, and each thread started here competes
    /// with the bottle's start-up for the CPU) and the proxy with a CA that never touches the disk.
    pub fn start(mut config: ProxyConfig) -> Result<Self, ProxyError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("bottle-proxy")
            .build()
            .map_err(ProxyError::Runtime)?;
        // The CA key lives exactly as long as this bottle's proxy.
        config.ephemeral_ca = true;
        let proxy = {
            let _in_runtime = runtime.enter();
            Proxy::new(config)?
        };
        Ok(Self {
            runtime: Some(runtime),
            proxy,
        })
    }

    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    pub fn ca_cert_pem(&self) -> &str {
        self.proxy.ca_cert_pem()
    }

    pub fn placeholders(&self) -> BTreeMap<String, String> {
        self.proxy.placeholders().into_iter().collect()
    }

    /// The runtime, for the launcher's own tasks (signal forwarding, the terminal's window size).
    pub fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.as_ref().map(|r| r.handle().clone())
    }

    /// Serves `listener` until the bundle shuts down; a listener that fails is logged.
    pub fn serve(&self, listener: std::net::TcpListener, how: Listen) {
        let Some(runtime) = &self.runtime else { return };
        let proxy = self.proxy.clone();
        runtime.spawn(async move {
            let served = match how {
                Listen::Proxy => proxy.serve_std_tcp(listener).await,
                Listen::Interceptor(interceptor) => proxy.serve_interceptor(listener, interceptor).await,
                Listen::Refuse => proxy.refuse_std_tcp(listener).await,
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "a bottle proxy listener stopped");
            }
        });
    }

    /// Stops every listener and flow. Idempotent; also run on drop.
    pub fn shutdown(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
        }
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
