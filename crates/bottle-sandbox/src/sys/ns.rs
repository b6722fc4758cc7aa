//! Raw syscalls the bottle's init needs that rustix has no safe wrapper for: fork, clone into new namespaces,
//! bringing `lo` up, closing inherited descriptors, scrubbing the inherited environment, and forwarding termination
//! signals to the agent. Trusts the kernel's documented ABI (fork(2), clone(2), netdevice(7), close_range(2),
//! sigaction(2), proc(5)).

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

/// What `fork` returned, seen from one side.
pub(crate) enum Forked {
    Parent { child: i32 },
    Child,
}

/// fork(2). Only called from single-threaded processes (the launcher before it starts any thread, checked by
/// the caller; the init), so the child inherits no lock held by another thread.
pub(crate) fn fork() -> io::Result<Forked> {
    // SAFETY: fork has no memory-safety preconditions of its own; the callers are single-threaded processes
    // (the launcher before its first thread, the init), so the child cannot observe a lock held by a vanished
    // thread.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent { child }),
    }
}

/// clone(2) into new namespaces, fork-like: no new stack, the child goes on with a copy of the caller's. Only from
/// a single-threaded process (the launcher before its first thread, checked by the caller), for the same reason as
/// `fork`. Unlike `fork`, glibc's fork handlers do not run: in the child, glibc's cached thread id is still the
/// parent's, which only matters to `raise`/`pthread_kill` of itself (the child never signals itself; an `abort`
/// still ends it) and to error-checking pthread mutexes (none are used).
pub(crate) fn clone_into(namespaces: rustix::thread::UnshareFlags) -> io::Result<Forked> {
    let flags = u64::from(namespaces.bits()) | libc::SIGCHLD as u64;
    // SAFETY: the raw clone syscall with a null stack pointer and no CLONE_VM/CLONE_THREAD/CLONE_SETTLS duplicates
    // the process like fork(2) does; the remaining arguments (parent/child tid pointers, tls) are unused without
    // the flags that name them. The caller is single-threaded, so the child holds no lock of a vanished thread.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent {
            child: i32::try_from(child).map_err(|_| io::Error::other("clone returned an impossible pid"))?,
        }),
    }
}

/// struct mount_attr of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// MOUNT_ATTR_RDONLY (linux/mount.h).
const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// mount_setattr(2) with AT_RECURSIVE: makes the mount at `path` and every mount below it read-only, in one call.
/// Only RDONLY is added; the flags the kernel locked for this user namespace are left as they are.
pub(crate) fn make_tree_read_only(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a NUL-terminated path and a mount_attr we own, with its exact size; the kernel only reads both.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// MOUNT_ATTR_IDMAP (linux/mount.h).
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// open_tree(2) `OPEN_TREE_CLONE` of `path`: a detached copy of the one mount there (not the ones below it, like a
/// plain bind), shown through the id mapping of the user namespace `userns` (mount_setattr(2) `MOUNT_ATTR_IDMAP`):
/// a file of host uid `k` appears as the uid that `userns` maps to `k`, and what is created through it is stored
/// as `k`. Needs CAP_SYS_ADMIN over the filesystem (the root launcher); attached elsewhere with move_mount(2).
pub(crate) fn idmapped_tree(
    path: &std::path::Path,
    userns: std::os::fd::BorrowedFd<'_>,
) -> io::Result<std::os::fd::OwnedFd> {
    use rustix::mount::{OpenTreeFlags, open_tree};
    use std::os::fd::AsRawFd;
    let tree = open_tree(
        rustix::fs::CWD,
        path,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: u64::try_from(userns.as_raw_fd()).map_err(io::Error::other)?,
    };
    // SAFETY: an open descriptor, an empty NUL-terminated path with AT_EMPTY_PATH (the descriptor itself), and a
    // mount_attr we own with its exact size; the kernel only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tree)
}

/// Sets IFF_UP on the loopback interface of the current network namespace (netdevice(7)).
pub(crate) fn loopback_up() -> io::Result<()> {
    let sock = rustix::net::socket(rustix::net::AddressFamily::INET, rustix::net::SocketType::DGRAM, None)?;
    use std::os::fd::AsRawFd;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags into the ifreq we own; the fd is a live socket.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFFLAGS the union holds ifru_flags.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own; the fd is a live socket.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes every descriptor from `first` up, so the agent inherits nothing but what it was given.
pub(crate) fn close_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range takes plain integers; the caller is about to exec and owns no Rust object that
    // wraps a descriptor >= first that it will use again.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// In a forked helper (the socket warden): stdin and stdout become /dev/null, stderr stays, and every other
/// descriptor but `keep` is closed (the init's control channel among them, so the launcher still sees the init's
/// end close when the init dies).
pub(crate) fn keep_only_stderr_and(keep: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    let keep = u32::try_from(keep.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    if keep < 3 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    rustix::stdio::dup2_stdin(&null)?;
    rustix::stdio::dup2_stdout(&null)?;
    drop(null);
    // SAFETY: close_range takes plain integers; the caller owns no Rust object wrapping a descriptor it closes
    // other than ones it will not use again (the forked helper only keeps `keep`).
    if keep > 3 && unsafe { libc::syscall(libc::SYS_close_range, 3u32, keep - 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    close_from(keep + 1)
}

/// Closes every descriptor from 4 up and marks 3 (the init's control channel) close-on-exec: the agent never has it,
/// but a command that cannot start can still say why on it.
pub(crate) fn close_keeping_control_until_exec() -> io::Result<()> {
    // SAFETY: close_range takes plain integers; CLOSE_RANGE_CLOEXEC only sets a flag on descriptor 3.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, 3u32, libc::CLOSE_RANGE_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    close_from(4)
}

/// Every signal back to its default disposition and an empty signal mask, just before an exec: the agent starts as
/// a fresh process would, not with what its launcher's own parent ignored or blocked (a launcher started in the
/// background of a non-interactive shell ignores SIGINT, and the agent would not stop on Ctrl-C).
pub(crate) fn reset_signals() -> io::Result<()> {
    for signal in 1..=libc::SIGRTMAX() {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: SIG_DFL has no handler to call; numbers the C library reserves for itself answer EINVAL, which
        // leaves them as they are (this process is about to exec).
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    // SAFETY: an empty sigset_t we own, initialised by sigemptyset before sigprocmask reads it.
    let r = unsafe {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut())
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The pid that termination signals are forwarded to (0: none yet).
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe; pid and signal are plain integers.
        unsafe { libc::kill(pid, signal) };
    }
}

extern "C" fn swallow(_: libc::c_int) {}

/// From now on SIGTERM and SIGHUP received by this process go to `pid`; SIGINT is swallowed (the terminal
/// already delivers it to the agent's process group, and a second copy would count as a second Ctrl-C).
/// Handlers, unlike SIG_IGN, are reset by execve, so the agent starts with default dispositions.
pub(crate) fn forward_signals_to(pid: i32) -> io::Result<()> {
    FORWARD_TO.store(pid, Ordering::SeqCst);
    for (signal, handler) in [
        (libc::SIGTERM, forward as extern "C" fn(libc::c_int)),
        (libc::SIGHUP, forward),
        (libc::SIGINT, swallow),
    ] {
        // SAFETY: sigaction is given a zeroed (valid) struct with a handler that only calls async-signal-safe
        // functions.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Ends a forked child without returning into its parent's stack or running the parent's exit handlers.
pub(crate) fn exit_child(code: i32) -> ! {
    let _ = std::io::Write::flush(&mut std::io::stderr());
    // SAFETY: _exit takes a plain integer and never returns.
    unsafe { libc::_exit(code) }
}

/// In a child just cloned from the launcher: `stdio` onto 0, 1, 2 (None: keep the inherited one), `control` onto
/// descriptor 3, and every other descriptor the launcher had open (lease lock, state files, sockets) closed.
/// Returns the control channel at 3.
pub(crate) fn install_descriptors(
    control: std::os::fd::OwnedFd,
    stdio: [Option<std::os::fd::OwnedFd>; 3],
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    /// Above every target, so that no install can overwrite a source that is still to be installed.
    const ABOVE: i32 = 64;
    let control_high = rustix::io::fcntl_dupfd_cloexec(&control, ABOVE)?;
    drop(control);
    let mut high = Vec::with_capacity(3);
    for fd in stdio {
        high.push(match fd {
            Some(fd) => Some(rustix::io::fcntl_dupfd_cloexec(&fd, ABOVE)?),
            None => None,
        });
    }
    for (target, fd) in high.iter().enumerate() {
        match (target, fd) {
            (0, Some(fd)) => rustix::stdio::dup2_stdin(fd)?,
            (1, Some(fd)) => rustix::stdio::dup2_stdout(fd)?,
            (2, Some(fd)) => rustix::stdio::dup2_stderr(fd)?,
            _ => {}
        }
    }
    drop(high);
    // SAFETY: dup2 takes two descriptor numbers; `control_high` is open. Whatever descriptor 3 was (the
    // launcher's, owned by frames this child never returns to) is closed by it, as intended.
    if unsafe { libc::dup2(control_high.as_raw_fd(), 3) } < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(control_high);
    // Everything else: the launcher's objects that own those descriptors are never dropped in this child (it
    // leaves through `exit_child`).
    close_from(4)?;
    // SAFETY: descriptor 3 was just made a copy of the control socket, and nothing else in this child owns it.
    let control = unsafe { std::os::fd::OwnedFd::from_raw_fd(3) };
    rustix::io::fcntl_setfd(&control, rustix::io::FdFlags::CLOEXEC)?;
    Ok(control)
}

/// In a child cloned from the launcher: empty the environment and overwrite the bytes of the environment block
/// the process was started with, so neither the child's own code nor `/proc/PID/environ` (of the bottle's
/// pid 1) shows the launcher's environment, which holds real credential secrets.
pub(crate) fn scrub_environment() -> io::Result<()> {
    // SAFETY: single-threaded (see `fork`), so nothing reads or writes the environment concurrently.
    if unsafe { libc::clearenv() } != 0 {
        return Err(io::Error::other("clearenv failed"));
    }
    // proc(5): fields 50 and 51 of /proc/self/stat are env_start and env_end; the fields after the command name
    // (which ends at the last ')') start at field 3.
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let field = |n: usize| -> io::Result<usize> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other(format!("/proc/self/stat has no field {n}")))
    };
    let (start, end) = (field(50)?, field(51)?);
    if end < start || end - start > 16 << 20 {
        return Err(io::Error::other(format!(
            "implausible environment block {start:#x}..{end:#x}"
        )));
    }
    // SAFETY: [env_start, env_end) is this process's initial environment block, on the main thread's stack,
    // mapped read-write for the life of the process. After clearenv nothing refers to those bytes (the strings
    // were never the allocator's, so nothing frees them either).
    unsafe { std::ptr::write_bytes(start as *mut u8, 0, end - start) };
    Ok(())
}

/// Runs `f` on a fresh thread that joined the network namespace of `pid` (a container's): sockets it makes stay in
/// that namespace; the calling thread's namespace is untouched.
pub(crate) fn in_netns_of<T: Send + 'static>(
    pid: u32,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    use std::os::fd::AsFd;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::Builder::new()
        .name("bottle-netns".into())
        .spawn(move || {
            rustix::thread::move_into_link_name_space(ns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))?;
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("the thread in the container's network namespace panicked"))?
}
