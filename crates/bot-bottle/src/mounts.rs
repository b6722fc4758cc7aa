//! Host paths shown in a bottle on purpose (`[[mount]]`, `--mount`): resolved, checked and handed to the backend.
//! Read-only unless written `rw`. Refused with the reason, before anything starts: bot-bottle's state (every
//! bottle's audit log), the user's credential stores and what holds one (`~` itself, `~/.config`), sockets and what
//! holds a known daemon socket (`/run` holds the Docker socket), and `/`.
//!
//! Trusts the user's own filesystem as it is at launch: each source is resolved once (links followed) and the
//! resolved path is what is shown.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use bottle_policy::{Policy, PolicyError};
use bottle_sandbox::backend::{MountSpec, MountTarget};

use crate::cmd::home::CREDENTIAL_STORES;

/// Daemon sockets a bottle must never reach through a mount (each is root on the host, or close to it).
const DAEMON_SOCKETS: [&str; 4] = [
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/podman/podman.sock",
    "/run/containerd/containerd.sock",
];

fn refused(msg: String) -> PolicyError {
    PolicyError::whole_file(None, msg)
}

/// The policy's mounts, resolved and checked.
pub fn resolve(policy: &Policy, state_root: &Path) -> Result<Vec<MountSpec>, PolicyError> {
    let user_home = std::env::var_os("HOME").map(|h| {
        let h = PathBuf::from(h);
        h.canonicalize().unwrap_or(h)
    });
    let state_root = state_root.canonicalize().unwrap_or_else(|_| state_root.to_path_buf());
    let mut specs = Vec::new();
    for m in &policy.bottle.mounts {
        let written =
            crate::credential_sources::absolute(&m.source, policy.bottle.base_dir.as_deref()).map_err(refused)?;
        let source = written
            .canonicalize()
            .map_err(|e| refused(format!("mount source {} cannot be used: {e}", written.display())))?;
        check(&source, &state_root, user_home.as_deref())?;
        let target = match (&m.target, &user_home) {
            (Some(t), _) => MountTarget::Absolute(t.clone()),
            (None, Some(home)) if source.starts_with(home) => {
                MountTarget::InHome(source.strip_prefix(home).unwrap_or(Path::new("")).to_path_buf())
            }
            (None, _) => MountTarget::Absolute(source.clone()),
        };
        specs.push(MountSpec {
            source,
            target,
            writable: m.writable,
        });
    }
    Ok(specs)
}

/// SECURITY: what a mount may never show.
fn check(source: &Path, state_root: &Path, user_home: Option<&Path>) -> Result<(), PolicyError> {
    let refuse = |why: String| Err(refused(format!("refusing to mount {}: {why}", source.display())));
    if source == Path::new("/") {
        return refuse("it is the whole host filesystem".into());
    }
    if source.starts_with(state_root) || state_root.starts_with(source) {
        return refuse(format!(
            "it overlaps bot-bottle's state directory {} (every bottle's audit log and CA)",
            state_root.display()
        ));
    }
    if let Some(home) = user_home {
        if source == home {
            return refuse(
                "it is your whole home directory; mount the tool directories you need, e.g. ~/.cargo".into(),
            );
        }
        if let Some(store) = CREDENTIAL_STORES
            .iter()
            .map(|s| home.join(s))
            .find(|s| source.starts_with(s) || s.starts_with(source))
        {
            return refuse(format!(
                "it is or holds {}, where credentials live; keep API keys on the host with [[credential]]",
                store.display()
            ));
        }
    }
    let meta = std::fs::metadata(source).map_err(|e| refused(format!("cannot inspect {}: {e}", source.display())))?;
    if meta.file_type().is_socket() {
        return refuse("it is a socket: a host daemon would answer the agent".into());
    }
    if let Some(socket) = DAEMON_SOCKETS
        .iter()
        .map(Path::new)
        .filter_map(|s| s.canonicalize().ok())
        .find(|s| s.starts_with(source))
    {
        return refuse(format!(
            "it holds {}, a daemon socket that is root on the host",
            socket.display()
        ));
    }
    Ok(())
}
