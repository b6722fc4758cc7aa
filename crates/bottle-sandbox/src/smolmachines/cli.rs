//! The one place that runs smolvm. Every invocation gets the verified engine path, `--state-dir` when configured,
//! `--error-format json`, an environment built from nothing (`env_clear`) plus a short allowlist, and a timeout that
//! kills the engine's whole process group (`runner.rs`). Trusts the engine binary (it is version-checked); treats its
//! output as untrusted text.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::db::{self, DbPathError};
use super::plan::{MachineName, MachinePlan, OWNER_LABEL};
pub use super::runner::{Exit, Invocation, ProcessRunner, RunOutput, Runner};
use crate::engine::Engine;
use crate::preflight::{Host, RealHost};

/// Variables passed through from our environment; everything else is dropped. `XDG_*` is passed as a prefix.
/// SECURITY: `SMOLVM_*` variables change the egress floor (`SMOLVM_ALLOW_HOST_LOOPBACK`, `SMOLVM_EGRESS_FLOOR`,
/// research/smolvm.md §3.3 conclusion 5), the machine a command acts on (`SMOLVM_MACHINE_NAME`) and the state dir
/// (`SMOLVM_DATA_DIR`); proxy variables feed `--use-host-proxy`. None may reach the engine unless set here.
const PASSED_ENV: &[&str] = &["PATH", "HOME", "LANG", "TMPDIR"];
const PASSED_ENV_PREFIX: &str = "XDG_";
/// Set on every run: smolvm's tracing lines otherwise carry ANSI colour codes even into a file.
const FIXED_ENV: &[(&str, &str)] = &[("NO_COLOR", "1")];
/// Printed by every run of a binary named `smol-vmm` (research/smolvm.md §2.2); never part of an error.
const PACKED_ASSETS_NOTE: &str = "note: no packed assets found";
/// clap's exit status for usage errors, which are plain text even under `--error-format json`.
const USAGE_EXIT: i32 = 2;

/// The remedies `doctor` prints for the same conditions (preflight/smolmachines.rs; a unit test keeps them equal).
pub const KVM_NOT_AVAILABLE_REMEDY: &str =
    "load kvm-intel or kvm-amd (`sudo modprobe kvm_intel` or `kvm_amd`) and enable virtualization in firmware";
pub const KVM_PERMISSION_REMEDY: &str =
    "add your user to the kvm group (`sudo usermod -aG kvm $USER`), then log out and back in";
pub const KVM_GROUP_REMEDY: &str = "create the group and give it /dev/kvm: `sudo groupadd -r kvm && sudo chgrp kvm \
                                    /dev/kvm && sudo chmod 660 /dev/kvm`";
pub const KVM_OWNER_REMEDY: &str = "give group kvm /dev/kvm: `sudo chgrp kvm /dev/kvm && sudo chmod 660 /dev/kvm`";
/// Seen on this project's hosts: as root smolvm boots each VM under its own uid (research/smolvm.md §5), and that uid
/// cannot reach a `smolmachines` installed under a 0700 home (e.g. pyenv under /root).
pub const GUEST_NO_BOOT_REMEDY: &str = "the guest kernel made no boot progress, which is what nested virtualization \
                                        does to guests on many hosts (`bot-bottle doctor --backend smolmachines` \
                                        reports /dev/kvm as degraded there): run on bare metal, or in a VM whose \
                                        hypervisor supports nested KVM";
pub const ENGINE_LIBRARIES_REMEDY: &str = "as root, smolvm runs each VM under a per-VM uid that must be able to read \
                                           libkrun and libkrunfw next to the engine: install smolmachines outside a \
                                           private home directory (e.g. a venv under /opt), or point \
                                           BOT_BOTTLE_SMOLVM at such a copy";

/// Per-command bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `machine ls`, `machine status`.
    pub query: Duration,
    pub create: Duration,
    pub delete: Duration,
    /// `machine start` waits up to 30 s for the guest agent itself (research/smolvm.md §4), after preparing disks.
    pub start: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            query: Duration::from_secs(30),
            create: Duration::from_secs(120),
            delete: Duration::from_secs(60),
            start: Duration::from_secs(120),
        }
    }
}

/// smolvm's stable error codes (`--error-format json`, research/smolvm.md §2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    NotFound,
    Conflict,
    Interrupted,
    ConfigError,
    InvalidState,
    StorageError,
    MountError,
    KvmUnavailable,
    HypervisorUnavailable,
    CommandFailed,
    SmolvmError,
    /// A code this version of bot-bottle does not know, kept verbatim.
    Unrecognised(String),
}

impl ErrorCode {
    fn parse(code: &str) -> Self {
        match code {
            "NOT_FOUND" => Self::NotFound,
            "CONFLICT" => Self::Conflict,
            "INTERRUPTED" => Self::Interrupted,
            "CONFIG_ERROR" => Self::ConfigError,
            "INVALID_STATE" => Self::InvalidState,
            "STORAGE_ERROR" => Self::StorageError,
            "MOUNT_ERROR" => Self::MountError,
            "KVM_UNAVAILABLE" => Self::KvmUnavailable,
            "HYPERVISOR_UNAVAILABLE" => Self::HypervisorUnavailable,
            "COMMAND_FAILED" => Self::CommandFailed,
            "SMOLVM_ERROR" => Self::SmolvmError,
            other => Self::Unrecognised(other.to_owned()),
        }
    }
}

/// The `{"error":{"code","message"}}` line smolvm prints on failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineError {
    pub code: ErrorCode,
    pub message: String,
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{path} is smolvm {version}, which bot-bottle has not verified")]
    UnverifiedEngine { path: PathBuf, version: String },
    #[error("cannot locate smolvm's database")]
    DbPath(#[from] DbPathError),
    #[error("could not run `{engine} {command}`")]
    Spawn {
        engine: PathBuf,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`smolvm {command}` did not finish within {after:?}; its process group was killed")]
    TimedOut { command: String, after: Duration },
    #[error("`smolvm {command}` was killed by signal {signal}")]
    Signalled { command: String, signal: i32 },
    #[error("`smolvm {command}` failed (exit {status}): {error}")]
    Engine {
        command: String,
        status: i32,
        error: EngineError,
    },
    #[error("smolvm rejected the arguments of `smolvm {command}`: {message}")]
    Usage { command: String, message: String },
    #[error("`smolvm {command}` failed (exit {status}): {stderr}")]
    Failed {
        command: String,
        status: i32,
        stderr: String,
    },
    #[error("`smolvm {command}` printed output that is not the expected JSON: {reason}")]
    Output { command: String, reason: String },
}

impl CliError {
    /// The engine's structured error, when there was one.
    pub fn engine_error(&self) -> Option<&EngineError> {
        match self {
            Self::Engine { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// `machine start` failures that have a known remedy; the rest stay `Cli`.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("smolvm cannot start {machine}: KVM is not available ({message}); {remedy}")]
    KvmNotAvailable {
        machine: String,
        message: String,
        remedy: &'static str,
    },
    #[error("smolvm cannot start {machine}: no permission on /dev/kvm ({message}); {remedy}")]
    KvmPermissionDenied {
        machine: String,
        message: String,
        remedy: &'static str,
    },
    /// As root, smolvm passed its own check but the VM process, dropped to its per-VM uid with only the `kvm` group
    /// (research/smolvm.md §5), could not open /dev/kvm.
    #[error("smolvm cannot start {machine}: its per-VM uid cannot open /dev/kvm ({message}); {remedy}")]
    KvmDeniedAfterPrivilegeDrop {
        machine: String,
        message: String,
        remedy: &'static str,
    },
    #[error("smolvm cannot start {machine}: the VM process cannot load libkrun ({message}); {remedy}")]
    EngineLibrariesUnreachable {
        machine: String,
        message: String,
        remedy: &'static str,
    },
    /// smolvm's own 30 s wait for the guest agent ran out with no boot progress (research/smolvm.md §2.3).
    #[error("smolvm started {machine} but its guest never booted ({message}); {remedy}")]
    GuestNeverBooted {
        machine: String,
        message: String,
        remedy: &'static str,
    },
    #[error(transparent)]
    Cli(#[from] CliError),
}

impl StartError {
    pub fn remedy(&self) -> Option<&'static str> {
        match self {
            Self::KvmNotAvailable { remedy, .. }
            | Self::KvmPermissionDenied { remedy, .. }
            | Self::KvmDeniedAfterPrivilegeDrop { remedy, .. }
            | Self::EngineLibrariesUnreachable { remedy, .. }
            | Self::GuestNeverBooted { remedy, .. } => Some(remedy),
            Self::Cli(_) => None,
        }
    }
}

/// What `machine delete -f` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Removed,
    /// There was no such machine (`NOT_FOUND`).
    Absent,
}

/// One entry of `machine ls --json` / `machine status --json`; unknown keys are ignored (this is display data; the
/// row in the database is what gets verified).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MachineInfo {
    pub name: String,
    /// `created`, `running`, `stopped`, …
    pub state: String,
    #[serde(default)]
    pub network: bool,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Present only when an allow list is set.
    #[serde(default)]
    pub allowed_cidrs: Option<Vec<String>>,
    /// `dns_filter_hosts`; present only when set.
    #[serde(default)]
    pub allowed_hosts: Option<Vec<String>>,
}

impl MachineInfo {
    /// Carries `owner=bot-bottle`.
    pub fn is_ours(&self) -> bool {
        self.labels.get(OWNER_LABEL.0).map(String::as_str) == Some(OWNER_LABEL.1)
    }
}

/// A verified smolvm engine and the state it works on.
pub struct Smolvm {
    engine: PathBuf,
    state_dir: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
    timeouts: Timeouts,
    runner: Box<dyn Runner>,
}

impl fmt::Debug for Smolvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Smolvm")
            .field("engine", &self.engine)
            .field("state_dir", &self.state_dir)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl Smolvm {
    /// The engine from `engine::discover_verified`, run for real, with this process's environment scrubbed.
    pub fn new(engine: &Engine, state_dir: Option<&Path>) -> Result<Self, CliError> {
        Self::with_runner(engine, state_dir, std::env::vars_os(), Box::new(ProcessRunner))
    }

    /// `new` with an explicit parent environment (scrubbed the same way) and runner.
    pub fn with_runner(
        engine: &Engine,
        state_dir: Option<&Path>,
        parent_env: impl IntoIterator<Item = (OsString, OsString)>,
        runner: Box<dyn Runner>,
    ) -> Result<Self, CliError> {
        if !engine.is_verified() {
            return Err(CliError::UnverifiedEngine {
                path: engine.path.clone(),
                version: engine.version.clone(),
            });
        }
        let env = scrubbed_env(parent_env);
        // Fails early on a relative state dir or a missing HOME, before smolvm could pick another place.
        db::db_path(state_dir, &env)?;
        Ok(Self {
            engine: engine.path.clone(),
            state_dir: state_dir.map(Path::to_path_buf),
            env,
            timeouts: Timeouts::default(),
            runner,
        })
    }

    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    pub fn engine(&self) -> &Path {
        &self.engine
    }

    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }

    /// The environment every run starts from.
    pub fn base_env(&self) -> &[(OsString, OsString)] {
        &self.env
    }

    /// The database this engine reads and writes.
    pub fn db_path(&self) -> Result<PathBuf, DbPathError> {
        db::db_path(self.state_dir.as_deref(), &self.env)
    }

    /// The full invocation for `args` (a subcommand and its flags): engine, global flags, scrubbed env + `extra_env`.
    pub fn invocation(&self, args: &[OsString], extra_env: &[(OsString, OsString)]) -> Invocation {
        let mut full: Vec<OsString> = Vec::with_capacity(args.len() + 4);
        if let Some(dir) = &self.state_dir {
            full.push("--state-dir".into());
            full.push(dir.into());
        }
        full.push("--error-format".into());
        full.push("json".into());
        full.extend(args.iter().cloned());
        let mut env = self.env.clone();
        env.extend(extra_env.iter().cloned());
        Invocation {
            program: self.engine.clone(),
            args: full,
            env,
        }
    }

    /// Runs `args`; any unsuccessful end becomes a `CliError`.
    pub fn invoke(
        &self,
        args: &[OsString],
        extra_env: &[(OsString, OsString)],
        timeout: Duration,
    ) -> Result<RunOutput, CliError> {
        let command = describe(args);
        let invocation = self.invocation(args, extra_env);
        tracing::debug!(command = %command, "running smolvm");
        let out = self
            .runner
            .run(&invocation, timeout)
            .map_err(|source| CliError::Spawn {
                engine: self.engine.clone(),
                command: command.clone(),
                source,
            })?;
        match out.exit {
            Exit::Code(0) => Ok(out),
            Exit::Code(status) => Err(failure(command, status, &out.stderr)),
            Exit::Signal(signal) => Err(CliError::Signalled { command, signal }),
            Exit::TimedOut => Err(CliError::TimedOut {
                command,
                after: timeout,
            }),
        }
    }

    /// `machine ls --json`.
    pub fn list(&self) -> Result<Vec<MachineInfo>, CliError> {
        let args = os_args(&["machine", "ls", "--json"]);
        let out = self.invoke(&args, &[], self.timeouts.query)?;
        parse_json(&args, &out.stdout)
    }

    /// The machines labelled `owner=bot-bottle`, for sweeps.
    pub fn list_ours(&self) -> Result<Vec<MachineInfo>, CliError> {
        Ok(self.list()?.into_iter().filter(MachineInfo::is_ours).collect())
    }

    /// `machine status --name N --json`; `None` when there is no such machine.
    pub fn status(&self, name: &MachineName) -> Result<Option<MachineInfo>, CliError> {
        let args = os_args(&["machine", "status", "--name", name.as_str(), "--json"]);
        match self.invoke(&args, &[], self.timeouts.query) {
            Ok(out) => parse_json(&args, &out.stdout).map(Some),
            Err(err) if is_not_found(&err, name) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// `machine create` with the plan's flags. The row it writes still lacks the interceptor requirement: run
    /// `db::verify_or_patch` before the first start.
    pub fn create(&self, plan: &MachinePlan) -> Result<(), CliError> {
        self.invoke(plan.create_args(), &[], self.timeouts.create).map(drop)
    }

    /// `machine delete --name N -f` (without `-f` smolvm asks for confirmation and fails on a closed stdin).
    pub fn delete(&self, name: &MachineName) -> Result<Deleted, CliError> {
        let args = os_args(&["machine", "delete", "--name", name.as_str(), "-f"]);
        match self.invoke(&args, &[], self.timeouts.delete) {
            Ok(_) => Ok(Deleted::Removed),
            Err(err) if is_not_found(&err, name) => Ok(Deleted::Absent),
            Err(err) => Err(err),
        }
    }

    /// `machine start --name N --egress-interceptor ADDR` with `SMOLVM_INTERCEPTOR_TOKEN` set. Returns once smolvm
    /// reports the guest agent ready. Verify the row (`db::verify`) immediately before calling this.
    pub fn start(&self, plan: &MachinePlan) -> Result<(), StartError> {
        match self.invoke(&plan.start_args(), &plan.start_env(), self.timeouts.start) {
            Ok(_) => Ok(()),
            Err(err) => Err(classify_start(plan.name(), err, || {
                matches!(RealHost.group_gid("kvm"), Ok(Some(_)))
            })),
        }
    }
}

/// Keeps only `PASSED_ENV` and `XDG_*` (never a `SMOLVM_*`), then adds `FIXED_ENV`.
pub fn scrubbed_env(parent: impl IntoIterator<Item = (OsString, OsString)>) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = parent
        .into_iter()
        .filter(|(key, _)| {
            let key = key.to_string_lossy();
            PASSED_ENV.contains(&key.as_ref()) || key.starts_with(PASSED_ENV_PREFIX)
        })
        .collect();
    env.extend(FIXED_ENV.iter().map(|(k, v)| ((*k).into(), (*v).into())));
    env
}

/// Maps the message substrings smolvm prints for its KVM and library checks (research/smolvm.md §2.3: the code is
/// `SMOLVM_ERROR`, not `KVM_UNAVAILABLE`, so the message is all there is). `kvm_group_exists` picks between the two
/// remedies `doctor` gives for a /dev/kvm the per-VM uid cannot open; it is asked only in that case.
pub fn classify_start(name: &MachineName, err: CliError, kvm_group_exists: impl FnOnce() -> bool) -> StartError {
    let Some(engine) = err.engine_error() else {
        return StartError::Cli(err);
    };
    let message = engine.message.clone();
    let machine = name.to_string();
    let lower = message.to_ascii_lowercase();
    if lower.contains("after privilege drop") {
        let remedy = if kvm_group_exists() {
            KVM_OWNER_REMEDY
        } else {
            KVM_GROUP_REMEDY
        };
        StartError::KvmDeniedAfterPrivilegeDrop {
            machine,
            message,
            remedy,
        }
    } else if lower.contains("kvm not available") {
        StartError::KvmNotAvailable {
            machine,
            message,
            remedy: KVM_NOT_AVAILABLE_REMEDY,
        }
    } else if lower.contains("kvm permission denied") {
        StartError::KvmPermissionDenied {
            machine,
            message,
            remedy: KVM_PERMISSION_REMEDY,
        }
    } else if lower.contains("libkrun/libkrunfw not found") {
        StartError::EngineLibrariesUnreachable {
            machine,
            message,
            remedy: ENGINE_LIBRARIES_REMEDY,
        }
    } else if lower.contains("did not become ready") && lower.contains("no boot progress") {
        StartError::GuestNeverBooted {
            machine,
            message,
            remedy: GUEST_NO_BOOT_REMEDY,
        }
    } else {
        StartError::Cli(err)
    }
}

/// `NOT_FOUND`, or the `CONFIG_ERROR … machine 'N' not found` that `status --json` prints instead (research §2.1).
fn is_not_found(err: &CliError, name: &MachineName) -> bool {
    err.engine_error().is_some_and(|e| {
        e.code == ErrorCode::NotFound
            || (e.code == ErrorCode::ConfigError && e.message.ends_with(&format!("machine '{name}' not found")))
    })
}

fn failure(command: String, status: i32, stderr: &str) -> CliError {
    if let Some(error) = parse_error_line(stderr) {
        return CliError::Engine { command, status, error };
    }
    let text = stderr
        .lines()
        .filter(|line| !line.starts_with(PACKED_ASSETS_NOTE))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned();
    if status == USAGE_EXIT {
        CliError::Usage { command, message: text }
    } else {
        CliError::Failed {
            command,
            status,
            stderr: text,
        }
    }
}

/// The last stderr line that starts with `{"error"` and parses as smolvm's error object.
pub fn parse_error_line(stderr: &str) -> Option<EngineError> {
    #[derive(Deserialize)]
    struct Line {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        code: String,
        message: String,
    }
    stderr
        .lines()
        .rev()
        .map(str::trim)
        .filter(|line| line.starts_with("{\"error\""))
        .find_map(|line| serde_json::from_str::<Line>(line).ok())
        .map(|line| EngineError {
            code: ErrorCode::parse(&line.error.code),
            message: line.error.message,
        })
}

fn parse_json<T: serde::de::DeserializeOwned>(args: &[OsString], stdout: &str) -> Result<T, CliError> {
    serde_json::from_str(stdout).map_err(|err| CliError::Output {
        command: describe(args),
        reason: err.to_string(),
    })
}

fn os_args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// The subcommand for messages (global flags and environment are left out; no secret is ever an argument).
fn describe(args: &[OsString]) -> String {
    args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::sync::{Arc, Mutex};

    use bottle_policy::{Backend, BottleName};

    use super::super::plan::{self, InterceptorToken, MachineSpec};
    use super::*;
    use crate::engine::EngineSource;
    use crate::preflight::fake::{FakeHost, meta};
    use crate::preflight::{self, FileKind, Status};

    const NOTE: &str = "note: no packed assets found for 'smol-vmm' (looked for a 'smol-vmm.smolmachine' sidecar \
                        next to the executable); running as the plain smolvm CLI.";

    /// Records every invocation and answers from a script, in order.
    #[derive(Clone, Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<(Invocation, Duration)>>>,
        replies: Arc<Mutex<Vec<RunOutput>>>,
    }

    impl Runner for Recorder {
        fn run(&self, invocation: &Invocation, timeout: Duration) -> io::Result<RunOutput> {
            self.calls.lock().unwrap().push((invocation.clone(), timeout));
            let mut replies = self.replies.lock().unwrap();
            if replies.is_empty() {
                return Err(io::Error::other("no scripted reply"));
            }
            Ok(replies.remove(0))
        }
    }

    fn reply(exit: Exit, stdout: &str, stderr: &str) -> RunOutput {
        RunOutput {
            exit,
            stdout: stdout.into(),
            stderr: stderr.into(),
        }
    }

    fn engine(version: &str) -> Engine {
        Engine {
            path: "/opt/smol/smol-vmm".into(),
            version: version.into(),
            source: EngineSource::Pypi,
        }
    }

    fn smolvm(replies: Vec<RunOutput>) -> (Smolvm, Recorder) {
        let recorder = Recorder::default();
        *recorder.replies.lock().unwrap() = replies;
        let parent = [
            ("PATH", "/usr/bin:/bin"),
            ("HOME", "/root"),
            ("XDG_DATA_HOME", "/xdg"),
            ("SMOLVM_ALLOW_HOST_LOOPBACK", "1"),
            ("SMOLVM_EGRESS_FLOOR", "off"),
            ("SMOLVM_MACHINE_NAME", "other"),
            ("HTTPS_PROXY", "http://evil:1"),
            ("AWS_SECRET_ACCESS_KEY", "k"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let smolvm = Smolvm::with_runner(
            &engine("1.32.2"),
            Some(Path::new("/tmp/s1")),
            parent,
            Box::new(recorder.clone()),
        )
        .unwrap();
        (smolvm, recorder)
    }

    fn plan() -> MachinePlan {
        plan::plan(MachineSpec {
            bottle: BottleName::parse("demo").unwrap(),
            image: None,
            cpus: None,
            memory_mib: None,
            workspace: None,
            shares: Vec::new(),
            interceptor: SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 7), 3128),
            token: InterceptorToken::from_bytes([0xcd; 32]).unwrap(),
        })
        .unwrap()
    }

    fn name() -> MachineName {
        MachineName::parse("bb-demo").unwrap()
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    fn env_map(invocation: &Invocation) -> BTreeMap<String, String> {
        invocation
            .env
            .iter()
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
            .collect()
    }

    #[test]
    fn every_run_gets_global_flags_and_a_scrubbed_env() {
        let (smolvm, recorder) = smolvm(vec![reply(Exit::Code(0), "[]", NOTE)]);
        assert_eq!(smolvm.list().unwrap(), []);
        let calls = recorder.calls.lock().unwrap();
        let (invocation, timeout) = &calls[0];
        assert_eq!(invocation.program, Path::new("/opt/smol/smol-vmm"));
        assert_eq!(
            strings(&invocation.args),
            [
                "--state-dir",
                "/tmp/s1",
                "--error-format",
                "json",
                "machine",
                "ls",
                "--json"
            ]
        );
        assert_eq!(
            env_map(invocation),
            BTreeMap::from([
                ("HOME".into(), "/root".into()),
                ("NO_COLOR".into(), "1".into()),
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("XDG_DATA_HOME".into(), "/xdg".into()),
            ])
        );
        assert_eq!(*timeout, Timeouts::default().query);
    }

    #[test]
    fn the_token_goes_only_to_start_and_only_in_the_environment() {
        let (smolvm, recorder) = smolvm(vec![reply(Exit::Code(0), "", ""), reply(Exit::Code(0), "", "")]);
        let plan = plan();
        smolvm.create(&plan).unwrap();
        smolvm.start(&plan).unwrap();
        let calls = recorder.calls.lock().unwrap();
        let token = "cd".repeat(32);
        let (create, _) = &calls[0];
        assert!(!env_map(create).contains_key("SMOLVM_INTERCEPTOR_TOKEN"));
        assert_eq!(strings(&create.args[4..]), strings(plan.create_args()));
        let (start, timeout) = &calls[1];
        assert_eq!(env_map(start)["SMOLVM_INTERCEPTOR_TOKEN"], token);
        assert!(strings(&start.args).iter().all(|a| !a.contains(&token)));
        assert!(!format!("{start:?}").contains(&token));
        assert_eq!(
            strings(&start.args[4..]),
            [
                "machine",
                "start",
                "--name",
                "bb-demo",
                "--egress-interceptor",
                "127.0.0.7:3128"
            ]
        );
        assert_eq!(*timeout, Timeouts::default().start);
    }

    #[test]
    fn json_error_lines_become_engine_errors() {
        let stderr = format!(
            "{NOTE}\nStarting machine 'bb-demo'...\n{}\n",
            r#"{"error":{"code":"CONFIG_ERROR","message":"machine 'bb-demo' already exists or is being created"}}"#
        );
        let (smolvm, _) = smolvm(vec![reply(Exit::Code(1), "", &stderr)]);
        let err = smolvm.create(&plan()).unwrap_err();
        assert_eq!(
            err.engine_error(),
            Some(&EngineError {
                code: ErrorCode::ConfigError,
                message: "machine 'bb-demo' already exists or is being created".into()
            })
        );
        assert_eq!(
            parse_error_line(r#"{"error":{"code":"WHAT","message":"m"}}"#)
                .unwrap()
                .code,
            ErrorCode::Unrecognised("WHAT".into())
        );
        assert_eq!(parse_error_line("{\"error\": broken"), None);
    }

    #[test]
    fn clap_errors_stay_text_and_the_note_is_dropped() {
        let stderr = format!("{NOTE}\nerror: unexpected argument '--bogus' found\n\nUsage: smolvm machine create\n");
        let (smolvm, _) = smolvm(vec![
            reply(Exit::Code(2), "", &stderr),
            reply(Exit::Code(1), "", &format!("{NOTE}\nError: boom\n")),
        ]);
        match smolvm.create(&plan()).unwrap_err() {
            CliError::Usage { message, .. } => assert_eq!(
                message,
                "error: unexpected argument '--bogus' found\n\nUsage: smolvm machine create"
            ),
            other => panic!("{other:?}"),
        }
        match smolvm.list().unwrap_err() {
            CliError::Failed { status, stderr, .. } => assert_eq!((status, stderr.as_str()), (1, "Error: boom")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn not_found_is_absent_for_status_and_delete() {
        let not_found = r#"{"error":{"code":"NOT_FOUND","message":"vm not found: bb-demo"}}"#;
        let status_quirk =
            r#"{"error":{"code":"CONFIG_ERROR","message":"machine status: machine 'bb-demo' not found"}}"#;
        let (smolvm, _) = smolvm(vec![
            reply(Exit::Code(1), "", status_quirk),
            reply(Exit::Code(1), "", not_found),
            reply(Exit::Code(0), "Deleted machine: bb-demo\n", ""),
            reply(
                Exit::Code(1),
                "",
                r#"{"error":{"code":"CONFIG_ERROR","message":"other"}}"#,
            ),
        ]);
        assert_eq!(smolvm.status(&name()).unwrap(), None);
        assert_eq!(smolvm.delete(&name()).unwrap(), Deleted::Absent);
        assert_eq!(smolvm.delete(&name()).unwrap(), Deleted::Removed);
        assert!(smolvm.status(&name()).is_err());
    }

    #[test]
    fn status_and_ls_parse_the_engine_json() {
        let entry = r#"{"name":"bb-demo","state":"created","network":true,"pid":null,"mounts":0,
            "labels":{"owner":"bot-bottle","bottle":"demo"},"allowed_cidrs":["100.96.0.1/32"],
            "allowed_hosts":["=no-dns.invalid"],"memory_mib":8192}"#;
        let other = r#"{"name":"x","state":"stopped","labels":{}}"#;
        let (smolvm, _) = smolvm(vec![
            reply(Exit::Code(0), entry, NOTE),
            reply(Exit::Code(0), &format!("[{entry},{other}]"), ""),
            reply(Exit::Code(0), "not json", ""),
        ]);
        let info = smolvm.status(&name()).unwrap().unwrap();
        assert_eq!(info.state, "created");
        assert!(info.is_ours() && info.network);
        assert_eq!(info.allowed_cidrs.as_deref(), Some(&["100.96.0.1/32".to_owned()][..]));
        let ours = smolvm.list_ours().unwrap();
        assert_eq!(ours.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["bb-demo"]);
        assert!(matches!(smolvm.list(), Err(CliError::Output { .. })));
    }

    #[test]
    fn start_failures_are_classified_with_the_preflight_remedies() {
        let kvm = r#"{"error":{"code":"SMOLVM_ERROR","message":"agent operation failed: start machine: kvm not available: KVM not available. Ensure KVM kernel module is loaded.\nTry: sudo modprobe kvm"}}"#;
        let perm = r#"{"error":{"code":"SMOLVM_ERROR","message":"agent operation failed: start machine: kvm permission denied: Cannot access /dev/kvm (permission denied)."}}"#;
        let libs = r#"{"error":{"code":"SMOLVM_ERROR","message":"agent operation failed: start machine: agent operation failed: monitor agent: Error: agent operation failed: find libraries: libkrun/libkrunfw not found. Install smolvm with bundled libraries or set SMOLVM_LIB_DIR."}}"#;
        // As 1.32.2 prints it on a nested-KVM host (measured on this project's machines).
        let hang = r#"{"error":{"code":"SMOLVM_ERROR","message":"agent operation failed: start machine: agent operation failed: wait for ready: agent did not become ready within 30 seconds: no boot progress for 30 seconds"}}"#;
        let other = r#"{"error":{"code":"SMOLVM_ERROR","message":"agent did not become ready within 30 seconds"}}"#;
        let (smolvm, _) = smolvm(vec![
            reply(Exit::Code(1), "", kvm),
            reply(Exit::Code(1), "", perm),
            reply(Exit::Code(1), "", libs),
            reply(Exit::Code(1), "", hang),
            reply(Exit::Code(1), "", other),
            reply(Exit::TimedOut, "", ""),
        ]);
        let plan = plan();
        let kvm = smolvm.start(&plan).unwrap_err();
        assert!(matches!(kvm, StartError::KvmNotAvailable { .. }), "{kvm:?}");
        assert_eq!(kvm.remedy(), Some(KVM_NOT_AVAILABLE_REMEDY));
        let perm = smolvm.start(&plan).unwrap_err();
        assert!(matches!(perm, StartError::KvmPermissionDenied { .. }), "{perm:?}");
        assert_eq!(perm.remedy(), Some(KVM_PERMISSION_REMEDY));
        let libs = smolvm.start(&plan).unwrap_err();
        assert!(
            matches!(libs, StartError::EngineLibrariesUnreachable { .. }),
            "{libs:?}"
        );
        let hang = smolvm.start(&plan).unwrap_err();
        assert!(matches!(hang, StartError::GuestNeverBooted { .. }), "{hang:?}");
        assert_eq!(hang.remedy(), Some(GUEST_NO_BOOT_REMEDY));
        assert!(matches!(
            smolvm.start(&plan),
            Err(StartError::Cli(CliError::Engine { .. }))
        ));
        assert!(matches!(
            smolvm.start(&plan),
            Err(StartError::Cli(CliError::TimedOut { .. }))
        ));
    }

    fn preflight_remedy(host: &FakeHost) -> String {
        let report = preflight::report(Backend::Smolmachines, host);
        match &report.check("/dev/kvm").unwrap().status {
            Status::Missing { remedy, .. } => remedy.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn remedies_are_the_ones_doctor_prints() {
        let mut host = FakeHost::healthy();
        host.files.remove(Path::new("/dev/kvm"));
        assert_eq!(preflight_remedy(&host), KVM_NOT_AVAILABLE_REMEDY);
        let mut host = FakeHost::healthy();
        host.file("/dev/kvm", meta(FileKind::CharDevice, 0o660, 0, 0));
        host.kvm.open = Err(libc::EACCES);
        assert_eq!(preflight_remedy(&host), KVM_PERMISSION_REMEDY);
        let group_remedy = |host: &FakeHost| match &preflight::report(Backend::Smolmachines, host)
            .check("kvm group")
            .unwrap()
            .status
        {
            Status::Missing { remedy, .. } => remedy.clone(),
            other => panic!("{other:?}"),
        };
        let mut host = FakeHost::healthy();
        host.groups.clear();
        assert_eq!(group_remedy(&host), KVM_GROUP_REMEDY);
        let mut host = FakeHost::healthy();
        host.file("/dev/kvm", meta(FileKind::CharDevice, 0o600, 0, 0));
        assert_eq!(group_remedy(&host), KVM_OWNER_REMEDY);
    }

    #[test]
    fn a_vm_uid_denied_kvm_gets_the_kvm_group_remedies() {
        // Seen with a fake libkrun on a root host whose /dev/kvm is 0600 root:root (research/smolvm-harness).
        let message = "agent operation failed: start machine: agent operation failed: monitor agent: Error: agent \
                       operation failed: start vm: krun_start_enter returned: -1 (KVM inaccessible to the VM process \
                       after privilege drop — kvm permission denied: Cannot access /dev/kvm (permission denied).";
        let err = || CliError::Engine {
            command: "machine start".into(),
            status: 1,
            error: EngineError {
                code: ErrorCode::SmolvmError,
                message: message.into(),
            },
        };
        let no_group = classify_start(&name(), err(), || false);
        assert!(
            matches!(no_group, StartError::KvmDeniedAfterPrivilegeDrop { .. }),
            "{no_group:?}"
        );
        assert_eq!(no_group.remedy(), Some(KVM_GROUP_REMEDY));
        assert_eq!(classify_start(&name(), err(), || true).remedy(), Some(KVM_OWNER_REMEDY));
        let asked = std::cell::Cell::new(false);
        let kvm = CliError::Engine {
            command: "machine start".into(),
            status: 1,
            error: EngineError {
                code: ErrorCode::SmolvmError,
                message: "kvm not available: KVM not available.".into(),
            },
        };
        classify_start(&name(), kvm, || asked.replace(true));
        assert!(!asked.get(), "the group is looked up only when it decides the remedy");
    }

    #[test]
    fn unverified_engines_and_relative_state_dirs_are_refused() {
        let runner = || Box::new(Recorder::default());
        let err = Smolvm::with_runner(&engine("9.9.9"), None, [], runner()).unwrap_err();
        assert!(matches!(err, CliError::UnverifiedEngine { ref version, .. } if version == "9.9.9"));
        let home = [(OsString::from("HOME"), OsString::from("/root"))];
        let err = Smolvm::with_runner(&engine("1.32.2"), Some(Path::new("rel")), home.clone(), runner()).unwrap_err();
        assert!(matches!(err, CliError::DbPath(DbPathError::RelativeStateDir { .. })));
        let smolvm = Smolvm::with_runner(&engine("1.32.2"), None, home, runner()).unwrap();
        assert_eq!(
            smolvm.db_path().unwrap(),
            Path::new("/root/.local/share/smolvm/server/smolvm.db")
        );
        assert_eq!(strings(&smolvm.invocation(&[], &[]).args), ["--error-format", "json"]);
    }
}
