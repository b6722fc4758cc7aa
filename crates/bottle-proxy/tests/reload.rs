//! Live policy reload: the next request (even inside an open tunnel) sees the new policy.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use fixture::*;

#[tokio::test]
async fn reload_takes_effect_for_the_next_request() {
    let w = World::start().await;
    let at = w.tls_at("upstream.test");
    let mut client = w.lab.h1_in_tunnel(&at).await;
    assert_eq!(text(client.send_request(get("/one", &at)).await.unwrap()).await.0, 200);
    let mut plain = w.lab.h1_to_proxy().await;
    let fresh = format!("http://{}/", w.http_at("fresh.test"));
    assert_eq!(text(plain.send_request(get(&fresh, "x")).await.unwrap()).await.0, 403);

    // New policy: upstream.test only for /allowed/**, and fresh.test allowed.
    let next = STANDARD_POLICY
        .replace("\"other.test:*\"]", "\"other.test:*\", \"fresh.test:*\"]")
        .replace("\"pass.test\" = \"127.0.0.1\"", "\"pass.test\" = \"127.0.0.1\"\n\"fresh.test\" = \"127.0.0.1\"")
        .replace("allow = [\"upstream.test:*\", ", "allow = [")
        .replace("[[host]]\nname = \"rules.test:*\"", "[[host]]\nname = \"upstream.test:*\"\n[[host.rule]]\npaths = [\"/allowed/**\"]\n\n[[host]]\nname = \"rules.test:*\"");
    w.lab.proxy.reload(policy(&next));

    let (status, headers, _) = text(client.send_request(get("/two", &at)).await.unwrap()).await;
    assert_eq!(status, 403, "the open tunnel sees the new rule");
    assert!(denied(&headers).contains("rule=request-rule"));
    assert_eq!(
        text(client.send_request(get("/allowed/3", &at)).await.unwrap()).await.0,
        200
    );
    assert_eq!(text(plain.send_request(get(&fresh, "x")).await.unwrap()).await.0, 200);
    w.lab.wait_audit(|v| v["event"] == "reload").await;
}

#[tokio::test]
async fn reload_withdrawing_a_cidr_stops_reuse_of_kept_alive_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (http, rec) = http_upstream().await;
    // `localhost` comes from /etc/hosts (no DNS query leaves the machine).
    let first = "[network]\nallow = [\"localhost:*\"]\nallow_cidr = [\"127.0.0.1/32\", \"::1/128\"]\n";
    let lab = Lab::start(dir, ca, first).await;
    let mut plain = lab.h1_to_proxy().await;
    let url = format!("http://localhost:{}/", http.port());
    assert_eq!(text(plain.send_request(get(&url, "x")).await.unwrap()).await.0, 200);
    lab.proxy.reload(policy("[network]\nallow = [\"localhost:*\"]\n"));
    let (status, headers, _) = text(plain.send_request(get(&url, "x")).await.unwrap()).await;
    assert_eq!(status, 403);
    assert!(denied(&headers).contains("rule=private-address"));
    assert_eq!(rec.requests().len(), 1);
}

/// #16: a spliced connection is decided once, so a reload that denies its host cuts it (a passthrough tunnel here);
/// one to a host still allowed stays open.
#[tokio::test]
async fn reload_denying_a_host_cuts_its_open_passthrough_tunnel() {
    let w = World::start().await;
    let tcp = w.lab.connect(&w.tls_at("pass.test")).await.unwrap();
    let tls = tls_client(tcp, "pass.test", &[b"http/1.1"], &w.lab.ca.cert_pem)
        .await
        .unwrap();
    let mut client = h1(tls).await;
    assert_eq!(
        text(client.send_request(get("/", "pass.test")).await.unwrap()).await.0,
        200
    );

    // Another host denied: the tunnel stays.
    let other_denied = STANDARD_POLICY.replace("[network]\n", "[network]\ndeny = [\"other.test\"]\n");
    w.lab.proxy.reload(policy(&other_denied));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        text(client.send_request(get("/", "pass.test")).await.unwrap()).await.0,
        200
    );

    // Its own host denied: cut, and the end line says why.
    let pass_denied = STANDARD_POLICY.replace("[network]\n", "[network]\ndeny = [\"pass.test\"]\n");
    w.lab.proxy.reload(policy(&pass_denied));
    let cut = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match client.send_request(get("/", "pass.test")).await {
                Err(_) => break,
                Ok(resp) => {
                    let _ = text(resp).await;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the passthrough tunnel to a denied host stayed open");
    w.lab
        .wait_audit(|v| v["event"] == "end" && v["rule"] == "policy-changed")
        .await;
}

/// #16: an intercepted tunnel is closed when a change denies its host (not only its next request refused); one to
/// a host still allowed stays open.
#[tokio::test]
async fn reload_denying_a_host_closes_its_open_intercepted_tunnel() {
    let w = World::start().await;
    let at = w.tls_at("upstream.test");
    let mut client = w.lab.h1_in_tunnel(&at).await;
    assert_eq!(text(client.send_request(get("/one", &at)).await.unwrap()).await.0, 200);

    let other_denied = STANDARD_POLICY.replace("[network]\n", "[network]\ndeny = [\"other.test\"]\n");
    w.lab.proxy.reload(policy(&other_denied));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(text(client.send_request(get("/two", &at)).await.unwrap()).await.0, 200);

    let own_denied = STANDARD_POLICY.replace("[network]\n", "[network]\ndeny = [\"upstream.test\"]\n");
    w.lab.proxy.reload(policy(&own_denied));
    // Closed by the proxy: the connection ends without any request being sent on it.
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while !client.is_closed() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "the intercepted tunnel to a denied host stayed open");
    w.lab
        .wait_audit(|v| v["event"] == "tunnel" && v["rule"] == "policy-changed" && v["host"] == "upstream.test")
        .await;
}
