//! `exec NAME -- CMD` into a running smolmachines bottle: `machine exec` on the bottle's machine, in the guest
//! workspace, with the agent's environment (policy env, placeholders, proxy and CA settings, `pass_env` values).
//! That environment is what the run step recorded in `agent.json` (0600), never the caller's, except the values of
//! the `pass_env` variables it names: those are never written to disk, and come from the caller's environment.
//!
//! Trusts the state dir (the user's own, 0700) and the version-verified engine; nothing here widens egress: the
//! machine's row was verified at launch and the guest's only way out is still the interceptor.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::guest::{self, AgentEnv, AgentStdio};
use super::{GUEST_WORKSPACE, StepError, smolvm_for};
use crate::engine::Engine;
use crate::smolmachines::{MachineName, Timeouts};
use crate::state::StateDir;

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

    pub fn write(&self, dir: &StateDir) -> Result<(), StepError> {
        let bytes = serde_json::to_vec(self).map_err(|e| StepError::Record {
            path: dir.file(AGENT_FILE),
            reason: e.to_string(),
        })?;
        dir.create_file(AGENT_FILE, &bytes)
            .map_err(|source| StepError::State { step: "init", source })
    }

    fn read(dir: &StateDir) -> Result<Self, StepError> {
        let path = dir.file(AGENT_FILE);
        let refuse = |reason: String| StepError::Record {
            path: path.clone(),
            reason,
        };
        let bytes = std::fs::read(&path).map_err(|e| refuse(e.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|e| refuse(e.to_string()))
    }
}

/// Runs `command` in the bottle's machine with the agent's environment; returns its exit code.
pub fn exec_with(
    dir: &StateDir,
    root: &Path,
    engine: &Engine,
    timeouts: Timeouts,
    command: &[String],
    forward_termination: &dyn Fn(u32),
) -> Result<u8, StepError> {
    let record = AgentRecord::read(dir)?;
    let machine = MachineName::parse(&record.machine).map_err(|e| StepError::Record {
        path: dir.file(AGENT_FILE),
        reason: format!("it names no valid machine: {e}"),
    })?;
    let smolvm = smolvm_for(engine, root, timeouts)?;
    let env = AgentEnv {
        plain: record.env,
        passed: record
            .passed
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
            .collect(),
    };
    // smolvm forwards stdin only with a terminal (`-i -t`); otherwise the command's output streams. A terminal is
    // asked for only when both stdin and stdout are one, as `run` does.
    let terminal =
        std::io::IsTerminal::is_terminal(&std::io::stdin()) && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let stdio = if terminal {
        AgentStdio::Terminal
    } else {
        AgentStdio::Inherit
    };
    let (args, host_env) = guest::agent_args(&machine, GUEST_WORKSPACE, terminal, &env, command);
    guest::run_agent(&smolvm, &args, &host_env, stdio, forward_termination).map_err(|source| StepError::Agent {
        machine: machine.clone(),
        source: Box::new(source),
    })
}
