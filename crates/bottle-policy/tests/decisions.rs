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
fn private_answers_need_a_cidr() {
    let p = policy("[network]\nallow = [\"example.com\"]\nallow_cidr = [\"10.20.0.0/16\"]\n");
    assert!(p.network.check_resolved("93.184.215.14".parse().unwrap()).is_ok());
    assert!(p.network.check_resolved("127.0.0.1".parse().unwrap()).is_err());
    assert!(p.network.check_resolved("169.254.169.254".parse().unwrap()).is_err());
    assert!(p.network.check_resolved("::ffff:127.0.0.1".parse().unwrap()).is_err());
    assert!(p.network.check_resolved("10.20.1.1".parse().unwrap()).is_ok());
    // IPv6 forms that embed a private IPv4 address are judged by it (NAT64 local-use, SIIT, 6to4, Teredo).
    for ip in [
        "64:ff9b:1::a14:101",
        "::ffff:0:a14:101",
        "2002:a14:101::1",
        "2001:0:4136:e378:8000:63bf:f5eb:fefe",
    ] {
        assert!(p.network.check_resolved(ip.parse().unwrap()).is_err(), "{ip}");
    }
}

#[test]
fn allow_cidr_and_resolve_pins_never_admit_the_bare_address() {
    // The finding: allow_cidr (needed to reach a private *name*) also admitted the IP itself on every port.
    let p = policy(
        "[network]\nallow_cidr = [\"127.0.0.1/32\", \"10.20.0.0/16\"]\n[network.resolve]\n\"wiki.test\" = \"127.0.0.1\"\n\
         [[host]]\nname = \"wiki.test:8080\"\n[[host.rule]]\nmethods = [\"GET\"]\npaths = [\"/docs/**\"]\n",
    );
    for (ip, port) in [
        ("127.0.0.1", 8080),
        ("127.0.0.1", 9090),
        ("10.20.3.4", 443),
        ("::ffff:127.0.0.1", 8080),
    ] {
        assert_eq!(
            p.network.decide_ip_literal(ip.parse().unwrap(), port),
            AddressVerdict::NotAllowed,
            "{ip}:{port}"
        );
    }
}

#[test]
fn an_address_entry_admits_exactly_its_address_and_port_with_its_rules() {
    let p = policy(
        "[[host]]\nname = \"10.20.3.4:8443\"\n[[host.rule]]\nmethods = [\"GET\"]\n\
         [network]\nallow = [\"[fd00::5]:80\"]\n",
    );
    let AddressVerdict::Allow(rule) = p.network.decide_ip_literal("10.20.3.4".parse().unwrap(), 8443) else {
        panic!("the named address and port are allowed")
    };
    assert!(rule.admits_request("GET", "/", None));
    assert!(!rule.admits_request("DELETE", "/", None));
    assert!(matches!(
        p.network.decide_ip_literal("::ffff:10.20.3.4".parse().unwrap(), 8443),
        AddressVerdict::Allow(_)
    ));
    assert_eq!(
        p.network.decide_ip_literal("10.20.3.4".parse().unwrap(), 443),
        AddressVerdict::NotAllowed
    );
    assert!(matches!(
        p.network.decide_ip_literal("fd00::5".parse().unwrap(), 80),
        AddressVerdict::Allow(_)
    ));
}

fn refused(text: &str, overrides: &Overrides) -> String {
    match from_str(&Source { text, path: None }, overrides) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

const GET_ONLY: &str = "[[host]]\nname = \"c.test\"\n[[host.rule]]\nmethods = [\"GET\"]\npaths = [\"/ok/**\"]\n";

#[test]
fn a_port_entry_that_would_drop_a_hosts_rules_is_refused() {
    // The finding: `allow = ["c.test:443"]` beside a GET-only [[host]] c.test removed the rules on port 443.
    let text = format!("[network]\nallow = [\"c.test:443\"]\n{GET_ONLY}");
    let err = refused(&text, &Overrides::default());
    assert!(err.contains("without that host's rules"), "{err}");
    assert!(err.contains("2:"), "points at the allow entry: {err}");
    let flag = Overrides {
        allow: vec!["c.test:443".into()],
        ..Overrides::default()
    };
    let err = refused(GET_ONLY, &flag);
    assert!(
        err.contains("--allow") && err.contains("without that host's rules"),
        "{err}"
    );
    // An exact name under a wildcard rule host, and a passthrough entry for the same name, likewise.
    let wild =
        "[[host]]\nname = \"*.c.test\"\n[[host.rule]]\nmethods = [\"GET\"]\n[network]\nallow = [\"api.c.test\"]\n";
    assert!(refused(wild, &Overrides::default()).contains("without that host's rules"));
    let pass = format!("{GET_ONLY}[[host]]\nname = \"c.test:8443\"\ntls = \"passthrough\"\n");
    assert!(refused(&pass, &Overrides::default()).contains("passthrough"));
}

#[test]
fn a_hosts_rules_apply_on_every_port_it_is_reachable_on() {
    let p = policy(&format!("[network]\nallow = [\"c.test:8080\"]\n{GET_ONLY}"));
    for port in [80, 443, 8080] {
        let HostVerdict::Allow(rule) = p.network.decide_host(&name("c.test"), port) else {
            panic!("{port} allowed")
        };
        assert!(rule.admits_request("GET", "/ok/x", None), "{port}");
        assert!(!rule.admits_request("POST", "/ok/x", None), "{port}");
        assert!(!rule.admits_request("GET", "/admin", None), "{port}");
    }
    // A narrower entry that carries rules of its own is a deliberate choice and stays as written.
    let p = policy(
        "[network]\nallow = [\"*.example.com\"]\n[[host]]\nname = \"api.example.com\"\n[[host.rule]]\nmethods = [\"GET\"]\n",
    );
    assert!(matches!(
        p.network.decide_host(&name("api.example.com"), 443),
        HostVerdict::Allow(_)
    ));
}

#[test]
fn upgrades_are_opt_in_per_host_and_never_h2c() {
    let p = policy("[[host]]\nname = \"t.test\"\nupgrades = [\"TCP\"]\n");
    let HostVerdict::Allow(rule) = p.network.decide_host(&name("t.test"), 443) else {
        panic!()
    };
    assert_eq!(rule.upgrades, ["tcp"]);
    let err = refused(
        "[[host]]\nname = \"t.test\"\nupgrades = [\"h2c\"]\n",
        &Overrides::default(),
    );
    assert!(err.contains("cannot police"), "{err}");
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
    let p = policy("[bottle]\nagent = \"claude\"\n[network]\ndeny = [\"platform.claude.com\"]\n");
    assert!(matches!(
        p.network.decide_host(&name("platform.claude.com"), 443),
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
