//! Accepting clients: the explicit proxy on TCP or Unix sockets (also sockets bound elsewhere, e.g. in another
//! network namespace), with a bound on concurrent connections and the HTTP/1.1 and HTTP/2 server limits.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tracing::Instrument;

use crate::audit::{Event, Verdict};
use crate::body::ProxyBody;
use crate::connect;
use crate::exchange;
use crate::framing::{Guarded, OnViolation};
use crate::idle::{self, Tracked};
use crate::proxy::{Limits, Proxy, ProxyError};
use crate::session::{Peer, Scope, Session};

/// Pause after a failed accept (EMFILE and friends) so a full file table does not spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

pub fn h1_builder(limits: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        // A client may half-close after sending its request (`shutdown(SHUT_WR)`, as `nc -N` and some HTTP/1.0
        // clients do); it still wants the answer. Idle and header timeouts bound such connections as any other.
        .half_close(true)
        .keep_alive(true);
    b
}

pub fn h2_builder(limits: &Limits) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_h2_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // No keep-alive PINGs: they would count as activity and defeat the idle timeout.
        .max_pending_accept_reset_streams(Some(limits.max_h2_streams as usize));
    b
}

impl Proxy {
    /// Serves the explicit proxy (absolute-form HTTP and CONNECT) until the listener fails.
    pub async fn serve_tcp(&self, listener: TcpListener) -> Result<(), ProxyError> {
        loop {
            let slot = self.slot().await?;
            let (stream, addr) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(e).await?;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let peer = Peer::new(addr.to_string(), slot);
            let span = tracing::debug_span!("conn", client = %addr);
            tokio::spawn(serve_explicit(self.clone(), stream, peer).instrument(span));
        }
    }

    /// Same, on a Unix socket.
    pub async fn serve_unix(&self, listener: UnixListener) -> Result<(), ProxyError> {
        loop {
            let slot = self.slot().await?;
            let (stream, _) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(e).await?;
                    continue;
                }
            };
            let span = tracing::debug_span!("conn", client = "unix");
            tokio::spawn(serve_explicit(self.clone(), stream, Peer::new("unix", slot)).instrument(span));
        }
    }

    /// Serves an already-bound std listener (for example one created inside the bottle's network namespace).
    pub async fn serve_std_tcp(&self, listener: std::net::TcpListener) -> Result<(), ProxyError> {
        listener.set_nonblocking(true).map_err(ProxyError::Accept)?;
        self.serve_tcp(TcpListener::from_std(listener).map_err(ProxyError::Accept)?)
            .await
    }

    /// Holds a host-side address that must serve nobody: every connection is closed at once and audited. A bottle's
    /// own traffic arrives on its in-namespace listener; SECURITY: anything reaching this one is another local user
    /// or process, which must not use the bottle's allowlist or its credentials (#12).
    pub async fn refuse_std_tcp(&self, listener: std::net::TcpListener) -> Result<(), ProxyError> {
        listener.set_nonblocking(true).map_err(ProxyError::Accept)?;
        let listener = TcpListener::from_std(listener).map_err(ProxyError::Accept)?;
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(e).await?;
                    continue;
                }
            };
            drop(stream);
            tracing::info!(client = %addr, "refused a connection to the bottle's host-side address: not the bottle");
            let _ = self.inner.audit.write(&Event {
                event: "connection",
                client: Arc::from(addr.to_string()),
                decision: Verdict::Deny,
                rule: "not-the-bottle".into(),
                ..Event::default()
            });
        }
    }

    pub async fn serve_std_unix(&self, listener: std::os::unix::net::UnixListener) -> Result<(), ProxyError> {
        listener.set_nonblocking(true).map_err(ProxyError::Accept)?;
        self.serve_unix(UnixListener::from_std(listener).map_err(ProxyError::Accept)?)
            .await
    }

    pub(crate) async fn slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ProxyError> {
        Arc::clone(&self.inner.slots)
            .acquire_owned()
            .await
            .map_err(|_| ProxyError::Accept(std::io::Error::other("connection slots closed")))
    }
}

pub(crate) async fn accept_failed(e: std::io::Error) -> Result<(), ProxyError> {
    if e.kind() == std::io::ErrorKind::InvalidInput {
        return Err(ProxyError::Accept(e));
    }
    tracing::warn!(error = %e, "accept failed; retrying");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
    Ok(())
}

pub(crate) async fn serve_explicit<S>(proxy: Proxy, stream: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = proxy.inner.limits.clone();
    let activity = peer.activity.clone();
    let io = TokioIo::new(Guarded::new(
        Tracked::new(stream, activity.clone()),
        framing_report(&proxy, &peer),
    ));
    let session = Arc::new(Session::new(proxy.clone(), peer.clone(), Scope::Explicit));
    let service = service_fn(move |req| {
        let session = Arc::clone(&session);
        let guard_stopped = crate::framing::stops_the_guard(&req);
        async move {
            let mut resp = explicit_request(session, req).await;
            crate::framing::close_unless_switched(guard_stopped, &mut resp);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = h1_builder(&limits).serve_connection(io, service).with_upgrades();
    match idle::watch(conn, &activity, limits.idle_timeout).await {
        None => tracing::debug!(client = %peer.label, "client connection idle; closed"),
        Some(Err(e)) => connection_error(&proxy, &peer, &e),
        Some(Ok(())) => {}
    }
}

async fn explicit_request(session: Arc<Session>, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.method() == Method::CONNECT {
        return connect::handle(session, req).await;
    }
    exchange::handle(session, req).await
}

/// The smuggling guard closed the connection: audit it (hyper only sees the stream end).
pub fn framing_report(proxy: &Proxy, peer: &Peer) -> OnViolation {
    let (audit, client) = (Arc::clone(&proxy.inner.audit), Arc::clone(&peer.label));
    Box::new(move |v| {
        tracing::info!(%client, reason = v.0, "request framing refused; connection closed");
        let _ = audit.write(&Event {
            event: "connection",
            client,
            decision: Verdict::Deny,
            rule: "framing".into(),
            ..Event::default()
        });
    })
}

/// A connection hyper gave up on (malformed head, oversized head, smuggling guard, header timeout): audited;
/// only that connection closes.
pub fn connection_error(proxy: &Proxy, peer: &Peer, e: &hyper::Error) {
    tracing::debug!(client = %peer.label, error = %e, "client connection error");
    let rule = if e.is_parse_too_large() {
        "head-too-large"
    } else if e.is_parse() {
        "malformed-request"
    } else if e.is_timeout() {
        "header-timeout"
    } else {
        return;
    };
    let _ = proxy.inner.audit.write(&Event {
        event: "connection",
        client: Arc::clone(&peer.label),
        decision: Verdict::Deny,
        rule: rule.into(),
        ..Event::default()
    });
}
