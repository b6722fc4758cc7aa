//! The agent presets against what each real CLI was recorded contacting (`fixtures/agents-contacted.toml`): every
//! host it needs is allowed, nothing it never contacted is, what it tries but does without stays refused, and its key
//! variable carries a placeholder.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use bottle_policy::host::HostName;
use bottle_policy::{HostVerdict, Overrides, Policy, Source, from_str};

#[derive(serde::Deserialize)]
struct Recorded {
    version: String,
    required: Vec<String>,
    login: Vec<String>,
    refused: Vec<String>,
    key_env: Vec<String>,
}

fn preset_policy(agent: &str) -> Policy {
    let text = format!("[bottle]\nagent = \"{agent}\"\n");
    from_str(
        &Source {
            text: &text,
            path: None,
        },
        &Overrides::default(),
    )
    .unwrap()
}

fn allowed(p: &Policy, host: &str) -> bool {
    matches!(
        p.network.decide_host(&HostName::parse(host).unwrap(), 443),
        HostVerdict::Allow(_)
    )
}

#[test]
fn every_preset_matches_what_its_cli_was_recorded_contacting() {
    let text = include_str!("fixtures/agents-contacted.toml");
    let recorded: BTreeMap<String, Recorded> = toml::from_str(text).unwrap();
    assert_eq!(
        recorded.keys().collect::<Vec<_>>(),
        ["aider", "claude", "codex", "gemini"]
    );
    for (agent, r) in &recorded {
        let p = preset_policy(agent);
        let what = format!("{agent} {}", r.version);
        for host in r.required.iter().chain(&r.login) {
            assert!(
                allowed(&p, host),
                "{what}: needs {host}, which its preset does not allow"
            );
        }
        for host in &r.refused {
            assert!(
                !allowed(&p, host),
                "{what}: {host} is decided refused, yet its preset allows it"
            );
        }
        for h in &p.network.hosts {
            let name = h.pattern.to_string();
            assert!(
                r.required.contains(&name) || r.login.contains(&name),
                "{what}: its preset allows {name}, which the CLI was never recorded needing"
            );
        }
        for var in &r.key_env {
            assert!(
                p.credentials.iter().any(|c| &c.env == var),
                "{what}: reads its key from {var}, which carries no placeholder"
            );
        }
    }
}

#[test]
fn presets_carry_what_their_cli_needs_in_a_bottle() {
    let codex = preset_policy("codex");
    let gemini = preset_policy("gemini");
    assert_eq!(gemini.bottle.env["GEMINI_CLI_TRUST_WORKSPACE"], "true");
    assert!(codex.credentials.iter().any(|c| c.env == "OPENAI_API_KEY"));
    assert_eq!(
        bottle_policy::preset::preset(codex.bottle.agent).command,
        ["codex", "--sandbox", "danger-full-access"]
    );
    // A policy's own value wins over a preset's.
    let text = "[bottle]\nagent = \"gemini\"\n[bottle.env]\nGEMINI_CLI_TRUST_WORKSPACE = \"false\"\n";
    let p = from_str(&Source { text, path: None }, &Overrides::default()).unwrap();
    assert_eq!(p.bottle.env["GEMINI_CLI_TRUST_WORKSPACE"], "false");
}
