//! The smolmachines launch recipe, one named step after another: preflight → lease → state dir → mint CA and start
//! the bundle (the proxy, listening as smolvm's egress interceptor on the bottle's 127.0.0.N) → discover URLs → plan →
//! `machine create` → verify/patch the engine's row → verify again → `machine start` → wait ready → init → run the
//! agent → teardown. Each step fails with its own error; whatever fails, the machine, the proxy and the lease are
//! removed (`Bottle::shutdown`, also run on drop) and the state dir records why.
//!
//! Trusts the version-verified smolvm engine to enforce the row it was given (research/smolvm.md §3.3–3.5); trusts
//! neither its database nor the guest: the row is re-read just before the start, and the guest reaches the proxy only
//! through the token-checked interceptor.

mod exec;
mod guest;
#[cfg(test)]
mod tests;

pub use exec::exec;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use bottle_policy::{Backend, BottleName};
use bottle_proxy::{Interceptor, Proxy, ProxyConfig};
use bottle_sandbox::engine::{self, Engine};
use bottle_sandbox::lease::{Lease, LeaseError, Registry};
use bottle_sandbox::preflight::{self, Host, RealHost};
use bottle_sandbox::ready::{self, WaitError};
use bottle_sandbox::smolmachines::plan::{BOTTLE_LABEL, GUEST_GATEWAY, MACHINE_PREFIX};
use bottle_sandbox::smolmachines::{
    CliError, DbError, ExpectedEgress, InterceptorToken, MachineName, MachinePlan, MachineSpec, PlanError, Smolvm,
    StartError, Timeouts, Verified, WorkspaceMount, db, plan,
};
use bottle_sandbox::state::{self, BottleState, StateDir, Status};
use guest::{AgentEnv, AgentError, AgentStdio, InitError, ProbeError};

use crate::exit::{self, PreflightFailed};
use crate::recipe::{self, Request};

/// One smolvm state directory for all of bot-bottle's machines (see `smolmachines::STATE_SUBDIR`).
pub use bottle_sandbox::smolmachines::STATE_SUBDIR as SMOLVM_STATE_DIR;
/// `sun_path` holds 108 bytes including the NUL (unix(7)).
const MAX_SOCKET_PATH_BYTES: usize = 107;
/// The longest socket path smolvm puts under its state dir (research/smolvm.md §6).
const SOCKET_SUFFIX: &str = "/.cache/smolvm/vms/0123456789abcdef/control.sock";
/// Where the workspace appears in the guest; the agent starts there.
pub const GUEST_WORKSPACE: &str = "/workspace";
/// `machine start` already waits up to 30 s for the guest agent; this bounds the exec probes after it.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the proxy's tasks get to finish at teardown.
const PROXY_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// The machine's create argv and expected row, for `ls`-style inspection. Not `spec.json`: `exec` reads that file as
/// a namespace spec and must find nothing to join here.
pub const MACHINE_FILE: &str = "machine.json";
/// The bundle's addresses: `interceptor` (host side, 127.0.0.N:PORT) and `proxy` (the guest's proxy URL).
const INTERCEPTOR_KEY: &str = "interceptor";
const PROXY_KEY: &str = "proxy";
#[cfg(test)]
use bottle_proxy::CA_KEY_FILE;

/// A step of the recipe that failed, with what it was doing. `exit_code` maps it for `exit::classify`.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("step preflight: no usable smolvm engine")]
    Engine(#[source] engine::EngineError),
    #[error("step lease: the bottle's loopback address cannot be used")]
    Loopback(#[source] preflight::AliasError),
    #[error(
        "step plan: workspace {workspace} is not reachable by smolvm's per-VM uid: {path} lacks {need} for others; \
         run `chmod o+{need} {path}` or pick another workspace"
    )]
    WorkspaceAccess {
        workspace: PathBuf,
        path: PathBuf,
        need: &'static str,
    },
    #[error("cannot inspect or create {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "step state dir: smolvm's state directory {path} is {len} bytes long; its sockets need it to be at most {max} \
         (set XDG_STATE_HOME to a shorter directory)"
    )]
    StatePathTooLong { path: PathBuf, len: usize, max: usize },
    #[error("step state dir: cannot use smolvm's state directory {path}")]
    Smolvm {
        path: PathBuf,
        #[source]
        source: Box<CliError>,
    },
    #[error("step bundle: cannot draw the interceptor token")]
    Token(#[source] std::io::Error),
    #[error("step bundle: cannot listen on the bottle's interceptor address {addr}")]
    Listen {
        addr: Ipv4Addr,
        #[source]
        source: std::io::Error,
    },
    #[error("step discover: `{key}` reads {found:?} where the bundle published {want}")]
    Discover {
        key: &'static str,
        found: Option<String>,
        want: String,
    },
    #[error("step plan: the machine plan is not usable")]
    Plan(#[source] PlanError),
    #[error("step create: `machine create` failed for {machine}")]
    Create {
        machine: MachineName,
        #[source]
        source: Box<CliError>,
    },
    #[error("step {step}: machine {machine} may not start")]
    Db {
        step: &'static str,
        machine: MachineName,
        #[source]
        source: Box<DbError>,
    },
    #[error("step start: `machine start` failed for {machine}")]
    Start {
        machine: MachineName,
        #[source]
        source: Box<StartError>,
    },
    #[error("step ready: machine {machine} did not become ready")]
    Ready {
        machine: MachineName,
        #[source]
        source: Box<WaitError<ProbeError>>,
    },
    #[error("step init: machine {machine} could not be set up for the proxy")]
    Init {
        machine: MachineName,
        #[source]
        source: Box<InitError>,
    },
    #[error("step run: machine {machine} could not run the agent")]
    Agent {
        machine: MachineName,
        #[source]
        source: Box<AgentError>,
    },
    #[error("step teardown: {0}")]
    Teardown(TeardownError),
}

impl StepError {
    /// Host problems with a known remedy are preflight failures (122); the proxy's are 124; the rest 123.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Engine(_) | Self::Loopback(_) => exit::PREFLIGHT,
            Self::Start { source, .. } if source.remedy().is_some() => exit::PREFLIGHT,
            Self::Listen { .. } | Self::Discover { .. } => exit::PROXY,
            _ => exit::SANDBOX,
        }
    }
}

/// What teardown could not undo; each item names what is left behind.
#[derive(Debug)]
pub struct TeardownError {
    pub machine: Option<(MachineName, Box<CliError>)>,
    pub lease: Option<LeaseError>,
}

impl std::fmt::Display for TeardownError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some((machine, err)) = &self.machine {
            parts.push(format!(
                "machine {machine} is left behind ({err}); remove it with `smolvm machine delete --name {machine} -f`"
            ));
        }
        if let Some(err) = &self.lease {
            parts.push(format!("the address lease is left behind ({err})"));
        }
        f.write_str(&parts.join("; "))
    }
}

/// Per-run bounds; tests shorten them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    pub ready_timeout: Duration,
    pub timeouts: Timeouts,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            ready_timeout: READY_TIMEOUT,
            timeouts: Timeouts::default(),
        }
    }
}

/// Logs each named step with the time since launch began (`-vv` or BOT_BOTTLE_LOG=debug).
struct Steps(Instant);

impl Steps {
    fn done(&self, step: &str) {
        tracing::debug!(
            step,
            elapsed_us = self.0.elapsed().as_micros() as u64,
            "launch step done"
        );
    }
}

/// Runs the agent to completion in a new smolvm machine; returns its exit code.
pub fn run(req: Request) -> anyhow::Result<u8> {
    // A written setting is enforced or refused: this backend keeps the guest's own home for now.
    if req.policy.bottle.home.is_some() {
        return Err(crate::exit::Unavailable {
            verb: "run",
            reason: "`home` (--home) is not supported by the smolmachines backend yet; the guest keeps its own home",
        }
        .into());
    }
    let steps = Steps(Instant::now());
    let engine = preflight_step(&RealHost)?;
    steps.done("preflight");
    let root = state::state_root()?;
    launch(req, &engine, &root, Tuning::default(), &steps)
}

/// Step preflight: everything `doctor --backend smolmachines` requires, then the verified engine itself.
fn preflight_step(host: &dyn Host) -> anyhow::Result<Engine> {
    let report = preflight::report(Backend::Smolmachines, host);
    if !report.usable() {
        let missing: Vec<String> = report
            .missing()
            .filter_map(|check| match &check.status {
                preflight::Status::Missing { reason, remedy } => {
                    Some(format!("{}: {reason}; fix: {remedy}", check.name))
                }
                _ => None,
            })
            .collect();
        return Err(anyhow::Error::new(PreflightFailed {
            backend: Backend::Smolmachines,
        })
        .context(format!("step preflight: {}", missing.join("; "))));
    }
    Ok(engine::discover_verified(host).map_err(StepError::Engine)?)
}

/// Everything after preflight, against `engine` and bot-bottle's state `root`.
fn launch(mut req: Request, engine: &Engine, root: &Path, tuning: Tuning, steps: &Steps) -> anyhow::Result<u8> {
    let argv = recipe::command(&req)?;
    let workspace = recipe::workspace(&req.policy, root)?;
    let shown = [crate::credential_sources::Shown::new(&workspace, "the workspace")];
    crate::credential_sources::resolve(&mut req.policy, &shown)?;
    guest_can_reach(&workspace, rustix::process::geteuid().is_root())?;
    let smolvm = smolvm_for(engine, root, tuning.timeouts)?;

    // step: lease
    let name = match &req.policy.bottle.name {
        Some(n) => n.clone(),
        None => recipe::generated_name()?,
    };
    let lease = Registry::new(root)
        .with_pool(recipe::lease_pool()?)
        .allocate(&name, std::process::id())?;
    // macOS: 127.0.0.N exists only as an lo0 alias, added (sudo -n) only when missing; Linux: nothing to do.
    preflight::ensure_alias(&RealHost, lease.addr()).map_err(StepError::Loopback)?;
    steps.done("lease");

    // step: state dir (a failure here drops, and so releases, the lease)
    let mut state = state::starting(
        name.as_str(),
        Backend::Smolmachines.as_str(),
        &lease.addr().to_string(),
        req.detached,
    )?;
    state.remove = req.remove;
    let dir = StateDir::create(root, name.as_str())?;
    let mut bottle = Bottle {
        addr: lease.addr(),
        state,
        dir,
        root: root.to_path_buf(),
        lease: Some(lease),
        smolvm,
        runtime: None,
        machine: None,
        torn_down: false,
    };
    bottle.record(|_| {})?;
    steps.done("state dir");

    let result = bottle.launch_and_run(&req, &argv, &workspace, tuning, steps);
    let cleanup = bottle.shutdown();
    let result = match (result, cleanup) {
        (Ok(code), Ok(())) => Ok(code),
        (Ok(_), Err(left)) => Err(StepError::Teardown(left).into()),
        (Err(cause), Ok(())) => Err(cause),
        (Err(cause), Err(left)) => Err(cause.context(format!("teardown after this failure also failed: {left}"))),
    };
    bottle.record(recipe::record_outcome(&result))?;
    if !req.detached
        && let Some(text) =
            crate::refusals::summary(&crate::refusals::read(&bottle.dir), &bottle.state.name, !req.remove)
    {
        eprint!("{text}");
    }
    // The agent record goes with the bottle (no secret in it: `pass_env` values and the CA key never were on disk).
    let _ = std::fs::remove_file(bottle.dir.file(exec::AGENT_FILE));
    if req.remove {
        let path = bottle.dir.path.clone();
        drop(bottle);
        StateDir { path }.remove()?;
    }
    steps.done("teardown");
    result
}

/// The engine, working on bot-bottle's own smolvm state directory (short enough for its sockets).
fn smolvm_for(engine: &Engine, root: &Path, timeouts: Timeouts) -> Result<Smolvm, StepError> {
    let path = root.join(SMOLVM_STATE_DIR);
    let max = MAX_SOCKET_PATH_BYTES - SOCKET_SUFFIX.len();
    let len = path.as_os_str().len();
    if len > max {
        return Err(StepError::StatePathTooLong { path, len, max });
    }
    // Private like every state dir; smolvm itself then opens it to 0755 and gives its parents o+x (research §1.1, §5).
    let created = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&path);
    created.map_err(|source| StepError::Inspect {
        path: path.clone(),
        source,
    })?;
    let smolvm = Smolvm::new(engine, Some(&path)).map_err(|source| StepError::Smolvm {
        path,
        source: Box::new(source),
    })?;
    Ok(smolvm.with_timeouts(timeouts))
}

/// As root, smolvm serves the workspace from the VM process running under a per-VM uid that only "other" permissions
/// apply to (research/smolvm.md §5): every ancestor needs o+x and the workspace o+rx, or the mount fails in the guest.
fn guest_can_reach(workspace: &Path, root_engine: bool) -> Result<(), StepError> {
    if !root_engine {
        return Ok(());
    }
    let mode = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| m.mode())
            .map_err(|source| StepError::Inspect {
                path: path.to_path_buf(),
                source,
            })
    };
    let refuse = |path: &Path, need| StepError::WorkspaceAccess {
        workspace: workspace.to_path_buf(),
        path: path.to_path_buf(),
        need,
    };
    for ancestor in workspace.ancestors().skip(1) {
        if mode(ancestor)? & 0o001 == 0 {
            return Err(refuse(ancestor, "x"));
        }
    }
    let own = mode(workspace)?;
    if own & 0o005 != 0o005 {
        return Err(refuse(workspace, "rx"));
    }
    if own & 0o002 == 0 {
        tracing::warn!(
            workspace = %workspace.display(),
            "the guest can read but not write the workspace: smolvm's per-VM uid is neither its owner nor in its group"
        );
    }
    Ok(())
}

/// A bottle being launched: what the recipe has started so far. `shutdown` (also run on drop) removes it in reverse.
struct Bottle {
    dir: StateDir,
    /// The leased 127.0.0.N.
    addr: Ipv4Addr,
    state: BottleState,
    root: PathBuf,
    lease: Option<Lease>,
    smolvm: Smolvm,
    /// The proxy's runtime; dropping it closes the interceptor listener and every flow.
    runtime: Option<tokio::runtime::Runtime>,
    /// Set before `machine create` runs: a create that fails half-way may still have written a row.
    machine: Option<MachineName>,
    torn_down: bool,
}

impl Bottle {
    fn record(&mut self, f: impl FnOnce(&mut BottleState)) -> anyhow::Result<()> {
        f(&mut self.state);
        self.dir.write(&self.state).context("cannot record the bottle's state")
    }

    fn launch_and_run(
        &mut self,
        req: &Request,
        argv: &[String],
        workspace: &Path,
        tuning: Tuning,
        steps: &Steps,
    ) -> anyhow::Result<u8> {
        let policy = &req.policy;
        let effective = bottle_policy::Effective::of(policy)
            .to_toml()
            .context("cannot render the policy")?;
        self.dir.write_file(state::POLICY_FILE, effective.as_bytes())?;

        // step: mint CA + start bundle
        let token = InterceptorToken::random().map_err(StepError::Token)?;
        let (proxy, interceptor) = self.start_bundle(req, &token)?;
        steps.done("bundle");

        // step: discover URLs (from the state dir, as `ls` will)
        let guest_proxy_url = format!("http://{GUEST_GATEWAY}:{}", interceptor.port());
        self.discover(interceptor, &guest_proxy_url)?;
        self.record(|s| s.proxy_url = Some(guest_proxy_url.clone()))?;
        steps.done("discover");

        // step: plan
        let plan = plan(MachineSpec {
            bottle: BottleName::parse(&self.state.name).map_err(anyhow::Error::msg)?,
            image: policy.bottle.image.clone(),
            cpus: policy.bottle.resources.cpus,
            memory_mib: policy.bottle.resources.memory_mib,
            workspace: Some(WorkspaceMount {
                host: workspace.to_path_buf(),
                guest: GUEST_WORKSPACE.into(),
                read_only: false,
            }),
            interceptor,
            token,
        })
        .map_err(StepError::Plan)?;
        // The guest is told the URL the bundle published; the plan must agree or the guest dials a dead port.
        if plan.guest_proxy_url() != guest_proxy_url {
            let (found, want) = (Some(plan.guest_proxy_url()), guest_proxy_url);
            return Err(StepError::Discover {
                key: PROXY_KEY,
                found,
                want,
            }
            .into());
        }
        let described = serde_json::json!({
            "machine": plan.name().as_str(),
            "create": plan.create_args().iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>(),
            "start": plan.start_args().iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>(),
            "guest_proxy_url": plan.guest_proxy_url(),
        });
        self.dir.write_file(MACHINE_FILE, described.to_string().as_bytes())?;
        steps.done("plan");

        // step: create
        self.machine = Some(plan.name().clone());
        self.smolvm.create(&plan).map_err(|source| StepError::Create {
            machine: plan.name().clone(),
            source: Box::new(source),
        })?;
        steps.done("create");

        // step: verify/patch, then verify once more right before the start
        let db = self.smolvm.db_path().map_err(|e| StepError::Smolvm {
            path: self.root.join(SMOLVM_STATE_DIR),
            source: Box::new(e.into()),
        })?;
        verify_row(&db, &plan, "verify/patch", db::verify_or_patch)?;
        verify_row(&db, &plan, "verify before start", db::verify)?;
        steps.done("verify");

        // step: start
        self.smolvm.start(&plan).map_err(|source| StepError::Start {
            machine: plan.name().clone(),
            source: Box::new(source),
        })?;
        steps.done("start");

        // step: wait ready
        let machine = plan.name();
        ready::poll(
            "the guest agent (`machine exec /bin/sh -c true`)",
            tuning.ready_timeout,
            || guest::probe(&self.smolvm, machine),
        )
        .map_err(|source| StepError::Ready {
            machine: machine.clone(),
            source: Box::new(source),
        })?;
        steps.done("ready");

        // step: init
        let settings = guest::proxy_settings(&guest_proxy_url);
        guest::init(&self.smolvm, machine, proxy.ca_cert_pem(), &settings).map_err(|source| StepError::Init {
            machine: machine.clone(),
            source: Box::new(source),
        })?;
        let mut env = AgentEnv::default();
        env.plain.extend(policy.bottle.env.clone());
        env.plain.extend(proxy.placeholders());
        env.plain.extend(settings);
        env.passed = policy
            .bottle
            .pass_env
            .iter()
            .filter_map(|key| std::env::var(key).ok().map(|v| (key.clone(), v)))
            .collect();
        // Before "running": `exec` reads it once the bottle reads as running.
        exec::AgentRecord::new(machine, &env).write(&self.dir)?;
        self.record(|s| s.status = Status::Running)?;
        steps.done("init");

        // step: run
        let terminal = !req.detached && std::io::IsTerminal::is_terminal(&std::io::stdin());
        let stdio = if req.detached {
            let log = self.dir.open_agent_log().context("cannot open the agent log")?;
            AgentStdio::Log(log)
        } else if terminal {
            AgentStdio::Terminal
        } else {
            AgentStdio::Inherit
        };
        let (args, host_env) = guest::agent_args(machine, GUEST_WORKSPACE, terminal, &env, argv);
        let runtime = self.runtime.as_ref().context("the proxy runtime is gone")?;
        let code = guest::run_agent(&self.smolvm, &args, &host_env, stdio, |pid| {
            runtime.spawn(crate::recipe::forward_termination(pid));
        })
        .map_err(|source| StepError::Agent {
            machine: machine.clone(),
            source: Box::new(source),
        })?;
        steps.done("run");
        Ok(code)
    }

    /// Step bundle: the proxy with the bottle's CA, serving smolvm's interceptor on 127.0.0.N:PORT.
    fn start_bundle(&mut self, req: &Request, token: &InterceptorToken) -> anyhow::Result<(Proxy, SocketAddrV4)> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("bottle-proxy")
            .build()
            .context("cannot start the proxy runtime")?;
        let mut config = ProxyConfig::new(req.policy.clone(), self.dir.path.clone());
        config.bottle = self.state.name.clone();
        config.upstream_ca = req.upstream_ca.clone();
        // The CA key never touches the disk: it lives exactly as long as this bottle's proxy.
        config.ephemeral_ca = true;
        let proxy = {
            let _in_runtime = runtime.enter();
            Proxy::new(config)?
        };
        let addr = self.addr;
        let listener = std::net::TcpListener::bind((addr, 0)).map_err(|source| StepError::Listen { addr, source })?;
        let port = listener
            .local_addr()
            .map_err(|source| StepError::Listen { addr, source })?
            .port();
        let interceptor = Interceptor::new(*token.as_bytes(), SocketAddrV4::new(GUEST_GATEWAY, port));
        {
            let proxy = proxy.clone();
            runtime.spawn(async move {
                if let Err(e) = proxy.serve_interceptor(listener, interceptor).await {
                    tracing::error!(error = %e, "the interceptor listener stopped");
                }
            });
        }
        self.runtime = Some(runtime);
        Ok((proxy, SocketAddrV4::new(addr, port)))
    }

    /// Step discover: write the bundle's addresses and read them back as `ls` and `logs` will.
    fn discover(&self, interceptor: SocketAddrV4, guest_proxy_url: &str) -> anyhow::Result<()> {
        let urls = serde_json::json!({ INTERCEPTOR_KEY: interceptor.to_string(), PROXY_KEY: guest_proxy_url });
        self.dir.write_file(state::URLS_FILE, urls.to_string().as_bytes())?;
        let text = std::fs::read(self.dir.file(state::URLS_FILE)).context("cannot read back the bundle's URLs")?;
        let urls: serde_json::Value = serde_json::from_slice(&text).context("the bundle's urls.json is damaged")?;
        for (key, want) in [
            (INTERCEPTOR_KEY, interceptor.to_string()),
            (PROXY_KEY, guest_proxy_url.to_owned()),
        ] {
            let found = urls[key].as_str();
            if found != Some(want.as_str()) {
                let found = found.map(str::to_owned);
                return Err(StepError::Discover { key, found, want }.into());
            }
        }
        Ok(())
    }

    /// Removes the machine, stops the proxy, releases the lease, then sweeps machines of bottles that are gone.
    /// Idempotent; reports what it could not undo.
    fn shutdown(&mut self) -> Result<(), TeardownError> {
        if std::mem::replace(&mut self.torn_down, true) {
            return Ok(());
        }
        let mut left = TeardownError {
            machine: None,
            lease: None,
        };
        if let Some(machine) = self.machine.take() {
            match self.smolvm.delete(&machine) {
                Ok(deleted) => tracing::debug!(%machine, ?deleted, "machine deleted"),
                Err(err) => left.machine = Some((machine, Box::new(err))),
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(PROXY_SHUTDOWN_TIMEOUT);
        }
        if let Some(lease) = self.lease.take()
            && let Err(err) = lease.release()
        {
            left.lease = Some(err);
        }
        match sweep(&self.smolvm, &self.root, &self.state.name) {
            Ok(swept) if !swept.is_empty() => tracing::info!(?swept, "removed machines of bottles that are gone"),
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot sweep machines of bottles that are gone"),
        }
        if left.machine.is_none() && left.lease.is_none() {
            return Ok(());
        }
        Err(left)
    }
}

impl Drop for Bottle {
    fn drop(&mut self) {
        if let Err(left) = self.shutdown() {
            tracing::error!(%left, "bottle teardown incomplete");
        }
    }
}

fn verify_row(
    db: &Path,
    plan: &MachinePlan,
    step: &'static str,
    check: fn(&Path, &ExpectedEgress) -> Result<Verified, DbError>,
) -> Result<(), StepError> {
    let verified = check(db, plan.expected()).map_err(|source| StepError::Db {
        step,
        machine: plan.name().clone(),
        source: Box::new(source),
    })?;
    if !verified.patched.is_empty() {
        tracing::info!(machine = %plan.name(), patched = ?verified.patched, db = %db.display(), "machine row patched");
    }
    Ok(())
}

/// Deletes machines labelled `owner=bot-bottle` whose bottle is gone: no state dir, or a state whose supervisor is
/// dead (killed with -9, so its own teardown never ran). `keep` is the bottle doing the sweep. A machine whose label
/// or name does not match the `bb-<bottle>` pattern, or whose state cannot be read, is left alone.
fn sweep(smolvm: &Smolvm, root: &Path, keep: &str) -> Result<Vec<String>, CliError> {
    let mut swept = Vec::new();
    for machine in smolvm.list_ours()? {
        let Some(bottle) = machine.labels.get(BOTTLE_LABEL) else {
            continue;
        };
        let Ok(bottle) = BottleName::parse(bottle) else {
            continue;
        };
        if bottle.as_str() == keep || machine.name != format!("{MACHINE_PREFIX}{bottle}") {
            continue;
        }
        let gone = match StateDir::open(root, bottle.as_str()) {
            Err(state::StateError::NotFound(_)) => true,
            Ok(dir) => dir.read().is_ok_and(|s| !s.is_live()),
            Err(_) => false,
        };
        if !gone {
            continue;
        }
        let Ok(name) = MachineName::parse(&machine.name) else {
            continue;
        };
        smolvm.delete(&name)?;
        swept.push(machine.name);
    }
    Ok(swept)
}
