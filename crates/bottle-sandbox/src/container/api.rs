//! The Docker Engine API (Docker's socket, `$DOCKER_HOST`, or Podman's Docker-compatible socket) through bollard,
//! each call on a small runtime of this module's own, so the backend stays synchronous like the others. Trusts the
//! daemon as the user does (it is root on the host); treats what it says about a container as data to check.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;

/// Bound on one API call that should answer at once (not `wait` or `logs`).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "cannot reach the container engine ({0}); start it (`sudo dockerd &`, `sudo systemctl start docker`) or set DOCKER_HOST"
    )]
    Connect(String),
    #[error("the container engine did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the container engine refused: {0}")]
    Engine(String),
    #[error("cannot start the engine client's runtime")]
    Runtime(#[source] std::io::Error),
}

/// Without `$DOCKER_HOST`, the engine's socket as `doctor` finds it: Docker's, else rootful Podman's (its
/// Docker-compatible API). `None`: bollard's defaults (`$DOCKER_HOST`, or Docker's socket, which then says it is
/// missing).
fn local_socket() -> Option<String> {
    if std::env::var_os("DOCKER_HOST").is_some() {
        return None;
    }
    ["/var/run/docker.sock", "/run/podman/podman.sock"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(|p| format!("unix://{p}"))
}

/// A connection to the engine.
pub struct Api {
    pub(super) docker: Docker,
    pub(super) rt: tokio::runtime::Runtime,
    /// The engine's Unix socket, when it is reached through one.
    socket: Option<std::path::PathBuf>,
    /// What the engine said of its version when connected.
    version: bollard::models::SystemVersion,
}

/// `MAJOR.MINOR` of an API version as the engine writes it (`1.41`).
fn client_version(api: &str) -> Option<bollard::ClientVersion> {
    let (major, minor) = api.split_once('.')?;
    Some(bollard::ClientVersion {
        major_version: major.parse().ok()?,
        minor_version: minor.parse().ok()?,
    })
}

/// The path of the engine's Unix socket: `local` (found by `local_socket`) or `DOCKER_HOST`'s `unix://` path.
fn socket_path(local: Option<&str>) -> Option<std::path::PathBuf> {
    let host = match local {
        Some(l) => l.to_string(),
        None => std::env::var("DOCKER_HOST").ok()?,
    };
    host.strip_prefix("unix://").map(std::path::PathBuf::from)
}

/// Whether the engine listening at `socket` runs as a user rather than root: its socket is that user's. Rootless
/// Podman does not say so where Docker does (`name=rootless` in `SecurityOptions`); its socket does.
fn socket_not_roots(socket: &std::path::Path) -> bool {
    std::fs::metadata(socket).is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) != 0)
}

/// What `doctor` and the preflight say about the engine.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub version: String,
    pub api_version: String,
    /// Podman answers with its own name in the components.
    pub podman: bool,
    pub rootless: bool,
    /// The host's cgroups are v1 (where a rootless engine ignores every resource limit).
    pub cgroup_v1: bool,
    /// The runtime a container gets when none is named.
    pub default_runtime: Option<String>,
    pub runtimes: BTreeMap<String, super::runtime::Registered>,
}

impl Api {
    pub fn connect() -> Result<Self, ApiError> {
        Self::connect_within(CALL_TIMEOUT)
    }

    /// As `connect`, giving up after `timeout` when the daemon does not answer.
    pub fn connect_within(timeout: Duration) -> Result<Self, ApiError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ApiError::Runtime)?;
        let local = local_socket();
        let socket = socket_path(local.as_deref());
        let docker = match &local {
            Some(path) => Docker::connect_with_socket(path, 120, bollard::API_DEFAULT_VERSION),
            None => Docker::connect_with_local_defaults(),
        }
        .map_err(|e| ApiError::Connect(e.to_string()))?;
        // The daemon may be older than the client's API (Debian's 20.10 speaks 1.41): speak the daemon's. Through a
        // Unix socket its `/version` (the request bollard's negotiation makes) is asked once; `info` uses it too.
        let version = rt
            .block_on(async { tokio::time::timeout(timeout, docker.version()).await })
            .map_err(|_| ApiError::Timeout(timeout))?
            .map_err(|e| ApiError::Connect(e.to_string()))?;
        let spoken = version.api_version.as_deref().and_then(client_version);
        let docker = match (&socket, spoken) {
            (Some(path), Some(v)) if v < *bollard::API_DEFAULT_VERSION => {
                Docker::connect_with_socket(&path.to_string_lossy(), 120, &v)
                    .map_err(|e| ApiError::Connect(e.to_string()))?
            }
            (Some(_), Some(_)) => docker,
            _ => rt
                .block_on(async { tokio::time::timeout(timeout, docker.negotiate_version()).await })
                .map_err(|_| ApiError::Timeout(timeout))?
                .map_err(|e| ApiError::Connect(e.to_string()))?,
        };
        Ok(Self {
            docker,
            rt,
            socket,
            version,
        })
    }

    fn call<T>(&self, f: impl std::future::Future<Output = Result<T, bollard::errors::Error>>) -> Result<T, ApiError> {
        self.rt
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, f).await })
            .map_err(|_| ApiError::Timeout(CALL_TIMEOUT))?
            .map_err(|e| ApiError::Engine(e.to_string()))
    }

    pub fn info(&self) -> Result<EngineInfo, ApiError> {
        let version = self.version.clone();
        let info = self.call(self.docker.info())?;
        let podman = version
            .components
            .unwrap_or_default()
            .iter()
            .any(|c| c.name.to_ascii_lowercase().contains("podman"));
        let rootless = info
            .security_options
            .unwrap_or_default()
            .iter()
            .any(|o| o.contains("rootless"))
            || self.socket.as_deref().is_some_and(socket_not_roots);
        let cgroup_v1 = info.cgroup_version == Some(bollard::models::SystemInfoCgroupVersionEnum::_1);
        let runtimes = info
            .runtimes
            .unwrap_or_default()
            .into_iter()
            .map(|(name, r)| {
                let registered = super::runtime::Registered {
                    path: r.path.unwrap_or_else(|| name.clone()),
                    args: r.runtime_args.unwrap_or_default(),
                };
                (name, registered)
            })
            .collect();
        Ok(EngineInfo {
            version: version.version.unwrap_or_default(),
            api_version: version.api_version.unwrap_or_default(),
            podman,
            rootless,
            cgroup_v1,
            default_runtime: info.default_runtime,
            runtimes,
        })
    }

    /// Whether the image is here.
    pub fn has_image(&self, image: &str) -> Result<bool, ApiError> {
        match self.rt.block_on(self.docker.inspect_image(image)) {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(false),
            Err(e) => Err(ApiError::Engine(e.to_string())),
        }
    }

    /// The labels of the container `name`, or `None` when there is none of that name.
    pub fn labels_of(&self, name: &str) -> Result<Option<HashMap<String, String>>, ApiError> {
        match self.rt.block_on(self.docker.inspect_container(name, None)) {
            Ok(c) => Ok(Some(c.config.and_then(|c| c.labels).unwrap_or_default())),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(ApiError::Engine(e.to_string())),
        }
    }

    pub fn create(&self, name: &str, body: ContainerCreateBody) -> Result<String, ApiError> {
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        Ok(self.call(self.docker.create_container(Some(options), body))?.id)
    }

    pub fn start(&self, id: &str) -> Result<(), ApiError> {
        self.call(self.docker.start_container(id, None))
    }

    pub fn inspect(&self, id: &str) -> Result<ContainerInspectResponse, ApiError> {
        self.call(self.docker.inspect_container(id, None))
    }

    /// Removes the container and what it was given (anonymous volumes), running or not. A container already gone is
    /// not an error.
    pub fn remove(&self, id: &str) -> Result<(), ApiError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
        match self.rt.block_on(self.docker.remove_container(id, Some(options))) {
            Ok(()) | Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(e) => Err(ApiError::Engine(e.to_string())),
        }
    }

    /// Names of the containers carrying every label in `labels` (`key=value`), running or not.
    pub fn list_labelled(&self, labels: &[String]) -> Result<Vec<String>, ApiError> {
        let filters: HashMap<String, Vec<String>> = HashMap::from([("label".to_string(), labels.to_vec())]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let found = self.call(self.docker.list_containers(Some(options)))?;
        Ok(found
            .into_iter()
            .filter_map(|c| c.names.and_then(|n| n.into_iter().next()))
            .map(|n| n.trim_start_matches('/').to_string())
            .collect())
    }

    /// Waits for the container's end: its exit code.
    pub fn wait(&self, id: &str) -> Result<i64, ApiError> {
        self.rt.block_on(exit_code(&self.docker, id))
    }

    /// Copies the container's output (both streams) to `out` and `err` until the container ends.
    pub fn follow_logs(
        &self,
        id: &str,
        out: &mut dyn std::io::Write,
        err: &mut dyn std::io::Write,
    ) -> Result<(), ApiError> {
        let options = LogsOptionsBuilder::default()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .build();
        let mut stream = self.docker.logs(id, Some(options));
        self.rt.block_on(async {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(bollard::container::LogOutput::StdErr { message }) => {
                        let _ = err.write_all(&message).and_then(|()| err.flush());
                    }
                    Ok(other) => {
                        let _ = out.write_all(&other.into_bytes()).and_then(|()| out.flush());
                    }
                    Err(e) => return Err(ApiError::Engine(e.to_string())),
                }
            }
            Ok(())
        })
    }

    /// Runs `command` in the running container `id` (as its user, with its environment), its output copied to ours;
    /// returns its exit code.
    pub fn exec(&self, id: &str, command: &[String]) -> Result<i64, ApiError> {
        use bollard::exec::{CreateExecOptions, StartExecResults};
        let created = self.call(self.docker.create_exec(
            id,
            CreateExecOptions {
                cmd: Some(command.to_vec()),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        ))?;
        let started = self.call(self.docker.start_exec(&created.id, None))?;
        if let StartExecResults::Attached { mut output, .. } = started {
            self.rt.block_on(async {
                use std::io::Write;
                while let Some(Ok(item)) = output.next().await {
                    match item {
                        bollard::container::LogOutput::StdErr { message } => {
                            let _ = std::io::stderr().write_all(&message);
                        }
                        other => {
                            let _ = std::io::stdout().write_all(&other.into_bytes());
                            let _ = std::io::stdout().flush();
                        }
                    }
                }
            });
        }
        let inspected = self.call(self.docker.inspect_exec(&created.id))?;
        Ok(inspected.exit_code.unwrap_or(-1))
    }
}

/// Waits for container `id`'s end: its exit code.
async fn exit_code(docker: &Docker, id: &str) -> Result<i64, ApiError> {
    match docker.wait_container(id, None).next().await {
        Some(Ok(r)) => Ok(r.status_code),
        // bollard reports a non-zero exit as an error carrying the code.
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
        Some(Err(e)) => Err(ApiError::Engine(e.to_string())),
        None => Err(ApiError::Engine("the wait ended without a status".into())),
    }
}

/// The container's side of a terminal session (bollard's attach or exec streams).
type Output = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<bollard::container::LogOutput, bollard::errors::Error>> + Send>,
>;
type Input = std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

/// The two ends of a terminal session: where keys come from and output goes, and whose size the agent's follows.
struct Ends {
    keys: std::fs::File,
    screen: std::fs::File,
    size_of: std::fs::File,
}

impl Api {
    /// Joins the container's terminal to `peer` (the bottle side of a local pty whose master the user's terminal is
    /// relayed to) until the container ends. Returns the container's exit code.
    pub fn join_terminal(&self, id: &str, peer: std::fs::File) -> Result<i64, ApiError> {
        use bollard::query_parameters::{AttachContainerOptionsBuilder, ResizeContainerTTYOptionsBuilder};
        let options = AttachContainerOptionsBuilder::default()
            .stdin(true)
            .stdout(true)
            .stderr(true)
            .stream(true)
            // What the agent printed before the attach (it starts at the gate, just before) is replayed.
            .logs(true)
            .build();
        let attached = self.call(self.docker.attach_container(id, Some(options)))?;
        let dup = |f: &std::fs::File| f.try_clone().map_err(|e| ApiError::Engine(e.to_string()));
        let ends = Ends {
            keys: dup(&peer)?,
            size_of: dup(&peer)?,
            screen: peer,
        };
        let (docker, resize_docker, id_owned) = (self.docker.clone(), self.docker.clone(), id.to_string());
        let resize_id = id_owned.clone();
        let end = async move { exit_code(&docker, &id_owned).await };
        let resize = move |h: u16, w: u16| -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
            let (docker, id) = (resize_docker.clone(), resize_id.clone());
            Box::pin(async move {
                let options = ResizeContainerTTYOptionsBuilder::default()
                    .h(i32::from(h))
                    .w(i32::from(w))
                    .build();
                let _ = docker.resize_container_tty(&id, options).await;
            })
        };
        self.pump(attached.output, attached.input, ends, end, resize, false)?
            .ok_or_else(|| ApiError::Engine("the container's terminal ended before the container".into()))
    }

    /// `exec` with the user's terminal: a terminal of its own in the container, the user's in raw mode meanwhile.
    pub fn exec_terminal(&self, id: &str, command: &[String]) -> Result<i64, ApiError> {
        use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecResults};
        let created = self.call(self.docker.create_exec(
            id,
            CreateExecOptions {
                cmd: Some(command.to_vec()),
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(true),
                ..Default::default()
            },
        ))?;
        let StartExecResults::Attached { output, input } = self.call(self.docker.start_exec(&created.id, None))? else {
            return Err(ApiError::Engine("the exec did not attach".into()));
        };
        let file = |fd: std::os::fd::BorrowedFd<'_>| {
            rustix::io::dup(fd)
                .map(std::fs::File::from)
                .map_err(|e| ApiError::Engine(e.to_string()))
        };
        let ends = Ends {
            keys: file(rustix::stdio::stdin())?,
            screen: file(rustix::stdio::stdout())?,
            size_of: file(rustix::stdio::stdout())?,
        };
        let saved = rustix::termios::tcgetattr(&ends.keys).map_err(|e| ApiError::Engine(e.to_string()))?;
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(&ends.keys, rustix::termios::OptionalActions::Now, &raw);
        let restore = ends.keys.try_clone().map_err(|e| ApiError::Engine(e.to_string()));
        let (docker, exec_id) = (self.docker.clone(), created.id.clone());
        let resize_docker = self.docker.clone();
        let resize_id = created.id.clone();
        // The session ends with the exec's output; its code is read afterwards.
        let resize = move |h: u16, w: u16| -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
            let (docker, id) = (resize_docker.clone(), resize_id.clone());
            Box::pin(async move {
                let _ = docker.resize_exec(&id, ResizeExecOptions { height: h, width: w }).await;
            })
        };
        let pumped = self.pump(output, input, ends, std::future::pending(), resize, true);
        if let Ok(f) = restore {
            let _ = rustix::termios::tcsetattr(&f, rustix::termios::OptionalActions::Now, &saved);
        }
        pumped?;
        let inspected = self.call(docker.inspect_exec(&exec_id))?;
        Ok(inspected.exit_code.unwrap_or(-1))
    }

    fn pump<F>(
        &self,
        mut output: Output,
        mut input: Input,
        ends: Ends,
        end: F,
        resize: impl Fn(u16, u16) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
        ends_with_output: bool,
    ) -> Result<Option<i64>, ApiError>
    where
        F: std::future::Future<Output = Result<i64, ApiError>>,
    {
        use std::io::Write;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::AsyncWriteExt;

        let Ends {
            keys: reader,
            mut screen,
            size_of: sizer,
        } = ends;
        let done = Arc::new(AtomicBool::new(false));
        // Keys: a thread polls (so it ends with the session) and hands them to the runtime.
        let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let stop = Arc::clone(&done);
        let keys_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let mut fds = [rustix::event::PollFd::new(&reader, rustix::event::PollFlags::IN)];
                let timeout = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                if rustix::event::poll(&mut fds, Some(&timeout)).unwrap_or(0) == 0 {
                    continue;
                }
                match rustix::io::read(&reader, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if keys_tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let size = |f: &std::fs::File| rustix::termios::tcgetwinsize(f).ok().map(|s| (s.ws_row, s.ws_col));
        let code = self.rt.block_on(async move {
            let mut last = None;
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
            let mut end = std::pin::pin!(end);
            let mut output_open = true;
            loop {
                tokio::select! {
                    item = output.next(), if output_open => match item {
                        Some(Ok(chunk)) => {
                            let _ = screen.write_all(&chunk.into_bytes()).and_then(|()| screen.flush());
                        }
                        _ => {
                            output_open = false;
                            if ends_with_output {
                                return Ok(None);
                            }
                        }
                    },
                    Some(k) = keys.recv() => {
                        let _ = input.write_all(&k).await;
                        let _ = input.flush().await;
                    }
                    _ = tick.tick() => {
                        let now = size(&sizer);
                        if now != last && let Some((h, w)) = now {
                            resize(h, w).await;
                            last = now;
                        }
                    }
                    code = &mut end => {
                        // Whatever is left of the output, then the end.
                        while output_open {
                            match tokio::time::timeout(std::time::Duration::from_millis(200), output.next()).await {
                                Ok(Some(Ok(chunk))) => {
                                    let _ = screen.write_all(&chunk.into_bytes());
                                }
                                _ => output_open = false,
                            }
                        }
                        return code.map(Some);
                    }
                }
            }
        });
        done.store(true, Ordering::Relaxed);
        let _ = keys_thread.join();
        code
    }
}
