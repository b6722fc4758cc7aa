//! Every bad-policy fixture is refused with one error that points at the offending line and column; every shipped
//! example loads; hostile inputs (huge, binary, deeply nested) get one precise error, never a crash.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use bottle_policy::{Effective, Location, Overrides, from_bytes, load_file};

/// (fixture, line, column, part of the message)
const EXPECT: &[(&str, usize, usize, &str)] = &[
    (
        "ask-unknown-value.toml",
        2,
        11,
        "unknown `maybe`; expected \"deny\" or \"ask\"",
    ),
    (
        "ask-timeout-without-ask.toml",
        3,
        15,
        "ask_timeout does nothing unless unknown = \"ask\"",
    ),
    ("ask-timeout-zero.toml", 3, 15, "ask_timeout must be 1 to 3600 seconds"),
    ("ask-reviewer-empty.toml", 5, 12, "reviewer is empty"),
    (
        "ask-reviewer-without-ask.toml",
        4,
        1,
        "[network.ask] does nothing unless",
    ),
    ("bad-agent.toml", 2, 9, "unknown agent `copilot`"),
    ("bad-backend.toml", 2, 11, "unknown backend `vmware`"),
    ("bad-name.toml", 2, 8, "bottle name `My Bottle` is not valid"),
    ("bad-port.toml", 2, 10, "port `70000` is not valid"),
    ("cidr-host-bits.toml", 2, 15, "has host bits set"),
    ("cidr-too-broad.toml", 2, 15, "is too broad"),
    ("credential-framing-header.toml", 6, 10, "a credential cannot go there"),
    ("credential-host-not-allowed.toml", 5, 8, "is not an allowed host"),
    (
        "credential-passthrough.toml",
        6,
        8,
        "is passthrough, so the proxy cannot inject it",
    ),
    (
        "credential-secret-in-pass-env.toml",
        2,
        21,
        "the real secret of a credential",
    ),
    (
        "credential-two-sources.toml",
        5,
        8,
        "exactly one of `from_env` or `from_file`",
    ),
    ("duplicate-host.toml", 2, 25, "declared twice"),
    ("duplicate-key.toml", 3, 1, "duplicate key"),
    ("empty-command.toml", 2, 11, "command is empty"),
    ("ip-literal-allow.toml", 2, 10, "is an IP address"),
    ("ip-literal-obfuscated.toml", 2, 10, "spells an IPv4 address"),
    ("method-lowercase.toml", 4, 19, "must be written `POST`"),
    ("passthrough-with-rule.toml", 4, 1, "cannot be inspected"),
    ("path-without-slash.toml", 4, 10, "must start with `/`"),
    ("reserved-env.toml", 3, 1, "`HTTPS_PROXY` is set by bot-bottle itself"),
    ("resolve-not-an-address.toml", 2, 19, "`localhost` is not an IP address"),
    ("resolve-private-uncovered.toml", 5, 19, "which no allow_cidr covers"),
    (
        "resolve-nat64-private-uncovered.toml",
        5,
        19,
        "which no allow_cidr covers",
    ),
    ("resolve-unspecified.toml", 5, 19, "no service can be reached at"),
    ("rule-host-shadowed-by-port.toml", 2, 10, "without that host's rules"),
    ("upgrade-h2c.toml", 3, 13, "cannot police"),
    ("url-as-host.toml", 2, 10, "that is a URL"),
    (
        "wildcard-spans-registrants.toml",
        2,
        10,
        "spans independent registrants",
    ),
    ("resources-out-of-range.toml", 2, 8, "cpus must be from 1 to 256"),
    ("syntax-unclosed-table.toml", 3, 9, "unclosed table"),
    ("tls-mode-unknown.toml", 3, 7, "unknown tls mode `inspect`"),
    ("unknown-key.toml", 2, 1, "unknown field `bakend`"),
    (
        "wildcard-misplaced.toml",
        2,
        10,
        "only allowed as the whole leftmost label",
    ),
    ("wildcard-public-suffix.toml", 2, 10, "`*.co.uk` is too broad"),
    ("wildcard-star.toml", 2, 31, "`*` alone is not a host pattern"),
    ("wildcard-tld.toml", 2, 10, "`*.com` is too broad"),
    ("share-sockets-engine.toml", 2, 34, "is a container engine's socket"),
    ("share-sockets-parent.toml", 2, 18, "without `..`"),
    ("wrong-type.toml", 2, 9, "expected a sequence"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

#[test]
fn a_huge_bad_flag_value_is_shown_once_and_cut() {
    let o = Overrides {
        allow: vec![format!("{}..x", "a".repeat(100_000))],
        ..Default::default()
    };
    let shown = bottle_policy::from_flags(&o).unwrap_err().to_string();
    assert!(shown.len() < 2_000, "{} bytes", shown.len());
    assert!(shown.starts_with("--allow"), "{shown}");
}

#[test]
fn every_bad_fixture_is_refused_at_its_line() {
    let dir = root().join("tests/fixtures/bad");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = EXPECT.iter().map(|e| e.0.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "every fixture has an expectation and vice versa");
    assert!(EXPECT.len() >= 20);

    for (file, line, column, needle) in EXPECT {
        let err = load_file(&dir.join(file), &Overrides::default()).expect_err(file);
        match &err.location {
            Location::Text { line: l, column: c, .. } => {
                assert_eq!((*l, *c), (*line, *column), "{file}: {err}");
            }
            other => panic!("{file}: no line/column: {other:?}"),
        }
        assert!(err.message.contains(needle), "{file}: {err}");
        assert!(
            err.to_string().contains(&format!("{line} | ")),
            "{file}: no snippet: {err}"
        );
    }
}

#[test]
fn shipped_examples_load_and_round_trip() {
    let dir = root().join("../../examples");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        count += 1;
        let policy = load_file(&path, &Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
        // The effective policy printed by `policy check` is itself a policy that loads to the same thing.
        let printed = Effective::of(&policy).to_toml().unwrap();
        let again = from_bytes(printed.as_bytes(), Some(&path), &Overrides::default())
            .unwrap_or_else(|e| panic!("{}: reprinted policy does not load: {e}\n{printed}", path.display()));
        assert_eq!(again.network.hosts.len(), policy.network.hosts.len(), "{printed}");
        assert_eq!(again.network.deny, policy.network.deny);
        assert_eq!(again.network.allow_cidr, policy.network.allow_cidr);
        assert_eq!(again.network.resolve, policy.network.resolve);
        assert_eq!(again.credentials.len(), policy.credentials.len());
        assert_eq!(again.bottle.env, policy.bottle.env);
    }
    assert!(count >= 3, "examples found: {count}");
}

#[test]
fn huge_policy_is_refused_unparsed() {
    let huge = vec![b'#'; bottle_policy::MAX_POLICY_BYTES + 1];
    let err = from_bytes(&huge, None, &Overrides::default()).unwrap_err();
    assert!(err.message.contains("the limit is"), "{err}");
}

#[test]
fn binary_policy_is_refused() {
    let err = from_bytes(b"[bottle]\nname = \"a\"\n\xff\xfe\x00", None, &Overrides::default()).unwrap_err();
    assert!(err.message.contains("not UTF-8"), "{err}");
    assert!(err.where_().ends_with(":3:1"), "{}", err.where_());
    let err = from_bytes(b"[bottle]\0", None, &Overrides::default()).unwrap_err();
    assert!(err.message.contains("NUL"), "{err}");
}

#[test]
fn deeply_nested_policy_is_refused_without_overflow() {
    for depth in [1_000, 100_000] {
        let text = format!("x = {}{}", "[".repeat(depth), "]".repeat(depth));
        let err = from_bytes(text.as_bytes(), None, &Overrides::default()).unwrap_err();
        assert!(!err.message.is_empty());
        let text = format!("x = {}1{}", "{a=".repeat(depth), "}".repeat(depth));
        assert!(from_bytes(text.as_bytes(), None, &Overrides::default()).is_err());
    }
}

#[test]
fn flags_are_validated_and_named_in_errors() {
    let o = Overrides {
        allow: vec!["*.com".into()],
        ..Overrides::default()
    };
    let err = bottle_policy::from_flags(&o).unwrap_err();
    assert_eq!(err.where_(), "--allow \"*.com\"");
    for (o, flag) in [
        (
            Overrides {
                deny: vec!["*".into()],
                ..Default::default()
            },
            "--deny",
        ),
        (
            Overrides {
                allow_cidr: vec!["::/0".into()],
                ..Default::default()
            },
            "--allow-cidr",
        ),
        (
            Overrides {
                resolve: vec!["a.test".into()],
                ..Default::default()
            },
            "--resolve",
        ),
        (
            Overrides {
                resolve: vec!["a.test=127.0.0.1".into()],
                ..Default::default()
            },
            "--resolve",
        ),
        (
            Overrides {
                backend: Some("vmware".into()),
                ..Default::default()
            },
            "--backend",
        ),
        (
            Overrides {
                name: Some("A B".into()),
                ..Default::default()
            },
            "--name",
        ),
        (
            Overrides {
                env: vec!["NO_EQUALS".into()],
                ..Default::default()
            },
            "-e",
        ),
        (
            Overrides {
                agent: Some("copilot".into()),
                ..Default::default()
            },
            "--agent",
        ),
    ] {
        let err = bottle_policy::from_flags(&o).unwrap_err();
        assert!(err.where_().starts_with(flag), "{err}");
    }
}
