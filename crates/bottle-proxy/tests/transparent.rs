//! Transparent mode: the host name comes from SNI or `Host`, the port from the original destination, and the
//! same policy applies.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use std::net::SocketAddr;

use fixture::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

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
async fn tls_is_intercepted_by_sni_and_policed() {
    let w = World::start().await;
    let entry = redirect_to(&w.lab, w.tls).await;
    let tcp = TcpStream::connect(entry).await.unwrap();
    let tls = tls_client(tcp, "upstream.test", &[b"http/1.1"], w.lab.proxy.ca_cert_pem())
        .await
        .unwrap();
    let mut client = h1(tls).await;
    let (status, _, body) = text(client.send_request(get("/t", "upstream.test")).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(w.tls_rec.requests().len(), 1);

    let tcp = TcpStream::connect(entry).await.unwrap();
    let refused = tls_client(tcp, "denied.test", &[b"http/1.1"], w.lab.proxy.ca_cert_pem()).await;
    assert!(refused.is_err());
    let line = w
        .lab
        .wait_audit(|v| v["event"] == "transparent" && v["decision"] == "deny")
        .await;
    assert_eq!(line["host"], "denied.test");
}

#[tokio::test]
async fn plain_http_uses_the_host_header_and_the_original_port() {
    let w = World::start().await;
    let entry = redirect_to(&w.lab, w.http).await;
    let mut client = h1(TcpStream::connect(entry).await.unwrap()).await;
    let (status, _, _) = text(client.send_request(get("/p", "upstream.test")).await.unwrap()).await;
    assert_eq!(status, 200);
    let (status, headers, _) = text(client.send_request(get("/p", "denied.test")).await.unwrap()).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=not-allowed"));
    // A Host port that is not the original destination's is fronting.
    let mut s = TcpStream::connect(entry).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: upstream.test:1\r\n\r\n")
        .await
        .unwrap();
    let (status, headers) = read_head(&mut s).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=host-mismatch"));
    assert_eq!(w.http_rec.requests().len(), 1);
}
