//! The bottle init's hardening, checked from inside (escape cases 37-39, 41, 44). Hardening is irreversible, so each
//! case runs in a child: the parent re-executes this test binary as `--exact harden_child` with the case named in
//! `BOTTLE_HARDEN_CASE`, inside fresh user and network namespaces where the child is uid 0 with every capability,
//! as the real init is. The child applies the hardening (unless told not to, for a positive control), attempts the
//! forbidden thing and prints one JSON verdict line that the parent asserts on.
#![allow(unsafe_code, clippy::unwrap_used)]

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bottle_sandbox::namespace::harden::{HardenError, Hardening, LandlockMode, apply};
use bottle_test_support::require::skip;
use rustix::fs::{Mode, OFlags};
use rustix::net::{AddressFamily, SocketFlags, SocketType, ipproto};
use rustix::thread::UnshareFlags;
use serde::{Deserialize, Serialize};

const CASE_ENV: &str = "BOTTLE_HARDEN_CASE";
/// `1` to apply the hardening before the attempt, `0` for a positive control.
const APPLY_ENV: &str = "BOTTLE_HARDEN_APPLY";
const READ_ONLY_ENV: &str = "BOTTLE_HARDEN_READ_ONLY";
const READ_WRITE_ENV: &str = "BOTTLE_HARDEN_READ_WRITE";
const VERDICT_MARKER: &str = "HARDEN_VERDICT ";
/// A file the parent puts in the read-only directory.
const EXISTING_FILE: &str = "existing";
/// `KEYCTL_GET_KEYRING_ID` and `KEY_SPEC_SESSION_KEYRING` (linux/keyctl.h).
const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
/// `BPF_MAP_CREATE` (linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;

#[derive(Debug, Serialize, Deserialize)]
struct Verdict {
    case: String,
    applied: bool,
    /// Why the case could not run here (Landlock required but absent).
    skipped: Option<String>,
    /// `apply` failed: the case proves nothing.
    apply_error: Option<String>,
    /// `None` when the attempt succeeded.
    errno: Option<i32>,
    detail: String,
}

// ---------------------------------------------------------------------------------------------------------------
// Parent side.

/// Runs `case` in a hardened (or, with `harden == false`, unhardened) child; `None` when it had to skip.
fn run_case(case: &str, harden: bool) -> Option<Verdict> {
    let read_only = tempfile::tempdir().unwrap();
    let read_write = tempfile::tempdir().unwrap();
    std::fs::write(read_only.path().join(EXISTING_FILE), "data").unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "harden_child", "--nocapture", "--test-threads=1"])
        .env(CASE_ENV, case)
        .env(APPLY_ENV, if harden { "1" } else { "0" })
        .env(READ_ONLY_ENV, read_only.path())
        .env(READ_WRITE_ENV, read_write.path());
    in_new_user_and_net_namespaces(&mut cmd);
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => {
            skip(
                "namespace",
                &format!("cannot start the child in a new user namespace: {e}"),
            );
            return None;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "child {case} failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once(VERDICT_MARKER).map(|(_, json)| json))
        .unwrap_or_else(|| panic!("child {case} printed no verdict:\n{stdout}\n{stderr}"));
    let verdict: Verdict = serde_json::from_str(line).unwrap();
    assert_eq!((verdict.case.as_str(), verdict.applied), (case, harden));
    assert_eq!(verdict.apply_error, None, "apply failed in child {case}");
    if let Some(why) = &verdict.skipped {
        skip("namespace", why);
        return None;
    }
    Some(verdict)
}

/// The child starts as the real init does: uid 0 of a fresh user namespace (mapped to the caller's uid), with every
/// capability there, in a network namespace that namespace owns. So the test also runs for a non-root caller.
fn in_new_user_and_net_namespaces(cmd: &mut Command) {
    let uid_map = format!("0 {} 1", rustix::process::getuid().as_raw());
    let gid_map = format!("0 {} 1", rustix::process::getgid().as_raw());
    let write = |path: &std::ffi::CStr, data: &[u8]| -> io::Result<()> {
        let fd = rustix::fs::open(path, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
        rustix::io::write(&fd, data)?;
        Ok(())
    };
    let enter = move || -> io::Result<()> {
        // SAFETY: the forked child is single-threaded and the flags do not include CLONE_FILES, so no thread can
        // observe a descriptor table it does not share.
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER | UnshareFlags::NEWNET) }?;
        write(c"/proc/self/setgroups", b"deny")?;
        write(c"/proc/self/uid_map", uid_map.as_bytes())?;
        write(c"/proc/self/gid_map", gid_map.as_bytes())
    };
    // SAFETY: between fork and exec the closure only makes raw syscalls through rustix (unshare, open, write,
    // close) on memory allocated before the fork; it neither allocates nor takes locks.
    unsafe { cmd.pre_exec(enter) };
}

fn denied(case: &str, errno: i32) {
    let Some(v) = run_case(case, true) else { return };
    assert_eq!(v.errno, Some(errno), "{case}: {}", v.detail);
}

fn allowed(case: &str, harden: bool) {
    let Some(v) = run_case(case, harden) else { return };
    assert_eq!(v.errno, None, "{case}: {}", v.detail);
}

#[test]
fn status_shows_no_new_privs_no_capabilities_and_a_seccomp_filter() {
    let Some(v) = run_case("status", true) else { return };
    for want in [
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "CapInh:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "CapAmb:\t0000000000000000",
    ] {
        assert!(
            v.detail.lines().any(|l| l == want),
            "missing {want:?} in:\n{}",
            v.detail
        );
    }
}

/// Control: the child starts privileged, so the status test above sees what `apply` changed.
#[test]
fn status_without_hardening_shows_capabilities() {
    let Some(v) = run_case("status", false) else { return };
    assert!(v.detail.lines().any(|l| l == "NoNewPrivs:\t0"), "{}", v.detail);
    assert!(v.detail.lines().any(|l| l == "Seccomp:\t0"), "{}", v.detail);
    assert!(
        !v.detail.lines().any(|l| l == "CapBnd:\t0000000000000000"),
        "{}",
        v.detail
    );
}

#[test]
fn unshare_user_namespace_is_eperm() {
    // Unhardened, unshare(CLONE_NEWUSER) in the multi-threaded test process fails with EINVAL, not EPERM.
    denied("unshare_user", libc::EPERM);
}

#[test]
fn mount_is_eperm() {
    denied("mount", libc::EPERM);
}

#[test]
fn fsopen_is_eperm() {
    denied("fsopen", libc::EPERM);
}

#[test]
fn ptrace_traceme_is_eperm() {
    denied("ptrace_traceme", libc::EPERM);
}

#[test]
fn ptrace_attach_to_own_child_is_eperm() {
    denied("ptrace_attach", libc::EPERM);
}

#[test]
fn packet_socket_is_eafnosupport() {
    denied("socket_packet", libc::EAFNOSUPPORT);
}

#[test]
fn netlink_socket_is_eafnosupport() {
    denied("socket_netlink", libc::EAFNOSUPPORT);
}

/// Control: the same child creates the netlink socket without hardening, so the test above can fail.
#[test]
fn netlink_socket_without_hardening_works() {
    allowed("socket_netlink", false);
}

#[test]
fn raw_inet_socket_is_eperm() {
    denied("socket_raw", libc::EPERM);
}

/// Control: uid 0 of the child's namespaces may open raw sockets in its own network namespace.
#[test]
fn raw_inet_socket_without_hardening_works() {
    allowed("socket_raw", false);
}

#[test]
fn inet_stream_socket_still_works() {
    allowed("socket_inet_stream", true);
}

#[test]
fn unix_sockets_still_work() {
    allowed("socket_unix", true);
}

#[test]
fn bpf_is_eperm() {
    denied("bpf", libc::EPERM);
}

#[test]
fn keyctl_is_eperm() {
    denied("keyctl", libc::EPERM);
}

#[test]
fn io_uring_setup_is_eperm() {
    denied("io_uring_setup", libc::EPERM);
}

#[test]
fn tiocsti_is_eperm() {
    // Unhardened, the invalid fd makes this EBADF.
    denied("tiocsti", libc::EPERM);
}

#[test]
fn clone3_is_enosys() {
    // Unhardened, the zero size makes this EINVAL.
    denied("clone3", libc::ENOSYS);
}

/// clone3 answers ENOSYS, so libc must fall back to clone for the agent to start anything at all.
#[test]
fn spawning_a_process_still_works() {
    allowed("spawn", true);
}

#[test]
fn landlock_denies_writing_under_a_read_only_path() {
    denied("landlock_write_read_only", libc::EACCES);
}

/// Control: the same write succeeds without hardening, so the EACCES above is Landlock's.
#[test]
fn landlock_write_read_only_without_hardening_works() {
    allowed("landlock_write_read_only", false);
}

#[test]
fn landlock_allows_reading_under_a_read_only_path() {
    allowed("landlock_read_read_only", true);
}

#[test]
fn landlock_allows_writing_under_a_read_write_path() {
    allowed("landlock_write_read_write", true);
}

// ---------------------------------------------------------------------------------------------------------------
// Child side.

/// The child entry point: a no-op unless the parent named a case.
#[test]
fn harden_child() {
    let Ok(case) = std::env::var(CASE_ENV) else { return };
    let applied = std::env::var(APPLY_ENV).unwrap() == "1";
    let read_only = PathBuf::from(std::env::var_os(READ_ONLY_ENV).unwrap());
    let read_write = PathBuf::from(std::env::var_os(READ_WRITE_ENV).unwrap());
    let mut verdict = Verdict {
        case,
        applied,
        skipped: None,
        apply_error: None,
        errno: None,
        detail: String::new(),
    };
    if applied {
        let hardening = Hardening {
            read_only: vec![PathBuf::from("/")],
            read_write: vec![read_write.clone()],
            landlock: if verdict.case.starts_with("landlock") {
                LandlockMode::Required
            } else {
                LandlockMode::BestEffort
            },
        };
        match apply(&hardening, None) {
            Ok(report) => verdict.detail = serde_json::to_string(&report).unwrap(),
            Err(e @ HardenError::LandlockUnavailable { .. }) => verdict.skipped = Some(e.to_string()),
            Err(e) => verdict.apply_error = Some(error_chain(&e)),
        }
    }
    if verdict.skipped.is_none() && verdict.apply_error.is_none() {
        match attempt(&verdict.case, &read_only, &read_write) {
            Ok(detail) => verdict.detail = detail,
            Err(errno) => verdict.errno = Some(errno),
        }
    }
    println!("\n{VERDICT_MARKER}{}", serde_json::to_string(&verdict).unwrap());
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out = format!("{out}: {s}");
        source = s.source();
    }
    out
}

/// Attempts `case`; `Ok(detail)` if it worked, `Err(errno)` if the kernel refused.
fn attempt(case: &str, read_only: &Path, read_write: &Path) -> Result<String, i32> {
    let no_ptr: libc::c_long = 0;
    match case {
        "status" => {
            // The calling thread's status: libtest runs the case on a thread of its own, and hardening is per thread.
            let status = std::fs::read_to_string("/proc/thread-self/status").map_err(errno)?;
            let fields = ["NoNewPrivs:", "Seccomp:", "Cap"];
            Ok(status
                .lines()
                .filter(|l| fields.iter().any(|f| l.starts_with(f)))
                .collect::<Vec<_>>()
                .join("\n"))
        }
        "unshare_user" => {
            // SAFETY: CLONE_NEWUSER does not unshare the descriptor table; nothing else in this process relies on
            // staying in its user namespace.
            unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER) }.map_err(rustix_errno)?;
            Ok("unshared".into())
        }
        "mount" => {
            rustix::mount::mount("none", read_write, "tmpfs", rustix::mount::MountFlags::empty(), None)
                .map_err(rustix_errno)?;
            Ok("mounted".into())
        }
        "fsopen" => raw_syscall(libc::SYS_fsopen, [c"tmpfs".as_ptr() as libc::c_long, 0, 0]),
        "ptrace_traceme" => raw_syscall(libc::SYS_ptrace, [libc::PTRACE_TRACEME as libc::c_long, 0, 0]),
        "ptrace_attach" => {
            let mut child = Command::new("sleep").arg("30").spawn().map_err(errno)?;
            let pid = libc::c_long::from(child.id());
            let result = raw_syscall(libc::SYS_ptrace, [libc::PTRACE_ATTACH as libc::c_long, pid, 0]);
            let _ = child.kill();
            let _ = child.wait();
            result
        }
        "socket_packet" => socket(AddressFamily::PACKET, SocketType::DGRAM, None),
        "socket_netlink" => socket(AddressFamily::NETLINK, SocketType::DGRAM, None),
        "socket_raw" => socket(AddressFamily::INET, SocketType::RAW, Some(ipproto::ICMP)),
        "socket_inet_stream" => socket(AddressFamily::INET, SocketType::STREAM, None),
        "socket_unix" => {
            socket(AddressFamily::UNIX, SocketType::STREAM, None)?;
            rustix::net::socketpair(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)
                .map_err(rustix_errno)?;
            Ok("socket and socketpair".into())
        }
        "bpf" => raw_syscall(libc::SYS_bpf, [BPF_MAP_CREATE, no_ptr, 0]),
        "keyctl" => raw_syscall(libc::SYS_keyctl, [KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0]),
        "io_uring_setup" => raw_syscall(libc::SYS_io_uring_setup, [1, no_ptr, 0]),
        "tiocsti" => raw_syscall(libc::SYS_ioctl, [-1, libc::TIOCSTI as libc::c_long, no_ptr]),
        "clone3" => raw_syscall(libc::SYS_clone3, [no_ptr, 0, 0]),
        "spawn" => {
            let status = Command::new("true").status().map_err(errno)?;
            Ok(format!("true exited with {status}"))
        }
        "landlock_write_read_only" => write_file(&read_only.join("new")),
        "landlock_read_read_only" => {
            std::fs::read(read_only.join(EXISTING_FILE)).map_err(errno)?;
            Ok("read".into())
        }
        "landlock_write_read_write" => write_file(&read_write.join("new")),
        other => panic!("unknown case {other}"),
    }
}

fn socket(family: AddressFamily, ty: SocketType, protocol: Option<rustix::net::Protocol>) -> Result<String, i32> {
    rustix::net::socket(family, ty, protocol).map_err(rustix_errno)?;
    Ok("created".into())
}

fn write_file(path: &Path) -> Result<String, i32> {
    std::fs::write(path, "x").map_err(errno)?;
    Ok(format!("wrote {}", path.display()))
}

/// A syscall with three integer arguments.
fn raw_syscall(nr: libc::c_long, args: [libc::c_long; 3]) -> Result<String, i32> {
    // SAFETY: every caller passes integers, null pointers or a pointer to a static C string, which the kernel
    // validates before use; none of these calls maps memory or creates a process in this address space.
    let ret = unsafe { libc::syscall(nr, args[0], args[1], args[2]) };
    if ret < 0 {
        return Err(errno(io::Error::last_os_error()));
    }
    Ok(format!("returned {ret}"))
}

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn rustix_errno(e: rustix::io::Errno) -> i32 {
    e.raw_os_error()
}
