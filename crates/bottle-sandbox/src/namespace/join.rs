//! `exec` into a running namespace bottle: a re-executed, single-threaded `bot-bottle __bottle-exec` joins the
//! namespaces of the bottle's pid 1 (user first, so it holds capabilities in the others), forks so that the
//! command lives in the bottle's pid namespace, and runs it with the same hardening as the agent.
//! Trusts the bottle's spec; the recorded pid 1 is re-checked to be the child of the recorded launcher after its
//! namespaces are opened, so a recycled pid is never joined.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use super::init::{INIT_FAILED, exec_in_bottle, explain_exec_failure, wait_for};
use super::spec::InitSpec;
use crate::sys::ns::{self as sys, Forked};

pub const EXEC_SUBCOMMAND: &str = "__bottle-exec";

/// The order matters: the user namespace first (it grants the capabilities the other joins need), the pid
/// namespace last (it only applies to children).
const NAMESPACES: [(&str, LinkNameSpaceType); 7] = [
    ("user", LinkNameSpaceType::User),
    ("mnt", LinkNameSpaceType::Mount),
    ("net", LinkNameSpaceType::Network),
    ("ipc", LinkNameSpaceType::InterProcessCommunication),
    ("uts", LinkNameSpaceType::HostNameAndNISDomainName),
    ("cgroup", LinkNameSpaceType::ControlGroup),
    ("pid", LinkNameSpaceType::ProcessID),
];

/// Entry point; returns the command's exit code, or INIT_FAILED with the reason on stderr.
pub fn main(spec_path: &Path, init_pid: u32, supervisor_pid: u32, argv: &[String]) -> i32 {
    match join(spec_path, init_pid, supervisor_pid, argv) {
        Ok(code) => code,
        Err(why) => {
            eprintln!("bot-bottle exec: {why}");
            INIT_FAILED
        }
    }
}

fn join(spec_path: &Path, pid_one: u32, supervisor_pid: u32, argv: &[String]) -> Result<i32, String> {
    let mut spec: InitSpec = std::fs::read(spec_path)
        .map_err(|e| format!("cannot read {}: {e}", spec_path.display()))
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{} is damaged: {e}", spec_path.display())))?;
    // `pass_env` values are not on disk: `exec` passes the current values of whoever runs it (cmd/exec.rs).
    spec.add_pass_env(|k| std::env::var(k).ok());
    // Open every namespace before joining any: after joining the mount namespace, /proc is the bottle's.
    let mut fds = Vec::new();
    for (name, kind) in NAMESPACES {
        let path = format!("/proc/{pid_one}/ns/{name}");
        match File::open(&path) {
            Ok(f) => fds.push((name, kind, f)),
            Err(e) if name == "cgroup" && e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot open {path}: {e}")),
        }
    }
    // SECURITY: after the opens. If the pid is the launcher's child now, it has been since before the state named
    // it (a pid is not reused while its process lives), so the namespaces opened are the bottle's. The launcher
    // clones exactly one process.
    check_parent(pid_one, supervisor_pid)?;
    for (name, kind, fd) in &fds {
        // Joining a namespace we are already in (cgroup when the bottle has none of its own) is harmless.
        move_into_link_name_space(fd.as_fd(), Some(*kind))
            .map_err(|e| format!("cannot join the bottle's {name} namespace: {e}"))?;
    }
    drop(fds);
    // SECURITY (#12): joined as the launcher's ids (host root); become the bottle's own, as its init did.
    if spec.host_id.is_some() {
        super::ids::become_bottle_root().map_err(|e| format!("cannot take the bottle's own ids: {e}"))?;
    }
    match sys::fork().map_err(|e| format!("cannot fork: {e}"))? {
        Forked::Child => {
            // In the bottle's pid namespace now, so its /proc shows this process.
            if let Err(why) = super::ids::check_no_host_root(spec.host_id.is_some()) {
                eprintln!("bot-bottle exec: the command would hold host root: {why}");
                sys::exit_child(INIT_FAILED)
            }
            let err = match super::warden::start(&spec.share_sockets) {
                Ok(warden) => exec_in_bottle(&spec, argv, std::os::fd::AsFd::as_fd(&warden)),
                Err(e) => {
                    eprintln!("bot-bottle exec: cannot start the socket warden: {e}");
                    sys::exit_child(INIT_FAILED)
                }
            };
            let (line, code) = explain_exec_failure(&spec, &err);
            eprintln!("{line}");
            sys::exit_child(code)
        }
        Forked::Parent { child } => {
            sys::forward_signals_to(child).map_err(|e| format!("cannot forward signals: {e}"))?;
            Ok(wait_for(child))
        }
    }
}

/// `pid` is a live child of `parent`.
fn check_parent(pid: u32, parent: u32) -> Result<(), String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("the bottle is not running ({path}: {e})"))?;
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse::<u32>().ok());
    if ppid != Some(parent) {
        return Err(format!(
            "pid {pid} is not the bottle's init (its parent is {ppid:?}, the bottle's launcher is {parent})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_parent;

    #[test]
    fn only_a_child_of_the_recorded_launcher_is_joined() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let ours = std::process::id();
        assert!(check_parent(child.id(), ours).is_ok());
        // A pid that is alive but not the launcher's child (as a recycled pid would be) is refused.
        let err = check_parent(ours, child.id()).unwrap_err();
        assert!(err.contains("is not the bottle's init"), "{err}");
        child.kill().unwrap();
        child.wait().unwrap();
        // A pid that is gone is refused too.
        let err = check_parent(child.id(), ours).unwrap_err();
        assert!(err.contains("not running"), "{err}");
    }
}
