//! `exec NAME -- CMD` into a running smolmachines bottle: `machine exec` on the bottle's machine, in the guest
//! workspace, with the agent's environment (policy env, placeholders, proxy and CA settings, `pass_env` values).
//! That environment is what the run step recorded in `agent.json` (0600), never the caller's, except the values of
//! the `pass_env` variables it names: those are never written to disk, and come from the caller's environment.
//!
//! Trusts the state dir (the user's own, 0700) and the version-verified engine; nothing here widens egress: the
//! machine's row was verified at launch and the guest's only way out is still the interceptor.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use bottle_sandbox::engine::{self, Engine};
use bottle_sandbox::preflight::RealHost;
use bottle_sandbox::smolmachines::{MachineName, Timeouts};
use bottle_sandbox::state::StateDir;
use serde::{Deserialize, Serialize};

use super::guest::{self, AgentEnv, AgentStdio};
use super::{GUEST_WORKSPACE, StepError, smolvm_for};

/// The agent's machine and environment, written by the run step before the bottle reads as running.
pub const AGENT_FILE: &str = "agent.json";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRecord {
    pub machine: String,
    /// Passed as `-e` (policy values, placeholders, proxy settings: nothing secret).
    pub env: BTreeMap<String, String>,
    /// The names of `pass_env` variables. SECURITY: not their values, which a killed launcher would leave on disk;
    /// `exec` passes its caller's current values (with `--secret-env`, never in an argv).
    pub passed: Vec<String>,
}

impl AgentRecord {
    pub fn new(machine: &MachineName, env: &AgentEnv) -> Self {
        Self {
            machine: machine.as_str().to_owned(),
            env: env.plain.clone(),
            passed: env.passed.iter().map(|(k, _)| k.clone()).collect(),
        }
    }

    pub fn write(&self, dir: &StateDir) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(self).context("cannot encode the agent record")?;
        Ok(dir.write_file(AGENT_FILE, &bytes)?)
    }

    fn read(dir: &StateDir) -> anyhow::Result<Self> {
        let path = dir.file(AGENT_FILE);
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "cannot read {}: the bottle is not running (or was started by an older bot-bottle)",
                path.display()
            )
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", path.display()))
    }
}

/// Runs `command` in the bottle's machine; returns its exit code.
pub fn exec(dir: &StateDir, root: &Path, command: &[String]) -> anyhow::Result<u8> {
    let engine = engine::discover_verified(&RealHost).map_err(StepError::Engine)?;
    exec_with(dir, root, &engine, Timeouts::default(), command)
}

pub(super) fn exec_with(
    dir: &StateDir,
    root: &Path,
    engine: &Engine,
    timeouts: Timeouts,
    command: &[String],
) -> anyhow::Result<u8> {
    let record = AgentRecord::read(dir)?;
    let machine = MachineName::parse(&record.machine)
        .map_err(|e| anyhow::anyhow!("{} names no valid machine: {e}", dir.file(AGENT_FILE).display()))?;
    let smolvm = smolvm_for(engine, root, timeouts)?;
    let env = AgentEnv {
        plain: record.env,
        passed: record
            .passed
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
            .collect(),
    };
    // smolvm forwards stdin only with a terminal (`-i -t`); otherwise the command's output streams.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let stdio = if terminal {
        AgentStdio::Terminal
    } else {
        AgentStdio::Inherit
    };
    let (args, host_env) = guest::agent_args(&machine, GUEST_WORKSPACE, terminal, &env, command);
    guest::run_agent(&smolvm, &args, &host_env, stdio, forward_termination)
        .with_context(|| format!("exec in machine `{machine}` failed"))
}

/// SIGTERM/SIGHUP to `exec` go on to the engine's `machine exec`, as `run` does for the agent.
fn forward_termination(pid: u32) {
    std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            runtime.block_on(crate::recipe::forward_termination(pid));
        }
    });
}
