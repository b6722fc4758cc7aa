//! What the launcher checks before the agent may start: the engine applied every bound asked of it, and from inside
//! the container's network namespace the only way out is the bottle's proxy.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{StepError, io, plan};
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(io("verify"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).map(str::trim))
            .unwrap_or("?")
            .to_string()
    };
    let sets = ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"].map(field);
    let (nnp, seccomp) = (field("NoNewPrivs:"), field("Seccomp:"));
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
/// The decoy host socket a bottle under gVisor must not reach, in the shared folder.
const DECOY: &str = "decoy.sock";

/// The same promises under gVisor (`runsc` with the host's network stack). The engine's pid is gVisor's sandbox
/// on the host: no capability but CAP_SYS_PTRACE, no-new-privileges, under its own seccomp filter. Inside, as
/// gVisor's kernel reports it before any command of the agent ran: the container's first process holds no
/// capability, and a host socket in a bind (the decoy) does not answer: gVisor keeps host sockets out instead of
/// the socket warden, and the bottle starts only if it does. The network namespace is checked as under runc.
pub(super) fn verify_gvisor(pid: u32, api: &super::Api, id: &str, shared: &Path) -> Result<(), StepError> {
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
    // Shell builtins only: every image has the /bin/sh the gate runs.
    let read_caps = "while read -r k v; do case $k in Cap*) echo \"$k $v\";; esac; done < /proc/1/status";
    let argv = ["/bin/sh", "-c", read_caps].map(String::from);
    let (code, out, err) = api
        .exec_output(id, &argv)
        .map_err(|e| StepError::Verify(e.to_string()))?;
    let (out, err) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    let inside: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once(' ')).collect();
    let has = |k: &str| inside.iter().any(|(name, _)| *name == k);
    let none = inside.iter().all(|(_, v)| v.trim().trim_start_matches('0').is_empty());
    if code != 0 || !has("CapEff:") || !has("CapBnd:") || !none {
        return Err(StepError::Verify(format!(
            "inside gVisor the container's first process reports {:?} (exit {code}{}); want every capability set empty",
            out.trim(),
            said(&err)
        )));
    }
    decoy_refused(api, id, shared)?;
    netns_check(pid)
}

/// A Unix socket of the host's in the container's binds must not answer the container.
fn decoy_refused(api: &super::Api, id: &str, shared: &Path) -> Result<(), StepError> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let path = shared.join(DECOY);
    let listener = (|| -> std::io::Result<_> {
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        rustix::net::bind(&sock, &SocketAddrUnix::new(&path)?)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
        rustix::net::listen(&sock, 4)?;
        Ok(sock)
    })()
    .map_err(io("verify"));
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    };
    let runtime = super::sockets::Runtime::of_this_process().map_err(io("verify"));
    let tried = runtime.and_then(|rt| {
        let argv = rt.connect_check(&format!("{}/{DECOY}", plan::IN_CONTAINER_DIR));
        api.exec_output(id, &argv).map_err(|e| StepError::Verify(e.to_string()))
    });
    let accepted = rustix::net::accept(&listener).is_ok();
    drop(listener);
    let _ = std::fs::remove_file(&path);
    match tried? {
        _ if accepted => Err(StepError::Verify(
            "a host Unix socket in the container's binds answered a process inside gVisor".into(),
        )),
        (1, _, _) => Ok(()),
        (0, _, _) => Err(StepError::Verify(
            "a process inside gVisor connected to a host Unix socket in the container's binds".into(),
        )),
        (code, _, err) => Err(StepError::Verify(format!(
            "the host-socket check could not run inside gVisor (exit {code}{})",
            said(&String::from_utf8_lossy(&err))
        ))),
    }
}

/// `: WHAT IT SAID` for an error message, or nothing.
fn said(stderr: &str) -> String {
    let s = stderr.trim();
    if s.is_empty() { String::new() } else { format!(": {s}") }
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
