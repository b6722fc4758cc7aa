//! A bottle's resource limits: one cgroup per bottle holding its init (and so every process in it), with a memory,
//! pids and cpu limit written and read back before the agent starts. cgroup v2 (the unified hierarchy: as root under
//! `/sys/fs/cgroup/bot-bottle`, otherwise beside the launcher's own cgroup where systemd delegated it) or v1 as root
//! (the memory, pids and cpu controllers, under the launcher's own cgroup in each). The plan is data; `Cgroup::create`
//! carries it out and removes what it made on drop.
//!
//! Trusts the kernel's cgroup files; trusts nothing the bottle does: the bottle is moved in before it runs anything,
//! and its cgroup is outside its reach (its cgroup namespace and read-only /sys).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup filesystems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The cpu period the quota is counted in (the kernel's default, 100 ms).
const CPU_PERIOD_US: u64 = 100_000;
/// How long removal waits for the bottle's last processes to be released.
const REMOVE_WAIT: Duration = Duration::from_secs(2);

/// The limits to enforce (already with defaults applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
    pub cpus: Option<u32>,
}

/// How this host's cgroups are mounted and where a bottle's cgroup can go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified hierarchy; `base` is the directory a bottle's cgroup is made in, `enable` the
    /// `cgroup.subtree_control` that must list the controllers.
    V2 { base: PathBuf },
    /// One directory per controller (memory, pids, cpu), each the launcher's own cgroup in that controller.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup hierarchy this launcher can use: {reason}")]
    Unavailable { reason: String },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} reads {found:?} after {wanted:?} was written: the limit is not enforced")]
    NotApplied {
        path: PathBuf,
        wanted: String,
        found: String,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Finds where this launcher can make cgroups. `mount` is `/sys/fs/cgroup`; `self_cgroup` the text of
/// `/proc/self/cgroup`; `root` whether the launcher is root.
pub fn detect(mount: &Path, self_cgroup: &str, root: bool) -> Result<Hierarchy, CgroupError> {
    let unavailable = |reason: String| CgroupError::Unavailable { reason };
    let v1_path = |controller: &str| {
        self_cgroup.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
            list.split(',')
                .any(|c| c == controller)
                .then(|| mount.join(controller).join(path.trim_start_matches('/')))
        })
    };
    if mount.join("cgroup.controllers").exists() {
        if root {
            return Ok(Hierarchy::V2 {
                base: mount.join("bot-bottle"),
            });
        }
        let own = self_cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| unavailable("/proc/self/cgroup names no unified cgroup".into()))?;
        let own = mount.join(own.trim_start_matches('/'));
        let parent = own
            .parent()
            .filter(|p| p.starts_with(mount) && *p != mount)
            .ok_or_else(|| {
                unavailable(format!(
                    "the launcher's cgroup {} has no delegated parent",
                    own.display()
                ))
            })?;
        if rustix::fs::access(parent, rustix::fs::Access::WRITE_OK).is_err() {
            return Err(unavailable(format!(
                "{} is not delegated to this user (run under `systemd-run --user --scope -p Delegate=yes`, or as root)",
                parent.display()
            )));
        }
        return Ok(Hierarchy::V2 {
            base: parent.to_path_buf(),
        });
    }
    if !root {
        return Err(unavailable(
            "cgroup v1 controllers can only be written by root here (a cgroup v2 host with systemd delegation lets \
             an unprivileged launcher limit its bottles)"
                .into(),
        ));
    }
    match (v1_path("memory"), v1_path("pids"), v1_path("cpu")) {
        (Some(memory), Some(pids), Some(cpu)) => Ok(Hierarchy::V1 { memory, pids, cpu }),
        _ => Err(unavailable(
            "the memory, pids and cpu cgroup v1 controllers are not all mounted under /sys/fs/cgroup".into(),
        )),
    }
}

/// What to make for a bottle: directories (in order), then files to write (each read back), then where its
/// init's pid goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Directories made if missing, kept afterwards (shared parents).
    pub parents: Vec<PathBuf>,
    /// `cgroup.subtree_control` files that must enable controllers for the bottle's cgroup (v2).
    pub enable: Vec<(PathBuf, String)>,
    /// The bottle's own directories, made fresh and removed at teardown.
    pub dirs: Vec<PathBuf>,
    pub writes: Vec<(PathBuf, String)>,
    pub procs: Vec<PathBuf>,
}

/// The plan for bottle `name` under `hierarchy`.
pub fn plan(hierarchy: &Hierarchy, name: &str, limits: &Limits) -> Plan {
    let leaf = format!("bot-bottle-{name}");
    match hierarchy {
        Hierarchy::V2 { base } => {
            let dir = base.join(&leaf);
            let mut writes = Vec::new();
            if let Some(bytes) = limits.memory_bytes {
                writes.push((dir.join("memory.max"), bytes.to_string()));
                // Swap would let the bottle exceed its memory limit by the host's swap.
                writes.push((dir.join("memory.swap.max"), "0".into()));
            }
            if let Some(pids) = limits.pids {
                writes.push((dir.join("pids.max"), pids.to_string()));
            }
            if let Some(cpus) = limits.cpus {
                writes.push((
                    dir.join("cpu.max"),
                    format!("{} {CPU_PERIOD_US}", u64::from(cpus) * CPU_PERIOD_US),
                ));
            }
            let parent_of_base = base.parent().map(Path::to_path_buf);
            let mut enable = Vec::new();
            if let Some(p) = parent_of_base {
                enable.push((p.join("cgroup.subtree_control"), "+memory +pids +cpu".into()));
            }
            enable.push((base.join("cgroup.subtree_control"), "+memory +pids +cpu".into()));
            Plan {
                parents: vec![base.clone()],
                enable,
                procs: vec![dir.join("cgroup.procs")],
                dirs: vec![dir],
                writes,
            }
        }
        Hierarchy::V1 { memory, pids, cpu } => {
            let (m, p, c) = (memory.join(&leaf), pids.join(&leaf), cpu.join(&leaf));
            let mut writes = Vec::new();
            if let Some(bytes) = limits.memory_bytes {
                writes.push((m.join("memory.limit_in_bytes"), bytes.to_string()));
            }
            if let Some(n) = limits.pids {
                writes.push((p.join("pids.max"), n.to_string()));
            }
            if let Some(cpus) = limits.cpus {
                writes.push((c.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string()));
                writes.push((
                    c.join("cpu.cfs_quota_us"),
                    (u64::from(cpus) * CPU_PERIOD_US).to_string(),
                ));
            }
            Plan {
                parents: Vec::new(),
                enable: Vec::new(),
                procs: vec![m.join("cgroup.procs"), p.join("cgroup.procs"), c.join("cgroup.procs")],
                dirs: vec![m, p, c],
                writes,
            }
        }
    }
}

/// A bottle's cgroup, made from a plan; its directories are removed on drop (once its processes are gone).
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<PathBuf>,
}

impl Cgroup {
    /// Makes the directories and writes every limit, reading each back.
    pub fn create(plan: &Plan) -> Result<Self, CgroupError> {
        for parent in &plan.parents {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        for (file, controllers) in &plan.enable {
            // Controllers already enabled (or not needed at the top) are fine: the read-back below decides.
            let _ = fs::write(file, controllers);
        }
        let mut made = Self {
            dirs: Vec::new(),
            procs: plan.procs.clone(),
        };
        for dir in &plan.dirs {
            match fs::create_dir(dir) {
                Ok(()) => {}
                // A leftover of a bottle of the same name whose launcher was killed: reuse it only if empty.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    if !procs.trim().is_empty() {
                        return Err(io_err("use", dir)(io::Error::other("it still holds processes")));
                    }
                }
                Err(e) => return Err(io_err("create", dir)(e)),
            }
            made.dirs.push(dir.clone());
        }
        for (file, value) in &plan.writes {
            write_checked(file, value)?;
        }
        Ok(made)
    }

    /// Moves `pid` (and the children it will have) into the bottle's cgroup.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for procs in &self.procs {
            fs::write(procs, pid.to_string()).map_err(io_err("move the bottle into", procs))?;
        }
        Ok(())
    }

    /// `add` on a thread of its own: on cgroup v1 a move waits for an RCU grace period (~5 ms seen here), which the
    /// launcher spends minting the CA and starting the proxy instead. Join it before the init may run anything.
    pub fn add_in_background(&self, pid: u32) -> std::thread::JoinHandle<Result<(), CgroupError>> {
        let mover = Self {
            dirs: Vec::new(),
            procs: self.procs.clone(),
        };
        std::thread::spawn(move || mover.add(pid))
    }

    /// Removes the bottle's directories, waiting briefly for its last processes to be released.
    pub fn remove(&mut self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + REMOVE_WAIT;
        while let Some(dir) = self.dirs.last() {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => return Err(io_err("remove", dir)(e)),
            }
            self.dirs.pop();
        }
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(error = %e, "a bottle's cgroup is left behind");
        }
    }
}

/// Writes `value` and reads it back: a limit that does not read as written is not enforced.
fn write_checked(file: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(file, value).map_err(io_err("write", file))?;
    let found = fs::read_to_string(file).map_err(io_err("read back", file))?;
    let found = found.trim();
    // The kernel shows a whole cpu.max as "QUOTA PERIOD" and rounds memory to pages; values here are page multiples.
    if found != value {
        return Err(CgroupError::NotApplied {
            path: file.to_path_buf(),
            wanted: value.to_owned(),
            found: found.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "9:name=systemd:/\n8:pids:/\n4:memory:/a/b\n1:cpu,cpuacct:/\n0::/\n";

    #[test]
    fn v1_as_root_nests_under_the_launchers_own_cgroup_per_controller() {
        let tmp = tempfile::tempdir().unwrap();
        let h = detect(tmp.path(), V1, true).unwrap();
        assert_eq!(
            h,
            Hierarchy::V1 {
                memory: tmp.path().join("memory/a/b"),
                pids: tmp.path().join("pids"),
                cpu: tmp.path().join("cpu"),
            }
        );
        assert!(matches!(
            detect(tmp.path(), V1, false),
            Err(CgroupError::Unavailable { .. })
        ));
    }

    #[test]
    fn v2_plans_the_limits_and_an_unprivileged_launcher_needs_a_delegated_parent() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let own = tmp.path().join("user.slice/app.slice/me.scope");
        fs::create_dir_all(&own).unwrap();
        let h = detect(tmp.path(), "0::/user.slice/app.slice/me.scope\n", false).unwrap();
        assert_eq!(
            h,
            Hierarchy::V2 {
                base: tmp.path().join("user.slice/app.slice")
            }
        );
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            pids: Some(50),
            cpus: Some(2),
        };
        let p = plan(&h, "b1", &limits);
        let dir = tmp.path().join("user.slice/app.slice/bot-bottle-b1");
        assert_eq!(p.dirs, std::slice::from_ref(&dir));
        assert_eq!(
            p.writes,
            [
                (dir.join("memory.max"), "67108864".to_string()),
                (dir.join("memory.swap.max"), "0".to_string()),
                (dir.join("pids.max"), "50".to_string()),
                (dir.join("cpu.max"), "200000 100000".to_string()),
            ]
        );
        // Carried out on a plain directory tree standing in for cgroupfs: every value reads back.
        let mut made = Cgroup::create(&p).unwrap();
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "50");
        made.add(42).unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.procs")).unwrap(), "42");
        for f in ["memory.max", "memory.swap.max", "pids.max", "cpu.max", "cgroup.procs"] {
            fs::remove_file(dir.join(f)).unwrap();
        }
        made.remove().unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn a_v2_parent_the_user_cannot_write_is_not_delegated() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        // As root every directory is writable; the refusal is shown through the root-less path's own check instead.
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("cgroup.controllers"), "").unwrap();
        assert!(matches!(
            detect(tmp.path(), "0::/\n", false),
            Err(CgroupError::Unavailable { .. })
        ));
    }

    #[test]
    fn a_limit_that_does_not_read_back_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("pids.max");
        // A directory cannot be written: the write fails and says which file.
        fs::create_dir(&file).unwrap();
        let err = write_checked(&file, "50").unwrap_err();
        assert!(err.to_string().contains("pids.max"), "{err}");
    }
}
