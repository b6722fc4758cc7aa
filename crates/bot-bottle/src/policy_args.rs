//! The policy flags shared by `run`, `proxy` and `policy check`, and where the policy comes from.

use std::path::{Path, PathBuf};

use anyhow::Context;
use bottle_policy::{Overrides, Policy};
use clap::Args;

/// The file `run`, `proxy` and `policy check` read when no `--policy` is given.
pub const DEFAULT_POLICY_FILE: &str = "bottle.toml";

#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// Policy file (default: ./bottle.toml if present, else the agent preset alone).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Agent preset: claude, codex, gemini, aider, none.
    #[arg(long, value_name = "AGENT")]
    pub agent: Option<String>,
    /// Allow a host: NAME, NAME:PORT, NAME:*, or *.SUFFIX (never the apex). Repeatable.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub allow: Vec<String>,
    /// Deny a host; deny wins over allow. Repeatable.
    #[arg(long, value_name = "HOST")]
    pub deny: Vec<String>,
    /// Let allowed names resolve into this private range (it never admits an address itself: allow IP:PORT for
    /// that). Repeatable.
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    pub allow_cidr: Vec<String>,
    /// Resolve NAME to ADDR[,ADDR…] instead of asking DNS (like curl --resolve). Repeatable.
    #[arg(long, value_name = "NAME=ADDR")]
    pub resolve: Vec<String>,
    /// Backend: namespace (default), container, smolmachines.
    #[arg(long, value_name = "BACKEND")]
    pub backend: Option<String>,
    /// Bottle name.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Set an environment variable in the bottle. Repeatable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The agent's home: a directory kept between runs, or `tmpfs` for a fresh one every run (default: the agent
    /// preset's own home under bot-bottle's state directory, kept between runs).
    #[arg(long, value_name = "DIR|tmpfs")]
    pub home: Option<String>,
    /// Show a host path in the bottle, read-only unless `:rw` (e.g. `--mount ~/.cargo`); a path under your home
    /// appears under the bottle's home. Credential stores, sockets and bot-bottle's state are refused. Repeatable.
    #[arg(long = "mount", value_name = "SRC[:DST][:ro|rw]")]
    pub mounts: Vec<String>,
    /// Hold a request for a host the policy does not cover and ask: `bot-bottle approvals` (or the policy's
    /// `[network.ask] reviewer`) answers allow-once, allow or deny (`[network] unknown = "ask"`).
    #[arg(long)]
    pub ask: bool,
    /// The container backend's image: a local one, one the engine pulls when missing, or a `docker save` archive (a
    /// path: `./FILE.tar`, `/…`).
    #[arg(long, value_name = "NAME")]
    pub image: Option<String>,
    /// The container engine's runtime the bottle runs under: `runsc` (gVisor), as registered with the engine.
    #[arg(long, value_name = "NAME")]
    pub runtime: Option<String>,
}

impl PolicyArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            agent: self.agent.clone(),
            backend: self.backend.clone(),
            name: self.name.clone(),
            allow: self.allow.clone(),
            deny: self.deny.clone(),
            allow_cidr: self.allow_cidr.clone(),
            resolve: self.resolve.clone(),
            env: self.env.clone(),
            home: self.home.clone(),
            mounts: self.mounts.clone(),
            ask: self.ask,
            image: self.image.clone(),
            runtime: self.runtime.clone(),
        }
    }

    /// The policy file in force: `explicit` (a positional FILE), `--policy`, else ./bottle.toml if it exists.
    pub fn file(&self, explicit: Option<&Path>) -> Option<PathBuf> {
        explicit
            .map(Path::to_path_buf)
            .or_else(|| self.policy.clone())
            .or_else(|| {
                Path::new(DEFAULT_POLICY_FILE)
                    .is_file()
                    .then(|| PathBuf::from(DEFAULT_POLICY_FILE))
            })
    }

    /// Loads and validates the policy; errors carry file:line:column or the offending flag.
    pub fn load(&self, explicit: Option<&Path>) -> anyhow::Result<(Policy, Option<PathBuf>)> {
        let overrides = self.overrides();
        let file = self.file(explicit);
        let policy = match &file {
            Some(p) if p == Path::new("-") => {
                let mut buf = Vec::new();
                use std::io::Read;
                std::io::stdin()
                    .take(bottle_policy::MAX_POLICY_BYTES as u64 + 1)
                    .read_to_end(&mut buf)
                    .context("cannot read the policy from stdin")?;
                bottle_policy::from_bytes(&buf, Some(Path::new("<stdin>")), &overrides)
            }
            Some(p) => bottle_policy::load_file(p, &overrides),
            None => bottle_policy::from_flags(&overrides),
        }
        .context("invalid policy")?;
        Ok((policy, file))
    }
}

/// A bad `--upstream-ca` is a bad flag (exit 121), refused before anything starts.
pub fn check_upstream_ca(paths: &[std::path::PathBuf]) -> Result<(), bottle_policy::PolicyError> {
    bottle_proxy::check_upstream_ca(paths).map_err(|(path, e)| {
        let mut text = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        bottle_policy::PolicyError::at_flag("--upstream-ca", &path.display().to_string(), text)
    })
}
