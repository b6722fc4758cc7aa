//! Resource limits and the other ways in: slowloris, idle connections, the connection cap, Unix sockets and
//! listeners bound elsewhere.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use std::time::{Duration, Instant};

use bottle_proxy::Limits;
use fixture::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UnixStream};

fn short_limits() -> Limits {
    Limits {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        ..Limits::default()
    }
}

#[tokio::test]
async fn slowloris_head_is_cut_off_and_audited() {
    let w = World::with_limits(short_limits()).await;
    let mut s = TcpStream::connect(w.lab.addr).await.unwrap();
    let start = Instant::now();
    s.write_all(b"GET http://upstream.test/ HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    read_to_close(&mut s).await.expect("closed by the proxy");
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    w.lab.wait_audit(|v| v["rule"] == "header-timeout").await;
}

#[tokio::test]
async fn silent_and_idle_tunnels_are_closed() {
    let w = World::with_limits(Limits {
        handshake_timeout: Duration::from_millis(400),
        ..short_limits()
    })
    .await;
    // No ClientHello after CONNECT.
    let mut tcp = w.lab.connect(&w.tls_at("upstream.test")).await.unwrap();
    let start = Instant::now();
    assert!(read_to_close(&mut tcp).await.expect("closed by the proxy").is_empty());
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    w.lab
        .wait_audit(|v| v["event"] == "tunnel" && v["decision"] == "deny")
        .await;

    // A passthrough tunnel on which nothing moves after the handshake.
    let tcp = w.lab.connect(&w.tls_at("pass.test")).await.unwrap();
    let mut tls = tls_client(tcp, "pass.test", &[b"http/1.1"], &w.lab.ca.cert_pem)
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(4),
        tokio::io::AsyncReadExt::read(&mut tls, &mut buf),
    )
    .await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    w.lab.wait_audit(|v| v["rule"] == "idle-timeout").await;
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_slot() {
    let w = World::with_limits(Limits {
        max_connections: 1,
        ..Limits::default()
    })
    .await;
    let url = format!("http://{}/", w.http_at("upstream.test"));
    let mut first = w.lab.h1_to_proxy().await;
    assert_eq!(text(first.send_request(get(&url, "x")).await.unwrap()).await.0, 200);
    let mut second = w.lab.h1_to_proxy().await;
    let waiting = tokio::time::timeout(Duration::from_millis(300), second.send_request(get(&url, "x"))).await;
    assert!(
        waiting.is_err(),
        "the second connection must wait while the first holds the only slot"
    );
    drop(first);
    let mut third = w.lab.h1_to_proxy().await;
    let resp = tokio::time::timeout(Duration::from_secs(5), third.send_request(get(&url, "x"))).await;
    assert_eq!(text(resp.unwrap().unwrap()).await.0, 200);
}

#[tokio::test]
async fn unix_socket_and_inherited_std_listener_serve_the_same_proxy() {
    let w = World::start().await;
    let path = w.lab.dir.path().join("proxy.sock");
    let unix = tokio::net::UnixListener::bind(&path).unwrap();
    let proxy = w.lab.proxy.clone();
    tokio::spawn(async move { proxy.serve_unix(unix).await });
    let url = format!("http://{}/via-unix", w.http_at("upstream.test"));
    let mut client = h1(UnixStream::connect(&path).await.unwrap()).await;
    assert_eq!(text(client.send_request(get(&url, "x")).await.unwrap()).await.0, 200);
    let denied_url = format!("http://denied.test:{}/", w.http.port());
    assert_eq!(
        text(client.send_request(get(&denied_url, "x")).await.unwrap()).await.0,
        403
    );

    // A std listener created elsewhere (the namespace backend binds inside the bottle's netns).
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    let proxy = w.lab.proxy.clone();
    tokio::spawn(async move { proxy.serve_std_tcp(std_listener).await });
    let mut client = h1(TcpStream::connect(addr).await.unwrap()).await;
    assert_eq!(text(client.send_request(get(&url, "x")).await.unwrap()).await.0, 200);
    assert_eq!(w.http_rec.requests().len(), 2);
}
