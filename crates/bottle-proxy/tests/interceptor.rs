//! The smolvm egress-interceptor listener, driven by a real TCP client that writes the preludes smolvm 1.32.2 writes
//! (research/smolvm.md §3.4), in front of real local upstreams: a good token is policed like any other flow, anything
//! else is refused, closed and audited, and the listener keeps serving.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use bottle_proxy::Interceptor;
use fixture::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: [u8; 32] = [
    0x3c, 0x91, 0x07, 0xee, 0x42, 0x18, 0xa5, 0x6d, 0x90, 0x01, 0xbf, 0x27, 0x5e, 0xc3, 0x88, 0x14, 0x7a, 0x0d, 0xf2,
    0x63, 0x29, 0xb4, 0x5c, 0xe1, 0x36, 0x8f, 0x02, 0xd7, 0x4b, 0x99, 0x10, 0x6e,
];
const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);

/// The standard world plus an interceptor listener; the guest's proxy URL is `http://100.96.0.1:<listener port>`.
struct Icpt {
    w: World,
    addr: SocketAddr,
}

impl Icpt {
    async fn start() -> Self {
        let w = World::start().await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let interceptor = Interceptor::new(TOKEN, SocketAddrV4::new(GATEWAY_IP, addr.port()))
            .with_prelude_timeout(Duration::from_millis(300));
        let proxy = w.lab.proxy.clone();
        tokio::spawn(async move { proxy.serve_interceptor(listener, interceptor).await });
        Self { w, addr }
    }

    fn gateway(&self) -> SocketAddr {
        SocketAddr::from((GATEWAY_IP, self.addr.port()))
    }

    /// Connects as smolvm does and writes `bytes`.
    async fn raw(&self, bytes: &[u8]) -> TcpStream {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        s
    }

    /// A flow with a valid prelude for `dst`; returns the stream after the accept byte.
    async fn flow(&self, dst: SocketAddr) -> TcpStream {
        let mut s = self.raw(&prelude(&TOKEN, dst)).await;
        assert_eq!(s.read_u8().await.unwrap(), 0x00, "a valid prelude must be accepted");
        s
    }

    fn refusals(&self) -> Vec<serde_json::Value> {
        let audit = self.w.lab.audit();
        audit
            .into_iter()
            .filter(|v| v["event"] == "interceptor-refused")
            .collect()
    }
}

/// The IPv4 prelude exactly as research/smolvm.md §3.4 records it: 48 bytes.
fn prelude(token: &[u8; 32], dst: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(v4) = dst else { panic!("IPv4 only") };
    let mut out = b"SMOLICPT".to_vec();
    out.push(0x01);
    out.extend_from_slice(token);
    out.push(0x04);
    out.extend_from_slice(&v4.port().to_be_bytes());
    out.extend_from_slice(&v4.ip().octets());
    assert_eq!(out.len(), 48);
    out
}

/// The peer refused: at most the refusal byte (never the accept byte), then the connection closed.
async fn assert_refused_and_closed(mut s: TcpStream) {
    let rest = read_to_close(&mut s)
        .await
        .expect("the interceptor kept a refused flow open");
    assert!(rest.is_empty() || rest == [0x01], "refused flow got {rest:?}");
}

#[tokio::test]
async fn the_guest_proxy_url_is_an_explicit_proxy_policed_by_the_policy() {
    let t = Icpt::start().await;
    // Absolute-form HTTP to an allowed host, through a local upstream.
    let mut s = t.flow(t.gateway()).await;
    let target = t.w.http_at("upstream.test");
    let head = format!("GET http://{target}/via-gateway HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let (status, _) = read_head(&mut s).await;
    assert_eq!(status, 200);
    assert_eq!(t.w.http_rec.requests()[0].uri, "/via-gateway");

    // A host the policy does not allow.
    let mut s = t.flow(t.gateway()).await;
    s.write_all(b"GET http://denied.test/ HTTP/1.1\r\nHost: denied.test\r\n\r\n")
        .await
        .unwrap();
    let (status, headers) = read_head(&mut s).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=not-allowed"), "{headers:?}");

    // CONNECT + TLS with the bottle CA: intercepted and policed like any explicit client.
    let mut s = t.flow(t.gateway()).await;
    let authority = t.w.tls_at("upstream.test");
    let connect = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    s.write_all(connect.as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 200);
    let tls = tls_client(s, "upstream.test", &[b"http/1.1"], t.w.lab.proxy.ca_cert_pem())
        .await
        .unwrap();
    let mut client = h1(tls).await;
    let (status, _, body) = text(client.send_request(get("/tls", "upstream.test")).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(t.w.tls_rec.requests().len(), 1);
    assert!(t.refusals().is_empty());
}

#[tokio::test]
async fn other_destinations_are_policed_transparently() {
    let t = Icpt::start().await;
    // The original destination is the upstream's real address; the name comes from `Host`.
    let mut client = h1(t.flow(t.w.http).await).await;
    let (status, _, _) = text(client.send_request(get("/t", "upstream.test")).await.unwrap()).await;
    assert_eq!(status, 200);
    let (status, headers, _) = text(client.send_request(get("/t", "denied.test")).await.unwrap()).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=not-allowed"));

    // TLS by SNI: allowed name through, other name refused.
    let tls = tls_client(
        t.flow(t.w.tls).await,
        "upstream.test",
        &[b"http/1.1"],
        t.w.lab.proxy.ca_cert_pem(),
    )
    .await
    .unwrap();
    let mut client = h1(tls).await;
    assert_eq!(
        text(client.send_request(get("/s", "upstream.test")).await.unwrap())
            .await
            .0,
        200
    );
    let refused = tls_client(
        t.flow(t.w.tls).await,
        "denied.test",
        &[b"http/1.1"],
        t.w.lab.proxy.ca_cert_pem(),
    )
    .await;
    assert!(refused.is_err());
    t.w.lab
        .wait_audit(|v| v["event"] == "transparent" && v["host"] == "denied.test" && v["decision"] == "deny")
        .await;
}

#[tokio::test]
async fn a_wrong_token_is_refused_closed_and_audited_and_nothing_reaches_upstream() {
    let t = Icpt::start().await;
    let mut wrong = TOKEN;
    wrong[31] ^= 0x01;
    let mut bytes = prelude(&wrong, t.w.http);
    bytes.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: upstream.test\r\n\r\n");
    assert_refused_and_closed(t.raw(&bytes).await).await;
    let line = t.w.lab.wait_audit(|v| v["event"] == "interceptor-refused").await;
    assert_eq!(line["rule"], "bad-token");
    assert_eq!(line["decision"], "deny");
    assert_eq!(t.w.http_rec.bytes_in(), 0);
    // The token itself never reaches the audit log.
    let hex: String = TOKEN.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!t.w.lab.audit_text().contains(&hex));
}

#[tokio::test]
async fn garbage_truncated_and_slow_preludes_are_refused_and_the_listener_keeps_serving() {
    let t = Icpt::start().await;
    // An HTTP client that found the port.
    let garbage = b"GET http://upstream.test/ HTTP/1.1\r\nHost: upstream.test\r\n\r\n";
    assert_refused_and_closed(t.raw(garbage).await).await;
    // A valid head, then the peer goes away mid-address.
    let mut s = t.raw(&prelude(&TOKEN, t.w.http)[..45]).await;
    s.shutdown().await.unwrap();
    assert_refused_and_closed(s).await;
    // Nothing at all until the prelude timeout.
    assert_refused_and_closed(t.raw(b"SMOLICPT").await).await;
    // A newer protocol version, an unknown family, a gateway port that is not the proxy's.
    let mut v2 = prelude(&TOKEN, t.w.http);
    v2[8] = 0x02;
    assert_refused_and_closed(t.raw(&v2).await).await;
    let mut family = prelude(&TOKEN, t.w.http);
    family[41] = 0x05;
    assert_refused_and_closed(t.raw(&family).await).await;
    let host_ssh = SocketAddr::from((GATEWAY_IP, 22));
    assert_refused_and_closed(t.raw(&prelude(&TOKEN, host_ssh)).await).await;

    let mut rules: Vec<String> = Vec::new();
    for _ in 0..100 {
        rules = t
            .refusals()
            .iter()
            .map(|v| v["rule"].as_str().unwrap().to_owned())
            .collect();
        if rules.len() == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rules.sort();
    assert_eq!(
        rules,
        [
            "gateway-port",
            "prelude-family",
            "prelude-magic",
            "prelude-timeout",
            "prelude-truncated",
            "prelude-version"
        ]
    );
    let gateway = t.refusals().into_iter().find(|v| v["rule"] == "gateway-port").unwrap();
    assert_eq!(
        (gateway["host"].as_str(), gateway["port"].as_u64()),
        (Some("100.96.0.1"), Some(22))
    );
    assert_eq!(t.w.http_rec.bytes_in(), 0);

    // Still serving.
    let mut client = h1(t.flow(t.w.http).await).await;
    let (status, _, _) = text(client.send_request(get("/after", "upstream.test")).await.unwrap()).await;
    assert_eq!(status, 200);
}
