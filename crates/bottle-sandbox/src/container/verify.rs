//! What the launcher checks before the agent may start: the engine applied every bound asked of it, and from inside
//! the container's network namespace the only way out is the bottle's proxy.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{StepError, io, plan, sockets};
use crate::backend::BottleSpec;
use crate::namespace::spec::IN_BOTTLE_PROXY_PORT;

/// The settings that bound the bottle, as the engine reports them: each must be what was asked.
pub(super) fn check_limits(spec: &BottleSpec, c: &bollard::models::ContainerInspectResponse) -> Result<(), StepError> {
    let hc = c.host_config.clone().unwrap_or_default();
    let want_mem = spec.memory_mib.map(|m| (m << 20) as i64);
    let checks: [(&'static str, Option<i64>, Option<i64>); 3] = [
        ("memory", want_mem, hc.memory.filter(|m| *m > 0)),
        (
            "pids",
            Some(spec.pids.map_or(plan::DEFAULT_PIDS, i64::from)),
            hc.pids_limit,
        ),
        (
            "cpus",
            spec.cpus.map(|c| i64::from(c) * 1_000_000_000),
            hc.nano_cpus.filter(|n| *n > 0),
        ),
    ];
    for (setting, asked, applied) in checks {
        if asked.is_some() && asked != applied {
            return Err(StepError::Limit {
                setting,
                asked: format!("{asked:?}"),
                applied: format!("{applied:?}"),
            });
        }
    }
    let net = hc.network_mode.unwrap_or_default();
    // Docker reports `ALL`; Podman the default capabilities it dropped by it. Either way the kernel's word on the
    // process (`hardened`: every capability set empty) is what admits the container.
    let caps = hc.cap_drop.unwrap_or_default();
    if net != "none" || caps.is_empty() || hc.readonly_rootfs != Some(true) {
        return Err(StepError::Verify(format!(
            "the engine reports network `{net}`, dropped capabilities {caps:?}, read-only root {:?}",
            hc.readonly_rootfs
        )));
    }
    Ok(())
}

/// The container's first process (the one the agent's will descend from) holds no capability, cannot gain privileges,
/// and is under a seccomp filter: what the engine was asked for, as the kernel reports it.
fn hardened(pid: u32) -> Result<(), StepError> {
    let (sets, nnp, seccomp) = status_of(pid)?;
    // Not only the effective set: a bounding or permitted capability left is one a later exec could take.
    if sets.iter().all(|c| c.trim_start_matches('0').is_empty()) && nnp == "1" && seccomp == "2" {
        return Ok(());
    }
    Err(StepError::Verify(format!(
        "the container's process has capabilities {} (inheritable, permitted, effective, bounding, ambient), \
         NoNewPrivs {nnp}, Seccomp {seccomp} (want all none, 1, 2)",
        sets.join(" / ")
    )))
}

/// The kernel's word on a process's capability sets, no-new-privileges and seccomp mode.
fn status_of(pid: u32) -> Result<([String; 5], String, String), StepError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(io("verify"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).map(str::trim))
            .unwrap_or("?")
            .to_string()
    };
    let sets = ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"].map(field);
    Ok((sets, field("NoNewPrivs:"), field("Seccomp:")))
}

/// CAP_SYS_PTRACE: gVisor's sandbox process keeps it on the ptrace platform, to run the bottle's processes.
const CAP_SYS_PTRACE: u64 = 1 << 19;
/// How long the container's first command may take to report (gVisor boots its kernel first).
const REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// What a gVisor bottle's check needs from before the container starts: the read end of the FIFO its first command
/// reports through, and the decoy host socket that must not answer it.
pub(super) struct GvisorChecks {
    report: OwnedFd,
    report_path: PathBuf,
    decoy: OwnedFd,
    decoy_path: PathBuf,
}

/// Neither is of use to anything in the bottle once checked, nor after a launch that failed before (a failed bottle's
/// state directory is kept for `ls`: no dangling socket or FIFO in it).
impl Drop for GvisorChecks {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.decoy_path);
        let _ = std::fs::remove_file(&self.report_path);
        if let Some(dir) = self.report_path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl GvisorChecks {
    /// In the bottle's shared folder: the decoy where the container sees it read-only, the FIFO in a folder of its
    /// own the container sees writable (the launcher's, 0755: the container's user can make nothing there).
    pub(super) fn prepare(shared: &Path) -> Result<Self, StepError> {
        use rustix::fs::{CWD, FileType, Mode, OFlags};
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let made = (|| -> std::io::Result<Self> {
            let dir = shared.join(sockets::REPORT_DIR);
            std::fs::create_dir(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            let report_path = dir.join(sockets::REPORT);
            rustix::fs::mknodat(CWD, &report_path, FileType::Fifo, Mode::from_raw_mode(0o600), 0)?;
            // The container's user writes it; it is read by the launcher alone.
            std::fs::set_permissions(&report_path, std::fs::Permissions::from_mode(0o622))?;
            let report = rustix::fs::open(
                &report_path,
                OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let decoy_path = shared.join(sockets::DECOY);
            let decoy = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::STREAM,
                SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
                None,
            )?;
            rustix::net::bind(&decoy, &SocketAddrUnix::new(&decoy_path)?)?;
            std::fs::set_permissions(&decoy_path, std::fs::Permissions::from_mode(0o777))?;
            rustix::net::listen(&decoy, 4)?;
            Ok(Self {
                report,
                report_path,
                decoy,
                decoy_path,
            })
        })();
        made.map_err(io("begin"))
    }
}

/// The same promises under gVisor (`runsc` with the host's network stack). The engine's pid is gVisor's sandbox
/// on the host: no capability but CAP_SYS_PTRACE, no-new-privileges, under its own seccomp filter. Inside, as
/// gVisor's kernel reported it to the container's first command (bot-bottle's own, before the gate: nothing of
/// the agent has run): no capability, and the decoy host socket in a bind did not answer, nor did it see a
/// connection (gVisor keeps host sockets out instead of the socket warden). The network namespace is checked as
/// under runc.
pub(super) fn verify_gvisor(pid: u32, checks: GvisorChecks) -> Result<(), StepError> {
    let (sets, nnp, seccomp) = status_of(pid)?;
    let only_ptrace = sets
        .iter()
        .all(|c| u64::from_str_radix(c, 16).is_ok_and(|v| v & !CAP_SYS_PTRACE == 0));
    if !(only_ptrace && nnp == "1" && seccomp == "2") {
        return Err(StepError::Verify(format!(
            "gVisor's sandbox process has capabilities {} (inheritable, permitted, effective, bounding, ambient), \
             NoNewPrivs {nnp}, Seccomp {seccomp} (want none but CAP_SYS_PTRACE, 1, 2)",
            sets.join(" / ")
        )));
    }
    // The network first: the container's first command is still being loaded by gVisor meanwhile.
    netns_check(pid)?;
    let report = read_report(&checks.report)?;
    let accepted = rustix::net::accept(&checks.decoy).is_ok();
    drop(checks);
    let caps: Vec<(&str, &str)> = report
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .filter_map(|l| l.split_once(':'))
        .collect();
    let has = |k: &str| caps.iter().any(|(name, _)| *name == k);
    let none = caps.iter().all(|(_, v)| v.trim().trim_start_matches('0').is_empty());
    if !has("CapEff") || !has("CapBnd") || !none {
        return Err(StepError::Verify(format!(
            "inside gVisor the container's first process reports {:?}; want every capability set empty",
            report.trim()
        )));
    }
    let decoy = report.lines().find_map(|l| l.strip_prefix("decoy: ")).unwrap_or("");
    if accepted || !decoy.starts_with("refused") {
        return Err(StepError::Verify(format!(
            "a host Unix socket in the container's binds answered a process inside gVisor ({})",
            if decoy.is_empty() { "no report of it" } else { decoy }
        )));
    }
    Ok(())
}

/// The container's first command's report, up to its end (the writer closing), within `REPORT_TIMEOUT`.
fn read_report(fifo: &OwnedFd) -> Result<String, StepError> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let deadline = std::time::Instant::now() + REPORT_TIMEOUT;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(StepError::Verify(format!(
                "the container's first command did not report within {REPORT_TIMEOUT:?} (it reported {:?})",
                String::from_utf8_lossy(&text)
            )));
        }
        // A FIFO no writer has opened yet is not hung up: poll waits for the first command.
        let mut ready = [PollFd::new(fifo, PollFlags::IN)];
        let within = Timespec::try_from(left).unwrap_or(Timespec { tv_sec: 1, tv_nsec: 0 });
        match rustix::event::poll(&mut ready, Some(&within)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(io("verify")(e.into())),
        }
        match rustix::io::read(fifo, &mut buf) {
            Ok(0) => return Ok(String::from_utf8_lossy(&text).into_owned()),
            Ok(n) if text.len() < 64 << 10 => text.extend_from_slice(&buf[..n]),
            Ok(_) => return Err(StepError::Verify("the container's report is too long".into())),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io("verify")(e.into())),
        }
    }
}

/// From inside the container's network namespace: it is not the host's, it has no interface but `lo` and no
/// route, the proxy answers and refuses a host it does not allow, and neither a direct address nor a service on the
/// host's loopback can be reached.
pub(super) fn verify(pid: u32) -> Result<(), StepError> {
    hardened(pid)?;
    netns_check(pid)
}

/// The network side of `verify`.
fn netns_check(pid: u32) -> Result<(), StepError> {
    let own = std::fs::metadata("/proc/self/ns/net").map_err(io("verify"))?.ino();
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .map_err(io("verify"))?
        .ino();
    if own == theirs {
        return Err(StepError::Verify(
            "the container shares the host's network namespace".into(),
        ));
    }
    let devices = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).map_err(io("verify"))?;
    let interfaces: Vec<&str> = devices
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(str::trim))
        .collect();
    if interfaces != ["lo"] {
        return Err(StepError::Verify(format!(
            "the container has interfaces {interfaces:?}, not only `lo`"
        )));
    }
    let routes = std::fs::read_to_string(format!("/proc/{pid}/net/route")).map_err(io("verify"))?;
    if routes.lines().skip(1).any(|l| !l.trim().is_empty()) {
        return Err(StepError::Verify("the container has an IPv4 route".into()));
    }
    // A canary on the host's loopback: reachable from the host, never from the bottle.
    let canary = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("verify"))?;
    let canary_addr = canary.local_addr().map_err(io("verify"))?;
    let proxy = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, IN_BOTTLE_PROXY_PORT));
    // The canary's port on the container's own loopback: nothing listens there unless the namespaces were shared.
    crate::sys::ns::in_netns_of(pid, move || {
        crate::namespace::init::self_test(proxy, Some(canary_addr)).map_err(std::io::Error::other)
    })
    .map_err(|e| StepError::Verify(e.to_string()))?;
    drop(canary);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_in_the_hosts_network_namespace_fails_the_check() {
        // Past the hardening check (a child with no capabilities, no-new-privs and a filter), the namespace check.
        let err = netns_check(std::process::id()).unwrap_err().to_string();
        assert!(err.contains("shares the host's network namespace"), "{err}");
    }

    #[test]
    fn a_process_with_capabilities_or_without_a_filter_fails_the_check() {
        // This test process: no seccomp filter (and as root, every capability).
        let err = hardened(std::process::id()).unwrap_err().to_string();
        assert!(err.contains("Seccomp 0"), "{err}");
    }
}
