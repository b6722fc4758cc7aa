//! One HTTP request through the proxy: route it to a target, decide, inject credentials, relay it upstream and the
//! response back, audit it. SECURITY: every check happens before the upstream is dialled and before a body byte
//! is read, so a refused request's body never leaves the proxy.

use std::sync::Arc;
use std::time::Instant;

use bottle_policy::{HostRule, Policy};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version, request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::ask;
use crate::audit::{self, Event, Pending, Verdict};
use crate::body::{Direction, MeteredIo, ProxyBody, empty, metered};
use crate::credentials::Credentials;
use crate::decide::{self, DenyReason, Target};
use crate::deny;
use crate::idle;
use crate::secrets::{Found, GuardedRead, Mode, Scanned, Scanner};
use crate::session::{Scope, Session};
use crate::switch::{self, Switch, connection_tokens};
use crate::upstream;

pub async fn handle(session: Arc<Session>, req: Request<Incoming>) -> Response<ProxyBody> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let intercepted = matches!(session.scope, Scope::Tunnel { .. });
    let mut event = Event {
        event: "request",
        client: Arc::clone(&session.peer.label),
        method: parts.method.to_string(),
        scheme: if intercepted { "https" } else { "http" },
        path: audit::redact_path(parts.uri.path(), parts.uri.query()),
        ..Event::default()
    };
    let (target, port) = match route(&session.scope, &parts) {
        Ok(r) => r,
        Err(reason) => {
            event.host = parts.uri.host().unwrap_or_default().to_string();
            return refuse(&session, event, &reason, start);
        }
    };
    event.host = target.to_string();
    event.port = port;
    if let Err(reason) = check_framing(&parts) {
        return refuse(&session, event, &reason, start);
    }
    let policy = session.proxy.policy();
    let decided = decide::decide_request(
        &policy.network,
        &target,
        port,
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query(),
    );
    let granted: Arc<HostRule>;
    let (rule, label) = match decided {
        Ok(allowed) => (allowed.rule, allowed.rule.pattern.to_string()),
        // A tunnel the reviewer let through (its CONNECT was asked): its requests need no question of their own.
        Err(DenyReason::HostNotAllowed) if let Some(grant) = &session.grant => {
            if let Err(reason) = decide::check_path(parts.uri.path()) {
                return refuse(&session, event, &reason, start);
            }
            (&**grant, "approved-once".to_string())
        }
        Err(reason) if !intercepted && ask::asks(&session.proxy, &policy, &target, &reason) => {
            // SECURITY: a placeholder sent to a host it is not bound to is refused as always, never asked about.
            let (mut uri, mut headers) = (parts.uri.clone(), parts.headers.clone());
            if let Err(reason) = session.proxy.inner.creds.apply(&mut uri, &mut headers, None) {
                event.event = "placeholder-leak";
                return refuse(&session, event, &reason, start);
            }
            let request = Some((parts.method.as_str(), parts.uri.path()));
            match ask::ask(&session.proxy, &policy, &mut event, &target, port, request).await {
                Ok(g) => {
                    if let Err(reason) = decide::check_path(parts.uri.path()) {
                        return refuse(&session, event, &reason, start);
                    }
                    granted = g.rule;
                    (&*granted, event.rule.clone())
                }
                Err(reason) => return refuse(&session, event, &reason, start),
            }
        }
        Err(reason) => return refuse(&session, event, &reason, start),
    };
    let switch = match switch::police(&mut parts, rule) {
        Ok(switch) => switch,
        Err(reason) => return refuse(&session, event, &reason, start),
    };
    // SECURITY: secrets only inside interception, only for the bound host; anything else is a leak.
    let bound = if intercepted { target.name() } else { None };
    let injected = match session
        .proxy
        .inner
        .creds
        .apply(&mut parts.uri, &mut parts.headers, bound)
    {
        Ok(injected) => injected,
        Err(reason) => {
            event.event = "placeholder-leak";
            return refuse(&session, event, &reason, start);
        }
    };
    event.rule = label;
    event.decision = if injected.is_empty() {
        Verdict::Allow
    } else {
        Verdict::Inject
    };
    event.credentials = injected;
    event.upgrade = switch.protocol().map(str::to_string);
    relay(&session, &policy, parts, body, &target, port, switch, event, start).await
}

/// Which target a request goes to, by scope.
fn route(scope: &Scope, parts: &request::Parts) -> Result<(Target, u16), DenyReason> {
    let host_header = match parts.headers.get_all(header::HOST).iter().count() {
        0 => None,
        1 => parts
            .headers
            .get(header::HOST)
            .map(|h| h.to_str().unwrap_or("\u{fffd}")),
        _ => return Err(DenyReason::Framing("more than one Host header")),
    };
    match scope {
        Scope::Explicit => match parts.uri.scheme_str() {
            Some("http") => {
                let authority = parts.uri.authority().ok_or(DenyReason::BadTarget)?;
                decide::parse_authority(authority.as_str(), Some(80))
            }
            Some(_) => Err(DenyReason::HttpsInPlainRequest),
            None => Err(DenyReason::NotProxyRequest),
        },
        Scope::Transparent { port } => {
            let host = host_header.ok_or(DenyReason::Framing("no Host header"))?;
            let (target, seen_port) = decide::parse_authority(host, Some(*port))?;
            if seen_port != *port {
                return Err(DenyReason::HostMismatch { seen: host.to_string() });
            }
            Ok((target, *port))
        }
        Scope::Tunnel { target, port } => {
            // SECURITY: domain fronting. The tunnel was decided for `target`; every name the request carries
            // (absolute-form authority or HTTP/2 `:authority`, and `Host`) must be that target.
            let authority = parts.uri.authority().map(|a| a.as_str());
            if authority.is_none() && host_header.is_none() {
                return Err(DenyReason::Framing("no Host header"));
            }
            for seen in authority.into_iter().chain(host_header) {
                decide::check_same_host(target, *port, seen)?;
            }
            Ok((target.clone(), *port))
        }
    }
}

/// Framing the proxy refuses rather than interprets (RFC 9112 §6.3; hyper already rejects invalid lengths).
fn check_framing(parts: &request::Parts) -> Result<(), DenyReason> {
    let te = parts.headers.contains_key(header::TRANSFER_ENCODING);
    let cl = parts.headers.get(header::CONTENT_LENGTH);
    if te && cl.is_some() {
        return Err(DenyReason::Framing("both Content-Length and Transfer-Encoding"));
    }
    // SECURITY: a body on GET/HEAD is where front and back ends disagree most (some ignore it, some don't).
    let has_body = te || cl.is_some_and(|v| v.as_bytes() != b"0");
    if has_body && (parts.method == Method::GET || parts.method == Method::HEAD) {
        return Err(DenyReason::Framing("a GET or HEAD request with a body"));
    }
    Ok(())
}

fn refuse(session: &Session, mut event: Event, reason: &DenyReason, start: Instant) -> Response<ProxyBody> {
    event.refused(reason, start);
    tracing::debug!(host = %event.host, port = event.port, rule = reason.code(), "request denied");
    let _ = session.proxy.inner.audit.write(&event);
    deny::response(reason, &event.host, event.port)
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    session: &Session,
    policy: &Policy,
    mut parts: request::Parts,
    body: Incoming,
    target: &Target,
    port: u16,
    switch: Switch,
    mut event: Event,
    start: Instant,
) -> Response<ProxyBody> {
    let upgrade = switch.is_upgrade();
    let head_request = parts.method == Method::HEAD;
    let client_upgrade = parts.extensions.remove::<OnUpgrade>().filter(|_| upgrade);
    let creds = &session.proxy.inner.creds;
    // SECURITY: answers from a credentialed host may echo the real value; ask for a body the proxy can search
    // (no compression, no WebSocket compression) and search it (`secrets`).
    let scan_answers = target.name().is_some_and(|n| creds.is_bound(n)) && !creds.needles().is_empty();
    if scan_answers {
        parts
            .headers
            .insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    }
    let (mut sender, addr) = match session.upstream(&policy.network, target, port, upgrade).await {
        Ok(s) => s,
        Err(e) => {
            if let Some(reason) = e.as_denial() {
                return refuse(session, event, &reason, start);
            }
            tracing::info!(host = %target, port, error = %e, "upstream unreachable");
            event.decision = Verdict::Error;
            event.rule = "upstream-unreachable".into();
            event.duration_ms = audit::elapsed_ms(start);
            let _ = session.proxy.inner.audit.write(&event);
            return deny::upstream_error(&target.to_string(), port, &upstream::describe(&e));
        }
    };
    let h2 = sender.is_h2();
    let tls = matches!(session.scope, Scope::Tunnel { .. });
    // SECURITY: the decision is on disk before a byte goes upstream, or nothing goes.
    event.addr = Some(addr.ip().to_string());
    event.id = session.proxy.inner.audit.next_id();
    event.duration_ms = audit::elapsed_ms(start);
    if let Err(failure) = session.proxy.inner.audit.write(&event) {
        return deny::audit_failed(&target.to_string(), port, &failure);
    }
    let pending = Pending::new(Arc::clone(&session.proxy.inner.audit), event, start);
    let out_body = if upgrade {
        empty()
    } else {
        refuse_real_values(metered(body, &pending, Direction::Up), creds, &pending)
    };
    let out = match outbound(parts, out_body, target, port, tls, h2, upgrade) {
        Ok(r) => r,
        Err(reason) => {
            pending.fail(reason.code());
            return deny::response(&reason, &target.to_string(), port);
        }
    };
    let sent = sender.send(out);
    if !h2 && !upgrade {
        session.give_back(target, port, sender, addr);
    }
    let mut resp = match sent.await {
        Ok(r) => r,
        Err(e) => {
            if pending.failure().as_deref() == Some("secret-leak") {
                let env = creds.needles().first().map(|n| n.env.clone()).unwrap_or_default();
                return deny::response(&DenyReason::SecretLeak { env }, &target.to_string(), port);
            }
            tracing::info!(host = %target, port, error = %e, "upstream request failed");
            pending.fail("upstream-error");
            return deny::upstream_error(&target.to_string(), port, "the upstream connection failed");
        }
    };
    pending.set_status(resp.status().as_u16());
    if let Err(why) = switch::answered(&switch, &resp) {
        tracing::info!(host = %target, port, why, "protocol switch refused");
        pending.fail("bad-upgrade");
        return deny::upstream_error(&target.to_string(), port, why);
    }
    creds.redact_response(resp.headers_mut());
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return splice_upgrade(session, client_upgrade, resp, pending, scan_answers, (target, port));
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    let scan_body = scan_answers && !head_request && status_has_body(resp.status());
    if scan_body {
        let encoding = resp.headers().get(header::CONTENT_ENCODING);
        if encoding.is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity")) {
            tracing::info!(host = %target, port, "credentialed host answered with a compressed body");
            pending.fail("unscannable-encoding");
            return deny::upstream_error(
                &target.to_string(),
                port,
                "the host holds a credential and answered with a compressed body, which the proxy cannot search for the real value",
            );
        }
        // The length may change: a real value and its placeholder differ in length.
        resp.headers_mut().remove(header::CONTENT_LENGTH);
    }
    let (mut head, body) = resp.into_parts();
    head.version = Version::HTTP_11;
    let body = metered(body, &pending, Direction::Down);
    let body = if scan_body {
        let scanner = Scanner::new(creds.needles(), Mode::Redact);
        Scanned::new(body, scanner, Box::new(|_| {})).boxed_unsync()
    } else {
        body
    };
    Response::from_parts(head, body)
}

/// SECURITY: a request body that carries a real value is cut before the value leaves (the upstream sees a broken
/// message, never a complete one), and audited.
fn refuse_real_values(body: ProxyBody, creds: &Credentials, pending: &Arc<Pending>) -> ProxyBody {
    let needles = creds.needles();
    if needles.is_empty() {
        return body;
    }
    let pending = Arc::clone(pending);
    let report = Box::new(move |found: &Found| {
        tracing::warn!(env = %found.env, "a request body carried a real credential value; cut");
        pending.fail("secret-leak");
    });
    Scanned::new(body, Scanner::new(needles, Mode::Refuse), report).boxed_unsync()
}

/// RFC 9110 §6.4.1: 1xx, 204 and 304 answers have no content.
fn status_has_body(status: StatusCode) -> bool {
    !(status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED)
}

/// A switch the upstream answered as asked (`switch::answered`): splice the two upgraded streams. The upgraded
/// connection stays on the host it was decided for; what comes back from a credentialed host is searched for
/// real values, and the stream is cut before one reaches the bottle.
fn splice_upgrade(
    session: &Session,
    client: Option<OnUpgrade>,
    mut resp: Response<Incoming>,
    pending: Arc<Pending>,
    scan_answers: bool,
    (target, port): (&Target, u16),
) -> Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut resp);
    let (proxy, target) = (session.proxy.clone(), target.clone());
    let granted = session.grant.is_some();
    let activity = session.peer.activity.clone();
    let idle = session.proxy.inner.limits.idle_timeout;
    let needles = if scan_answers {
        session.proxy.inner.creds.needles()
    } else {
        Arc::from(Vec::new())
    };
    tokio::spawn(async move {
        let Some(client) = client else { return };
        let (Ok(client), Ok(upstream)) = (client.await, upstream.await) else {
            pending.fail("upgrade-failed");
            return;
        };
        let mut a = MeteredIo::new(TokioIo::new(client), Arc::clone(&pending));
        let mut b = GuardedRead::new(TokioIo::new(upstream), Scanner::new(needles, Mode::Refuse));
        tokio::select! {
            relayed = idle::watch(tokio::io::copy_bidirectional(&mut a, &mut b), &activity, idle) => match relayed {
                None => pending.fail("idle-timeout"),
                Some(Err(e)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    tracing::warn!("an upgraded stream carried a real credential value; cut");
                    pending.fail("secret-leak");
                }
                Some(_) => {}
            },
            reason = proxy.denied_later(&target, port, granted) => {
                tracing::info!(host = %target, rule = reason.code(), "upgraded stream cut: the policy now denies it");
                pending.fail("policy-changed");
            }
        }
    });
    let (head, _) = resp.into_parts();
    Response::from_parts(head, empty())
}

/// The request as the upstream gets it: origin-form plus `Host` for HTTP/1.1, absolute URI for HTTP/2.
fn outbound(
    parts: request::Parts,
    body: ProxyBody,
    target: &Target,
    port: u16,
    tls: bool,
    h2: bool,
    upgrade: bool,
) -> Result<Request<ProxyBody>, DenyReason> {
    let bad = || DenyReason::Framing("the request target cannot be rewritten");
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers, upgrade);
    let default_port = if tls { 443 } else { 80 };
    let authority = if port == default_port {
        target.to_string()
    } else {
        format!("{target}:{port}")
    };
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = if h2 {
        format!("{}://{authority}{pq}", if tls { "https" } else { "http" }).parse()
    } else {
        pq.parse()
    }
    .map_err(|_| bad())?;
    if h2 {
        headers.remove(header::HOST);
    } else {
        headers.insert(header::HOST, HeaderValue::from_str(&authority).map_err(|_| bad())?);
    }
    let mut req = Request::new(body);
    *req.method_mut() = parts.method;
    *req.uri_mut() = uri;
    *req.version_mut() = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    *req.headers_mut() = headers;
    Ok(req)
}

/// RFC 9110 §7.6.1: connection-specific fields are for one hop only (and forbidden in HTTP/2).
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        // Framing and routing fields are rewritten by the proxy, never dropped on request.
        .filter(|n| n != header::HOST && n != header::CONTENT_LENGTH && n != header::UPGRADE)
        .collect();
    for name in listed {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TRANSFER_ENCODING,
        header::TE,
        header::EXPECT,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: Request<()>) -> request::Parts {
        req.into_parts().0
    }

    #[test]
    fn get_with_a_body_and_cl_te_are_refused() {
        let p = parts(Request::get("/").header("content-length", "5").body(()).unwrap());
        assert!(check_framing(&p).is_err());
        let p = parts(
            Request::post("/")
                .header("content-length", "5")
                .header("transfer-encoding", "chunked")
                .body(())
                .unwrap(),
        );
        assert!(check_framing(&p).is_err());
        let p = parts(Request::post("/").header("content-length", "5").body(()).unwrap());
        assert!(check_framing(&p).is_ok());
    }

    #[test]
    fn hop_by_hop_fields_go_and_listed_ones_too() {
        let mut h = HeaderMap::new();
        h.insert("connection", "x-secret-hop, keep-alive".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("proxy-authorization", "Basic x".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(h.contains_key("x-keep") && h.contains_key("te"));
    }

    #[test]
    fn tunnel_requests_must_name_the_tunnel_host() {
        let scope = Scope::Tunnel {
            target: Target::parse("a.example.com").unwrap(),
            port: 443,
        };
        let ok = parts(Request::get("/").header("host", "a.example.com").body(()).unwrap());
        assert!(route(&scope, &ok).is_ok());
        let fronted = parts(Request::get("/").header("host", "b.example.com").body(()).unwrap());
        assert_eq!(route(&scope, &fronted).unwrap_err().code(), "host-mismatch");
        let h2 = parts(Request::get("https://b.example.com/").body(()).unwrap());
        assert_eq!(route(&scope, &h2).unwrap_err().code(), "host-mismatch");
    }
}
