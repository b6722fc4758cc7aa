//! `exec NAME -- CMD`: run a command inside a running bottle, with the agent's hardening and environment, through
//! the bottle's own backend (the namespace backend joins the bottle's namespaces; smolmachines goes through the
//! engine).

use bottle_policy::{Backend as Kind, BottleName};
use bottle_sandbox::backend;
use bottle_sandbox::state::{self, StateDir};

use crate::cli::ExecArgs;

pub fn run(args: &ExecArgs) -> anyhow::Result<u8> {
    BottleName::parse(&args.name).map_err(crate::exit::Usage)?;
    let root = state::state_root()?;
    let dir = StateDir::open(&root, &args.name)?;
    let s = dir.read()?;
    let in_bottle = |e: anyhow::Error| e.context(format!("bottle `{}` uses backend `{}`", s.name, s.backend));
    let kind: Kind = s.backend;
    let backend = backend::for_kind(kind).map_err(|e| in_bottle(e.into()))?;
    let forward = |pid: u32| forward_termination(pid);
    Ok(backend.exec(&root, &dir, &s, &args.command, &forward)?)
}

/// SIGTERM/SIGHUP to `exec` go on to the backend's helper (smolvm's `machine exec`), as `run` does for the agent.
fn forward_termination(pid: u32) {
    std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            runtime.block_on(crate::recipe::forward_termination(pid));
        }
    });
}
