//! The namespace backend behind the `Backend` trait: `begin` clones the bottle init (the launcher has no thread
//! yet) into the bottle's namespaces, which it sets up while the launcher starts the proxy; `attach` is a host-side
//! listener on 127.0.0.N that refuses everyone (the bottle reaches its proxy on an in-namespace listener the init
//! hands over, and proves from inside that this address is unreachable); `start` writes the plan (`spec.json`), takes
//! the in-namespace listener for the proxy and waits for the init's self-test; `wait` relays the terminal and reaps.
//!
//! Trusts the init it cloned; trusts nothing the agent does after `go`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bottle_policy::Policy;

use super::ids;
use super::join::EXEC_SUBCOMMAND;
use super::launch::{self, LaunchError, Stdio3};
use super::spec::{EarlySpec, InitSpec, RealFs, UserMount, bottle_env, visible_host_paths};
use crate::backend::{
    AgentIo, Attachment, Backend, BackendError, BottleSpec, Exit, FailureClass, Kind, Launch, MountTarget, Relay,
    Serve, Services, Started, TeardownError, Urls,
};
use crate::state::{self, BottleState, StateDir, StateError};

/// Limits when the policy names none: a fork bomb stops at the bottle's own cap, and the bottle's memory (tmpfs
/// included) at half the host's RAM, at most 8 GiB.
const DEFAULT_PIDS: u64 = 4096;
const DEFAULT_MEMORY_MAX_BYTES: u64 = 8 << 30;
/// The smallest memory limit the namespace backend accepts: below it the init and a shell do not fit.
const MIN_MEMORY_MIB: u64 = 16;

/// How long the init may take to hand over its proxy listener, and to pass its self-test.
const LISTENER_TIMEOUT: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A failed step of a namespace launch or exec.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot open {what}")]
    Open {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on the bottle's address {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the bottle's urls.json has no usable proxy address: {0:?}")]
    Urls(String),
    #[error("cannot encode the plan")]
    Encode(#[source] serde_json::Error),
    #[error("the bottle init sent no terminal for the agent")]
    NoTerminal,
    #[error("the bottle init sent a terminal nobody asked for")]
    UnaskedTerminal,
    #[error("cannot relay the terminal")]
    Relay(#[source] std::io::Error),
    #[error("cannot wait for the bottle")]
    Wait(#[source] std::io::Error),
    #[error("a phase ran out of order: {0}")]
    Order(&'static str),
    #[error("the move of the bottle into its cgroup did not finish (its thread panicked)")]
    LimitsThread,
    #[error("cannot re-execute bot-bottle")]
    Reexec(#[source] std::io::Error),
    #[error(
        "the policy limits {what}, and this host cannot enforce it: {source}; run as root, or on a cgroup v2 host \
         under a delegated scope (`systemd-run --user --scope -p Delegate=yes bot-bottle run ...`), or remove the \
         limit from [bottle.resources]"
    )]
    LimitsUnavailable {
        what: String,
        #[source]
        source: crate::cgroup::CgroupError,
    },
    #[error("cannot set the bottle's resource limits")]
    Limits(#[source] crate::cgroup::CgroupError),
    #[error("memory_mib = {0} is too small for a bottle (at least {MIN_MEMORY_MIB})")]
    TooLittleMemory(u64),
    #[error(
        "`image` ({0}) is for the container and smolmachines backends; a namespace bottle shows this host's /usr: \
         remove it, or run with --backend container"
    )]
    Image(String),
    #[error(
        "`runtime` ({0}) is a container engine's runtime (gVisor: `runsc`); a namespace bottle runs on this host's \
         kernel: remove it, or run with --backend container"
    )]
    Runtime(String),
}

fn sandbox(e: impl Into<NamespaceError>) -> BackendError {
    BackendError::new(FailureClass::Sandbox, e.into())
}

#[derive(Debug, Default)]
pub struct Namespace;

impl Backend for Namespace {
    fn kind(&self) -> Kind {
        Kind::Namespace
    }

    fn check(&self, policy: &Policy) -> Result<(), BackendError> {
        // A written setting is enforced or refused: a namespace bottle has no image to run.
        if let Some(image) = &policy.bottle.image {
            return Err(BackendError::new(
                FailureClass::Unsupported,
                NamespaceError::Image(image.clone()),
            ));
        }
        if let Some(runtime) = &policy.bottle.runtime {
            return Err(BackendError::new(
                FailureClass::Unsupported,
                NamespaceError::Runtime(runtime.clone()),
            ));
        }
        match policy.bottle.resources.memory_mib {
            Some(mib) if mib < MIN_MEMORY_MIB => Err(BackendError::new(
                FailureClass::Unsupported,
                NamespaceError::TooLittleMemory(mib),
            )),
            _ => Ok(()),
        }
    }

    fn visible_host_paths(&self) -> Vec<PathBuf> {
        visible_host_paths(&RealFs)
    }

    fn prepare(&self, _root: &Path) -> Result<Box<dyn Launch>, BackendError> {
        // The full preflight forks probes; the recipe runs it when a launch fails, to turn the failure into a
        // remedy. The launch itself fails closed on anything the probes would have found.
        Ok(Box::new(NamespaceLaunch {
            cgroup_ns: Path::new("/proc/self/ns/cgroup").exists(),
            ..NamespaceLaunch::default()
        }))
    }

    fn exec(
        &self,
        _root: &Path,
        dir: &StateDir,
        s: &BottleState,
        command: &[String],
        _forward_termination: &dyn Fn(u32),
    ) -> Result<u8, BackendError> {
        let (true, Some(init)) = (s.is_live(), s.init_pid) else {
            return Err(BackendError::new(
                FailureClass::Target,
                StateError::NotRunning(s.name.to_string()),
            ));
        };
        // `pass_env` values are not on disk (the spec lists their names): the command gets the current values of
        // the user running `exec`, as the agent got the launcher's.
        let passed: Vec<(String, String)> = std::fs::read(dir.file(state::SPEC_FILE))
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
            .arg(dir.file(state::SPEC_FILE))
            .arg(init.to_string())
            .arg(s.supervisor_pid.to_string())
            .arg("--")
            .args(command)
            .exec();
        Err(sandbox(NamespaceError::Reexec(err)))
    }
}

/// Its fields' own drops undo it: the init is killed (and with it the bottle), the terminal master closed.
#[derive(Default)]
struct NamespaceLaunch {
    cgroup_ns: bool,
    spec: Option<BottleSpec>,
    dir: Option<PathBuf>,
    terminal: bool,
    /// The cloned init; dropping it kills the bottle.
    init: Option<launch::Bottle>,
    /// The bottle's cgroup, removed after the init (dropped after it: fields drop in order).
    cgroup: Option<crate::cgroup::Cgroup>,
    tmpfs_bytes: Option<u64>,
    master: Option<std::os::fd::OwnedFd>,
    /// See `InitSpec::host_id`.
    host_id: Option<u32>,
    /// The init's move into its cgroup, under way (see `Cgroup::add_in_background`).
    moving: Option<std::thread::JoinHandle<Result<(), crate::cgroup::CgroupError>>>,
}

impl NamespaceLaunch {
    fn spec(&self) -> Result<&BottleSpec, BackendError> {
        self.spec.as_ref().ok_or(sandbox(NamespaceError::Order("begin")))
    }

    fn init(&mut self) -> Result<&mut launch::Bottle, BackendError> {
        self.init.as_mut().ok_or(sandbox(NamespaceError::Order("begin")))
    }
}

impl Launch for NamespaceLaunch {
    fn begin(&mut self, spec: BottleSpec, dir: &StateDir) -> Result<(), BackendError> {
        self.terminal = matches!(spec.io, AgentIo::Terminal);
        let stdio = match &spec.io {
            AgentIo::Log(log) => {
                let open = |source| NamespaceError::Open {
                    what: "the agent log",
                    source,
                };
                let null = std::fs::File::open("/dev/null").map_err(|source| {
                    sandbox(NamespaceError::Open {
                        what: "/dev/null",
                        source,
                    })
                })?;
                Stdio3 {
                    stdin: Some(null.into()),
                    stdout: Some(log.try_clone().map_err(|e| sandbox(open(e)))?.into()),
                    stderr: Some(log.try_clone().map_err(|e| sandbox(open(e)))?.into()),
                }
            }
            AgentIo::Terminal | AgentIo::Inherit => Stdio3::inherit(),
        };
        // SECURITY (#12): a root launcher's bottle runs as a host id of its own, never as host root.
        self.host_id = if rustix::process::getuid().is_root() {
            Some(ids::check_free(spec.addr).map_err(|e| BackendError::new(FailureClass::Preflight, e))?)
        } else {
            None
        };
        let early = EarlySpec {
            name: spec.name.as_str().to_owned(),
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            cgroup_ns: self.cgroup_ns,
            host_id: self.host_id,
            pass_env: spec.pass_env.clone(),
        };
        let (limits, explicit) = limits(&spec);
        // The cgroup exists before the init does, so nothing of the bottle ever runs outside it.
        let cgroup = match cgroup_for(&spec, &limits) {
            Ok(cgroup) => Some(cgroup),
            Err(NamespaceError::LimitsUnavailable { source, .. }) if explicit.is_empty() => {
                tracing::warn!(
                    reason = %source,
                    "the bottle runs without its default memory and process limits (tmpfs sizes stay bounded)"
                );
                None
            }
            Err(NamespaceError::LimitsUnavailable { source, .. }) => {
                return Err(BackendError::new(
                    FailureClass::Preflight,
                    NamespaceError::LimitsUnavailable {
                        what: explicit.join(", "),
                        source,
                    },
                ));
            }
            Err(e) => return Err(sandbox(e)),
        };
        // Half the memory limit each: a full /tmp fails a write with ENOSPC before the bottle's memory runs out.
        self.tmpfs_bytes = limits.memory_bytes.map(|b| (b / 2) & !((1 << 20) - 1));
        // SECURITY: `pass_env` values go to the init in memory only; the spec file on disk lists their names.
        let init = launch::spawn(&dir.file(state::SPEC_FILE), &early, stdio).map_err(sandbox)?;
        // Done before the init may read its spec (`start` joins it): the agent and everything it starts are children
        // of a moved init.
        self.moving = cgroup.as_ref().map(|c| c.add_in_background(init.pid()));
        self.init = Some(init);
        self.cgroup = cgroup;
        self.dir = Some(dir.path.clone());
        self.spec = Some(spec);
        Ok(())
    }

    fn attach(&mut self) -> Result<Attachment, BackendError> {
        let addr = SocketAddr::from((self.spec()?.addr, 0));
        let listen = |source| BackendError::new(FailureClass::Proxy, NamespaceError::Listen { addr, source });
        let listener = TcpListener::bind(addr).map_err(listen)?;
        let bound = listener.local_addr().map_err(listen)?;
        // The bottle reaches its proxy only on its in-namespace listener; this address serves nobody (#12), and the
        // init proves from inside that it cannot reach it (the canary).
        Ok(Attachment {
            listener,
            serve: Serve::Refuse,
            urls: Urls {
                proxy: format!("http://{bound}"),
                interceptor: None,
            },
        })
    }

    fn start(&mut self, services: &dyn Services, urls: &Urls) -> Result<Started, BackendError> {
        let canary: SocketAddr = urls
            .proxy
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| sandbox(NamespaceError::Urls(urls.proxy.clone())))?;
        let spec = self.spec()?;
        let dir = StateDir {
            path: self.dir.clone().ok_or(sandbox(NamespaceError::Order("begin")))?,
        };
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        // step: plan
        let home = PathBuf::from(if uid == 0 { "/root" } else { "/home/agent" });
        let mut env: BTreeMap<String, String> = spec.env.clone();
        env.extend(services.placeholders());
        let mounts: Vec<UserMount> = spec
            .mounts
            .iter()
            .map(|m| UserMount {
                from: m.source.clone(),
                at: match &m.target {
                    MountTarget::Absolute(at) => at.clone(),
                    MountTarget::InHome(rel) => home.join(rel),
                },
                writable: m.writable,
            })
            .collect();
        // Mounted tool directories come first on PATH (`~/.cargo` → its `bin`), before the user's or the default.
        let tool_dirs: Vec<String> = mounts
            .iter()
            .filter_map(|m| {
                if m.from.join("bin").is_dir() {
                    Some(m.at.join("bin"))
                } else if m.from.is_dir() && m.from.file_name().is_some_and(|n| n == "bin") {
                    Some(m.at.clone())
                } else {
                    None
                }
            })
            .map(|p| p.display().to_string())
            .collect();
        let mut env = bottle_env(&home, &env);
        if !tool_dirs.is_empty()
            && let Some(path) = env.get_mut("PATH")
        {
            *path = format!("{}:{path}", tool_dirs.join(":"));
        }
        let plan = InitSpec {
            name: spec.name.as_str().to_owned(),
            root: dir.file(state::ROOT_DIR),
            uid,
            gid,
            host_id: self.host_id,
            workspace: spec.workspace.clone(),
            env,
            mounts,
            share_sockets: spec.share_sockets.clone(),
            home_source: spec.home.clone(),
            pass_env: spec.pass_env.keys().cloned().collect(),
            home,
            bottle_ca: services.ca_pem().to_owned(),
            argv: spec.argv.clone(),
            cgroup_ns: self.cgroup_ns,
            canary: Some(canary),
            tmpfs_bytes: self.tmpfs_bytes,
            tty: self.terminal,
            tty_size: self
                .terminal
                .then(|| rustix::termios::tcgetwinsize(std::io::stdin()).ok())
                .flatten()
                .map(|w| (w.ws_row, w.ws_col)),
        };
        let bytes = serde_json::to_vec(&plan).map_err(|e| sandbox(NamespaceError::Encode(e)))?;
        dir.create_file(state::SPEC_FILE, &bytes).map_err(sandbox)?;
        // step: launch (the init has built the namespaces meanwhile and reads the spec now)
        let trees = plan.trees();
        if let Some(moving) = self.moving.take() {
            moving
                .join()
                .map_err(|_| sandbox(NamespaceError::LimitsThread))?
                .map_err(|e| sandbox(NamespaceError::Limits(e)))?;
        }
        let init = self.init()?;
        init.send_trees(&trees).map_err(sandbox)?;
        init.spec_written().map_err(sandbox)?;
        let listener = init.proxy_listener(LISTENER_TIMEOUT).map_err(sandbox)?;
        services.serve(listener, Serve::Proxy);
        // step: ready (the init proves from inside that the proxy answers and nothing else does)
        let master = init.go_and_wait_ready(READY_TIMEOUT).map_err(sandbox)?;
        let pid = init.pid();
        // SECURITY: the spec asked for a terminal only if the user has one; a master that did not come is an error,
        // not a reason to hand the agent the user's own terminal.
        match (self.terminal, &master) {
            (true, None) => return Err(sandbox(NamespaceError::NoTerminal)),
            (false, Some(_)) => return Err(sandbox(NamespaceError::UnaskedTerminal)),
            _ => {}
        }
        self.master = master;
        Ok(Started { init_pid: Some(pid) })
    }

    fn wait(&mut self, services: &dyn Services) -> Result<Exit, BackendError> {
        let init = self.init.take().ok_or(sandbox(NamespaceError::Order("start")))?;
        services.forward_termination(init.pid());
        let relay: Option<Box<dyn Relay>> = match self.master.take() {
            Some(master) => Some(
                services
                    .relay_terminal(master)
                    .map_err(|e| sandbox(NamespaceError::Relay(e)))?,
            ),
            None => None,
        };
        let (status, start_failure) = init.wait().map_err(|e| sandbox(NamespaceError::Wait(e)))?;
        if let Some(relay) = relay {
            relay.finish();
        }
        Ok(Exit {
            code: exit_code(status),
            start_failure,
        })
    }

    fn shutdown(&mut self) -> Result<(), TeardownError> {
        // Dropping the init kills it, and with it every process in the bottle; the kernel removes the namespaces.
        self.master = None;
        self.init = None;
        let mut left = TeardownError::default();
        if let Some(mut cgroup) = self.cgroup.take()
            && let Err(e) = cgroup.remove()
        {
            left.left.push(format!("the bottle's cgroup is left behind ({e})"));
        }
        // The plan goes with the bottle (it holds no secret: `pass_env` values and the CA key never were on disk).
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_file(dir.join(state::SPEC_FILE));
        }
        left.into_result()
    }
}

/// The limits for `spec` (the policy's, else the defaults) and the names of those the policy wrote.
fn limits(spec: &BottleSpec) -> (crate::cgroup::Limits, Vec<String>) {
    let mut explicit = Vec::new();
    if let Some(mib) = spec.memory_mib {
        explicit.push(format!("memory to {mib} MiB"));
    }
    if let Some(n) = spec.pids {
        explicit.push(format!("processes to {n}"));
    }
    if let Some(n) = spec.cpus {
        explicit.push(format!("cpus to {n}"));
    }
    let half_ram = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(DEFAULT_MEMORY_MAX_BYTES, |kib| kib * 1024 / 2);
    // Whole MiB, so the kernel keeps the value as written (it rounds to pages).
    let default_memory = half_ram.min(DEFAULT_MEMORY_MAX_BYTES) & !((1 << 20) - 1);
    let limits = crate::cgroup::Limits {
        memory_bytes: Some(spec.memory_mib.map_or(default_memory, |mib| mib << 20)),
        pids: Some(spec.pids.map_or(DEFAULT_PIDS, u64::from)),
        cpus: spec.cpus,
    };
    (limits, explicit)
}

/// The bottle's cgroup with `limits` written and read back.
fn cgroup_for(spec: &BottleSpec, limits: &crate::cgroup::Limits) -> Result<crate::cgroup::Cgroup, NamespaceError> {
    use crate::cgroup;
    let unavailable = |source| NamespaceError::LimitsUnavailable {
        what: String::new(),
        source,
    };
    let self_cgroup = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| {
        unavailable(cgroup::CgroupError::Unavailable {
            reason: format!("cannot read /proc/self/cgroup: {e}"),
        })
    })?;
    let root = rustix::process::geteuid().is_root();
    let hierarchy = cgroup::detect(Path::new(cgroup::CGROUP_ROOT), &self_cgroup, root).map_err(unavailable)?;
    let plan = cgroup::plan(&hierarchy, spec.name.as_str(), limits);
    cgroup::Cgroup::create(&plan).map_err(NamespaceError::Limits)
}

/// The agent's exit code; a signal death reads as 128 + the signal, as a shell reports it.
pub fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(u8::MAX),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(u8::MAX),
        _ => u8::MAX,
    }
}
