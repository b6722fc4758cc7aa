//! Escape cases 31–34, credentials: the real secret lives in the launcher's environment (a `from_env` credential
//! bound to one intercepted host) and in a fake `$HOME` full of decoys; the bottle holds only a placeholder. The
//! bottle searches for the real values everywhere, and tries to send the placeholder where it is not bound.

use bottle_probe::catalogue::{CREDENTIALS, Values};

use crate::decoys::{self, Upstream};
use crate::lab::Lab;
use crate::scenario::{self, Env, LAUNCHERS, Launch, Runs, Script};

/// The launcher-side variable holding the real secret; inside, the same name holds the placeholder.
const TOKEN_VAR: &str = "BOTTLE_TEST_TOKEN";

/// What one launcher's run planted and left behind.
struct Launched {
    who: &'static str,
    /// The bottle's audit log, read before its state directory went away.
    audit: Vec<serde_json::Value>,
    secret: String,
    /// Decoys in the fake home and the host environment: (where, value).
    decoys: Vec<(String, String)>,
}

struct Creds {
    lab: Lab,
    /// The same attempts, in a bottle launched by root and one launched by `nobody`.
    runs: Runs,
    launched: Vec<Launched>,
    tls: Upstream,
    plain: Upstream,
}

static FAMILY: scenario::Cells<Creds> = scenario::Cells::new();

fn family() -> Vec<&'static Creds> {
    scenario::family(&FAMILY, setup, |f| {
        f.runs.tools_present();
    })
}

fn policy_toml() -> String {
    format!(
        r#"[network]
allow = ["upstream.test:*", "other.test:*", "plain.test:*"]
allow_cidr = ["127.0.0.1/32"]

[network.resolve]
"upstream.test" = "127.0.0.1"
"other.test" = "127.0.0.1"
"plain.test" = "127.0.0.1"

[[credential]]
host = "upstream.test"
header = "authorization"
from_env = "{TOKEN_VAR}"
"#
    )
}

/// The catalogue's credentials cases. `decoys` are the five fake-home secrets, then the launcher-only variable, then
/// the host file, in the order of the catalogue's `c31-decoy-N`.
fn script(secret: &str, decoys: &[(String, String)], t: u16, p: u16) -> Script {
    let names = [
        "decoy_home_0",
        "decoy_home_1",
        "decoy_home_2",
        "decoy_home_3",
        "decoy_home_4",
        "host_env",
        "host_file",
    ];
    assert_eq!(decoys.len(), names.len());
    let mut values = Values::default();
    values
        .set("token_var", TOKEN_VAR)
        .set("secret", secret)
        .set("tls_port", t)
        .set("plain_port", p);
    for (name, (_, value)) in names.iter().zip(decoys) {
        values.set(name, value);
    }
    let mut sc = Script::default();
    sc.catalogue(&CREDENTIALS, &values);
    sc
}

fn setup() -> Creds {
    let lab = Lab::new();
    let ca_dir = tempfile::Builder::new().prefix("bb-escape-ca-").tempdir().unwrap();
    let ca = decoys::mint_ca(ca_dir.path());
    let tls = lab.enter(|| decoys::https("127.0.0.1:0", "tls", &ca, &["upstream.test", "other.test"]));
    let plain = lab.enter(|| decoys::http("127.0.0.1:0", "plain"));
    let (t, p) = (tls.port, plain.port);
    let mut runs = Vec::new();
    let mut launched = Vec::new();
    for &(who, user) in scenario::launchers() {
        let env = Env::new();
        let secret = scenario::token("ghp_real_");
        let mut decoys = Vec::new();
        for (path, prefix) in [
            (".ssh/id_ed25519", "ssh-key-"),
            (".aws/credentials", "aws-secret-"),
            (".config/gh/hosts.yml", "gh-token-"),
            (".netrc", "netrc-password-"),
            (".docker/config.json", "docker-auth-"),
        ] {
            let value = scenario::token(prefix);
            env.home_file(path, &format!("secret = {value}\n"));
            decoys.push((format!("~/{path}"), value));
        }
        let host_env = scenario::token("host-env-");
        decoys.push(("the launcher's environment".into(), host_env.clone()));
        let host_file = scenario::token("host-file-");
        std::fs::write(env.host().join("secret.txt"), &host_file).unwrap();
        decoys.push(("a host file outside the workspace".into(), host_file));
        let policy = env.host().join("policy.toml");
        std::fs::write(&policy, policy_toml()).unwrap();
        let ca_cert = env.host().join("upstream-ca.pem");
        std::fs::copy(&ca.cert_path, &ca_cert).unwrap();
        if let Some(uid) = user {
            // The decoy secret in `host/` becomes the launcher's to read, never the bottle's.
            scenario::readable(&[&env.host(), &policy, &ca_cert]);
            env.open_to(uid);
        }
        let sc = script(&secret, &decoys, t, p);
        let flags = [
            "--policy".to_string(),
            policy.display().to_string(),
            "--upstream-ca".into(),
            ca_cert.display().to_string(),
        ];
        let name = format!("creds-{who}");
        let ran = Launch::new(&lab, &env, &name)
            .user(user)
            .flags(&flags)
            .var(TOKEN_VAR, &secret)
            .var("BOTTLE_TEST_HOST_ONLY", &host_env)
            .run(&sc);
        runs.push((who, ran));
        launched.push(Launched {
            who,
            audit: env.audit(&name),
            secret,
            decoys,
        });
    }
    // Nothing of a family may stay on disk: its statics are never dropped. The upstreams keep the minted CA.
    drop(ca_dir);
    Creds {
        runs: Runs(runs),
        launched,
        tls,
        plain,
        lab,
    }
}

/// What the upstreams received, as text.
fn received(f: &Creds) -> Vec<String> {
    [&f.tls, &f.plain]
        .iter()
        .flat_map(|u| u.seen())
        .map(|s| s.text())
        .collect()
}

/// The first line of a received request's text: method and target, never a header that might carry a random token.
fn request_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// `bot-bottle run` with a policy file that must be refused, by each launcher; the agent would create a marker.
/// Returns each launcher's stderr.
fn refused_launch(f: &Creds, name: &str, toml: &str) -> Vec<(&'static str, String)> {
    let mut errs = Vec::new();
    for ((who, user), l) in LAUNCHERS.into_iter().zip(&f.launched) {
        let env = Env::new();
        let path = env.host().join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        if let Some(uid) = user {
            scenario::readable(&[&env.host(), &path]);
            env.open_to(uid);
        }
        let marker = env.work().join(format!("{name}.marker"));
        let out = scenario::output_within(
            Launch::new(&f.lab, &env, name)
                .user(user)
                .flags(&["--policy", &path.display().to_string()])
                .var(TOKEN_VAR, &l.secret)
                .command(&["touch", &marker.display().to_string()]),
            scenario::RUN_TIMEOUT,
        );
        assert_eq!(
            out.status.code(),
            Some(121),
            "the launch was not refused ({who} launcher): {}",
            scenario::text(&out)
        );
        assert!(!marker.exists(), "the agent ran ({who} launcher)");
        errs.push((who, String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    errs
}

#[test]
fn case_31_only_the_placeholder_is_found_inside() {
    for f in family() {
        f.runs.reached("ctl-placeholder");
        // The credential works, so the real value exists on the host side and the search below means something.
        f.runs.reached("ctl-inject");
        let injected: Vec<_> = f.tls.seen().into_iter().filter(|s| s.target == "/inject").collect();
        assert!(!injected.is_empty(), "no injected request");
        for l in &f.launched {
            let bearer = format!("Bearer {}", l.secret);
            assert!(
                injected
                    .iter()
                    .any(|s| s.header("authorization") == Some(bearer.as_str())),
                "the {} launcher's real secret was not injected: {injected:#?}",
                l.who
            );
        }
        for s in &injected {
            assert!(
                f.launched
                    .iter()
                    .any(|l| s.header("authorization") == Some(format!("Bearer {}", l.secret).as_str())),
                "an injected request carried something other than a real secret: {s:#?}"
            );
        }
        for (who, v) in f.runs.held("c31-real-secret") {
            assert!(v.detail["processes"].as_u64().unwrap() >= 2, "{who}: {v:#?}");
        }
        f.runs.held("c31-init-environ");
        for ((who, ran), l) in f.runs.0.iter().zip(&f.launched) {
            for (i, (what, _)) in l.decoys.iter().enumerate() {
                let v = ran.verdict(&format!("c31-decoy-{i}"));
                assert!(
                    !v.escaped,
                    "ESCAPE ({who} launcher): the secret in {what} is readable in the bottle: {v:#?}"
                );
            }
        }
    }
}

#[test]
fn case_32_placeholder_to_an_unbound_host_is_not_substituted_but_blocked_and_logged() {
    for f in family() {
        for id in [
            "c32-other-host-header",
            "c32-other-host-query",
            "c32-bound-host-wrong-header",
        ] {
            f.runs.held(id);
        }
        let got = received(f);
        // Matched on the request line, not the whole text: a random secret may itself contain "c32".
        assert!(
            !got.iter().any(|t| request_line(t).contains("/c32-")),
            "a leaking request reached an upstream: {got:#?}"
        );
        assert!(!got.iter().any(|t| t.contains("bottle-placeholder-")), "{got:#?}");
        for l in &f.launched {
            let leaks = l.audit.iter().filter(|a| a["event"] == "placeholder-leak").count();
            assert!(
                leaks >= 3,
                "each leak must be audited ({} launcher), found {leaks}",
                l.who
            );
        }
    }
}

#[test]
fn case_33_placeholder_over_plain_http_is_not_substituted() {
    for f in family() {
        f.runs.held("c33-plain-other");
        f.runs.held("c33-plain-bound-name");
        let got = received(f);
        assert!(!got.iter().any(|t| request_line(t).contains("/c33-")), "{got:#?}");
        for l in &f.launched {
            assert!(
                !got.iter()
                    .any(|t| t.contains(&l.secret) && !t.starts_with("GET /inject")),
                "{} launcher: {got:#?}",
                l.who
            );
        }
    }
}

#[test]
fn case_34_a_credential_for_a_host_without_interception_refuses_to_launch() {
    for f in family() {
        let toml = format!(
            "[network]\nallow_cidr = [\"127.0.0.1/32\"]\n[network.resolve]\n\"pass.test\" = \"127.0.0.1\"\n\n\
         [[host]]\nname = \"pass.test\"\ntls = \"passthrough\"\n\n[[credential]]\nhost = \"pass.test\"\n\
         header = \"authorization\"\nfrom_env = \"{TOKEN_VAR}\"\n"
        );
        for (who, err) in refused_launch(f, "c34", &toml) {
            assert!(err.contains("passthrough"), "{who}: {err}");
        }
    }
}

#[test]
fn extra_pass_env_of_a_credentials_real_secret_refuses_to_launch() {
    for f in family() {
        let toml = format!("[bottle]\npass_env = [\"{TOKEN_VAR}\"]\n\n{}", policy_toml());
        for (who, err) in refused_launch(f, "x-pass-env", &toml) {
            assert!(err.contains(TOKEN_VAR), "{who}: {err}");
        }
    }
}

#[test]
fn extra_every_credentials_catalogue_case_meets_its_expectation() {
    for f in family() {
        f.runs.meet_the_catalogue(&CREDENTIALS);
    }
}
