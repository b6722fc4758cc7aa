//! The bottle's init: the bottle's pid 1, cloned by the single-threaded launcher straight into the bottle's new
//! namespaces (descriptors and environment scrubbed first). It maps its ids, hands the launcher its proxy listener
//! (while the launcher starts the proxy), then, given the spec, builds the bottle's filesystem, proves confinement
//! from inside, and runs the agent as its child. Trusts its spec (written 0600 by the launcher); trusts nothing the
//! agent does.
//!
//! Processes: the launcher clones *pid 1* (reaps, forwards SIGTERM/SIGHUP) → pid 1 forks the *agent*. Both have
//! PDEATHSIG = SIGKILL, so `kill -9` of the launcher takes the whole bottle down, and pid 1's death kills every
//! process in the bottle.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use rustix::process::{Pid, WaitOptions};
use rustix::thread::UnshareFlags;

use super::control::{self, Message};
use super::harden::{self, Hardening, LandlockMode};
use super::ids;
use super::rootfs;
use super::spec::{EarlySpec, IN_BOTTLE_PROXY_PORT, InitSpec, RealFs, fs_plan};
use super::warden;
use crate::sys::ns::{self as sys, Forked};

/// Exit code of pid 1 when the bottle failed before the agent ran (the reason went over the channel).
pub const INIT_FAILED: i32 = 123;

/// The name the self-test asks the proxy for; never allowed (`.invalid`, RFC 2606), so the proxy must deny it.
pub use crate::backend::SELFTEST_HOST;
const SELFTEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Where the self-test proves direct egress is impossible: TEST-NET-1 (RFC 5737), never routed. In the bottle's
/// network namespace there is no route at all, so nothing is ever sent.
const DIRECT_EGRESS_PROBE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 80);

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot read the bottle spec {path}")]
    Spec { path: String, source: io::Error },
    #[error("cannot take the control channel")]
    Control { source: io::Error },
    #[error("cannot scrub the inherited environment")]
    Environment { source: io::Error },
    #[error("cannot write {file}")]
    IdMap { file: &'static str, source: io::Error },
    #[error("cannot take the bottle's own ids")]
    Ids { source: io::Error },
    #[error("the bottle would hold host root: {0}")]
    HostRoot(String),
    #[error("cannot fork")]
    Fork { source: io::Error },
    #[error("cannot start the bottle's socket warden")]
    Warden { source: io::Error },
    #[error("cannot set up the bottle network")]
    Network { source: io::Error },
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    #[error("the launcher went away before the bottle was ready")]
    LauncherGone,
    #[error("confinement self-test failed: {0}")]
    SelfTest(String),
    #[error(transparent)]
    Harden(#[from] harden::HardenError),
    #[error("cannot give the agent a terminal")]
    Terminal { source: io::Error },
    #[error("cannot start `{program}`")]
    Exec { program: String, source: io::Error },
}

/// Entry point of the init, in the child the launcher just cloned into the bottle's namespaces (single-threaded):
/// takes the control channel and the standard streams, drops everything else it inherited, sets up what needs only
/// `early` at once, and builds the filesystem once the launcher says the spec is written. Returns the process exit
/// code (the agent's, or INIT_FAILED).
pub(super) fn cloned(spec_path: &Path, early: &EarlySpec, control: OwnedFd, stdio: [Option<OwnedFd>; 3]) -> i32 {
    // SECURITY: the launcher's descriptors (lease lock, state files, sockets) and its environment (real credential
    // secrets) must not reach the bottle's pid 1: both go before anything else runs.
    let control = match sys::install_descriptors(control, stdio) {
        Ok(fd) => fd,
        Err(source) => return report(None, &InitError::Control { source }),
    };
    if let Err(source) = sys::scrub_environment() {
        return report(Some(&control), &InitError::Environment { source });
    }
    match start(spec_path, early, &control) {
        Ok(code) => code,
        Err(e) => report(Some(&control), &e),
    }
}

/// The launcher starts the init before the spec exists; it says when the spec is complete. The spec must be
/// for the namespaces already built.
fn read_spec(spec_path: &Path, early: &EarlySpec, control: &OwnedFd) -> Result<(InitSpec, Vec<OwnedFd>), InitError> {
    let mut trees = Vec::new();
    loop {
        match control::recv(control, false).map_err(|source| InitError::Control { source })? {
            Some((Message::Spec, _)) => break,
            Some((Message::Tree(i), Some(tree))) if usize::try_from(i).ok() == Some(trees.len()) => trees.push(tree),
            _ => return Err(InitError::LauncherGone),
        }
    }
    let mut spec: InitSpec = std::fs::read(spec_path)
        .and_then(|b| serde_json::from_slice(&b).map_err(io::Error::other))
        .map_err(|source| InitError::Spec {
            path: spec_path.display().to_string(),
            source,
        })?;
    if !early.agrees_with(&spec) {
        return Err(InitError::Spec {
            path: spec_path.display().to_string(),
            source: io::Error::other("its name, ids or namespaces differ from the ones the init was started with"),
        });
    }
    if spec.trees().len() != trees.len() {
        return Err(InitError::Spec {
            path: spec_path.display().to_string(),
            source: io::Error::other(format!(
                "it names {} host trees, the launcher opened {}",
                spec.trees().len(),
                trees.len()
            )),
        });
    }
    spec.add_pass_env(|k| early.pass_env.get(k).cloned());
    Ok((spec, trees))
}

fn report(control: Option<&OwnedFd>, err: &InitError) -> i32 {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    match control {
        Some(c) if control::send(c, &Message::Fail(text.clone()), None).is_ok() => {}
        _ => {
            let _ = writeln!(io::stderr(), "bot-bottle init: {text}");
        }
    }
    INIT_FAILED
}

/// The init's first steps as the bottle's pid 1, in the namespaces the launcher cloned it into.
fn start(spec_path: &Path, early: &EarlySpec, control: &OwnedFd) -> Result<i32, InitError> {
    launcher_alive(control)?;
    map_ids(early)?;
    pid_one(spec_path, early, control)
}

/// Arms PDEATHSIG = SIGKILL, then makes sure the launcher did not die before it was armed. SECURITY: pid 1 cannot
/// ask `getppid()` (its parent is outside its pid namespace and reads as 0), so the check is the control channel,
/// whose other end only the launcher holds: a hang-up means it is gone, and so must we be.
fn launcher_alive(control: &OwnedFd) -> Result<(), InitError> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(|e| InitError::Control { source: e.into() })?;
    let mut fds = [rustix::event::PollFd::new(control, rustix::event::PollFlags::empty())];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    rustix::event::poll(&mut fds, Some(&zero)).map_err(|e| InitError::Control { source: e.into() })?;
    if fds[0]
        .revents()
        .intersects(rustix::event::PollFlags::HUP | rustix::event::PollFlags::ERR)
    {
        return Err(InitError::LauncherGone);
    }
    Ok(())
}

/// Maps the invoking uid/gid to themselves in the new user namespace: the agent owns what it writes in the
/// workspace, and nothing else. With a root launcher (`host_id`), the launcher maps them instead (only a process
/// holding CAP_SETUID on the host may map other ids), before it lets the init read its spec.
fn map_ids(spec: &EarlySpec) -> Result<(), InitError> {
    if spec.host_id.is_some() {
        return Ok(());
    }
    for (file, contents) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("{0} {0} 1\n", spec.uid)),
        ("/proc/self/gid_map", format!("{0} {0} 1\n", spec.gid)),
    ] {
        std::fs::write(file, contents).map_err(|source| InitError::IdMap { file, source })?;
    }
    Ok(())
}

/// The namespaces of a bottle. SECURITY: there is deliberately no way to keep the host's network namespace.
pub(super) fn namespaces(early: &EarlySpec) -> UnshareFlags {
    let flags = UnshareFlags::NEWUSER
        | UnshareFlags::NEWNS
        | UnshareFlags::NEWPID
        | UnshareFlags::NEWIPC
        | UnshareFlags::NEWUTS
        | UnshareFlags::NEWNET;
    if early.cgroup_ns {
        flags | UnshareFlags::NEWCGROUP
    } else {
        flags
    }
}

fn pid_one(spec_path: &Path, early: &EarlySpec, control: &OwnedFd) -> Result<i32, InitError> {
    rustix::system::sethostname(early.name.as_bytes()).map_err(|e| InitError::Network { source: e.into() })?;
    let listener = sys::loopback_up()
        .and_then(|()| TcpListener::bind((Ipv4Addr::LOCALHOST, IN_BOTTLE_PROXY_PORT)))
        .map_err(|source| InitError::Network { source })?;
    let proxy_addr = listener.local_addr().map_err(|source| InitError::Network { source })?;
    control::send(control, &Message::Listener, Some(listener.as_fd()))
        .map_err(|source| InitError::Control { source })?;
    drop(listener);

    let (spec, opened) = read_spec(spec_path, early, control)?;
    let spec = &spec;
    // While this process may still walk the state dir: with a root launcher, the ids it takes next cannot.
    let root_dir = rustix::fs::open(
        &spec.root,
        rustix::fs::OFlags::PATH
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| InitError::Spec {
        path: spec.root.display().to_string(),
        source: e.into(),
    })?;
    if spec.host_id.is_some() {
        ids::become_bottle_root().map_err(|source| InitError::Ids { source })?;
        // SECURITY: a change of ids clears PDEATHSIG (prctl(2)): arm it again, and check again that the launcher
        // did not die meanwhile.
        launcher_alive(control)?;
    }
    ids::check_no_host_root(spec.host_id.is_some()).map_err(InitError::HostRoot)?;
    let mut trees = rootfs::Trees::default();
    for (from, tree) in spec.trees().into_iter().zip(opened) {
        trees.add(from, tree);
    }
    let root = rootfs::mount_root(&root_dir)?;
    drop(root_dir);
    let mut planned = spec.clone();
    planned.root = root.path();
    rootfs::build(root, &fs_plan(&planned, &RealFs), spec.tmpfs_bytes, &mut trees)?;
    drop(trees);

    match control::recv(control, false).map_err(|source| InitError::Control { source })? {
        Some((Message::Go, _)) => {}
        _ => return Err(InitError::LauncherGone),
    }
    self_test(proxy_addr, spec.canary).map_err(InitError::SelfTest)?;

    let terminal = if spec.tty {
        Some(open_terminal(spec.tty_size).map_err(|source| InitError::Terminal { source })?)
    } else {
        None
    };
    let warden = warden::start(&spec.share_sockets).map_err(|source| InitError::Warden { source })?;
    let agent = match sys::fork().map_err(|source| InitError::Fork { source })? {
        Forked::Child => {
            let err = match &terminal {
                Some((_, peer)) => match attach_terminal(peer) {
                    Ok(()) => exec_in_bottle(spec, &spec.argv, warden.as_fd()),
                    Err(source) => InitError::Terminal { source },
                },
                None => exec_in_bottle(spec, &spec.argv, warden.as_fd()),
            };
            let (line, code) = explain_exec_failure(spec, &err);
            let _ = control::send(control, &Message::NoStart(line.clone()), None);
            // The user sees why where the agent's output goes (terminal or agent log), and a shell's exit code.
            let _ = writeln!(io::stderr(), "{line}");
            sys::exit_child(code)
        }
        Forked::Parent { child } => child,
    };
    drop(warden);
    sys::forward_signals_to(agent).map_err(|source| InitError::Fork { source })?;
    // The launcher gets the terminal's master side with the verdict; pid 1 keeps neither side.
    let master = terminal.map(|(master, _peer)| master);
    control::send(control, &Message::Ready, master.as_ref().map(AsFd::as_fd))
        .map_err(|source| InitError::Control { source })?;
    drop(master);
    Ok(reap_until(agent))
}

/// A new terminal of the bottle's own devpts instance (`/dev/ptmx` is `pts/ptmx` inside), of the user's size:
/// (master, peer).
fn open_terminal(size: Option<(u16, u16)>) -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::OpenptFlags;
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::unlockpt(&master)?;
    if let Some((rows, cols)) = size {
        let size = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&master, size)?;
    }
    // TIOCGPTPEER: the peer of exactly this master, with no path lookup in between.
    let peer = rustix::pty::ioctl_tiocgptpeer(&master, OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    Ok((master, peer))
}

/// In the agent, before hardening: a new session whose controlling terminal is `peer`, on stdin/stdout/stderr.
fn attach_terminal(peer: &OwnedFd) -> io::Result<()> {
    rustix::process::setsid()?;
    rustix::process::ioctl_tiocsctty(peer)?;
    rustix::stdio::dup2_stdin(peer)?;
    rustix::stdio::dup2_stdout(peer)?;
    rustix::stdio::dup2_stderr(peer)?;
    Ok(())
}

/// From inside: the proxy answers and polices, and nothing else is reachable.
pub(crate) fn self_test(proxy: SocketAddr, canary: Option<SocketAddr>) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&proxy, SELFTEST_TIMEOUT).map_err(|e| format!("proxy {proxy}: {e}"))?;
    s.set_read_timeout(Some(SELFTEST_TIMEOUT)).map_err(|e| e.to_string())?;
    s.write_all(
        b"GET http://selftest.bot-bottle.invalid/ HTTP/1.1\r\nHost: selftest.bot-bottle.invalid\r\nConnection: close\r\n\r\n",
    )
    .map_err(|e| format!("proxy {proxy}: {e}"))?;
    let mut head = Vec::new();
    let _ = s.take(8192).read_to_end(&mut head);
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if !head.starts_with("http/1.1 403") || !head.contains("x-bottle-denied") {
        return Err(format!("the proxy at {proxy} did not deny a non-allowed host"));
    }
    if let Ok(c) = TcpStream::connect_timeout(&SocketAddr::V4(DIRECT_EGRESS_PROBE), Duration::from_millis(500)) {
        return Err(format!(
            "a direct TCP connection to {} succeeded",
            c.peer_addr().map_or_else(|e| e.to_string(), |a| a.to_string())
        ));
    }
    if let Ok(u) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        && u.send_to(b"x", DIRECT_EGRESS_PROBE).is_ok()
    {
        return Err("a direct UDP datagram could be sent".into());
    }
    if let Some(canary) = canary
        && TcpStream::connect_timeout(&canary, Duration::from_millis(500)).is_ok()
    {
        return Err(format!("the host's loopback service {canary} is reachable"));
    }
    Ok(())
}

/// Exit codes of a command that could not start, as shells give them (POSIX 2.8.2): not found, not executable.
pub const NOT_FOUND: i32 = 127;
pub const NOT_EXECUTABLE: i32 = 126;

/// One line for a command that could not start (what, why, the likely fix) and its exit code.
pub(super) fn explain_exec_failure(spec: &InitSpec, err: &InitError) -> (String, i32) {
    let InitError::Exec { program, source } = err else {
        return (format!("bot-bottle: the command could not start: {err}"), INIT_FAILED);
    };
    let path = spec.env.get("PATH").map_or("(unset)", String::as_str);
    match (source.kind(), source.raw_os_error()) {
        (io::ErrorKind::NotFound, _) => (
            format!(
                "bot-bottle: `{program}`: not found in the bottle; PATH inside is {path}; tools under your home are not \
                 visible in a bottle unless mounted (e.g. --mount ~/.cargo)"
            ),
            NOT_FOUND,
        ),
        (io::ErrorKind::PermissionDenied, _) | (_, Some(libc::ENOEXEC)) => (
            format!(
                "bot-bottle: `{program}`: cannot be executed in the bottle ({source}); is it executable (chmod +x) and for this machine?"
            ),
            NOT_EXECUTABLE,
        ),
        (_, Some(libc::E2BIG)) => (
            format!("bot-bottle: `{program}`: its arguments and environment are too large to start it ({source})"),
            NOT_EXECUTABLE,
        ),
        _ => (format!("bot-bottle: `{program}`: cannot start: {source}"), INIT_FAILED),
    }
}

/// Runs in the agent's process (or an `exec`'d command's): harden, drop every inherited descriptor, exec.
/// Returns only on failure.
pub(super) fn exec_in_bottle(spec: &InitSpec, argv: &[String], warden: BorrowedFd<'_>) -> InitError {
    if let Err(e) = rustix::process::chdir(&spec.workspace) {
        return InitError::Exec {
            program: spec.workspace.display().to_string(),
            source: e.into(),
        };
    }
    let mut read_write = vec![spec.workspace.clone(), "/tmp".into(), spec.home.clone(), "/dev".into()];
    // A mount written `rw` is writable; a read-only one stays read-only (its mount says so, Landlock agrees).
    read_write.extend(spec.mounts.iter().filter(|m| m.writable).map(|m| m.at.clone()));
    let hardening = Hardening {
        read_only: vec!["/".into()],
        read_write,
        landlock: LandlockMode::BestEffort,
    };
    if let Err(e) = harden::apply(&hardening, Some(warden)) {
        return e.into();
    }
    if let Err(source) = sys::reset_signals() {
        return InitError::Exec {
            program: "sigprocmask".into(),
            source,
        };
    }
    if let Err(source) = sys::close_keeping_control_until_exec() {
        return InitError::Exec {
            program: "close_range".into(),
            source,
        };
    }
    let Some((program, args)) = argv.split_first() else {
        return InitError::Exec {
            program: String::new(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "empty command"),
        };
    };
    let source = std::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(&spec.env)
        .exec();
    InitError::Exec {
        program: program.clone(),
        source,
    }
}

/// Waits for `child`, reaping any other child on the way (pid 1 adopts orphans). Returns its exit code in
/// shell convention (128 + signal when killed).
pub(crate) fn reap_until(child: i32) -> i32 {
    loop {
        match rustix::process::wait(WaitOptions::empty()) {
            Ok(Some((pid, status))) if pid.as_raw_nonzero().get() == child => return exit_code(status),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return INIT_FAILED,
        }
    }
}

pub(super) fn wait_for(child: i32) -> i32 {
    let Some(pid) = Pid::from_raw(child) else {
        return INIT_FAILED;
    };
    loop {
        match rustix::process::waitpid(Some(pid), WaitOptions::empty()) {
            Ok(Some((_, status))) => return exit_code(status),
            Err(rustix::io::Errno::INTR) => {}
            _ => return INIT_FAILED,
        }
    }
}

fn exit_code(status: rustix::process::WaitStatus) -> i32 {
    if let Some(code) = status.exit_status() {
        return code;
    }
    status.terminating_signal().map_or(INIT_FAILED, |s| 128 + s)
}
