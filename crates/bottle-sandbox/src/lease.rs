//! Address leases: each bottle gets its own loopback address `127.0.0.N` (and its name), recorded in a registry
//! directory under an exclusive `flock`, so concurrent launches never collide. A lease whose owner process is gone
//! (or whose pid was reused: the recorded start time differs) is reclaimed by the next allocation.
//!
//! Trusts: the registry files are ours but may be stale, truncated or hand-edited; a file that cannot be parsed is
//! an error naming its path, never silently treated as free.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use bottle_policy::BottleName;
use serde::{Deserialize, Serialize};

/// The default pool of last octets: 127.0.0.1 is the host's own and never leased.
pub const DEFAULT_POOL: RangeInclusive<u8> = 2..=254;

const LOCK_FILE: &str = "leases.lock";
const LEASE_DIR: &str = "leases";

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot open lease registry {path}")]
    Registry { path: PathBuf, source: io::Error },
    #[error("cannot lock lease registry {path}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("lease file {path} is corrupt ({reason}); remove it if no bottle uses that address")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write lease file {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("a bottle named `{name}` is already running (pid {pid}, address {addr})")]
    NameInUse { name: String, pid: u32, addr: Ipv4Addr },
    #[error(
        "cannot read the start time of process {pid} (/proc/{pid}/stat); a lease without it would look dead and could be taken by another bottle"
    )]
    Owner { pid: u32 },
    #[error("all {size} addresses of the pool 127.0.0.{first}..=127.0.0.{last} are leased; stop a bottle first")]
    Exhausted { size: usize, first: u8, last: u8 },
}

/// What a lease file records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub name: String,
    pub addr: Ipv4Addr,
    pub pid: u32,
    /// Start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22); guards against pid reuse.
    pub pid_start: u64,
}

/// A held lease; released (file removed under the lock) on `release` or drop.
#[derive(Debug)]
pub struct Lease {
    record: LeaseRecord,
    registry: PathBuf,
    released: bool,
}

/// Where leases live and how liveness is judged (a seam so tests can play dead owners).
pub struct Registry {
    dir: PathBuf,
    pool: RangeInclusive<u8>,
    is_alive: fn(u32, u64) -> bool,
}

impl Registry {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            pool: DEFAULT_POOL,
            is_alive: process_alive,
        }
    }

    pub fn with_pool(mut self, pool: RangeInclusive<u8>) -> Self {
        self.pool = pool;
        self
    }

    pub fn with_liveness(mut self, is_alive: fn(u32, u64) -> bool) -> Self {
        self.is_alive = is_alive;
        self
    }

    /// Leases the lowest free address for `name`, owned by `pid` (the supervising process).
    pub fn allocate(&self, name: &BottleName, pid: u32) -> Result<Lease, LeaseError> {
        let _lock = self.lock()?;
        let (live, damaged) = self.records()?;
        if let Some(r) = live.iter().find(|r| r.name == name.as_str()) {
            return Err(LeaseError::NameInUse {
                name: r.name.clone(),
                pid: r.pid,
                addr: r.addr,
            });
        }
        // SECURITY: a damaged lease may belong to a live bottle: its address stays taken (fail closed), and the
        // damage does not stop every other launch.
        let taken: Vec<u8> = live
            .iter()
            .map(|r| r.addr.octets()[3])
            .chain(damaged.iter().filter_map(|d| d.octet))
            .collect();
        let Some(octet) = self.pool.clone().find(|n| !taken.contains(n)) else {
            return Err(LeaseError::Exhausted {
                size: self.pool.clone().count(),
                first: *self.pool.start(),
                last: *self.pool.end(),
            });
        };
        let record = LeaseRecord {
            name: name.as_str().to_string(),
            addr: Ipv4Addr::new(127, 0, 0, octet),
            pid,
            // SECURITY: an unknown start time would make this lease look dead to every other launcher.
            pid_start: pid_start_time(pid).ok_or(LeaseError::Owner { pid })?,
        };
        self.write(&record)?;
        Ok(Lease {
            record,
            registry: self.dir.clone(),
            released: false,
        })
    }

    /// Live leases, reaping dead ones on the way (under the lock). Damaged lease files are left in place and
    /// reported by `damaged`, not an error for every caller.
    pub fn list(&self) -> Result<Vec<LeaseRecord>, LeaseError> {
        let _lock = self.lock()?;
        Ok(self.records()?.0)
    }

    /// Lease files that cannot be read, with the reason; their addresses are never handed out.
    pub fn damaged(&self) -> Result<Vec<LeaseError>, LeaseError> {
        let _lock = self.lock()?;
        Ok(self.records()?.1.into_iter().map(|d| d.error).collect())
    }

    fn lock(&self) -> Result<File, LeaseError> {
        let leases = self.dir.join(LEASE_DIR);
        fs::create_dir_all(&leases).map_err(|source| LeaseError::Registry {
            path: leases.clone(),
            source,
        })?;
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| LeaseError::Registry {
                path: path.clone(),
                source,
            })?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| LeaseError::Lock { path, source: e.into() })?;
        Ok(file)
    }

    fn records(&self) -> Result<(Vec<LeaseRecord>, Vec<Damaged>), LeaseError> {
        let dir = self.dir.join(LEASE_DIR);
        let entries = fs::read_dir(&dir).map_err(|source| LeaseError::Registry {
            path: dir.clone(),
            source,
        })?;
        let mut live = Vec::new();
        let mut damaged = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| LeaseError::Registry {
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                // Writes happen under the lock we hold: a temporary file now is a crashed write's leftover.
                let _ = fs::remove_file(&path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let record = match read_record(&path) {
                Ok(r) => r,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "damaged lease file; its address stays taken");
                    let octet = path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .and_then(|s| s.parse::<Ipv4Addr>().ok())
                        .map(|a| a.octets()[3]);
                    damaged.push(Damaged { octet, error });
                    continue;
                }
            };
            if (self.is_alive)(record.pid, record.pid_start) {
                live.push(record);
            } else {
                tracing::info!(name = %record.name, addr = %record.addr, pid = record.pid, "reaping stale lease");
                remove(&path)?;
            }
        }
        Ok((live, damaged))
    }

    fn write(&self, record: &LeaseRecord) -> Result<(), LeaseError> {
        let path = lease_path(&self.dir, record.addr);
        let tmp = path.with_extension("tmp");
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(record).map_err(io::Error::other)?)?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|source| LeaseError::Write { path, source })
    }
}

impl Lease {
    pub fn record(&self) -> &LeaseRecord {
        &self.record
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.record.addr
    }

    /// Hands the lease to another owner (the detached supervisor) without releasing it.
    pub fn transfer(&mut self, pid: u32) -> Result<(), LeaseError> {
        let registry = Registry::new(self.registry.clone());
        let _lock = registry.lock()?;
        self.record.pid = pid;
        self.record.pid_start = pid_start_time(pid).ok_or(LeaseError::Owner { pid })?;
        registry.write(&self.record)
    }

    pub fn release(mut self) -> Result<(), LeaseError> {
        self.released = true;
        let registry = Registry::new(self.registry.clone());
        let _lock = registry.lock()?;
        remove(&lease_path(&self.registry, self.record.addr))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.released {
            let registry = Registry::new(self.registry.clone());
            if let Ok(_lock) = registry.lock()
                && let Err(e) = remove(&lease_path(&self.registry, self.record.addr))
            {
                tracing::warn!(error = %e, "could not release lease");
            }
        }
    }
}

/// A lease file that cannot be read, and the address its name says it holds.
struct Damaged {
    octet: Option<u8>,
    error: LeaseError,
}

fn lease_path(dir: &Path, addr: Ipv4Addr) -> PathBuf {
    dir.join(LEASE_DIR).join(format!("{addr}.json"))
}

fn read_record(path: &Path) -> Result<LeaseRecord, LeaseError> {
    let bytes = fs::read(path).map_err(|source| LeaseError::Registry {
        path: path.to_path_buf(),
        source,
    })?;
    let record: LeaseRecord = serde_json::from_slice(&bytes).map_err(|e| LeaseError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let expected = lease_path(path.parent().and_then(Path::parent).unwrap_or(path), record.addr);
    if expected != path || record.addr.octets()[..3] != [127, 0, 0] {
        return Err(LeaseError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("it records address {} under another name", record.addr),
        });
    }
    Ok(record)
}

fn remove(path: &Path) -> Result<(), LeaseError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LeaseError::Write {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Start time of a process in clock ticks since boot, from `/proc/PID/stat` field 22.
pub fn pid_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // A zombie (Z) or dead (X) process has exited: its pid and start time linger only until it is reaped,
    // and an orphan may never be reaped on a host whose pid 1 does not wait.
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// A lease owner is alive when its pid exists with the recorded start time.
pub fn process_alive(pid: u32, start: u64) -> bool {
    pid_start_time(pid).is_some_and(|s| s == start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> BottleName {
        BottleName::parse(s).unwrap()
    }

    #[test]
    fn allocates_lowest_free_address_and_refuses_duplicate_names() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::new(tmp.path());
        let me = std::process::id();
        let a = reg.allocate(&name("a"), me).unwrap();
        let b = reg.allocate(&name("b"), me).unwrap();
        assert_eq!(a.addr(), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(b.addr(), Ipv4Addr::new(127, 0, 0, 3));
        assert!(matches!(
            reg.allocate(&name("a"), me),
            Err(LeaseError::NameInUse { .. })
        ));
        a.release().unwrap();
        assert_eq!(
            reg.allocate(&name("c"), me).unwrap().addr(),
            Ipv4Addr::new(127, 0, 0, 2)
        );
    }

    #[test]
    fn dead_owners_are_reaped() {
        let tmp = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let lease = Registry::new(tmp.path()).allocate(&name("ghost"), me).unwrap();
        std::mem::forget(lease); // as if the launcher had been killed with -9
        let dead = Registry::new(tmp.path()).with_liveness(|_, _| false);
        assert!(dead.list().unwrap().is_empty());
        assert_eq!(
            dead.allocate(&name("ghost"), me).unwrap().addr(),
            Ipv4Addr::new(127, 0, 0, 2)
        );
    }

    #[test]
    fn pid_reuse_is_not_liveness() {
        let me = std::process::id();
        let start = pid_start_time(me).unwrap();
        assert!(process_alive(me, start));
        assert!(!process_alive(me, start + 1));
        assert!(!process_alive(u32::MAX, 0));
    }

    #[test]
    fn an_owner_whose_start_time_cannot_be_read_gets_no_lease() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Registry::new(tmp.path()).allocate(&name("a"), u32::MAX).unwrap_err();
        assert!(matches!(err, LeaseError::Owner { pid: u32::MAX }), "{err}");
        assert!(Registry::new(tmp.path()).list().unwrap().is_empty());
    }

    #[test]
    fn exhausted_pool_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::new(tmp.path()).with_pool(5..=5);
        let _a = reg.allocate(&name("a"), std::process::id()).unwrap();
        assert!(matches!(
            reg.allocate(&name("b"), std::process::id()),
            Err(LeaseError::Exhausted { .. })
        ));
    }

    #[test]
    fn a_corrupt_lease_file_is_reported_and_its_address_stays_taken_while_others_go_on() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::new(tmp.path()).with_pool(9..=10);
        fs::create_dir_all(tmp.path().join("leases")).unwrap();
        fs::write(tmp.path().join("leases/127.0.0.9.json"), b"{not json").unwrap();
        let lease = reg.allocate(&name("b"), std::process::id()).unwrap();
        assert_eq!(
            lease.addr(),
            Ipv4Addr::new(127, 0, 0, 10),
            "the damaged lease's address is not reused"
        );
        assert_eq!(reg.list().unwrap().len(), 1);
        let damaged = reg.damaged().unwrap();
        assert!(
            matches!(&damaged[..], [LeaseError::Corrupt { path, .. }] if path.ends_with("127.0.0.9.json")),
            "{damaged:?}"
        );
        fs::write(
            tmp.path().join("leases/127.0.0.9.json"),
            br#"{"name":"x","addr":"127.0.0.10","pid":1,"pid_start":0}"#,
        )
        .unwrap();
        assert!(matches!(&reg.damaged().unwrap()[..], [LeaseError::Corrupt { .. }]));
        assert!(matches!(
            reg.allocate(&name("c"), std::process::id()),
            Err(LeaseError::Exhausted { .. })
        ));
    }

    #[test]
    fn a_crashed_writes_temporary_file_is_cleared_under_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::new(tmp.path());
        fs::create_dir_all(tmp.path().join("leases")).unwrap();
        fs::write(tmp.path().join("leases/127.0.0.2.tmp"), b"{half").unwrap();
        reg.list().unwrap();
        assert!(!tmp.path().join("leases/127.0.0.2.tmp").exists());
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let lease = Registry::new(dir)
                        .allocate(&name(&format!("b{i}")), std::process::id())
                        .unwrap();
                    let addr = lease.addr();
                    std::mem::forget(lease);
                    addr
                })
            })
            .collect();
        let mut addrs: Vec<Ipv4Addr> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), 100);
    }
}
