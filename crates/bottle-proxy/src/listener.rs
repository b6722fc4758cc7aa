//! Accepting clients: the explicit proxy on TCP or Unix sockets (also sockets bound elsewhere, e.g. in another
//! network namespace), with a bound on concurrent connections, and the HTTP/2 server limits (HTTP/1 is served
//! only through `http1`).

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tracing::Instrument;

use crate::audit::{Event, Verdict};
use crate::body::ProxyBody;
use crate::connect;
use crate::exchange;
use crate::http1::{connection_error, serve_http1};
use crate::idle::Tracked;
use crate::proxy::{Limits, Proxy, ProxyError};
use crate::session::{Peer, Scope, Session};

/// Pause after a failed accept (EMFILE and friends) so a full file table does not spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

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
            tracing::info!(client = %addr, "refused a connection to the bottle's host-side address: not the bottle");
            // Recorded before the close: whoever sees the connection end can find its line in the audit log.
            let _ = self.inner.audit.write(&Event {
                event: "connection",
                client: Arc::from(addr.to_string()),
                decision: Verdict::Deny,
                rule: "not-the-bottle".into(),
                ..Event::default()
            });
            drop(stream);
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
    let io = Tracked::new(stream, peer.activity.clone());
    let session = Arc::new(Session::new(proxy.clone(), peer.clone(), Scope::Explicit));
    match serve_http1(session, io, explicit_request).await {
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
