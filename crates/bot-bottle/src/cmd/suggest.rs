//! `policy suggest NAME`: a policy fragment drafted from what a bottle's proxy refused, that would allow exactly
//! that and no more: hosts the allow list lacked as `host:port` entries, requests a host's rules refused as rules
//! naming their method and exact path. Nothing is generalised beyond the evidence, and refusals that must stay
//! refusals (an explicit deny, a private address, a leaked secret or placeholder, a malformed request) are listed as
//! comments, never as lines. The draft is checked with the policy loader before it is printed.
//!
//! Trusts nothing in the audit log: hosts, methods and paths there came from the agent. Each must be a plain
//! hostname (or IPv4 address), a method token and a path without glob characters, or it is left out; strings are
//! quoted by a JSON encoder, whose escapes TOML reads the same way.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context;
use bottle_policy::{BottleName, Overrides, Source};
use bottle_sandbox::state::{self, StateDir};
use serde::Serialize;

use crate::cli::PolicySuggestArgs;
use crate::output::Output;

/// Refusals of one kind that no suggestion may undo, with why.
const NEVER: [(&str, &str); 9] = [
    ("deny-list", "the policy denies it explicitly"),
    (
        "private-address",
        "it resolves to a private address (allow_cidr admits names there, never addresses)",
    ),
    ("secret-leak", "the request carried a credential's real value"),
    (
        "placeholder-leak",
        "the request carried a credential's placeholder to the wrong host",
    ),
    ("framing", "the request was malformed"),
    ("ambiguous-request", "the request could be read two ways"),
    ("host-mismatch", "the TLS name and the CONNECT target differed"),
    ("bad-path", "the path was malformed"),
    (
        "upgrade",
        "a protocol switch (opt in with `upgrades` on the host if you mean it)",
    ),
];

#[derive(Debug, Default, Serialize)]
pub struct Suggestion {
    /// `host:port` → how many times it was refused.
    pub allow: BTreeMap<String, usize>,
    /// `host:port` → method → path → count.
    pub rules: BTreeMap<String, BTreeMap<String, BTreeMap<String, usize>>>,
    /// What was refused and is not suggested, with why and how often.
    pub not_suggested: Vec<Skipped>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Skipped {
    pub what: String,
    pub why: String,
    pub count: usize,
}

pub fn run(args: &PolicySuggestArgs, out: &Output) -> anyhow::Result<u8> {
    BottleName::parse(&args.name).map_err(crate::exit::Usage)?;
    let dir = StateDir::open(&state::state_root()?, &args.name)?;
    let suggestion = suggest(crate::refusals::agent_lines(&dir));
    let toml = render(&args.name, &suggestion);
    // The draft must load as a policy: a line the loader refuses would be a suggestion nobody could use.
    bottle_policy::from_str(
        &Source {
            text: &toml,
            path: None,
        },
        &Overrides::default(),
    )
    .context("the drafted policy does not load; please report this")?;
    out.emit(&suggestion, || toml.clone())?;
    Ok(0)
}

/// Groups the refusals in audit lines into what would allow them.
pub fn suggest(lines: impl Iterator<Item = serde_json::Value>) -> Suggestion {
    let mut s = Suggestion::default();
    let mut skipped: BTreeMap<(String, String), usize> = BTreeMap::new();
    for v in lines {
        if v["decision"] != "deny" || v["event"] == "unrecorded" {
            continue;
        }
        let host = v["host"].as_str().unwrap_or_default();
        let port = v["port"].as_u64().unwrap_or(0);
        let rule = v["rule"].as_str().unwrap_or_default();
        let what = format!("{host}:{port}");
        let mut skip = |why: &str| *skipped.entry((what.clone(), why.to_string())).or_default() += 1;
        if let Some((_, why)) = NEVER.iter().find(|(code, _)| *code == rule) {
            skip(why);
            continue;
        }
        if !plain_host(host) || port == 0 {
            skip("the host is not a plain name or IPv4 address");
            continue;
        }
        match rule {
            "not-allowed" | "ip-literal" => *s.allow.entry(what.clone()).or_default() += 1,
            "request-rule" => {
                let method = v["method"].as_str().unwrap_or_default();
                let path = v["path"].as_str().unwrap_or_default();
                let path = path.split_once('?').map_or(path, |(p, _)| p);
                if !method_token(method) || !plain_path(path) {
                    skip("its method or path cannot be written as an exact rule");
                    continue;
                }
                *s.rules
                    .entry(what.clone())
                    .or_default()
                    .entry(method.to_string())
                    .or_default()
                    .entry(path.to_string())
                    .or_default() += 1;
            }
            "query-rule" => skip("a query parameter was refused (write the `query` of the host's rule by hand)"),
            other => skip(&format!("refused as `{other}`, which no policy line changes")),
        }
    }
    s.not_suggested = skipped
        .into_iter()
        .map(|((what, why), count)| Skipped { what, why, count })
        .collect();
    s
}

/// The fragment, with counts as comments.
pub fn render(name: &str, s: &Suggestion) -> String {
    let q = |text: &str| serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into());
    let mut t = format!(
        "# Drafted by `bot-bottle policy suggest {name}` from what its proxy refused: these lines would allow exactly\n\
         # that. Review each before adding it to your policy; nothing here has been allowed.\n"
    );
    if !s.allow.is_empty() {
        t.push_str("[network]\nallow = [\n");
        for (entry, count) in &s.allow {
            let _ = writeln!(t, "  {},  # refused {count}×", q(entry));
        }
        t.push_str("]\n");
    }
    for (host, methods) in &s.rules {
        let _ = write!(t, "\n[[host]]\nname = {}\n", q(host));
        for (method, paths) in methods {
            let total: usize = paths.values().sum();
            let _ = writeln!(t, "[[host.rule]]  # refused {total}×");
            let _ = writeln!(t, "methods = [{}]", q(method));
            let list: Vec<String> = paths.keys().map(|p| q(p)).collect();
            let _ = writeln!(t, "paths = [{}]", list.join(", "));
        }
    }
    if !s.not_suggested.is_empty() {
        t.push_str("\n# Refused and not suggested:\n");
        for k in &s.not_suggested {
            // The host came from the agent: shown only as far as it is printable, never as a line TOML would read.
            let what: String = k.what.chars().filter(|c| !c.is_control()).take(120).collect();
            let _ = writeln!(t, "#   {what} ({}×): {}", k.count, k.why);
        }
    }
    if s.allow.is_empty() && s.rules.is_empty() && s.not_suggested.is_empty() {
        t.push_str("# Nothing was refused.\n");
    }
    t
}

/// A hostname of letters, digits, `-` and `.` (or an IPv4 address): nothing a pattern would read as a wildcard.
fn plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !host.starts_with(['.', '-'])
        && !host.ends_with(['.', '-'])
}

fn method_token(m: &str) -> bool {
    !m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_uppercase())
}

/// An absolute path with no character the rule language reads as a glob or that TOML would need escaped oddly.
fn plain_path(p: &str) -> bool {
    p.starts_with('/') && p.len() <= 2048 && p.bytes().all(|b| b.is_ascii_graphic() && b != b'*' && b != b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deny(host: &str, port: u16, rule: &str, method: &str, path: &str) -> serde_json::Value {
        json!({"event": "request", "host": host, "port": port, "rule": rule, "decision": "deny",
               "method": method, "path": path})
    }

    #[test]
    fn refusals_become_exact_lines_and_what_must_stay_refused_stays_a_comment() {
        let lines = vec![
            deny("api.example.com", 443, "not-allowed", "CONNECT", ""),
            deny("api.example.com", 443, "not-allowed", "CONNECT", ""),
            deny("github.com", 443, "request-rule", "POST", "/o/r/git-receive-pack?x=1"),
            deny("github.com", 443, "request-rule", "GET", "/o/r/**"),
            deny("internal.test", 443, "private-address", "CONNECT", ""),
            deny("evil\"]\n[bottle]", 443, "not-allowed", "CONNECT", ""),
            deny("*.example.com", 443, "not-allowed", "CONNECT", ""),
            json!({"event": "request", "host": "ok.test", "port": 443, "decision": "allow"}),
        ];
        let s = suggest(lines.into_iter());
        assert_eq!(s.allow, BTreeMap::from([("api.example.com:443".to_string(), 2)]));
        assert_eq!(
            s.rules["github.com:443"],
            BTreeMap::from([(
                "POST".to_string(),
                BTreeMap::from([("/o/r/git-receive-pack".to_string(), 1)])
            )])
        );
        let why: Vec<&str> = s.not_suggested.iter().map(|k| k.what.as_str()).collect();
        assert!(
            why.contains(&"internal.test:443") && why.contains(&"github.com:443"),
            "{why:?}"
        );
        let toml = render("b1", &s);
        // It loads, and an injected host never became a line.
        bottle_policy::from_str(
            &Source {
                text: &toml,
                path: None,
            },
            &Overrides::default(),
        )
        .unwrap();
        assert!(!toml.lines().any(|l| l.starts_with("[bottle]")), "{toml}");
        assert!(toml.contains("\"api.example.com:443\""), "{toml}");
    }
}
