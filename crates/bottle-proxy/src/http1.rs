//! Serving one policed HTTP/1 client connection: hyper's server with the proxy's limits, the smuggling guard under
//! it, the close-unless-switched rule over it, and the idle watch around it. Every HTTP/1 entry point (the explicit
//! proxy, an intercepted tunnel, transparent plain HTTP) goes through `serve_http1`; it trusts the handler to police
//! each request, and nothing else here (the framing is the guard's to refuse).
//!
//! SECURITY: the HTTP/1 builder is private to this module, so an entry point cannot serve HTTP/1 without the guard:
//! a fourth entry point that assembled the pieces by hand could forget one (the `Guarded` reader, or the close after
//! a request the guard stopped following) and silently let a CL+TE request through.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::audit::{Event, Verdict};
use crate::body::ProxyBody;
use crate::framing::{self, Guarded, OnViolation};
use crate::idle;
use crate::proxy::{Limits, Proxy};
use crate::session::{Peer, Session};

/// How a served connection ended: `None` when it was cut off idle, else hyper's result.
pub type Ended = Option<Result<(), hyper::Error>>;

/// Serves `io` (the client's stream, already counted for the idle clock) as HTTP/1.1 with upgrades, each request
/// answered by `handle`, until the client leaves, the guard or hyper refuses, or the connection idles out.
pub async fn serve_http1<S, H, F>(session: Arc<Session>, io: S, handle: H) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Arc<Session>, Request<Incoming>) -> F + Copy + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let limits = session.proxy.inner.limits.clone();
    let activity = session.peer.activity.clone();
    let io = TokioIo::new(Guarded::new(io, framing_report(&session.proxy, &session.peer)));
    let service = service_fn(move |req| {
        let session = Arc::clone(&session);
        let guard_stopped = framing::stops_the_guard(&req);
        async move {
            let mut resp = handle(session, req).await;
            framing::close_unless_switched(guard_stopped, &mut resp);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = builder(&limits).serve_connection(io, service).with_upgrades();
    idle::watch(conn, &activity, limits.idle_timeout).await
}

fn builder(limits: &Limits) -> http1::Builder {
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

/// The smuggling guard closed the connection: audit it (hyper only sees the stream end).
fn framing_report(proxy: &Proxy, peer: &Peer) -> OnViolation {
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
