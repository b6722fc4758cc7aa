//! The socket warden of a container bottle (#12): the workspace is a bind of the host directory, so a host
//! process's Unix socket there would answer the container, whatever its network. As in a namespace bottle, every
//! `connect(2)` of the agent (and of each `exec`) is carried out by the warden, here on the host in the launcher:
//! inside the container, bot-bottle's own binary (shown read-only at `RUNTIME_DIR` with the libraries it runs with,
//! started through its own dynamic loader, so the image's libc does not matter) installs the filter, hands its
//! listener to the launcher through `<state>/container/warden.sock` and execs the command.
//! Trusts the engine's pid of the container; trusts nothing the container sends but a seccomp listener.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use super::plan::IN_CONTAINER_DIR;
use super::runtime::Confinement;
use crate::namespace::control::{self, Message};
use crate::namespace::warden;

/// Where the launcher's binary and its libraries appear in the container (read-only).
pub const RUNTIME_DIR: &str = "/.bot-bottle-rt";
/// The launcher's socket the container's processes hand their filter's listener to, in the shared folder.
pub const WARDEN_SOCK: &str = "warden.sock";
/// The hidden subcommand that runs in the container.
pub const SUBCOMMAND: &str = "__warden-exec";
/// `SUBCOMMAND`'s flag for a container under gVisor: no warden (gVisor refuses it; it refuses host sockets itself).
pub const GVISOR_FLAG: &str = "--gvisor";
/// The hidden subcommand a gVisor container starts with (`gvisor_check_and_exec`).
pub const GVISOR_CHECK: &str = "__gvisor-check";
/// In the shared folder, under gVisor: a host socket of the launcher's that must not answer the container...
pub const DECOY: &str = "decoy.sock";
/// ...and the FIFO its first command reports through, alone in a folder of the shared one...
pub const REPORT: &str = "report";
/// ...which the container sees (writable: gVisor opens a host FIFO for writing on a writable bind only) here.
pub const REPORT_DIR: &str = "report";
/// Where the container sees `REPORT_DIR`.
pub const IN_CONTAINER_REPORT_DIR: &str = "/.bot-bottle-report";
/// Exit code when the command never started (as the gate's).
const NOT_STARTED: i32 = 125;

/// bot-bottle's own executable and the shared objects this process runs with (its dynamic loader among them), as
/// the kernel mapped them: what the container needs to run `SUBCOMMAND`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub exe: PathBuf,
    pub libs: Vec<PathBuf>,
    pub loader: PathBuf,
}

impl Runtime {
    pub fn of_this_process() -> io::Result<Self> {
        let exe = std::fs::canonicalize("/proc/self/exe")?;
        let maps = std::fs::read_to_string("/proc/self/maps")?;
        Self::from_maps(exe, &maps)
    }

    fn from_maps(exe: PathBuf, maps: &str) -> io::Result<Self> {
        let mut libs: Vec<PathBuf> = Vec::new();
        for line in maps.lines() {
            let Some(path) = line.split_whitespace().nth(5) else {
                continue;
            };
            let name = Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if path.starts_with('/') && (name.ends_with(".so") || name.contains(".so.")) {
                let path = PathBuf::from(path);
                if !libs.contains(&path) {
                    libs.push(path);
                }
            }
        }
        let loader = libs
            .iter()
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("ld-"))
            })
            .cloned()
            .ok_or_else(|| io::Error::other("this process has no dynamic loader mapped (a static build?)"))?;
        Ok(Self { exe, libs, loader })
    }

    /// `SRC:DST:ro` binds for the engine.
    pub fn binds(&self) -> Vec<String> {
        let mut binds = vec![format!("{}:{RUNTIME_DIR}/bot-bottle:ro", self.exe.display())];
        for lib in &self.libs {
            if let Some(name) = lib.file_name() {
                binds.push(format!(
                    "{}:{RUNTIME_DIR}/lib/{}:ro",
                    lib.display(),
                    name.to_string_lossy()
                ));
            }
        }
        binds
    }

    /// The argv prefix that runs a command under the warden in the container (under gVisor, which keeps host
    /// sockets out itself, under the seccomp filter alone).
    pub fn prefix(&self, confinement: Confinement) -> Vec<String> {
        let mut argv = self.loader_prefix();
        argv.extend([format!("{RUNTIME_DIR}/bot-bottle"), SUBCOMMAND.into()]);
        match confinement {
            Confinement::Warden => argv.push(format!("{IN_CONTAINER_DIR}/{WARDEN_SOCK}")),
            Confinement::Gvisor => argv.push(GVISOR_FLAG.into()),
        }
        argv.push("--".into());
        argv
    }

    /// The argv prefix of a gVisor container's first command: `GVISOR_CHECK` reports what gVisor's kernel says of it
    /// to the launcher, then execs the rest.
    pub fn gvisor_check_prefix(&self) -> Vec<String> {
        let mut argv = self.loader_prefix();
        argv.extend([
            format!("{RUNTIME_DIR}/bot-bottle"),
            GVISOR_CHECK.into(),
            format!("{IN_CONTAINER_DIR}/{DECOY}"),
            format!("{IN_CONTAINER_REPORT_DIR}/{REPORT}"),
            "--".into(),
        ]);
        argv
    }

    /// The argv prefix that runs a program linking no more than the launcher's libraries with the launcher's loader
    /// and libraries, whatever the image has (`selftest` runs its probe so).
    pub fn loader_prefix(&self) -> Vec<String> {
        let loader = self
            .loader
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        vec![
            format!("{RUNTIME_DIR}/lib/{loader}"),
            "--library-path".into(),
            format!("{RUNTIME_DIR}/lib"),
        ]
    }
}

/// The launcher's side: a listener at `path` (in the bottle's shared folder, inside the state directory, which
/// keeps other users out; the socket itself is open to the container's user).
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    let sock = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
    rustix::net::bind(&sock, &SocketAddrUnix::new(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    rustix::net::listen(&sock, 16)?;
    Ok(sock)
}

/// Serves every process tree of the container (`pid`: its first process on the host) that hands over a listener,
/// each on a thread of its own, until this process ends.
pub fn serve(listener: OwnedFd, pid: u32, shared: Vec<PathBuf>) -> io::Result<()> {
    // The container's own sockets are the ones its network namespace lists.
    let diag = crate::sys::ns::in_netns_of(pid, warden::diag_socket)?;
    std::thread::Builder::new()
        .name("bottle-warden".into())
        .spawn(move || {
            loop {
                let conn = match rustix::net::accept_with(&listener, SocketFlags::CLOEXEC) {
                    Ok(c) => c,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => return,
                };
                let Ok(Some((Message::Warden, Some(filter)))) = control::recv(&conn, false) else {
                    continue;
                };
                let (shared, diag) = (shared.clone(), diag.try_clone());
                let Ok(diag) = diag else { continue };
                let _ = std::thread::Builder::new()
                    .name("bottle-warden-tree".into())
                    .spawn(move || warden::serve(filter, shared, diag));
            }
        })?;
    Ok(())
}

/// In the container (`SUBCOMMAND`): as the container's first process it stays as its init (below); otherwise (an
/// `exec`) it confines itself and execs `argv`. `sock` is the launcher's warden socket; `None` under gVisor, whose
/// kernel refuses the warden's listener and keeps host sockets out itself (the launcher checked that it does).
/// Returns the exit code.
pub fn exec_under_warden(sock: Option<&Path>, argv: &[OsString]) -> i32 {
    if argv.is_empty() {
        eprintln!("bot-bottle: no command to run");
        return NOT_STARTED;
    }
    if rustix::process::getpid().as_raw_nonzero().get() != 1 {
        return confine_and_exec(sock, argv);
    }
    // The container's init: the agent runs as its child, and this process cannot be read or written by it (not
    // dumpable: /proc/1/mem and /proc/1/environ need a capability the agent lacks). It forwards `stop`'s SIGTERM,
    // reaps orphans, and ends with the agent's exit code.
    if let Err(e) = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable) {
        eprintln!("bot-bottle: the container's init cannot protect itself: {e}");
        return NOT_STARTED;
    }
    match crate::sys::ns::fork() {
        Ok(crate::sys::ns::Forked::Child) => crate::sys::ns::exit_child(confine_and_exec(sock, argv)),
        Ok(crate::sys::ns::Forked::Parent { child }) => {
            if let Err(e) = crate::sys::ns::forward_signals_to(child) {
                eprintln!("bot-bottle: the container's init cannot forward signals: {e}");
            }
            crate::namespace::init::reap_until(child)
        }
        Err(e) => {
            eprintln!("bot-bottle: the container's init cannot fork: {e}");
            NOT_STARTED
        }
    }
}

/// Connects to the launcher, installs the warden's filter and the namespace backend's seccomp filter (the engine's
/// profile admits ptrace, io_uring and more), hands the warden's listener over, and execs `argv`.
fn confine_and_exec(sock: Option<&Path>, argv: &[OsString]) -> i32 {
    let Some((program, args)) = argv.split_first() else {
        return NOT_STARTED;
    };
    // SECURITY: the channel is connected before the filter exists (afterwards the launcher's socket, a host
    // process's, would be refused like any other).
    let handed = (|| -> io::Result<()> {
        if let Some(sock) = sock {
            let chan =
                rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
            rustix::net::connect(&chan, &SocketAddrUnix::new(sock)?)?;
            rustix::thread::set_no_new_privs(true)?;
            let filter = crate::sys::harden::install_notify_filter(&warden::program()).map_err(|e| {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    // gVisor's kernel has no seccomp listener; a runsc registered through a wrapper looks like runc.
                    io::Error::other(format!(
                        "{e} (is this runtime gVisor through a wrapper? register /usr/bin/runsc itself, with its \
                         flags as \"runtimeArgs\")"
                    ))
                } else {
                    e
                }
            })?;
            control::send(&chan, &Message::Warden, Some(filter.as_fd()))?;
        }
        rustix::thread::set_no_new_privs(true)?;
        let main = crate::namespace::harden::seccomp_program().map_err(io::Error::other)?;
        seccompiler::apply_filter(&main).map_err(io::Error::other)
    })();
    if let Err(e) = handed {
        eprintln!("bot-bottle: cannot confine the container's command (socket warden, seccomp): {e}");
        return NOT_STARTED;
    }
    let err = std::process::Command::new(program).args(args).exec();
    let name = program.to_string_lossy();
    match err.kind() {
        io::ErrorKind::NotFound => {
            eprintln!(
                "bot-bottle: `{name}`: not found in the container (PATH is {:?})",
                std::env::var("PATH").unwrap_or_default()
            );
            127
        }
        _ => {
            eprintln!("bot-bottle: `{name}`: cannot be executed in the container ({err})");
            126
        }
    }
}

/// In a gVisor container (`GVISOR_CHECK`), as its first command, before the gate: reports to the launcher (through
/// the `report` FIFO, whose read end the launcher holds) what gVisor's kernel says of this process's capabilities
/// and whether a stream connect to the launcher's `decoy` host socket succeeds, then runs `argv` as
/// `exec_under_warden` does without a warden (as the container's init: `argv` under the seccomp filter). The
/// launcher judges the report; `argv` (the gate's shell) waits for its verdict, so nothing of the agent has run yet.
pub fn gvisor_check_and_exec(decoy: &Path, report: &Path, argv: &[OsString]) -> i32 {
    if argv.is_empty() {
        eprintln!("bot-bottle: no command to run");
        return NOT_STARTED;
    }
    let mut text: String = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .map(|l| format!("{l}\n"))
        .collect();
    let tried = (|| -> io::Result<()> {
        let sock = rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
        rustix::net::connect(&sock, &SocketAddrUnix::new(decoy)?)?;
        Ok(())
    })();
    text.push_str(&match tried {
        Ok(()) => "decoy: connected\n".to_string(),
        Err(e) => format!("decoy: refused ({e})\n"),
    });
    let sent = std::fs::OpenOptions::new()
        .write(true)
        .open(report)
        .and_then(|mut f| io::Write::write_all(&mut f, text.as_bytes()));
    if let Err(e) = sent {
        eprintln!(
            "bot-bottle: cannot report to the launcher through {}: {e}",
            report.display()
        );
        return NOT_STARTED;
    }
    // The container's init from here (as `SUBCOMMAND --gvisor`): one program of bot-bottle's loaded in gVisor, not two.
    exec_under_warden(None, argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_is_the_executable_and_every_mapped_library_with_the_loader_found() {
        let maps = "\
55d0 r--p 00000000 fe:01 1 /work/target/debug/bot-bottle
7f00 r-xp 00000000 fe:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6
7f01 r--p 00000000 fe:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6
7f02 r-xp 00000000 fe:01 3 /usr/lib/x86_64-linux-gnu/libgcc_s.so.1
7f03 rw-p 00000000 00:00 0 [heap]
7f04 r-xp 00000000 fe:01 4 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7f05 r--p 00000000 fe:01 5 /usr/lib/locale/C.utf8/LC_CTYPE
";
        let rt = Runtime::from_maps("/work/target/debug/bot-bottle".into(), maps).unwrap();
        assert_eq!(rt.libs.len(), 3);
        assert_eq!(rt.loader, Path::new("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"));
        assert_eq!(
            rt.binds()[..2],
            [
                "/work/target/debug/bot-bottle:/.bot-bottle-rt/bot-bottle:ro".to_string(),
                "/usr/lib/x86_64-linux-gnu/libc.so.6:/.bot-bottle-rt/lib/libc.so.6:ro".to_string(),
            ]
        );
        assert_eq!(
            rt.prefix(Confinement::Warden)[..4],
            [
                "/.bot-bottle-rt/lib/ld-linux-x86-64.so.2".to_string(),
                "--library-path".into(),
                "/.bot-bottle-rt/lib".into(),
                "/.bot-bottle-rt/bot-bottle".into(),
            ]
        );
        assert!(Runtime::from_maps("/x".into(), "7f r-xp 0 fe:01 2 /usr/lib/libc.so.6\n").is_err());
    }

    #[test]
    fn this_process_has_a_runtime() {
        let rt = Runtime::of_this_process().unwrap();
        assert!(rt.exe.is_file() && rt.loader.is_file(), "{rt:?}");
    }
}
