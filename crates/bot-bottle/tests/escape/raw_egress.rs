//! Escape cases 1–13, raw egress: every way out that is not the proxy, and the proxy asked for what it must not reach.
//! One bottle runs every attempt; the lab around it owns every address the attempts aim at, so an attempt that gets
//! out lands on a decoy that counts it. A second, detached bottle stands in for "another bottle" (case 10). The same
//! attempts run in two bottles, one launched by root and one by an unprivileged user (`nobody`); the decoys are
//! shared, so a contact from either counts.

use std::net::IpAddr;

use bottle_probe::catalogue::{RAW_EGRESS, Values};

use crate::decoys::{self, Decoy, Upstream};
use crate::lab::Lab;
use crate::scenario::{self, Env, Launch, Runs, Script};

/// The other bottle: its lease address, its host-side proxy port, and a service on its address.
struct Other {
    addr: String,
    proxy_port: u16,
    service: Decoy,
    audit_lines: usize,
}

struct Raw {
    _lab: Lab,
    runs: Runs,
    /// The questions the lab's DNS heard during each run.
    dns_per_run: Vec<(&'static str, Vec<String>)>,
    /// The host's own HTTP service on loopback.
    lo_http: Upstream,
    lo_v6: Decoy,
    lo_udp: Decoy,
    /// Dual-stack listeners on every lab address: "the internet".
    web80: Decoy,
    web443: Decoy,
    udp_any: Decoy,
    ssh: Decoy,
    dns: Decoy,
    agent: Decoy,
    other: Other,
}

static FAMILY: scenario::Cells<Raw> = scenario::Cells::new();

fn family() -> Vec<&'static Raw> {
    scenario::family(&FAMILY, setup, |f| {
        f.runs.tools_present();
    })
}

/// Names the lab's DNS server answers: allowed names that resolve into private space (cases 11, 12).
fn answers() -> Vec<(String, IpAddr)> {
    [
        ("internal.test", "10.0.0.1"),
        ("metadata.test", "169.254.169.254"),
        ("ula.test", "fd00::1"),
        ("rebind.test", "127.0.0.1"),
        ("rebind6.test", "::1"),
    ]
    .iter()
    .map(|(n, ip)| (n.to_string(), ip.parse().unwrap()))
    .collect()
}

fn setup() -> Raw {
    let lab = Lab::new();
    let env = Env::new();
    let lo_http = lab.enter(|| decoys::http("127.0.0.1:0", "host-loopback"));
    let lo_v6 = lab.enter(|| decoys::tcp("[::1]:0", b""));
    let lo_udp = lab.enter(|| decoys::udp("127.0.0.1:0"));
    let web80 = lab.enter(|| decoys::tcp("[::]:80", b"HTTP/1.1 200 OK\r\n\r\nthe internet\n"));
    let web443 = lab.enter(|| decoys::tcp("[::]:443", b""));
    let udp_any = lab.enter(|| decoys::udp("[::]:443"));
    let ssh = lab.enter(|| decoys::tcp("[::]:22", b"SSH-2.0-OpenSSH_9.2 decoy\r\n"));
    let dns = lab.enter(|| decoys::dns("[::]:53", answers()));
    let agent_path = env.host().join("agent.sock");
    let agent = decoys::unix(&agent_path);

    // Another bottle, running, with a service on its lease address. It is a decoy, not an attempt: root launches it
    // (in root's directories) and both launchers' bottles try to reach it.
    let out = scenario::output_within(
        Launch::new(&lab, &env, "raw-other")
            .flags(&["-d"])
            .command(&["sleep", "600"]),
        scenario::RUN_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "the other bottle did not start: {}",
        scenario::text(&out)
    );
    let st = env.state_json("raw-other");
    let addr = st["addr"].as_str().unwrap().to_string();
    let proxy_port: u16 = st["proxy_url"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let service = lab.enter(|| decoys::tcp(&format!("{addr}:0"), b"other bottle's service\n"));

    let lo = lo_http.port;
    let mut values = Values::default();
    values
        .set("lo_http", lo)
        .set("lo_v6", lo_v6.port)
        .set("lo_udp", lo_udp.port)
        .set("agent_path", agent_path.display())
        .set("other_addr", &addr)
        .set("other_proxy_port", proxy_port)
        .set("other_service_port", service.port);
    let mut sc = Script::default();
    sc.catalogue(&RAW_EGRESS, &values);

    let flags = [
        "--allow",
        "internal.test:80",
        "--allow",
        "metadata.test:80",
        "--allow",
        "ula.test:80",
        "--allow",
        "rebind6.test:80",
        "--allow",
        &format!("rebind.test:{lo}"),
    ];
    let mut runs = Vec::new();
    let mut dns_per_run = Vec::new();
    for &(who, user) in scenario::launchers() {
        let own;
        let run_env = match user {
            None => &env,
            Some(uid) => {
                own = Env::new();
                own.open_to(uid);
                &own
            }
        };
        let before = dns.log.count();
        let ran = Launch::new(&lab, run_env, &format!("raw-{who}"))
            .user(user)
            .flags(&flags)
            .var("SSH_AUTH_SOCK", agent_path.display())
            .run(&sc);
        runs.push((who, ran));
        dns_per_run.push((who, dns.log.lines().split_off(before)));
    }
    let audit_lines = env.audit("raw-other").len();
    let stop = scenario::output_within(
        env.bb(&lab, None, &["stop".into(), "raw-other".into()]),
        scenario::RUN_TIMEOUT,
    );
    assert!(stop.status.success(), "{}", scenario::text(&stop));
    Raw {
        runs: Runs(runs),
        dns_per_run,
        lo_http,
        lo_v6,
        lo_udp,
        web80,
        web443,
        udp_any,
        ssh,
        dns,
        agent,
        other: Other {
            addr,
            proxy_port,
            service,
            audit_lines,
        },
        _lab: lab,
    }
}

/// Nothing reached the host's loopback services or the internet decoys.
fn nothing_landed(f: &Raw) {
    assert!(
        f.lo_http.seen().is_empty(),
        "the host's loopback service was reached: {:?}",
        f.lo_http.seen()
    );
    assert!(
        f.lo_http.connections.lines().is_empty(),
        "{:?}",
        f.lo_http.connections.lines()
    );
    for (what, d) in [
        ("[::1] service", &f.lo_v6),
        ("loopback UDP service", &f.lo_udp),
        ("port 80", &f.web80),
        ("port 443", &f.web443),
        ("UDP 443", &f.udp_any),
        ("ssh", &f.ssh),
    ] {
        assert_eq!(d.log.count(), 0, "a decoy ({what}) was reached: {:?}", d.log.lines());
    }
}

#[test]
fn case_01_noproxy_direct_connect_fails() {
    for f in family() {
        for id in [
            "c01-direct-host-loopback",
            "c01-direct-internet",
            "c01-curl-noproxy-loopback",
            "c01-curl-noproxy-internet",
        ] {
            f.runs.held(id);
        }
        nothing_landed(f);
    }
}

#[test]
fn case_02_dev_tcp_to_an_ip_literal_fails() {
    for f in family() {
        f.runs.held("c02-bash-dev-tcp");
        f.runs.held("c02-tcp-ip-literal");
        assert_eq!(f.web80.log.count(), 0, "{:?}", f.web80.log.lines());
    }
}

#[test]
fn case_03_icmp_ping_is_denied_or_dropped() {
    for f in family() {
        for id in [
            "c03-ping-raw-v4",
            "c03-ping-dgram-v4",
            "c03-ping-raw-v6",
            "c03-ping-dgram-v6",
        ] {
            f.runs.held(id);
        }
    }
}

#[test]
fn case_04_udp_sendto_is_dropped() {
    for f in family() {
        f.runs.held("c04-udp-internet");
        f.runs.held("c04-udp-host-loopback");
        assert_eq!(f.lo_udp.log.count(), 0, "{:?}", f.lo_udp.log.lines());
        assert_eq!(f.udp_any.log.count(), 0, "{:?}", f.udp_any.log.lines());
    }
}

#[test]
fn case_05_quic_on_udp_443_is_dropped() {
    for f in family() {
        f.runs.held("c05-quic-v4");
        f.runs.held("c05-quic-v6");
        assert_eq!(f.udp_any.log.count(), 0, "{:?}", f.udp_any.log.lines());
    }
}

#[test]
fn case_06_ipv6_literals_and_aaaa_are_dropped() {
    for f in family() {
        f.runs.held("c06-tcp-v6-literal");
        f.runs.held("c06-tcp-v6-host-loopback");
        f.runs.held("c06-udp-v6-literal");
        f.runs.refused("c06-proxy-v6-literal");
        for (who, v) in f.runs.refused("c06-proxy-v6-name") {
            assert!(
                v.detail["denied"].as_str().unwrap().contains("private-address"),
                "{who}: {v:#?}"
            );
        }
        assert_eq!(f.lo_v6.log.count(), 0, "{:?}", f.lo_v6.log.lines());
        nothing_landed(f);
    }
}

#[test]
fn case_07_ssh_on_port_22_is_blocked() {
    for f in family() {
        for id in [
            "c07-ssh-literal",
            "c07-ssh-name",
            "c07-ssh-client",
            "c07-ssh-client-literal",
        ] {
            f.runs.held(id);
        }
        f.runs.refused("c07-proxy-connect-22");
        assert_eq!(f.ssh.log.count(), 0, "{:?}", f.ssh.log.lines());
    }
}

#[test]
fn case_08_ssh_over_connect_443_is_blocked_and_no_agent_socket_exists() {
    for f in family() {
        f.runs.refused("c08-proxy-connect-ssh-443");
        for (who, v) in f.runs.held("c08-ssh-agent") {
            assert!(v.evidence.contains("nothing reachable"), "{who}: {v:#?}");
        }
        assert_eq!(
            f.agent.log.count(),
            0,
            "the host's ssh-agent was reached: {:?}",
            f.agent.log.lines()
        );
    }
}

#[test]
fn case_09_port_scan_of_loopback_finds_only_the_proxy() {
    for f in family() {
        for (who, v) in f.runs.held("c09-port-scan") {
            assert_eq!(
                v.detail["open"],
                serde_json::json!([3128]),
                "the proxy must be the one open port ({who} launcher): {v:#?}"
            );
            assert!(v.detail["scanned"].as_u64().unwrap() >= 4096, "{who}: {v:#?}");
        }
        for (who, v) in f.runs.held("c09-port-scan-v6") {
            assert_eq!(v.detail["open"], serde_json::json!([]), "{who}: {v:#?}");
        }
        nothing_landed(f);
    }
}

#[test]
fn case_10_another_bottles_address_and_proxy_are_refused() {
    for f in family() {
        f.runs.held("c10-other-proxy-direct");
        f.runs.held("c10-other-service-direct");
        f.runs.refused("c10-other-proxy-via-proxy");
        f.runs.refused("c10-other-service-via-proxy");
        let o = &f.other;
        assert_eq!(
            o.service.log.count(),
            0,
            "{}'s service was reached: {:?}",
            o.addr,
            o.service.log.lines()
        );
        assert!(o.proxy_port > 0);
        // The other bottle's audit holds its own self-test and nothing from us.
        assert!(
            o.audit_lines <= 1,
            "the other bottle's proxy saw {} requests",
            o.audit_lines
        );
    }
}

#[test]
fn case_11_proxy_refuses_loopback_private_metadata_and_ula_targets() {
    for f in family() {
        for id in [
            "c11-connect-loopback",
            "c11-connect-rfc1918-10",
            "c11-connect-rfc1918-172",
            "c11-connect-rfc1918-192",
            "c11-connect-metadata",
            "c11-connect-ula",
            "c11-connect-v6-loopback",
            "c11-get-loopback",
            "c11-get-metadata",
            "c11-get-localhost-name",
        ] {
            f.runs.refused(id);
        }
        for id in ["c11-get-name-rfc1918", "c11-get-name-metadata", "c11-get-name-ula"] {
            for (who, v) in f.runs.refused(id) {
                assert!(
                    v.detail["denied"].as_str().unwrap().contains("private-address"),
                    "{id} ({who} launcher): {v:#?}"
                );
            }
        }
        nothing_landed(f);
    }
}

#[test]
fn case_12_dns_rebinding_to_a_private_address_is_refused() {
    for f in family() {
        for id in ["c12-rebind-get", "c12-rebind-connect"] {
            for (who, v) in f.runs.refused(id) {
                assert!(
                    v.detail["denied"].as_str().unwrap().contains("private-address"),
                    "{id} ({who} launcher): {v:#?}"
                );
            }
        }
        // The proxy really asked DNS (this is rebinding, not a not-allowed name), then refused the answer.
        for (who, lines) in &f.dns_per_run {
            assert!(
                lines.iter().any(|l| l.contains("rebind.test")),
                "the {who} launcher's proxy never resolved rebind.test through the lab's DNS (a host whose nsswitch \
             uses `resolve` bypasses it): {lines:?}"
            );
        }
        nothing_landed(f);
    }
}

#[test]
fn case_13_a_non_allowed_host_fails_fast_with_a_policy_error() {
    for f in family() {
        for id in ["c13-not-allowed-connect", "c13-not-allowed-get"] {
            for (who, v) in f.runs.refused(id) {
                assert!(
                    v.detail["denied"].as_str().unwrap().contains("rule=not-allowed"),
                    "{who}: {v:#?}"
                );
                let ms = v.detail["elapsed_ms"].as_u64().unwrap();
                assert!(
                    ms < 2000,
                    "{id} ({who} launcher): a refusal that takes {ms} ms looks like a hang"
                );
            }
        }
        assert!(
            !f.dns.log.lines().iter().any(|l| l.contains("nothere")),
            "a non-allowed name was resolved: {:?}",
            f.dns.log.lines()
        );
    }
}

#[test]
fn extra_numeric_mapped_and_unspecified_spellings_of_loopback_are_refused() {
    for f in family() {
        for id in [
            "x-decimal-ip",
            "x-hex-ip",
            "x-short-ip",
            "x-octal-ip",
            "x-unspecified-v4",
            "x-unspecified-v6",
            "x-mapped-v6-loopback",
            "x-mapped-v6-rfc1918",
            "x-trailing-dot-ip",
            "x-userinfo-host",
            "x-connect-mapped-v6",
            "x-connect-unspecified",
        ] {
            f.runs.held(id);
        }
        nothing_landed(f);
    }
}

#[test]
fn extra_every_raw_egress_catalogue_case_meets_its_expectation() {
    for f in family() {
        f.runs.meet_the_catalogue(&RAW_EGRESS);
    }
}
