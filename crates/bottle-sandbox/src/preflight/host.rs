//! The `Host` seam: everything a preflight check observes about the machine, and `RealHost`, which observes it.
//! Trusts the kernel and the files under /proc, /dev and /etc; interprets nothing (the checks do).

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::sys;

/// Largest stdout/stderr kept from a probe command, and largest socket reply read.
const MAX_CAPTURE_BYTES: u64 = 1 << 20;
/// How often a running probe command is polled for exit.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long to wait for a command's output pipes after it exited (a grandchild may hold them open).
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// What `stat` says about a path (symlinks followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    pub kind: FileKind,
    /// Permission bits only (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    CharDevice,
    Socket,
    Other,
}

/// A finished (or killed) probe command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutput {
    /// Exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    /// The timeout expired and the command was killed.
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }
}

/// What opening `/dev/kvm` read-write and asking it questions gave.
#[derive(Debug)]
pub struct KvmProbe {
    /// `KVM_GET_API_VERSION`.
    pub api_version: io::Result<i32>,
    /// `KVM_CREATE_VM` (the VM is closed again at once).
    pub create_vm: io::Result<()>,
}

/// A system call a bottle's launch needs that older kernels lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelCall {
    /// `close_range(2)` (Linux 5.9): the init and the agent close every inherited descriptor.
    CloseRange,
    /// `mount_setattr(2)` (Linux 5.12): the bottle's root is made read-only in one step.
    MountSetattr,
}

impl KernelCall {
    pub const ALL: [KernelCall; 2] = [KernelCall::CloseRange, KernelCall::MountSetattr];

    pub fn name(self) -> &'static str {
        match self {
            KernelCall::CloseRange => "close_range",
            KernelCall::MountSetattr => "mount_setattr",
        }
    }

    /// The Linux release that added it.
    pub fn since(self) -> &'static str {
        match self {
            KernelCall::CloseRange => "5.9",
            KernelCall::MountSetattr => "5.12",
        }
    }
}

/// Which namespaces one unshare probe asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NamespaceProbe {
    /// `CLONE_NEWUSER` alone.
    User,
    /// `CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS`: what a bottle needs.
    Isolation,
    /// `CLONE_NEWUSER | CLONE_NEWCGROUP`.
    Cgroup,
}

/// How a child's `unshare(2)` went.
#[derive(Debug)]
pub enum Unshare {
    Done,
    Refused(io::Error),
}

/// Which seccomp modes the kernel offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompSupport {
    /// No CONFIG_SECCOMP.
    Absent,
    /// CONFIG_SECCOMP without CONFIG_SECCOMP_FILTER.
    StrictOnly,
    /// BPF filters available; `current_mode` is this process's mode (0 none, 1 strict, 2 filter).
    Filter { current_mode: i32 },
}

/// Which operating system the checks are for: it decides which checks apply (KVM or Hypervisor.framework) and
/// whether loopback addresses need aliasing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    Linux,
    MacOs,
}

impl Platform {
    /// The platform this binary was built for. Every target but macOS is treated as Linux: those are the only two
    /// bot-bottle supports.
    pub const CURRENT: Self = if cfg!(target_os = "macos") {
        Self::MacOs
    } else {
        Self::Linux
    };
}

/// Everything the preflight checks observe. Production uses `RealHost`; tests inject a scripted fake.
pub trait Host {
    /// The operating system. A seam rather than a `#[cfg]` so that both platforms' checks run in unit tests on
    /// either; the default, the build target, is right for every host that is not a test fake.
    fn platform(&self) -> Platform {
        Platform::CURRENT
    }
    /// `stat(2)`, following symlinks.
    fn metadata(&self, path: &Path) -> io::Result<FileMeta>;
    /// `faccessat(path, W_OK, AT_EACCESS)`: would this process be allowed to write there?
    fn can_write(&self, path: &Path) -> io::Result<()>;
    /// Opens `path` read-write; on success asks `KVM_GET_API_VERSION` and tries `KVM_CREATE_VM`.
    fn open_kvm(&self, path: &Path) -> io::Result<KvmProbe>;
    fn euid(&self) -> u32;
    /// The gid of the group named `name` in /etc/group.
    fn group_gid(&self, name: &str) -> io::Result<Option<u32>>;
    fn env(&self, key: &str) -> Option<OsString>;
    /// The first executable `program` in an absolute `PATH` entry.
    fn which(&self, program: &str) -> Option<PathBuf>;
    /// Runs `program args…` with stdin closed, capturing output; kills it after `timeout`.
    fn run(&self, program: &Path, args: &[&str], timeout: Duration) -> io::Result<CommandOutput>;
    /// Tries `unshare(2)` in a forked child, leaving this process untouched.
    fn try_unshare(&self, probe: NamespaceProbe) -> io::Result<Unshare>;
    /// The Landlock ABI version (`landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`).
    fn landlock_abi(&self) -> io::Result<u32>;
    fn seccomp(&self) -> io::Result<SeccompSupport>;
    /// Whether the kernel has `call`, by calling it with arguments it must refuse: `Ok` when it answers anything but
    /// ENOSYS (or EPERM from a seccomp profile), which are returned as errors.
    fn kernel_call(&self, call: KernelCall) -> io::Result<()>;
    /// Does /proc/cpuinfo list the `hypervisor` CPU flag (we are a guest)?
    fn cpu_hypervisor_flag(&self) -> io::Result<bool>;
    /// The trimmed contents of /proc/sys for a dotted sysctl name, e.g. `user.max_user_namespaces`.
    fn sysctl(&self, name: &str) -> io::Result<String>;
    /// Connects to a unix socket, writes `request`, reads until EOF; the whole exchange is bounded by `timeout`.
    fn unix_exchange(&self, path: &Path, request: &[u8], timeout: Duration) -> io::Result<Vec<u8>>;
    /// Root only: whether `path` can be shown through an idmapped mount (a root launcher's bottle sees the workspace
    /// and its home that way).
    fn idmapped_mount(&self, path: &Path) -> io::Result<()> {
        let _ = path;
        Err(io::Error::other("this host was not asked"))
    }
    /// Root only: why a root launcher's bottles could not have their own host ids here (an account or subordinate
    /// range owns one of them); `Ok` when none is taken.
    fn bottle_ids_free(&self) -> Result<(), String> {
        Err("this host was not asked".into())
    }
    /// Where this launcher could make its bottles' cgroups (resource limits), or why it cannot.
    fn cgroups(&self) -> Result<crate::cgroup::Hierarchy, crate::cgroup::CgroupError> {
        Err(crate::cgroup::CgroupError::Unavailable {
            reason: "this host was not asked".into(),
        })
    }
}

/// The machine this process runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealHost;

impl Host for RealHost {
    fn cgroups(&self) -> Result<crate::cgroup::Hierarchy, crate::cgroup::CgroupError> {
        let own =
            std::fs::read_to_string("/proc/self/cgroup").map_err(|e| crate::cgroup::CgroupError::Unavailable {
                reason: format!("cannot read /proc/self/cgroup: {e}"),
            })?;
        crate::cgroup::detect(Path::new(crate::cgroup::CGROUP_ROOT), &own, self.euid() == 0)
    }

    fn metadata(&self, path: &Path) -> io::Result<FileMeta> {
        let meta = std::fs::metadata(path)?;
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            FileKind::File
        } else if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_char_device() {
            FileKind::CharDevice
        } else if ft.is_socket() {
            FileKind::Socket
        } else {
            FileKind::Other
        };
        Ok(FileMeta {
            kind,
            mode: meta.permissions().mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }

    fn can_write(&self, path: &Path) -> io::Result<()> {
        use rustix::fs::{Access, AtFlags, CWD, accessat};
        accessat(CWD, path, Access::WRITE_OK, AtFlags::EACCESS).map_err(io::Error::from)
    }

    fn open_kvm(&self, path: &Path) -> io::Result<KvmProbe> {
        let kvm = OpenOptions::new().read(true).write(true).open(path)?;
        let api_version = sys::kvm_api_version(kvm.as_fd());
        let create_vm = sys::kvm_create_vm(kvm.as_fd());
        Ok(KvmProbe { api_version, create_vm })
    }

    fn euid(&self) -> u32 {
        rustix::process::geteuid().as_raw()
    }

    fn group_gid(&self, name: &str) -> io::Result<Option<u32>> {
        Ok(parse_group_gid(&std::fs::read_to_string("/etc/group")?, name))
    }

    fn env(&self, key: &str) -> Option<OsString> {
        std::env::var_os(key)
    }

    fn which(&self, program: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        // SECURITY: relative PATH entries (including the empty one, meaning the cwd) are skipped, so a binary planted
        // in the working directory is never taken for docker, smolvm or tar.
        std::env::split_paths(&path)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(program))
            .find(|candidate| {
                std::fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
    }

    fn run(&self, program: &Path, args: &[&str], timeout: Duration) -> io::Result<CommandOutput> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                // The child may have exited between try_wait and kill; wait() below reaps it either way.
                let _ = child.kill();
                break child.wait()?;
            }
            thread::sleep(POLL_INTERVAL);
        };
        Ok(CommandOutput {
            code: status.code(),
            timed_out,
            stdout: stdout.recv_timeout(PIPE_GRACE).unwrap_or_default(),
            stderr: stderr.recv_timeout(PIPE_GRACE).unwrap_or_default(),
        })
    }

    fn idmapped_mount(&self, path: &Path) -> io::Result<()> {
        sys::idmapped_mount_in_child(
            path,
            crate::namespace::ids::host_id(std::net::Ipv4Addr::new(127, 0, 0, 2)),
        )
    }

    fn bottle_ids_free(&self) -> Result<(), String> {
        // The whole default pool: 127.0.0.2–254, each account file read once.
        let pool: Vec<_> = (2..=254).map(|n| std::net::Ipv4Addr::new(127, 0, 0, n)).collect();
        crate::namespace::ids::check_all_free(&pool).map_err(|e| e.to_string())
    }

    fn try_unshare(&self, probe: NamespaceProbe) -> io::Result<Unshare> {
        Ok(match sys::unshare_in_child(probe)? {
            Ok(()) => Unshare::Done,
            Err(err) => Unshare::Refused(err),
        })
    }

    fn landlock_abi(&self) -> io::Result<u32> {
        sys::landlock_abi_version()
    }

    fn kernel_call(&self, call: KernelCall) -> io::Result<()> {
        sys::kernel_call_present(call)
    }

    fn seccomp(&self) -> io::Result<SeccompSupport> {
        let current_mode = match sys::seccomp_mode() {
            Ok(mode) => mode,
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => return Ok(SeccompSupport::Absent),
            Err(err) => return Err(err),
        };
        let probe = sys::seccomp_filter_probe();
        match probe.raw_os_error() {
            Some(libc::EFAULT) => Ok(SeccompSupport::Filter { current_mode }),
            Some(libc::EINVAL) => Ok(SeccompSupport::StrictOnly),
            _ => Err(probe),
        }
    }

    fn cpu_hypervisor_flag(&self) -> io::Result<bool> {
        Ok(cpuinfo_has_hypervisor(&std::fs::read_to_string("/proc/cpuinfo")?))
    }

    fn sysctl(&self, name: &str) -> io::Result<String> {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        Ok(std::fs::read_to_string(path)?.trim().to_owned())
    }

    fn unix_exchange(&self, path: &Path, request: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut stream = UnixStream::connect(path)?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(request)?;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no complete reply before the timeout",
                ));
            }
            stream.set_read_timeout(Some(left))?;
            let n = stream.read(&mut chunk)?;
            if n == 0 || reply.len() as u64 >= MAX_CAPTURE_BYTES {
                return Ok(reply);
            }
            reply.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Reads a pipe to its end (bounded) on a thread, so a full pipe never blocks the child.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(pipe) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            // A read error only truncates the capture; the exit status still tells the story.
            let _ = pipe.take(MAX_CAPTURE_BYTES).read_to_end(&mut buf);
            let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
        });
    }
    rx
}

/// The gid of `name` in the text of /etc/group (`name:password:gid:members`, group(5)).
pub(crate) fn parse_group_gid(etc_group: &str, name: &str) -> Option<u32> {
    etc_group.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        fields.nth(1)?.trim().parse().ok()
    })
}

/// Whether any `flags` line of /proc/cpuinfo carries the `hypervisor` flag (x86: CPUID.1:ECX bit 31).
pub(crate) fn cpuinfo_has_hypervisor(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .any(|(key, value)| key.trim() == "flags" && value.split_whitespace().any(|flag| flag == "hypervisor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_gid_is_the_third_field_of_the_named_line() {
        let text = "root:x:0:\nkvmfoo:x:7:\nkvm:x:108:alice,bob\n";
        assert_eq!(parse_group_gid(text, "kvm"), Some(108));
        assert_eq!(parse_group_gid(text, "docker"), None);
        assert_eq!(parse_group_gid("kvm:x:notanumber:\n", "kvm"), None);
    }

    #[test]
    fn hypervisor_flag_is_matched_as_a_whole_word_on_flags_lines() {
        assert!(cpuinfo_has_hypervisor(
            "processor\t: 0\nflags\t\t: fpu vme hypervisor lahf_lm\n"
        ));
        assert!(!cpuinfo_has_hypervisor(
            "flags\t\t: fpu vme hypervisorx\nmodel name\t: hypervisor\n"
        ));
    }

    #[test]
    fn run_captures_output_and_kills_on_timeout() {
        let host = RealHost;
        let sh = Path::new("/bin/sh");
        let out = host
            .run(sh, &["-c", "echo out; echo err >&2; exit 3"], Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            (out.code, out.stdout.as_str(), out.stderr.as_str()),
            (Some(3), "out\n", "err\n")
        );
        let slow = host
            .run(sh, &["-c", "exec sleep 10"], Duration::from_millis(100))
            .unwrap();
        assert!(slow.timed_out && !slow.success());
    }

    #[test]
    fn unix_exchange_reads_the_reply_until_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 5];
            conn.read_exact(&mut req).unwrap();
            conn.write_all(b"pong:").unwrap();
            conn.write_all(&req).unwrap();
        });
        let reply = RealHost.unix_exchange(&path, b"hello", Duration::from_secs(5)).unwrap();
        server.join().unwrap();
        assert_eq!(reply, b"pong:hello");
    }
}
