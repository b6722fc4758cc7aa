//! The policy file as written: serde structs that mirror the TOML, unknown keys refused, spans kept so that
//! validation errors can point at the offending line. Nothing here is trusted; `validate` turns it into `Policy`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_spanned::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    #[serde(default)]
    pub bottle: RawBottle,
    #[serde(default)]
    pub network: RawNetwork,
    #[serde(default)]
    pub host: Vec<RawHost>,
    #[serde(default)]
    pub credential: Vec<RawCredential>,
    #[serde(default)]
    pub mount: Vec<RawMount>,
}

/// `[[mount]]`: a host path shown in the bottle.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMount {
    pub source: S<String>,
    pub target: Option<S<String>>,
    pub mode: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBottle {
    pub name: Option<S<String>>,
    pub backend: Option<S<String>>,
    pub agent: Option<S<String>>,
    pub workspace: Option<S<String>>,
    pub image: Option<S<String>>,
    pub runtime: Option<S<String>>,
    pub home: Option<S<String>>,
    pub command: Option<S<Vec<S<String>>>>,
    #[serde(default)]
    pub env: BTreeMap<S<String>, S<String>>,
    #[serde(default)]
    pub pass_env: Vec<S<String>>,
    #[serde(default)]
    pub share_sockets: Vec<S<String>>,
    #[serde(default)]
    pub resources: RawResources,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    pub cpus: Option<S<i64>>,
    pub memory_mib: Option<S<i64>>,
    pub pids: Option<S<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    #[serde(default)]
    pub allow: Vec<S<String>>,
    #[serde(default)]
    pub deny: Vec<S<String>>,
    #[serde(default)]
    pub allow_cidr: Vec<S<String>>,
    #[serde(default)]
    pub resolve: BTreeMap<S<String>, S<OneOrMany>>,
    /// `"deny"` (default) or `"ask"`.
    pub unknown: Option<S<String>>,
    /// Seconds a held request waits for a reviewer.
    pub ask_timeout: Option<S<i64>>,
    pub ask: Option<S<RawAsk>>,
}

/// `[network.ask]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAsk {
    pub reviewer: Option<S<Vec<S<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn items(&self) -> Vec<&str> {
        match self {
            Self::One(s) => vec![s.as_str()],
            Self::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    pub name: S<String>,
    pub tls: Option<S<String>>,
    #[serde(default)]
    pub upgrades: Vec<S<String>>,
    #[serde(default)]
    pub rule: Vec<S<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(default)]
    pub methods: Vec<S<String>>,
    #[serde(default)]
    pub paths: Vec<S<String>>,
    #[serde(default)]
    pub query: BTreeMap<S<String>, S<String>>,
    pub other_query: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub host: S<String>,
    pub header: Option<S<String>>,
    pub query: Option<S<String>>,
    pub from_env: Option<S<String>>,
    pub from_file: Option<S<String>>,
    pub env: Option<S<String>>,
    pub required: Option<S<bool>>,
}
