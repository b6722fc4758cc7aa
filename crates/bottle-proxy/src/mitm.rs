//! TLS interception: terminate the bottle's TLS with a leaf from the bottle CA, offer `h2` and `http/1.1`, and
//! police every request of the decrypted stream (HTTP/2 streams one by one) through `exchange`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use crate::ca::ALPN_H2;
use crate::connect::{self, Tunnel};
use crate::decide::DenyReason;
use crate::exchange;
use crate::http1::serve_http1;
use crate::idle;
use crate::listener::h2_builder;
use crate::proxy::Proxy;
use crate::session::{Peer, Scope, Session};

pub async fn serve<S>(proxy: Proxy, peer: Peer, io: S, mut tunnel: Tunnel)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let start = Instant::now();
    let config = match proxy.inner.ca.server_config(&tunnel.target) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, host = %tunnel.target, "cannot mint a leaf certificate");
            let reason = DenyReason::Framing("no leaf certificate");
            return connect::close(&proxy, &peer, &tunnel, &reason, start);
        }
    };
    let timeout = proxy.inner.limits.handshake_timeout;
    let tls = match tokio::time::timeout(timeout, TlsAcceptor::from(config).accept(io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            // Most often the client does not trust the bottle CA, or pins the real certificate.
            tracing::info!(error = %e, host = %tunnel.target, "TLS handshake with the bottle failed");
            let reason = DenyReason::ClientTls;
            return connect::close(&proxy, &peer, &tunnel, &reason, start);
        }
        Err(_) => {
            let reason = DenyReason::Timeout("in the TLS handshake with the client");
            return connect::close(&proxy, &peer, &tunnel, &reason, start);
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
    let scope = Scope::Tunnel {
        target: tunnel.target.clone(),
        port: tunnel.port,
    };
    let predialed = tunnel.predialed.take();
    let grant = tunnel.grant.take();
    let (granted, watched_peer) = (grant.is_some(), peer.clone());
    let watcher = proxy.clone();
    let limits = proxy.inner.limits.clone();
    let activity = peer.activity.clone();
    let session = Arc::new(Session::tunnel(
        proxy,
        peer,
        scope,
        h2,
        tunnel.checked.clone(),
        predialed,
        grant,
    ));
    let served = async move {
        if h2 {
            // The smuggling guard follows HTTP/1 message framing, which HTTP/2 streams do not have
            // (`stops_the_guard` is false for every HTTP/2 request).
            let service = service_fn(move |req| {
                let session = Arc::clone(&session);
                async move { Ok::<_, Infallible>(exchange::handle(session, req).await) }
            });
            let conn = h2_builder(&limits).serve_connection(TokioIo::new(tls), service);
            idle::watch(conn, &activity, limits.idle_timeout).await
        } else {
            serve_http1(session, tls, exchange::handle).await
        }
    };
    // SECURITY: a change that denies the host closes the open connection too, not only its next request.
    let ended = tokio::select! {
        ended = served => ended,
        reason = watcher.denied_later(&tunnel.target, tunnel.port, granted) => {
            tracing::info!(host = %tunnel.target, rule = reason.code(), "intercepted connection cut: the policy now denies it");
            let mut event = connect::tunnel_event(&watched_peer, &tunnel);
            event.refused(&reason, start);
            event.rule = "policy-changed".into();
            event.id = tunnel.audit_id;
            let _ = watcher.inner.audit.write(&event);
            return;
        }
    };
    match ended {
        None => tracing::debug!("intercepted connection idle; closed"),
        Some(Err(e)) => tracing::debug!(error = %e, "intercepted connection ended with an error"),
        Some(Ok(())) => {}
    }
}
