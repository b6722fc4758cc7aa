//! CONNECT: decisions at the tunnel (host, IP literal, rebinding), the ClientHello gate (SNI, non-TLS bytes,
//! passthrough) and domain fronting inside an intercepted tunnel.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use fixture::*;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn allowed_connect_is_intercepted_and_reaches_the_tls_upstream() {
    let w = World::start().await;
    let mut client = w.lab.h1_in_tunnel(&w.tls_at("upstream.test")).await;
    let resp = client
        .send_request(get("/hello?q=secret-value", &w.tls_at("upstream.test")))
        .await
        .unwrap();
    let (status, headers, body) = text(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-upstream"], "yes");
    assert!(body.starts_with("ok GET /hello"), "{body}");
    let seen = w.tls_rec.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["host"], w.tls_at("upstream.test").as_str());
    let line = w.lab.wait_audit(|v| v["event"] == "request").await;
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["scheme"], "https");
    assert_eq!(line["path"], "/hello?q");
    // The decision is written before forwarding; its `end` line, paired by id, carries the byte counts.
    assert_eq!(line["addr"], "127.0.0.1", "the decision names the address dialled");
    let end = w.lab.wait_audit(|v| v["event"] == "end" && v["id"] == line["id"]).await;
    assert_eq!(end["outcome"], "ok");
    assert_eq!(end["status"], 200, "the end line carries the upstream's status");
    assert!(end["bytes_down"].as_u64().unwrap() > 0);
    assert!(end.get("decision").is_none(), "an end line is not a decision");
    assert!(!w.lab.audit_text().contains("secret-value"));
}

#[tokio::test]
async fn denied_host_gets_403_at_connect_with_the_hint() {
    let w = World::start().await;
    let (status, headers) = w.lab.connect("denied.test:443").await.unwrap_err();
    assert_eq!(status, 403);
    assert_eq!(
        denied(&headers),
        "host=denied.test; rule=not-allowed; allow with: bot-bottle run --allow denied.test:443"
    );
    let line = w.lab.wait_audit(|v| v["event"] == "connect").await;
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["host"], "denied.test");
}

#[tokio::test]
async fn ip_literals_are_denied_unless_an_entry_names_them_with_their_port() {
    let w = World::start().await;
    for target in [
        format!("127.0.0.2:{}", w.tls.port()),
        "[::1]:443".to_string(),
        "2130706433:443".into(),
    ] {
        let (status, headers) = w.lab.connect(&target).await.unwrap_err();
        assert_eq!(status, 403, "{target}");
        assert!(
            denied(&headers).contains("rule=ip-literal"),
            "{target}: {}",
            denied(&headers)
        );
    }
    // 127.0.0.1 is inside allow_cidr, which only lets allowed names resolve there: the literal is refused.
    let (status, headers) = w.lab.connect(&format!("127.0.0.1:{}", w.tls.port())).await.unwrap_err();
    assert_eq!((status, denied(&headers).contains("rule=ip-literal")), (403, true));
    assert_eq!(w.tls_rec.requests().len(), 0);
}

#[tokio::test]
async fn a_name_resolving_to_a_private_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (tls, rec) = tls_upstream(&ca).await;
    // `localhost` resolves through the system (/etc/hosts) to loopback; no CIDR allows it.
    let lab = Lab::start(dir, ca, &format!("[network]\nallow = [\"localhost:{}\"]\n", tls.port())).await;
    let (status, headers) = lab.connect(&format!("localhost:{}", tls.port())).await.unwrap_err();
    assert_eq!(status, 403);
    let why = denied(&headers);
    assert!(
        why.contains("rule=private-address") && why.contains("--allow-cidr"),
        "{why}"
    );
    assert_eq!(rec.bytes_in(), 0);
}

#[tokio::test]
async fn sni_different_from_the_connect_target_is_closed() {
    let w = World::start().await;
    let result = w
        .lab
        .tls_tunnel(&w.tls_at("upstream.test"), "other.test", &[b"http/1.1"])
        .await;
    assert!(result.is_err(), "handshake must fail");
    let line = w.lab.wait_audit(|v| v["event"] == "tunnel").await;
    assert_eq!(line["rule"], "host-mismatch");
    assert_eq!(w.tls_rec.bytes_in(), 0);
}

#[tokio::test]
async fn host_header_different_from_the_connect_target_is_403() {
    let w = World::start().await;
    let mut client = w.lab.h1_in_tunnel(&w.tls_at("upstream.test")).await;
    let resp = client.send_request(get("/", &w.tls_at("other.test"))).await.unwrap();
    let (status, headers, _) = text(resp).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=host-mismatch"));
    assert_eq!(w.tls_rec.requests().len(), 0);
}

#[tokio::test]
async fn non_tls_bytes_after_connect_close_the_tunnel() {
    let w = World::start().await;
    let mut tcp = w.lab.connect(&w.tls_at("upstream.test")).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: upstream.test\r\n\r\n")
        .await
        .unwrap();
    let rest = read_to_close(&mut tcp).await.expect("tunnel must be closed");
    assert!(rest.is_empty(), "no byte may come back: {rest:?}");
    let line = w.lab.wait_audit(|v| v["event"] == "tunnel").await;
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["rule"], "not-tls");
    assert_eq!(w.tls_rec.bytes_in(), 0);
}

#[tokio::test]
async fn passthrough_relays_only_after_a_matching_sni() {
    let w = World::start().await;
    // Matching SNI: the client talks TLS with the upstream itself (trusting the upstream's CA, not the bottle's).
    let tcp = w.lab.connect(&w.tls_at("pass.test")).await.unwrap();
    let tls = tls_client(tcp, "pass.test", &[b"http/1.1"], &w.lab.ca.cert_pem)
        .await
        .unwrap();
    let mut client = h1(tls).await;
    let (status, _, _) = text(client.send_request(get("/", "pass.test")).await.unwrap()).await;
    assert_eq!(status, 200);

    // Mismatched SNI: closed before a byte reaches the upstream.
    let before = w.tls_rec.bytes_in();
    let tcp = w.lab.connect(&w.tls_at("pass.test")).await.unwrap();
    let result = tls_client(tcp, "other.test", &[b"http/1.1"], &w.lab.ca.cert_pem).await;
    assert!(result.is_err());
    assert_eq!(w.tls_rec.bytes_in(), before);
    let line = w
        .lab
        .wait_audit(|v| v["event"] == "tunnel" && v["decision"] == "deny")
        .await;
    assert_eq!(line["rule"], "host-mismatch");
}

#[tokio::test]
async fn an_allowed_ip_literal_is_intercepted_with_an_ip_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (tls, _) = tls_upstream(&ca).await;
    let at = format!("127.0.0.1:{}", tls.port());
    let lab = Lab::start(dir, ca, &format!("[network]\nallow = [\"{at}\"]\n")).await;
    // An IP server name: the client sends no SNI; the leaf carries the IP.
    let tunnel = lab.tls_tunnel(&at, "127.0.0.1", &[b"http/1.1"]).await.unwrap();
    let mut client = h1(tunnel).await;
    let (status, _, body) = text(client.send_request(get("/ip", &at)).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let line = lab.wait_audit(|v| v["event"] == "request").await;
    assert_eq!(line["rule"], at.as_str());
}

#[tokio::test]
async fn passthrough_without_sni_is_closed() {
    let w = World::start().await;
    let tcp = w.lab.connect(&w.tls_at("pass.test")).await.unwrap();
    let result = tls_client(tcp, "127.0.0.1", &[b"http/1.1"], &w.lab.ca.cert_pem).await;
    assert!(result.is_err());
    let line = w.lab.wait_audit(|v| v["event"] == "tunnel").await;
    assert_eq!(line["rule"], "missing-sni");
    assert_eq!(w.tls_rec.bytes_in(), 0);
}
