//! Escape cases 18–30, proxy policy: what the proxy must refuse when the bottle speaks to it directly (raw HTTP/1.1
//! from the probe) and through real clients (curl over HTTP/1.1 and HTTP/2, git, openssl s_client). The upstreams are
//! local (TLS with a CA minted here, trusted via `--upstream-ca`, and plain HTTP) and record every request that
//! reaches them: "refused" means both a refusal in the bottle and nothing at the upstream. The same attempts run in two
//! bottles, one launched by root and one by an unprivileged user (`nobody`); the upstreams are shared, so a request
//! from either counts, and what each run's controls must have delivered is checked in that run's own requests.

use std::process::Output;

use bottle_probe::catalogue::{PROXY_POLICY, Values};

use crate::decoys::{self, Seen, Upstream};
use crate::lab::Lab;
use crate::scenario::{self, Env, LAUNCHERS, Launch, Runs, Script};

/// What the upstreams received during one launcher's run.
struct Received {
    tls: Vec<Seen>,
    plain: Vec<Seen>,
}

struct Policy {
    lab: Lab,
    runs: Runs,
    /// Per run, in the order of `runs`.
    received: Vec<Received>,
    tls: Upstream,
    plain: Upstream,
}

static FAMILY: scenario::Cells<Policy> = scenario::Cells::new();

fn family() -> Vec<&'static Policy> {
    scenario::family(&FAMILY, setup, |f| {
        f.runs.tools_present();
    })
}

const NAMES: [&str; 10] = [
    "upstream.test",
    "other.test",
    "plain.test",
    "rules.test",
    "git.test",
    "wild.test",
    "api.wild.test",
    "pass.test",
    "smuggle.test",
    "denied.test",
];

fn policy_toml() -> String {
    let resolve: String = NAMES.iter().map(|n| format!("\"{n}\" = \"127.0.0.1\"\n")).collect();
    format!(
        r#"[network]
allow = ["upstream.test:*", "other.test:*", "plain.test:*", "*.wild.test:*"]
deny = ["denied.test:*"]
allow_cidr = ["127.0.0.1/32"]

[network.resolve]
{resolve}
[[host]]
name = "rules.test:*"
[[host.rule]]
methods = ["GET"]
paths = ["/allowed/**", "/ws/ok"]

[[host]]
name = "git.test:*"
[[host.rule]]
methods = ["GET"]
paths = ["/*/info/refs"]
query = {{ service = "git-upload-pack" }}
[[host.rule]]
methods = ["POST"]
paths = ["/*/git-upload-pack"]

[[host]]
name = "smuggle.test:*"
[[host.rule]]
methods = ["GET", "POST"]
paths = ["/allowed/**"]

[[host]]
name = "pass.test:*"
tls = "passthrough"
"#
    )
}

fn setup() -> Policy {
    let lab = Lab::new();
    let ca_dir = tempfile::Builder::new().prefix("bb-escape-ca-").tempdir().unwrap();
    let ca = decoys::mint_ca(ca_dir.path());
    let tls = lab.enter(|| decoys::https("127.0.0.1:0", "tls", &ca, &NAMES));
    let plain = lab.enter(|| decoys::http("127.0.0.1:0", "plain"));
    let (t, p) = (tls.port, plain.port);

    // Case 24 in a tunnel: a request hiding a second one in its chunked body, as `printf` escapes (its
    // Content-Length depends on the port's digits, so it is computed here).
    let inner = format!("GET /smuggled-tls HTTP/1.1\r\nHost: smuggle.test:{t}\r\n\r\n");
    let body = format!("0\r\n\r\n{inner}");
    let raw = format!(
        "POST /allowed/c24 HTTP/1.1\r\nHost: smuggle.test:{t}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let mut values = Values::default();
    values
        .set("tls_port", t)
        .set("plain_port", p)
        .set("tls_authority", format!("upstream.test:{t}"))
        .set("smuggle_request", raw.replace('\r', "\\r").replace('\n', "\\n"));
    let mut sc = Script::default();
    sc.catalogue(&PROXY_POLICY, &values);

    let mut runs = Vec::new();
    let mut received = Vec::new();
    for &(who, user) in scenario::launchers() {
        let env = Env::new();
        let policy = env.host().join("policy.toml");
        std::fs::write(&policy, policy_toml()).unwrap();
        let ca_cert = env.host().join("upstream-ca.pem");
        std::fs::copy(&ca.cert_path, &ca_cert).unwrap();
        if let Some(uid) = user {
            scenario::readable(&[&env.host(), &policy, &ca_cert]);
            env.open_to(uid);
        }
        let flags = [
            "--policy".to_string(),
            policy.display().to_string(),
            "--upstream-ca".into(),
            ca_cert.display().to_string(),
        ];
        let (tls_before, plain_before) = (tls.seen().len(), plain.seen().len());
        let ran = Launch::new(&lab, &env, &format!("policy-{who}"))
            .user(user)
            .flags(&flags)
            .run(&sc);
        runs.push((who, ran));
        received.push(Received {
            tls: tls.seen().split_off(tls_before),
            plain: plain.seen().split_off(plain_before),
        });
    }
    // Nothing of a family may stay on disk: its statics are never dropped. The upstreams keep the minted CA.
    drop(ca_dir);
    Policy {
        runs: Runs(runs),
        received,
        tls,
        plain,
        lab,
    }
}

/// Each run's launcher and what the upstreams received during it.
fn per_run(f: &Policy) -> impl Iterator<Item = (&'static str, &Received)> {
    f.runs.0.iter().map(|(who, _)| *who).zip(&f.received)
}

/// Neither upstream saw a request whose line or headers contain `needle`.
fn never_seen(f: &Policy, needle: &str) {
    for (what, up) in [("tls", &f.tls), ("plain", &f.plain)] {
        let hits: Vec<String> = up
            .seen()
            .iter()
            .map(|s| s.text())
            .filter(|t| t.contains(needle))
            .collect();
        assert!(hits.is_empty(), "the {what} upstream received {needle}: {hits:#?}");
    }
}

fn seen(up: &[Seen], target: &str) -> bool {
    up.iter().any(|s| s.target.contains(target))
}

/// `bot-bottle run` with a policy that must not load, by each launcher; the agent would create `marker`.
fn refused_launch(f: &Policy, name: &str, flags: &[String]) -> Vec<(&'static str, Output)> {
    let mut outs = Vec::new();
    for (who, user) in LAUNCHERS {
        let env = Env::new();
        if let Some(uid) = user {
            env.open_to(uid);
        }
        let marker = env.work().join(format!("{name}.marker"));
        let out = scenario::output_within(
            Launch::new(&f.lab, &env, name)
                .user(user)
                .flags(flags)
                .command(&["touch", &marker.display().to_string()]),
            scenario::RUN_TIMEOUT,
        );
        assert_eq!(
            out.status.code(),
            Some(121),
            "the policy loaded ({who} launcher): {}",
            scenario::text(&out)
        );
        assert!(
            !marker.exists(),
            "the agent ran despite the refused policy ({who} launcher)"
        );
        outs.push((who, out));
    }
    outs
}

#[test]
fn case_18_connect_to_a_non_allowed_host_is_403_with_no_tunnel() {
    for f in family() {
        f.runs.reached("ctl-tls");
        for (who, v) in f.runs.refused("c18-connect-deny-list") {
            assert!(
                v.detail["denied"].as_str().unwrap().contains("deny-list"),
                "{who}: {v:#?}"
            );
        }
        for (who, v) in f.runs.refused("c18-connect-not-allowed") {
            assert!(
                v.detail["denied"].as_str().unwrap().contains("not-allowed"),
                "{who}: {v:#?}"
            );
        }
        f.runs.held("c18-curl-not-allowed");
        never_seen(f, "c18");
    }
}

#[test]
fn case_19_plain_http_get_to_a_non_allowed_host_is_403() {
    for f in family() {
        f.runs.reached("ctl-plain");
        f.runs.refused("c19-get-deny-list");
        f.runs.refused("c19-get-not-allowed");
        never_seen(f, "c19");
    }
}

#[test]
fn case_20_connect_to_a_with_sni_b_is_denied() {
    for f in family() {
        // The probe's ClientHello is answered when the SNI matches: a held verdict below is the proxy's doing.
        f.runs.reached("ctl-sni-match");
        f.runs.reached("c20-passthrough-sni-match");
        for id in [
            "c20-sni-allowed-other",
            "c20-sni-denied",
            "c20-sni-not-allowed",
            "c20-passthrough-sni-other",
        ] {
            for (who, v) in f.runs.held(id) {
                assert_eq!(
                    v.detail["connect_status"], 200,
                    "{id} should fail at the ClientHello, not before ({who} launcher): {v:#?}"
                );
            }
        }
    }
}

#[test]
fn case_21_host_or_authority_other_than_the_sni_is_denied() {
    for f in family() {
        for id in ["c21-host-h1", "c21-authority-h2", "c21-request-target-in-tunnel"] {
            for (who, v) in f.runs.held(id) {
                assert!(
                    v.stdout().starts_with("403 200"),
                    "{id} ({who} launcher): not refused with a 403 inside the tunnel: {v:#?}"
                );
            }
        }
        // Plain HTTP: the proxy may refuse, or forward with `Host` rewritten to the URL's authority (RFC 9112 §3.2.2);
        // never with the other name.
        for ((who, v), (_, got)) in f.runs.verdicts("c21-host-plain").into_iter().zip(per_run(f)) {
            if v.escaped {
                let got = got
                    .plain
                    .iter()
                    .find(|s| s.target == "/c21-plain")
                    .unwrap_or_else(|| panic!("forwarded, not received ({who} launcher)"));
                let want = format!("plain.test:{}", f.plain.port);
                assert_eq!(got.header("host"), Some(want.as_str()), "{who}: {got:?}");
            }
        }
        for got in f.plain.seen().iter().filter(|s| s.target == "/c21-plain") {
            let want = format!("plain.test:{}", f.plain.port);
            assert_eq!(got.header("host"), Some(want.as_str()), "{got:?}");
        }
        for id in ["c21-h1", "c21-h2", "c21-target"] {
            never_seen(f, id);
        }
        never_seen(f, "denied.test");
    }
}

#[test]
fn case_22_h2_through_interception_is_policed_per_request_and_intact() {
    for f in family() {
        for (who, v) in f.runs.reached("c22-h2-two-requests") {
            let out = v.stdout();
            assert!(
                out.contains("GET /c22-one") && out.contains("GET /c22-two"),
                "{who}: {v:#?}"
            );
            assert!(
                out.lines().filter(|l| l.trim() == "2").count() == 2,
                "not HTTP/2 to the proxy ({who} launcher): {v:#?}"
            );
        }
        f.runs.reached("c22-h2-allowed-path");
        for (who, v) in f.runs.held("c22-h2-forbidden-path") {
            assert!(v.stdout().starts_with("403"), "{who}: {v:#?}");
        }
        for (who, got) in per_run(f) {
            assert!(seen(&got.tls, "/allowed/c22"), "{who}: {:?}", got.tls);
        }
        assert!(!seen(&f.tls.seen(), "c22-forbidden"));
        for ((who, v), (_, got)) in f.runs.reached("c22-h2-upload").into_iter().zip(per_run(f)) {
            let sent = v.stdout().split_whitespace().next().unwrap().to_string();
            let got = got
                .tls
                .iter()
                .find(|s| s.target == "/c22-upload")
                .unwrap_or_else(|| panic!("the upload never arrived ({who} launcher)"));
            assert_eq!(got.body_len, 1_048_576, "{who}: {got:?}");
            assert_eq!(
                got.body_sha256, sent,
                "the body was corrupted on the way ({who} launcher)"
            );
        }
    }
}

#[test]
fn case_23_websocket_upgrades_are_policed_and_stay_on_their_host() {
    for f in family() {
        for (who, v) in f.runs.reached("c23-ws-allowed") {
            assert_eq!(v.status(), Some(101), "{who}: {v:#?}");
        }
        f.runs.refused("c23-ws-bad-path");
        f.runs.refused("c23-ws-denied-host");
        f.runs.held("c23-ws-tls-bad-path");
        f.runs.reached("c23-ws-tls-allowed");
        for up in [&f.tls, &f.plain] {
            let upgrades: Vec<String> = up
                .seen()
                .iter()
                .filter(|s| s.header("upgrade").is_some())
                .map(|s| s.target.clone())
                .collect();
            assert!(
                upgrades.iter().all(|t| t == "/ws/ok"),
                "a refused upgrade reached an upstream: {upgrades:?}"
            );
        }
        for (who, got) in per_run(f) {
            assert!(
                seen(&got.plain, "/ws/ok") && seen(&got.tls, "/ws/ok"),
                "{who}: {:?} {:?}",
                got.plain,
                got.tls
            );
        }
    }
}

#[test]
fn issue_11_allow_cidr_never_admits_the_bare_address() {
    for f in family() {
        f.runs.refused("x-bare-ip-via-cidr");
        f.runs.refused("x-bare-ip-connect");
        never_seen(f, "/x-bare-ip");
    }
}

#[test]
fn issue_11_rules_decide_on_what_the_upstream_decodes() {
    for f in family() {
        f.runs.held("x-encoded-query-name");
        f.runs.held("x-path-parameter");
        never_seen(f, "servic%65");
        never_seen(f, "x-path-param");
    }
}

#[test]
fn issue_11_h2c_is_stripped_and_answered_as_http_1_1() {
    for f in family() {
        f.runs.reached("x-h2c-upgrade");
        for up in [&f.tls, &f.plain] {
            let upgrades: Vec<String> = up
                .seen()
                .iter()
                .filter(|s| s.header("upgrade").is_some() || s.header("http2-settings").is_some())
                .map(|s| s.target.clone())
                .collect();
            assert!(
                upgrades.iter().all(|t| t == "/ws/ok"),
                "an h2c upgrade reached an upstream: {upgrades:?}"
            );
        }
        for (who, got) in per_run(f) {
            assert!(
                seen(&got.plain, "/allowed/x-h2c"),
                "{who}: the stripped request reached the upstream"
            );
        }
    }
}

#[test]
fn issue_11_wildcards_over_independent_registrants_are_refused() {
    for f in family() {
        for (name, pattern) in [
            ("x-star-amazonaws", "*.amazonaws.com"),
            ("x-star-kawasaki", "*.kawasaki.jp"),
        ] {
            refused_launch(f, name, &["--allow".to_string(), pattern.to_string()]);
        }
    }
}

#[test]
fn case_24_request_smuggling_never_reaches_upstream() {
    for f in family() {
        for mode in ["cl-te", "te-cl", "double-cl", "te-space", "get-body"] {
            f.runs.held(&format!("c24-smuggle-{mode}"));
        }
        f.runs.reached("ctl-openssl-tunnel");
        f.runs.held("c24-smuggle-in-tunnel");
        never_seen(f, "/smuggled");
    }
}

#[test]
fn case_25_post_to_a_get_only_rule_is_403_before_any_body_byte() {
    for f in family() {
        f.runs.held("c25-post-tls");
        f.runs.held("c25-post-plain");
        never_seen(f, "c25-post");
    }
}

#[test]
fn case_26_git_push_is_403_where_only_fetch_is_allowed() {
    for f in family() {
        f.runs.reached("c26-fetch-refs");
        f.runs.reached("c26-fetch-pack");
        f.runs.held("c26-push-refs");
        f.runs.held("c26-push-pack");
        f.runs.held("c26-git-push");
        never_seen(f, "git-receive-pack");
    }
}

#[test]
fn case_27_wildcards_do_not_match_the_apex_and_too_broad_ones_are_rejected() {
    for f in family() {
        f.runs.reached("c27-wildcard-subdomain");
        for (who, v) in f.runs.held("c27-wildcard-apex") {
            assert_eq!(v.stdout(), "000 403", "refused at CONNECT ({who} launcher): {v:#?}");
        }
        for (name, pattern) in [
            ("c27-star", "*"),
            ("c27-star-com", "*.com"),
            ("c27-star-co-uk", "*.co.uk"),
        ] {
            refused_launch(f, name, &["--allow".to_string(), pattern.to_string()]);
        }
    }
}

#[test]
fn case_28_case_and_trailing_dot_get_the_same_decision() {
    for f in family() {
        f.runs.reached("c28-connect-upper-dot");
        f.runs.reached("c28-connect-dot");
        f.runs.reached("c28-get-upper-dot");
        f.runs.refused("c28-connect-denied-upper-dot");
        f.runs.refused("c28-get-denied-mixed-dot");
    }
}

#[test]
fn case_29_l7_rules_or_credentials_on_a_passthrough_host_refuse_to_load() {
    for f in family() {
        let rules = "[[host]]\nname = \"pass.test\"\ntls = \"passthrough\"\n[[host.rule]]\nmethods = [\"GET\"]\n";
        let creds = "[[host]]\nname = \"pass.test\"\ntls = \"passthrough\"\n\n[[credential]]\nhost = \"pass.test\"\n\
                 header = \"authorization\"\nfrom_env = \"HOME\"\n";
        for (name, toml) in [("c29-rules", rules), ("c29-credential", creds)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(format!("{name}.toml"));
            std::fs::write(&path, toml).unwrap();
            // Both launchers read the policy.
            scenario::readable(&[dir.path(), &path]);
            for (who, out) in refused_launch(f, name, &["--policy".to_string(), path.display().to_string()]) {
                assert!(
                    String::from_utf8_lossy(&out.stderr).contains("passthrough"),
                    "{who}: {}",
                    scenario::text(&out)
                );
            }
        }
    }
}

#[test]
fn case_30_malformed_oversized_and_slow_requests_close_and_the_proxy_keeps_serving() {
    for f in family() {
        for kind in [
            "garbage",
            "no-version",
            "bad-header",
            "nul-header",
            "obs-fold",
            "oversized",
            "many-headers",
            "huge-chunk",
        ] {
            f.runs.held(&format!("c30-{kind}"));
        }
        for (who, v) in f.runs.held("c30-slowloris") {
            let ms = v.detail["closed_after_ms"].as_u64().unwrap();
            assert!(
                ms <= 20_000,
                "the proxy waited {ms} ms for a request head ({who} launcher)"
            );
        }
        f.runs.reached("c30-still-serving");
        for kind in [
            "garbage",
            "no-version",
            "bad-header",
            "nul-header",
            "obs-fold",
            "oversized",
            "many-headers",
            "huge-chunk",
        ] {
            never_seen(f, &format!("/c30-{kind}"));
        }
        never_seen(f, "/c30-slow");
        for (who, got) in per_run(f) {
            assert!(seen(&got.plain, "/c30-after"), "{who}: {:?}", got.plain);
        }
    }
}

#[test]
fn extra_a_tunnel_to_an_intercepted_host_carries_only_tls() {
    for f in family() {
        f.runs.held("x-connect-then-plaintext");
        never_seen(f, "x-plain");
    }
}

#[test]
fn extra_every_proxy_policy_catalogue_case_meets_its_expectation() {
    for f in family() {
        f.runs.meet_the_catalogue(&PROXY_POLICY);
    }
}
