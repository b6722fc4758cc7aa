//! `CONNECT host:port` and what happens inside an allowed tunnel: the decision at CONNECT (403 before any
//! tunnel), the ClientHello gate (TLS only, SNI must name the CONNECT target), then either interception or, for
//! passthrough hosts, a relay to the address that was checked. There is no blind tunnel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bottle_policy::{HostRule, TlsMode};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::ask;
use crate::audit::{self, Event, Pending, Verdict};
use crate::body::{MeteredIo, ProxyBody, empty};
use crate::decide::{self, DenyReason, Target};
use crate::deny;
use crate::hello::{self, Hello, HelloError};
use crate::idle;
use crate::mitm;
use crate::proxy::Proxy;
use crate::rewind::Rewind;
use crate::session::{Peer, Session};
use crate::upstream::{self, Checked};

/// An allowed tunnel, with its one resolution and (usually) a connection already made to a checked address.
pub struct Tunnel {
    pub target: Target,
    pub port: u16,
    pub tls: TlsMode,
    pub checked: Checked,
    pub predialed: Option<(TcpStream, SocketAddr)>,
    /// The id of the CONNECT's decision line, for the tunnel's `end` line.
    pub audit_id: u64,
    /// Ask mode: the reviewer let this tunnel through to a host the policy does not cover; its requests are judged
    /// by this rule (and by the policy, should it come to cover the host).
    pub grant: Option<Arc<HostRule>>,
}

pub async fn handle(session: Arc<Session>, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    let proxy = &session.proxy;
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let mut event = Event {
        event: "connect",
        client: Arc::clone(&session.peer.label),
        method: "CONNECT".into(),
        scheme: "tunnel",
        host: authority.clone(),
        ..Event::default()
    };
    let (target, port) = match decide::parse_authority(&authority, None) {
        Ok(t) => t,
        Err(reason) => return refuse(proxy, event, &reason, start),
    };
    event.host = target.to_string();
    event.port = port;
    // A placeholder in a CONNECT head (say, Proxy-Authorization) would travel in clear text: a leak.
    let (mut uri, mut headers) = (req.uri().clone(), req.headers().clone());
    if let Err(reason) = proxy.inner.creds.apply(&mut uri, &mut headers, None) {
        event.event = "placeholder-leak";
        return refuse(proxy, event, &reason, start);
    }
    let policy = proxy.policy();
    let (rule, tls, grant, asked) = match decide::decide_target(&policy.network, &target, port) {
        Ok(a) => (a.rule.pattern.to_string(), a.tls, None, None),
        Err(reason) if ask::asks(proxy, &policy, &target, &reason) => {
            match ask::ask(proxy, &policy, &mut event, &target, port, None).await {
                Ok(g) => (event.rule.clone(), TlsMode::Intercept, Some(g.rule), Some(g.checked)),
                Err(reason) => return refuse(proxy, event, &reason, start),
            }
        }
        Err(reason) => return refuse(proxy, event, &reason, start),
    };
    let limits = &proxy.inner.limits;
    let resolved = match asked {
        Some(checked) => Ok(checked),
        None => upstream::resolve(&policy.network, &target, port, limits.connect_timeout).await,
    };
    let dialled = match resolved {
        Ok(checked) => upstream::dial(&checked, limits.connect_timeout)
            .await
            .map(|d| (checked, d)),
        Err(e) => Err(e),
    };
    let (checked, (tcp, addr)) = match dialled {
        Ok(d) => d,
        Err(e) => {
            if let Some(reason) = e.as_denial() {
                return refuse(proxy, event, &reason, start);
            }
            event.decision = Verdict::Error;
            event.rule = "upstream-unreachable".into();
            event.duration_ms = audit::elapsed_ms(start);
            let _ = proxy.inner.audit.write(&event);
            return deny::upstream_error(&target.to_string(), port, &upstream::describe(&e));
        }
    };
    event.rule = rule;
    event.duration_ms = audit::elapsed_ms(start);
    event.addr = Some(addr.ip().to_string());
    event.id = proxy.inner.audit.next_id();
    // SECURITY: the decision is on disk before the tunnel opens, or the tunnel does not open.
    if let Err(failure) = proxy.inner.audit.write(&event) {
        return deny::audit_failed(&target.to_string(), port, &failure);
    }
    let tunnel = Tunnel {
        target,
        port,
        tls,
        checked,
        predialed: Some((tcp, addr)),
        audit_id: event.id,
        grant,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (proxy, peer) = (proxy.clone(), session.peer.clone());
    let span = tracing::debug_span!("tunnel", host = %tunnel.target, port = tunnel.port);
    let relay = async move {
        match on_upgrade.await {
            Ok(upgraded) => run(proxy, peer, TokioIo::new(upgraded), tunnel).await,
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    };
    tokio::spawn(relay.instrument(span));
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}

fn refuse(proxy: &Proxy, mut event: Event, reason: &DenyReason, start: Instant) -> Response<ProxyBody> {
    event.refused(reason, start);
    tracing::debug!(host = %event.host, port = event.port, rule = reason.code(), "CONNECT denied");
    let _ = proxy.inner.audit.write(&event);
    deny::response(reason, &event.host, event.port)
}

/// Reads the ClientHello and hands the tunnel on. Anything but TLS closes the tunnel.
pub async fn run<S>(proxy: Proxy, peer: Peer, mut io: S, tunnel: Tunnel)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let start = Instant::now();
    let timeout = proxy.inner.limits.handshake_timeout;
    let hello = match tokio::time::timeout(timeout, hello::read(&mut io)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            let reason = match e {
                HelloError::NotTls => DenyReason::NotTls,
                _ => DenyReason::Framing("malformed or truncated ClientHello"),
            };
            return close(&proxy, &peer, &tunnel, &reason, start);
        }
        Err(_) => {
            let reason = DenyReason::Timeout("waiting for the ClientHello");
            return close(&proxy, &peer, &tunnel, &reason, start);
        }
    };
    after_hello(proxy, peer, io, hello, tunnel, start).await;
}

/// SECURITY: the SNI must name the tunnel's target (else: domain fronting); passthrough additionally needs an SNI
/// and no Encrypted Client Hello, since the name is the only thing the proxy can check in an opaque tunnel.
pub async fn after_hello<S>(proxy: Proxy, peer: Peer, io: S, hello: Hello, tunnel: Tunnel, start: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if let Some(sni) = &hello.sni
        && let Err(reason) = decide::check_same_host(&tunnel.target, tunnel.port, sni)
    {
        return close(&proxy, &peer, &tunnel, &reason, start);
    }
    match tunnel.tls {
        TlsMode::Intercept => mitm::serve(proxy, peer, Rewind::new(hello.raw, io), tunnel).await,
        TlsMode::Passthrough => {
            if hello.sni.is_none() || hello.ech {
                return close(&proxy, &peer, &tunnel, &DenyReason::MissingSni, start);
            }
            passthrough(proxy, peer, io, hello, tunnel, start).await;
        }
    }
}

async fn passthrough<S>(proxy: Proxy, peer: Peer, io: S, hello: Hello, mut tunnel: Tunnel, start: Instant)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut event = tunnel_event(&peer, &tunnel);
    let limits = &proxy.inner.limits;
    let dialled = match tunnel.predialed.take() {
        Some((tcp, _)) => Ok(tcp),
        None => upstream::dial(&tunnel.checked, limits.connect_timeout)
            .await
            .map(|(tcp, _)| tcp),
    };
    let mut up = match dialled {
        Ok(tcp) => tcp,
        Err(e) => {
            tracing::info!(host = %tunnel.target, error = %e, "passthrough upstream unreachable");
            event.decision = Verdict::Error;
            event.rule = "upstream-unreachable".into();
            event.duration_ms = audit::elapsed_ms(start);
            let _ = proxy.inner.audit.write(&event);
            return;
        }
    };
    event.rule = "passthrough".into();
    event.id = tunnel.audit_id;
    let pending = Pending::new(Arc::clone(&proxy.inner.audit), event, start);
    let mut io = MeteredIo::new(io, Arc::clone(&pending));
    let relay = async {
        up.write_all(&hello.raw).await?;
        tokio::io::copy_bidirectional(&mut io, &mut up).await
    };
    tokio::select! {
        relayed = idle::watch(relay, &peer.activity, limits.idle_timeout) => match relayed {
            Some(Ok(_)) => {}
            Some(Err(e)) => tracing::debug!(error = %e, "passthrough tunnel ended with an error"),
            None => pending.fail("idle-timeout"),
        },
        reason = proxy.denied_later(&tunnel.target, tunnel.port, false) => {
            tracing::info!(host = %tunnel.target, rule = reason.code(), "passthrough tunnel cut: the policy now denies it");
            pending.fail("policy-changed");
        }
    }
    // The ClientHello was read before the meter was in place.
    pending.add(hello.raw.len() as u64, 0);
}

pub fn tunnel_event(peer: &Peer, tunnel: &Tunnel) -> Event {
    Event {
        event: "tunnel",
        client: Arc::clone(&peer.label),
        scheme: if tunnel.tls == TlsMode::Passthrough {
            "passthrough"
        } else {
            "https"
        },
        host: tunnel.target.to_string(),
        port: tunnel.port,
        ..Event::default()
    }
}

/// Refuses a tunnel after CONNECT succeeded: nothing can be answered in HTTP any more, so close and audit.
pub fn close(proxy: &Proxy, peer: &Peer, tunnel: &Tunnel, reason: &DenyReason, start: Instant) {
    let mut event = tunnel_event(peer, tunnel);
    event.refused(reason, start);
    tracing::info!(host = %tunnel.target, rule = reason.code(), "tunnel closed");
    let _ = proxy.inner.audit.write(&event);
}
