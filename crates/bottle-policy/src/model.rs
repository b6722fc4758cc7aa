//! The validated policy: types that cannot hold an invalid policy, and the pure decisions the proxy asks of it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use ipnet::IpNet;

use crate::address::{PrivateKind, private_kind};
use crate::host::{HostName, HostPattern, NamePattern, PortSpec, canonical_ip};
use crate::rules::{RequestRule, RuleRefusal, check_request};

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub bottle: Bottle,
    pub network: Network,
    pub credentials: Vec<Credential>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Namespace,
    Container,
    Smolmachines,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Self::Namespace, Self::Container, Self::Smolmachines];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Namespace => "namespace",
            Self::Container => "container",
            Self::Smolmachines => "smolmachines",
        }
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| format!("unknown backend `{s}`; expected one of namespace, container, smolmachines"))
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Agent {
    Claude,
    Codex,
    Gemini,
    Aider,
    #[default]
    None,
}

impl Agent {
    pub const ALL: [Agent; 5] = [Self::Claude, Self::Codex, Self::Gemini, Self::Aider, Self::None];
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Claude => "claude",
            Self::Codex => "codex",
            Self::Gemini => "gemini",
            Self::Aider => "aider",
            Self::None => "none",
        }
    }
}

impl FromStr for Agent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown agent `{s}`; expected one of claude, codex, gemini, aider, none"))
    }
}

impl fmt::Display for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bottle name: `[a-z0-9][a-z0-9_-]{0,62}`; usable as a directory, a machine name and a container name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct BottleName(String);

impl BottleName {
    pub const MAX_LEN: usize = 63;
    /// Entries of the state root that are not bottles (the lease registry; future shared directories).
    pub const RESERVED: [&'static str; 2] = ["leases", "homes"];
    pub fn parse(raw: &str) -> Result<Self, String> {
        let ok_first = raw
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let ok_rest = raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if raw.is_empty() || raw.len() > Self::MAX_LEN || !ok_first || !ok_rest {
            let shown: String = raw.chars().take(80).collect();
            return Err(format!(
                "bottle name `{shown}` is not valid: use 1 to 63 of a-z, 0-9, `-`, `_`, starting with a letter or digit"
            ));
        }
        // A bottle's state lives in a directory of its name beside bot-bottle's own entries.
        if Self::RESERVED.contains(&raw) {
            return Err(format!(
                "bottle name `{raw}` is reserved: bot-bottle keeps its {raw} there; pick another name"
            ));
        }
        Ok(Self(raw.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A name read back (a state file) is checked as one given on the command line.
impl<'de> serde::Deserialize<'de> for BottleName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for BottleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Resources {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Bottle {
    pub name: Option<BottleName>,
    pub backend: Backend,
    pub agent: Agent,
    /// As written (relative paths are relative to `base_dir`); resolved by the launcher.
    pub workspace: Option<PathBuf>,
    /// Directory of the policy file (or the working directory for flags and presets).
    pub base_dir: Option<PathBuf>,
    pub image: Option<String>,
    /// The container engine's runtime the bottle runs under (`runsc`: gVisor); the engine's default when `None`.
    pub runtime: Option<String>,
    /// `tmpfs`, or a directory kept between runs; `None`: the agent preset's home under the state root.
    pub home: Option<String>,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub pass_env: Vec<String>,
    /// Unix sockets of host processes the bottle may connect to, as written: absolute paths inside the bottle, or
    /// relative to the workspace. Every other socket the bottle did not make itself is refused.
    pub share_sockets: Vec<PathBuf>,
    pub resources: Resources,
    /// Host paths shown in the bottle (`[[mount]]`, `--mount`), as written; resolved and checked by the launcher.
    pub mounts: Vec<Mount>,
}

/// A host path shown in the bottle, read-only unless `writable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// As written: absolute, `~/…` (the invoking user's home) or relative to the policy file.
    pub source: PathBuf,
    /// Where it appears; `None`: the same path, or under the bottle's home for a path under the user's home.
    pub target: Option<PathBuf>,
    pub writable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Terminate TLS with the bottle CA and police every request (the default).
    #[default]
    Intercept,
    /// Relay the tunnel after checking the ClientHello SNI equals the CONNECT target; no L7 rules possible.
    Passthrough,
}

/// Where an allowed host came from, for `policy check` and denial hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Preset,
    File,
    Flag,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostRule {
    pub pattern: HostPattern,
    pub tls: TlsMode,
    /// Empty: every request to the host passes. Otherwise a request must pass one rule.
    pub rules: Vec<RequestRule>,
    /// Protocols other than WebSocket that a request may switch to (`Upgrade`), lowercase; opt-in per host.
    pub upgrades: Vec<String>,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Network {
    pub hosts: Vec<HostRule>,
    pub deny: Vec<HostPattern>,
    pub allow_cidr: Vec<IpNet>,
    pub resolve: BTreeMap<HostName, Vec<IpAddr>>,
    /// What happens to a request for a host the policy does not cover.
    pub unknown: Unknown,
    pub ask: Ask,
}

/// `[network] unknown`: refuse a host the policy does not cover (the default), or hold the request and ask a
/// reviewer. Private destinations, explicit denials and placeholders sent to the wrong host are never asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unknown {
    #[default]
    Deny,
    Ask,
}

/// How a held request is reviewed: `[network] ask_timeout` and `[network.ask] reviewer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    /// A request not answered within this is refused (`timeout`).
    pub timeout: std::time::Duration,
    /// A program given one JSON question on stdin that answers one JSON object on stdout.
    pub reviewer: Option<Vec<String>>,
}

impl Ask {
    pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
    pub const MAX_TIMEOUT_SECS: u64 = 3600;
}

impl Default for Ask {
    fn default() -> Self {
        Self {
            timeout: std::time::Duration::from_secs(Self::DEFAULT_TIMEOUT_SECS),
            reviewer: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Lowercase header name.
    Header(String),
    /// Query parameter name.
    Query(String),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretSource {
    FromEnv(String),
    FromFile(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub host: HostName,
    pub placement: Placement,
    pub source: SecretSource,
    /// The variable that carries the placeholder inside the bottle.
    pub env: String,
    /// When false, a missing source means "no credential" rather than a launch failure.
    pub required: bool,
    pub origin: Origin,
}

/// The verdict on a destination host, before any request is seen.
#[derive(Debug, Clone, PartialEq)]
pub enum HostVerdict<'a> {
    Allow(&'a HostRule),
    /// A deny pattern matched (deny wins over allow).
    Denied(&'a HostPattern),
    /// No allow entry matched this host and port.
    NotAllowed,
}

/// The verdict on an IP-literal destination.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AddressVerdict<'a> {
    /// An allow entry names exactly this address and port.
    Allow(&'a HostRule),
    /// A deny entry names this address (deny wins).
    Denied(&'a HostPattern),
    /// Public or private, an IP literal is denied unless an entry names it with its port (`allow_cidr` never
    /// admits an address: it only lets allowed *names* resolve into a private range).
    NotAllowed,
}

impl Network {
    /// SECURITY: deny wins; otherwise the most specific allow entry decides (exact name over wildcard, longer
    /// suffix over shorter, exact port over default over any), so a broad rule never overrides a narrow one.
    pub fn decide_host(&self, host: &HostName, port: u16) -> HostVerdict<'_> {
        if let Some(deny) = self.deny.iter().find(|d| d.matches(host, port)) {
            return HostVerdict::Denied(deny);
        }
        self.hosts
            .iter()
            .filter(|h| h.pattern.matches(host, port))
            .max_by_key(|h| specificity(&h.pattern))
            .map_or(HostVerdict::NotAllowed, HostVerdict::Allow)
    }

    /// The TLS modes of every allow entry that names this host, on any port.
    pub fn tls_modes_for(&self, host: &HostName) -> impl Iterator<Item = TlsMode> + '_ {
        let host = host.clone();
        self.hosts
            .iter()
            .filter(move |h| h.pattern.matches_name(&host))
            .map(|h| h.tls)
    }

    /// An IP-literal destination (`CONNECT 1.2.3.4:443`, `http://[::1]:8080/`): allowed only by an entry that
    /// names this address with this port.
    pub fn decide_ip_literal(&self, ip: IpAddr, port: u16) -> AddressVerdict<'_> {
        if let Some(deny) = self.deny.iter().find(|d| d.matches_address(ip, port)) {
            return AddressVerdict::Denied(deny);
        }
        self.hosts
            .iter()
            .find(|h| h.pattern.matches_address(ip, port))
            .map_or(AddressVerdict::NotAllowed, AddressVerdict::Allow)
    }

    /// SECURITY: the check on every address a name resolved to (DNS answers and `[network.resolve]` pins), before
    /// dialling it (DNS rebinding). Public addresses pass; private ones only inside an allow_cidr. An allow_cidr
    /// never admits an address as a destination of its own (see `decide_ip_literal`).
    pub fn check_resolved(&self, ip: IpAddr) -> Result<(), PrivateKind> {
        match private_kind(ip) {
            None => Ok(()),
            Some(_) if self.cidr_for(ip).is_some() => Ok(()),
            Some(kind) => Err(kind),
        }
    }

    fn cidr_for(&self, ip: IpAddr) -> Option<IpNet> {
        let ip = canonical_ip(ip);
        self.allow_cidr.iter().copied().find(|net| net.contains(&ip))
    }
}

impl HostRule {
    /// Passes the request when the host has no rules or one rule admits it (decoded, see `rules`).
    pub fn check_request(&self, method: &str, path: &str, query: Option<&str>) -> Result<(), RuleRefusal> {
        check_request(&self.rules, method, path, query)
    }

    pub fn admits_request(&self, method: &str, path: &str, query: Option<&str>) -> bool {
        self.check_request(method, path, query).is_ok()
    }
}

impl Policy {
    /// Credentials bound to exactly this host.
    pub fn credentials_for<'a>(&'a self, host: &'a HostName) -> impl Iterator<Item = &'a Credential> + 'a {
        self.credentials.iter().filter(move |c| &c.host == host)
    }
}

pub(crate) fn specificity(p: &HostPattern) -> (u8, usize, u8) {
    let (exact, len) = match &p.name {
        NamePattern::Exact(n) => (1, n.as_str().len()),
        NamePattern::Subdomains(s) => (0, s.as_str().len()),
        NamePattern::Address(_) => (2, 0),
    };
    let port = match p.port {
        PortSpec::Exact(_) => 2,
        PortSpec::Default => 1,
        PortSpec::Any => 0,
    };
    (exact, len, port)
}
