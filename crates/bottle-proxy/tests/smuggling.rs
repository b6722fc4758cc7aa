//! The smuggling guard at every HTTP/1 entry point: a request carrying both `Content-Length` and
//! `Transfer-Encoding` (RFC 9112 §6.1) closes the connection with a `framing` audit line, and neither it nor the
//! request pipelined behind it reaches the upstream, whether it came to the explicit proxy, inside an intercepted
//! CONNECT tunnel, or redirected in transparent mode (plain or TLS).
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use std::net::SocketAddr;

use fixture::*;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A CL+TE request whose chunked reading hides a second request; `target` is the request-target of both.
fn attack(target: &str, host: &str) -> String {
    format!(
        "POST {target}first HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
         0\r\n\r\nGET {target}smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"
    )
}

/// Sends the attack and asserts the guard's refusal: the connection closes without an answer from the upstream,
/// and the refusal is audited.
async fn assert_refused<S: AsyncRead + AsyncWrite + Unpin>(w: &World, mut s: S, target: &str, host: &str) {
    s.write_all(attack(target, host).as_bytes()).await.unwrap();
    let reply = read_to_close(&mut s).await.expect("the connection must close");
    let reply = String::from_utf8_lossy(&reply);
    assert!(!reply.contains("200 OK"), "{reply}");
    let line = w
        .lab
        .wait_audit(|v| v["event"] == "connection" && v["rule"] == "framing")
        .await;
    assert_eq!(line["decision"], "deny");
    assert!(w.http_rec.requests().is_empty(), "a request reached the plain upstream");
    assert!(w.tls_rec.requests().is_empty(), "a request reached the TLS upstream");
}

/// A listener standing in for the redirect: every connection is handed over with `original_dst`.
async fn redirect_to(lab: &Lab, original_dst: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = lab.proxy.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.serve_transparent(stream, original_dst).await });
        }
    });
    addr
}

#[tokio::test]
async fn the_explicit_proxy_refuses_a_request_that_reads_two_ways() {
    let w = World::start().await;
    let host = w.http_at("upstream.test");
    let s = TcpStream::connect(w.lab.addr).await.unwrap();
    assert_refused(&w, s, &format!("http://{host}/"), &host).await;
    assert_eq!(w.http_rec.bytes_in(), 0, "no byte reached the upstream");
}

#[tokio::test]
async fn an_intercepted_tunnel_refuses_a_request_that_reads_two_ways() {
    let w = World::start().await;
    let tls = w
        .lab
        .tls_tunnel(&w.tls_at("upstream.test"), "upstream.test", &[b"http/1.1"])
        .await
        .unwrap();
    assert_refused(&w, tls, "/", "upstream.test").await;
}

#[tokio::test]
async fn transparent_plain_http_refuses_a_request_that_reads_two_ways() {
    let w = World::start().await;
    let entry = redirect_to(&w.lab, w.http).await;
    let s = TcpStream::connect(entry).await.unwrap();
    assert_refused(&w, s, "/", "upstream.test").await;
    assert_eq!(w.http_rec.bytes_in(), 0, "no byte reached the upstream");
}

#[tokio::test]
async fn transparent_tls_refuses_a_request_that_reads_two_ways() {
    let w = World::start().await;
    let entry = redirect_to(&w.lab, w.tls).await;
    let tcp = TcpStream::connect(entry).await.unwrap();
    let tls = tls_client(tcp, "upstream.test", &[b"http/1.1"], w.lab.proxy.ca_cert_pem())
        .await
        .unwrap();
    assert_refused(&w, tls, "/", "upstream.test").await;
}
