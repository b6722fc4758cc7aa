//! The launch recipe, one named step after another, the same for every backend: load policy → preflight → lease →
//! state → begin (the backend's pre-thread work) → mint CA and start the bundle (proxy) → attach and discover URLs →
//! start (plan, launch, init, wait ready) → run → teardown. The recipe never asks which backend it drives
//! (`bottle_sandbox::backend`); each step's error says which step failed, and whatever started is torn down in
//! reverse: the backend's bottle, then the proxy, then the lease.

#[cfg(test)]
mod smolmachines_tests;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use bottle_policy::{BottleName, Policy, preset::preset};
use bottle_proxy::{Bundle, Interceptor, Listen, ProxyConfig};
use bottle_sandbox::backend::{
    self, AgentIo, Backend, BackendError, BottleSpec, Exit, FailureClass, Launch, MountSpec, Relay, Serve, Services,
    Urls,
};
use bottle_sandbox::lease::{Lease, Registry};
use bottle_sandbox::preflight::{self, RealHost};
use bottle_sandbox::state::{self, BottleState, StateDir, Status};

use crate::credential_sources::{self, Shown};
use crate::exit::PreflightFailed;

/// Logs each named step with the time since launch began (`-vv` or BOT_BOTTLE_LOG=debug).
pub(crate) struct Steps(std::time::Instant);

impl Steps {
    fn done(&self, step: &str) {
        tracing::debug!(
            step,
            elapsed_us = self.0.elapsed().as_micros() as u64,
            "launch step done"
        );
    }
}

pub struct Request {
    pub policy: Policy,
    pub command: Vec<String>,
    pub upstream_ca: Vec<PathBuf>,
    pub detached: bool,
    pub remove: bool,
}

/// A bottle being launched: its state directory, recorded state and lease.
struct Launching {
    dir: StateDir,
    state: BottleState,
    lease: Lease,
}

impl Launching {
    fn set(&mut self, f: impl FnOnce(&mut BottleState)) -> anyhow::Result<()> {
        f(&mut self.state);
        self.dir.write(&self.state).context("cannot record the bottle's state")
    }
}

/// Runs the agent to completion in a new bottle of the policy's backend; returns how it ended.
pub fn run(req: Request) -> anyhow::Result<Exit> {
    let backend = backend::for_kind(req.policy.bottle.backend)?;
    let root = state::state_root()?;
    launch(req, backend.as_ref(), &root)
}

/// The recipe, for `backend` and bot-bottle's state `root`.
pub(crate) fn launch(mut req: Request, backend: &dyn Backend, root: &Path) -> anyhow::Result<Exit> {
    let steps = Steps(std::time::Instant::now());
    // step: preflight (what the backend refuses to enforce, the workspace, the home, the credential files, the host)
    backend.check(&req.policy)?;
    let argv = command(&req)?;
    let pool = lease_pool()?;
    let mut launch = backend.prepare(root)?;
    let workspace = workspace(&req.policy, root)?;
    launch.check_workspace(&workspace)?;
    let home_source = crate::cmd::home::plan(&req.policy, root)?;
    let mut shown = vec![Shown::new(&workspace, "the workspace")];
    if let Some(home) = &home_source {
        shown.push(Shown::new(home, "the agent's home"));
    }
    let mounts = crate::mounts::resolve(&req.policy, root)?;
    shown.extend(mounts.iter().map(|m| Shown::new(&m.source, "a mounted host path")));
    let visible = backend.visible_host_paths();
    shown.extend(visible.iter().map(|p| Shown::new(p, "the read-only host path")));
    credential_sources::resolve(&mut req.policy, &shown)?;
    if backend.kind() != backend::Kind::Container {
        crate::host_sockets::report(&workspace, &req.policy.bottle.share_sockets);
    }
    let home_source = match home_source {
        Some(dir) => Some(crate::cmd::home::prepare(&dir, root)?),
        None => None,
    };
    steps.done("preflight");

    // step: lease
    let name = match &req.policy.bottle.name {
        Some(n) => n.clone(),
        None => generated_name()?,
    };
    let lease = Registry::new(root)
        .with_pool(pool)
        .allocate(&name, std::process::id())?;
    let addr = lease.addr();
    steps.done("lease");

    // step: state dir (a failure here drops, and so releases, the lease)
    let kind = backend.kind();
    let mut state = state::starting(&name, kind, addr, req.detached)?;
    state.remove = req.remove;
    let dir = StateDir::create(root, name.as_str())?;
    let mut bottle = Launching { state, dir, lease };
    bottle.set(|_| {})?;
    steps.done("state dir");

    let mut bundle = None;
    let spec = (name, argv, workspace, home_source, mounts);
    let result = launch_and_run(&mut bottle, launch.as_mut(), &mut bundle, &req, spec, &steps);
    // step: teardown, in reverse: the bottle, its proxy, its lease
    let mut left = launch.shutdown().err().map(|e| e.left).unwrap_or_default();
    drop(launch);
    if let Some(mut bundle) = bundle {
        bundle.shutdown();
    }
    let _ = std::fs::remove_file(bottle.dir.file(crate::live::CONTROL_SOCKET));
    let Launching { dir, mut state, lease } = bottle;
    if let Err(e) = lease.release() {
        left.push(format!("the address lease is left behind ({e})"));
    }
    let result = match (result, left.is_empty()) {
        (result, true) => result,
        (Ok(_), false) => Err(anyhow::Error::new(backend::TeardownError { left }).context("step teardown")),
        (Err(cause), false) => {
            Err(cause.context(format!("teardown after this failure also failed: {}", left.join("; "))))
        }
    };
    let result = result.map_err(|e| explain_failure(e, kind));
    if !req.detached
        && let Some(text) = crate::refusals::summary(&crate::refusals::read(&dir), name_of(&state), !req.remove)
    {
        eprint!("{text}");
    }
    steps.done("teardown");
    if req.remove {
        // Nothing of the bottle is kept, so there is no outcome to record: the directory goes.
        dir.remove()?;
        return result;
    }
    record_outcome(&result)(&mut state);
    dir.write(&state).context("cannot record the bottle's state")?;
    result
}

fn name_of(state: &BottleState) -> &str {
    state.name.as_str()
}

/// A sandbox failure on a host that fails the backend's preflight is a preflight failure: `doctor` has the remedy.
fn explain_failure(e: anyhow::Error, kind: backend::Kind) -> anyhow::Error {
    let sandbox = e.chain().any(|c| {
        c.downcast_ref::<BackendError>()
            .is_some_and(|b| b.class() == FailureClass::Sandbox)
    });
    if sandbox && !preflight::report(kind, &RealHost).usable() {
        return anyhow::Error::new(PreflightFailed { backend: kind }).context(format!("{e:#}"));
    }
    e
}

fn launch_and_run(
    bottle: &mut Launching,
    launch: &mut dyn Launch,
    bundle: &mut Option<Bundle>,
    req: &Request,
    (name, argv, workspace, home, mounts): (BottleName, Vec<String>, PathBuf, Option<PathBuf>, Vec<MountSpec>),
    steps: &Steps,
) -> anyhow::Result<Exit> {
    let policy = &req.policy;
    // An interactive run: both ends are the user's terminal (output piped elsewhere is not interactive).
    let terminal = !req.detached && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let io = if req.detached {
        AgentIo::Log(bottle.dir.open_agent_log().context("cannot open the agent log")?)
    } else if terminal {
        AgentIo::Terminal
    } else {
        AgentIo::Inherit
    };
    // SECURITY: `pass_env` values travel in memory only; every file on disk names them at most.
    let pass_env: BTreeMap<String, String> = policy
        .bottle
        .pass_env
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect();
    // A kept home keeps its placeholders too (see `placeholder_key::placeholder_seed`); a fresh home gets random ones.
    let placeholder_seed = match (&home, bottle.dir.path.parent()) {
        (Some(home), Some(root)) => Some(crate::cmd::placeholder_key::placeholder_seed(root, home)?),
        _ => None,
    };
    let share_sockets = crate::host_sockets::shared(&policy.bottle.share_sockets, &workspace);
    let spec = BottleSpec {
        name,
        addr: bottle.lease.addr(),
        argv,
        share_sockets,
        workspace,
        home,
        env: policy.bottle.env.clone(),
        pass_env,
        image: policy.bottle.image.as_deref().map(|i| image_archive(i, policy)),
        runtime: policy.bottle.runtime.clone(),
        cpus: policy.bottle.resources.cpus,
        memory_mib: policy.bottle.resources.memory_mib,
        pids: policy.bottle.resources.pids,
        mounts,
        io,
    };
    // step: begin (the namespace backend clones its init here: the launcher has no thread yet)
    launch.begin(spec, &bottle.dir)?;
    bottle.dir.create_file(
        state::POLICY_FILE,
        bottle_policy::Effective::of(policy)
            .to_toml()
            .context("cannot render the policy")?
            .as_bytes(),
    )?;
    steps.done("begin");

    // step: mint CA + start bundle, attach the bottle's listener
    let mut config = ProxyConfig::new(policy.clone(), bottle.dir.path.clone());
    config.bottle = bottle.state.name.to_string();
    config.placeholder_seed = placeholder_seed;
    config.upstream_ca = req.upstream_ca.clone();
    let asks = crate::asks::Asks::new(bottle.state.name.as_str(), bottle.dir.path.clone(), policy);
    config.reviewer = Some(Arc::new(crate::asks::Reviewing(Arc::clone(&asks))));
    let bundle = bundle.insert(Bundle::start(config)?);
    let attachment = launch.attach()?;
    bundle.serve(attachment.listener, listen(attachment.serve));
    let published = serde_json::to_vec(&attachment.urls).context("cannot encode the bundle's URLs")?;
    bottle.dir.create_file(state::URLS_FILE, &published)?;
    steps.done("bundle");

    // step: discover URLs (from the state dir, as `ls`, `logs` and `exec` will)
    let urls: Urls = serde_json::from_slice(
        &std::fs::read(bottle.dir.file(state::URLS_FILE)).context("cannot read back the bundle's URLs")?,
    )
    .context("the bundle's urls.json is damaged")?;
    steps.done("discover");

    // step: start (plan, launch, init, wait until the bottle proves it is ready)
    let services = Supervisor {
        bundle,
        asks: (policy.network.unknown == bottle_policy::Unknown::Ask)
            .then(|| (Arc::clone(&asks), bottle.state.name.to_string())),
    };
    let started = launch.start(&services, &urls)?;
    // Live changes from the bottle's owner (`bot-bottle allow|deny NAME ...`), from the moment it runs.
    if let Some(handle) = bundle.handle() {
        let live = Arc::new(crate::live::Live::new(
            bundle.proxy().clone(),
            policy.clone(),
            &bottle.dir,
        ));
        asks.set_live(Arc::clone(&live));
        crate::live::serve(&handle, &bottle.dir, live, asks).context("cannot open the bottle's control socket")?;
    }
    bottle.set(|s| {
        s.status = Status::Running;
        s.init_pid = started.init_pid;
        s.proxy_url = Some(urls.proxy.clone());
    })?;
    steps.done("ready");

    // step: run
    let exit = launch.wait(&services)?;
    steps.done("run");
    if let Some(line) = &exit.start_failure
        && req.detached
    {
        // A detached run's agent output goes to its log; the supervisor's stderr reaches `run -d` while it waits.
        // Never a panic on a closed stderr (the waiting `run -d` may be gone).
        let _ = writeln!(std::io::stderr(), "{line}");
    }
    Ok(exit)
}

fn listen(serve: Serve) -> Listen {
    match serve {
        Serve::Proxy => Listen::Proxy,
        Serve::Interceptor { token, guest } => Listen::Interceptor(Interceptor::new(token, guest)),
        Serve::Refuse => Listen::Refuse,
    }
}

/// The launcher's side of a running bottle, as its backend sees it: the proxy bundle, signals, the terminal.
struct Supervisor<'a> {
    bundle: &'a Bundle,
    /// Ask mode's questions, put to the user at an interactive run's terminal.
    asks: Option<(Arc<crate::asks::Asks>, String)>,
}

impl Services for Supervisor<'_> {
    fn ca_pem(&self) -> &str {
        self.bundle.ca_cert_pem()
    }

    fn placeholders(&self) -> BTreeMap<String, String> {
        self.bundle.placeholders()
    }

    fn serve(&self, listener: std::net::TcpListener, how: Serve) {
        self.bundle.serve(listener, listen(how));
    }

    fn forward_termination(&self, pid: u32) {
        if let Some(handle) = self.bundle.handle() {
            handle.spawn(forward_termination(pid));
        }
    }

    fn relay_terminal(&self, master: std::os::fd::OwnedFd) -> std::io::Result<Box<dyn Relay>> {
        let handle = self
            .bundle
            .handle()
            .ok_or_else(|| std::io::Error::other("the proxy runtime is gone"))?;
        let asks = self.asks.as_ref().map(|(a, name)| (Arc::clone(a), name.as_str()));
        Ok(Box::new(crate::terminal::Relay::start(master, &handle, asks)?))
    }
}

/// SIGTERM/SIGHUP to the launcher go to `pid` (the namespace init, or smolmachines' `machine exec`), which passes
/// them on to the agent; SIGINT is the terminal's, already delivered to the agent's process group, so the launcher
/// only stays alive to tear down afterwards.
pub(crate) async fn forward_termination(init_pid: u32) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = hup.recv() => {}
            _ = int.recv() => continue,
        }
        if let Some(pid) = rustix::process::Pid::from_raw(init_pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
}

/// How a finished launch is recorded, whatever the backend: exited with the agent's code (and why the command
/// could not start, if it could not), or failed with the whole error chain.
pub(crate) fn record_outcome(result: &anyhow::Result<Exit>) -> impl FnOnce(&mut BottleState) + use<> {
    let (status, code, error) = match result {
        Ok(exit) => (Status::Exited, Some(i32::from(exit.code)), exit.start_failure.clone()),
        Err(e) => (Status::Failed, None, Some(crate::output::message(e))),
    };
    move |s| {
        s.status = status;
        s.exit_code = code;
        s.error = error;
    }
}

pub(crate) fn command(req: &Request) -> anyhow::Result<Vec<String>> {
    if !req.command.is_empty() {
        return Ok(req.command.clone());
    }
    if let Some(c) = &req.policy.bottle.command {
        return Ok(c.clone());
    }
    let from_preset: Vec<String> = preset(req.policy.bottle.agent)
        .command
        .iter()
        .map(|s| s.to_string())
        .collect();
    if from_preset.is_empty() {
        return Err(crate::exit::Usage(
            "no command to run: give one after `--`, set bottle.command, or pick an agent with --agent".into(),
        )
        .into());
    }
    Ok(from_preset)
}

/// The workspace: the policy's (relative to the policy file), else the current directory. Never `/` or the
/// user's home itself, which would hand the agent `~/.ssh` and every other secret there.
/// The container image as the backend takes it: an archive's relative path (`./…`, `../…`) resolved as the
/// workspace's is (against the policy file's directory, or the working directory); an image reference as written.
fn image_archive(image: &str, policy: &Policy) -> String {
    if !(image.starts_with("./") || image.starts_with("../")) {
        return image.to_string();
    }
    let base = policy.bottle.base_dir.clone().or_else(|| std::env::current_dir().ok());
    base.map_or_else(|| image.to_string(), |b| b.join(image).display().to_string())
}

/// A refused workspace is a policy error (exit 121): the workspace is part of what the bottle is, and nothing has
/// started yet.
pub(crate) fn workspace(policy: &Policy, state_root: &Path) -> anyhow::Result<PathBuf> {
    let refuse = |msg: String| anyhow::Error::new(bottle_policy::PolicyError::whole_file(None, msg));
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let raw = match (&policy.bottle.workspace, &policy.bottle.base_dir) {
        (Some(w), Some(base)) => base.join(w),
        (Some(w), None) => cwd.join(w),
        (None, _) => cwd,
    };
    let path = raw
        .canonicalize()
        .map_err(|e| refuse(format!("workspace {} does not exist ({e})", raw.display())))?;
    if !path.is_dir() {
        return Err(refuse(format!("workspace {} is not a directory", path.display())));
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .and_then(|h| h.canonicalize().ok());
    if path == Path::new("/") || home.as_ref().is_some_and(|h| h.starts_with(&path)) {
        return Err(refuse(format!(
            "refusing workspace {}: it contains your home directory; run from a project directory or set bottle.workspace",
            path.display()
        )));
    }
    // SECURITY: the state root holds every bottle's CA key and audit log; a workspace over it would hand them over.
    let state_root = state_root.canonicalize().unwrap_or_else(|_| state_root.to_path_buf());
    if state_root.starts_with(&path) || path.starts_with(&state_root) {
        return Err(refuse(format!(
            "refusing workspace {}: it overlaps bot-bottle's state directory {}",
            path.display(),
            state_root.display()
        )));
    }
    Ok(path)
}

/// `BOT_BOTTLE_POOL=FIRST-LAST` narrows the last octets bottles may lease (default 2-254).
pub(crate) fn lease_pool() -> anyhow::Result<std::ops::RangeInclusive<u8>> {
    let Ok(raw) = std::env::var("BOT_BOTTLE_POOL") else {
        return Ok(bottle_sandbox::lease::DEFAULT_POOL);
    };
    let parsed = raw
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u8>().ok()?, b.trim().parse::<u8>().ok()?)));
    match parsed {
        Some((first, last)) if (2..=254).contains(&first) && (first..=254).contains(&last) => Ok(first..=last),
        _ => Err(crate::exit::Usage(format!(
            "BOT_BOTTLE_POOL={raw:?} is not valid: write FIRST-LAST with 2 <= FIRST <= LAST <= 254"
        ))
        .into()),
    }
}

pub fn generated_name() -> anyhow::Result<BottleName> {
    let mut bytes = [0u8; 3];
    rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).context("no randomness")?;
    let name = format!("bottle-{:02x}{:02x}{:02x}", bytes[0], bytes[1], bytes[2]);
    BottleName::parse(&name).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_launch_is_recorded_with_each_cause_said_once() {
        let engine = std::io::Error::other("the container engine refused: status 500");
        let err = anyhow::Error::new(engine).context("step create: the container engine refused: status 500");
        let mut s = BottleState {
            name: BottleName::parse("b1").unwrap(),
            backend: bottle_sandbox::backend::Kind::Container,
            addr: std::net::Ipv4Addr::new(127, 0, 0, 2),
            status: Status::Running,
            supervisor_pid: 1,
            supervisor_start: 1,
            init_pid: None,
            started_at: 0,
            exit_code: None,
            error: None,
            proxy_url: None,
            detached: false,
            remove: false,
        };
        record_outcome(&Err(err))(&mut s);
        assert_eq!(s.status, Status::Failed);
        assert_eq!(
            s.error.as_deref(),
            Some("step create: the container engine refused: status 500")
        );
    }
}
