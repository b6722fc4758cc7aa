//! Raw syscalls the bottle's init needs that rustix has no safe wrapper for: fork, bringing `lo` up, closing
//! inherited descriptors, and forwarding termination signals to the agent.
//! Trusts the kernel's documented ABI (fork(2), netdevice(7), close_range(2), sigaction(2)).

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

/// What `fork` returned, seen from one side.
pub(crate) enum Forked {
    Parent { child: i32 },
    Child,
}

/// fork(2). Only called from the single-threaded init process, so the child inherits no lock held by
/// another thread.
pub(crate) fn fork() -> io::Result<Forked> {
    // SAFETY: fork has no memory-safety preconditions of its own; the callers are single-threaded processes
    // (the re-executed init), so the child cannot observe a lock held by a vanished thread.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        child => Ok(Forked::Parent { child }),
    }
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

/// Takes ownership of a descriptor number handed to this process on its command line, after checking it is open.
pub(crate) fn adopt_fd(fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only queries the descriptor table.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not open"),
        ));
    }
    // SAFETY: the descriptor is open (checked above) and was passed to this process for it alone to own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Ends a forked child without returning into its parent's stack or running the parent's exit handlers.
pub(crate) fn exit_child(code: i32) -> ! {
    let _ = std::io::Write::flush(&mut std::io::stderr());
    // SAFETY: _exit takes a plain integer and never returns.
    unsafe { libc::_exit(code) }
}

/// unshare(2) for namespace flags only.
pub(crate) fn unshare(flags: rustix::thread::UnshareFlags) -> io::Result<()> {
    // SAFETY: unshare_unsafe is unsafe because CLONE_FILES/CLONE_FS/CLONE_SYSVSEM can invalidate assumptions
    // of other threads about shared descriptors; callers pass only CLONE_NEW* flags, in a single-threaded
    // process.
    unsafe { rustix::thread::unshare_unsafe(flags) }.map_err(Into::into)
}
