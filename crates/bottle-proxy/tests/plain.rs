//! Plain-HTTP absolute-form requests, and connection-level hygiene: smuggling, malformed heads, paths.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use fixture::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn absolute_form_allowed_and_denied() {
    let w = World::start().await;
    let mut client = w.lab.h1_to_proxy().await;
    let url = format!("http://{}/plain?x=1", w.http_at("upstream.test"));
    let (status, _, body) = text(client.send_request(get(&url, "ignored.example")).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let seen = w.http_rec.requests();
    assert_eq!(seen[0].uri, "/plain?x=1", "upstream gets origin-form");
    assert_eq!(
        seen[0].headers["host"],
        w.http_at("upstream.test").as_str(),
        "Host is the URL's authority"
    );

    // Same kept-alive connection, a host outside the allow list.
    let url = format!("http://denied.test:{}/", w.http.port());
    let (status, headers, _) = text(client.send_request(get(&url, "denied.test")).await.unwrap()).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).starts_with("host=denied.test; rule=not-allowed"));
    // And an IP literal outside the CIDR.
    let url = format!("http://127.0.0.2:{}/", w.http.port());
    let (status, headers, _) = text(client.send_request(get(&url, "127.0.0.2")).await.unwrap()).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=ip-literal"));
    assert_eq!(w.http_rec.requests().len(), 1);
    let line = w
        .lab
        .wait_audit(|v| v["event"] == "request" && v["decision"] == "allow")
        .await;
    assert_eq!(line["scheme"], "http");
}

#[tokio::test]
async fn origin_form_and_https_urls_are_not_proxied() {
    let w = World::start().await;
    let mut client = w.lab.h1_to_proxy().await;
    let (status, _, _) = text(client.send_request(get("/", "upstream.test")).await.unwrap()).await;
    assert_eq!(status, 400);
    let url = format!("https://{}/", w.tls_at("upstream.test"));
    let (status, headers, _) = text(client.send_request(get(&url, "upstream.test")).await.unwrap()).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=https-needs-connect"));
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_rejected_and_nothing_is_smuggled() {
    let w = World::start().await;
    let host = w.http_at("upstream.test");
    let mut s = TcpStream::connect(w.lab.addr).await.unwrap();
    let attack = format!(
        "POST http://{host}/first HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
         0\r\n\r\nGET http://{host}/smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    s.write_all(attack.as_bytes()).await.unwrap();
    let reply = read_to_close(&mut s).await.expect("the connection must close");
    assert!(
        !String::from_utf8_lossy(&reply).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(w.http_rec.bytes_in(), 0, "no byte reached the upstream");
    let line = w.lab.wait_audit(|v| v["event"] == "connection").await;
    assert_eq!(line["rule"], "framing");
}

/// Regression: the smuggling guard stops following the stream at a head with an `Upgrade` header; an upstream
/// that answered without 101 left the connection open, and a pipelined CL+TE request then reached it unguarded.
#[tokio::test]
async fn an_upgrade_request_that_was_not_switched_closes_the_connection() {
    let w = World::start().await;
    let host = w.http_at("upstream.test");
    let mut s = TcpStream::connect(w.lab.addr).await.unwrap();
    let attack = format!(
        "GET http://{host}/first HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\r\n\
         POST http://{host}/smuggled HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
         0\r\n\r\n"
    );
    s.write_all(attack.as_bytes()).await.unwrap();
    let reply = read_to_close(&mut s)
        .await
        .expect("the connection must close after the first answer");
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.contains("connection: close") || reply.contains("Connection: close"),
        "{reply}"
    );
    let paths: Vec<String> = w.http_rec.requests().iter().map(|r| r.uri.clone()).collect();
    assert!(
        !paths.iter().any(|p| p.contains("smuggled")),
        "the pipelined CL+TE request reached the upstream: {paths:?}"
    );
}

#[tokio::test]
async fn get_with_a_body_is_refused() {
    let w = World::start().await;
    let host = w.http_at("upstream.test");
    let mut s = TcpStream::connect(w.lab.addr).await.unwrap();
    let req = format!("GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\nabc");
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, headers) = read_head(&mut s).await;
    assert_eq!(status, 400);
    assert!(denied(&headers).contains("rule=framing"));
    assert_eq!(w.http_rec.bytes_in(), 0);
}

#[tokio::test]
async fn malformed_head_closes_that_connection_only() {
    let w = World::start().await;
    let mut bad = TcpStream::connect(w.lab.addr).await.unwrap();
    bad.write_all(b"GET http://x/ HTTP/1.1\r\nBad Header Line\r\n\r\n")
        .await
        .unwrap();
    let reply = read_to_close(&mut bad).await.expect("closed");
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 400"), "{reply:?}");

    // Oversized head.
    let mut big = TcpStream::connect(w.lab.addr).await.unwrap();
    let huge = format!("GET http://x/ HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(70 * 1024));
    let _ = big.write_all(huge.as_bytes()).await;
    let reply = read_to_close(&mut big).await.expect("closed");
    assert!(
        String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );

    // The proxy still serves.
    let mut client = w.lab.h1_to_proxy().await;
    let url = format!("http://{}/after", w.http_at("upstream.test"));
    let (status, _, _) = text(client.send_request(get(&url, "x")).await.unwrap()).await;
    assert_eq!(status, 200);
    w.lab
        .wait_audit(|v| v["event"] == "connection" && v["rule"] == "malformed-request")
        .await;
}

#[tokio::test]
async fn traversal_and_encoded_separators_are_refused() {
    let w = World::start().await;
    let host = w.http_at("upstream.test");
    for path in ["/a/../b", "/a/%2e%2e/b", "/a%2Fb", "/a%5Cb"] {
        let mut s = TcpStream::connect(w.lab.addr).await.unwrap();
        let req = format!("GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, headers) = read_head(&mut s).await;
        assert_eq!(status, 400, "{path}");
        assert!(denied(&headers).contains("rule=bad-path"), "{path}");
    }
    assert_eq!(w.http_rec.bytes_in(), 0);
}

/// Regression (#13): a client that half-closes after sending its request body got no response although the
/// upstream answered.
#[tokio::test]
async fn a_client_that_half_closes_after_its_body_still_gets_the_answer() {
    let w = World::start().await;
    let host = w.http_at("upstream.test");
    let mut s = TcpStream::connect(w.lab.addr).await.unwrap();
    let req = format!("POST http://{host}/half HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello");
    s.write_all(req.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let reply = read_to_close(&mut s).await.expect("the proxy must answer, then close");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("ok POST /half"), "{reply}");
    assert_eq!(w.http_rec.requests()[0].body, "hello");
}
