//! The container backend: a Docker (or Podman, through its Docker-compatible socket) container per bottle, confined
//! as strictly as a namespace bottle. `--network none` (only `lo`); the proxy's listener is created from the host in
//! the container's network namespace at 127.0.0.1:3128, so the one way out is the bottle's proxy. All capabilities
//! dropped, `no-new-privileges`, the engine's seccomp profile, a read-only root with the workspace, home and mounts
//! bound and a tmpfs `/tmp`, never host root, labels `owner=bot-bottle`, `bottle=<name>`, limits read back.
//!
//! The agent waits at a gate (a FIFO) until the confinement was verified from inside the container's network
//! namespace (no interface but `lo`, no route, the proxy answers and refuses, a host loopback canary and a direct
//! address unreachable); only then is the gate opened. Trusts the engine as the user does; checks what it reports.

mod api;
mod gate;
mod image;
pub mod plan;
pub mod runtime;
pub mod sockets;
mod verify;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bottle_policy::Policy;

pub use api::{Api, ApiError, EngineInfo};

use crate::backend::{
    AgentIo, Attachment, Backend, BackendError, BottleSpec, Exit, FailureClass, Kind, Launch, Serve, Services, Started,
    TeardownError, Urls,
};
use crate::namespace::spec::{IN_BOTTLE_PROXY_PORT, bottle_env};
use crate::state::{self, BottleState, StateDir};

/// The state directory's folder shown read-only in the container (gate FIFO, CA bundle).
const SHARED_DIR: &str = "container";
use plan::CA_FILE;

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("step preflight: {0}")]
    Engine(#[from] ApiError),
    #[error(
        "step preflight: the container backend needs an image: `--image NAME` or `[bottle] image` (a local image, \
         one the engine can pull, or a `docker save` archive as `./FILE.tar`)"
    )]
    NoImage,
    #[error("step preflight: {0}")]
    Image(image::ImageError),
    #[error("step preflight: {0}")]
    Runtime(runtime::RuntimeError),
    #[error(
        "step preflight: the engine is rootless; container bottles need a rootful engine (the proxy's listener is put \
         into the container's network namespace from the host, which a rootless engine's user namespace keeps out{}): \
         point DOCKER_HOST at a rootful daemon's socket (`unix:///var/run/docker.sock`, or Podman's \
         `unix:///run/podman/podman.sock`), or use `--backend namespace`",
        rootless_limits(*.cgroup_v1)
    )]
    Rootless { cgroup_v1: bool },
    #[error(
        "step preflight: {}; {}",
        crate::preflight::container::NOT_ROOT_REASON,
        crate::preflight::container::NOT_ROOT_REMEDY
    )]
    NotRoot,
    #[error(
        "step preflight: as root, the container backend runs the agent as the workspace's owner, and {0} is owned by \
         root: `chown -R USER {0}`, or run bot-bottle as that user (a bottle never runs as host root)"
    )]
    RootWorkspace(PathBuf),
    #[error("step run: cannot open a terminal for the container")]
    Terminal(#[source] std::io::Error),
    #[error("step {step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("step {step}: the engine: {source}")]
    Api {
        step: &'static str,
        #[source]
        source: ApiError,
    },
    #[error("step start: the container's confinement could not be verified: {0}")]
    Verify(String),
    #[error("step start: the engine did not apply `{setting}` (asked {asked}, it reports {applied})")]
    Limit {
        setting: &'static str,
        asked: String,
        applied: String,
    },
    #[error("bottle `{0}` is not running")]
    NotRunning(String),
    #[error(
        "step begin: a container named `{0}` exists and is not this bottle's (another state root's, or not \
         bot-bottle's): name the bottle otherwise (--name), or remove it yourself (`docker rm -f {0}`)"
    )]
    NameTaken(String),
    #[error("a phase ran out of order: {0}")]
    Order(&'static str),
}

impl StepError {
    fn class(&self) -> FailureClass {
        match self {
            Self::Engine(_)
            | Self::NoImage
            | Self::Image(_)
            | Self::Rootless { .. }
            | Self::NotRoot
            | Self::RootWorkspace(_) => FailureClass::Preflight,
            Self::Runtime(runtime::RuntimeError::GvisorShare { .. }) => FailureClass::Unsupported,
            Self::Runtime(_) => FailureClass::Preflight,
            Self::NotRunning(_) => FailureClass::Target,
            Self::NameTaken(_) => FailureClass::Preflight,
            _ => FailureClass::Sandbox,
        }
    }
}

impl From<StepError> for BackendError {
    fn from(e: StepError) -> Self {
        BackendError::new(e.class(), e)
    }
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> StepError {
    move |source| StepError::Io { step, source }
}

fn api(step: &'static str) -> impl FnOnce(ApiError) -> StepError {
    move |source| StepError::Api { step, source }
}

#[derive(Debug, Default)]
pub struct Container;

impl Backend for Container {
    fn kind(&self) -> Kind {
        Kind::Container
    }

    fn check(&self, policy: &Policy) -> Result<(), BackendError> {
        if policy.bottle.image.is_none() {
            return Err(StepError::NoImage.into());
        }
        Ok(())
    }

    fn visible_host_paths(&self) -> Vec<PathBuf> {
        // The image's own filesystem, never the host's.
        Vec::new()
    }

    fn prepare(&self, root: &Path) -> Result<Box<dyn Launch>, BackendError> {
        if !rustix::process::geteuid().is_root() {
            return Err(StepError::NotRoot.into());
        }
        let api = Api::connect().map_err(StepError::Engine)?;
        let engine = api.info().map_err(StepError::Engine)?;
        if engine.rootless {
            return Err(StepError::Rootless {
                cgroup_v1: engine.cgroup_v1,
            }
            .into());
        }
        Ok(Box::new(ContainerLaunch {
            api,
            engine,
            confinement: None,
            gvisor: None,
            root: root.to_path_buf(),
            id: None,
            pid: None,
            dir: None,
            io: None,
            listener_ready: false,
            gate_opened: false,
            pass_env: BTreeMap::new(),
        }))
    }

    fn reap(&self, root: &Path) {
        // A daemon that does not answer soon is not waited for: `ls` must stay quick.
        match Api::connect_within(std::time::Duration::from_secs(3)) {
            Ok(api) => sweep(&api, root, ""),
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the container engine to remove containers of bottles that are gone")
            }
        }
    }

    fn exec(
        &self,
        _root: &Path,
        _dir: &StateDir,
        s: &BottleState,
        command: &[String],
        _forward_termination: &dyn Fn(u32),
    ) -> Result<u8, BackendError> {
        if !(s.is_live() && s.status == state::Status::Running) {
            return Err(StepError::NotRunning(s.name.to_string()).into());
        }
        let engine = Api::connect().map_err(StepError::Engine)?;
        let runtime = sockets::Runtime::of_this_process().map_err(io("exec"))?;
        let id = plan::container_name(s.name.as_str());
        let confinement = confinement_of(&engine, &id)?;
        let command = plan::with_env(&runtime, confinement, command);
        // With the user's terminal on both ends, the command gets a terminal of its own in the container.
        let code = if std::io::IsTerminal::is_terminal(&std::io::stdin())
            && std::io::IsTerminal::is_terminal(&std::io::stdout())
        {
            engine.exec_terminal(&id, &command)
        } else {
            engine.exec(&id, &command)
        }
        .map_err(api("exec"))?;
        Ok(u8::try_from(code).unwrap_or(1))
    }
}

pub struct ContainerLaunch {
    api: Api,
    /// The engine as `prepare` found it (its runtimes among it).
    engine: EngineInfo,
    /// How the container keeps host sockets out, once chosen.
    confinement: Option<runtime::Confinement>,
    /// Under gVisor: what its check inside the container needs, made before the container starts.
    gvisor: Option<verify::GvisorChecks>,
    root: PathBuf,
    /// The container, once created.
    id: Option<String>,
    /// Its first process on the host, once started.
    pid: Option<u32>,
    dir: Option<PathBuf>,
    io: Option<AgentIo>,
    listener_ready: bool,
    /// Whether the agent was let through the gate.
    gate_opened: bool,
    /// SECURITY: in memory only, until the gate hands them to the agent.
    pass_env: BTreeMap<String, String>,
}

/// The uid and gid the agent runs as: the launcher's, or for a root launcher the workspace owner's (never 0).
fn agent_user(workspace: &Path) -> Result<(u32, u32), StepError> {
    let (uid, gid) = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
    if uid != 0 {
        return Ok((uid, not_root_group(gid)));
    }
    let meta = std::fs::metadata(workspace).map_err(io("preflight"))?;
    if meta.uid() == 0 {
        return Err(StepError::RootWorkspace(workspace.to_path_buf()));
    }
    Ok((meta.uid(), not_root_group(meta.gid())))
}

/// What `StepError::Rootless` adds on a cgroup v1 host (measured: rootless Podman there says "Resource limits are
/// not supported and ignored on cgroups V1 rootless systems" and reads back no limit).
fn rootless_limits(cgroup_v1: bool) -> &'static str {
    if cgroup_v1 {
        "; and on this cgroup v1 host a rootless engine ignores every resource limit"
    } else {
        ""
    }
}

/// The group the agent runs in: never the host's root group (a container shares the host's ids, so gid 0 would read
/// and write what the host's root group may in every bind), `nogroup` instead. The agent owns its workspace as its
/// user, so the group changes nothing it needs (`chown -R USER DIR` leaves a root-made directory's group root).
fn not_root_group(gid: u32) -> u32 {
    if gid == 0 { NOGROUP } else { gid }
}

const NOGROUP: u32 = 65534;

impl Launch for ContainerLaunch {
    fn begin(&mut self, spec: BottleSpec, dir: &StateDir) -> Result<(), BackendError> {
        let named = spec.image.clone().ok_or(StepError::NoImage)?;
        // The runtime first: a launch that cannot keep its promises pulls nothing.
        let oci = runtime::choose(
            spec.runtime.as_deref(),
            self.engine.default_runtime.as_deref(),
            &self.engine.runtimes,
            !spec.share_sockets.is_empty(),
        )
        .map_err(StepError::Runtime)?;
        // A local image as it is; an archive loaded; a missing image pulled (progress on stderr).
        let image = image::ensure(&self.api, &named, &mut std::io::stderr()).map_err(StepError::Image)?;
        let user = agent_user(&spec.workspace)?;
        if let Some(home) = &spec.home {
            home_for(home, &self.root, user)?;
        }
        sweep(&self.api, &self.root, spec.name.as_str());
        // The gate and the CA bundle: a folder of the state directory, shown read-only. The bundle is written in
        // place at `start` (the bind holds its inode).
        let shared = dir.path.join(SHARED_DIR);
        std::fs::create_dir(&shared).map_err(io("begin"))?;
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).map_err(io("begin"))?;
        rustix::fs::mknodat(
            rustix::fs::CWD,
            shared.join(plan::GATE),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .map_err(|e| StepError::Io {
            step: "begin",
            source: e.into(),
        })?;
        let workdir = spec.workspace.as_os_str().as_encoded_bytes().to_vec();
        for (file, contents) in [
            (CA_FILE, Vec::new()),
            (
                plan::RESOLV_FILE,
                b"# no resolver: a bottle reaches the network only through its proxy\n".to_vec(),
            ),
            (plan::ENV_FILE, Vec::new()),
            (plan::WORKDIR_FILE, workdir),
        ] {
            let path = shared.join(file);
            std::fs::write(&path, contents).map_err(io("begin"))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).map_err(io("begin"))?;
        }
        // The CA bundle is bound where every bottle has it (plan.rs), so the environment names the usual path.
        // `pass_env` values stay out of the container's config (the engine writes it to disk): the gate hands them over.
        let env = bottle_env(Path::new(plan::HOME), &spec.env);
        // Every connect in the container goes through the socket warden, served from here once the container runs
        // (gVisor refuses the warden's listener and keeps host sockets out itself: checked at `start`).
        let runtime = sockets::Runtime::of_this_process().map_err(io("begin"))?;
        let warden = match oci.confinement {
            runtime::Confinement::Warden => {
                Some(sockets::listen(&shared.join(sockets::WARDEN_SOCK)).map_err(io("begin"))?)
            }
            runtime::Confinement::Gvisor => {
                self.gvisor = Some(verify::GvisorChecks::prepare(&shared)?);
                None
            }
        };
        let body = plan::plan(&plan::Inputs {
            spec: &spec,
            image: &image,
            user,
            shared_dir: &shared,
            env: &env,
            root: &self.root,
            runtime: &runtime,
            oci: &oci,
        });
        self.confinement = Some(oci.confinement);
        let name = plan::container_name(spec.name.as_str());
        // A container of this name left by a killed launch of this bottle (the lease says nobody holds the name) is
        // removed; one that is not this state root's bottle is never touched.
        if let Some(labels) = self.api.labels_of(&name).map_err(api("begin"))? {
            let ours = labels.get(plan::ROOT_LABEL).map(String::as_str) == Some(&*self.root.to_string_lossy())
                && labels.get(plan::OWNER_LABEL.0).map(String::as_str) == Some(plan::OWNER_LABEL.1);
            if !ours {
                return Err(StepError::NameTaken(name).into());
            }
            self.api.remove(&name).map_err(api("begin"))?;
        }
        let id = self.api.create(&name, body).map_err(api("create"))?;
        self.id = Some(id.clone());
        self.dir = Some(dir.path.clone());
        self.api.start(&id).map_err(api("start"))?;
        let inspected = self.api.inspect(&id).map_err(api("start"))?;
        let pid = inspected
            .state
            .as_ref()
            .and_then(|s| s.pid)
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| StepError::Verify("the engine reports no process for the container".into()))?;
        self.pid = Some(pid);
        if let Some(warden) = warden {
            sockets::serve(warden, pid, spec.share_sockets.clone()).map_err(io("start"))?;
        }
        self.pass_env = spec.pass_env.clone();
        verify::check_limits(&spec, &inspected)?;
        self.io = Some(spec.io);
        Ok(())
    }

    fn attach(&mut self) -> Result<Attachment, BackendError> {
        let pid = self.pid.ok_or(StepError::Order("attach before begin"))?;
        let listener = crate::sys::ns::in_netns_of(pid, || {
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, IN_BOTTLE_PROXY_PORT))
        })
        .map_err(io("bundle"))?;
        self.listener_ready = true;
        Ok(Attachment {
            listener,
            serve: Serve::Proxy,
            urls: Urls {
                proxy: format!("http://127.0.0.1:{IN_BOTTLE_PROXY_PORT}"),
                interceptor: None,
            },
        })
    }

    fn start(&mut self, services: &dyn Services, _urls: &Urls) -> Result<Started, BackendError> {
        let (pid, dir) = match (self.pid, &self.dir) {
            (Some(p), Some(d)) if self.listener_ready => (p, d.clone()),
            _ => return Err(StepError::Order("start before attach").into()),
        };
        let shared = dir.join(SHARED_DIR);
        gate::write_ca_bundle(&shared.join(CA_FILE), services.ca_pem()).map_err(io("start"))?;
        // The credentials' placeholders (made by the proxy after the container was created) reach the agent and
        // `exec` through a file the gate sources.
        gate::write_env(&shared.join(plan::ENV_FILE), &services.placeholders()).map_err(io("start"))?;
        match self.confinement {
            Some(runtime::Confinement::Warden) => verify::verify(pid)?,
            Some(runtime::Confinement::Gvisor) => {
                let checks = self.gvisor.take().ok_or(StepError::Order("start before begin"))?;
                verify::verify_gvisor(pid, checks)?;
            }
            None => return Err(StepError::Order("start before begin").into()),
        }
        // `stop` (SIGTERM to the supervisor) reaches the agent: the container's first process, seen from the host.
        services.forward_termination(pid);
        self.gate_opened = true;
        gate::open_gate(&shared.join(plan::GATE), &self.pass_env).map_err(io("start"))?;
        self.pass_env.clear();
        Ok(Started { init_pid: None })
    }

    fn wait(&mut self, services: &dyn Services) -> Result<Exit, BackendError> {
        let id = self.id.clone().ok_or(StepError::Order("wait before begin"))?;
        if matches!(self.io, Some(AgentIo::Terminal)) {
            let (master, peer) = local_pty().map_err(StepError::Terminal)?;
            let relay = services.relay_terminal(master).map_err(StepError::Terminal)?;
            let code = self.api.join_terminal(&id, peer).map_err(api("run"));
            relay.finish();
            return Ok(exit(code?));
        }
        type Sinks = (Box<dyn Write + Send>, Box<dyn Write + Send>);
        let follower: Option<Sinks> = match self.io.take() {
            Some(AgentIo::Log(file)) => Some((Box::new(file.try_clone().map_err(io("run"))?), Box::new(file))),
            Some(AgentIo::Inherit) => Some((Box::new(std::io::stdout()), Box::new(std::io::stderr()))),
            _ => None,
        };
        if let Some((mut out, mut err)) = follower {
            // Until the container ends (its output then ends too).
            let _ = self.api.follow_logs(&id, &mut out, &mut err);
        }
        Ok(exit(self.api.wait(&id).map_err(api("run"))?))
    }

    fn shutdown(&mut self) -> Result<(), TeardownError> {
        let mut left = TeardownError::default();
        let gvisor = self.confinement == Some(runtime::Confinement::Gvisor);
        if let (Some(dir), Some(_), false, true) = (&self.dir, &self.id, self.gate_opened, gvisor) {
            gate::turn_away(
                &dir.join(SHARED_DIR).join(plan::GATE),
                std::time::Duration::from_secs(2),
            );
        }
        if let Some(id) = self.id.take()
            && let Err(e) = self.api.remove(&id)
        {
            left.left.push(format!("container {id} ({e}): `docker rm -f {id}`"));
        }
        sweep(&self.api, &self.root, "");
        left.into_result()
    }
}

impl Drop for ContainerLaunch {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// How a running bottle's container keeps host sockets out: by the runtime the engine reports it runs under.
fn confinement_of(engine_api: &Api, id: &str) -> Result<runtime::Confinement, StepError> {
    let inspected = engine_api.inspect(id).map_err(api("exec"))?;
    let engine = engine_api.info().map_err(api("exec"))?;
    let name = inspected
        .host_config
        .and_then(|h| h.runtime)
        .filter(|r| !r.is_empty())
        .or(engine.default_runtime);
    let gvisor = name
        .and_then(|n| engine.runtimes.get(&n).cloned())
        .is_some_and(|r| runtime::is_gvisor(&r));
    Ok(if gvisor {
        runtime::Confinement::Gvisor
    } else {
        runtime::Confinement::Warden
    })
}

/// How the agent ended, from the container's exit code.
fn exit(code: i64) -> Exit {
    let code = u8::try_from(code).unwrap_or(1);
    let start_failure = match code {
        125 => Some("the agent never passed the gate (its confinement was not verified)".to_string()),
        126 | 127 => Some(format!(
            "the command could not be started in the container (exit {code}: {})",
            if code == 127 {
                "not found in the image"
            } else {
                "not executable"
            }
        )),
        _ => None,
    };
    Exit { code, start_failure }
}

/// A local pty pair: the master for the user's relay, the peer (raw) for the container's terminal.
fn local_pty() -> std::io::Result<(std::os::fd::OwnedFd, std::fs::File)> {
    use rustix::pty::OpenptFlags;
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::unlockpt(&master)?;
    let peer = rustix::pty::ioctl_tiocgptpeer(&master, OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    // The container's own terminal does the line discipline; this one passes bytes as they are.
    let mut raw = rustix::termios::tcgetattr(&peer)?;
    raw.make_raw();
    rustix::termios::tcsetattr(&peer, rustix::termios::OptionalActions::Now, &raw)?;
    Ok((master, std::fs::File::from(peer)))
}

/// A kept home the agent (not root) must own: bot-bottle's own homes are handed to it; another directory must be
/// its already.
fn home_for(home: &Path, root: &Path, (uid, gid): (u32, u32)) -> Result<(), StepError> {
    let meta = std::fs::metadata(home).map_err(io("preflight"))?;
    if meta.uid() == uid {
        return Ok(());
    }
    if home.starts_with(root) {
        return std::os::unix::fs::chown(home, Some(uid), Some(gid)).map_err(io("preflight"));
    }
    Err(StepError::Io {
        step: "preflight",
        source: std::io::Error::other(format!(
            "the home {} is not owned by uid {uid}, whom the agent runs as: `chown {uid}:{gid} {}` or choose another \
             with --home",
            home.display(),
            home.display()
        )),
    })
}

/// Removes containers of this state root whose bottle is gone (its state removed, or its supervisor dead: killed
/// with -9, so its own teardown never ran). `keep` is the bottle doing the sweep. Failures are logged, never fatal.
fn sweep(api: &Api, root: &Path, keep: &str) {
    let labels = [
        format!("{}={}", plan::OWNER_LABEL.0, plan::OWNER_LABEL.1),
        format!("{}={}", plan::ROOT_LABEL, root.display()),
    ];
    let Ok(found) = api.list_labelled(&labels) else {
        return;
    };
    for name in found {
        let Some(bottle) = name.strip_prefix("bot-bottle-") else {
            continue;
        };
        let Ok(bottle) = bottle_policy::BottleName::parse(bottle) else {
            continue;
        };
        if bottle.as_str() == keep {
            continue;
        }
        let gone = state::is_gone(root, bottle.as_str());
        if gone {
            match api.remove(&name) {
                Ok(()) => tracing::info!(container = %name, "removed the container of a bottle that is gone"),
                Err(e) => {
                    tracing::warn!(container = %name, error = %e, "cannot remove the container of a bottle that is gone")
                }
            }
        }
    }
}
