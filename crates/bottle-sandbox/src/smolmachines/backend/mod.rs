//! The smolmachines backend behind the `Backend` trait, one named step after another: preflight (the verified smolvm
//! engine, bot-bottle's own smolvm state directory, a workspace smolvm's per-VM uid can reach) → lease (macOS: the
//! 127.0.0.N alias) → attach (the proxy listens as smolvm's egress interceptor on the bottle's 127.0.0.N, with a fresh
//! token) → plan → `machine create` → verify/patch the engine's row → verify again → `machine start` → wait ready →
//! init (the bottle CA and proxy settings) → run the agent (`machine exec`) → teardown (the machine is deleted, and
//! machines of bottles that are gone are swept).
//!
//! Trusts the version-verified smolvm engine to enforce the row it was given (research/smolvm.md §3.3–3.5); trusts
//! neither its database nor the guest: the row is re-read just before the start, and the guest reaches the proxy only
//! through the token-checked interceptor.

mod exec;
mod guest;

pub use exec::{AGENT_FILE, AgentRecord, exec_with};
pub use guest::{GUEST_CA_BUNDLE, probe_args};

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bottle_policy::{BottleName, Policy};
use guest::{AgentEnv, AgentError, AgentStdio, InitError, ProbeError};

use crate::backend::{
    AgentIo, Attachment, Backend, BackendError, BottleSpec, Exit, FailureClass, Kind, Launch, MountTarget, Serve,
    Services, Started, TeardownError, Urls,
};
use crate::engine::{self, Engine};
use crate::preflight::{self, Host, RealHost};
use crate::ready::{self, WaitError};
use crate::smolmachines::plan::{BOTTLE_LABEL, GUEST_GATEWAY, MACHINE_PREFIX};
use crate::smolmachines::{
    CliError, DbError, ExpectedEgress, InterceptorToken, MachineName, MachinePlan, MachineSpec, PlanError, Smolvm,
    StartError, Timeouts, Verified, WorkspaceMount, db, plan,
};
use crate::state::{self, BottleState, StateDir, StateError};

/// One smolvm state directory for all of bot-bottle's machines (see `smolmachines::STATE_SUBDIR`).
pub use crate::smolmachines::STATE_SUBDIR as SMOLVM_STATE_DIR;
/// `sun_path` holds 108 bytes including the NUL (unix(7)).
const MAX_SOCKET_PATH_BYTES: usize = 107;
/// The longest socket path smolvm puts under its state dir (research/smolvm.md §6).
const SOCKET_SUFFIX: &str = "/.cache/smolvm/vms/0123456789abcdef/control.sock";
/// Where the workspace appears in the guest; the agent starts there.
pub const GUEST_WORKSPACE: &str = "/workspace";
/// Where a kept home appears in the guest (`HOME` then points there), and where mounts under the home go.
pub const GUEST_HOME: &str = "/home/agent";
/// `machine start` already waits up to 30 s for the guest agent; this bounds the exec probes after it.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The machine's create argv and expected row, for `ls`-style inspection. Not `spec.json`: that is the namespace
/// backend's plan.
pub const MACHINE_FILE: &str = "machine.json";

/// A step of a smolmachines launch that failed, with what it was doing. `class` maps it to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("step preflight: {0}")]
    Preflight(String),
    #[error("step preflight: no usable smolvm engine")]
    Engine(#[source] engine::EngineError),
    #[error(
        "a kept home (`home`, --home) cannot be shared with a smolmachines guest when bot-bottle runs as root: smolvm \
         serves shared folders as a per-VM uid that could open the home only if every local user could; run \
         bot-bottle as your own user, or use --home tmpfs"
    )]
    Home,
    #[error(
        "`pids` in [bottle.resources] is not enforced by the smolmachines backend yet (its cpus and memory are); \
         remove it or use --backend namespace"
    )]
    Pids,
    #[error(
        "the smolmachines backend cannot share a host's Unix socket with its guest (`share_sockets`): a host socket \
         is not reachable through the VM's shared folders; use the namespace backend for that bottle"
    )]
    ShareSockets,
    #[error(
        "`runtime` ({0}) is a container engine's runtime; a smolmachines bottle is a microVM of its own: remove it, \
         or run with --backend container"
    )]
    Runtime(String),
    #[error("step lease: the bottle's loopback address cannot be used")]
    Loopback(#[source] preflight::AliasError),
    #[error(
        "step plan: {workspace} (shared with the guest) is not reachable by smolvm's per-VM uid: {path} lacks {need} for others; \
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
    #[error("step {step}: cannot record the bottle's files")]
    State {
        step: &'static str,
        #[source]
        source: StateError,
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
    #[error("the bottle's agent record {path} is missing or damaged ({reason}); the bottle is not running")]
    Record { path: PathBuf, reason: String },
    #[error("bottle `{0}` is not running")]
    NotRunning(String),
    #[error("a phase ran out of order: {0}")]
    Order(&'static str),
}

impl StepError {
    /// Host problems with a known remedy are preflight failures; the proxy's attachment is the proxy's; the rest are
    /// the sandbox's.
    pub fn class(&self) -> FailureClass {
        match self {
            Self::Preflight(_) | Self::Engine(_) | Self::Loopback(_) => FailureClass::Preflight,
            Self::Start { source, .. } if source.remedy().is_some() => FailureClass::Preflight,
            Self::Listen { .. } | Self::Discover { .. } => FailureClass::Proxy,
            Self::Home | Self::Pids | Self::ShareSockets | Self::Runtime(_) => FailureClass::Unsupported,
            Self::NotRunning(_) | Self::Record { .. } => FailureClass::Target,
            _ => FailureClass::Sandbox,
        }
    }
}

impl From<StepError> for BackendError {
    fn from(e: StepError) -> Self {
        BackendError::new(e.class(), e)
    }
}

/// Per-run bounds; tests shorten them.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
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

/// The smolmachines backend. `engine`: a given engine instead of the verified one the host has (tests run a fake
/// engine whose machines "boot"; nothing else sets it).
#[derive(Debug, Default)]
pub struct Smolmachines {
    pub engine: Option<Engine>,
    pub tuning: Tuning,
}

impl Smolmachines {
    fn engine(&self) -> Result<Engine, StepError> {
        match &self.engine {
            Some(engine) => Ok(engine.clone()),
            None => preflight_step(&RealHost),
        }
    }
}

impl Backend for Smolmachines {
    fn kind(&self) -> Kind {
        Kind::Smolmachines
    }

    fn check(&self, policy: &Policy) -> Result<(), BackendError> {
        // A written setting is enforced or refused. As root, smolvm serves shared folders as a per-VM uid that could
        // only open a kept home (0700: it holds the agent's logins) if every local user could.
        if policy.bottle.home.as_deref().is_some_and(|h| h != "tmpfs") && rustix::process::geteuid().is_root() {
            return Err(StepError::Home.into());
        }
        // The machine's cpus and memory are the VM's own; a process cap inside the guest is not enforced yet.
        if policy.bottle.resources.pids.is_some() {
            return Err(StepError::Pids.into());
        }
        if !policy.bottle.share_sockets.is_empty() {
            return Err(StepError::ShareSockets.into());
        }
        if let Some(runtime) = &policy.bottle.runtime {
            return Err(StepError::Runtime(runtime.clone()).into());
        }
        Ok(())
    }

    fn visible_host_paths(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    fn prepare(&self, root: &Path) -> Result<Box<dyn Launch>, BackendError> {
        let engine = self.engine()?;
        let smolvm = smolvm_for(&engine, root, self.tuning.timeouts)?;
        Ok(Box::new(SmolLaunch {
            smolvm,
            root: root.to_path_buf(),
            tuning: self.tuning,
            spec: None,
            dir: None,
            published: None,
            machine: None,
            env: AgentEnv::default(),
            torn_down: false,
        }))
    }

    fn exec(
        &self,
        root: &Path,
        dir: &StateDir,
        s: &BottleState,
        command: &[String],
        forward_termination: &dyn Fn(u32),
    ) -> Result<u8, BackendError> {
        if !(s.is_live() && s.status == state::Status::Running) {
            return Err(StepError::NotRunning(s.name.to_string()).into());
        }
        let engine = match &self.engine {
            Some(engine) => engine.clone(),
            None => engine::discover_verified(&RealHost).map_err(StepError::Engine)?,
        };
        Ok(exec::exec_with(
            dir,
            root,
            &engine,
            self.tuning.timeouts,
            command,
            forward_termination,
        )?)
    }
}

/// Step preflight: everything `doctor --backend smolmachines` requires, then the verified engine itself.
fn preflight_step(host: &dyn Host) -> Result<Engine, StepError> {
    let report = preflight::report(Kind::Smolmachines, host);
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
        return Err(StepError::Preflight(format!(
            "{}; run `bot-bottle doctor --backend smolmachines` for remedies",
            missing.join("; ")
        )));
    }
    engine::discover_verified(host).map_err(StepError::Engine)
}

/// The engine, working on bot-bottle's own smolvm state directory (short enough for its sockets).
pub fn smolvm_for(engine: &Engine, root: &Path, timeouts: Timeouts) -> Result<Smolvm, StepError> {
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
pub fn guest_can_reach(workspace: &Path, root_engine: bool) -> Result<(), StepError> {
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

/// The kept home (at `GUEST_HOME`) and the user's mounts, as shared folders after the workspace. As root the kept
/// home is not shared (`check` refused an explicit one; the preset's default is left out with a warning) and each
/// mount must be reachable by smolvm's per-VM uid, as the workspace must.
fn shares(spec: &BottleSpec, root_engine: bool) -> Result<Vec<WorkspaceMount>, StepError> {
    let mut shares = Vec::new();
    if let Some(home) = &spec.home {
        if root_engine {
            tracing::warn!(
                "the agent's home is not kept between runs on the smolmachines backend when bot-bottle runs as root"
            );
        } else {
            shares.push(WorkspaceMount {
                host: canonical(home)?,
                guest: GUEST_HOME.into(),
                read_only: false,
            });
        }
    }
    for m in &spec.mounts {
        guest_can_reach(&m.source, root_engine)?;
        let guest = match &m.target {
            MountTarget::Absolute(at) => at.clone(),
            MountTarget::InHome(rel) => Path::new(GUEST_HOME).join(rel),
        };
        shares.push(WorkspaceMount {
            host: canonical(&m.source)?,
            guest,
            read_only: !m.writable,
        });
    }
    Ok(shares)
}

/// smolvm records a shared folder's canonical path, and the row is compared with ours.
fn canonical(path: &Path) -> Result<PathBuf, StepError> {
    std::fs::canonicalize(path).map_err(|source| StepError::Inspect {
        path: path.to_path_buf(),
        source,
    })
}

/// A smolmachines launch: what it has started so far. `shutdown` (also run on drop) removes it.
struct SmolLaunch {
    smolvm: Smolvm,
    root: PathBuf,
    tuning: Tuning,
    spec: Option<BottleSpec>,
    dir: Option<StateDir>,
    /// What `attach` published: the interceptor address and the token it checks.
    published: Option<(SocketAddrV4, InterceptorToken, Urls)>,
    /// Set before `machine create` runs: a create that fails half-way may still have written a row.
    machine: Option<MachineName>,
    env: AgentEnv,
    torn_down: bool,
}

impl SmolLaunch {
    fn dir(&self) -> Result<&StateDir, StepError> {
        self.dir.as_ref().ok_or(StepError::Order("begin"))
    }

    fn record(&self, step: &'static str, name: &str, bytes: &[u8]) -> Result<(), StepError> {
        self.dir()?
            .create_file(name, bytes)
            .map_err(|source| StepError::State { step, source })
    }
}

impl Launch for SmolLaunch {
    fn check_workspace(&self, workspace: &Path) -> Result<(), BackendError> {
        Ok(guest_can_reach(workspace, rustix::process::geteuid().is_root())?)
    }

    fn begin(&mut self, spec: BottleSpec, dir: &StateDir) -> Result<(), BackendError> {
        // macOS: 127.0.0.N exists only as an lo0 alias, added (sudo -n) only when missing; Linux: nothing to do.
        preflight::ensure_alias(&RealHost, spec.addr).map_err(StepError::Loopback)?;
        self.spec = Some(spec);
        self.dir = Some(StateDir { path: dir.path.clone() });
        Ok(())
    }

    fn attach(&mut self) -> Result<Attachment, BackendError> {
        let addr = self.spec.as_ref().ok_or(StepError::Order("begin"))?.addr;
        let token = InterceptorToken::random().map_err(StepError::Token)?;
        let listener = TcpListener::bind((addr, 0)).map_err(|source| StepError::Listen { addr, source })?;
        let port = listener
            .local_addr()
            .map_err(|source| StepError::Listen { addr, source })?
            .port();
        let interceptor = SocketAddrV4::new(addr, port);
        let urls = Urls {
            proxy: format!("http://{GUEST_GATEWAY}:{port}"),
            interceptor: Some(interceptor.to_string()),
        };
        let serve = Serve::Interceptor {
            token: *token.as_bytes(),
            guest: SocketAddrV4::new(GUEST_GATEWAY, port),
        };
        self.published = Some((interceptor, token, urls.clone()));
        Ok(Attachment { listener, serve, urls })
    }

    fn start(&mut self, services: &dyn Services, urls: &Urls) -> Result<Started, BackendError> {
        let (interceptor, token, published) = self.published.take().ok_or(StepError::Order("attach"))?;
        // step: discover (the URLs as `ls` and `logs` read them must be the ones the bundle serves)
        if urls != &published {
            return Err(StepError::Discover {
                key: "urls.json",
                found: Some(format!("{urls:?}")),
                want: format!("{published:?}"),
            }
            .into());
        }
        let spec = self.spec.as_ref().ok_or(StepError::Order("begin"))?;
        // step: plan
        let plan = plan(MachineSpec {
            bottle: spec.name.clone(),
            image: spec.image.clone(),
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            workspace: Some(WorkspaceMount {
                host: spec.workspace.clone(),
                guest: GUEST_WORKSPACE.into(),
                read_only: false,
            }),
            shares: shares(spec, rustix::process::geteuid().is_root())?,
            interceptor,
            token,
        })
        .map_err(StepError::Plan)?;
        // The guest is told the URL the bundle published; the plan must agree or the guest dials a dead port.
        if plan.guest_proxy_url() != published.proxy {
            let (found, want) = (Some(plan.guest_proxy_url()), published.proxy);
            return Err(StepError::Discover {
                key: "proxy",
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
        self.record("plan", MACHINE_FILE, described.to_string().as_bytes())?;

        // step: create
        self.machine = Some(plan.name().clone());
        self.smolvm.create(&plan).map_err(|source| StepError::Create {
            machine: plan.name().clone(),
            source: Box::new(source),
        })?;

        // step: verify/patch, then verify once more right before the start
        let db = self.smolvm.db_path().map_err(|e| StepError::Smolvm {
            path: self.root.join(SMOLVM_STATE_DIR),
            source: Box::new(e.into()),
        })?;
        verify_row(&db, &plan, "verify/patch", db::verify_or_patch)?;
        verify_row(&db, &plan, "verify before start", db::verify)?;

        // step: start
        self.smolvm.start(&plan).map_err(|source| StepError::Start {
            machine: plan.name().clone(),
            source: Box::new(source),
        })?;

        // step: wait ready
        let machine = plan.name();
        ready::poll(
            "the guest agent (`machine exec /bin/sh -c true`)",
            self.tuning.ready_timeout,
            || guest::probe(&self.smolvm, machine),
        )
        .map_err(|source| StepError::Ready {
            machine: machine.clone(),
            source: Box::new(source),
        })?;

        // step: init
        let settings = guest::proxy_settings(&published.proxy);
        guest::init(&self.smolvm, machine, services.ca_pem(), &settings).map_err(|source| StepError::Init {
            machine: machine.clone(),
            source: Box::new(source),
        })?;
        let mut env = AgentEnv::default();
        if spec.home.is_some() && !rustix::process::geteuid().is_root() {
            env.plain.insert("HOME".into(), GUEST_HOME.into());
        }
        env.plain.extend(spec.env.clone());
        env.plain.extend(services.placeholders());
        env.plain.extend(settings);
        env.passed = spec.pass_env.clone().into_iter().collect();
        // Before "running": `exec` reads it once the bottle reads as running.
        exec::AgentRecord::new(machine, &env).write(self.dir()?)?;
        self.env = env;
        Ok(Started { init_pid: None })
    }

    fn wait(&mut self, services: &dyn Services) -> Result<Exit, BackendError> {
        let machine = self.machine.clone().ok_or(StepError::Order("start"))?;
        let spec = self.spec.as_mut().ok_or(StepError::Order("begin"))?;
        let (terminal, stdio) = match std::mem::replace(&mut spec.io, AgentIo::Inherit) {
            AgentIo::Log(log) => (false, AgentStdio::Log(log)),
            AgentIo::Terminal => (true, AgentStdio::Terminal),
            AgentIo::Inherit => (false, AgentStdio::Inherit),
        };
        let (args, host_env) = guest::agent_args(&machine, GUEST_WORKSPACE, terminal, &self.env, &spec.argv);
        let code = guest::run_agent(&self.smolvm, &args, &host_env, stdio, |pid| {
            services.forward_termination(pid)
        })
        .map_err(|source| StepError::Agent {
            machine: machine.clone(),
            source: Box::new(source),
        })?;
        // The guest's `machine exec` reports a command that cannot start only through its exit code.
        Ok(Exit {
            code,
            start_failure: None,
        })
    }

    /// Removes the machine and the agent record, then sweeps machines of bottles that are gone. Idempotent.
    fn shutdown(&mut self) -> Result<(), TeardownError> {
        if std::mem::replace(&mut self.torn_down, true) {
            return Ok(());
        }
        let mut left = TeardownError::default();
        if let Some(machine) = self.machine.take() {
            match self.smolvm.delete(&machine) {
                Ok(deleted) => tracing::debug!(%machine, ?deleted, "machine deleted"),
                Err(err) => left.left.push(format!(
                    "machine {machine} is left behind ({err}); remove it with `smolvm machine delete --name {machine} -f`"
                )),
            }
        }
        // The agent record goes with the bottle (no secret in it: `pass_env` values never were on disk).
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_file(dir.file(AGENT_FILE));
        }
        let keep = self
            .spec
            .as_ref()
            .map(|s| s.name.as_str().to_owned())
            .unwrap_or_default();
        match sweep(&self.smolvm, &self.root, &keep) {
            Ok(swept) if !swept.is_empty() => tracing::info!(?swept, "removed machines of bottles that are gone"),
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot sweep machines of bottles that are gone"),
        }
        left.into_result()
    }
}

impl Drop for SmolLaunch {
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
        let gone = state::is_gone(root, bottle.as_str());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MountSpec;

    fn spec(home: Option<PathBuf>, mounts: Vec<MountSpec>) -> BottleSpec {
        BottleSpec {
            name: BottleName::parse("b1").unwrap(),
            addr: Ipv4Addr::new(127, 0, 0, 2),
            argv: vec!["true".into()],
            workspace: "/w".into(),
            home,
            env: Default::default(),
            pass_env: Default::default(),
            image: None,
            runtime: None,
            cpus: None,
            memory_mib: None,
            pids: None,
            mounts,
            share_sockets: Vec::new(),
            io: AgentIo::Inherit,
        }
    }

    /// #14: the kept home and the user's mounts become shared folders: the home writable at /home/agent, a mount
    /// under the home beneath it, an absolute one where it says, read-only unless written `rw`.
    #[test]
    fn the_kept_home_and_mounts_are_shared_folders_and_a_root_engine_keeps_no_home() {
        let dir = tempfile::tempdir().unwrap();
        let canonical = dir.path().canonicalize().unwrap();
        for d in ["home", "cargo", "tools"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let mounts = vec![
            MountSpec {
                source: dir.path().join("cargo"),
                target: MountTarget::InHome(".cargo".into()),
                writable: false,
            },
            MountSpec {
                source: dir.path().join("tools"),
                target: MountTarget::Absolute("/opt/tools".into()),
                writable: true,
            },
        ];
        let shared = shares(&spec(Some(dir.path().join("home")), mounts.clone()), false).unwrap();
        let want = |p: &str, guest: &str, read_only| WorkspaceMount {
            host: canonical.join(p),
            guest: guest.into(),
            read_only,
        };
        assert_eq!(
            shared,
            [
                want("home", GUEST_HOME, false),
                want("cargo", "/home/agent/.cargo", true),
                want("tools", "/opt/tools", false),
            ]
        );
        // As root the per-VM uid could open the 0700 home only if everyone could: it stays out.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for d in ["cargo", "tools"] {
            std::fs::set_permissions(dir.path().join(d), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let as_root = shares(&spec(Some(dir.path().join("home")), mounts), true).unwrap();
        assert!(as_root.iter().all(|s| s.guest != Path::new(GUEST_HOME)), "{as_root:?}");
        assert_eq!(as_root.len(), 2);
    }

    #[test]
    fn a_mount_the_per_vm_uid_cannot_reach_is_refused_with_the_remedy() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let mounts = vec![MountSpec {
            source: private.clone(),
            target: MountTarget::Absolute("/opt/p".into()),
            writable: false,
        }];
        let err = shares(&spec(None, mounts), true).unwrap_err().to_string();
        assert!(err.contains("chmod o+"), "{err}");
    }
}
