//! Agent homes: where a bottle's `$HOME` lives when it is kept between runs, and `home ls | rm` to manage them.
//!
//! By default each agent preset has its own home under bot-bottle's state directory (`homes/<agent>`, 0700), so
//! config, onboarding answers, sessions and an agent's own login survive between runs. Anything run in bottles
//! that share a home can read what is in it; credentials injected by the proxy never are (their sources are refused
//! inside a home, see `credential_sources`).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use bottle_policy::{Policy, PolicyError};
use serde::Serialize;

use crate::cli::HomeCommand;
use crate::output::Output;

/// Beside the bottles' state directories (a bottle may not be named so).
pub const HOMES_DIR: &str = "homes";
/// Where credentials live under a user's home: never a bottle's home, nor inside one.
pub(crate) const CREDENTIAL_STORES: [&str; 12] = [
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".config/gcloud",
    ".config/gh",
    ".kube",
    ".docker",
    ".netrc",
    ".git-credentials",
    ".password-store",
    ".local/share/keyrings",
];

/// `home = "tmpfs"`: a fresh home every run.
const TMPFS: &str = "tmpfs";

/// The host directory the bottle's home will be (absolute, not created yet); `None` for a fresh tmpfs.
pub fn plan(policy: &Policy, state_root: &Path) -> Result<Option<PathBuf>, PolicyError> {
    let refuse = |msg: String| PolicyError::whole_file(None, msg);
    Ok(match policy.bottle.home.as_deref() {
        Some(TMPFS) => None,
        Some(written) => Some(
            crate::credential_sources::absolute(Path::new(written), policy.bottle.base_dir.as_deref())
                .map_err(refuse)?,
        ),
        None => Some(state_root.join(HOMES_DIR).join(policy.bottle.agent.as_str())),
    })
}

/// Creates the planned home (0700) if missing and checks where it really is. Called once nothing else can refuse
/// the launch, so a refused launch creates nothing.
pub fn prepare(dir: &Path, state_root: &Path) -> Result<PathBuf, PolicyError> {
    // Checked as written before anything is created (a refused home leaves nothing behind), and again where the
    // directory really is once it exists (links resolved).
    check(&lexical(dir), state_root)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| refused(format!("cannot create the home {}: {e}", dir.display())))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| refused(format!("cannot resolve the home {}: {e}", dir.display())))?;
    check(&dir, state_root)?;
    Ok(dir)
}

fn refused(msg: String) -> PolicyError {
    PolicyError::whole_file(None, msg)
}

/// `a/b/../c` → `a/c`, without asking the filesystem.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// SECURITY: a home is read-write to the agent. Never the user's own home (or what holds it), never /, never one
/// of the user's credential stores (or what holds one: `--home ~/.ssh` would hand over the keys), and never over
/// bot-bottle's state (every bottle's audit log and CA) except its own homes directory.
fn check(dir: &Path, state_root: &Path) -> Result<(), PolicyError> {
    let user_home = std::env::var_os("HOME").map(|h| {
        let h = PathBuf::from(h);
        h.canonicalize().unwrap_or(h)
    });
    if dir == Path::new("/") || user_home.as_ref().is_some_and(|h| h.starts_with(dir)) {
        return Err(refused(format!(
            "refusing home {}: it is (or holds) your own home directory; pick a directory of its own, or \"tmpfs\"",
            dir.display()
        )));
    }
    if let Some(home) = &user_home
        && let Some(store) = CREDENTIAL_STORES
            .iter()
            .map(|s| home.join(s))
            .find(|s| dir.starts_with(s) || s.starts_with(dir))
    {
        return Err(refused(format!(
            "refusing home {}: it is or holds {}, where credentials live; pick a directory of its own, or \"tmpfs\"",
            dir.display(),
            store.display()
        )));
    }
    let root = state_root.canonicalize().unwrap_or_else(|_| state_root.to_path_buf());
    let homes = root.join(HOMES_DIR);
    if (dir.starts_with(&root) && !dir.starts_with(&homes)) || root.starts_with(dir) {
        return Err(refused(format!(
            "refusing home {}: it overlaps bot-bottle's state directory {}",
            dir.display(),
            root.display()
        )));
    }
    Ok(())
}

#[derive(Serialize)]
struct Row {
    name: String,
    path: String,
    bytes: u64,
}

pub fn run(command: &HomeCommand, out: &Output) -> anyhow::Result<u8> {
    let homes = bottle_sandbox::state::state_root()?.join(HOMES_DIR);
    match command {
        HomeCommand::Ls => {
            let mut rows = Vec::new();
            if let Ok(entries) = std::fs::read_dir(&homes) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        rows.push(Row {
                            name: e.file_name().to_string_lossy().into_owned(),
                            path: e.path().display().to_string(),
                            bytes: size(&e.path()),
                        });
                    }
                }
            }
            rows.sort_by(|a, b| a.name.cmp(&b.name));
            out.emit(&rows, || {
                let mut t = format!("{:<16} {:>12}  PATH\n", "HOME", "BYTES");
                for r in &rows {
                    t.push_str(&format!("{:<16} {:>12}  {}\n", r.name, r.bytes, r.path));
                }
                t
            })?;
            Ok(0)
        }
        HomeCommand::Rm { name } => {
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
            if !valid {
                return Err(
                    crate::exit::Usage(format!("`{name}` is not a home name (see `bot-bottle home ls`)")).into(),
                );
            }
            let dir = homes.join(name);
            if !std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
                return Err(
                    crate::exit::WrongState(format!("no home named `{name}` (see `bot-bottle home ls`)")).into(),
                );
            }
            std::fs::remove_dir_all(&dir).map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", dir.display()))?;
            out.emit(&serde_json::json!({ "removed": name }), || format!("{name}\n"))?;
            Ok(0)
        }
    }
}

/// Bytes of the regular files under `dir` (links not followed).
fn size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}
