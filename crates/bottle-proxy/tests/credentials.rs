//! Credential injection: placeholders in, real value only to the bound host's configured header, inside TLS.
//! Leaks are refused and audited; the audit log never holds a secret or a header value.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use bytes::Bytes;
use fixture::*;
use http::Request;
use http_body_util::Full;

fn with_auth(uri: &str, host: &str, value: &str) -> Request<Full<Bytes>> {
    Request::get(uri)
        .header("host", host)
        .header("authorization", value)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn placeholder_is_replaced_by_the_real_value_for_the_bound_host() {
    let w = World::start().await;
    let placeholder = w.lab.placeholder("TEST_TOKEN");
    assert!(placeholder.starts_with(bottle_proxy::PLACEHOLDER_PREFIX));
    assert!(!placeholder.contains(SECRET));
    let at = w.tls_at("upstream.test");
    let mut client = w.lab.h1_in_tunnel(&at).await;
    let resp = client
        .send_request(with_auth("/api", &at, &format!("Bearer {placeholder}")))
        .await
        .unwrap();
    assert_eq!(text(resp).await.0, 200);
    let seen = w.tls_rec.requests();
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {SECRET}").as_str());
    let line = w.lab.wait_audit(|v| v["event"] == "request").await;
    assert_eq!(line["decision"], "inject");
    assert_eq!(line["credentials"][0], "TEST_TOKEN");
}

#[tokio::test]
async fn placeholder_sent_to_another_host_is_refused_and_audited() {
    let w = World::start().await;
    let placeholder = w.lab.placeholder("TEST_TOKEN");
    let at = w.tls_at("other.test");
    let mut client = w.lab.h1_in_tunnel(&at).await;
    let resp = client.send_request(with_auth("/", &at, &placeholder)).await.unwrap();
    let (status, headers, _) = text(resp).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=placeholder-leak"));
    // In the URL of another host, too.
    let resp = client
        .send_request(get(&format!("/p?token={placeholder}"), &at))
        .await
        .unwrap();
    assert_eq!(text(resp).await.0, 403);
    assert_eq!(w.tls_rec.requests().len(), 0);
    let line = w.lab.wait_audit(|v| v["event"] == "placeholder-leak").await;
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["host"], "other.test");
}

#[tokio::test]
async fn placeholder_in_the_wrong_header_or_over_plain_http_is_refused() {
    let w = World::start().await;
    let placeholder = w.lab.placeholder("TEST_TOKEN");
    let at = w.tls_at("upstream.test");
    let mut client = w.lab.h1_in_tunnel(&at).await;
    let req = Request::get("/")
        .header("host", &at)
        .header("x-api-key", &placeholder)
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(text(client.send_request(req).await.unwrap()).await.0, 403);

    let mut plain = w.lab.h1_to_proxy().await;
    let url = format!("http://{}/", w.http_at("upstream.test"));
    let resp = plain.send_request(with_auth(&url, "x", &placeholder)).await.unwrap();
    let (status, headers, _) = text(resp).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=placeholder-leak"));
    assert_eq!(w.http_rec.bytes_in(), 0);
    assert_eq!(w.tls_rec.requests().len(), 0);
}

#[tokio::test]
async fn audit_lines_are_json_with_the_documented_fields_and_no_secrets() {
    let w = World::start().await;
    let placeholder = w.lab.placeholder("TEST_TOKEN");
    let at = w.tls_at("upstream.test");
    let mut client = w.lab.h1_in_tunnel(&at).await;
    let resp = client
        .send_request(with_auth(
            "/a?key=value-that-must-not-appear",
            &at,
            &format!("Bearer {placeholder}"),
        ))
        .await
        .unwrap();
    assert_eq!(text(resp).await.0, 200);
    let _ = w.lab.connect("denied.test:443").await;
    w.lab.wait_audit(|v| v["event"] == "request").await;
    let text = w.lab.audit_text();
    for forbidden in [SECRET, "Bearer", placeholder.as_str(), "value-that-must-not-appear"] {
        assert!(!text.contains(forbidden), "audit log contains {forbidden}:\n{text}");
    }
    for line in w.lab.audit() {
        if line["event"] == "end" {
            // The end of a relayed exchange: no decision, its outcome and counts.
            for field in [
                "time",
                "bottle",
                "id",
                "client",
                "host",
                "port",
                "path",
                "outcome",
                "rule",
                "bytes_up",
                "bytes_down",
                "duration_ms",
            ] {
                assert!(line.get(field).is_some(), "{field} missing in {line}");
            }
            assert!(line.get("decision").is_none(), "{line}");
            continue;
        }
        for field in [
            "time",
            "bottle",
            "client",
            "method",
            "scheme",
            "host",
            "port",
            "path",
            "decision",
            "rule",
            "bytes_up",
            "bytes_down",
            "duration_ms",
        ] {
            assert!(line.get(field).is_some(), "{field} missing in {line}");
        }
        assert_eq!(line["bottle"], "test-bottle");
    }
}

#[tokio::test]
async fn a_required_credential_without_a_value_stops_the_proxy_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = bottle_proxy::ProxyConfig::new(policy(STANDARD_POLICY), dir.path().join("state"));
    config.secret_env = Some(Default::default());
    let err = bottle_proxy::Proxy::new(config).err().expect("must fail");
    assert!(err.to_string().contains("TEST_TOKEN"), "{err}");
}
