//! The socket warden (#12): a pathname Unix socket is found through the filesystem, not the network namespace, so
//! a host process's socket in the workspace (git's fsmonitor daemon, a dev server) would answer the bottle. Every
//! `connect(2)` of the agent's process tree is handed to the warden (seccomp user notification), which carries it
//! out itself on the agent's socket (`pidfd_getfd`) with the address it read once, so nothing the agent changes
//! after the check counts. A Unix path is connected only when the socket behind it was bound inside this bottle
//! (it is listed by the bottle's own network namespace) or is one the policy shares (`[bottle] share_sockets`);
//! anything else is refused with EACCES and explained once on the bottle's stderr.
//!
//! Runs as a child of the bottle's pid 1 (or of an `exec`'d command's process, in the bottle's namespaces), without
//! the agent's hardening, until no process uses the filter. Trusts the kernel; trusts nothing the agent passes.
//! If the warden is gone, every connect of the agent fails (ENOSYS): it fails closed.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rustix::event::{PollFd, PollFlags};
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags};

use super::control::{self, Message};
use crate::sys::harden::{self as sys_notify, Notif};
use crate::sys::ns::{self as sys, Forked};

/// `AUDIT_ARCH_*` (linux/audit.h) of this build. A syscall of another arch is the main filter's (it kills it).
const AUDIT_ARCH_NATIVE: u32 = if cfg!(target_arch = "x86_64") {
    0xc000_003e
} else {
    0xc000_00b7
};
/// Offsets in `struct seccomp_data` (linux/seccomp.h).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// `sizeof(struct sockaddr_storage)`: the kernel refuses a longer address (EINVAL).
const SOCKADDR_MAX: usize = 128;
const SUN_PATH_OFFSET: usize = 2;

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Offsets of the low halves of the first two arguments in `struct seccomp_data` (little-endian targets only).
const DATA_ARG0: u32 = 16;
const DATA_ARG1: u32 = 24;
const BPF_AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
/// `SOCK_TYPE_MASK` (linux/net.h).
const SOCK_TYPE_MASK: u32 = 0xf;

/// The filter that hands every native `connect(2)` to the warden, and refuses Unix datagram sockets (`socket` and
/// `socketpair` of `AF_UNIX, SOCK_DGRAM`: a datagram reaches a socket by path with every `sendto`, past any check;
/// the namespace backend's main filter refuses them too, a container's engine profile does not). Everything else is
/// the main filter's business.
pub(crate) fn program() -> Vec<libc::sock_filter> {
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let nr = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
    let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    vec![
        /* 0 */ insn(BPF_LD_W_ABS, 0, 0, DATA_ARCH),
        /* 1 */ insn(BPF_JEQ_K, 0, 11, AUDIT_ARCH_NATIVE), // -> 13
        /* 2 */ insn(BPF_LD_W_ABS, 0, 0, DATA_NR),
        /* 3 */ insn(BPF_JEQ_K, 8, 0, nr(libc::SYS_connect)), // -> 12
        /* 4 */ insn(BPF_JEQ_K, 1, 0, nr(libc::SYS_socket)), // -> 6
        /* 5 */ insn(BPF_JEQ_K, 0, 7, nr(libc::SYS_socketpair)), // else -> 13
        /* 6 */ insn(BPF_LD_W_ABS, 0, 0, DATA_ARG0),
        /* 7 */ insn(BPF_JEQ_K, 0, 5, libc::AF_UNIX as u32), // else -> 13
        /* 8 */ insn(BPF_LD_W_ABS, 0, 0, DATA_ARG1),
        /* 9 */ insn(BPF_AND_K, 0, 0, SOCK_TYPE_MASK),
        /* 10 */ insn(BPF_JEQ_K, 0, 2, libc::SOCK_DGRAM as u32), // else -> 13
        /* 11 */ insn(BPF_RET_K, 0, 0, eperm),
        /* 12 */ insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_USER_NOTIF),
        /* 13 */ insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Starts the warden as a child of the calling (single-threaded) process. Returns the end of the channel on which
/// the agent's process hands over the filter's listener (`hand_over`) just before it execs.
pub(super) fn start(shared: &[PathBuf]) -> io::Result<OwnedFd> {
    let (ours, theirs) = control::pair()?;
    match sys::fork()? {
        Forked::Child => {
            drop(theirs);
            // Nothing of the caller's but stderr (where refusals are explained) and the channel.
            let code = match sys::keep_only_stderr_and(&ours) {
                Ok(()) => serve_from(&ours, shared),
                Err(_) => 1,
            };
            sys::exit_child(code)
        }
        Forked::Parent { .. } => Ok(theirs),
    }
}

/// In the agent's process, hardened but before exec: installs the connect filter and gives its listener to the
/// warden. After this every connect of this process and its children waits for the warden's verdict.
pub(super) fn hand_over(channel: BorrowedFd<'_>) -> io::Result<()> {
    let listener = sys_notify::install_notify_filter(&program())?;
    control::send(channel, &Message::Warden, Some(listener.as_fd()))
}

fn serve_from(channel: &OwnedFd, shared: &[PathBuf]) -> i32 {
    let listener = match control::recv(channel, false) {
        Ok(Some((Message::Warden, Some(fd)))) => fd,
        // The agent's process never got as far as its filter (it could not start): nothing to watch.
        _ => return 0,
    };
    // This process is in the bottle's network namespace: its sock_diag socket lists the bottle's sockets.
    match diag_socket() {
        Ok(diag) => serve(listener, shared.to_vec(), diag),
        // SECURITY: without it nothing can be judged; dropping the listener fails every connect (ENOSYS).
        Err(e) => {
            let _ = writeln!(io::stderr(), "bot-bottle: the socket warden cannot start: {e}");
            return 1;
        }
    }
    0
}

/// A sock_diag socket of the caller's network namespace (a socket keeps the namespace it was made in).
pub(crate) fn diag_socket() -> io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, netlink};
    Ok(rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(netlink::SOCK_DIAG),
    )?)
}

/// Judges the connects of one filter's processes until none is left: `listener` is the filter's, `shared` the
/// `share_sockets` paths (inside the bottle), `diag` a sock_diag socket of the bottle's network namespace. The
/// tasks may live in another mount namespace (a container's): paths are resolved through their own root.
pub(crate) fn serve(listener: OwnedFd, shared: Vec<PathBuf>, diag: OwnedFd) {
    let warden = Arc::new(Warden {
        listener,
        shared,
        diag: Mutex::new(diag),
        explained: Mutex::new(HashSet::new()),
    });
    loop {
        let mut fds = [PollFd::new(&warden.listener, PollFlags::IN)];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(_) => return,
        }
        let revents = fds[0].revents();
        if !revents.contains(PollFlags::IN) {
            // HUP: no process uses the filter any more.
            return;
        }
        let notif = match sys_notify::notif_recv(warden.listener.as_fd()) {
            Ok(n) => n,
            // The task died before its notification was read.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) => continue,
            Err(_) => return,
        };
        // A connect may block (a full backlog): each on its own thread, so one never holds up the others.
        let w = Arc::clone(&warden);
        if std::thread::Builder::new().spawn(move || w.answer(&notif)).is_err() {
            warden.answer(&notif);
        }
    }
}

struct Warden {
    listener: OwnedFd,
    /// Paths inside the bottle whose sockets the policy shares.
    shared: Vec<PathBuf>,
    /// sock_diag in the bottle's network namespace; one dump at a time.
    diag: Mutex<OwnedFd>,
    /// Sockets already explained on stderr: one line each, not one per attempt.
    explained: Mutex<HashSet<(u64, u64)>>,
}

impl Warden {
    fn answer(&self, n: &Notif) {
        let result = self.judge(n).map(|()| 0).map_err(|e| e.raw_os_error());
        let _ = sys_notify::notif_send(self.listener.as_fd(), n.id, result);
    }

    /// Carries out the task's `connect(fd, addr, len)` on its socket, or refuses it.
    fn judge(&self, n: &Notif) -> Result<(), Errno> {
        if i64::from(n.nr) != libc::SYS_connect {
            return Err(Errno::NOSYS);
        }
        // The notification names the calling thread; descriptors belong to its thread group (a pidfd of a thread
        // that does not lead its group needs Linux 6.9).
        let pid = thread_group(n.pid).and_then(Pid::from_raw).ok_or(Errno::SRCH)?;
        let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty())?;
        // SECURITY: the pid is the task's only while its notification is pending; checked after every use by pid.
        self.still_pending(n)?;
        let fd = i32::try_from(n.args[0]).map_err(|_| Errno::BADF)?;
        let sock = rustix::process::pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty())?;
        let len = usize::try_from(n.args[2] & 0xffff_ffff).map_err(|_| Errno::INVAL)?;
        if len > SOCKADDR_MAX {
            return Err(Errno::INVAL);
        }
        let mut addr = vec![0u8; len];
        File::open(format!("/proc/{}/mem", n.pid))
            .and_then(|mem| mem.read_exact_at(&mut addr, n.args[1]))
            .map_err(|_| Errno::FAULT)?;
        self.still_pending(n)?;
        let domain = rustix::net::sockopt::socket_domain(&sock)?;
        if domain != rustix::net::AddressFamily::UNIX {
            // Not a Unix socket: the network namespace confines it. Carried out here all the same, with the
            // address read above, so that a swap of descriptor or address after the check cannot matter.
            return connect(&sock, &addr);
        }
        match unix_path(&addr) {
            // Unnamed or abstract (abstract names belong to the bottle's network namespace), or not AF_UNIX.
            None => connect(&sock, &addr),
            Some(path) => self.connect_path(n.pid, &sock, path),
        }
    }

    fn still_pending(&self, n: &Notif) -> Result<(), Errno> {
        if sys_notify::notif_id_valid(self.listener.as_fd(), n.id) {
            Ok(())
        } else {
            Err(Errno::SRCH)
        }
    }

    /// A pathname socket, resolved as the task would (inside its root, relative to its thread's working directory)
    /// and connected through the descriptor of what was resolved, so the check and the connect see the same socket.
    fn connect_path(&self, tid: u32, sock: &OwnedFd, path: &[u8]) -> Result<(), Errno> {
        let target = resolve(tid, path)?;
        let st = rustix::fs::fstat(&target)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
            return Err(Errno::CONNREFUSED);
        }
        let key = (st.st_dev, st.st_ino);
        if !self.allowed(tid, key) {
            self.explain(key, path);
            return Err(Errno::ACCESS);
        }
        let via = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&target));
        connect(sock, &sockaddr_un(via.as_bytes()))
    }

    fn allowed(&self, tid: u32, (dev, ino): (u64, u64)) -> bool {
        // SECURITY: a shared path is taken as written, through no symlink: the agent may write where the shared socket
        // lives (the workspace), and a link it puts there must not make another host socket the shared one.
        let shared = self.shared.iter().any(|p| {
            resolve_with(
                tid,
                p.as_os_str().as_encoded_bytes(),
                rustix::fs::ResolveFlags::NO_SYMLINKS,
            )
            .and_then(|fd| rustix::fs::fstat(&fd))
            .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Socket && s.st_dev == dev && s.st_ino == ino)
        });
        if shared {
            return true;
        }
        let Ok(diag) = self.diag.lock() else { return false };
        bound(&diag).is_ok_and(|bound| bound.contains(&(rustix::fs::major(dev), rustix::fs::minor(dev), ino)))
    }

    fn explain(&self, key: (u64, u64), path: &[u8]) {
        let first = self.explained.lock().map(|mut e| e.insert(key)).unwrap_or(true);
        if first {
            let _ = writeln!(
                io::stderr(),
                "bot-bottle: refused a connection to the Unix socket {}: it belongs to a process outside the bottle; \
                 share it on purpose with `share_sockets = [\"…\"]` under [bottle] in the policy",
                String::from_utf8_lossy(path)
            );
        }
    }
}

/// The thread group (process) of thread `tid`, from /proc.
fn thread_group(tid: u32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()
}

/// `path` as thread `tid` would find it: inside its root (`RESOLVE_IN_ROOT`: neither `..` nor a link leaves it), a
/// relative one from its working directory (its path inside that root).
fn resolve(tid: u32, path: &[u8]) -> Result<OwnedFd, Errno> {
    resolve_with(tid, path, rustix::fs::ResolveFlags::empty())
}

/// `resolve` with more `openat2` resolve flags.
fn resolve_with(tid: u32, path: &[u8], more: rustix::fs::ResolveFlags) -> Result<OwnedFd, Errno> {
    use rustix::fs::ResolveFlags;
    let root = rustix::fs::open(
        format!("/proc/{tid}/root"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut full = Vec::new();
    if path.first() != Some(&b'/') {
        let cwd = rustix::fs::readlink(format!("/proc/{tid}/cwd"), Vec::new())?;
        let cwd = cwd.as_bytes();
        // "(unreachable)" and the like: a working directory outside its root.
        if cwd.first() != Some(&b'/') {
            return Err(Errno::NOENT);
        }
        full.extend_from_slice(cwd);
        full.push(b'/');
    }
    full.extend_from_slice(path);
    rustix::fs::openat2(
        &root,
        full.as_slice(),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | more,
    )
}

fn connect(sock: &OwnedFd, addr: &[u8]) -> Result<(), Errno> {
    sys_notify::connect_raw(sock.as_fd(), addr)
        .map_err(|e| Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EINVAL)))
}

/// The path of an AF_UNIX pathname address (up to its first NUL); `None` for any other address.
fn unix_path(addr: &[u8]) -> Option<&[u8]> {
    let family = u16::from_ne_bytes([*addr.first()?, *addr.get(1)?]);
    if family != libc::AF_UNIX as u16 {
        return None;
    }
    let path = addr.get(SUN_PATH_OFFSET..)?;
    match path.first() {
        None | Some(0) => None,
        Some(_) => Some(path.split(|&b| b == 0).next().unwrap_or(path)),
    }
}

fn sockaddr_un(path: &[u8]) -> Vec<u8> {
    let mut addr = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    addr.extend_from_slice(path);
    addr.push(0);
    addr
}

/// `SOCK_DIAG_BY_FAMILY`, `NLM_F_REQUEST | NLM_F_DUMP`, `NLMSG_DONE`, `NLMSG_ERROR` (linux/netlink.h,
/// linux/sock_diag.h); `UDIAG_SHOW_VFS` and the `UNIX_DIAG_VFS` attribute (linux/unix_diag.h).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST_DUMP: u16 = 0x1 | 0x300;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const UDIAG_SHOW_VFS: u32 = 0x2;
const UNIX_DIAG_VFS: u16 = 1;
const NLMSG_HDR: usize = 16;
const UNIX_DIAG_MSG: usize = 16;

/// The files (device major, minor, inode) of every pathname Unix socket bound in `diag`'s network namespace: the
/// sockets made in this bottle, and only those (sock_diag lists a namespace's own sockets).
fn bound(nl: &OwnedFd) -> io::Result<HashSet<(u32, u32, u64)>> {
    use rustix::net::{RecvFlags, SendFlags};
    let mut req = Vec::with_capacity(NLMSG_HDR + 24);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST_DUMP.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    // struct unix_diag_req: family, protocol, pad, states (all), ino (any), show, cookie.
    req.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&UDIAG_SHOW_VFS.to_ne_bytes());
    req.extend_from_slice(&[0u8; 8]);
    rustix::net::send(nl, &req, SendFlags::empty())?;
    let mut found = HashSet::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let (n, _) = rustix::net::recv(nl, &mut buf, RecvFlags::empty())?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        if parse_dump(&buf[..n], &mut found)? {
            return Ok(found);
        }
    }
}

/// Adds the VFS identities of one datagram of a dump; `Ok(true)` at its end.
fn parse_dump(mut data: &[u8], found: &mut HashSet<(u32, u32, u64)>) -> io::Result<bool> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "a malformed sock_diag answer");
    while data.len() >= NLMSG_HDR {
        let len = u32_at(data, 0).ok_or_else(bad)? as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        if len < NLMSG_HDR || len > data.len() {
            return Err(bad());
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => return Err(io::Error::other("sock_diag refused the dump")),
            _ => {
                let mut attrs = data.get(NLMSG_HDR + UNIX_DIAG_MSG..len).unwrap_or_default();
                while attrs.len() >= 4 {
                    let alen = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
                    let akind = u16::from_ne_bytes([attrs[2], attrs[3]]);
                    if alen < 4 || alen > attrs.len() {
                        return Err(bad());
                    }
                    if akind == UNIX_DIAG_VFS && alen >= 12 {
                        let ino = u32_at(attrs, 4).ok_or_else(bad)?;
                        // The kernel's own dev_t: 12 bits of major above 20 bits of minor.
                        let dev = u32_at(attrs, 8).ok_or_else(bad)?;
                        found.insert((dev >> 20, dev & 0xf_ffff, u64::from(ino)));
                    }
                    attrs = attrs.get(alen.next_multiple_of(4)..).unwrap_or_default();
                }
            }
        }
        data = data.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(false)
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

/// For tests and `doctor`-like checks: whether `path` is a socket this network namespace bound.
#[cfg(test)]
fn is_bound_here(path: &std::path::Path) -> io::Result<bool> {
    let st = rustix::fs::stat(path)?;
    Ok(bound(&diag_socket()?)?.contains(&(rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev), st.st_ino)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_path_is_read_up_to_its_nul_and_other_addresses_are_not_paths() {
        let mut addr = sockaddr_un(b"/w/.git/fsmonitor--daemon.ipc");
        addr.extend_from_slice(&[0, b'x']);
        assert_eq!(unix_path(&addr), Some(&b"/w/.git/fsmonitor--daemon.ipc"[..]));
        assert_eq!(unix_path(&sockaddr_un(b"rel/sock")), Some(&b"rel/sock"[..]));
        // Abstract, unnamed, too short, another family.
        assert_eq!(unix_path(&sockaddr_un(b"\0name")), None);
        assert_eq!(unix_path(&(libc::AF_UNIX as u16).to_ne_bytes()), None);
        assert_eq!(unix_path(&[1]), None);
        let mut inet = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        inet.extend_from_slice(b"/not/a/path");
        assert_eq!(unix_path(&inet), None);
    }

    #[test]
    fn sock_diag_lists_a_socket_this_namespace_bound_and_not_a_plain_file() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(is_bound_here(&sock).unwrap());
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        assert!(!is_bound_here(&file).unwrap());
    }

    #[test]
    fn malformed_dumps_are_errors_not_panics() {
        let mut found = HashSet::new();
        // A length beyond the datagram, a length below the header, an attribute longer than its message.
        let mut long = 64u32.to_ne_bytes().to_vec();
        long.extend_from_slice(&[0; 12]);
        assert!(parse_dump(&long, &mut found).is_err());
        let mut short = 8u32.to_ne_bytes().to_vec();
        short.extend_from_slice(&[0; 12]);
        assert!(parse_dump(&short, &mut found).is_err());
        let mut attr = 36u32.to_ne_bytes().to_vec();
        attr.extend_from_slice(&[20, 0, 0, 0]);
        attr.extend_from_slice(&[0; 8 + UNIX_DIAG_MSG]);
        attr.extend_from_slice(&200u16.to_ne_bytes());
        attr.extend_from_slice(&UNIX_DIAG_VFS.to_ne_bytes());
        assert!(parse_dump(&attr, &mut found).is_err());
        let mut done = 16u32.to_ne_bytes().to_vec();
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0; 10]);
        assert!(parse_dump(&done, &mut found).unwrap());
        assert!(found.is_empty());
    }
}
