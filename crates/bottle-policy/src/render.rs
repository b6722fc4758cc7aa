//! The effective policy (presets expanded, flags applied) written back in the policy language, so that what
//! `policy check` prints can itself be loaded and gives the same policy.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{Credential, HostRule, Placement, Policy, Resources, SecretSource, TlsMode, Unknown};
use crate::rules::OtherQuery;

#[derive(Serialize)]
pub struct Effective {
    bottle: EBottle,
    network: ENetwork,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    host: Vec<EHost>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    credential: Vec<ECredential>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mount: Vec<EMount>,
}

#[derive(Serialize)]
struct EMount {
    source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    mode: &'static str,
}

#[derive(Serialize)]
struct EBottle {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    backend: String,
    agent: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    workspace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    home: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pass_env: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    share_sockets: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "is_default_resources")]
    resources: Resources,
}

#[derive(Serialize)]
struct ENetwork {
    allow: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    deny: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allow_cidr: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unknown: Option<Unknown>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ask_timeout: Option<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    resolve: BTreeMap<String, Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ask: Option<EAsk>,
}

#[derive(Serialize)]
struct EAsk {
    reviewer: Vec<String>,
}

#[derive(Serialize)]
struct EHost {
    name: String,
    tls: TlsMode,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    upgrades: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rule: Vec<ERule>,
}

#[derive(Serialize)]
struct ERule {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    methods: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    paths: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    query: BTreeMap<String, String>,
    other_query: OtherQuery,
}

#[derive(Serialize)]
struct ECredential {
    host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from_file: Option<String>,
    env: String,
    required: bool,
}

fn is_default_resources(r: &Resources) -> bool {
    *r == Resources::default()
}

impl Effective {
    pub fn of(p: &Policy) -> Self {
        let b = &p.bottle;
        let n = &p.network;
        let plain = |h: &&HostRule| h.tls == TlsMode::Intercept && h.rules.is_empty() && h.upgrades.is_empty();
        Self {
            bottle: EBottle {
                name: b.name.as_ref().map(|n| n.to_string()),
                backend: b.backend.to_string(),
                agent: b.agent.to_string(),
                workspace: b.workspace.as_ref().map(|w| w.display().to_string()),
                image: b.image.clone(),
                runtime: b.runtime.clone(),
                home: b.home.clone(),
                command: b.command.clone(),
                pass_env: b.pass_env.clone(),
                share_sockets: b.share_sockets.iter().map(|p| p.display().to_string()).collect(),
                env: b.env.clone(),
                resources: b.resources,
            },
            network: ENetwork {
                allow: n.hosts.iter().filter(plain).map(|h| h.pattern.to_string()).collect(),
                deny: n.deny.iter().map(ToString::to_string).collect(),
                allow_cidr: n.allow_cidr.iter().map(ToString::to_string).collect(),
                resolve: n
                    .resolve
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.iter().map(ToString::to_string).collect()))
                    .collect(),
                unknown: (n.unknown == Unknown::Ask).then_some(Unknown::Ask),
                ask_timeout: (n.unknown == Unknown::Ask).then_some(n.ask.timeout.as_secs()),
                ask: n.ask.reviewer.clone().map(|reviewer| EAsk { reviewer }),
            },
            host: n.hosts.iter().filter(|h| !plain(h)).map(host).collect(),
            credential: p.credentials.iter().map(credential).collect(),
            mount: b
                .mounts
                .iter()
                .map(|m| EMount {
                    source: m.source.display().to_string(),
                    target: m.target.as_ref().map(|t| t.display().to_string()),
                    mode: if m.writable { "rw" } else { "ro" },
                })
                .collect(),
        }
    }

    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }
}

fn host(h: &HostRule) -> EHost {
    EHost {
        name: h.pattern.to_string(),
        tls: h.tls,
        upgrades: h.upgrades.clone(),
        rule: h
            .rules
            .iter()
            .map(|r| ERule {
                methods: r.methods.clone(),
                paths: r.paths.iter().map(|p| p.as_str().to_string()).collect(),
                query: r
                    .query
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().to_string()))
                    .collect(),
                other_query: r.other_query,
            })
            .collect(),
    }
}

fn credential(c: &Credential) -> ECredential {
    let (header, query) = match &c.placement {
        Placement::Header(h) => (Some(h.clone()), None),
        Placement::Query(q) => (None, Some(q.clone())),
    };
    let (from_env, from_file) = match &c.source {
        SecretSource::FromEnv(e) => (Some(e.clone()), None),
        SecretSource::FromFile(f) => (None, Some(f.display().to_string())),
    };
    ECredential {
        host: c.host.to_string(),
        header,
        query,
        from_env,
        from_file,
        env: c.env.clone(),
        required: c.required,
    }
}
