//! `FakeHost`: a scripted, recording `Host` for unit tests. Owns nothing real; every answer comes from its fields.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::host::{
    CommandOutput, FileKind, FileMeta, Host, KernelCall, KvmProbe, NamespaceProbe, Platform, SeccompSupport, Unshare,
};

/// Scripted errors are raw errnos so that every call can build a fresh `io::Error`.
pub(crate) type Errno = i32;

pub(crate) struct FakeKvm {
    pub open: Result<(), Errno>,
    pub api_version: Result<i32, Errno>,
    pub create_vm: Result<(), Errno>,
}

pub(crate) struct FakeHost {
    pub platform: Platform,
    pub files: HashMap<PathBuf, FileMeta>,
    pub writable: HashSet<PathBuf>,
    pub kvm: FakeKvm,
    pub euid: u32,
    pub groups: HashMap<String, u32>,
    pub env: HashMap<String, String>,
    pub path: HashMap<String, PathBuf>,
    /// Keyed by `program arg arg…`; a missing key answers ENOENT.
    pub commands: HashMap<String, Result<CommandOutput, Errno>>,
    /// One-shot answers, keyed like `commands` and given in order before the standing answer there: for a command
    /// whose output changes between two runs (`ifconfig lo0` before and after adding an alias).
    once: RefCell<HashMap<String, VecDeque<Result<CommandOutput, Errno>>>>,
    /// A missing key answers `Done`.
    pub unshare: HashMap<NamespaceProbe, Errno>,
    /// Makes every `try_unshare` fail as if fork(2) had.
    pub fork_error: Option<Errno>,
    /// Makes `idmapped_mount` fail with this errno.
    pub idmap: Option<Errno>,
    /// Makes `bottle_ids_free` say this.
    pub ids_taken: Option<String>,
    pub landlock: Result<u32, Errno>,
    pub seccomp: Result<SeccompSupport, Errno>,
    /// A missing key answers present.
    pub kernel_calls: HashMap<KernelCall, Errno>,
    pub hypervisor: bool,
    pub sysctls: HashMap<String, String>,
    /// Keyed by (socket path, request target such as `/_ping`); a missing key answers ECONNREFUSED.
    pub sockets: HashMap<(PathBuf, String), Vec<u8>>,
    /// The cgroup v2 base bottles' cgroups would go in; `None`: no cgroups for this launcher.
    pub cgroups: Option<PathBuf>,
    calls: RefCell<Vec<String>>,
}

pub(crate) fn meta(kind: FileKind, mode: u32, uid: u32, gid: u32) -> FileMeta {
    FileMeta { kind, mode, uid, gid }
}

pub(crate) fn output(code: i32, stdout: &str, stderr: &str) -> CommandOutput {
    CommandOutput {
        code: Some(code),
        timed_out: false,
        stdout: stdout.into(),
        stderr: stderr.into(),
    }
}

pub(crate) const KVM_GID: u32 = 108;

/// `ifconfig lo0` on a Mac as it boots: 127.0.0.1 only.
pub(crate) const LO0_DEFAULT: &str = "lo0: flags=8049<UP,LOOPBACK,RUNNING,MULTICAST> mtu 16384
\toptions=1203<RXCSUM,TXCSUM,TXSTATUS,SW_TIMESTAMP>
\tinet 127.0.0.1 netmask 0xff000000
\tinet6 ::1 prefixlen 128
\tinet6 fe80::1%lo0 prefixlen 64 scopeid 0x1
\tnd6 options=201<PERFORMNUD,DAD>
";

/// `ifconfig lo0` after `ifconfig lo0 alias 127.0.0.2 up`.
pub(crate) const LO0_WITH_POOL: &str = "lo0: flags=8049<UP,LOOPBACK,RUNNING,MULTICAST> mtu 16384
\toptions=1203<RXCSUM,TXCSUM,TXSTATUS,SW_TIMESTAMP>
\tinet 127.0.0.1 netmask 0xff000000
\tinet6 ::1 prefixlen 128
\tinet6 fe80::1%lo0 prefixlen 64 scopeid 0x1
\tinet 127.0.0.2 netmask 0xff000000
\tnd6 options=201<PERFORMNUD,DAD>
";

impl FakeHost {
    /// A root Linux host where every backend is fully usable.
    pub fn healthy() -> Self {
        let mut host = Self {
            platform: Platform::Linux,
            files: HashMap::new(),
            writable: HashSet::new(),
            kvm: FakeKvm {
                open: Ok(()),
                api_version: Ok(12),
                create_vm: Ok(()),
            },
            euid: 0,
            groups: HashMap::from([("kvm".to_owned(), KVM_GID)]),
            env: HashMap::from([("HOME".to_owned(), "/root".to_owned())]),
            path: HashMap::new(),
            commands: HashMap::new(),
            once: RefCell::default(),
            unshare: HashMap::new(),
            fork_error: None,
            idmap: None,
            ids_taken: None,
            landlock: Ok(7),
            seccomp: Ok(SeccompSupport::Filter { current_mode: 0 }),
            kernel_calls: HashMap::new(),
            hypervisor: false,
            sysctls: HashMap::from([
                ("kernel.osrelease".to_owned(), "6.18.44".to_owned()),
                ("user.max_user_namespaces".to_owned(), "96365".to_owned()),
            ]),
            sockets: HashMap::new(),
            cgroups: Some(PathBuf::from("/sys/fs/cgroup/bot-bottle")),
            calls: RefCell::new(Vec::new()),
        };
        host.file("/dev/kvm", meta(FileKind::CharDevice, 0o660, 0, KVM_GID));
        host.file("/root/.local/state", meta(FileKind::Dir, 0o755, 0, 0));
        host.writable.insert("/root/.local/state".into());
        for tool in ["docker", "runsc", "smolvm", "tar", "python3"] {
            host.path.insert(tool.to_owned(), PathBuf::from("/usr/bin").join(tool));
        }
        host.command(
            "/usr/bin/docker version --format {{.Server.Version}}",
            Ok(output(0, "20.10.24\n", "")),
        );
        host.command("/usr/bin/smolvm --version", Ok(output(0, "smolvm 1.32.2\n", "")));
        host.socket(
            "/var/run/docker.sock",
            "/_ping",
            "HTTP/1.0 200 OK\r\nApi-Version: 1.41\r\n\r\nOK",
        );
        host.socket(
            "/var/run/docker.sock",
            "/info",
            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n\
             {\"DefaultRuntime\":\"runc\",\"CgroupVersion\":\"1\"}",
        );
        host
    }

    /// A Mac where the smolmachines backend is fully usable: Hypervisor.framework present and lo0 already carrying
    /// the pool's first address.
    pub fn healthy_mac() -> Self {
        let mut host = Self::healthy();
        host.platform = Platform::MacOs;
        host.files.remove(Path::new("/dev/kvm"));
        host.command("/usr/sbin/sysctl -n kern.hv_support", Ok(output(0, "1\n", "")));
        host.command("/sbin/ifconfig lo0", Ok(output(0, LO0_WITH_POOL, "")));
        host
    }

    pub fn file(&mut self, path: &str, meta: FileMeta) {
        self.files.insert(path.into(), meta);
    }

    pub fn command(&mut self, line: &str, result: Result<CommandOutput, Errno>) {
        self.commands.insert(line.to_owned(), result);
    }

    /// Answers the next run of `line` with `result`, once; later runs get the next queued answer, then `commands`.
    pub fn command_once(&mut self, line: &str, result: Result<CommandOutput, Errno>) {
        self.once
            .get_mut()
            .entry(line.to_owned())
            .or_default()
            .push_back(result);
    }

    pub fn socket(&mut self, path: &str, target: &str, reply: &str) {
        self.sockets
            .insert((path.into(), target.to_owned()), reply.as_bytes().to_vec());
    }

    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.insert(key.to_owned(), value.to_owned());
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }

    /// Whether any recorded call starts with `prefix` (calls are recorded as `method argument`).
    pub fn called(&self, prefix: &str) -> bool {
        self.calls.borrow().iter().any(|call| call.starts_with(prefix))
    }

    fn record(&self, call: String) {
        self.calls.borrow_mut().push(call);
    }
}

fn errno(code: Errno) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl Host for FakeHost {
    fn cgroups(&self) -> Result<crate::cgroup::Hierarchy, crate::cgroup::CgroupError> {
        self.record("cgroups".to_owned());
        match &self.cgroups {
            Some(base) => Ok(crate::cgroup::Hierarchy::V2 { base: base.clone() }),
            None => Err(crate::cgroup::CgroupError::Unavailable {
                reason: "the fake host has none".into(),
            }),
        }
    }

    // Not recorded: the platform is a build-time fact of a real host, not an observation of the machine.
    fn platform(&self) -> Platform {
        self.platform
    }

    fn metadata(&self, path: &Path) -> io::Result<FileMeta> {
        self.record(format!("metadata {}", path.display()));
        self.files.get(path).copied().ok_or_else(|| errno(libc::ENOENT))
    }

    fn can_write(&self, path: &Path) -> io::Result<()> {
        self.record(format!("can_write {}", path.display()));
        if self.writable.contains(path) {
            Ok(())
        } else {
            Err(errno(libc::EACCES))
        }
    }

    fn open_kvm(&self, path: &Path) -> io::Result<KvmProbe> {
        self.record(format!("open_kvm {}", path.display()));
        self.kvm.open.map_err(errno)?;
        Ok(KvmProbe {
            api_version: self.kvm.api_version.map_err(errno),
            create_vm: self.kvm.create_vm.map_err(errno),
        })
    }

    fn euid(&self) -> u32 {
        self.record("euid".to_owned());
        self.euid
    }

    fn group_gid(&self, name: &str) -> io::Result<Option<u32>> {
        self.record(format!("group_gid {name}"));
        Ok(self.groups.get(name).copied())
    }

    fn env(&self, key: &str) -> Option<OsString> {
        self.record(format!("env {key}"));
        self.env.get(key).map(OsString::from)
    }

    fn which(&self, program: &str) -> Option<PathBuf> {
        self.record(format!("which {program}"));
        self.path.get(program).cloned()
    }

    fn run(&self, program: &Path, args: &[&str], _timeout: Duration) -> io::Result<CommandOutput> {
        let line = std::iter::once(program.display().to_string())
            .chain(args.iter().map(|arg| (*arg).to_owned()))
            .collect::<Vec<_>>()
            .join(" ");
        self.record(format!("run {line}"));
        let once = self.once.borrow_mut().get_mut(&line).and_then(VecDeque::pop_front);
        match once.as_ref().or_else(|| self.commands.get(&line)) {
            Some(Ok(out)) => Ok(out.clone()),
            Some(Err(code)) => Err(errno(*code)),
            None => Err(errno(libc::ENOENT)),
        }
    }

    fn idmapped_mount(&self, path: &Path) -> io::Result<()> {
        self.record(format!("idmapped_mount {}", path.display()));
        match self.idmap {
            Some(code) => Err(errno(code)),
            None => Ok(()),
        }
    }

    fn bottle_ids_free(&self) -> Result<(), String> {
        self.record("bottle_ids_free".to_owned());
        self.ids_taken.clone().map_or(Ok(()), Err)
    }

    fn try_unshare(&self, probe: NamespaceProbe) -> io::Result<Unshare> {
        self.record(format!("try_unshare {probe:?}"));
        if let Some(code) = self.fork_error {
            return Err(errno(code));
        }
        Ok(match self.unshare.get(&probe) {
            Some(code) => Unshare::Refused(errno(*code)),
            None => Unshare::Done,
        })
    }

    fn landlock_abi(&self) -> io::Result<u32> {
        self.record("landlock_abi".to_owned());
        self.landlock.map_err(errno)
    }

    fn seccomp(&self) -> io::Result<SeccompSupport> {
        self.record("seccomp".to_owned());
        self.seccomp.map_err(errno)
    }

    fn kernel_call(&self, call: KernelCall) -> io::Result<()> {
        self.record(format!("kernel_call {}", call.name()));
        match self.kernel_calls.get(&call) {
            Some(code) => Err(errno(*code)),
            None => Ok(()),
        }
    }

    fn cpu_hypervisor_flag(&self) -> io::Result<bool> {
        self.record("cpu_hypervisor_flag".to_owned());
        Ok(self.hypervisor)
    }

    fn sysctl(&self, name: &str) -> io::Result<String> {
        self.record(format!("sysctl {name}"));
        self.sysctls.get(name).cloned().ok_or_else(|| errno(libc::ENOENT))
    }

    fn unix_exchange(&self, path: &Path, request: &[u8], _timeout: Duration) -> io::Result<Vec<u8>> {
        let request = String::from_utf8_lossy(request);
        let target = request.split(' ').nth(1).unwrap_or_default().to_owned();
        self.record(format!("unix_exchange {} {target}", path.display()));
        self.sockets
            .get(&(path.to_path_buf(), target))
            .cloned()
            .ok_or_else(|| errno(libc::ECONNREFUSED))
    }
}
