//! `exec NAME -- CMD`: run a command inside a running bottle, with the agent's hardening and environment. Namespace
//! bottles are joined here; smolmachines bottles go through the engine (`recipe_smolmachines::exec`).

use std::os::unix::process::CommandExt;

use bottle_policy::{Backend, BottleName};
use bottle_sandbox::namespace::join::EXEC_SUBCOMMAND;
use bottle_sandbox::state::{self, SPEC_FILE, StateDir, Status};

use crate::cli::ExecArgs;
use crate::exit::Unavailable;

pub fn run(args: &ExecArgs) -> anyhow::Result<u8> {
    BottleName::parse(&args.name).map_err(crate::exit::Usage)?;
    let dir = StateDir::open(&state::state_root()?, &args.name)?;
    let s = dir.read()?;
    match s.backend.parse::<Backend>() {
        Ok(Backend::Namespace) => {}
        Ok(Backend::Smolmachines) => {
            if !(s.is_live() && s.status == Status::Running) {
                return Err(state::StateError::NotRunning(s.name).into());
            }
            return crate::recipe_smolmachines::exec(&dir, &state::state_root()?, &args.command);
        }
        _ => {
            return Err(anyhow::Error::new(Unavailable {
                verb: "exec",
                reason: "this bottle's backend has no exec yet",
            })
            .context(format!("bottle `{}` uses backend `{}`", s.name, s.backend)));
        }
    }
    let (true, Some(init)) = (s.is_live(), s.init_pid) else {
        return Err(state::StateError::NotRunning(s.name).into());
    };
    // `pass_env` values are not on disk (the spec lists their names): the command gets the current values of the
    // user running `exec`, as the agent got the launcher's.
    let passed: Vec<(String, String)> = std::fs::read(dir.file(SPEC_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["pass_env"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|k| k.as_str())
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    // Replace this process: the command's exit code becomes ours, and its stdio is the terminal's.
    // SECURITY: no other host environment crosses into the bottle; the command gets the bottle's from the spec.
    let err = std::process::Command::new("/proc/self/exe")
        .env_clear()
        .envs(passed)
        .arg(EXEC_SUBCOMMAND)
        .arg(dir.file(SPEC_FILE))
        .arg(init.to_string())
        .arg(s.supervisor_pid.to_string())
        .arg("--")
        .args(&args.command)
        .exec();
    Err(err).map_err(|e| anyhow::anyhow!("cannot re-execute bot-bottle: {e}"))
}
