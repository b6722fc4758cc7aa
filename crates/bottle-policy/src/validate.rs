//! Turns the raw file, the agent preset and command-line additions into a `Policy`, stopping at the first
//! problem with an error that points at it.

mod ask;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::address::check_allow_cidr;
use crate::address::{PrivateKind, private_kind};
use crate::error::PolicyError;
use crate::host::{HostName, HostPattern, PatternUse};
use crate::host::{NamePattern, PortSpec};
use crate::model::{
    Agent, Backend, Bottle, BottleName, Credential, HostRule, HostVerdict, Mount, Network, Origin, Placement, Policy,
    Resources, SecretSource, TlsMode, specificity,
};
use crate::preset::preset;
use crate::raw::{RawBottle, RawCredential, RawHost, RawMount, RawPolicy, RawRule, S};
use crate::rules::{OtherQuery, PathGlob, RequestRule, ValueGlob, parse_method};

/// A policy file larger than this is refused before parsing.
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;

/// Variables that point every tool at the bottle's proxy.
pub const PROXY_ENV: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];
/// Variables naming what tools reach without the proxy: only the bottle's own loopback (its own network namespace
/// or guest), so a dev server the agent starts answers it directly. Set by bot-bottle; a policy may not widen them.
pub const NO_PROXY_ENV: [&str; 2] = ["NO_PROXY", "no_proxy"];
/// Their value: the bottle's own loopback names, nothing else.
pub const NO_PROXY_VALUE: &str = "localhost,127.0.0.1,::1";
/// Set by bot-bottle to the bottle's home.
pub const HOME_ENV: &str = "HOME";
/// Variables that point every tool at the bottle's CA bundle.
pub const CA_ENV: [&str; 7] = [
    "SSL_CERT_FILE",
    "NODE_EXTRA_CA_CERTS",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "CARGO_HTTP_CAINFO",
];

/// Whether bot-bottle sets this variable inside every bottle (a policy may not override it).
pub fn is_reserved_env(name: &str) -> bool {
    PROXY_ENV.contains(&name) || NO_PROXY_ENV.contains(&name) || CA_ENV.contains(&name) || name == HOME_ENV
}

/// The proxy and CA settings of every process in a bottle, whatever the backend: one source for the names the
/// policy reserves and the values the bottle gets.
pub fn proxy_and_ca_env(proxy_url: &str, ca_bundle: &str) -> std::collections::BTreeMap<String, String> {
    let proxy = PROXY_ENV.iter().map(|k| (k.to_string(), proxy_url.to_string()));
    let none = NO_PROXY_ENV.iter().map(|k| (k.to_string(), NO_PROXY_VALUE.to_string()));
    let ca = CA_ENV.iter().map(|k| (k.to_string(), ca_bundle.to_string()));
    proxy.chain(none).chain(ca).collect()
}

/// Command-line additions that mirror the policy file. Flag values win over the file where both set one value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub agent: Option<String>,
    pub backend: Option<String>,
    pub name: Option<String>,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub allow_cidr: Vec<String>,
    pub resolve: Vec<String>,
    pub env: Vec<String>,
    pub home: Option<String>,
    /// `--mount SRC[:DST][:ro|rw]`.
    pub mounts: Vec<String>,
    /// `--ask`: `unknown = "ask"`.
    pub ask: bool,
    /// `--image NAME`: the container backend's image.
    pub image: Option<String>,
    /// `--runtime NAME`: the container engine's runtime.
    pub runtime: Option<String>,
}

/// The text of a policy and where it came from.
pub struct Source<'a> {
    pub text: &'a str,
    pub path: Option<&'a Path>,
}

/// Validates raw bytes (from a file or stdin): size, encoding, then TOML, then meaning.
pub fn from_bytes(bytes: &[u8], path: Option<&Path>, overrides: &Overrides) -> Result<Policy, PolicyError> {
    if bytes.len() > MAX_POLICY_BYTES {
        return Err(PolicyError::whole_file(
            path,
            format!("policy is {} bytes; the limit is {MAX_POLICY_BYTES} bytes", bytes.len()),
        ));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let src = String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned();
            let at = src.len();
            return Err(PolicyError::at_span(
                &src,
                path,
                at..at,
                "policy is not UTF-8 text (is it a binary file?)",
            ));
        }
    };
    if let Some(at) = text.find('\0') {
        return Err(PolicyError::at_span(
            text,
            path,
            at..at + 1,
            "policy contains a NUL byte (is it a binary file?)",
        ));
    }
    from_str(&Source { text, path }, overrides)
}

pub fn from_str(src: &Source<'_>, overrides: &Overrides) -> Result<Policy, PolicyError> {
    let raw: RawPolicy = toml::from_str(src.text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        PolicyError::at_span(src.text, src.path, span, e.message().trim_end().to_string())
    })?;
    Validator { src, overrides }.policy(raw)
}

/// The policy when no file is given: the agent preset plus flags.
pub fn from_flags(overrides: &Overrides) -> Result<Policy, PolicyError> {
    from_str(&Source { text: "", path: None }, overrides)
}

struct Validator<'a> {
    src: &'a Source<'a>,
    overrides: &'a Overrides,
}

type R<T> = Result<T, PolicyError>;

impl Validator<'_> {
    fn err(&self, span: Range<usize>, msg: impl Into<String>) -> PolicyError {
        PolicyError::at_span(self.src.text, self.src.path, span, msg)
    }

    /// Runs `f` on a spanned value, pinning its error message to the value's span.
    fn at<T, U>(&self, v: &S<T>, f: impl FnOnce(&T) -> Result<U, String>) -> R<U> {
        f(v.get_ref()).map_err(|m| self.err(v.span(), m))
    }

    fn flag<U>(flag: &'static str, value: &str, f: impl FnOnce(&str) -> Result<U, String>) -> R<U> {
        f(value).map_err(|m| PolicyError::at_flag(flag, value, m))
    }

    fn policy(&self, raw: RawPolicy) -> R<Policy> {
        let mut bottle = self.bottle(&raw.bottle)?;
        bottle.mounts = self.mounts(&raw.mount)?;
        let mut network = self.network(&raw, bottle.agent)?;
        self.resolve(&raw, &mut network)?;
        self.ask(&raw.network, &mut network)?;
        let credentials = self.credentials(&raw.credential, bottle.agent, &network)?;
        self.check_env_against_credentials(&raw.bottle, &bottle, &credentials)?;
        Ok(Policy {
            bottle,
            network,
            credentials,
        })
    }

    fn bottle(&self, raw: &RawBottle) -> R<Bottle> {
        let o = self.overrides;
        let agent = match (&o.agent, &raw.agent) {
            (Some(a), _) => Self::flag("--agent", a, |s| s.parse())?,
            (None, Some(a)) => self.at(a, |s| s.parse())?,
            (None, None) => Agent::default(),
        };
        let backend = match (&o.backend, &raw.backend) {
            (Some(b), _) => Self::flag("--backend", b, |s| s.parse())?,
            (None, Some(b)) => self.at(b, |s| s.parse())?,
            (None, None) => Backend::default(),
        };
        let name = match (&o.name, &raw.name) {
            (Some(n), _) => Some(Self::flag("--name", n, BottleName::parse)?),
            (None, Some(n)) => Some(self.at(n, |s| BottleName::parse(s))?),
            (None, None) => None,
        };
        let workspace = match &raw.workspace {
            Some(w) => Some(self.at(w, |s| non_empty(s, "workspace").map(PathBuf::from))?),
            None => None,
        };
        let image = match (&self.overrides.image, &raw.image) {
            (Some(flag), _) => Some(Self::flag("--image", flag, image_ref)?),
            (None, Some(i)) => Some(self.at(i, |s| image_ref(s))?),
            (None, None) => None,
        };
        let runtime = match (&self.overrides.runtime, &raw.runtime) {
            (Some(flag), _) => Some(Self::flag("--runtime", flag, runtime_name)?),
            (None, Some(r)) => Some(self.at(r, |s| runtime_name(s))?),
            (None, None) => None,
        };
        let home = match (&self.overrides.home, &raw.home) {
            (Some(h), _) => Some(Self::flag("--home", h, home_choice)?),
            (None, Some(h)) => Some(self.at(h, |s| home_choice(s))?),
            (None, None) => None,
        };
        let command = match &raw.command {
            Some(c) if c.get_ref().is_empty() => {
                return Err(self.err(c.span(), "command is empty; give argv, e.g. [\"claude\"]"));
            }
            Some(c) => Some(c.get_ref().iter().map(|a| a.get_ref().clone()).collect()),
            None => None,
        };
        let mut env: BTreeMap<String, String> = preset(agent)
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in &raw.env {
            let key = self.at(k, |s| env_name(s))?;
            env.insert(key, v.get_ref().clone());
        }
        for kv in &o.env {
            let (k, v) = Self::flag("-e", kv, |s| {
                let (k, v) = s.split_once('=').ok_or("expected KEY=VALUE")?;
                Ok((env_name(k)?, v.to_string()))
            })?;
            env.insert(k, v);
        }
        let mut pass_env = Vec::new();
        for p in &raw.pass_env {
            pass_env.push(self.at(p, |s| env_name(s))?);
        }
        let mut share_sockets = Vec::new();
        for p in &raw.share_sockets {
            share_sockets.push(self.at(p, |s| shared_socket(s))?);
        }
        Ok(Bottle {
            name,
            backend,
            agent,
            workspace,
            base_dir: self.src.path.and_then(Path::parent).map(Path::to_path_buf),
            image,
            runtime,
            home,
            command,
            env,
            pass_env,
            share_sockets,
            resources: self.resources(raw)?,
            mounts: Vec::new(),
        })
    }

    fn mounts(&self, raw: &[RawMount]) -> R<Vec<Mount>> {
        let mut mounts = Vec::new();
        for m in raw {
            let source = self.at(&m.source, |s| non_empty(s, "mount source").map(PathBuf::from))?;
            let target = match &m.target {
                Some(t) => Some(self.at(t, |s| mount_target(s))?),
                None => None,
            };
            let writable = match &m.mode {
                Some(mode) => self.at(mode, |s| mount_mode(s))?,
                None => false,
            };
            mounts.push(Mount {
                source,
                target,
                writable,
            });
        }
        for flag in &self.overrides.mounts {
            mounts.push(Self::flag("--mount", flag, mount_flag)?);
        }
        Ok(mounts)
    }

    fn resources(&self, raw: &RawBottle) -> R<Resources> {
        let r = &raw.resources;
        let ranged = |v: &S<i64>, lo: i64, hi: i64, what: &str| {
            self.at(v, |n| {
                if (lo..=hi).contains(n) {
                    Ok(*n)
                } else {
                    Err(format!("{what} must be from {lo} to {hi}, not {n}"))
                }
            })
        };
        Ok(Resources {
            cpus: r
                .cpus
                .as_ref()
                .map(|v| ranged(v, 1, 256, "cpus"))
                .transpose()?
                .map(|n| n as u32),
            memory_mib: r
                .memory_mib
                .as_ref()
                .map(|v| ranged(v, 64, 1 << 20, "memory_mib"))
                .transpose()?
                .map(|n| n as u64),
            pids: r
                .pids
                .as_ref()
                .map(|v| ranged(v, 16, 1 << 22, "pids"))
                .transpose()?
                .map(|n| n as u32),
        })
    }

    fn network(&self, raw: &RawPolicy, agent: Agent) -> R<Network> {
        let mut hosts: Vec<HostRule> = Vec::new();
        let mut places: Vec<Place> = Vec::new();
        for h in preset(agent).hosts {
            let pattern = HostPattern::parse(h, PatternUse::Allow)
                .map_err(|e| PolicyError::at_flag("--agent", agent.as_str(), e.to_string()))?;
            hosts.push(plain_rule(pattern, Origin::Preset));
            places.push(Place::Preset(agent));
        }
        // File entries replace preset entries for the same pattern; two file entries for one pattern are an error.
        let add_file = |rule: HostRule, span: Range<usize>, hosts: &mut Vec<HostRule>, places: &mut Vec<Place>| {
            match hosts.iter().position(|h| h.pattern == rule.pattern) {
                Some(i) if hosts[i].origin == Origin::Preset => {
                    hosts[i] = rule;
                    places[i] = Place::Span(span);
                }
                Some(_) => {
                    return Err(self.err(span, format!("host `{}` is declared twice", rule.pattern)));
                }
                None => {
                    hosts.push(rule);
                    places.push(Place::Span(span));
                }
            }
            Ok(())
        };
        for a in &raw.network.allow {
            let pattern = self.at(a, |s| {
                HostPattern::parse(s, PatternUse::Allow).map_err(|e| e.to_string())
            })?;
            add_file(plain_rule(pattern, Origin::File), a.span(), &mut hosts, &mut places)?;
        }
        for h in &raw.host {
            add_file(self.host(h)?, h.name.span(), &mut hosts, &mut places)?;
        }
        for a in &self.overrides.allow {
            let pattern = Self::flag("--allow", a, |s| {
                HostPattern::parse(s, PatternUse::Allow).map_err(|e| e.to_string())
            })?;
            if !hosts.iter().any(|h| h.pattern == pattern) {
                hosts.push(plain_rule(pattern, Origin::Flag));
                places.push(Place::Flag(a.clone()));
            }
        }
        self.rules_on_every_port(&mut hosts, &places)?;
        let mut deny = Vec::new();
        for d in &raw.network.deny {
            deny.push(self.at(d, |s| {
                HostPattern::parse(s, PatternUse::Deny).map_err(|e| e.to_string())
            })?);
        }
        for d in &self.overrides.deny {
            deny.push(Self::flag("--deny", d, |s| {
                HostPattern::parse(s, PatternUse::Deny).map_err(|e| e.to_string())
            })?);
        }
        let mut allow_cidr = Vec::new();
        for c in &raw.network.allow_cidr {
            allow_cidr.push(self.at(c, |s| cidr(s))?);
        }
        for c in &self.overrides.allow_cidr {
            allow_cidr.push(Self::flag("--allow-cidr", c, cidr)?);
        }
        Ok(Network {
            hosts,
            deny,
            allow_cidr,
            resolve: BTreeMap::new(),
            ..Network::default()
        })
    }

    fn host(&self, h: &RawHost) -> R<HostRule> {
        let pattern = self.at(&h.name, |s| {
            HostPattern::parse(s, PatternUse::Allow).map_err(|e| e.to_string())
        })?;
        let tls = match &h.tls {
            None => TlsMode::Intercept,
            Some(t) => self.at(t, |s| match s.as_str() {
                "intercept" => Ok(TlsMode::Intercept),
                "passthrough" => Ok(TlsMode::Passthrough),
                other => Err(format!(
                    "unknown tls mode `{other}`; expected \"intercept\" or \"passthrough\""
                )),
            })?,
        };
        if tls == TlsMode::Passthrough
            && let Some(first) = h.rule.first()
        {
            // SECURITY: a passthrough tunnel is opaque; a rule on it would be a promise the proxy cannot keep.
            return Err(self.err(
                first.span(),
                format!("host `{pattern}` is passthrough, so its requests cannot be inspected: remove the rules or use tls = \"intercept\""),
            ));
        }
        let mut rules = Vec::new();
        for r in &h.rule {
            rules.push(self.rule(r.get_ref())?);
        }
        let mut upgrades = Vec::new();
        for u in &h.upgrades {
            upgrades.push(self.at(u, |s| upgrade_protocol(s, tls))?);
        }
        Ok(HostRule {
            pattern,
            tls,
            rules,
            upgrades,
            origin: Origin::File,
        })
    }

    fn rule(&self, r: &RawRule) -> R<RequestRule> {
        let mut rule = RequestRule::default();
        for m in &r.methods {
            rule.methods.push(self.at(m, |s| parse_method(s))?);
        }
        for p in &r.paths {
            rule.paths.push(self.at(p, |s| PathGlob::parse(s))?);
        }
        for (k, v) in &r.query {
            let key = self.at(k, |s| non_empty(s, "query parameter name"))?;
            rule.query.push((key, self.at(v, |s| ValueGlob::parse(s))?));
        }
        if let Some(o) = &r.other_query {
            rule.other_query = self.at(o, |s| match s.as_str() {
                "allow" => Ok(OtherQuery::Allow),
                "deny" => Ok(OtherQuery::Deny),
                other => Err(format!("unknown other_query `{other}`; expected \"allow\" or \"deny\"")),
            })?;
        }
        Ok(rule)
    }

    fn resolve(&self, raw: &RawPolicy, network: &mut Network) -> R<()> {
        for (name, addrs) in &raw.network.resolve {
            let host = self.at(name, |s| HostName::parse(s).map_err(|e| e.to_string()))?;
            let ips = self.at(addrs, |a| addresses(a.items()))?;
            self.at(addrs, |_| covered(network, &host, &ips))?;
            network.resolve.insert(host, ips);
        }
        for r in &self.overrides.resolve {
            let (host, ips) = Self::flag("--resolve", r, |s| {
                let (n, a) = s.split_once('=').ok_or("expected NAME=ADDR[,ADDR…]")?;
                let host = HostName::parse(n).map_err(|e| e.to_string())?;
                Ok((host, addresses(a.split(',').collect())?))
            })?;
            Self::flag("--resolve", r, |_| covered(network, &host, &ips))?;
            network.resolve.insert(host, ips);
        }
        Ok(())
    }

    fn credentials(&self, raw: &[RawCredential], agent: Agent, network: &Network) -> R<Vec<Credential>> {
        let mut out: Vec<Credential> = Vec::new();
        for p in preset(agent).credentials {
            let Ok(host) = HostName::parse(p.host) else { continue };
            // A file may deny or passthrough a preset host; the preset key then simply does not apply.
            let intercepted =
                matches!(network.decide_host(&host, 443), HostVerdict::Allow(h) if h.tls == TlsMode::Intercept);
            if !intercepted || network.tls_modes_for(&host).any(|t| t == TlsMode::Passthrough) {
                continue;
            }
            out.push(Credential {
                host,
                placement: Placement::Header(p.header.to_string()),
                source: SecretSource::FromEnv(p.from_env.to_string()),
                env: p.from_env.to_string(),
                required: false,
                origin: Origin::Preset,
            });
        }
        for c in raw {
            let cred = self.credential(c, network)?;
            if let Some(i) = out.iter().position(|o| o.env == cred.env) {
                if out[i].origin != Origin::Preset {
                    let span = c.env.as_ref().map_or(c.host.span(), |e| e.span());
                    return Err(self.err(
                        span,
                        format!("two credentials use the placeholder variable `{}`", cred.env),
                    ));
                }
                out.remove(i);
            }
            out.push(cred);
        }
        Ok(out)
    }

    fn credential(&self, c: &RawCredential, network: &Network) -> R<Credential> {
        let host = self.at(&c.host, |s| HostName::parse(s).map_err(|e| e.to_string()))?;
        // SECURITY: a secret is only ever substituted inside an intercepted TLS stream to an allowed host.
        let modes: Vec<TlsMode> = network.tls_modes_for(&host).collect();
        if modes.contains(&TlsMode::Passthrough) {
            return Err(self.err(
                c.host.span(),
                format!("credential host `{host}` is passthrough, so the proxy cannot inject it: set tls = \"intercept\" for it"),
            ));
        }
        if modes.is_empty() {
            return Err(self.err(
                c.host.span(),
                format!("credential host `{host}` is not an allowed host: add it to network.allow"),
            ));
        }
        let placement = match (&c.header, &c.query) {
            (Some(h), None) => Placement::Header(self.at(h, |s| header_name(s))?),
            (None, Some(q)) => Placement::Query(self.at(q, |s| non_empty(s, "query parameter name"))?),
            _ => return Err(self.err(c.host.span(), "a credential needs exactly one of `header` or `query`")),
        };
        let source = match (&c.from_env, &c.from_file) {
            (Some(e), None) => SecretSource::FromEnv(self.at(e, |s| env_name(s))?),
            (None, Some(f)) => SecretSource::FromFile(self.at(f, |s| non_empty(s, "from_file").map(PathBuf::from))?),
            _ => {
                return Err(self.err(
                    c.host.span(),
                    "a credential needs exactly one of `from_env` or `from_file`",
                ));
            }
        };
        let env = match (&c.env, &source) {
            (Some(e), _) => self.at(e, |s| env_name(s))?,
            (None, SecretSource::FromEnv(name)) => name.clone(),
            (None, SecretSource::FromFile(_)) => {
                return Err(self.err(
                    c.host.span(),
                    "a credential read from_file needs `env`: the variable that carries its placeholder",
                ));
            }
        };
        Ok(Credential {
            host,
            placement,
            source,
            env,
            required: c.required.as_ref().is_none_or(|r| *r.get_ref()),
            origin: Origin::File,
        })
    }

    fn check_env_against_credentials(&self, raw: &RawBottle, bottle: &Bottle, creds: &[Credential]) -> R<()> {
        for c in creds {
            if bottle.env.contains_key(&c.env) {
                let span = raw
                    .env
                    .keys()
                    .find(|k| k.get_ref() == &c.env)
                    .map_or(0..0, |k| k.span());
                return Err(self.err(
                    span,
                    format!(
                        "`{}` carries a credential placeholder; it cannot also be set in bottle.env",
                        c.env
                    ),
                ));
            }
            if let SecretSource::FromEnv(src) = &c.source
                && let Some(p) = raw.pass_env.iter().find(|p| p.get_ref() == src)
            {
                return Err(self.err(
                    p.span(),
                    format!("pass_env would hand the bottle `{src}`, the real secret of a credential"),
                ));
            }
        }
        Ok(())
    }
}

fn plain_rule(pattern: HostPattern, origin: Origin) -> HostRule {
    HostRule {
        pattern,
        tls: TlsMode::Intercept,
        rules: Vec::new(),
        upgrades: Vec::new(),
        origin,
    }
}

fn non_empty(s: &str, what: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err(format!("{what} is empty"));
    }
    Ok(s.to_string())
}

/// `tmpfs` (a fresh home every run) or a directory (kept between runs); resolved by the launcher.
fn home_choice(s: &str) -> Result<String, String> {
    if s.trim().is_empty() || s.contains('\0') {
        return Err("home is empty; give a directory, or \"tmpfs\" for a fresh home every run".into());
    }
    Ok(s.to_string())
}

fn image_ref(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "image `{s}` is not a valid image reference (no spaces, at most 512 characters)"
        ));
    }
    Ok(s.to_string())
}

fn runtime_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(format!(
            "runtime `{s}` is not a runtime name (letters, digits, `.`, `_`, `-`; e.g. \"runsc\")"
        ));
    }
    Ok(s.to_string())
}

fn env_name(s: &str) -> Result<String, String> {
    let ok = s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(format!(
            "`{s}` is not a valid environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
        ));
    }
    if is_reserved_env(s) {
        return Err(format!(
            "`{s}` is set by bot-bottle itself (proxy, CA and home settings) and cannot be overridden"
        ));
    }
    Ok(s.to_string())
}

fn header_name(s: &str) -> Result<String, String> {
    let lower = s.to_ascii_lowercase();
    let token = !lower.is_empty()
        && lower
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(format!("`{s}` is not a valid header name"));
    }
    const FORBIDDEN: [&str; 8] = [
        "host",
        "connection",
        "content-length",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
    ];
    if FORBIDDEN.contains(&lower.as_str()) {
        return Err(format!(
            "`{s}` decides how a request is framed or routed; a credential cannot go there"
        ));
    }
    Ok(lower)
}

fn cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = match s.parse() {
        Ok(n) => n,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(format!(
                    "`{s}` is not a CIDR such as \"10.0.0.0/8\" or \"127.0.0.5/32\""
                ));
            }
        },
    };
    check_allow_cidr(&net)?;
    Ok(net)
}

fn addresses(items: Vec<&str>) -> Result<Vec<IpAddr>, String> {
    if items.is_empty() {
        return Err("resolve needs at least one address".to_string());
    }
    items
        .into_iter()
        .map(|a| {
            a.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("`{a}` is not an IP address"))
                .and_then(pin_address)
        })
        .collect()
}

/// Where an allow entry came from, for errors found after all entries are known.
enum Place {
    Preset(Agent),
    Span(Range<usize>),
    Flag(String),
}

impl Validator<'_> {
    fn err_at(&self, place: &Place, msg: String) -> PolicyError {
        match place {
            Place::Preset(agent) => PolicyError::at_flag("--agent", agent.as_str(), msg),
            Place::Span(span) => self.err(span.clone(), msg),
            Place::Flag(value) => PolicyError::at_flag("--allow", value, msg),
        }
    }

    /// SECURITY: the rules of a host apply on every port it is reachable on, whichever entry admitted the port.
    /// An entry that would win over a rule host on some port it admits (more specific: an exact port over the
    /// default ports, an exact name under a wildcard) and does not carry rules of its own would silently drop
    /// those rules there: refused. A plain entry for the same name on other ports takes the host's rules.
    fn rules_on_every_port(&self, hosts: &mut [HostRule], places: &[Place]) -> R<()> {
        for (r, rule_host) in hosts.iter().enumerate() {
            if rule_host.rules.is_empty() {
                continue;
            }
            for (e, entry) in hosts.iter().enumerate() {
                let unrestricted = entry.rules.is_empty() || entry.tls == TlsMode::Passthrough;
                if e == r || !unrestricted || !overlaps(&entry.pattern, &rule_host.pattern) {
                    continue;
                }
                if specificity(&entry.pattern) > specificity(&rule_host.pattern) {
                    return Err(self.err_at(
                        &places[e],
                        format!(
                            "`{}` would admit what [[host]] `{}` also admits, without that host's rules (the more specific entry wins): remove it, or give it a [[host]] entry with its own rules",
                            entry.pattern, rule_host.pattern
                        ),
                    ));
                }
            }
        }
        for e in 0..hosts.len() {
            let entry = &hosts[e];
            if !entry.rules.is_empty() {
                continue;
            }
            let same_name: Vec<&HostRule> = hosts
                .iter()
                .filter(|h| !h.rules.is_empty() && h.pattern.name == entry.pattern.name)
                .collect();
            let Some(first) = same_name.first() else { continue };
            if entry.tls == TlsMode::Passthrough {
                return Err(self.err_at(
                    &places[e],
                    format!(
                        "`{}` is passthrough, so the rules of [[host]] `{}` could not be enforced on its port: use tls = \"intercept\" and the same rules",
                        entry.pattern, first.pattern
                    ),
                ));
            }
            if same_name.iter().any(|h| h.rules != first.rules || h.tls != first.tls) {
                return Err(self.err_at(
                    &places[e],
                    format!(
                        "`{}` has no rules, and the [[host]] entries for the same name on other ports carry different ones: give it a [[host]] entry with its own rules",
                        entry.pattern
                    ),
                ));
            }
            let (rules, upgrades) = (first.rules.clone(), first.upgrades.clone());
            hosts[e].rules = rules;
            hosts[e].upgrades = upgrades;
        }
        Ok(())
    }
}

/// True when some destination matches both patterns.
fn overlaps(a: &HostPattern, b: &HostPattern) -> bool {
    let names = match (&a.name, &b.name) {
        (NamePattern::Exact(x), NamePattern::Exact(y)) => x == y,
        (NamePattern::Exact(x), NamePattern::Subdomains(_)) => b.matches_name(x),
        (NamePattern::Subdomains(_), NamePattern::Exact(y)) => a.matches_name(y),
        (NamePattern::Subdomains(x), NamePattern::Subdomains(y)) => x == y || a.matches_name(y) || b.matches_name(x),
        (NamePattern::Address(x), NamePattern::Address(y)) => x == y,
        _ => false,
    };
    let ports = match (a.port, b.port) {
        (PortSpec::Any, _) | (_, PortSpec::Any) | (PortSpec::Default, PortSpec::Default) => true,
        (PortSpec::Exact(p), other) | (other, PortSpec::Exact(p)) => other.admits(p),
    };
    names && ports
}

/// A protocol a host may switch to besides WebSocket (always policed: its 101 must answer the request's key).
fn upgrade_protocol(s: &str, tls: TlsMode) -> Result<String, String> {
    let lower = s.trim().to_ascii_lowercase();
    let token = !lower.is_empty()
        && lower
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b));
    if !token {
        return Err(format!(
            "`{s}` is not a protocol name as `Upgrade` carries it (e.g. \"tcp\")"
        ));
    }
    if tls == TlsMode::Passthrough {
        return Err("a passthrough host's requests are never seen, so upgrades cannot be allowed on it".into());
    }
    match lower.as_str() {
        "h2c" => Err("`h2c` would open an HTTP/2 channel that the proxy cannot police; it is always stripped".into()),
        "websocket" => Err("WebSocket upgrades are allowed on every allowed host already; do not list them".into()),
        _ => Ok(lower),
    }
}

/// A `[resolve]` pin to an address nothing could be reached at is refused now rather than at every request.
fn pin_address(ip: IpAddr) -> Result<IpAddr, String> {
    match private_kind(ip) {
        Some(kind @ (PrivateKind::Unspecified | PrivateKind::Multicast | PrivateKind::Broadcast)) => Err(format!(
            "`{ip}` is {}, which no service can be reached at",
            kind.describe()
        )),
        _ => Ok(ip),
    }
}

/// A `[resolve]` entry that points at a private address nothing allows would fail at every request; say so now.
/// The remedy is the narrow one: a /32 (or /128) lets allowed names resolve to that one address, and never admits
/// the address itself as a destination.
fn covered(network: &Network, host: &HostName, ips: &[IpAddr]) -> Result<(), String> {
    for ip in ips {
        if let Err(kind) = network.check_resolved(*ip) {
            return Err(format!(
                "`{host}` resolves to {ip}, {}, which no allow_cidr covers: add allow_cidr = [\"{ip}/{}\"]",
                kind.describe(),
                if ip.is_ipv4() { 32 } else { 128 }
            ));
        }
    }
    Ok(())
}

/// `ro` (the default) or `rw`.
fn mount_mode(s: &str) -> Result<bool, String> {
    match s {
        "ro" => Ok(false),
        "rw" => Ok(true),
        other => Err(format!("mount mode `{other}` is not valid: use \"ro\" or \"rw\"")),
    }
}

/// An absolute path inside the bottle, without `..`, never the bottle's own kernel or device trees.
fn mount_target(s: &str) -> Result<PathBuf, String> {
    let path = Path::new(s);
    if !path.is_absolute() || path.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!("mount target `{s}` must be an absolute path without `..`"));
    }
    let reserved = ["/proc", "/sys", "/dev", "/etc", "/usr", "/tmp"];
    if path == Path::new("/") || reserved.iter().any(|r| path.starts_with(r)) {
        return Err(format!(
            "mount target `{s}` would cover the bottle's own {}; pick another place, e.g. /opt/…",
            if path == Path::new("/") {
                "root"
            } else {
                "system directories"
            }
        ));
    }
    Ok(path.to_path_buf())
}

/// A Unix socket the bottle may connect to: absolute inside the bottle or relative to the workspace, without
/// `..`; never a container engine's socket (whoever talks to it is host root).
fn shared_socket(s: &str) -> Result<PathBuf, String> {
    let path = Path::new(s);
    if s.is_empty() || s.contains('\0') || path.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!(
            "share_sockets entry `{s}` must be a path inside the bottle (absolute, or relative to the workspace) \
             without `..`"
        ));
    }
    const ENGINES: [&str; 5] = [
        "docker.sock",
        "podman.sock",
        "containerd.sock",
        "crio.sock",
        "buildkitd.sock",
    ];
    if let Some(name) = path.file_name().and_then(|n| n.to_str())
        && ENGINES.contains(&name)
    {
        return Err(format!(
            "share_sockets entry `{s}` is a container engine's socket: whoever can talk to it is root on the host, \
             so a bottle never gets it"
        ));
    }
    Ok(path.to_path_buf())
}

/// `SRC[:DST][:ro|rw]`.
fn mount_flag(s: &str) -> Result<Mount, String> {
    let mut parts: Vec<&str> = s.split(':').collect();
    let writable = match parts.last() {
        Some(&m) if parts.len() > 1 && (m == "ro" || m == "rw") => {
            parts.pop();
            m == "rw"
        }
        _ => false,
    };
    let (source, target) = match parts.as_slice() {
        [source] => (*source, None),
        [source, target] => (*source, Some(mount_target(target)?)),
        _ => return Err("expected SRC[:DST][:ro|rw]".into()),
    };
    Ok(Mount {
        source: PathBuf::from(non_empty(source, "mount source")?),
        target,
        writable,
    })
}
