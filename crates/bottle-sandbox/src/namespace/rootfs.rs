//! Builds the bottle's root filesystem from the plan's steps, inside the bottle's own mount namespace, then
//! pivots into it. The plan's `Seal` makes everything built before it read-only in one step (the root tmpfs with
//! every read-only bind in it); what is mounted after it stays writable. Trusts the plan (built by the launcher);
//! trusts nothing on the host beyond the paths the plan names.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};

use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MountPropagationFlags, MoveMountFlags, UnmountFlags,
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, mount, mount_bind, mount_change, move_mount, unmount,
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

/// The bottle's root: a tmpfs attached on the root directory through a descriptor the init opened while it could
/// still reach it (with a root launcher, the init's ids cannot walk the state dir). The init stands in it, and every
/// step works under `path()`, `.` (no path on the host leads there for the init; a walk from the working directory
/// also costs less than one through `/proc/self/fd`).
pub struct Root {
    _mount: OwnedFd,
}

impl Root {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(".")
    }
}

/// Makes the mount tree private, then attaches a new tmpfs on `dir`.
pub fn mount_root(dir: &OwnedFd) -> Result<Root, RootfsError> {
    // SECURITY: nothing we mount may propagate back to the host's mount namespace.
    mount_change("/", MountPropagationFlags::REC | MountPropagationFlags::PRIVATE)
        .map_err(|e| RootfsError::Private { source: e.into() })?;
    let root_err = |e: rustix::io::Errno| RootfsError::Step {
        what: "mount the root tmpfs",
        path: PathBuf::from("the bottle root"),
        source: e.into(),
    };
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(root_err)?;
    fsconfig_set_string(fs.as_fd(), "source", "tmpfs").map_err(root_err)?;
    fsconfig_set_string(fs.as_fd(), "mode", "0755").map_err(root_err)?;
    fsconfig_create(fs.as_fd()).map_err(root_err)?;
    let mount = fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
    )
    .map_err(root_err)?;
    move_mount(
        mount.as_fd(),
        "",
        dir.as_fd(),
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(root_err)?;
    rustix::process::fchdir(&mount).map_err(root_err)?;
    Ok(Root { _mount: mount })
}

/// Host trees the launcher opened for the bottle (idmapped detached mounts), by host path, one per use.
#[derive(Default)]
pub struct Trees(BTreeMap<PathBuf, Vec<OwnedFd>>);

impl Trees {
    pub fn add(&mut self, from: PathBuf, tree: OwnedFd) {
        self.0.entry(from).or_default().push(tree);
    }

    fn take(&mut self, from: &Path) -> Option<OwnedFd> {
        self.0.get_mut(from).and_then(Vec::pop)
    }

    /// Whether the source at `from` is a directory: from the tree the launcher opened, else by path.
    fn is_dir(&self, from: &Path) -> io::Result<bool> {
        match self.0.get(from).and_then(|t| t.last()) {
            Some(tree) => Ok(rustix::fs::fstat(tree).map_err(io::Error::from)?.st_mode & libc::S_IFMT == libc::S_IFDIR),
            None => fs::metadata(from).map(|m| m.is_dir()),
        }
    }
}

/// Runs every step under `root`, then pivots into it. A plan without a `Seal` is sealed at its end: nothing stays
/// writable that the plan did not mount after one. A bind whose source is in `trees` attaches that tree.
/// The root's descriptor is closed once the init stands in it (it would show as an open "/" of pid 1).
pub fn build(root: Root, steps: &[FsStep], tmpfs_bytes: Option<u64>, trees: &mut Trees) -> Result<(), RootfsError> {
    let root_mount = root;
    let root = &root_mount.path();
    let mut sealed = false;
    for (i, step) in steps.iter().enumerate() {
        if *step == FsStep::Seal {
            seal(root, &steps[i + 1..], trees)?;
            sealed = true;
        } else {
            apply(root, step, sealed, tmpfs_bytes, trees)?;
        }
    }
    if !sealed {
        seal(root, &[], trees)?;
    }
    pivot(root)?;
    drop(root_mount);
    Ok(())
}

/// Creates, in the root tmpfs, the mount points the steps after the seal need (it is read-only afterwards; mount
/// points under a tmpfs those steps mount are made in that tmpfs when their turn comes), then makes the whole tree
/// read-only.
fn seal(root: &Path, after: &[FsStep], trees: &Trees) -> Result<(), RootfsError> {
    let mut writable: Vec<&Path> = Vec::new();
    for step in after {
        // `Some(from)`: a bind, whose mount point is a directory or a file like its source.
        let (at, bind_from): (&Path, Option<&Path>) = match step {
            FsStep::Tmpfs { at, .. } => (at, None),
            FsStep::Bind { from, at, .. } | FsStep::Mount { from, at, .. } => (at, Some(from)),
            FsStep::Proc => (Path::new("/proc"), None),
            FsStep::DevPts => (Path::new("/dev/pts"), None),
            // Made in place when their turn comes, which must be under a writable mount.
            FsStep::Symlink { .. } | FsStep::File { .. } | FsStep::CaBundle { .. } | FsStep::Seal => continue,
        };
        // Under a tmpfs mounted after the seal, the step makes its own mount point when its turn comes.
        if !writable.iter().any(|w| at.starts_with(w)) {
            let target = under(root, at);
            if bind_from.is_none_or(|from| trees.is_dir(from).unwrap_or(false)) {
                mkdir_p(&target).map_err(step_err("create a mount point", &target))?;
            } else {
                mount_point_file(&target)?;
            }
        }
        // Under a filesystem mounted after the seal (a tmpfs, the bottle's procfs), later steps find or make their
        // own mount points.
        if matches!(step, FsStep::Tmpfs { .. } | FsStep::Proc) {
            writable.push(at);
        }
    }
    crate::sys::ns::make_tree_read_only(root).map_err(step_err("make the bottle root read-only", root))
}

fn apply(
    root: &Path,
    step: &FsStep,
    sealed: bool,
    tmpfs_bytes: Option<u64>,
    trees: &mut Trees,
) -> Result<(), RootfsError> {
    match step {
        FsStep::Tmpfs { at, mode } => {
            let target = under(root, at);
            mkdir_p(&target).map_err(step_err("create a directory", &target))?;
            // SECURITY: a tmpfs is otherwise half the host's RAM; bounded, and counted against the bottle's memory
            // limit where its cgroup has one (#12).
            let size = tmpfs_bytes.map(|b| format!(",size={b}")).unwrap_or_default();
            let data = std::ffi::CString::new(format!("mode={mode:o}{size}"))
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
        FsStep::Bind { from, at, read_only } => bind(root, from, at, *read_only, sealed, trees),
        FsStep::Mount { from, at, read_only } => user_mount(root, from, at, *read_only, trees),
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
        FsStep::Seal => Ok(()),
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

fn bind(
    root: &Path,
    from: &Path,
    at: &Path,
    read_only: bool,
    sealed: bool,
    trees: &mut Trees,
) -> Result<(), RootfsError> {
    let target = under(root, at);
    if !sealed && !read_only {
        // SECURITY (fail closed): the seal would make it read-only behind the plan's back; a plan like that is wrong.
        return Err(step_err("bind writable before the seal", &target)(io::Error::other(
            "the plan binds a writable path before its read-only seal",
        )));
    }
    if trees.is_dir(from).map_err(step_err("find the bind source", from))? {
        mkdir_p(&target).map_err(step_err("create a directory", &target))?;
    } else {
        mount_point_file(&target)?;
    }
    attach(from, &target, trees)?;
    // Before the seal, the seal makes it read-only with everything else. (Only RDONLY is added: the flags the
    // kernel locked for this user namespace stay as they are.)
    if read_only && sealed {
        crate::sys::ns::make_tree_read_only(&target).map_err(step_err("make read-only", &target))?;
    }
    Ok(())
}

/// A mount the user asked for, after the seal: its mount point is made one component at a time, refusing any link
/// on the way (a link planted in the kept home or the workspace by an earlier run would point the mount, or the
/// directories made for it, at a host path: this runs before `pivot_root`).
fn user_mount(root: &Path, from: &Path, at: &Path, read_only: bool, trees: &mut Trees) -> Result<(), RootfsError> {
    let target = under(root, at);
    let is_dir = trees.is_dir(from).map_err(step_err("find the mount source", from))?;
    let mut path = root.to_path_buf();
    let parts: Vec<_> = target.strip_prefix(root).unwrap_or(&target).components().collect();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        let last = i + 1 == parts.len();
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(step_err("make a mount point without following a link", &path)(
                    io::Error::other("it is a symbolic link; remove it or pick another target"),
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if last && !is_dir {
                    fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map_err(step_err("create a mount point", &path))?;
                } else {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&path)
                        .map_err(step_err("create a directory", &path))?;
                }
            }
            Err(e) => return Err(step_err("inspect", &path)(e)),
        }
    }
    attach(from, &target, trees)?;
    if read_only {
        crate::sys::ns::make_tree_read_only(&target).map_err(step_err("make read-only", &target))?;
    }
    Ok(())
}

/// Shows `from` at `target`: the tree the launcher opened for it, else a bind of the path.
fn attach(from: &Path, target: &Path, trees: &mut Trees) -> Result<(), RootfsError> {
    match trees.take(from) {
        Some(tree) => move_mount(
            tree.as_fd(),
            "",
            rustix::fs::CWD,
            target,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(|e| step_err("attach the host tree", target)(e.into())),
        None => mount_bind(from, target).map_err(|e| step_err("bind-mount", target)(e.into())),
    }
}

fn pivot(root: &Path) -> Result<(), RootfsError> {
    let pivot_err = |e: io::Error| RootfsError::Pivot {
        root: root.to_path_buf(),
        source: e,
    };
    // pivot_root(".", "."): the old root ends up stacked on the new one and is detached from there, so no
    // directory for it is needed in the (already read-only) new root. pivot_root(2), "NOTES".
    rustix::process::chdir(root).map_err(|e| pivot_err(e.into()))?;
    rustix::process::pivot_root(".", ".").map_err(|e| pivot_err(e.into()))?;
    // SECURITY: detach the host's tree; after this nothing of the host is reachable but what was bound.
    unmount(".", UnmountFlags::DETACH).map_err(|e| pivot_err(e.into()))?;
    rustix::process::chdir("/").map_err(|e| pivot_err(e.into()))
}

/// An empty regular file to bind a file onto (its parents created as needed).
fn mount_point_file(target: &Path) -> Result<(), RootfsError> {
    if let Some(parent) = target.parent() {
        mkdir_p(parent).map_err(step_err("create a directory", parent))?;
    }
    if !target.exists() {
        fs::write(target, b"").map_err(step_err("create a mount point", target))?;
    }
    Ok(())
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
