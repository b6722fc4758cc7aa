//! Escape cases 1–13, raw egress: every way out that is not the proxy, and the proxy asked for what it must not reach.
//! Values: `lo_http`, `lo_v6`, `lo_udp` (ports of services on the host's 127.0.0.1 and ::1), `agent_path` (an
//! ssh-agent socket of the host), `other_addr`, `other_proxy_port`, `other_service_port` (another bottle).

use super::Needs::{LabDns, OtherBottle, Tool};
use super::{Case, probe, shell};

pub const CASES: &[Case] = &[
    // 1: no proxy
    probe("c01-direct-host-loopback", &["tcp-connect", "127.0.0.1:{{lo_http}}"]),
    probe("c01-direct-internet", &["tcp-connect", "8.8.8.8:443"]),
    shell(
        "c01-curl-noproxy-loopback",
        "env -u HTTP_PROXY -u http_proxy curl -sS --max-time 5 --noproxy '*' http://127.0.0.1:{{lo_http}}/",
    )
    .needs(&[Tool("curl"), Tool("env")]),
    shell(
        "c01-curl-noproxy-internet",
        "env -u HTTPS_PROXY -u https_proxy curl -sS --max-time 5 --noproxy '*' https://8.8.8.8/",
    )
    .needs(&[Tool("curl"), Tool("env")]),
    // 2: bash /dev/tcp
    shell("c02-bash-dev-tcp", "exec bash -c 'exec 3<>/dev/tcp/192.0.2.1/80'").needs(&[Tool("bash")]),
    probe("c02-tcp-ip-literal", &["tcp-connect", "192.0.2.1:80"]),
    // 3: ICMP
    probe("c03-ping-raw-v4", &["ping-raw", "8.8.8.8"]),
    probe("c03-ping-dgram-v4", &["ping-dgram", "8.8.8.8"]),
    probe("c03-ping-raw-v6", &["ping-raw", "2001:4860:4860::8888"]),
    probe("c03-ping-dgram-v6", &["ping-dgram", "2001:4860:4860::8888"]),
    // 4: UDP
    probe("c04-udp-internet", &["udp-send", "8.8.4.4:443"]),
    probe("c04-udp-host-loopback", &["udp-send", "127.0.0.1:{{lo_udp}}"]),
    // 5: QUIC
    probe("c05-quic-v4", &["quic", "1.1.1.1:443"]),
    probe("c05-quic-v6", &["quic", "[2001:4860:4860::8888]:443"]),
    // 6: IPv6
    probe("c06-tcp-v6-literal", &["tcp-connect", "[2001:db8::1]:80"]),
    probe("c06-tcp-v6-host-loopback", &["tcp-connect", "[::1]:{{lo_v6}}"]),
    probe("c06-udp-v6-literal", &["udp-send", "[2001:db8::1]:443"]),
    probe("c06-proxy-v6-literal", &["proxy-connect", "[2001:db8::1]:443"]).refused(),
    probe("c06-proxy-v6-name", &["proxy-get", "http://rebind6.test/"])
        .refused()
        .needs(&[LabDns]),
    // 7: ssh on 22
    probe("c07-ssh-literal", &["ssh", "192.0.2.10:22"]),
    probe("c07-ssh-name", &["ssh", "github.com:22"]),
    shell(
        "c07-ssh-client",
        "ssh -o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=no git@github.com true",
    )
    .needs(&[Tool("ssh")]),
    shell(
        "c07-ssh-client-literal",
        "ssh -o BatchMode=yes -o ConnectTimeout=5 -o StrictHostKeyChecking=no git@192.0.2.10 true",
    )
    .needs(&[Tool("ssh")]),
    probe("c07-proxy-connect-22", &["proxy-connect", "github.com:22"]).refused(),
    // 8: ssh over CONNECT 443, and no agent
    probe("c08-proxy-connect-ssh-443", &["proxy-connect", "ssh.github.com:443"]).refused(),
    probe("c08-ssh-agent", &["ssh-agent", "{{agent_path}}"]),
    // 9: port scan of loopback (the proxy's port inside is 3128)
    probe(
        "c09-port-scan",
        &[
            "port-scan",
            "127.0.0.1",
            "3128",
            "1-4096",
            "{{lo_http}}",
            "{{lo_v6}}",
            "8080",
            "8443",
            "9090",
        ],
    ),
    probe("c09-port-scan-v6", &["port-scan", "::1", "3128", "1-1024", "{{lo_v6}}"]),
    // 10: another bottle
    probe(
        "c10-other-proxy-direct",
        &["tcp-connect", "{{other_addr}}:{{other_proxy_port}}"],
    )
    .needs(&[OtherBottle]),
    probe(
        "c10-other-service-direct",
        &["tcp-connect", "{{other_addr}}:{{other_service_port}}"],
    )
    .needs(&[OtherBottle]),
    probe(
        "c10-other-proxy-via-proxy",
        &["proxy-connect", "{{other_addr}}:{{other_proxy_port}}"],
    )
    .refused()
    .needs(&[OtherBottle]),
    probe(
        "c10-other-service-via-proxy",
        &["proxy-get", "http://{{other_addr}}:{{other_service_port}}/"],
    )
    .refused()
    .needs(&[OtherBottle]),
    // 11: private targets through the proxy, by literal and by name
    probe("c11-connect-loopback", &["proxy-connect", "127.0.0.1:{{lo_http}}"]).refused(),
    probe("c11-connect-rfc1918-10", &["proxy-connect", "10.0.0.1:80"]).refused(),
    probe("c11-connect-rfc1918-172", &["proxy-connect", "172.16.0.1:80"]).refused(),
    probe("c11-connect-rfc1918-192", &["proxy-connect", "192.168.0.1:80"]).refused(),
    probe("c11-connect-metadata", &["proxy-connect", "169.254.169.254:80"]).refused(),
    probe("c11-connect-ula", &["proxy-connect", "[fd00::1]:80"]).refused(),
    probe("c11-connect-v6-loopback", &["proxy-connect", "[::1]:{{lo_v6}}"]).refused(),
    probe("c11-get-loopback", &["proxy-get", "http://127.0.0.1:{{lo_http}}/"]).refused(),
    probe(
        "c11-get-metadata",
        &["proxy-get", "http://169.254.169.254/latest/meta-data/"],
    )
    .refused(),
    probe(
        "c11-get-localhost-name",
        &["proxy-get", "http://localhost:{{lo_http}}/"],
    )
    .refused(),
    probe("c11-get-name-rfc1918", &["proxy-get", "http://internal.test/"])
        .refused()
        .needs(&[LabDns]),
    probe(
        "c11-get-name-metadata",
        &["proxy-get", "http://metadata.test/latest/meta-data/"],
    )
    .refused()
    .needs(&[LabDns]),
    probe("c11-get-name-ula", &["proxy-get", "http://ula.test/"])
        .refused()
        .needs(&[LabDns]),
    // 12: an allowed name whose DNS answer is private
    probe("c12-rebind-get", &["proxy-get", "http://rebind.test:{{lo_http}}/"])
        .refused()
        .needs(&[LabDns]),
    probe("c12-rebind-connect", &["proxy-connect", "rebind.test:{{lo_http}}"])
        .refused()
        .needs(&[LabDns]),
    // 13: a non-allowed host fails fast
    probe("c13-not-allowed-connect", &["proxy-connect", "nothere.example:443"]).refused(),
    probe("c13-not-allowed-get", &["proxy-get", "http://nothere.example/"]).refused(),
    // Our own: spellings of loopback and private addresses that parsers disagree on.
    probe("x-decimal-ip", &["proxy-get", "http://2130706433:{{lo_http}}/"]),
    probe("x-hex-ip", &["proxy-get", "http://0x7f000001:{{lo_http}}/"]),
    probe("x-short-ip", &["proxy-get", "http://127.1:{{lo_http}}/"]),
    probe("x-octal-ip", &["proxy-get", "http://0177.0.0.1:{{lo_http}}/"]),
    probe("x-unspecified-v4", &["proxy-get", "http://0.0.0.0:{{lo_http}}/"]),
    probe("x-unspecified-v6", &["proxy-get", "http://[::]:{{lo_v6}}/"]),
    probe(
        "x-mapped-v6-loopback",
        &["proxy-get", "http://[::ffff:127.0.0.1]:{{lo_http}}/"],
    ),
    probe("x-mapped-v6-rfc1918", &["proxy-get", "http://[::ffff:10.0.0.1]/"]),
    probe("x-trailing-dot-ip", &["proxy-get", "http://127.0.0.1.:{{lo_http}}/"]),
    probe(
        "x-userinfo-host",
        &["proxy-get", "http://rebind.test:{{lo_http}}@127.0.0.1:{{lo_http}}/"],
    ),
    probe(
        "x-connect-mapped-v6",
        &["proxy-connect", "[::ffff:127.0.0.1]:{{lo_http}}"],
    ),
    probe("x-connect-unspecified", &["proxy-connect", "0.0.0.0:{{lo_http}}"]),
];
