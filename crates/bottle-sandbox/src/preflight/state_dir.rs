//! The state-directory check: is the smolvm state dir bot-bottle uses (or a given one) creatable and writable by
//! this process? Trusts the `Host` seam's `stat` and `faccessat` answers.

use std::path::{Path, PathBuf};

use super::host::{FileKind, Host};
use super::{Check, Status};
use crate::smolmachines::STATE_SUBDIR;

pub(super) const STATE_ENV_REMEDY: &str = "set HOME (or XDG_STATE_HOME) to a writable directory";

/// The directory every smolvm call gets as `--state-dir`: `STATE_SUBDIR` under bot-bottle's state root,
/// `$XDG_STATE_HOME/bot-bottle`, else `$HOME/.local/state/bot-bottle` (as `state::state_root` reads them).
pub(super) fn smolvm_state_dir(host: &dyn Host) -> Check {
    let env_path = |key: &str| host.env(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    let root = env_path("XDG_STATE_HOME")
        .map(|dir| dir.join("bot-bottle"))
        .or_else(|| env_path("HOME").map(|home| home.join(".local/state/bot-bottle")));
    match root {
        Some(root) => state_dir_check(host, &root.join(STATE_SUBDIR)),
        None => Check::new(
            "state directory",
            Status::missing(
                "neither XDG_STATE_HOME nor HOME is set, so bot-bottle has no state directory",
                STATE_ENV_REMEDY,
            ),
        ),
    }
}

/// Whether `dir` (or, if it does not exist yet, its nearest existing ancestor) is a directory this process may write.
pub fn state_dir_check(host: &dyn Host, dir: &Path) -> Check {
    const NAME: &str = "state directory";
    let Some((existing, meta)) = dir
        .ancestors()
        .find_map(|a| host.metadata(a).ok().map(|meta| (a, meta)))
    else {
        return Check::new(
            NAME,
            Status::missing(format!("no ancestor of {} exists", dir.display()), STATE_ENV_REMEDY),
        );
    };
    let shown = existing.display();
    if meta.kind != FileKind::Dir {
        let reason = format!("{shown} is not a directory");
        return Check::new(
            NAME,
            Status::missing(
                reason,
                format!("move {shown} out of the way, or set XDG_STATE_HOME to a writable directory"),
            ),
        );
    }
    if let Err(err) = host.can_write(existing) {
        // Never suggest chowning an ancestor: it may be / or another system directory.
        let remedy = if existing == dir {
            format!("make {shown} yours (`sudo chown $USER {shown}`), or set XDG_STATE_HOME to a writable directory")
        } else {
            let dir = dir.display();
            format!(
                "create it as yours (`sudo install -d -o $USER {dir}`), or set XDG_STATE_HOME to a writable directory"
            )
        };
        return Check::new(NAME, Status::missing(format!("{shown} is not writable: {err}"), remedy));
    }
    if existing == dir {
        return Check::ok(NAME, format!("{} is writable", dir.display()));
    }
    Check::ok(
        NAME,
        format!("{} will be created under writable {shown}", dir.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::super::Severity;
    use super::super::fake::{FakeHost, meta};
    use super::*;

    fn check(host: &FakeHost) -> Check {
        smolvm_state_dir(host)
    }

    fn remedy(check: &Check) -> &str {
        match &check.status {
            Status::Missing { remedy, .. } => remedy,
            other => panic!("{} is {other:?}", check.name),
        }
    }

    #[test]
    fn state_dir_is_the_one_the_recipe_passes_to_smolvm() {
        let dir = |host: &FakeHost| check(host).detail.unwrap();
        let mut host = FakeHost::healthy();
        assert_eq!(
            dir(&host),
            "/root/.local/state/bot-bottle/.smolvm will be created under writable /root/.local/state"
        );
        // smolvm's own variables do not move it: every call passes --state-dir.
        host.set_env("XDG_DATA_HOME", "/data/xdg");
        host.set_env("SMOLVM_DATA_DIR", "/srv/smol");
        assert_eq!(
            dir(&host),
            "/root/.local/state/bot-bottle/.smolvm will be created under writable /root/.local/state"
        );
        host.set_env("XDG_STATE_HOME", "/state");
        host.file("/state", meta(FileKind::Dir, 0o755, 0, 0));
        host.writable.insert("/state".into());
        assert_eq!(
            dir(&host),
            "/state/bot-bottle/.smolvm will be created under writable /state"
        );
        host.file("/state/bot-bottle", meta(FileKind::Dir, 0o700, 0, 0));
        host.file("/state/bot-bottle/.smolvm", meta(FileKind::Dir, 0o755, 0, 0));
        host.writable.insert("/state/bot-bottle/.smolvm".into());
        assert_eq!(dir(&host), "/state/bot-bottle/.smolvm is writable");
        host.writable.clear();
        host.file("/", meta(FileKind::Dir, 0o755, 0, 0));
        assert_eq!(
            remedy(&check(&host)),
            "make /state/bot-bottle/.smolvm yours (`sudo chown $USER /state/bot-bottle/.smolvm`), or set \
             XDG_STATE_HOME to a writable directory"
        );
    }

    #[test]
    fn state_dir_problems_are_missing() {
        let mut host = FakeHost::healthy();
        host.env.clear();
        assert_eq!(remedy(&check(&host)), STATE_ENV_REMEDY);
        let mut host = FakeHost::healthy();
        let file = meta(FileKind::File, 0o644, 0, 0);
        host.file("/root/.local", file);
        host.files.remove(Path::new("/root/.local/state"));
        let state = state_dir_check(&host, Path::new("/root/.local/state"));
        assert_eq!(
            remedy(&state),
            "move /root/.local out of the way, or set XDG_STATE_HOME to a writable directory"
        );
        assert_eq!(state.status.severity(), Severity::Missing);
        let mut host = FakeHost::healthy();
        host.writable.clear();
        assert_eq!(
            remedy(&check(&host)),
            "create it as yours (`sudo install -d -o $USER /root/.local/state/bot-bottle/.smolvm`), or set \
             XDG_STATE_HOME to a writable directory"
        );
        let nothing = state_dir_check(&FakeHost::healthy(), Path::new("relative/dir"));
        assert_eq!(remedy(&nothing), STATE_ENV_REMEDY);
    }
}
