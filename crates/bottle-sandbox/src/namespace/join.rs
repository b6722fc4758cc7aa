//! `exec` into a running namespace bottle: a re-executed, single-threaded `bot-bottle __bottle-exec` joins the
//! namespaces of the bottle's pid 1 (user first, so it holds capabilities in the others), forks so that the
//! command lives in the bottle's pid namespace, and runs it with the same hardening as the agent.
//! Trusts the bottle's spec; the target pid is re-checked to be the child of the recorded init.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use super::init::{INIT_FAILED, exec_in_bottle, wait_for};
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
pub fn main(spec_path: &Path, init_pid: u32, argv: &[String]) -> i32 {
    match join(spec_path, init_pid, argv) {
        Ok(code) => code,
        Err(why) => {
            eprintln!("bot-bottle exec: {why}");
            INIT_FAILED
        }
    }
}

fn join(spec_path: &Path, init_pid: u32, argv: &[String]) -> Result<i32, String> {
    let spec: InitSpec = std::fs::read(spec_path)
        .map_err(|e| format!("cannot read {}: {e}", spec_path.display()))
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("{} is damaged: {e}", spec_path.display())))?;
    let pid_one = bottle_pid_one(init_pid)?;
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
    for (name, kind, fd) in &fds {
        // Joining a namespace we are already in (cgroup when the bottle has none of its own) is harmless.
        move_into_link_name_space(fd.as_fd(), Some(*kind))
            .map_err(|e| format!("cannot join the bottle's {name} namespace: {e}"))?;
    }
    drop(fds);
    match sys::fork().map_err(|e| format!("cannot fork: {e}"))? {
        Forked::Child => {
            let err = exec_in_bottle(&spec, argv);
            eprintln!("bot-bottle exec: {err}");
            sys::exit_child(INIT_FAILED)
        }
        Forked::Parent { child } => {
            sys::forward_signals_to(child).map_err(|e| format!("cannot forward signals: {e}"))?;
            Ok(wait_for(child))
        }
    }
}

/// The bottle's pid 1 is the only child of its outer init.
fn bottle_pid_one(init_pid: u32) -> Result<u32, String> {
    let path = format!("/proc/{init_pid}/task/{init_pid}/children");
    let children = std::fs::read_to_string(&path).map_err(|e| format!("the bottle is not running ({path}: {e})"))?;
    let mut pids = children.split_whitespace().filter_map(|p| p.parse::<u32>().ok());
    match (pids.next(), pids.next()) {
        (Some(p), None) => Ok(p),
        _ => Err(format!(
            "the bottle's init {init_pid} does not have exactly one child: {children:?}"
        )),
    }
}
