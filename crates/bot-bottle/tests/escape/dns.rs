//! Escape cases 14–17, DNS: exfiltration through name lookups, direct queries to public resolvers over UDP, TCP and
//! TLS, and whatever resolver the bottle has. The lab runs a DNS server on every address a query could go to
//! (8.8.8.8, 1.1.1.1, 127.0.0.1, 127.0.0.53, the host's own resolvers), logging every question: no query may
//! arrive at all, not even from the proxy on the bottle's behalf. The same attempts run in two bottles, one
//! launched by root and one by an unprivileged user (`nobody`); the decoys are shared, so a query from either counts.

use bottle_probe::catalogue::{DNS, Values};

use crate::decoys::{self, Decoy};
use crate::lab::{self, Lab};
use crate::scenario::{self, Env, Launch, Runs, Script};

struct Dns {
    _lab: Lab,
    runs: Runs,
    secret: String,
    dns: Decoy,
    dot: Decoy,
    https: Decoy,
}

static FAMILY: scenario::Cells<Dns> = scenario::Cells::new();

fn family() -> Vec<&'static Dns> {
    scenario::family(&FAMILY, setup, |f| {
        f.runs.tools_present();
    })
}

fn setup() -> Dns {
    let lab = Lab::new();
    // Dual-stack port 53 on every lab address, the systemd-resolved stub 127.0.0.53 included.
    let dns = lab.enter(|| decoys::dns("[::]:53", Vec::new()));
    let dot = lab.enter(|| decoys::tcp("[::]:853", b""));
    let https = lab.enter(|| decoys::tcp("[::]:443", b""));
    let secret = scenario::token("exfil");
    let name = format!("{secret}.attacker.example");
    let resolver = lab::host_resolvers()
        .first()
        .map_or_else(|| "10.255.255.53".to_string(), ToString::to_string);
    let resolver_addr = if resolver.contains(':') {
        format!("[{resolver}]:53")
    } else {
        format!("{resolver}:53")
    };

    let mut values = Values::default();
    values.set("exfil_name", &name).set("host_resolver", resolver_addr);
    let mut sc = Script::default();
    sc.catalogue(&DNS, &values);

    let mut runs = Vec::new();
    for &(who, user) in scenario::launchers() {
        let env = Env::new();
        if let Some(uid) = user {
            env.open_to(uid);
        }
        let ran = Launch::new(&lab, &env, &format!("dns-{who}")).user(user).run(&sc);
        runs.push((who, ran));
    }
    Dns {
        runs: Runs(runs),
        secret,
        dns,
        dot,
        https,
        _lab: lab,
    }
}

/// No DNS server in the lab heard a single question.
fn no_query(f: &Dns) {
    assert_eq!(
        f.dns.log.count(),
        0,
        "DNS questions reached the lab: {:?}",
        f.dns.log.lines()
    );
}

#[test]
fn case_14_secret_in_a_name_never_reaches_a_resolver() {
    for f in family() {
        for id in [
            "c14-getaddrinfo",
            "c14-getent",
            "c14-getent-ahosts",
            "c14-curl-via-proxy",
            "c14-curl-noproxy",
            "c14-ssh",
        ] {
            f.runs.held(id);
        }
        f.runs.refused("c14-proxy-connect");
        no_query(f);
        let everything = [&f.dns, &f.dot, &f.https]
            .iter()
            .flat_map(|d| d.log.lines())
            .collect::<Vec<_>>();
        assert!(
            !everything.iter().any(|l| l.contains(&f.secret)),
            "the secret left the bottle: {everything:?}"
        );
    }
}

#[test]
fn case_15_queries_to_8_8_8_8_over_udp_and_tcp_are_blocked() {
    for f in family() {
        for id in [
            "c15-udp-8888",
            "c15-tcp-8888",
            "c15-udp-v6",
            "c15-udp-host-resolver",
            "c15-udp-loopback",
            "c15-udp-stub",
        ] {
            f.runs.held(id);
        }
        f.runs.refused("c15-proxy-connect-53");
        no_query(f);
    }
}

#[test]
fn case_16_dns_over_tls_on_853_is_blocked() {
    for f in family() {
        for id in ["c16-dot-1111", "c16-dot-8888", "c16-dot-v6"] {
            f.runs.held(id);
        }
        f.runs.refused("c16-proxy-connect-853-name");
        f.runs.refused("c16-proxy-connect-853-literal");
        assert_eq!(f.dot.log.count(), 0, "{:?}", f.dot.log.lines());
    }
}

#[test]
fn case_17_the_bottle_has_no_resolver_for_non_allowed_names() {
    for f in family() {
        for id in ["c17-resolve-public-name", "c17-resolve-ipv6-name"] {
            f.runs.held(id);
        }
        for (who, v) in f.runs.held("c17-resolv-conf-has-no-nameserver") {
            assert!(v.evidence.contains("exists inside the bottle"), "{who}: {v:#?}");
        }
        no_query(f);
    }
}

#[test]
fn extra_dns_over_https_endpoints_are_refused_by_the_proxy() {
    for f in family() {
        f.runs.refused("x-doh-name");
        f.runs.refused("x-doh-literal");
        f.runs.refused("x-doh-get");
        assert_eq!(f.https.log.count(), 0, "{:?}", f.https.log.lines());
    }
}

#[test]
fn extra_every_dns_catalogue_case_meets_its_expectation() {
    for f in family() {
        f.runs.meet_the_catalogue(&DNS);
    }
}
