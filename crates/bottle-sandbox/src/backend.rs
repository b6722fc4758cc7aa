//! The `Backend` trait every sandbox implements, and the registry that picks one. The launcher's one recipe (in the
//! `bot-bottle` crate) drives any backend through these phases, never matching on which it is:
//!
//! `prepare` (host checks, before anything is created) → `begin` (after the lease and state directory, before the
//! launcher starts any thread: the namespace backend clones its init here) → `attach` (how the bottle reaches its
//! proxy: the listener the recipe's proxy serves, and the URLs it publishes) → `start` (plan, launch, init, wait
//! ready; proved from inside) → `wait` (the agent runs to its end) → `shutdown` (also on drop).
//!
//! Trusts the recipe to hand over a lease it holds and a state directory it created; trusts nothing the bottle says.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use bottle_policy::{BottleName, Policy};

use crate::state::{BottleState, StateDir};

pub use bottle_policy::Backend as Kind;

/// The host a bottle's own confinement self-test asks its proxy for (denied, and left out of refusal summaries).
pub const SELFTEST_HOST: &str = "selftest.bot-bottle.invalid";

/// The hidden command a backend's `exec` may re-execute this binary into (the namespace backend joins the
/// bottle's namespaces from a fresh single-threaded process).
pub use crate::namespace::join::EXEC_SUBCOMMAND;

/// The hidden command's body; returns the exit code of the command run in the bottle.
pub fn exec_helper(spec: &Path, init_pid: u32, supervisor_pid: u32, command: &[String]) -> i32 {
    crate::namespace::join::main(spec, init_pid, supervisor_pid, command)
}

/// What a bottle is asked to be: plain data, made by the recipe from the policy and the command line.
#[derive(Debug)]
pub struct BottleSpec {
    pub name: BottleName,
    /// The leased 127.0.0.N.
    pub addr: Ipv4Addr,
    pub argv: Vec<String>,
    /// The canonical host workspace, shown read-write.
    pub workspace: PathBuf,
    /// A persistent home on the host, or `None` for a fresh one.
    pub home: Option<PathBuf>,
    /// The policy's `[bottle.env]` (placeholders and proxy settings are added by the backend).
    pub env: BTreeMap<String, String>,
    /// SECURITY: `pass_env` values, in memory only; a file that outlives the launch may name them, never hold them.
    pub pass_env: BTreeMap<String, String>,
    pub image: Option<String>,
    /// The container engine's runtime (`runsc`: gVisor); the engine's default when `None`.
    pub runtime: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub pids: Option<u32>,
    /// Host paths shown on purpose, already resolved and checked by the recipe.
    pub mounts: Vec<MountSpec>,
    /// Unix sockets of host processes the bottle may connect to: absolute paths inside the bottle.
    pub share_sockets: Vec<PathBuf>,
    pub io: AgentIo,
}

/// A host path shown in the bottle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Canonical host path.
    pub source: PathBuf,
    pub target: MountTarget,
    pub writable: bool,
}

/// Where a mount appears in the bottle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountTarget {
    Absolute(PathBuf),
    /// Relative to the bottle's home (a path under the user's home keeps its place under the agent's).
    InHome(PathBuf),
}

/// How the agent's standard streams are connected.
#[derive(Debug)]
pub enum AgentIo {
    /// The user's stdin and stdout are a terminal: the agent gets a terminal of its own, relayed.
    Terminal,
    /// Foreground without a terminal: the launcher's streams (stdin from /dev/null where the backend cannot forward).
    Inherit,
    /// Detached: stdout and stderr to this log (`agent.log`), stdin from /dev/null.
    Log(std::fs::File),
}

/// How the recipe's proxy serves a listener a backend hands it.
#[derive(Debug, Clone, Copy)]
pub enum Serve {
    /// An HTTP proxy (CONNECT and absolute-form requests).
    Proxy,
    /// smolvm's egress interceptor: each flow opens with `token`; the guest dials its proxy at `guest`.
    Interceptor { token: [u8; 32], guest: SocketAddrV4 },
    /// Nobody may use it: every connection is refused and audited (`not-the-bottle`).
    Refuse,
}

/// Where the bottle reaches its proxy, as published in `urls.json` and read back before the start.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Urls {
    /// The proxy URL the agent is given.
    pub proxy: String,
    /// The host side of smolvm's interceptor, `127.0.0.N:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interceptor: Option<String>,
}

/// The host side of the bottle's egress: a listener for the recipe's proxy to serve, and what to publish.
#[derive(Debug)]
pub struct Attachment {
    pub listener: TcpListener,
    pub serve: Serve,
    pub urls: Urls,
}

/// A bottle that passed its readiness check.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    /// The host pid `exec` joins through (namespace), if the backend has one.
    pub init_pid: Option<u32>,
}

/// How the agent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Its exit code (128 + the signal for a signal death).
    pub code: u8,
    /// The one line saying why the command could not start (exit 127 or 126), when that is what happened.
    pub start_failure: Option<String>,
}

/// What the launcher provides while a bottle starts and runs: its proxy, signal forwarding and terminal relay.
/// Implemented by the recipe (which owns the proxy runtime); the backends hold no async code.
pub trait Services {
    /// The bottle CA's certificate, PEM.
    fn ca_pem(&self) -> &str;
    /// Placeholder values for the agent's credentials (the proxy swaps in the real ones).
    fn placeholders(&self) -> BTreeMap<String, String>;
    /// Serves `listener` as `how` until the proxy stops.
    fn serve(&self, listener: TcpListener, how: Serve);
    /// Passes the SIGTERM and SIGHUP the launcher receives on to `pid`.
    fn forward_termination(&self, pid: u32);
    /// Relays the user's terminal to and from `master` until the returned relay is finished.
    fn relay_terminal(&self, master: OwnedFd) -> std::io::Result<Box<dyn Relay>>;
}

/// A running terminal relay.
pub trait Relay {
    /// Copies what is left and restores the user's terminal.
    fn finish(self: Box<Self>);
}

/// One sandbox technology. A new backend is a new folder plus one line in [`for_kind`].
pub trait Backend {
    fn kind(&self) -> Kind;
    /// Refuses settings this backend cannot enforce (a written limit is enforced, or the launch is refused).
    fn check(&self, policy: &Policy) -> Result<(), BackendError>;
    /// Host paths shown inside the bottle besides the workspace and home (credential files must not be among them).
    fn visible_host_paths(&self) -> Vec<PathBuf>;
    /// Step preflight: what the host must have before anything is created. `root` is bot-bottle's state root.
    fn prepare(&self, root: &Path) -> Result<Box<dyn Launch>, BackendError>;
    /// Runs `command` in the running bottle `state` (in its state directory `dir`); returns its exit code, or never
    /// returns (the namespace backend replaces the process). `forward_termination` gets the pid of a helper that
    /// SIGTERM and SIGHUP to the caller should reach.
    fn exec(
        &self,
        root: &Path,
        dir: &StateDir,
        state: &BottleState,
        command: &[String],
        forward_termination: &dyn Fn(u32),
    ) -> Result<u8, BackendError>;
    /// Removes what bottles of state root `root` whose supervisor is gone (killed with -9, so their own teardown
    /// never ran) left in the backend, once `ls` or `rm` found them so. Best effort: says what it could not do in the
    /// log, never fails the caller. Nothing to do where the kernel already took everything down with the supervisor.
    fn reap(&self, _root: &Path) {}
}

/// One launch, driven by the recipe through its phases in order. Dropping it tears down what it started.
pub trait Launch {
    /// Step preflight, once the workspace is known: whether this backend can show it to the bottle.
    fn check_workspace(&self, _workspace: &Path) -> Result<(), BackendError> {
        Ok(())
    }
    /// After the lease and state directory exist, before the launcher starts a thread.
    fn begin(&mut self, spec: BottleSpec, dir: &StateDir) -> Result<(), BackendError>;
    /// The listener the bottle's proxy serves, and the URLs to publish.
    fn attach(&mut self) -> Result<Attachment, BackendError>;
    /// Plans, launches and waits until the bottle proves it is ready; `urls` as read back from the state directory.
    fn start(&mut self, services: &dyn Services, urls: &Urls) -> Result<Started, BackendError>;
    /// Runs the agent to its end; returns its exit code, and why the command could not start if it could not.
    fn wait(&mut self, services: &dyn Services) -> Result<Exit, BackendError>;
    /// Removes what the launch started. Idempotent; says what it could not undo.
    fn shutdown(&mut self) -> Result<(), TeardownError>;
}

/// How a backend failure maps to the launcher's documented exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The host cannot confine the bottle; `doctor` has the remedy (122).
    Preflight,
    /// The sandbox failed to start or its confinement could not be verified (123).
    Sandbox,
    /// The bottle's proxy could not be attached (124).
    Proxy,
    /// The policy asks for something this backend does not do (120).
    Unsupported,
    /// The bottle's recorded state does not allow the verb (119).
    Target,
}

/// A backend's failure: its own typed error (reachable with [`BackendError::downcast_ref`]) and how it maps to an
/// exit code. Displays as the inner error; its source is the inner error's source.
pub struct BackendError {
    class: FailureClass,
    inner: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl BackendError {
    pub fn new(class: FailureClass, inner: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            class,
            inner: Box::new(inner),
        }
    }

    pub fn class(&self) -> FailureClass {
        self.class
    }

    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.inner.downcast_ref::<T>()
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendError")
            .field("class", &self.class)
            .field("inner", &self.inner)
            .finish()
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source()
    }
}

/// A backend that exists in the policy language but not yet in this build.
#[derive(Debug, thiserror::Error)]
#[error("the {kind} backend is not available yet: {reason}")]
pub struct NotAvailable {
    pub kind: Kind,
    pub reason: &'static str,
}

/// What teardown could not undo; each item names what is left behind and how to remove it.
#[derive(Debug, Default)]
pub struct TeardownError {
    pub left: Vec<String>,
}

impl fmt::Display for TeardownError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.left.join("; "))
    }
}

impl std::error::Error for TeardownError {}

impl TeardownError {
    pub fn is_empty(&self) -> bool {
        self.left.is_empty()
    }

    pub fn into_result(self) -> Result<(), Self> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }
}

/// The registry: the backend a policy names. One line per backend.
pub fn for_kind(kind: Kind) -> Result<Box<dyn Backend>, BackendError> {
    match kind {
        Kind::Namespace => Ok(Box::new(crate::namespace::backend::Namespace)),
        Kind::Smolmachines => Ok(Box::new(crate::smolmachines::backend::Smolmachines::default())),
        Kind::Container => Ok(Box::new(crate::container::Container)),
    }
}
