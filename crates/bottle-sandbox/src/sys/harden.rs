//! Raw syscalls of seccomp's user notification (no safe wrapper in rustix or seccompiler): installing a filter
//! that hands its decisions to a supervisor, and the supervisor's side of the listener. `namespace::warden` is the
//! only user; `namespace::harden` needs none of this (seccompiler installs the main filter).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use libc::sock_filter;

/// One notified syscall: its id (for the answer), the calling task (in the supervisor's pid namespace), the
/// syscall number and its raw arguments.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Notif {
    pub id: u64,
    pub pid: u32,
    pub nr: i32,
    pub args: [u64; 6],
}

/// Installs `program` on the calling thread (no_new_privs must be set) with a new listener, and returns the
/// listener. The filter applies to every later child too. `WAIT_KILLABLE_RECV` (Linux 5.19) keeps a signal from
/// restarting a syscall the supervisor has already started to carry out; without it (older kernels) the filter is
/// installed as is.
pub(crate) fn install_notify_filter(program: &[sock_filter]) -> io::Result<OwnedFd> {
    let len = u16::try_from(program.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let prog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut(),
    };
    let install = |flags: libc::c_ulong| {
        // SAFETY: `prog` points at `program`, alive for the call; the kernel copies it.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                std::ptr::from_ref(&prog),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let listener = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
    match install(listener | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => install(listener),
        other => other,
    }
}

/// Waits for the next notification. `ENOENT`: the task died before it could be read (try again).
pub(crate) fn notif_recv(listener: BorrowedFd<'_>) -> io::Result<Notif> {
    // SAFETY: all-zero is a valid seccomp_notif, and the kernel requires it zeroed.
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: `n` is a seccomp_notif the kernel fills; the listener is a live descriptor.
    let r = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV,
            std::ptr::from_mut(&mut n),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Notif {
        id: n.id,
        pid: n.pid,
        nr: n.data.nr,
        args: n.data.args,
    })
}

/// Whether notification `id` is still pending (its task alive and waiting): checked after anything read from
/// the task by pid, so a recycled pid is never believed.
pub(crate) fn notif_id_valid(listener: BorrowedFd<'_>, id: u64) -> bool {
    let mut id = id;
    // SAFETY: the ioctl reads one u64.
    unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_ID_VALID,
            std::ptr::from_mut(&mut id),
        ) == 0
    }
}

/// Answers notification `id`: the syscall returns `Ok(value)` or fails with the errno. An answer for a task that
/// has gone meanwhile is dropped by the kernel (`ENOENT`), which is not an error here.
pub(crate) fn notif_send(listener: BorrowedFd<'_>, id: u64, result: Result<i64, i32>) -> io::Result<()> {
    let (val, error) = match result {
        Ok(v) => (v, 0),
        Err(errno) => (0, -errno),
    };
    let mut resp = libc::seccomp_notif_resp {
        id,
        val,
        error,
        flags: 0,
    };
    // SAFETY: `resp` is a seccomp_notif_resp the kernel reads.
    let r = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            std::ptr::from_mut(&mut resp),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
    }
    Ok(())
}

/// `connect(2)` with an address given as raw bytes (a `struct sockaddr` of any family, as the task passed it).
pub(crate) fn connect_raw(sock: BorrowedFd<'_>, addr: &[u8]) -> io::Result<()> {
    let len = libc::socklen_t::try_from(addr.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `addr` is `len` readable bytes; the kernel copies at most `len` and checks the family itself.
    let r = unsafe { libc::connect(sock.as_raw_fd(), addr.as_ptr().cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
