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
const GEMINI_KEY: PresetCredential = PresetCredential {
    host: "generativelanguage.googleapis.com",
    header: "x-goog-api-key",
    from_env: "GEMINI_API_KEY",
};

pub fn preset(agent: Agent) -> Preset {
    match agent {
        Agent::Claude => Preset {
            hosts: &["api.anthropic.com", "statsig.anthropic.com", "sentry.io"],
            credentials: &[ANTHROPIC_KEY],
            command: &["claude"],
        },
        Agent::Codex => Preset {
            hosts: &["api.openai.com", "chatgpt.com", "auth.openai.com"],
            credentials: &[OPENAI_KEY],
            command: &["codex"],
        },
        Agent::Gemini => Preset {
            hosts: &[
                "generativelanguage.googleapis.com",
                "cloudcode-pa.googleapis.com",
                "oauth2.googleapis.com",
            ],
            credentials: &[GEMINI_KEY],
            command: &["gemini"],
        },
        Agent::Aider => Preset {
            hosts: &["api.openai.com", "api.anthropic.com"],
            credentials: &[OPENAI_KEY, ANTHROPIC_KEY],
            command: &["aider"],
        },
        Agent::None => Preset {
            hosts: &[],
            credentials: &[],
            command: &[],
        },
    }
}
