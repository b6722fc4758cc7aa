//! The pure decisions the proxy asks of a policy, on policies written the way users write them.

#![allow(clippy::unwrap_used)]

use bottle_policy::host::HostName;
use bottle_policy::{AddressVerdict, Agent, HostVerdict, Overrides, Placement, Policy, Source, TlsMode, from_str};

fn policy(text: &str) -> Policy {
    from_str(&Source { text, path: None }, &Overrides::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn name(s: &str) -> HostName {
    HostName::parse(s).unwrap()
}

#[test]
fn deny_wins_over_allow() {
    let p = policy("[network]\nallow = [\"*.github.com\"]\ndeny = [\"gist.github.com\"]\n");
    assert!(matches!(
        p.network.decide_host(&name("api.github.com"), 443),
        HostVerdict::Allow(_)
    ));
    assert!(matches!(
        p.network.decide_host(&name("gist.github.com"), 443),
        HostVerdict::Denied(_)
    ));
    // escape case 27: the wildcard never matches the apex
    assert_eq!(p.network.decide_host(&name("github.com"), 443), HostVerdict::NotAllowed);
}

#[test]
fn case_and_trailing_dot_give_the_same_decision() {
    // escape case 28
    let p = policy("[network]\nallow = [\"Example.COM.\"]\n");
    let a = p.network.decide_host(&name("EXAMPLE.com."), 443);
    let b = p.network.decide_host(&name("example.com"), 443);
    assert_eq!(a, b);
    assert!(matches!(a, HostVerdict::Allow(_)));
}

#[test]
fn most_specific_entry_decides() {
    let p = policy(
        "[network]\nallow = [\"*.example.com\"]\n[[host]]\nname = \"api.example.com\"\n[[host.rule]]\nmethods = [\"GET\"]\n",
    );
    let HostVerdict::Allow(rule) = p.network.decide_host(&name("api.example.com"), 443) else {
        panic!()
    };
    assert!(
        !rule.admits_request("POST", "/", None),
        "the narrow rule must not be widened by the wildcard"
    );
    let HostVerdict::Allow(rule) = p.network.decide_host(&name("www.example.com"), 443) else {
        panic!()
    };
    assert!(rule.admits_request("POST", "/", None));
}

#[test]
fn ports_are_part_of_the_decision() {
    let p = policy("[network]\nallow = [\"example.com\", \"git.example.com:22\"]\n");
    assert_eq!(p.network.decide_host(&name("example.com"), 22), HostVerdict::NotAllowed);
    assert!(matches!(
        p.network.decide_host(&name("git.example.com"), 22),
        HostVerdict::Allow(_)
    ));
    assert_eq!(
        p.network.decide_host(&name("git.example.com"), 443),
        HostVerdict::NotAllowed
    );
}

#[test]
fn private_answers_need_a_cidr_and_ip_literals_always_do() {
    let p = policy("[network]\nallow = [\"example.com\"]\nallow_cidr = [\"10.20.0.0/16\"]\n");
    assert!(p.network.check_resolved("93.184.215.14".parse().unwrap()).is_ok());
    assert!(p.network.check_resolved("127.0.0.1".parse().unwrap()).is_err());
    assert!(p.network.check_resolved("169.254.169.254".parse().unwrap()).is_err());
    assert!(p.network.check_resolved("::ffff:127.0.0.1".parse().unwrap()).is_err());
    assert!(p.network.check_resolved("10.20.1.1".parse().unwrap()).is_ok());
    assert_eq!(
        p.network.decide_ip_literal("93.184.215.14".parse().unwrap()),
        AddressVerdict::NotAllowed
    );
    assert!(matches!(
        p.network.decide_ip_literal("10.20.3.4".parse().unwrap()),
        AddressVerdict::Allow(_)
    ));
    assert!(matches!(
        p.network.decide_ip_literal("::ffff:10.20.3.4".parse().unwrap()),
        AddressVerdict::Allow(_)
    ));
}

#[test]
fn presets_expand_and_the_file_can_replace_their_entries() {
    let p = policy("[bottle]\nagent = \"claude\"\n");
    assert_eq!(p.bottle.agent, Agent::Claude);
    assert!(matches!(
        p.network.decide_host(&name("api.anthropic.com"), 443),
        HostVerdict::Allow(_)
    ));
    let anthropic = name("api.anthropic.com");
    let cred = p.credentials_for(&anthropic).next().expect("preset credential");
    assert_eq!(cred.placement, Placement::Header("x-api-key".into()));
    assert!(!cred.required);

    // A file that passes the preset host through drops the preset credential rather than failing.
    let p = policy("[bottle]\nagent = \"claude\"\n[[host]]\nname = \"api.anthropic.com\"\ntls = \"passthrough\"\n");
    let HostVerdict::Allow(h) = p.network.decide_host(&name("api.anthropic.com"), 443) else {
        panic!()
    };
    assert_eq!(h.tls, TlsMode::Passthrough);
    assert_eq!(p.credentials_for(&name("api.anthropic.com")).count(), 0);

    // Denying a preset host wins too.
    let p = policy("[bottle]\nagent = \"claude\"\n[network]\ndeny = [\"sentry.io\"]\n");
    assert!(matches!(
        p.network.decide_host(&name("sentry.io"), 443),
        HostVerdict::Denied(_)
    ));
}

#[test]
fn flags_add_to_the_file() {
    let o = Overrides {
        allow: vec!["upstream.test:8443".into()],
        allow_cidr: vec!["127.0.0.1/32".into()],
        resolve: vec!["upstream.test=127.0.0.1".into()],
        deny: vec!["bad.example.com".into()],
        ..Overrides::default()
    };
    let p = from_str(
        &Source {
            text: "[network]\nallow = [\"*.example.com\"]\n",
            path: None,
        },
        &o,
    )
    .unwrap();
    assert!(matches!(
        p.network.decide_host(&name("upstream.test"), 8443),
        HostVerdict::Allow(_)
    ));
    assert!(matches!(
        p.network.decide_host(&name("bad.example.com"), 443),
        HostVerdict::Denied(_)
    ));
    assert_eq!(
        p.network.resolve[&name("upstream.test")],
        vec!["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
}
