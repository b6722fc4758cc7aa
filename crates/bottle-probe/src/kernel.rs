//! Kernel surface a bottle must deny: namespace and mount syscalls, ptrace, bpf, keyrings, userfaultfd, kexec,
//! module loading, io_uring, perf, file handles, terminal injection, personality, the kernel log, and network
//! configuration (rtnetlink routes, iptables).
//!
//! "Escaped" means the call did what it asks, or failed only after the kernel's privilege check passed (an EINVAL
//! or EBADF from a call that checks a capability first). Anything with an effect is undone at once, and the effects
//! are confined to the probe itself or to scratch paths, so a run outside a bottle changes nothing that matters.

use std::io;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};
use serde_json::json;

use crate::exact;
use crate::sys;
use crate::verdict::{Outcome, Verdict, cannot_run, usage};

pub const SYSCALLS: [&str; 20] = [
    "ptrace",
    "mount",
    "umount",
    "unshare-user",
    "unshare-net",
    "unshare-mount",
    "setns",
    "chroot",
    "bpf",
    "keyctl",
    "add-key",
    "userfaultfd",
    "kexec-load",
    "init-module",
    "io-uring",
    "perf-event-open",
    "open-by-handle",
    "tiocsti",
    "personality",
    "syslog",
];

/// The hidden argument that makes the probe a sleeping child for the ptrace case.
pub const TRACEE: &str = "__tracee";

/// `ADDR_NO_RANDOMIZE` (linux/personality.h).
const ADDR_NO_RANDOMIZE: libc::c_ulong = 0x0040000;

/// A failure that still proves the privilege check passed (the call checks its capability before its arguments).
fn past_privilege_check(r: io::Result<()>) -> io::Result<String> {
    match r {
        Ok(()) => Ok("succeeded".into()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES | libc::ENOSYS)) => Err(e),
        Err(e) => Ok(format!("passed the privilege check, then failed: {e}")),
    }
}

fn done<T>(r: io::Result<T>) -> io::Result<String> {
    r.map(|_| "succeeded".to_string())
}

pub fn syscall(args: &[String]) -> Outcome {
    let [name] = exact(args)?;
    let result = match name {
        "ptrace" => ptrace()?,
        "mount" => mount(),
        "umount" => past_privilege_check(
            rustix::mount::unmount(scratch_dir()?.as_path(), rustix::mount::UnmountFlags::empty()).map_err(Into::into),
        ),
        "unshare-user" => done(sys::unshare(libc::CLONE_NEWUSER)),
        "unshare-net" => done(sys::unshare(libc::CLONE_NEWNET)),
        "unshare-mount" => done(sys::unshare(libc::CLONE_NEWNS)),
        "setns" => setns(),
        "chroot" => done(rustix::process::chroot("/").map_err(io::Error::from)),
        "bpf" => done(sys::bpf_map_create()),
        "keyctl" => done(sys::keyctl_user_keyring()),
        "add-key" => done(sys::add_key_process()),
        "userfaultfd" => done(sys::userfaultfd()),
        "kexec-load" => past_privilege_check(sys::kexec_load_invalid()),
        "init-module" => past_privilege_check(sys::finit_module_invalid()),
        "io-uring" => done(sys::io_uring_setup()),
        "perf-event-open" => done(sys::perf_event_open()),
        "open-by-handle" => open_by_handle(),
        "tiocsti" => tiocsti(),
        "personality" => personality(),
        "syslog" => done(sys::syslog_size()),
        other => {
            return Err(usage(format!(
                "unknown syscall `{other}`; one of {}",
                SYSCALLS.join(", ")
            )));
        }
    };
    Ok(match result {
        Ok(what) => Verdict::escaped("syscall", format!("{name}: {what}")).with(json!({ "syscall": name })),
        Err(e) => {
            Verdict::held("syscall", format!("{name}: {e}")).with(json!({ "syscall": name, "errno": e.raw_os_error() }))
        }
    })
}

/// A scratch directory of the probe's own under the temporary directory.
fn scratch_dir() -> Result<std::path::PathBuf, crate::verdict::Failure> {
    let dir = std::env::temp_dir().join(format!("bottle-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| cannot_run(format!("scratch dir {}: {e}", dir.display())))?;
    Ok(dir)
}

/// PTRACE_ATTACH to a child of our own (Yama's scope 1 allows descendants), the easiest target there is.
fn ptrace() -> Result<io::Result<String>, crate::verdict::Failure> {
    let exe = std::env::current_exe().map_err(|e| cannot_run(format!("cannot find the probe itself: {e}")))?;
    let mut child = Command::new(exe)
        .arg(TRACEE)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| cannot_run(format!("cannot start a child to trace: {e}")))?;
    let pid = i32::try_from(child.id()).map_err(|e| cannot_run(e.to_string()))?;
    let r = sys::ptrace_attach(pid).map(|()| {
        let _ = sys::ptrace_detach(pid);
        format!("attached to pid {pid}")
    });
    let _ = child.kill();
    let _ = child.wait();
    Ok(r)
}

fn mount() -> io::Result<String> {
    let dir = std::env::temp_dir().join(format!("bottle-probe-mnt-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let r = rustix::mount::mount("none", &dir, "tmpfs", rustix::mount::MountFlags::empty(), None);
    if r.is_ok() {
        let _ = rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::DETACH);
    }
    let _ = std::fs::remove_dir(&dir);
    r.map(|()| format!("mounted a tmpfs on {}", dir.display()))
        .map_err(Into::into)
}

/// Joining a namespace: our own network namespace, so success changes nothing but proves setns works.
fn setns() -> io::Result<String> {
    let ns = std::fs::File::open("/proc/self/ns/net")?;
    rustix::thread::move_into_link_name_space(ns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
        .map(|()| "joined a network namespace".to_string())
        .map_err(Into::into)
}

fn open_by_handle() -> io::Result<String> {
    let root = std::fs::File::open("/")?;
    match sys::open_by_handle(root.as_fd()) {
        Ok(_) => Ok("opened / by handle".into()),
        Err(e) => past_privilege_check(Err(e)),
    }
}

/// Injects a byte into a fresh pseudo-terminal of our own, never into the user's.
fn tiocsti() -> io::Result<String> {
    use rustix::fs::{Mode, OFlags};
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(name.as_c_str(), OFlags::RDWR | OFlags::NOCTTY, Mode::empty())?;
    sys::tiocsti(slave.as_fd()).map(|()| "injected input into a terminal".to_string())
}

fn personality() -> io::Result<String> {
    let previous = sys::personality(ADDR_NO_RANDOMIZE)?;
    let _ = sys::personality(previous as libc::c_ulong);
    Ok("disabled address space randomisation".into())
}

/// rtnetlink message types, flags and attributes (linux/netlink.h, linux/rtnetlink.h).
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_BLACKHOLE: u8 = 6;
const RTA_DST: u16 = 1;
/// TEST-NET-2 (RFC 5737): a blackhole route for it harms nothing even where it is accepted.
const ROUTE_DST: [u8; 4] = [198, 51, 100, 0];

fn route_message(kind: u16, flags: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(36);
    m.extend_from_slice(&36u32.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    m.extend_from_slice(&[
        libc::AF_INET as u8,
        24,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        0,
        RTN_BLACKHOLE,
    ]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&8u16.to_ne_bytes());
    m.extend_from_slice(&RTA_DST.to_ne_bytes());
    m.extend_from_slice(&ROUTE_DST);
    m
}

/// Sends one request and returns the kernel's acknowledgement (0 or a negative errno).
fn route_request(fd: &std::os::fd::OwnedFd, msg: &[u8]) -> io::Result<i32> {
    rustix::net::send(fd, msg, SendFlags::empty())?;
    rustix::net::sockopt::set_socket_timeout(
        fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(std::time::Duration::from_secs(2)),
    )?;
    let mut buf = [0u8; 512];
    let (n, _) = rustix::net::recv(fd, &mut buf[..], RecvFlags::empty())?;
    if n < 20 || u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a netlink acknowledgement",
        ));
    }
    Ok(i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]))
}

pub fn netlink_route(args: &[String]) -> Outcome {
    let [] = exact(args)?;
    let fd = match rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, None) {
        Ok(fd) => fd,
        Err(e) => return Ok(Verdict::held("netlink-route", format!("no rtnetlink socket: {e}"))),
    };
    Ok(
        match route_request(&fd, &route_message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL)) {
            Ok(0) => {
                let _ = route_request(&fd, &route_message(RTM_DELROUTE, 0));
                Verdict::escaped("netlink-route", "the kernel accepted a new route (removed again)")
            }
            Ok(errno) => Verdict::held(
                "netlink-route",
                format!("route refused: {}", io::Error::from_raw_os_error(-errno)),
            ),
            Err(e) => Verdict::held("netlink-route", format!("rtnetlink: {e}")),
        },
    )
}

pub fn iptables(args: &[String]) -> Outcome {
    let [] = exact(args)?;
    let fd = match rustix::net::socket(AddressFamily::INET, SocketType::RAW, Some(rustix::net::ipproto::RAW)) {
        Ok(fd) => fd,
        Err(e) => return Ok(Verdict::held("iptables", format!("no raw socket for iptables: {e}"))),
    };
    Ok(match sys::iptables_get_info(fd.as_fd()) {
        Ok(()) => Verdict::escaped("iptables", "read the iptables filter table"),
        Err(e) => Verdict::held("iptables", format!("IPT_SO_GET_INFO: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_message_is_36_bytes_and_says_so() {
        let m = route_message(RTM_NEWROUTE, NLM_F_CREATE);
        assert_eq!(m.len(), 36);
        assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()), 36);
    }

    #[test]
    fn privilege_check_semantics() {
        assert!(past_privilege_check(Err(io::Error::from_raw_os_error(libc::EPERM))).is_err());
        assert!(past_privilege_check(Err(io::Error::from_raw_os_error(libc::EINVAL))).is_ok());
    }
}
