//! Ways past the policy found by attacking real bottles, each shut and kept shut: an allow_cidr that admitted the
//! bare address, port entries that dropped a host's rules, protocol switches the proxy could not police, rules
//! that compared raw bytes, and real credential values reaching the bottle through echoes.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use bytes::Bytes;
use fixture::*;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes to the proxy and reads the reply until the connection closes (bounded).
async fn raw(lab: &Lab, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(lab.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let reply = read_to_close(&mut s).await.unwrap_or_default();
    String::from_utf8_lossy(&reply).into_owned()
}

fn status_of(reply: &str) -> u16 {
    reply.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

async fn plain_lab(policy: &str) -> (Lab, std::net::SocketAddr, Record) {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (http, rec) = http_upstream().await;
    let lab = Lab::start(dir, ca, &policy.replace("{P}", &http.port().to_string())).await;
    (lab, http, rec)
}

#[tokio::test]
async fn allow_cidr_for_a_private_name_does_not_admit_the_address_itself() {
    // The finding's policy: a private name with GET /docs/** only, which needed allow_cidr to resolve.
    let (lab, http, rec) = plain_lab(
        "[network]\nallow_cidr = [\"127.0.0.1/32\"]\n[network.resolve]\n\"wiki.test\" = \"127.0.0.1\"\n\
         [[host]]\nname = \"wiki.test:{P}\"\n[[host.rule]]\nmethods = [\"GET\"]\npaths = [\"/docs/**\"]\n",
    )
    .await;
    let p = http.port();
    let mut client = lab.h1_to_proxy().await;
    let (status, _, _) = text(
        client
            .send_request(get(&format!("http://wiki.test:{p}/docs/a"), ""))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "the named host works");
    for (method, url) in [
        ("GET", format!("http://127.0.0.1:{p}/admin")),
        ("DELETE", format!("http://127.0.0.1:{p}/docs/a")),
        ("GET", format!("http://127.0.0.1:{}/", p.wrapping_add(1))),
        ("GET", format!("http://[::ffff:127.0.0.1]:{p}/admin")),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let mut client = lab.h1_to_proxy().await;
        let (status, headers, _) = text(client.send_request(req).await.unwrap()).await;
        assert_eq!(status, 403, "{method} {url}");
        let why = denied(&headers);
        assert!(
            why.contains("rule=ip-literal") && why.contains("--allow 127.0.0.1:"),
            "{why}"
        );
    }
    let (status, headers) = lab.connect(&format!("127.0.0.1:{p}")).await.unwrap_err();
    assert_eq!((status, denied(&headers).contains("rule=ip-literal")), (403, true));
    let paths: Vec<String> = rec.requests().iter().map(|r| r.uri.clone()).collect();
    assert_eq!(paths, ["/docs/a"], "only the allowed request reached the upstream");
}

#[tokio::test]
async fn an_address_entry_admits_exactly_its_port_with_its_rules() {
    let (lab, http, rec) =
        plain_lab("[[host]]\nname = \"127.0.0.1:{P}\"\n[[host.rule]]\nmethods = [\"GET\"]\npaths = [\"/docs/**\"]\n")
            .await;
    let p = http.port();
    let mut client = lab.h1_to_proxy().await;
    let (status, _, body) = text(
        client
            .send_request(get(&format!("http://127.0.0.1:{p}/docs/x"), ""))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, headers, _) = text(
        client
            .send_request(get(&format!("http://127.0.0.1:{p}/admin"), ""))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, denied(&headers).contains("rule=request-rule")), (403, true));
    let line = lab.wait_audit(|v| v["path"] == "/docs/x").await;
    assert_eq!(line["rule"], format!("127.0.0.1:{p}"));
    assert_eq!(rec.requests().len(), 1);
}

#[tokio::test]
async fn a_plain_port_entry_takes_the_rules_of_its_host() {
    // The finding: `allow = ["c.test:443"]` beside a GET-only [[host]] dropped the rules on that port. Shadowing
    // is now refused when the policy loads (bottle-policy tests); a plain entry on another port takes the rules.
    let (lab, http, rec) = plain_lab(
        "[network]\nallow = [\"c.test:{P}\"]\nallow_cidr = [\"127.0.0.1/32\"]\n[network.resolve]\n\"c.test\" = \"127.0.0.1\"\n\
         [[host]]\nname = \"c.test\"\n[[host.rule]]\nmethods = [\"GET\"]\npaths = [\"/ok/**\"]\n",
    )
    .await;
    let p = http.port();
    for (method, path, want) in [("GET", "/ok/1", 200), ("POST", "/ok/1", 403), ("GET", "/admin", 403)] {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://c.test:{p}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let mut client = lab.h1_to_proxy().await;
        let (status, _, _) = text(client.send_request(req).await.unwrap()).await;
        assert_eq!(status, want, "{method} {path}");
    }
    assert_eq!(rec.requests().len(), 1);
}

/// A client's HTTP/2 connection preface, empty SETTINGS and a HEADERS frame for `POST /admin` on stream 3
/// (HPACK: indexed `:method POST`, `:scheme http`; literal `:path` and `:authority`), END_STREAM.
fn h2_post_admin(authority: &str) -> Vec<u8> {
    let mut block = vec![0x83, 0x86, 0x04, 6];
    block.extend_from_slice(b"/admin");
    block.extend_from_slice(&[0x01, authority.len() as u8]);
    block.extend_from_slice(authority.as_bytes());
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x04, 0, 0, 0, 0, 0]);
    let len = block.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, 0x01, 0x05, 0, 0, 0, 3]);
    out.extend_from_slice(&block);
    out
}

#[tokio::test]
async fn h2c_is_stripped_so_pipelined_http2_never_reaches_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (h2c, rec) = h2c_upstream().await;
    let lab = Lab::start(dir, ca, STANDARD_POLICY).await;
    let host = format!("rules.test:{}", h2c.port());
    let mut attack = format!(
        "GET http://{host}/allowed/x HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    .into_bytes();
    attack.extend(h2_post_admin(&host));
    let reply = raw(&lab, &attack).await;
    assert_eq!(status_of(&reply), 200, "answered as plain HTTP/1.1: {reply}");
    assert!(reply.contains("ok h1"), "{reply}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let seen = rec.requests();
    let what: Vec<String> = seen.iter().map(|r| format!("{} {}", r.method, r.uri)).collect();
    assert_eq!(what, ["GET /allowed/x"], "no HTTP/2 request reached the upstream");
    assert!(!seen[0].headers.contains_key("upgrade") && !seen[0].headers.contains_key("http2-settings"));
}

fn upgrade(path: &str, at: &str, protocol: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", at)
        .header("connection", "Upgrade")
        .header("upgrade", protocol)
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn other_protocol_switches_are_refused_unless_the_host_opts_in() {
    let w = World::start().await;
    for protocol in ["tcp", "SPDY/3.1"] {
        let at = w.tls_at("upstream.test");
        let mut client = w.lab.h1_in_tunnel(&at).await;
        let (status, headers, _) = text(client.send_request(upgrade("/x", &at, protocol)).await.unwrap()).await;
        assert_eq!(status, 403, "{protocol}");
        assert!(denied(&headers).contains("rule=upgrade"), "{}", denied(&headers));
    }
    assert_eq!(w.tls_rec.requests().len(), 0, "nothing reached the upstream");

    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (tls, _) = tls_upstream(&ca).await;
    let lab = Lab::start(
        dir,
        ca,
        "[network]\nallow_cidr = [\"127.0.0.1/32\"]\n[network.resolve]\n\"other.test\" = \"127.0.0.1\"\n\
         [[host]]\nname = \"other.test:*\"\nupgrades = [\"tcp\"]\n",
    )
    .await;
    let at = format!("other.test:{}", tls.port());
    let mut client = lab.h1_in_tunnel(&at).await;
    let resp = client.send_request(upgrade("/x", &at, "tcp")).await.unwrap();
    assert_eq!(resp.status(), 101, "opted in");
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"raw").await.unwrap();
    let mut buf = [0u8; 3];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"raw");
    drop(io);
    let line = lab
        .wait_audit(|v| v["upgrade"] == "tcp" && v["event"] == "request")
        .await;
    assert_eq!(line["decision"], "allow");
    let end = lab.wait_audit(|v| v["upgrade"] == "tcp" && v["event"] == "end").await;
    assert!(end["bytes_up"].as_u64().unwrap() >= 3, "{end}");
}

#[tokio::test]
async fn a_101_that_does_not_answer_the_websocket_key_is_not_spliced() {
    let w = World::start().await;
    let at = w.tls_at("rules.test");
    let mut client = w.lab.h1_in_tunnel(&at).await;
    let (status, _, body) = text(client.send_request(upgrade("/ws/ok", &at, "websocket")).await.unwrap()).await;
    assert_eq!(status, 101, "a genuine handshake still works: {body}");
    // `/ws/bogus` answers 101 without Sec-WebSocket-Accept; rules.test allows only /ws/ok, so use upstream.test.
    let at = w.tls_at("upstream.test");
    let mut client = w.lab.h1_in_tunnel(&at).await;
    let (status, _, body) = text(
        client
            .send_request(upgrade("/ws/bogus", &at, "websocket"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("not a WebSocket handshake"), "{body}");
    let line = w
        .lab
        .wait_audit(|v| v["path"] == "/ws/bogus" && v["event"] == "end")
        .await;
    assert_eq!(
        (&line["outcome"], &line["rule"]),
        (&"error".into(), &"bad-upgrade".into())
    );
}

async fn query_lab() -> (Lab, std::net::SocketAddr, Record) {
    plain_lab(
        "[network]\nallow_cidr = [\"127.0.0.1/32\"]\n[network.resolve]\n\"git.test\" = \"127.0.0.1\"\n\
         [[host]]\nname = \"git.test:{P}\"\n[[host.rule]]\nmethods = [\"GET\"]\npaths = [\"/pub/**\"]\n\
         query = { service = \"git-upload-pack\" }\n",
    )
    .await
}

#[tokio::test]
async fn an_encoded_query_name_is_matched_as_the_upstream_decodes_it() {
    let (lab, http, rec) = query_lab().await;
    let p = http.port();
    let mut client = lab.h1_to_proxy().await;
    let url = format!("http://git.test:{p}/pub/info/refs?servic%65=git-receive-pack");
    let (status, headers, body) = text(client.send_request(get(&url, "")).await.unwrap()).await;
    assert_eq!(status, 403, "{body}");
    let why = denied(&headers);
    assert!(
        why.contains("rule=query-rule") && why.contains("`service`"),
        "names the query rule: {why}"
    );
    let url = format!("http://git.test:{p}/pub/info/refs?service=git-upload-p%61ck");
    let (status, _, _) = text(client.send_request(get(&url, "")).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(rec.requests().len(), 1);
}

#[tokio::test]
async fn a_request_that_reads_two_ways_is_refused_with_the_reason() {
    let (lab, http, rec) = query_lab().await;
    let p = http.port();
    for pq in [
        "/pub/..;/admin?service=git-upload-pack",
        "/pub/x?service=git-upload-pack;service=git-receive-pack",
        "/pub/x?service=git-upload-pack&service=git-receive-pack",
        "/pub/%252e%252e/admin?service=git-upload-pack",
    ] {
        let mut client = lab.h1_to_proxy().await;
        let (status, headers, body) = text(
            client
                .send_request(get(&format!("http://git.test:{p}{pq}"), ""))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 403, "{pq}");
        assert!(
            denied(&headers).contains("rule=ambiguous-request"),
            "{pq}: {}",
            denied(&headers)
        );
        assert!(body.contains("read two ways"), "{body}");
    }
    assert_eq!(rec.requests().len(), 0);
}

/// `Authorization: Bearer <placeholder>` for upstream.test, the credentialed host of the standard policy.
fn with_placeholder(w: &World, path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", w.tls_at("upstream.test"))
        .header("authorization", format!("Bearer {}", w.lab.placeholder("TEST_TOKEN")))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn an_echoed_real_value_reaches_the_bottle_as_its_placeholder() {
    let w = World::start().await;
    let mut client = w.lab.h1_in_tunnel(&w.tls_at("upstream.test")).await;
    let (status, headers, body) = text(client.send_request(with_placeholder(&w, "/echo-auth")).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let placeholder = w.lab.placeholder("TEST_TOKEN");
    assert!(!body.contains(SECRET), "the body carried the real value: {body}");
    assert!(body.contains(&format!("Bearer {placeholder}")), "{body}");
    assert!(!headers["x-echo"].to_str().unwrap().contains(SECRET));
    let seen = w.tls_rec.requests();
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {SECRET}").as_str(),
        "the upstream got the key"
    );
    assert_eq!(seen[0].headers["accept-encoding"], "identity");

    // A compressed answer could hide the value from the search: refused, never relayed.
    let (status, _, body) = text(client.send_request(with_placeholder(&w, "/gzip")).await.unwrap()).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("compressed"), "{body}");
}

#[tokio::test]
async fn a_request_carrying_the_real_value_is_refused_wherever_it_goes() {
    let w = World::start().await;
    let at = w.tls_at("other.test");
    let mut client = w.lab.h1_in_tunnel(&at).await;
    let req = Request::get("/")
        .header("host", &at)
        .header("x-smuggled", format!("token={SECRET}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, headers, _) = text(client.send_request(req).await.unwrap()).await;
    assert_eq!((status, denied(&headers).contains("rule=secret-leak")), (403, true));

    // In a body, across frames: the upstream never receives a complete message with the value.
    let mut client = w.lab.h1_in_tunnel(&at).await;
    let body = format!("{{\"note\": \"{SECRET}\"}}");
    let req = Request::post("/upload")
        .header("host", &at)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let _ = client.send_request(req).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        w.tls_rec
            .requests()
            .iter()
            .all(|r| !String::from_utf8_lossy(&r.body).contains(SECRET)),
        "the real value reached an upstream in a body"
    );
    let line = w
        .lab
        .wait_audit(|v| v["path"] == "/upload" && v["event"] == "end")
        .await;
    assert_eq!(line["rule"], "secret-leak");
}

#[tokio::test]
async fn a_websocket_echoing_the_real_value_never_hands_it_to_the_bottle() {
    let w = World::start().await;
    let at = w.tls_at("upstream.test");
    let mut client = w.lab.h1_in_tunnel(&at).await;
    let mut req = upgrade("/ws/say-auth", &at, "websocket");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", w.lab.placeholder("TEST_TOKEN")).parse().unwrap(),
    );
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    let echoed = resp.headers()["x-echo"].to_str().unwrap().to_string();
    assert!(
        !echoed.contains(SECRET) && echoed.contains("bottle-placeholder-"),
        "{echoed}"
    );
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    let mut got = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), io.read_to_end(&mut got)).await;
    assert!(
        !String::from_utf8_lossy(&got).contains(SECRET),
        "the stream handed the bottle the real value"
    );
    let line = w
        .lab
        .wait_audit(|v| v["path"] == "/ws/say-auth" && v["event"] == "end")
        .await;
    assert_eq!(line["rule"], "secret-leak");
}
