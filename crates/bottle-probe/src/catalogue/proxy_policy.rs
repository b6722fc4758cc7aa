//! Escape cases 18–30, proxy policy, and our own (issue #11): what the proxy lets through, decided per request, in
//! and out of intercepted tunnels. Nearly every case needs the escape suite's policy (allowed, denied, ruled,
//! wildcard and passthrough test names pinned to its upstreams) and its upstreams. Values: `tls_port` and
//! `plain_port` (the test upstreams), `smuggle_request` (a request with a second one hidden in its chunked body, in
//! `printf` escapes: its `Content-Length` depends on the port), `tls_authority` (an allowed, intercepted
//! `HOST:PORT`).

use super::Needs::{TestPolicy, TestUpstreams, Tool};
use super::{Case, probe, shell};

/// What the policy-and-upstream cases need.
const SUITE: &[super::Needs] = &[TestPolicy, TestUpstreams];
const SUITE_CURL: &[super::Needs] = &[TestPolicy, TestUpstreams, Tool("curl")];

pub const CASES: &[Case] = &[
    // Controls: the allowed paths work, so every refusal below is the policy's doing.
    shell("ctl-tls", "curl -sS --fail --max-time 20 https://upstream.test:{{tls_port}}/ok")
        .control()
        .needs(SUITE_CURL),
    probe("ctl-plain", &["proxy-get", "http://plain.test:{{plain_port}}/ok"])
        .control()
        .needs(SUITE),
    probe("ctl-sni-match", &["proxy-sni", "upstream.test:{{tls_port}}", "upstream.test"])
        .control()
        .needs(SUITE),
    // 30 (slow, so it runs alongside everything else): slowloris.
    probe("c30-slowloris", &["proxy-slowloris", "http://plain.test:{{plain_port}}/c30-slow", "40"])
        .slow()
        .needs(SUITE),
    // 18, 19
    probe("c18-connect-deny-list", &["proxy-connect", "denied.test:{{tls_port}}"])
        .refused()
        .needs(SUITE),
    probe("c18-connect-not-allowed", &["proxy-connect", "notallowed.test:443"]).refused(),
    shell("c18-curl-not-allowed", "curl -sS --fail --max-time 20 https://notallowed.test/c18").needs(&[Tool("curl")]),
    probe("c19-get-deny-list", &["proxy-get", "http://denied.test:{{plain_port}}/c19"])
        .refused()
        .needs(SUITE),
    probe("c19-get-not-allowed", &["proxy-get", "http://notallowed.test/c19"]).refused(),
    // 20: SNI other than the CONNECT target
    probe("c20-sni-allowed-other", &["proxy-sni", "upstream.test:{{tls_port}}", "other.test"]).needs(SUITE),
    probe("c20-sni-denied", &["proxy-sni", "upstream.test:{{tls_port}}", "denied.test"]).needs(SUITE),
    probe("c20-sni-not-allowed", &["proxy-sni", "{{tls_authority}}", "notallowed.test"]),
    probe("c20-passthrough-sni-other", &["proxy-sni", "pass.test:{{tls_port}}", "upstream.test"]).needs(SUITE),
    probe("c20-passthrough-sni-match", &["proxy-sni", "pass.test:{{tls_port}}", "pass.test"])
        .control()
        .needs(SUITE),
    // 21: Host / :authority other than the SNI (the status of the request, and of the CONNECT before it: curl
    // reports a refused CONNECT as code 000)
    shell(
        "c21-host-h1",
        "curl -sS --fail --max-time 20 -o /dev/null -w '%{http_code} %{http_connect}' -H 'Host: denied.test' \
         https://upstream.test:{{tls_port}}/c21-h1",
    )
    .needs(SUITE_CURL),
    shell(
        "c21-authority-h2",
        "curl -sS --fail --max-time 20 --http2 -o /dev/null -w '%{http_code} %{http_connect}' \
         -H 'Host: other.test:{{tls_port}}' https://upstream.test:{{tls_port}}/c21-h2",
    )
    .needs(SUITE_CURL),
    // Plain HTTP: the proxy may refuse, or forward with `Host` rewritten (the runner checks the upstream).
    shell(
        "c21-host-plain",
        "curl -sS --fail --max-time 20 -o /dev/null -w '%{http_code} %{http_connect}' -H 'Host: denied.test' \
         http://plain.test:{{plain_port}}/c21-plain",
    )
    .judged_outside()
    .needs(SUITE_CURL),
    shell(
        "c21-request-target-in-tunnel",
        "curl -sS --fail --max-time 20 -o /dev/null -w '%{http_code} %{http_connect}' --http1.1 \
         --request-target http://denied.test/c21-target https://upstream.test:{{tls_port}}/",
    )
    .needs(SUITE_CURL),
    // 22: HTTP/2 through interception
    shell(
        "c22-h2-two-requests",
        "curl -sS --fail --max-time 20 --http2 -w '%{http_version}\\n' https://upstream.test:{{tls_port}}/c22-one \
         https://upstream.test:{{tls_port}}/c22-two",
    )
    .control()
    .needs(SUITE_CURL),
    shell(
        "c22-h2-allowed-path",
        "curl -sS --fail --max-time 20 --http2 https://rules.test:{{tls_port}}/allowed/c22",
    )
    .control()
    .needs(SUITE_CURL),
    shell(
        "c22-h2-forbidden-path",
        "curl -sS --fail --max-time 20 --http2 -o /dev/null -w '%{http_code} %{http_connect}' \
         https://rules.test:{{tls_port}}/c22-forbidden",
    )
    .needs(SUITE_CURL),
    shell(
        "c22-h2-upload",
        "head -c 1048576 /dev/urandom > /tmp/c22.bin && sha256sum /tmp/c22.bin && curl -sS --fail --max-time 20 \
         --http2 --data-binary @/tmp/c22.bin https://upstream.test:{{tls_port}}/c22-upload",
    )
    .control()
    .needs(&[TestPolicy, TestUpstreams, Tool("curl"), Tool("head"), Tool("sha256sum")]),
    // 23: WebSocket
    probe("c23-ws-allowed", &["proxy-ws", "http://rules.test:{{plain_port}}/ws/ok"])
        .control()
        .needs(SUITE),
    probe("c23-ws-bad-path", &["proxy-ws", "http://rules.test:{{plain_port}}/ws/bad"])
        .refused()
        .needs(SUITE),
    probe("c23-ws-denied-host", &["proxy-ws", "http://denied.test:{{plain_port}}/ws/ok"])
        .refused()
        .needs(SUITE),
    shell(
        "c23-ws-tls-bad-path",
        "curl --http1.1 -sS -i --max-time 3 -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
         -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
         https://rules.test:{{tls_port}}/ws/bad | grep -q '^HTTP/1.1 101'",
    )
    .needs(&[TestPolicy, TestUpstreams, Tool("curl"), Tool("grep")]),
    shell(
        "c23-ws-tls-allowed",
        "curl --http1.1 -sS -i --max-time 3 -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
         -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
         https://rules.test:{{tls_port}}/ws/ok | grep -q '^HTTP/1.1 101'",
    )
    .control()
    .needs(&[TestPolicy, TestUpstreams, Tool("curl"), Tool("grep")]),
    // 24: smuggling
    probe(
        "c24-smuggle-cl-te",
        &["proxy-smuggle", "cl-te", "http://smuggle.test:{{plain_port}}/allowed/c24", "/smuggled-cl-te"],
    )
    .needs(SUITE),
    probe(
        "c24-smuggle-te-cl",
        &["proxy-smuggle", "te-cl", "http://smuggle.test:{{plain_port}}/allowed/c24", "/smuggled-te-cl"],
    )
    .needs(SUITE),
    probe(
        "c24-smuggle-double-cl",
        &["proxy-smuggle", "double-cl", "http://smuggle.test:{{plain_port}}/allowed/c24", "/smuggled-double-cl"],
    )
    .needs(SUITE),
    probe(
        "c24-smuggle-te-space",
        &["proxy-smuggle", "te-space", "http://smuggle.test:{{plain_port}}/allowed/c24", "/smuggled-te-space"],
    )
    .needs(SUITE),
    probe(
        "c24-smuggle-get-body",
        &["proxy-smuggle", "get-body", "http://smuggle.test:{{plain_port}}/allowed/c24", "/smuggled-get-body"],
    )
    .needs(SUITE),
    // The same inside an intercepted tunnel, with raw bytes from openssl s_client; first a benign request as the
    // control that the tunnel itself works.
    shell(
        "ctl-openssl-tunnel",
        "printf 'GET /allowed/c24-tls-ok HTTP/1.1\\r\\nHost: smuggle.test:{{tls_port}}\\r\\nConnection: close\\r\\n\\r\\n' \
         | timeout 10 openssl s_client -quiet -proxy 127.0.0.1:3128 -connect smuggle.test:{{tls_port}} \
         -servername smuggle.test -CAfile /etc/bot-bottle/ca-bundle.pem 2>/dev/null | grep -q 'GET /allowed/c24-tls-ok'",
    )
    .control()
    .needs(&[TestPolicy, TestUpstreams, Tool("openssl"), Tool("timeout"), Tool("grep")]),
    shell(
        "c24-smuggle-in-tunnel",
        "printf '{{smuggle_request}}' | timeout 10 openssl s_client -quiet -proxy 127.0.0.1:3128 \
         -connect smuggle.test:{{tls_port}} -servername smuggle.test -CAfile /etc/bot-bottle/ca-bundle.pem \
         2>/dev/null | grep -q 'GET /smuggled-tls'",
    )
    .needs(&[TestPolicy, TestUpstreams, Tool("openssl"), Tool("timeout"), Tool("grep")]),
    // 25: POST to a GET-only rule
    shell(
        "c25-post-tls",
        "head -c 2097152 /dev/urandom > /tmp/c25.bin && curl -sS --fail --max-time 20 --data-binary @/tmp/c25.bin \
         https://rules.test:{{tls_port}}/allowed/c25-post",
    )
    .needs(&[TestPolicy, TestUpstreams, Tool("curl"), Tool("head")]),
    shell(
        "c25-post-plain",
        "curl -sS --fail --max-time 20 --data-binary @/tmp/c25.bin http://rules.test:{{plain_port}}/allowed/c25-post",
    )
    .needs(SUITE_CURL),
    // 26: git push where only fetch is allowed
    shell(
        "c26-fetch-refs",
        "curl -sS --fail --max-time 20 'https://git.test:{{tls_port}}/repo.git/info/refs?service=git-upload-pack'",
    )
    .control()
    .needs(SUITE_CURL),
    shell(
        "c26-fetch-pack",
        "curl -sS --fail --max-time 20 --data-binary x https://git.test:{{tls_port}}/repo.git/git-upload-pack",
    )
    .control()
    .needs(SUITE_CURL),
    shell(
        "c26-push-refs",
        "curl -sS --fail --max-time 20 'https://git.test:{{tls_port}}/repo.git/info/refs?service=git-receive-pack'",
    )
    .needs(SUITE_CURL),
    shell(
        "c26-push-pack",
        "curl -sS --fail --max-time 20 --data-binary x https://git.test:{{tls_port}}/repo.git/git-receive-pack",
    )
    .needs(SUITE_CURL),
    shell(
        "c26-git-push",
        "cd /tmp && git init -q c26 && cd c26 && git -c user.email=a@b.test -c user.name=a commit -q \
         --allow-empty -m x && timeout 20 git push https://git.test:{{tls_port}}/repo.git HEAD:refs/heads/main",
    )
    .needs(&[TestPolicy, TestUpstreams, Tool("git"), Tool("timeout")]),
    // 27: wildcards
    shell(
        "c27-wildcard-subdomain",
        "curl -sS --fail --max-time 20 https://api.wild.test:{{tls_port}}/c27",
    )
    .control()
    .needs(SUITE_CURL),
    shell(
        "c27-wildcard-apex",
        "curl -sS --fail --max-time 20 -o /dev/null -w '%{http_code} %{http_connect}' \
         https://wild.test:{{tls_port}}/c27",
    )
    .needs(SUITE_CURL),
    // 28: case and trailing dot
    probe("c28-connect-upper-dot", &["proxy-connect", "UPSTREAM.TEST.:{{tls_port}}"])
        .control()
        .needs(SUITE),
    probe("c28-connect-dot", &["proxy-connect", "upstream.test.:{{tls_port}}"])
        .control()
        .needs(SUITE),
    probe("c28-get-upper-dot", &["proxy-get", "http://PLAIN.TEST.:{{plain_port}}/c28"])
        .control()
        .needs(SUITE),
    probe("c28-connect-denied-upper-dot", &["proxy-connect", "DENIED.TEST.:{{tls_port}}"])
        .refused()
        .needs(SUITE),
    probe("c28-get-denied-mixed-dot", &["proxy-get", "http://Denied.Test.:{{plain_port}}/c28"])
        .refused()
        .needs(SUITE),
    // 30: malformed heads; the proxy keeps serving
    probe("c30-garbage", &["proxy-malformed", "garbage", "http://plain.test:{{plain_port}}/c30-garbage"]).needs(SUITE),
    probe(
        "c30-no-version",
        &["proxy-malformed", "no-version", "http://plain.test:{{plain_port}}/c30-no-version"],
    )
    .needs(SUITE),
    probe(
        "c30-bad-header",
        &["proxy-malformed", "bad-header", "http://plain.test:{{plain_port}}/c30-bad-header"],
    )
    .needs(SUITE),
    probe(
        "c30-nul-header",
        &["proxy-malformed", "nul-header", "http://plain.test:{{plain_port}}/c30-nul-header"],
    )
    .needs(SUITE),
    probe("c30-obs-fold", &["proxy-malformed", "obs-fold", "http://plain.test:{{plain_port}}/c30-obs-fold"])
        .needs(SUITE),
    probe(
        "c30-oversized",
        &["proxy-malformed", "oversized", "http://plain.test:{{plain_port}}/c30-oversized"],
    )
    .needs(SUITE),
    probe(
        "c30-many-headers",
        &["proxy-malformed", "many-headers", "http://plain.test:{{plain_port}}/c30-many-headers"],
    )
    .needs(SUITE),
    probe(
        "c30-huge-chunk",
        &["proxy-malformed", "huge-chunk", "http://plain.test:{{plain_port}}/c30-huge-chunk"],
    )
    .needs(SUITE),
    probe("c30-still-serving", &["proxy-get", "http://plain.test:{{plain_port}}/c30-after"])
        .control()
        .needs(SUITE),
    // Our own. Issue #11: allow_cidr (here for the pinned names) never admits the bare address; rules see what the
    // upstream decodes; h2c is stripped, never spliced; a tunnel to an intercepted host carries only TLS.
    probe("x-bare-ip-via-cidr", &["proxy-get", "http://127.0.0.1:{{plain_port}}/x-bare-ip"])
        .refused()
        .needs(SUITE),
    probe("x-bare-ip-connect", &["proxy-connect", "127.0.0.1:{{tls_port}}"])
        .refused()
        .needs(SUITE),
    shell(
        "x-encoded-query-name",
        "curl -sS --fail --max-time 20 'https://git.test:{{tls_port}}/repo.git/info/refs?servic%65=git-receive-pack'",
    )
    .needs(SUITE_CURL),
    shell(
        "x-path-parameter",
        "curl -sS --fail --max-time 20 --path-as-is https://rules.test:{{tls_port}}/allowed/..;/x-path-param",
    )
    .needs(SUITE_CURL),
    shell(
        "x-h2c-upgrade",
        "curl -sS --fail --max-time 20 --http1.1 -H 'Connection: Upgrade, HTTP2-Settings' -H 'Upgrade: h2c' \
         -H 'HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA' http://rules.test:{{plain_port}}/allowed/x-h2c",
    )
    .control()
    .needs(SUITE_CURL),
    shell(
        "x-connect-then-plaintext",
        "curl -sS --fail --max-time 20 -p -H 'Host: denied.test' http://upstream.test:{{plain_port}}/x-plain",
    )
    .needs(SUITE_CURL),
];
