//! Per-request rules inside interception: method/path rules before any body byte, HTTP/2 streams policed one by
//! one, WebSocket upgrades.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use bytes::Bytes;
use fixture::*;
use http::{Request, Version};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn post_to_a_get_only_rule_is_refused_before_any_body_byte_goes_upstream() {
    let w = World::start().await;
    let at = w.tls_at("rules.test");
    let mut tls = w.lab.tls_tunnel(&at, "rules.test", &[b"http/1.1"]).await.unwrap();
    let head = format!("POST /allowed/x HTTP/1.1\r\nHost: {at}\r\nContent-Length: 100000\r\n\r\nfirst-body-bytes");
    tls.write_all(head.as_bytes()).await.unwrap();
    let (status, headers) = read_head(&mut tls).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=request-rule"), "{}", denied(&headers));
    assert_eq!(
        w.tls_rec.bytes_in(),
        0,
        "the upstream received nothing, not even a handshake"
    );

    // GET on an allowed path works on a fresh tunnel.
    let mut client = w.lab.h1_in_tunnel(&at).await;
    let (status, _, _) = text(client.send_request(get("/allowed/x", &at)).await.unwrap()).await;
    assert_eq!(status, 200);
    let (status, headers, _) = text(client.send_request(get("/elsewhere", &at)).await.unwrap()).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("a [[host.rule]] for rules.test admitting GET /elsewhere"));
    assert_eq!(w.tls_rec.requests().len(), 1);
}

#[tokio::test]
async fn h2_through_interception_is_policed_per_request() {
    let w = World::start().await;
    let at = w.tls_at("rules.test");
    let tls = w.lab.tls_tunnel(&at, "rules.test", &[b"h2"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut client = h2(tls).await;
    let req = |path: &str| {
        Request::get(format!("https://{at}{path}"))
            .version(Version::HTTP_2)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let (status, _, body) = text(client.send_request(req("/allowed/one")).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let (status, headers, _) = text(client.send_request(req("/denied")).await.unwrap()).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=request-rule"));
    let (status, _, _) = text(client.send_request(req("/allowed/two")).await.unwrap()).await;
    assert_eq!(status, 200);
    // :authority naming another host inside the tunnel is fronting.
    let fronted = Request::get(format!("https://{}/allowed/x", w.tls_at("other.test")))
        .version(Version::HTTP_2)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, _) = text(client.send_request(fronted).await.unwrap()).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=host-mismatch"));
    let seen = w.tls_rec.requests();
    let paths: Vec<_> = seen.iter().map(|s| s.uri.clone()).collect();
    assert_eq!(seen.len(), 2, "{paths:?}");
    assert!(
        seen.iter().all(|s| s.version == Version::HTTP_2),
        "upstream spoke h2 too"
    );
}

fn upgrade_request(path: &str, at: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", at)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn websocket_upgrade_on_an_allowed_path_echoes_and_a_disallowed_path_is_403() {
    let w = World::start().await;
    let at = w.tls_at("rules.test");
    let mut client = w.lab.h1_in_tunnel(&at).await;
    let resp = client.send_request(upgrade_request("/ws/ok", &at)).await.unwrap();
    assert_eq!(resp.status(), 101);
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut io = TokioIo::new(upgraded);
    io.write_all(b"ping through the bottle").await.unwrap();
    let mut buf = [0u8; 23];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping through the bottle");
    drop(io);

    let mut client = w.lab.h1_in_tunnel(&at).await;
    let resp = client.send_request(upgrade_request("/ws/no", &at)).await.unwrap();
    let (status, headers, _) = text(resp).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=request-rule"));
    let line = w
        .lab
        .wait_audit(|v| v["path"] == "/ws/ok" && v["event"] == "request")
        .await;
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["upgrade"], "websocket");
    let end = w.lab.wait_audit(|v| v["path"] == "/ws/ok" && v["event"] == "end").await;
    assert!(end["bytes_up"].as_u64().unwrap() >= 23);
}
