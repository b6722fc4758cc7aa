//! Pure decisions: request facts (target, port, method, path) in, `Allowed` or a `DenyReason` out. No I/O; every
//! string here came from the bottle and is untrusted.

use std::fmt;
use std::net::IpAddr;

use bottle_policy::address::PrivateKind;
use bottle_policy::host::{HostError, HostName};
use bottle_policy::rules::RuleRefusal;
use bottle_policy::{AddressVerdict, HostRule, HostVerdict, Network, TlsMode};

/// A destination as the bottle named it: a normalised DNS name or an IP literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Name(HostName),
    Ip(IpAddr),
}

impl Target {
    /// Parses the host part of an authority (`example.com`, `1.2.3.4`, `[::1]`, `EXAMPLE.com.`).
    pub fn parse(host: &str) -> Result<Self, DenyReason> {
        let unbracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        match HostName::parse(host) {
            Ok(name) => Ok(Self::Name(name)),
            // SECURITY: `127.1`, `0x7f.1`, `2130706433` are addresses in disguise; never dial them as names.
            Err(HostError::IpLiteral(_)) => Err(DenyReason::IpLiteral),
            Err(_) if ends_in_number(host) => Err(DenyReason::IpLiteral),
            Err(_) => Err(DenyReason::BadTarget),
        }
    }

    pub fn name(&self) -> Option<&HostName> {
        match self {
            Self::Name(n) => Some(n),
            Self::Ip(_) => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => write!(f, "{n}"),
            Self::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// WHATWG URL "ends in a number": the last label is decimal or 0x-hex, so resolvers would read an address.
fn ends_in_number(host: &str) -> bool {
    let last = host.trim_end_matches('.').rsplit('.').next().unwrap_or(host);
    let hex = last.strip_prefix("0x").or_else(|| last.strip_prefix("0X"));
    (!last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()))
        || hex.is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Splits `host[:port]`; `default_port` is used when no port is written (`None`: a port is required).
pub fn parse_authority(authority: &str, default_port: Option<u16>) -> Result<(Target, u16), DenyReason> {
    let (host, port) = match authority.rsplit_once(':') {
        // `[::1]:443` or `name:443`; a bare IPv6 literal without brackets has more than one colon.
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
            let port = p.parse::<u16>().ok().filter(|p| *p != 0).ok_or(DenyReason::BadTarget)?;
            if !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(DenyReason::BadTarget);
            }
            (h, port)
        }
        _ => (authority, default_port.ok_or(DenyReason::BadTarget)?),
    };
    if host.is_empty() || host.contains('@') {
        return Err(DenyReason::BadTarget);
    }
    Ok((Target::parse(host)?, port))
}

/// Why a connection or request is refused. `code()` is the stable name used in the audit log and the
/// `x-bottle-denied` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    HostDenied {
        pattern: String,
    },
    HostNotAllowed,
    IpLiteral,
    PrivateAddress {
        ip: IpAddr,
        kind: PrivateKind,
    },
    RequestRule {
        method: String,
        path: String,
    },
    /// A rule admits the method and path but not this query parameter (decoded name).
    QueryRule {
        name: String,
    },
    /// Where rules apply, a request that servers could read two ways.
    Ambiguous(&'static str),
    /// A protocol switch the proxy cannot police, or one the host did not opt into.
    Upgrade {
        protocol: String,
    },
    /// The request carries the real value of a credential, which the bottle must never hold.
    SecretLeak {
        env: String,
    },
    BadPath(&'static str),
    BadTarget,
    /// SNI, `Host` or `:authority` names another host than the CONNECT target (domain fronting).
    HostMismatch {
        seen: String,
    },
    PlaceholderLeak {
        env: String,
        place: String,
    },
    Framing(&'static str),
    NotProxyRequest,
    HttpsInPlainRequest,
    NotTls,
    MissingSni,
    /// The bottle's TLS handshake with the proxy failed (often: the client does not trust the bottle CA).
    ClientTls,
    Timeout(&'static str),
    /// Ask mode: the reviewer said no (`by: reason`).
    Reviewer {
        reason: String,
    },
    /// Ask mode: no reviewer answered in time.
    AskTimeout {
        secs: u64,
    },
}

impl DenyReason {
    pub fn code(&self) -> &'static str {
        match self {
            Self::HostDenied { .. } => "deny-list",
            Self::HostNotAllowed => "not-allowed",
            Self::IpLiteral => "ip-literal",
            Self::PrivateAddress { .. } => "private-address",
            Self::RequestRule { .. } => "request-rule",
            Self::QueryRule { .. } => "query-rule",
            Self::Ambiguous(_) => "ambiguous-request",
            Self::Upgrade { .. } => "upgrade",
            Self::SecretLeak { .. } => "secret-leak",
            Self::BadPath(_) => "bad-path",
            Self::BadTarget => "bad-target",
            Self::HostMismatch { .. } => "host-mismatch",
            Self::PlaceholderLeak { .. } => "placeholder-leak",
            Self::Framing(_) => "framing",
            Self::NotProxyRequest => "not-a-proxy-request",
            Self::HttpsInPlainRequest => "https-needs-connect",
            Self::NotTls => "not-tls",
            Self::MissingSni => "missing-sni",
            Self::ClientTls => "client-tls-failed",
            Self::Timeout(_) => "timeout",
            Self::Reviewer { .. } => "denied-by-reviewer",
            Self::AskTimeout { .. } => "timeout",
        }
    }

    /// One sentence for the 403 body.
    pub fn explain(&self) -> String {
        match self {
            Self::HostDenied { pattern } => format!("the host matches the deny entry `{pattern}`"),
            Self::HostNotAllowed => "the host is not in the bottle's allow list".into(),
            Self::IpLiteral => {
                "IP-literal destinations are denied unless an allow entry names the address with its port".into()
            }
            Self::PrivateAddress { ip, kind } => format!("the host resolves to {ip}, {}", kind.describe()),
            Self::RequestRule { method, path } => format!("no rule for this host admits {method} {path}"),
            Self::QueryRule { name } => format!("no rule for this host admits the query parameter `{name}` as given"),
            Self::Ambiguous(why) => format!("the request could be read two ways: {why}"),
            Self::Upgrade { protocol } => format!("switching to `{protocol}` is not allowed on this host"),
            Self::SecretLeak { env } => {
                format!("the request carries the real value of credential `{env}`, which the bottle must never hold")
            }
            Self::BadPath(why) => format!("the request path is refused: {why}"),
            Self::BadTarget => "the request target is not a valid host[:port]".into(),
            Self::HostMismatch { seen } => format!("the request names `{seen}`, not the tunnel's host"),
            Self::PlaceholderLeak { env, place } => {
                format!("the placeholder of credential `{env}` was sent in {place}, where it is not bound")
            }
            Self::Framing(why) => format!("the request framing is refused: {why}"),
            Self::NotProxyRequest => "send absolute-form requests (http://host/path) or CONNECT".into(),
            Self::HttpsInPlainRequest => "https:// URLs go through CONNECT".into(),
            Self::NotTls => "the tunnel did not start with a TLS ClientHello".into(),
            Self::MissingSni => "the ClientHello has no server name".into(),
            Self::ClientTls => "the TLS handshake with the proxy failed (does the client trust the bottle CA?)".into(),
            Self::Timeout(what) => format!("timed out {what}"),
            Self::Reviewer { reason } => format!("the reviewer refused it ({reason})"),
            Self::AskTimeout { secs } => {
                format!("the host is not in the allow list and no reviewer answered within {secs} s")
            }
        }
    }

    /// What the user could change to allow it, if anything.
    pub fn hint(&self, host: &str, port: u16) -> String {
        match self {
            Self::HostNotAllowed => format!("bot-bottle run --allow {host}:{port}"),
            Self::HostDenied { pattern } => format!("remove `{pattern}` from network.deny"),
            Self::IpLiteral => match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
                Ok(ip) => match bottle_policy::host::canonical_ip(ip) {
                    IpAddr::V6(v6) => format!("bot-bottle run --allow [{v6}]:{port}"),
                    v4 => format!("bot-bottle run --allow {v4}:{port}"),
                },
                Err(_) => "use a host name".into(),
            },
            // Lets allowed names resolve to this one address; it never admits the address as a destination.
            Self::PrivateAddress { ip, .. } => format!("bot-bottle run --allow-cidr {}", host_cidr(*ip)),
            Self::RequestRule { method, path } => format!("a [[host.rule]] for {host} admitting {method} {path}"),
            Self::QueryRule { name } => format!("a [[host.rule]] for {host} whose query admits `{name}`"),
            Self::Upgrade { protocol } => format!("upgrades = [\"{protocol}\"] on the [[host]] entry for {host}"),
            Self::SecretLeak { env } => format!("send the placeholder in `{env}`, never the real value"),
            Self::PlaceholderLeak { env, .. } => format!("send `{env}` only to its bound host, over https"),
            Self::HostMismatch { seen } => format!("open a separate CONNECT to {seen}"),
            Self::HttpsInPlainRequest => format!("CONNECT {host}:{port}"),
            Self::Reviewer { .. } => format!("bot-bottle allow NAME {host}:{port}"),
            Self::AskTimeout { .. } => {
                format!("answer sooner with `bot-bottle approvals`, or bot-bottle allow NAME {host}:{port}")
            }
            _ => "nothing: the request is malformed".into(),
        }
    }

    /// Malformed input is a 400; a policy refusal is a 403.
    pub fn is_malformed(&self) -> bool {
        matches!(
            self,
            Self::BadPath(_) | Self::BadTarget | Self::Framing(_) | Self::NotProxyRequest
        )
    }
}

fn host_cidr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}/32"),
        IpAddr::V6(v6) => format!("{v6}/128"),
    }
}

/// The policy's answer for an allowed destination.
#[derive(Debug, Clone, Copy)]
pub struct Allowed<'a> {
    pub tls: TlsMode,
    /// The allow entry that admitted the destination (its rules apply to every request).
    pub rule: &'a HostRule,
}

/// Host-level decision, before any request is seen (CONNECT, or the first step of a plain request).
pub fn decide_target<'a>(net: &'a Network, target: &Target, port: u16) -> Result<Allowed<'a>, DenyReason> {
    match target {
        Target::Name(name) => match net.decide_host(name, port) {
            HostVerdict::Allow(rule) => Ok(Allowed { tls: rule.tls, rule }),
            HostVerdict::Denied(p) => Err(DenyReason::HostDenied { pattern: p.to_string() }),
            HostVerdict::NotAllowed => Err(DenyReason::HostNotAllowed),
        },
        Target::Ip(ip) => match net.decide_ip_literal(*ip, port) {
            AddressVerdict::Allow(rule) => Ok(Allowed { tls: rule.tls, rule }),
            AddressVerdict::Denied(p) => Err(DenyReason::HostDenied { pattern: p.to_string() }),
            AddressVerdict::NotAllowed => Err(DenyReason::IpLiteral),
        },
    }
}

/// Full decision for one request: host, then path hygiene, then the host's method/path/query rules.
pub fn decide_request<'a>(
    net: &'a Network,
    target: &Target,
    port: u16,
    method: &str,
    path: &str,
    query: Option<&str>,
) -> Result<Allowed<'a>, DenyReason> {
    let allowed = decide_target(net, target, port)?;
    check_path(path)?;
    allowed
        .rule
        .check_request(method, path, query)
        .map_err(|refusal| match refusal {
            RuleRefusal::Method | RuleRefusal::Path => DenyReason::RequestRule {
                method: method.to_string(),
                path: path.to_string(),
            },
            RuleRefusal::Query { name } => DenyReason::QueryRule { name },
            RuleRefusal::Ambiguous(why) => DenyReason::Ambiguous(why),
        })?;
    Ok(allowed)
}

/// SECURITY: rules match the path as sent; an upstream that decodes `%2F` or resolves `..` would see another
/// path than the one the rule admitted. Such paths are refused rather than normalised (normalising here would
/// still disagree with some upstream).
pub fn check_path(path: &str) -> Result<(), DenyReason> {
    if !path.starts_with('/') {
        return Err(DenyReason::BadPath("it does not start with `/`"));
    }
    if path.contains('\\') {
        return Err(DenyReason::BadPath("it contains `\\`"));
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Err(DenyReason::BadPath("it contains a percent-encoded `/` or `\\`"));
    }
    if lower.contains("%00") {
        return Err(DenyReason::BadPath("it contains a percent-encoded NUL"));
    }
    for segment in lower.split('/') {
        let decoded = segment.replace("%2e", ".");
        if decoded == "." || decoded == ".." {
            return Err(DenyReason::BadPath("it contains a `.` or `..` segment"));
        }
    }
    Ok(())
}

/// Domain fronting: the name a request carries (SNI, `Host`, `:authority`) must be the tunnel's target. A port,
/// when written, must be the tunnel's port.
pub fn check_same_host(target: &Target, port: u16, seen: &str) -> Result<(), DenyReason> {
    let mismatch = || DenyReason::HostMismatch { seen: seen.to_string() };
    let (seen_target, seen_port) = parse_authority(seen, Some(port)).map_err(|_| mismatch())?;
    if &seen_target != target || seen_port != port {
        return Err(mismatch());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(toml: &str) -> Network {
        bottle_policy::from_str(
            &bottle_policy::Source { text: toml, path: None },
            &bottle_policy::Overrides::default(),
        )
        .unwrap()
        .network
    }

    fn name(s: &str) -> Target {
        Target::parse(s).unwrap()
    }

    #[test]
    fn host_allow_deny_and_not_allowed() {
        let n = net("[network]\nallow = [\"example.com\", \"*.github.com\"]\ndeny = [\"evil.github.com\"]\n");
        assert!(decide_target(&n, &name("EXAMPLE.com."), 443).is_ok());
        assert!(decide_target(&n, &name("api.github.com"), 443).is_ok());
        assert_eq!(
            decide_target(&n, &name("github.com"), 443).unwrap_err(),
            DenyReason::HostNotAllowed
        );
        assert_eq!(
            decide_target(&n, &name("evil.github.com"), 443).unwrap_err().code(),
            "deny-list"
        );
        assert_eq!(
            decide_target(&n, &name("example.com"), 22).unwrap_err(),
            DenyReason::HostNotAllowed
        );
    }

    #[test]
    fn ip_literals_need_a_cidr() {
        let n = net("[network]\nallow_cidr = [\"10.1.0.0/16\"]\nallow = [\"10.1.2.3:443\"]\n");
        assert!(decide_target(&n, &name("10.1.2.3"), 443).is_ok());
        assert_eq!(
            decide_target(&n, &name("10.1.2.3"), 8443).unwrap_err(),
            DenyReason::IpLiteral,
            "the entry names one port"
        );
        assert_eq!(
            decide_target(&n, &name("10.1.2.4"), 443).unwrap_err(),
            DenyReason::IpLiteral,
            "allow_cidr never admits an address"
        );
        assert_eq!(
            DenyReason::IpLiteral.hint("10.1.2.4", 443),
            "bot-bottle run --allow 10.1.2.4:443"
        );
        assert_eq!(
            decide_target(&n, &name("[::1]"), 443).unwrap_err(),
            DenyReason::IpLiteral
        );
        assert_eq!(Target::parse("127.1").unwrap_err(), DenyReason::IpLiteral);
        assert_eq!(Target::parse("0x7f.1").unwrap_err(), DenyReason::IpLiteral);
        assert_eq!(Target::parse("2130706433").unwrap_err(), DenyReason::IpLiteral);
    }

    #[test]
    fn authorities_parse_with_ports() {
        assert_eq!(parse_authority("example.com:8443", None).unwrap().1, 8443);
        assert_eq!(parse_authority("example.com", Some(80)).unwrap().1, 80);
        assert!(parse_authority("example.com", None).is_err());
        assert_eq!(
            parse_authority("[::1]:443", None).unwrap().0,
            Target::Ip("::1".parse().unwrap())
        );
        for bad in [
            "example.com:0",
            "example.com:+1",
            "user@example.com:443",
            ":443",
            "a..b:443",
        ] {
            assert!(parse_authority(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_with_traversal_or_encoded_separators_are_refused() {
        for bad in [
            "/a/../b",
            "/a/%2e%2E/b",
            "/a/./b",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "relative",
            "/a%00",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        for ok in ["/", "/a/b", "/a..b/", "/.well-known/x", "/a%20b"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn request_rules_apply_to_method_path_and_query() {
        let n =
            net("[[host]]\nname = \"git.example.com\"\n[[host.rule]]\nmethods = [\"GET\"]\npaths = [\"/repo/**\"]\n");
        let t = name("git.example.com");
        assert!(decide_request(&n, &t, 443, "GET", "/repo/info/refs", None).is_ok());
        let err = decide_request(&n, &t, 443, "POST", "/repo/git-receive-pack", None).unwrap_err();
        assert_eq!(err.code(), "request-rule");
        assert!(decide_request(&n, &t, 443, "GET", "/repo/../etc", None).is_err());
    }

    #[test]
    fn same_host_check_catches_fronting() {
        let t = name("a.example.com");
        assert!(check_same_host(&t, 443, "A.example.com").is_ok());
        assert!(check_same_host(&t, 443, "a.example.com:443").is_ok());
        assert!(check_same_host(&t, 443, "b.example.com").is_err());
        assert!(check_same_host(&t, 443, "a.example.com:8443").is_err());
        assert!(check_same_host(&t, 443, "").is_err());
    }
}
