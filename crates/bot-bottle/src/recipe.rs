//! The launch recipe, one named step after another: load policy → preflight → lease → state → mint CA and start
//! the bundle (proxy) → discover URLs → plan → launch → init → wait ready → run → teardown. Each step's error
//! says which step failed; everything started so far is torn down by its owner's `Drop`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bottle_policy::{Backend, BottleName, Policy, preset::preset};
use bottle_proxy::{Proxy, ProxyConfig};
use bottle_sandbox::lease::{Lease, Registry};
use bottle_sandbox::namespace::launch::{self, Stdio3};
use bottle_sandbox::namespace::spec::{EarlySpec, InitSpec, bottle_env};
use bottle_sandbox::namespace::{self};
use bottle_sandbox::preflight::{self, RealHost};
use bottle_sandbox::state::{self, BottleState, StateDir, Status};

use crate::credential_sources::{self, Shown};
use crate::exit::{PreflightFailed, Unavailable};

/// How long the init may take to hand over its proxy listener, and to pass its self-test.
const LISTENER_TIMEOUT: Duration = Duration::from_secs(10);
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Logs each named step with the time since launch began (`-vv` or BOT_BOTTLE_LOG=debug).
struct Steps(std::time::Instant);

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

/// A bottle being launched: what the recipe has started so far, torn down in reverse on drop.
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

/// Runs the agent to completion in a new bottle; returns its exit code.
pub fn run(mut req: Request) -> anyhow::Result<u8> {
    if req.policy.bottle.backend == Backend::Smolmachines {
        return crate::recipe_smolmachines::run(req);
    }
    let steps = Steps(std::time::Instant::now());
    // step: preflight
    let backend = req.policy.bottle.backend;
    if backend != Backend::Namespace {
        return Err(Unavailable {
            verb: "run",
            reason: "only the namespace backend runs bottles so far (smolmachines: issue #5, container: later)",
        }
        .into());
    }
    // The full preflight forks probes; it runs when a launch fails, to turn the failure into a remedy. The
    // launch itself fails closed on anything the probes would have found.
    let cgroup_ns = Path::new("/proc/self/ns/cgroup").exists();
    let argv = command(&req)?;
    let pool = lease_pool()?;
    let root = state::state_root()?;
    let workspace = workspace(&req.policy, &root)?;
    let home_source = crate::cmd::home::plan(&req.policy, &root)?;
    let mut shown = vec![Shown::new(&workspace, "the workspace")];
    if let Some(home) = &home_source {
        shown.push(Shown::new(home, "the agent's home"));
    }
    shown.extend(
        namespace::spec::visible_host_paths(&namespace::spec::RealFs)
            .iter()
            .map(|p| Shown::new(p, "the read-only host path")),
    );
    credential_sources::resolve(&mut req.policy, &shown)?;
    let home_source = match home_source {
        Some(dir) => Some(crate::cmd::home::prepare(&dir, &root)?),
        None => None,
    };
    let policy = &req.policy;
    steps.done("preflight");

    // step: lease
    let name = match &policy.bottle.name {
        Some(n) => n.clone(),
        None => generated_name()?,
    };
    let lease = Registry::new(&root)
        .with_pool(pool)
        .allocate(&name, std::process::id())?;
    let addr = lease.addr();
    steps.done("lease");

    // step: state dir
    let mut state = state::starting(name.as_str(), backend.as_str(), &addr.to_string(), req.detached)?;
    state.remove = req.remove;
    let dir = StateDir::create(&root, name.as_str())?;
    let mut bottle = Launching { state, dir, lease };
    bottle.set(|_| {})?;
    let result = launch_and_run(&mut bottle, &req, argv, (workspace, home_source), cgroup_ns, &steps).map_err(|e| {
        if e.chain()
            .any(|c| c.is::<bottle_sandbox::namespace::launch::LaunchError>())
            && !preflight::report(backend, &RealHost).usable()
        {
            return anyhow::Error::new(PreflightFailed { backend }).context(format!("{e:#}"));
        }
        e
    });
    if !req.detached
        && let Some(text) = crate::refusals::summary(&crate::refusals::read(&bottle.dir), name.as_str(), !req.remove)
    {
        eprint!("{text}");
    }
    if req.remove {
        // Nothing of the bottle is kept, so there is no outcome to record: the directory goes, the lease with it.
        let Launching { dir, lease, .. } = bottle;
        drop(lease);
        dir.remove()?;
        return result;
    }
    bottle.set(record_outcome(&result))?;
    // The spec goes with the bottle (it holds no secret: `pass_env` values and the CA key never were on disk).
    let _ = std::fs::remove_file(bottle.dir.file(state::SPEC_FILE));
    result
}

fn launch_and_run(
    bottle: &mut Launching,
    req: &Request,
    argv: Vec<String>,
    (workspace, home_source): (PathBuf, Option<PathBuf>),
    cgroup_ns: bool,
    steps: &Steps,
) -> anyhow::Result<u8> {
    let policy = &req.policy;
    // The init is cloned first (the launcher has no thread yet) into the bottle's namespaces, which it sets up while
    // the bundle starts; it waits for its spec only to build the filesystem.
    // Dropping `sandbox` on any failure below kills it.
    let spec_path = bottle.dir.file(state::SPEC_FILE);
    // An interactive run: the agent gets its own terminal inside the bottle, relayed to the user's.
    let terminal = !req.detached && std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let stdio = if req.detached {
        let log = bottle.dir.open_agent_log().context("cannot open the agent log")?;
        let null = std::fs::File::open("/dev/null").context("cannot open /dev/null")?;
        Stdio3 {
            stdin: Some(null.into()),
            stdout: Some(log.try_clone().context("cannot open the agent log")?.into()),
            stderr: Some(log.into()),
        }
    } else {
        Stdio3::inherit()
    };
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    // SECURITY: `pass_env` values go to the init in memory only; the spec file on disk lists their names.
    let pass_env: BTreeMap<String, String> = req
        .policy
        .bottle
        .pass_env
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect();
    let early = EarlySpec {
        name: bottle.state.name.clone(),
        uid,
        gid,
        cgroup_ns,
        pass_env,
    };
    let mut sandbox = launch::spawn(&spec_path, &early, stdio)?;

    bottle.dir.create_file(
        state::POLICY_FILE,
        bottle_policy::Effective::of(policy)
            .to_toml()
            .context("cannot render the policy")?
            .as_bytes(),
    )?;

    // step: mint CA + start bundle
    // One worker: a bottle's proxy serves one agent, and each thread started here competes with the init for the
    // CPU on the launch's critical path. (The standalone `proxy`, built for many clients, keeps more.)
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("bottle-proxy")
        .build()
        .context("cannot start the proxy runtime")?;
    let mut config = ProxyConfig::new(policy.clone(), bottle.dir.path.clone());
    config.bottle = bottle.state.name.clone();
    config.upstream_ca = req.upstream_ca.clone();
    // The CA key never touches the disk: it lives exactly as long as this bottle's proxy.
    config.ephemeral_ca = true;
    let proxy = {
        let _in_runtime = runtime.enter();
        Proxy::new(config)?
    };
    let bind_addr = std::net::SocketAddr::new(std::net::IpAddr::V4(bottle.lease.addr()), 0);
    let host_listener = std::net::TcpListener::bind(bind_addr).map_err(|source| bottle_proxy::ProxyError::Bind {
        addr: bind_addr.to_string(),
        source,
    })?;
    let proxy_url = format!("http://{}", host_listener.local_addr().context("proxy address")?);
    {
        let proxy = proxy.clone();
        // The bottle reaches its proxy only on its in-namespace listener; this address serves nobody (#12).
        runtime.spawn(async move { proxy.refuse_std_tcp(host_listener).await });
    }
    bottle.dir.create_file(
        state::URLS_FILE,
        serde_json::json!({ "proxy": proxy_url }).to_string().as_bytes(),
    )?;

    steps.done("bundle");
    // step: discover URLs (from the state dir, as `ls`/`exec` will)
    let urls: serde_json::Value = serde_json::from_slice(
        &std::fs::read(bottle.dir.file(state::URLS_FILE)).context("cannot read back the bundle's URLs")?,
    )
    .context("the bundle's urls.json is damaged")?;
    let canary = urls["proxy"]
        .as_str()
        .and_then(|u| u.strip_prefix("http://"))
        .and_then(|a| a.parse().ok())
        .context("the bundle's urls.json has no proxy address")?;

    steps.done("discover");
    // step: plan
    let home = PathBuf::from(if uid == 0 { "/root" } else { "/home/agent" });
    let mut env: BTreeMap<String, String> = policy.bottle.env.clone();
    env.extend(proxy.placeholders());
    let spec = InitSpec {
        name: early.name.clone(),
        root: bottle.dir.file(state::ROOT_DIR),
        uid,
        gid,
        workspace,
        env: bottle_env(&home, &env),
        home_source,
        pass_env: policy.bottle.pass_env.clone(),
        home,
        bottle_ca: proxy.ca_cert_pem().to_owned(),
        argv,
        cgroup_ns,
        canary: Some(canary),
        tty: terminal,
        tty_size: terminal
            .then(|| rustix::termios::tcgetwinsize(std::io::stdin()).ok())
            .flatten()
            .map(|w| (w.ws_row, w.ws_col)),
    };
    bottle.dir.create_file(
        state::SPEC_FILE,
        &serde_json::to_vec(&spec).context("cannot encode the plan")?,
    )?;

    steps.done("plan");
    // step: launch (the init, started above, has built the namespaces meanwhile and reads the spec now)
    sandbox.spec_written()?;
    let listener = sandbox.proxy_listener(LISTENER_TIMEOUT)?;
    {
        let proxy = proxy.clone();
        runtime.spawn(async move { proxy.serve_std_tcp(listener).await });
    }

    steps.done("launch");
    // step: init + wait ready (the init proves from inside that the proxy answers and nothing else does)
    let master = sandbox.go_and_wait_ready(READY_TIMEOUT)?;
    // One state write (the proxy's URL with it): `exec` joins a bottle through its init only once it is running.
    let init_pid = sandbox.pid();
    bottle.set(|s| {
        s.status = Status::Running;
        s.init_pid = Some(init_pid);
        s.proxy_url = Some(proxy_url);
    })?;

    steps.done("ready");
    // step: run
    runtime.spawn(forward_termination(init_pid));
    // SECURITY: the spec asked for a terminal only if the user has one; a master that did not come is an error,
    // not a reason to hand the agent the user's own terminal.
    let relay = match (terminal, master) {
        (true, Some(master)) => Some(crate::terminal::Relay::start(master, &runtime)?),
        (false, None) => None,
        (true, None) => bail!("the bottle init sent no terminal for the agent"),
        (false, Some(_)) => bail!("the bottle init sent a terminal nobody asked for"),
    };
    let status = sandbox.wait().context("cannot wait for the bottle")?;
    if let Some(relay) = relay {
        relay.finish();
    }

    steps.done("run");
    // step: teardown (the runtime's drop stops the proxy; the lease and state follow in `run`)
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(exit_code(status))
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

fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(u8::MAX),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(u8::MAX),
        _ => crate::exit::SANDBOX,
    }
}

/// How a finished launch is recorded, whatever the backend: exited with the agent's code, or failed with the
/// whole error chain.
pub(crate) fn record_outcome(result: &anyhow::Result<u8>) -> impl FnOnce(&mut BottleState) + use<> {
    let (status, code, error) = match result {
        Ok(code) => (Status::Exited, Some(i32::from(*code)), None),
        Err(e) => (Status::Failed, None, Some(format!("{e:#}"))),
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
