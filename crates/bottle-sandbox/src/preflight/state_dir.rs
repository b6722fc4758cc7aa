//! The state-directory check: is smolvm's data dir (or a given one) creatable and writable by this process?
//! Trusts the `Host` seam's `stat` and `faccessat` answers.

use std::path::{Path, PathBuf};

use super::host::{FileKind, Host};
use super::{Check, Status};

pub(super) const STATE_ENV_REMEDY: &str = "set HOME (or XDG_DATA_HOME) to a writable directory";

/// smolvm's data dir: `$SMOLVM_DATA_DIR/.local/share`, else `$XDG_DATA_HOME`, else `$HOME/.local/share`
/// (research/smolvm.md §1.1). XDG says a relative `XDG_DATA_HOME` is invalid and must be ignored.
pub(super) fn smolvm_state_dir(host: &dyn Host) -> Check {
    let env_path = |key: &str| host.env(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    let dir = env_path("SMOLVM_DATA_DIR")
        .map(|dir| dir.join(".local/share"))
        .or_else(|| env_path("XDG_DATA_HOME").filter(|dir| dir.is_absolute()))
        .or_else(|| env_path("HOME").map(|home| home.join(".local/share")));
    match dir {
        Some(dir) => state_dir_check(host, &dir),
        None => Check::new(
            "state directory",
            Status::missing(
                "neither XDG_DATA_HOME nor HOME is set, so smolvm has no state directory",
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
                format!("move {shown} out of the way, or set XDG_DATA_HOME to a writable directory"),
            ),
        );
    }
    if let Err(err) = host.can_write(existing) {
        // Never suggest chowning an ancestor: it may be / or another system directory.
        let remedy = if existing == dir {
            format!("make {shown} yours (`sudo chown $USER {shown}`), or set XDG_DATA_HOME to a writable directory")
        } else {
            let dir = dir.display();
            format!(
                "create it as yours (`sudo install -d -o $USER {dir}`), or set XDG_DATA_HOME to a writable directory"
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
    fn state_dir_follows_smolvm_env_order() {
        let dir = |host: &FakeHost| check(host).detail.unwrap();
        let mut host = FakeHost::healthy();
        assert_eq!(dir(&host), "/root/.local/share is writable");
        host.set_env("XDG_DATA_HOME", "relative/ignored");
        assert_eq!(dir(&host), "/root/.local/share is writable");
        host.set_env("XDG_DATA_HOME", "/data/xdg");
        host.file("/data", meta(FileKind::Dir, 0o755, 0, 0));
        host.writable.insert("/data".into());
        assert_eq!(dir(&host), "/data/xdg will be created under writable /data");
        host.set_env("SMOLVM_DATA_DIR", "/srv/smol");
        host.file("/", meta(FileKind::Dir, 0o755, 0, 0));
        let state = check(&host);
        assert_eq!(
            remedy(&state),
            "create it as yours (`sudo install -d -o $USER /srv/smol/.local/share`), or set XDG_DATA_HOME to a \
             writable directory"
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
        host.files.remove(Path::new("/root/.local/share"));
        let state = state_dir_check(&host, Path::new("/root/.local/share"));
        assert_eq!(
            remedy(&state),
            "move /root/.local out of the way, or set XDG_DATA_HOME to a writable directory"
        );
        assert_eq!(state.status.severity(), Severity::Missing);
        let mut host = FakeHost::healthy();
        host.writable.clear();
        assert_eq!(
            remedy(&check(&host)),
            "make /root/.local/share yours (`sudo chown $USER /root/.local/share`), or set XDG_DATA_HOME to a \
             writable directory"
        );
        let nothing = state_dir_check(&FakeHost::healthy(), Path::new("relative/dir"));
        assert_eq!(remedy(&nothing), STATE_ENV_REMEDY);
    }
}
