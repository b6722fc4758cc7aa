//! Bottle state on the host: `$XDG_STATE_HOME/bot-bottle/<name>/` holds the policy snapshot, CA, audit log,
//! urls, the plan, the agent's log (detached) and `state.json`. `ls`, `logs`, `stop`, `rm` and `exec` work from
//! here. Trusts: the files are ours, but may be stale (launcher killed) or damaged; a damaged `state.json` is
//! reported with its path, never guessed around.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::net::Ipv4Addr;

use bottle_policy::{Backend as Kind, BottleName};
use serde::{Deserialize, Serialize};

use crate::lease::{pid_start_time, process_alive};

pub const STATE_FILE: &str = "state.json";
pub const URLS_FILE: &str = "urls.json";
pub const SPEC_FILE: &str = "spec.json";
pub const POLICY_FILE: &str = "policy.toml";
pub const AUDIT_FILE: &str = "audit.jsonl";
pub const AGENT_LOG: &str = "agent.log";
pub const ROOT_DIR: &str = "root";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot find a state directory: set XDG_STATE_HOME or HOME")]
    NoHome,
    #[error("cannot create {path}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is damaged ({reason}); `bot-bottle rm -f NAME` removes it")]
    Damaged { path: PathBuf, reason: String },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("no bottle named `{0}` (see `bot-bottle ls`)")]
    NotFound(String),
    #[error("bottle `{0}` is not running")]
    NotRunning(String),
    #[error("a bottle named `{0}` already exists; remove it with `bot-bottle rm {0}` or pick another --name")]
    Exists(String),
}

/// What a bottle is doing, as recorded by its supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Starting,
    Running,
    Exited,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BottleState {
    pub name: BottleName,
    pub backend: Kind,
    pub addr: Ipv4Addr,
    pub status: Status,
    /// The supervising `bot-bottle` process and its start time (pid reuse guard).
    pub supervisor_pid: u32,
    pub supervisor_start: u64,
    /// The bottle's init (host pid), once launched.
    pub init_pid: Option<u32>,
    pub started_at: u64,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub proxy_url: Option<String>,
    pub detached: bool,
    /// `run --rm`: nothing of the bottle is kept, even when its launcher was killed (`ls` removes it then).
    #[serde(default)]
    pub remove: bool,
}

impl BottleState {
    /// `Running`/`Starting` whose supervisor is gone (killed with -9) reads as `Failed`.
    pub fn effective_status(&self) -> Status {
        match self.status {
            Status::Starting | Status::Running if !process_alive(self.supervisor_pid, self.supervisor_start) => {
                Status::Failed
            }
            s => s,
        }
    }

    pub fn is_live(&self) -> bool {
        matches!(self.effective_status(), Status::Starting | Status::Running)
    }
}

/// The directory that holds every bottle's state (and the lease registry).
pub fn state_root() -> Result<PathBuf, StateError> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("bot-bottle"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or(StateError::NoHome)?;
    Ok(PathBuf::from(home).join(".local/state/bot-bottle"))
}

pub struct StateDir {
    pub path: PathBuf,
}

impl StateDir {
    /// SECURITY: a state directory or state file that is a symbolic link is not followed (a planted link could
    /// point a write or a read anywhere the user can reach).
    pub fn open(root: &Path, name: &str) -> Result<Self, StateError> {
        let path = root.join(name);
        let real_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        let real_file = fs::symlink_metadata(path.join(STATE_FILE)).is_ok_and(|m| m.is_file());
        if !real_dir || !real_file {
            return Err(StateError::NotFound(name.to_string()));
        }
        Ok(Self { path })
    }

    /// Creates a fresh directory for `name` (0700); an existing one is an error.
    pub fn create(root: &Path, name: &str) -> Result<Self, StateError> {
        let mkdir = |p: &Path, recursive: bool| {
            fs::DirBuilder::new()
                .recursive(recursive)
                .mode(0o700)
                .create(p)
                .map_err(|source| {
                    if source.kind() == io::ErrorKind::AlreadyExists {
                        StateError::Exists(name.to_string())
                    } else {
                        StateError::Create {
                            path: p.to_path_buf(),
                            source,
                        }
                    }
                })
        };
        mkdir(root, true)?;
        let path = root.join(name);
        // The caller holds the name's lease, so no other launch owns this name now. A directory without a state
        // file is what a launch killed between these two steps leaves: it would block the name forever.
        let leftover = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir())
            && fs::symlink_metadata(path.join(STATE_FILE)).is_err();
        if leftover {
            tracing::warn!(path = %path.display(), "removing a state directory a killed launch left without state");
            let _ = fs::remove_dir_all(&path);
        }
        mkdir(&path, false)?;
        mkdir(&path.join(ROOT_DIR), false)?;
        Ok(Self { path })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn read(&self) -> Result<BottleState, StateError> {
        let path = self.file(STATE_FILE);
        let read = || -> io::Result<Vec<u8>> {
            let mut f = open_private(&path, fs::OpenOptions::new().read(true))?;
            let mut bytes = Vec::new();
            // A state file is small; a huge one is damage, not something to load whole.
            io::Read::read_to_end(&mut io::Read::take(&mut f, MAX_STATE_BYTES), &mut bytes)?;
            Ok(bytes)
        };
        let bytes = read().map_err(|source| StateError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| StateError::Damaged {
            path,
            reason: e.to_string(),
        })
    }

    /// Atomic replace (write + rename), 0600.
    pub fn write(&self, state: &BottleState) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StateError::Damaged {
            path: self.file(STATE_FILE),
            reason: e.to_string(),
        })?;
        self.write_file(STATE_FILE, &bytes)
    }

    /// The detached agent's log (0600), appended to.
    pub fn open_agent_log(&self) -> io::Result<fs::File> {
        open_private(
            &self.file(AGENT_LOG),
            fs::OpenOptions::new().create(true).append(true).mode(0o600),
        )
    }

    /// Opens a log of this bottle for reading, without following a link planted in its place.
    pub fn open_log(&self, name: &str) -> io::Result<fs::File> {
        open_private(&self.file(name), fs::OpenOptions::new().read(true))
    }

    /// Writes a private file atomically (0600).
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        let path = self.file(name);
        let tmp = self.file(&format!(".{name}.tmp"));
        let write = || -> io::Result<()> {
            // SECURITY: whatever sits at the temporary name (a planted link, a crash's leftover) is unlinked, not
            // followed; the new file is created exclusively.
            match fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let mut f = open_private(&tmp, fs::OpenOptions::new().write(true).create_new(true).mode(0o600))?;
            f.write_all(bytes)?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|source| StateError::Write { path, source })
    }

    /// Writes a file the bottle writes once, into its fresh directory: created exclusively (an existing file is an
    /// error, never overwritten), 0600, with no temporary file and rename. Only for files nothing reads before the
    /// launch has written them.
    pub fn create_file(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        let path = self.file(name);
        let write = || -> io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(bytes)
        };
        write().map_err(|source| StateError::Write {
            path: path.clone(),
            source,
        })
    }

    pub fn remove(self) -> Result<(), StateError> {
        // The root mount point is empty unless a mount leaked; remove_dir_all never crosses into a mount's
        // contents it cannot unlink, so a leaked mount shows up as an error here rather than data loss.
        fs::remove_dir_all(&self.path).map_err(|source| StateError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// The most a state file may hold.
const MAX_STATE_BYTES: u64 = 64 * 1024;

/// Opens without following a symbolic link at the last component (`O_NOFOLLOW`).
fn open_private(path: &Path, options: &mut fs::OpenOptions) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    options.custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Every bottle with a state directory, sorted by name. Damaged entries are returned as errors in place.
/// Whether bottle `name` of `root` is gone: no state directory, or a state whose supervisor is dead. A state that
/// cannot be read counts as not gone (what it holds is left alone).
pub fn is_gone(root: &Path, name: &str) -> bool {
    match StateDir::open(root, name) {
        Err(StateError::NotFound(_)) => true,
        Ok(dir) => dir.read().is_ok_and(|s| !s.is_live()),
        Err(_) => false,
    }
}

pub fn list(root: &Path) -> Result<Vec<Result<BottleState, StateError>>, StateError> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StateError::Read {
                path: root.to_path_buf(),
                source,
            });
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| fs::symlink_metadata(e.path().join(STATE_FILE)).is_ok_and(|m| m.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names
        .into_iter()
        .map(|n| StateDir { path: root.join(&n) }.read())
        .collect())
}

/// A state for a bottle supervised by this process, starting now. SECURITY: without this process's start time the
/// state could not tell a live supervisor from a recycled pid, and `ls` would reap a running bottle's lease.
pub fn starting(name: &BottleName, backend: Kind, addr: Ipv4Addr, detached: bool) -> Result<BottleState, StateError> {
    let pid = std::process::id();
    let supervisor_start = pid_start_time(pid).ok_or_else(|| StateError::Read {
        path: PathBuf::from(format!("/proc/{pid}/stat")),
        source: io::Error::other("this process's start time is not readable"),
    })?;
    Ok(BottleState {
        name: name.clone(),
        backend,
        addr,
        status: Status::Starting,
        supervisor_pid: pid,
        supervisor_start,
        init_pid: None,
        started_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        exit_code: None,
        error: None,
        proxy_url: None,
        detached,
        remove: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(raw: &str) -> BottleName {
        BottleName::parse(raw).unwrap()
    }

    #[test]
    fn create_write_read_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::create(tmp.path(), "b1").unwrap();
        let mut s = starting(&name("b1"), Kind::Namespace, Ipv4Addr::new(127, 0, 0, 2), false).unwrap();
        dir.write(&s).unwrap();
        assert!(matches!(StateDir::create(tmp.path(), "b1"), Err(StateError::Exists(_))));
        assert_eq!(dir.read().unwrap(), s);
        assert!(s.is_live());
        s.supervisor_start += 1; // as if the supervisor's pid had been reused
        assert_eq!(s.effective_status(), Status::Failed);
        let all = list(tmp.path()).unwrap();
        assert_eq!(all.len(), 1);
        dir.remove().unwrap();
        assert!(matches!(StateDir::open(tmp.path(), "b1"), Err(StateError::NotFound(_))));
    }

    #[test]
    fn a_write_once_file_is_private_and_never_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::create(tmp.path(), "b3").unwrap();
        dir.create_file(URLS_FILE, b"first").unwrap();
        let meta = fs::metadata(dir.file(URLS_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
            0o600
        );
        assert!(matches!(
            dir.create_file(URLS_FILE, b"second"),
            Err(StateError::Write { .. })
        ));
        assert_eq!(fs::read(dir.file(URLS_FILE)).unwrap(), b"first");
    }

    #[test]
    fn planted_links_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::create(tmp.path(), "b4").unwrap();
        let s = starting(&name("b4"), Kind::Namespace, Ipv4Addr::new(127, 0, 0, 2), false).unwrap();
        dir.write(&s).unwrap();
        let victim = tmp.path().join("victim");
        fs::write(&victim, "untouched").unwrap();
        std::os::unix::fs::symlink(&victim, dir.file(".state.json.tmp")).unwrap();
        dir.write(&s).unwrap();
        assert_eq!(
            fs::read_to_string(&victim).unwrap(),
            "untouched",
            "the write followed the link"
        );
        std::os::unix::fs::symlink(&victim, dir.file(AGENT_LOG)).unwrap();
        assert!(dir.open_log(AGENT_LOG).is_err(), "a linked log was opened");
        assert!(dir.open_agent_log().is_err());
        fs::remove_file(dir.file(STATE_FILE)).unwrap();
        std::os::unix::fs::symlink(&victim, dir.file(STATE_FILE)).unwrap();
        assert!(matches!(StateDir::open(tmp.path(), "b4"), Err(StateError::NotFound(_))));
        std::os::unix::fs::symlink(dir.path.clone(), tmp.path().join("b5")).unwrap();
        assert!(matches!(StateDir::open(tmp.path(), "b5"), Err(StateError::NotFound(_))));
    }

    #[test]
    fn a_directory_a_killed_launch_left_without_state_does_not_block_the_name() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("b6/root")).unwrap();
        assert!(StateDir::create(tmp.path(), "b6").is_ok());
        let dir = StateDir::open(tmp.path(), "b6");
        assert!(dir.is_err(), "no state yet");
        let made = StateDir {
            path: tmp.path().join("b6"),
        };
        made.write(&starting(&name("b6"), Kind::Namespace, Ipv4Addr::new(127, 0, 0, 2), false).unwrap())
            .unwrap();
        assert!(matches!(StateDir::create(tmp.path(), "b6"), Err(StateError::Exists(_))));
    }

    #[test]
    fn damaged_state_names_its_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::create(tmp.path(), "b2").unwrap();
        fs::write(dir.file(STATE_FILE), b"{").unwrap();
        let err = dir.read().unwrap_err();
        assert!(err.to_string().contains("state.json is damaged"), "{err}");
        assert!(list(tmp.path()).unwrap()[0].is_err());
    }
}
