//! Host names and host patterns: normalisation (case, trailing dot, IDNA), wildcard and port semantics.
//!
//! Trusts nothing: every string here comes from a policy file, a command-line flag or the network.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::OnceLock;

/// Ports a pattern without an explicit port admits: HTTPS and plain HTTP.
pub const DEFAULT_PORTS: [u16; 2] = [443, 80];

/// Longest DNS name in presentation form (RFC 1035 §2.3.4).
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label (RFC 1035 §2.3.4).
const MAX_LABEL_LEN: usize = 63;

/// Why a host name or pattern was refused. Messages say what would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("host is empty")]
    Empty,
    #[error("`{0}` is an IP address without a port: an address is allowed only with its port, e.g. \"{suggested}\"", suggested = with_port(.0))]
    IpLiteral(String),
    #[error("`{0}` is an IP address: {1}")]
    IpEntry(String, &'static str),
    #[error("`{name}` is not a valid host name: {reason}")]
    Invalid { name: String, reason: &'static str },
    #[error(
        "`{0}` is too broad: a wildcard must sit under a registrable domain (e.g. \"*.example.com\"), not a public suffix"
    )]
    TooBroad(String),
    #[error(
        "`{pattern}` spans independent registrants: `{beneath}` under it is a public suffix (Public Suffix List), so names below it belong to different owners; name the hosts you need, or a wildcard under a name you control, e.g. \"{narrower}\""
    )]
    SpansRegistrants {
        pattern: String,
        beneath: String,
        narrower: String,
    },
    #[error("`*` alone is not a host pattern; list the hosts to allow, or leave the list empty to allow none")]
    Star,
    #[error("`{0}`: a wildcard is only allowed as the whole leftmost label, as in \"*.example.com\"")]
    MisplacedWildcard(String),
    #[error("port `{0}` is not valid: use a number from 1 to 65535, or `*` for any port")]
    Port(String),
}

/// A normalised DNS name: lowercase ASCII (IDNA A-labels), no trailing dot, valid labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct HostName(String);

impl HostName {
    /// Normalises a name: `EXAMPLE.com.` and `example.com` are the same host; `bücher.de` becomes
    /// `xn--bcher-kva.de`. IP literals are refused: they are not names.
    pub fn parse(raw: &str) -> Result<Self, HostError> {
        let trimmed = raw.strip_suffix('.').unwrap_or(raw);
        if trimmed.is_empty() {
            return Err(HostError::Empty);
        }
        let unbracketed = trimmed.trim_start_matches('[').trim_end_matches(']');
        if unbracketed.parse::<IpAddr>().is_ok() {
            return Err(HostError::IpLiteral(unbracketed.to_string()));
        }
        let invalid = |reason| HostError::Invalid {
            name: raw.to_string(),
            reason,
        };
        if trimmed.contains('*') {
            return Err(invalid("`*` is not allowed in a host name"));
        }
        let ascii = idna::domain_to_ascii(trimmed).map_err(|_| invalid("IDNA conversion failed"))?;
        if ascii.is_empty() {
            return Err(HostError::Empty);
        }
        if ascii.len() > MAX_NAME_LEN {
            return Err(invalid("longer than 253 characters"));
        }
        for label in ascii.split('.') {
            if label.is_empty() {
                return Err(invalid("empty label (two dots in a row)"));
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(invalid("a label is longer than 63 characters"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(invalid("labels may hold only letters, digits, `-` and `_`"));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(invalid("a label may not start or end with `-`"));
            }
        }
        // SECURITY: a name whose last label is a number is an IPv4 address in another spelling
        // (`2130706433`, `127.1`, `0x7f.1`; WHATWG URL "ends in a number"); inet_aton would dial it.
        if ends_in_number(&ascii) {
            return Err(invalid(
                "its last label is a number, so it spells an IPv4 address; allow addresses with allow_cidr",
            ));
        }
        Ok(Self(ascii))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `self` is a strict subdomain of `suffix` (never the apex itself).
    fn is_strict_subdomain_of(&self, suffix: &HostName) -> bool {
        self.0.len() > suffix.0.len()
            && self.0.ends_with(suffix.0.as_str())
            && self.0.as_bytes()[self.0.len() - suffix.0.len() - 1] == b'.'
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which ports a pattern admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortSpec {
    /// No port given: 443 and 80.
    Default,
    Exact(u16),
    Any,
}

impl PortSpec {
    pub fn admits(self, port: u16) -> bool {
        match self {
            Self::Default => DEFAULT_PORTS.contains(&port),
            Self::Exact(p) => p == port,
            Self::Any => true,
        }
    }
}

/// Exact name, `*.suffix` (which matches any depth below the suffix, never the suffix itself), or one IP address
/// (always with an exact port: an address entry names one destination).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamePattern {
    Exact(HostName),
    Subdomains(HostName),
    Address(IpAddr),
}

/// A host pattern with its port semantics, e.g. `api.github.com`, `*.githubusercontent.com`, `localhost:8443`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    pub name: NamePattern,
    pub port: PortSpec,
}

/// Where a pattern is used decides how broad it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternUse {
    /// Allow lists: wildcards must sit under a registrable domain.
    Allow,
    /// Deny lists: any `*.suffix` is fine, since denying more is safe.
    Deny,
}

impl HostPattern {
    pub fn parse(raw: &str, usage: PatternUse) -> Result<Self, HostError> {
        let raw = raw.trim();
        if raw == "*" || raw.starts_with("*:") {
            return Err(HostError::Star);
        }
        if let Some(address) = parse_address_entry(raw, usage)? {
            return Ok(address);
        }
        let (host, port) = split_port(raw)?;
        let name = match host.strip_prefix("*.") {
            Some(suffix) => {
                if suffix.contains('*') {
                    return Err(HostError::MisplacedWildcard(raw.to_string()));
                }
                let suffix = HostName::parse(suffix)?;
                if usage == PatternUse::Allow {
                    check_wildcard_breadth(raw, &suffix)?;
                }
                NamePattern::Subdomains(suffix)
            }
            None if host.contains('*') => return Err(HostError::MisplacedWildcard(raw.to_string())),
            None => NamePattern::Exact(HostName::parse(host)?),
        };
        // SECURITY: "deny wins" must hold on every port: a deny entry without a port denies them all, rather than
        // only the default ports an allow entry without a port admits.
        let port = match (usage, port) {
            (PatternUse::Deny, PortSpec::Default) => PortSpec::Any,
            (_, port) => port,
        };
        Ok(Self { name, port })
    }

    /// True when this pattern admits the IP-literal destination `ip:port` (IPv4-mapped IPv6 counts as IPv4).
    pub fn matches_address(&self, ip: IpAddr, port: u16) -> bool {
        matches!(self.name, NamePattern::Address(a) if a == canonical_ip(ip)) && self.port.admits(port)
    }

    pub fn matches_name(&self, host: &HostName) -> bool {
        match &self.name {
            NamePattern::Exact(name) => name == host,
            NamePattern::Subdomains(suffix) => host.is_strict_subdomain_of(suffix),
            NamePattern::Address(_) => false,
        }
    }

    pub fn matches(&self, host: &HostName, port: u16) -> bool {
        self.port.admits(port) && self.matches_name(host)
    }

    /// The exact name, when this pattern names exactly one host.
    pub fn exact_name(&self) -> Option<&HostName> {
        match &self.name {
            NamePattern::Exact(name) => Some(name),
            NamePattern::Subdomains(_) | NamePattern::Address(_) => None,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            NamePattern::Exact(name) => write!(f, "{name}")?,
            NamePattern::Subdomains(suffix) => write!(f, "*.{suffix}")?,
            NamePattern::Address(IpAddr::V6(v6)) => write!(f, "[{v6}]")?,
            NamePattern::Address(ip) => write!(f, "{ip}")?,
        }
        match self.port {
            PortSpec::Default => Ok(()),
            PortSpec::Exact(p) => write!(f, ":{p}"),
            PortSpec::Any => f.write_str(":*"),
        }
    }
}

impl serde::Serialize for HostPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn split_port(raw: &str) -> Result<(&str, PortSpec), HostError> {
    // Addresses and multi-colon forms were handled by `parse_address_entry`; only split a trailing `:port` off names.
    let Some((host, port)) = raw.rsplit_once(':') else {
        return Ok((raw, PortSpec::Default));
    };
    if port == "*" {
        return Ok((host, PortSpec::Any));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok((host, PortSpec::Exact(p))),
        _ => Err(HostError::Port(port.to_string())),
    }
}

fn ends_in_number(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    let hex = last
        .strip_prefix("0x")
        .map(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
    last.bytes().all(|b| b.is_ascii_digit()) || hex == Some(true)
}

/// The address written as an entry with port 443, for messages (`10.0.0.1:443`, `[::1]:443`).
fn with_port(ip: &str) -> String {
    match ip.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:443"),
        Ok(v4) => format!("{v4}:443"),
        Err(_) => format!("{ip}:443"),
    }
}

/// `1.2.3.4:PORT` or `[v6]:PORT`: an IP address, allowed only with an exact port. `None` when `raw` is no address.
fn parse_address_entry(raw: &str, usage: PatternUse) -> Result<Option<HostPattern>, HostError> {
    if raw.contains("://") {
        return Err(HostError::Invalid {
            name: raw.to_string(),
            reason: "that is a URL; write the host alone, e.g. \"example.com\" or \"example.com:8080\"",
        });
    }
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return Err(HostError::IpEntry(raw.to_string(), "a `[` without its `]`"));
        };
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(HostError::IpEntry(raw.to_string(), "expected `:PORT` after `]`")),
        };
        (inside, port)
    } else if raw.matches(':').count() > 1 {
        if raw.parse::<IpAddr>().is_ok() {
            return Err(HostError::IpLiteral(raw.to_string()));
        }
        return Err(HostError::Invalid {
            name: raw.to_string(),
            reason: "it has more than one `:`; write HOST or HOST:PORT (and IPv6 addresses as \"[fd00::1]:443\")",
        });
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (raw, None),
        }
    };
    let Ok(ip) = host.parse::<IpAddr>() else {
        return if raw.starts_with('[') {
            Err(HostError::IpEntry(
                raw.to_string(),
                "only IPv6 addresses go in brackets",
            ))
        } else {
            Ok(None)
        };
    };
    // SECURITY: a deny entry for an address without a port (or with `*`) denies it on every port.
    if usage == PatternUse::Deny && matches!(port, None | Some("*")) {
        return Ok(Some(HostPattern {
            name: NamePattern::Address(canonical_ip(ip)),
            port: PortSpec::Any,
        }));
    }
    let port = match port {
        None => return Err(HostError::IpLiteral(host.to_string())),
        Some("*") => {
            return Err(HostError::IpEntry(
                raw.to_string(),
                "an address entry names exactly one port, not `*`",
            ));
        }
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(HostError::Port(p.to_string())),
        },
    };
    Ok(Some(HostPattern {
        name: NamePattern::Address(canonical_ip(ip)),
        port: PortSpec::Exact(port),
    }))
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is the IPv4 address on a dual-stack socket; compare it as one.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// True when the name is a public suffix (`com`, `co.uk`, `github.io`) or a lone label.
fn is_public_suffix(name: &HostName) -> bool {
    if !name.as_str().contains('.') {
        return true;
    }
    psl::suffix(name.as_str().as_bytes()).is_some_and(|s| s.as_bytes().len() == name.as_str().len())
}

/// SECURITY: `*.S` admits every name under S. It is too broad when S is a public suffix, and also when a public
/// suffix lies *beneath* S: a PSL wildcard rule (`*.kawasaki.jp`: every `x.kawasaki.jp` is a suffix) or a
/// private-section suffix (`s3.amazonaws.com` under `amazonaws.com`), since names there belong to independent
/// registrants (every S3 bucket, every city's sites).
fn check_wildcard_breadth(raw: &str, suffix: &HostName) -> Result<(), HostError> {
    if is_public_suffix(suffix) {
        return Err(HostError::TooBroad(raw.to_string()));
    }
    let Some(rule) = suffixes_beneath().get(suffix.as_str()) else {
        return Ok(());
    };
    let beneath = match rule.strip_prefix("*.") {
        Some(parent) => format!("every name directly under {parent}"),
        None => (*rule).to_string(),
    };
    let narrower = match rule.strip_prefix("*.") {
        Some(parent) => format!("*.yourname.LABEL.{parent}"),
        None => format!("*.yourname.{rule}"),
    };
    Err(HostError::SpansRegistrants {
        pattern: raw.to_string(),
        beneath,
        narrower,
    })
}

/// Every name with a Public Suffix List rule strictly beneath it, mapped to one such rule (for the message).
fn suffixes_beneath() -> &'static HashMap<&'static str, &'static str> {
    static BENEATH: OnceLock<HashMap<&'static str, &'static str>> = OnceLock::new();
    BENEATH.get_or_init(|| {
        let mut map = HashMap::new();
        let rules = include_str!("../data/public-suffix-rules.txt");
        for rule in rules.lines().map(str::trim) {
            if rule.is_empty() || rule.starts_with("//") || rule.starts_with('!') {
                continue;
            }
            // `*.x.y`: every child of x.y is a suffix, so x.y has suffixes beneath it. `a.x.y`: x.y and y do.
            let mut rest = rule
                .strip_prefix("*.")
                .unwrap_or_else(|| rule.split_once('.').map_or("", |(_, r)| r));
            if rule.starts_with("*.") {
                map.entry(rest).or_insert(rule);
                rest = rest.split_once('.').map_or("", |(_, r)| r);
            }
            while !rest.is_empty() {
                map.entry(rest).or_insert(rule);
                rest = rest.split_once('.').map_or("", |(_, r)| r);
            }
        }
        map
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(s: &str) -> HostPattern {
        HostPattern::parse(s, PatternUse::Allow).unwrap()
    }
    fn name(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    #[test]
    fn names_normalise_case_trailing_dot_and_idna() {
        assert_eq!(name("EXAMPLE.com."), name("example.com"));
        assert_eq!(name("Bücher.de").as_str(), "xn--bcher-kva.de");
    }

    #[test]
    fn ip_literals_are_not_names() {
        for s in ["127.0.0.1", "[::1]", "2130706433", "127.1", "0x7f.1", "a.0x10"] {
            let err = HostName::parse(s);
            assert!(err.is_err(), "{s} was accepted");
        }
        assert!(matches!(
            HostPattern::parse("fd00::1", PatternUse::Allow),
            Err(HostError::IpLiteral(_))
        ));
    }

    #[test]
    fn wildcard_never_matches_apex() {
        let p = allow("*.github.com");
        assert!(!p.matches(&name("github.com"), 443));
        assert!(p.matches(&name("api.github.com"), 443));
        assert!(p.matches(&name("a.b.github.com"), 443));
        assert!(!p.matches(&name("evilgithub.com"), 443));
    }

    #[test]
    fn over_broad_patterns_are_refused_for_allow_but_fine_for_deny() {
        for s in ["*", "*:443", "*.com", "*.co.uk", "*.github.io", "*.internal"] {
            assert!(HostPattern::parse(s, PatternUse::Allow).is_err(), "{s}");
        }
        assert!(HostPattern::parse("*.ru", PatternUse::Deny).is_ok());
        assert!(HostPattern::parse("*", PatternUse::Deny).is_err());
    }

    #[test]
    fn wildcards_over_independent_registrants_are_refused_with_a_narrower_pattern() {
        for s in [
            "*.kawasaki.jp",
            "*.sch.uk",
            "*.nom.br",
            "*.amazonaws.com",
            "*.githubusercontent.com",
        ] {
            let err = HostPattern::parse(s, PatternUse::Allow).unwrap_err();
            assert!(
                matches!(err, HostError::SpansRegistrants { .. } | HostError::TooBroad(_)),
                "{s}: {err}"
            );
        }
        let err = HostPattern::parse("*.amazonaws.com", PatternUse::Allow)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("public suffix") && err.contains("e.g. \"*.yourname."),
            "{err}"
        );
        for ok in [
            "*.github.com",
            "*.example.com",
            "*.city.kawasaki.jp",
            "*.mybucket.s3.amazonaws.com",
        ] {
            assert!(HostPattern::parse(ok, PatternUse::Allow).is_ok(), "{ok}");
        }
        // Denying more is always safe.
        assert!(HostPattern::parse("*.amazonaws.com", PatternUse::Deny).is_ok());
    }

    #[test]
    fn an_ip_entry_names_one_address_and_one_port() {
        let p = allow("10.0.0.5:8443");
        assert!(p.matches_address("10.0.0.5".parse().unwrap(), 8443));
        assert!(p.matches_address("::ffff:10.0.0.5".parse().unwrap(), 8443));
        assert!(!p.matches_address("10.0.0.5".parse().unwrap(), 443));
        assert!(!p.matches_address("10.0.0.6".parse().unwrap(), 8443));
        assert!(!p.matches_name(&name("example.com")));
        let v6 = allow("[fd00::1]:443");
        assert!(v6.matches_address("fd00::1".parse().unwrap(), 443));
        assert_eq!(v6.to_string(), "[fd00::1]:443");
        assert_eq!(allow("[::ffff:10.0.0.5]:80").to_string(), "10.0.0.5:80");
        for bad in [
            "10.0.0.5",
            "10.0.0.5:*",
            "[fd00::1]",
            "fd00::1",
            "[fd00::1]:0",
            "[example.com]:443",
        ] {
            assert!(HostPattern::parse(bad, PatternUse::Allow).is_err(), "{bad}");
        }
        let deny = HostPattern::parse("10.0.0.5", PatternUse::Deny).unwrap();
        assert!(
            deny.matches_address("10.0.0.5".parse().unwrap(), 22),
            "a port-less deny covers every port"
        );
    }

    #[test]
    fn a_doubled_port_or_a_url_is_told_what_it_is() {
        let err = HostPattern::parse("example.com:443:443", PatternUse::Allow)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("more than one `:`") && !err.contains("IP address"),
            "{err}"
        );
        let err = HostPattern::parse("http://example.com", PatternUse::Allow)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("that is a URL") && err.contains("\"example.com\""),
            "{err}"
        );
    }

    #[test]
    fn an_address_without_a_port_is_told_the_valid_form() {
        for (raw, want) in [
            ("10.0.0.5", "\"10.0.0.5:443\""),
            ("[::1]", "\"[::1]:443\""),
            ("fd00::1", "\"[fd00::1]:443\""),
        ] {
            let err = HostPattern::parse(raw, PatternUse::Allow).unwrap_err().to_string();
            assert!(err.contains(want), "{raw}: {err}");
            // The suggestion is itself valid.
            let suggested = want.trim_matches('"');
            assert!(HostPattern::parse(suggested, PatternUse::Allow).is_ok(), "{suggested}");
        }
    }

    #[test]
    fn misplaced_wildcards_are_refused() {
        for s in ["a.*.com", "foo*.example.com", "*.*.example.com"] {
            assert!(matches!(
                HostPattern::parse(s, PatternUse::Allow),
                Err(HostError::MisplacedWildcard(_) | HostError::Invalid { .. })
            ));
        }
    }

    #[test]
    fn ports_default_to_http_and_https() {
        let p = allow("example.com");
        assert!(p.matches(&name("example.com"), 443));
        assert!(p.matches(&name("example.com"), 80));
        assert!(!p.matches(&name("example.com"), 22));
        let p = allow("example.com:8443");
        assert!(p.matches(&name("example.com"), 8443));
        assert!(!p.matches(&name("example.com"), 443));
        assert!(allow("example.com:*").matches(&name("example.com"), 22));
        for bad in ["example.com:0", "example.com:65536", "example.com:+1", "example.com:"] {
            assert!(HostPattern::parse(bad, PatternUse::Allow).is_err(), "{bad}");
        }
    }

    #[test]
    fn deny_without_a_port_denies_every_port() {
        let deny = HostPattern::parse("secret.example.com", PatternUse::Deny).unwrap();
        for port in [80, 443, 8443, 22] {
            assert!(deny.matches(&name("secret.example.com"), port), "{port}");
        }
        let deny = HostPattern::parse("secret.example.com:8443", PatternUse::Deny).unwrap();
        assert!(!deny.matches(&name("secret.example.com"), 443));
    }

    #[test]
    fn display_round_trips() {
        for s in ["example.com", "*.example.com:8443", "example.com:*"] {
            assert_eq!(allow(s).to_string(), s);
        }
    }
}
