//! Host names and host patterns: normalisation (case, trailing dot, IDNA), wildcard and port semantics.
//!
//! Trusts nothing: every string here comes from a policy file, a command-line flag or the network.

use std::fmt;
use std::net::IpAddr;

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
    #[error("`{0}` is an IP address; hosts are names, allow addresses with allow_cidr (e.g. \"{0}/32\")")]
    IpLiteral(String),
    #[error("`{name}` is not a valid host name: {reason}")]
    Invalid { name: String, reason: &'static str },
    #[error(
        "`{0}` is too broad: a wildcard must sit under a registrable domain (e.g. \"*.example.com\"), not a public suffix"
    )]
    TooBroad(String),
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

/// Exact name or `*.suffix` (which matches any depth below the suffix, never the suffix itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamePattern {
    Exact(HostName),
    Subdomains(HostName),
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
        let (host, port) = split_port(raw)?;
        let name = match host.strip_prefix("*.") {
            Some(suffix) => {
                if suffix.contains('*') {
                    return Err(HostError::MisplacedWildcard(raw.to_string()));
                }
                let suffix = HostName::parse(suffix)?;
                if usage == PatternUse::Allow && is_public_suffix(&suffix) {
                    return Err(HostError::TooBroad(raw.to_string()));
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

    pub fn matches_name(&self, host: &HostName) -> bool {
        match &self.name {
            NamePattern::Exact(name) => name == host,
            NamePattern::Subdomains(suffix) => host.is_strict_subdomain_of(suffix),
        }
    }

    pub fn matches(&self, host: &HostName, port: u16) -> bool {
        self.port.admits(port) && self.matches_name(host)
    }

    /// The exact name, when this pattern names exactly one host.
    pub fn exact_name(&self) -> Option<&HostName> {
        match &self.name {
            NamePattern::Exact(name) => Some(name),
            NamePattern::Subdomains(_) => None,
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            NamePattern::Exact(name) => write!(f, "{name}")?,
            NamePattern::Subdomains(suffix) => write!(f, "*.{suffix}")?,
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
    // Bracketed IPv6 literals are refused by HostName::parse; only split a trailing `:port` off names.
    let Some((host, port)) = raw.rsplit_once(':') else {
        return Ok((raw, PortSpec::Default));
    };
    if host.contains(':') {
        // An unbracketed IPv6 literal such as `fd00::1`.
        return Err(HostError::IpLiteral(raw.to_string()));
    }
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

/// True when the name is a public suffix (`com`, `co.uk`, `github.io`) or a lone label.
fn is_public_suffix(name: &HostName) -> bool {
    if !name.as_str().contains('.') {
        return true;
    }
    psl::suffix(name.as_str().as_bytes()).is_some_and(|s| s.as_bytes().len() == name.as_str().len())
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
