//! Transparent mode: a connection redirected to the proxy without the client knowing (the bottle dialled some
//! address; the backend hands us the socket and its original destination). The host name comes from the TLS
//! ClientHello SNI or the HTTP `Host` header, the port from the original destination; the original address
//! itself is ignored: the proxy resolves the name and checks the answer like for any other request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bottle_policy::TlsMode;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::ask;
use crate::audit::{self, Event, Verdict};
use crate::connect::{self, Tunnel};
use crate::decide::{self, DenyReason, Target};
use crate::exchange;
use crate::hello;
use crate::http1::{connection_error, serve_http1};
use crate::idle::Tracked;
use crate::proxy::Proxy;
use crate::rewind::Rewind;
use crate::session::{Peer, Scope, Session};
use crate::upstream;

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

impl Proxy {
    /// Serves one redirected connection whose original destination was `original_dst`.
    pub async fn serve_transparent<S>(&self, stream: S, original_dst: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(slot) = self.slot().await else { return };
        let peer = Peer::new(format!("transparent:{original_dst}"), slot);
        let mut io = Tracked::new(stream, peer.activity.clone());
        let mut first = BytesMut::with_capacity(4096);
        let limits = self.inner.limits.clone();
        match tokio::time::timeout(limits.header_read_timeout, io.read_buf(&mut first)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
        let io = Rewind::new(first.clone().freeze(), io);
        if first[0] == TLS_HANDSHAKE {
            self.transparent_tls(io, original_dst.port(), peer).await;
        } else {
            self.transparent_http(io, original_dst.port(), peer).await;
        }
    }

    async fn transparent_tls<S>(&self, mut io: S, port: u16, peer: Peer)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let start = Instant::now();
        let mut event = Event {
            event: "transparent",
            client: Arc::clone(&peer.label),
            scheme: "tls",
            port,
            ..Event::default()
        };
        let timeout = self.inner.limits.handshake_timeout;
        let hello = match tokio::time::timeout(timeout, hello::read(&mut io)).await {
            Ok(Ok(h)) => h,
            _ => return self.refuse(event, &DenyReason::Framing("malformed ClientHello"), start),
        };
        let Some(sni) = hello.sni.clone() else {
            return self.refuse(event, &DenyReason::MissingSni, start);
        };
        event.host = sni.clone();
        let target = match Target::parse(&sni) {
            Ok(t) => t,
            Err(reason) => return self.refuse(event, &reason, start),
        };
        let policy = self.policy();
        let (rule, tls, grant, asked) = match decide::decide_target(&policy.network, &target, port) {
            Ok(a) => (a.rule.pattern.to_string(), a.tls, None, None),
            Err(reason) if ask::asks(self, &policy, &target, &reason) => {
                match ask::ask(self, &policy, &mut event, &target, port, None).await {
                    Ok(g) => (event.rule.clone(), TlsMode::Intercept, Some(g.rule), Some(g.checked)),
                    Err(reason) => return self.refuse(event, &reason, start),
                }
            }
            Err(reason) => return self.refuse(event, &reason, start),
        };
        let connect_timeout = self.inner.limits.connect_timeout;
        let resolved = match asked {
            Some(checked) => Ok(checked),
            None => upstream::resolve(&policy.network, &target, port, connect_timeout).await,
        };
        let checked = match resolved {
            Ok(c) => c,
            Err(e) => {
                if let Some(reason) = e.as_denial() {
                    return self.refuse(event, &reason, start);
                }
                tracing::info!(host = %target, port, error = %upstream::describe(&e), "upstream unreachable");
                event.decision = Verdict::Error;
                event.rule = "upstream-unreachable".into();
                event.duration_ms = audit::elapsed_ms(start);
                let _ = self.inner.audit.write(&event);
                return;
            }
        };
        event.rule = rule;
        event.duration_ms = audit::elapsed_ms(start);
        event.id = self.inner.audit.next_id();
        // SECURITY: the decision is on disk before anything is relayed, or the connection closes.
        if self.inner.audit.write(&event).is_err() {
            return;
        }
        let tunnel = Tunnel {
            target,
            port,
            tls,
            checked,
            predialed: None,
            audit_id: event.id,
            grant,
        };
        connect::after_hello(self.clone(), peer, io, hello, tunnel, start).await;
    }

    async fn transparent_http<S>(&self, io: S, port: u16, peer: Peer)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let session = Arc::new(Session::new(self.clone(), peer.clone(), Scope::Transparent { port }));
        if let Some(Err(e)) = serve_http1(session, io, exchange::handle).await {
            connection_error(self, &peer, &e);
        }
    }

    fn refuse(&self, mut event: Event, reason: &DenyReason, start: Instant) {
        event.refused(reason, start);
        tracing::info!(host = %event.host, port = event.port, rule = reason.code(), "transparent connection refused");
        let _ = self.inner.audit.write(&event);
    }
}
