//! Builds the bottle's root filesystem from the plan's steps, inside the bottle's own mount namespace, then
//! pivots into it and makes `/` read-only. Trusts the plan (built by the launcher); trusts nothing on the host
//! beyond the paths the plan names.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{StatVfsMountFlags, statvfs};
use rustix::mount::{
    MountFlags, MountPropagationFlags, UnmountFlags, mount, mount_bind, mount_change, mount_remount, unmount,
};

use super::spec::FsStep;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot make the mount tree private")]
    Private { source: io::Error },
    #[error("cannot {what} at {path}")]
    Step {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot pivot into the bottle root {root}")]
    Pivot { root: PathBuf, source: io::Error },
}

fn step_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Step {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// `inside` ("/x") as a path under `root`; `..` components are refused by construction (plans hold absolute,
/// normal paths).
fn under(root: &Path, inside: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for c in inside.components() {
        if let Component::Normal(part) = c {
            out.push(part);
        }
    }
    out
}

/// Runs every step, pivots into `root`, and remounts `/` read-only.
pub fn build(root: &Path, steps: &[FsStep]) -> Result<(), RootfsError> {
    // SECURITY: nothing we mount may propagate back to the host's mount namespace.
    mount_change("/", MountPropagationFlags::REC | MountPropagationFlags::PRIVATE)
        .map_err(|e| RootfsError::Private { source: e.into() })?;
    mount(
        "tmpfs",
        root,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        Some(c"mode=0755"),
    )
    .map_err(|e| step_err("mount the root tmpfs", root)(e.into()))?;
    for step in steps {
        apply(root, step)?;
    }
    pivot(root)
}

fn apply(root: &Path, step: &FsStep) -> Result<(), RootfsError> {
    match step {
        FsStep::Tmpfs { at, mode } => {
            let target = under(root, at);
            mkdir_p(&target).map_err(step_err("create a directory", &target))?;
            let data = std::ffi::CString::new(format!("mode={mode:o}"))
                .map_err(io::Error::other)
                .map_err(step_err("format mount data", &target))?;
            mount(
                "tmpfs",
                &target,
                "tmpfs",
                MountFlags::NOSUID | MountFlags::NODEV,
                Some(data.as_c_str()),
            )
            .map_err(|e| step_err("mount a tmpfs", &target)(e.into()))
        }
        FsStep::Bind { from, at, read_only } => bind(root, from, at, *read_only),
        FsStep::Symlink { target, at } => {
            let link = under(root, at);
            if let Some(parent) = link.parent() {
                mkdir_p(parent).map_err(step_err("create a directory", parent))?;
            }
            std::os::unix::fs::symlink(target, &link).map_err(step_err("create a symlink", &link))
        }
        FsStep::File { at, contents } => {
            let path = under(root, at);
            if let Some(parent) = path.parent() {
                mkdir_p(parent).map_err(step_err("create a directory", parent))?;
            }
            fs::write(&path, contents).map_err(step_err("write a file", &path))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(step_err("chmod a file", &path))
        }
        FsStep::CaBundle { at, system, bottle_ca } => {
            let mut pem = match system {
                Some(system) => fs::read(system).map_err(step_err("read the system CA bundle", system))?,
                None => Vec::new(),
            };
            if !pem.is_empty() && !pem.ends_with(b"\n") {
                pem.push(b'\n');
            }
            pem.extend_from_slice(bottle_ca.as_bytes());
            let path = under(root, at);
            if let Some(parent) = path.parent() {
                mkdir_p(parent).map_err(step_err("create a directory", parent))?;
            }
            fs::write(&path, pem).map_err(step_err("write a file", &path))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(step_err("chmod a file", &path))
        }
        FsStep::Proc => {
            let target = under(root, Path::new("/proc"));
            mkdir_p(&target).map_err(step_err("create a directory", &target))?;
            mount(
                "proc",
                &target,
                "proc",
                MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                None,
            )
            .map_err(|e| step_err("mount proc", &target)(e.into()))
        }
        FsStep::DevPts => {
            let target = under(root, Path::new("/dev/pts"));
            mkdir_p(&target).map_err(step_err("create a directory", &target))?;
            mount(
                "devpts",
                &target,
                "devpts",
                MountFlags::NOSUID | MountFlags::NOEXEC,
                Some(c"newinstance,ptmxmode=0666,mode=0620"),
            )
            .map_err(|e| step_err("mount devpts", &target)(e.into()))
        }
    }
}

fn bind(root: &Path, from: &Path, at: &Path, read_only: bool) -> Result<(), RootfsError> {
    let target = under(root, at);
    let meta = fs::metadata(from).map_err(step_err("find the bind source", from))?;
    if meta.is_dir() {
        mkdir_p(&target).map_err(step_err("create a directory", &target))?;
    } else {
        if let Some(parent) = target.parent() {
            mkdir_p(parent).map_err(step_err("create a directory", parent))?;
        }
        if !target.exists() {
            fs::write(&target, b"").map_err(step_err("create a mount point", &target))?;
        }
    }
    mount_bind(from, &target).map_err(|e| step_err("bind-mount", &target)(e.into()))?;
    if read_only {
        // A bind remount must keep the flags the kernel locked for this user namespace (nosuid, nodev,
        // noexec, atime), or it fails with EPERM; so read them from the source and add RDONLY.
        let vfs = statvfs(from).map_err(|e| step_err("statvfs", from)(e.into()))?;
        let mut flags = MountFlags::BIND | MountFlags::RDONLY;
        for (st, mf) in [
            (StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
            (StatVfsMountFlags::NODEV, MountFlags::NODEV),
            (StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
            (StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
            (StatVfsMountFlags::NODIRATIME, MountFlags::NODIRATIME),
            (StatVfsMountFlags::RELATIME, MountFlags::RELATIME),
        ] {
            if vfs.f_flag.contains(st) {
                flags |= mf;
            }
        }
        mount_remount(&target, flags, "").map_err(|e| step_err("remount read-only", &target)(e.into()))?;
    }
    Ok(())
}

fn pivot(root: &Path) -> Result<(), RootfsError> {
    let pivot_err = |e: io::Error| RootfsError::Pivot {
        root: root.to_path_buf(),
        source: e,
    };
    let old = root.join(".oldroot");
    mkdir_p(&old).map_err(pivot_err)?;
    rustix::process::pivot_root(root, &old).map_err(|e| pivot_err(e.into()))?;
    rustix::process::chdir("/").map_err(|e| pivot_err(e.into()))?;
    // SECURITY: detach the host's tree; after this nothing of the host is reachable but what was bound.
    unmount("/.oldroot", UnmountFlags::DETACH).map_err(|e| pivot_err(e.into()))?;
    fs::remove_dir("/.oldroot").map_err(pivot_err)?;
    mount_remount(
        "/",
        MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        "",
    )
    .map_err(|e| step_err("remount / read-only", Path::new("/"))(e.into()))
}

fn mkdir_p(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o755).create(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_never_escapes_the_root() {
        assert_eq!(
            under(Path::new("/r"), Path::new("/a/../../etc")),
            PathBuf::from("/r/a/etc")
        );
        assert_eq!(under(Path::new("/r"), Path::new("/usr")), PathBuf::from("/r/usr"));
    }
}
