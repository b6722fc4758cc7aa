//! Agent presets: the hosts each agent needs and where its API key goes. A preset only adds; the policy file can
//! replace any preset host entry by declaring the same pattern, and deny entries still win.

use crate::model::Agent;

/// One credential a preset configures. Preset credentials are optional: an agent may log in another way.
pub struct PresetCredential {
    pub host: &'static str,
    pub header: &'static str,
    pub from_env: &'static str,
}

pub struct Preset {
    pub hosts: &'static [&'static str],
    pub credentials: &'static [PresetCredential],
    pub command: &'static [&'static str],
    /// Variables the agent needs in a bottle (a policy's `bottle.env` or `-e` overrides them).
    pub env: &'static [(&'static str, &'static str)],
}

const ANTHROPIC_KEY: PresetCredential = PresetCredential {
    host: "api.anthropic.com",
    header: "x-api-key",
    from_env: "ANTHROPIC_API_KEY",
};
const OPENAI_KEY: PresetCredential = PresetCredential {
    host: "api.openai.com",
    header: "authorization",
    from_env: "OPENAI_API_KEY",
};
/// Codex 0.171 reads `CODEX_API_KEY`, not `OPENAI_API_KEY` (research/agents.md): both are bound, each optional.
const CODEX_KEY: PresetCredential = PresetCredential {
    host: "api.openai.com",
    header: "authorization",
    from_env: "CODEX_API_KEY",
};
const GEMINI_KEY: PresetCredential = PresetCredential {
    host: "generativelanguage.googleapis.com",
    header: "x-goog-api-key",
    from_env: "GEMINI_API_KEY",
};

pub fn preset(agent: Agent) -> Preset {
    match agent {
        // Claude Code 2.1: the API, and platform.claude.com (the TUI's first call, and the subscription login);
        // statsig/sentry were never contacted. Updater and changelog hosts are left out: refused at once, harmless,
        // and a bottle's /usr is read-only anyway.
        Agent::Claude => Preset {
            hosts: &["api.anthropic.com", "platform.claude.com"],
            credentials: &[ANTHROPIC_KEY],
            command: &["claude"],
            env: &[],
        },
        // Codex 0.171: the API, chatgpt.com (its models and plugins lists) and auth.openai.com (sign-in). Codex also
        // sends its API key to chatgpt.com; that stays refused (the key is bound to api.openai.com only, and a key
        // sent to another host is a leak). The bottle is the sandbox: Codex's own (bwrap) cannot start inside.
        Agent::Codex => Preset {
            hosts: &["api.openai.com", "chatgpt.com", "auth.openai.com"],
            credentials: &[OPENAI_KEY, CODEX_KEY],
            command: &["codex", "--sandbox", "danger-full-access"],
            env: &[],
        },
        Agent::Gemini => Preset {
            hosts: &[
                "generativelanguage.googleapis.com",
                "cloudcode-pa.googleapis.com",
                "oauth2.googleapis.com",
            ],
            credentials: &[GEMINI_KEY],
            command: &["gemini"],
            // The workspace is the folder the user chose: headless runs otherwise stop (exit 55) on folder trust.
            env: &[("GEMINI_CLI_TRUST_WORKSPACE", "true")],
        },
        Agent::Aider => Preset {
            hosts: &["api.openai.com", "api.anthropic.com"],
            credentials: &[OPENAI_KEY, ANTHROPIC_KEY],
            command: &["aider"],
            // litellm fetches a model price map from raw.githubusercontent.com at import; its bundled one is used.
            env: &[("LITELLM_LOCAL_MODEL_COST_MAP", "True")],
        },
        Agent::None => Preset {
            hosts: &[],
            credentials: &[],
            command: &[],
            env: &[],
        },
    }
}
