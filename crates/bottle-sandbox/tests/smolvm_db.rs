//! The smolmachines pre-boot half against the REAL smolvm 1.32.2 CLI and its REAL state database, each test in its
//! own short scratch `--state-dir`. Nested KVM hangs guests on the development hosts, so nothing here boots: starts
//! are driven into smolvm's own KVM checks inside private mount namespaces (root only), or into whatever this host's
//! start does, bounded by a timeout. A `fake_smolvm` script stands in only where the real engine cannot do the job
//! (an unverified version, a hang). Skips say why; `BOTTLE_TEST_REQUIRE=smolmachines` turns them into failures.

#![allow(clippy::unwrap_used)]

use std::ffi::OsString;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use bottle_policy::BottleName;
use bottle_sandbox::engine::{self, ENGINE_ENV, Engine, EngineError, EngineSource};
use bottle_sandbox::preflight::{
    CommandOutput, FileMeta, Host, KernelCall, KvmProbe, NamespaceProbe, RealHost, SeccompSupport, Unshare,
};
use bottle_sandbox::smolmachines::cli::{ENGINE_LIBRARIES_REMEDY, KVM_NOT_AVAILABLE_REMEDY, KVM_PERMISSION_REMEDY};
use bottle_sandbox::smolmachines::{
    CliError, DbError, Deleted, ErrorCode, InterceptorToken, MachinePlan, MachineSpec, Smolvm, StartError, Timeouts,
    WorkspaceMount, db, plan, verify, verify_or_patch,
};
use rusqlite::Connection;
use tempfile::TempDir;

mod common;
use bottle_test_support::engine::script;
use common::{engine_without_kvm, os, skip};

/// The interceptor address the plans use; nothing listens there, no guest ever boots.
const INTERCEPTOR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 9), 3128);

fn real_engine() -> Option<Engine> {
    match engine::discover_verified(&RealHost) {
        Ok(engine) => Some(engine),
        Err(err) => {
            skip(&format!("no verified smolvm engine is installed: {err}"));
            None
        }
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A short scratch directory (sockets live under the state dir: sockaddr_un is 108 bytes) and an engine using it.
struct Scratch {
    dir: TempDir,
    smolvm: Smolvm,
    db: PathBuf,
}

impl Scratch {
    fn new(engine: &Engine) -> Self {
        let dir = tempfile::Builder::new().prefix("sv").tempdir_in("/tmp").unwrap();
        let state = dir.path().join("s");
        fs::create_dir(&state).unwrap();
        let smolvm = Smolvm::new(engine, Some(&state)).unwrap();
        let db = smolvm.db_path().unwrap();
        Self { dir, smolvm, db }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("s")
    }

    /// Our plan for bottle `t1`, with a canonical read-only workspace, a kept home and a read-only tool directory.
    fn plan(&self) -> MachinePlan {
        let ws = self.dir.path().join("ws");
        fs::create_dir_all(&ws).unwrap();
        let (home, tools) = (self.dir.path().join("home"), self.dir.path().join("tools"));
        fs::create_dir_all(&home).unwrap();
        fs::create_dir_all(&tools).unwrap();
        plan(MachineSpec {
            bottle: BottleName::parse("t1").unwrap(),
            image: None,
            cpus: Some(1),
            memory_mib: Some(512),
            workspace: Some(WorkspaceMount {
                host: ws.canonicalize().unwrap(),
                guest: "/workspace".into(),
                read_only: true,
            }),
            shares: vec![
                WorkspaceMount {
                    host: home.canonicalize().unwrap(),
                    guest: "/home/agent".into(),
                    read_only: false,
                },
                WorkspaceMount {
                    host: tools.canonicalize().unwrap(),
                    guest: "/home/agent/.cargo".into(),
                    read_only: true,
                },
            ],
            interceptor: INTERCEPTOR,
            token: InterceptorToken::random().unwrap(),
        })
        .unwrap()
    }

    /// `plan()`, created by the real engine and brought to a verified row.
    fn created(&self) -> MachinePlan {
        let plan = self.plan();
        self.smolvm.create(&plan).unwrap();
        verify_or_patch(&self.db, plan.expected()).unwrap();
        plan
    }

    fn sql(&self, statement: &str) {
        let conn = Connection::open(&self.db).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(conn.execute(statement, []).unwrap(), 1, "{statement}");
    }

    fn column(&self, select: &str) -> String {
        let conn = Connection::open(&self.db).unwrap();
        conn.query_row(select, [], |row| row.get(0)).unwrap()
    }
}

fn set_field(field: &str, json: &str) -> String {
    format!(
        "UPDATE vms SET data = CAST(json_set(CAST(data AS TEXT), '$.{field}', json('{json}')) AS BLOB) \
         WHERE name = 'bb-t1'"
    )
}

fn remove_field(field: &str) -> String {
    format!("UPDATE vms SET data = CAST(json_remove(CAST(data AS TEXT), '$.{field}') AS BLOB) WHERE name = 'bb-t1'")
}

/// Processes (other than this one) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|e| e.file_name().to_string_lossy() != me)
        .filter_map(|e| {
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            text.contains(needle)
                .then(|| format!("{} {text}", e.file_name().to_string_lossy()))
        })
        .collect()
}

fn assert_no_process_left(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_mentioning(needle);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "processes left behind: {left:#?}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// A stand-in engine for what the real one cannot be made to do here.
fn fake_smolvm(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("fake_smolvm");
    script(&path, body);
    path
}

#[test]
fn our_plan_creates_a_row_that_verifies_once_the_interceptor_is_required() {
    let Some(engine) = real_engine() else { return };
    let s = Scratch::new(&engine);
    let plan = s.plan();
    s.smolvm.create(&plan).unwrap();

    let listed = s.smolvm.list_ours().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "bb-t1");
    assert_eq!(
        listed[0].allowed_cidrs.as_deref(),
        Some(&["100.96.0.1/32".to_owned()][..])
    );
    assert_eq!(
        listed[0].allowed_hosts.as_deref(),
        Some(&["=no-dns.invalid".to_owned()][..])
    );
    assert_eq!(s.smolvm.status(plan.name()).unwrap().unwrap().state, "created");

    // smolvm records the interceptor requirement only at the first start: everything else already matches.
    let err = verify(&s.db, plan.expected()).unwrap_err();
    assert_eq!(err.mismatched_fields(), ["external_interceptor_required"], "{err}");
    assert!(err.to_string().contains(&s.db.display().to_string()), "{err}");
    let patched = verify_or_patch(&s.db, plan.expected()).unwrap();
    assert_eq!(patched.patched, ["external_interceptor_required"]);
    assert_eq!(patched.state, "created");
    assert!(verify(&s.db, plan.expected()).unwrap().patched.is_empty());
    assert_eq!(s.column("SELECT typeof(data) FROM vms WHERE name = 'bb-t1'"), "blob");

    // The real engine honours the patched flag: a start without the interceptor is refused before anything boots.
    let plain = os(&["machine", "start", "--name", "bb-t1"]);
    let err = s.smolvm.invoke(&plain, &[], Duration::from_secs(30)).unwrap_err();
    let engine_error = err.engine_error().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(engine_error.code, ErrorCode::ConfigError);
    assert!(
        engine_error
            .message
            .contains("requires an external interceptor on every start"),
        "{engine_error}"
    );
    // … and still lists the patched row.
    assert_eq!(s.smolvm.list().unwrap().len(), 1);

    assert_eq!(s.smolvm.delete(plan.name()).unwrap(), Deleted::Removed);
    assert_eq!(s.smolvm.delete(plan.name()).unwrap(), Deleted::Absent);
    assert_eq!(s.smolvm.status(plan.name()).unwrap(), None);
    assert!(matches!(
        verify(&s.db, plan.expected()),
        Err(DbError::RowMissing { .. })
    ));
}

#[test]
fn a_widened_row_is_refused_naming_each_field_then_restored() {
    let Some(engine) = real_engine() else { return };
    let s = Scratch::new(&engine);
    let plan = s.created();

    s.sql(&set_field("allowed_cidrs", r#"["0.0.0.0/0"]"#));
    s.sql(&remove_field("external_interceptor_required"));
    s.sql(&set_field(
        "egress_rules",
        r#"[{"transport":"tcp","cidr":"0.0.0.0/0","ports":{"start":1,"end":65535},"action":"allow"}]"#,
    ));
    s.sql(&set_field("mounts", r#"[["/","/host",false]]"#));
    // The engine itself takes the tampered row at face value.
    let listed = s.smolvm.list().unwrap();
    assert_eq!(listed[0].allowed_cidrs.as_deref(), Some(&["0.0.0.0/0".to_owned()][..]));

    let err = verify(&s.db, plan.expected()).unwrap_err();
    let fields = [
        "external_interceptor_required",
        "allowed_cidrs",
        "egress_rules",
        "mounts",
    ];
    assert_eq!(err.mismatched_fields(), fields, "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&s.db.display().to_string()) && text.contains("`allowed_cidrs` is [\"0.0.0.0/0\"]"),
        "{text}"
    );

    let verified = verify_or_patch(&s.db, plan.expected()).unwrap();
    assert_eq!(verified.patched, fields);
    verify(&s.db, plan.expected()).unwrap();
    assert_eq!(s.column("SELECT typeof(data) FROM vms WHERE name = 'bb-t1'"), "blob");
    let listed = s.smolvm.list().unwrap();
    assert_eq!(
        listed[0].allowed_cidrs.as_deref(),
        Some(&["100.96.0.1/32".to_owned()][..])
    );
}

/// #14: the kept home and the user's mounts are shared folders smolvm records as planned (the home writable, a tool
/// directory read-only); a share made writable behind our back is refused like any widened field.
#[test]
fn the_kept_home_and_mounts_are_recorded_as_planned_and_a_widened_share_is_refused() {
    let Some(engine) = real_engine() else { return };
    let s = Scratch::new(&engine);
    let plan = s.created();
    let mounts: serde_json::Value = serde_json::from_str(
        &s.column("SELECT json_extract(CAST(data AS TEXT), '$.mounts') FROM vms WHERE name = 'bb-t1'"),
    )
    .unwrap();
    let dir = s.dir.path().canonicalize().unwrap();
    let at = |p: &str| dir.join(p).display().to_string();
    assert_eq!(
        mounts,
        serde_json::json!([
            [at("ws"), "/workspace", true],
            [at("home"), "/home/agent", false],
            [at("tools"), "/home/agent/.cargo", true],
        ])
    );
    let widened = serde_json::json!([
        [at("ws"), "/workspace", true],
        [at("home"), "/home/agent", false],
        [at("tools"), "/home/agent/.cargo", false],
    ]);
    s.sql(&set_field("mounts", &widened.to_string()));
    let err = verify(&s.db, plan.expected()).unwrap_err();
    assert_eq!(err.mismatched_fields(), ["mounts"], "{err}");
}

#[test]
fn a_missing_database_is_refused_and_not_created() {
    let Some(engine) = real_engine() else { return };
    let s = Scratch::new(&engine);
    let plan = s.plan();
    for result in [verify(&s.db, plan.expected()), verify_or_patch(&s.db, plan.expected())] {
        match result {
            Err(DbError::Missing { path }) => assert_eq!(path, s.db),
            other => panic!("{other:?}"),
        }
    }
    assert!(!s.db.exists());
    assert_eq!(
        s.db,
        s.state().join(".local/share/smolvm/server/smolvm.db"),
        "the path smolvm uses for --state-dir (research/smolvm.md §1.1)"
    );
}

#[test]
fn a_missing_row_is_refused() {
    let Some(engine) = real_engine() else { return };
    let s = Scratch::new(&engine);
    assert_eq!(s.smolvm.list().unwrap(), []);
    assert!(s.db.is_file(), "smolvm creates its database on every command");
    let plan = s.plan();
    for result in [verify(&s.db, plan.expected()), verify_or_patch(&s.db, plan.expected())] {
        match result {
            Err(DbError::RowMissing { path, machine }) => assert_eq!((path, machine.as_str()), (s.db.clone(), "bb-t1")),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_text_row_is_refused_and_left_alone_as_the_engine_cannot_read_it() {
    let Some(engine) = real_engine() else { return };
    let s = Scratch::new(&engine);
    let plan = s.created();
    s.sql("UPDATE vms SET data = CAST(data AS TEXT) WHERE name = 'bb-t1'");
    for result in [verify(&s.db, plan.expected()), verify_or_patch(&s.db, plan.expected())] {
        match result {
            Err(DbError::NotBlob { found, .. }) => assert_eq!(found, "text"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(s.column("SELECT typeof(data) FROM vms WHERE name = 'bb-t1'"), "text");
    let err = s.smolvm.list().unwrap_err();
    let engine_error = err.engine_error().unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(engine_error.code, ErrorCode::SmolvmError);
    assert!(
        engine_error.message.contains("Invalid column type Text"),
        "{engine_error}"
    );
}

#[test]
fn rows_that_are_not_json_objects_or_carry_unknown_fields_are_refused() {
    let Some(engine) = real_engine() else { return };
    let s = Scratch::new(&engine);
    let plan = s.created();
    let original = s.column("SELECT CAST(data AS TEXT) FROM vms WHERE name = 'bb-t1'");

    s.sql("UPDATE vms SET data = CAST('[1, 2]' AS BLOB) WHERE name = 'bb-t1'");
    assert!(matches!(verify(&s.db, plan.expected()), Err(DbError::NotJson { .. })));
    s.sql("UPDATE vms SET data = CAST('{not json' AS BLOB) WHERE name = 'bb-t1'");
    assert!(matches!(
        verify_or_patch(&s.db, plan.expected()),
        Err(DbError::NotJson { .. })
    ));

    s.sql(&format!(
        "UPDATE vms SET data = CAST(json_set('{}', '$.egress_escape_hatch', json('true')) AS BLOB) WHERE name = 'bb-t1'",
        original.replace('\'', "''")
    ));
    for result in [verify(&s.db, plan.expected()), verify_or_patch(&s.db, plan.expected())] {
        match result {
            Err(DbError::UnknownField { field, path, .. }) => {
                assert_eq!((field.as_str(), path), ("egress_escape_hatch", s.db.clone()))
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Answers like `RealHost`, except that `$BOT_BOTTLE_SMOLVM` points at `engine` (no `set_var` in tests).
struct EngineEnvHost {
    engine: PathBuf,
}

impl Host for EngineEnvHost {
    fn metadata(&self, path: &Path) -> io::Result<FileMeta> {
        RealHost.metadata(path)
    }
    fn can_write(&self, path: &Path) -> io::Result<()> {
        RealHost.can_write(path)
    }
    fn open_kvm(&self, path: &Path) -> io::Result<KvmProbe> {
        RealHost.open_kvm(path)
    }
    fn euid(&self) -> u32 {
        RealHost.euid()
    }
    fn group_gid(&self, name: &str) -> io::Result<Option<u32>> {
        RealHost.group_gid(name)
    }
    fn env(&self, key: &str) -> Option<OsString> {
        if key == ENGINE_ENV {
            return Some(self.engine.clone().into());
        }
        RealHost.env(key)
    }
    fn which(&self, program: &str) -> Option<PathBuf> {
        RealHost.which(program)
    }
    fn run(&self, program: &Path, args: &[&str], timeout: Duration) -> io::Result<CommandOutput> {
        RealHost.run(program, args, timeout)
    }
    fn try_unshare(&self, probe: NamespaceProbe) -> io::Result<Unshare> {
        RealHost.try_unshare(probe)
    }
    fn landlock_abi(&self) -> io::Result<u32> {
        RealHost.landlock_abi()
    }
    fn seccomp(&self) -> io::Result<SeccompSupport> {
        RealHost.seccomp()
    }
    fn kernel_call(&self, call: KernelCall) -> io::Result<()> {
        RealHost.kernel_call(call)
    }
    fn cpu_hypervisor_flag(&self) -> io::Result<bool> {
        RealHost.cpu_hypervisor_flag()
    }
    fn sysctl(&self, name: &str) -> io::Result<String> {
        RealHost.sysctl(name)
    }
    fn unix_exchange(&self, path: &Path, request: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
        RealHost.unix_exchange(path, request, timeout)
    }
}

#[test]
fn an_unverified_engine_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fake_smolvm(dir.path(), "echo 'smolvm 9.9.9'");
    let host = EngineEnvHost { engine: fake.clone() };
    match engine::discover_verified(&host) {
        Err(EngineError::Unverified { path, version }) => assert_eq!((path, version.as_str()), (fake, "9.9.9")),
        other => panic!("{other:?}"),
    }
    // Even an `Engine` obtained without the check cannot be used to run anything.
    let engine = engine::discover(&host).unwrap();
    match Smolvm::new(&engine, None) {
        Err(CliError::UnverifiedEngine { version, .. }) => assert_eq!(version, "9.9.9"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_hanging_engine_times_out_and_leaves_no_process_behind() {
    let dir = tempfile::Builder::new().prefix("svh").tempdir_in("/tmp").unwrap();
    // The real engine cannot be made to hang deterministically here; this fake leaves a grandchild running too.
    let fake = fake_smolvm(dir.path(), "sleep 60 &\nexec sleep 60");
    let engine = Engine {
        path: fake.clone(),
        version: "1.32.2".into(),
        source: EngineSource::Env,
    };
    let timeouts = Timeouts {
        query: Duration::from_millis(500),
        ..Timeouts::default()
    };
    let smolvm = Smolvm::new(&engine, Some(&dir.path().join("s")))
        .unwrap()
        .with_timeouts(timeouts);
    let started = Instant::now();
    match smolvm.list() {
        Err(CliError::TimedOut { after, .. }) => assert_eq!(after, Duration::from_millis(500)),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // `sleep` keeps no trace of the script path; the state dir is in the leader's argv only, so check both.
    assert_no_process_left(&fake.display().to_string());
    assert_no_process_left(&dir.path().display().to_string());
}

/// Root and util-linux are needed to give smolvm a private /dev (research/smolvm-harness/nokvm.sh, kvmperm.sh).
fn can_fake_devices() -> bool {
    if !is_root() {
        skip("private mount namespaces with a doctored /dev need root");
        return false;
    }
    for tool in ["unshare", "setpriv", "mount"] {
        if RealHost.which(tool).is_none() {
            skip(&format!("`{tool}` is not on PATH"));
            return false;
        }
    }
    true
}

#[test]
fn start_without_kvm_is_classified_with_the_preflight_remedy() {
    let Some(real) = real_engine() else { return };
    if !can_fake_devices() {
        return;
    }
    let s = Scratch::new(&real);
    let plan = s.created();
    let nokvm = Smolvm::new(&engine_without_kvm(&real, s.dir.path()), Some(&s.state())).unwrap();
    match nokvm.start(&plan) {
        Err(err @ StartError::KvmNotAvailable { .. }) => {
            assert_eq!(err.remedy(), Some(KVM_NOT_AVAILABLE_REMEDY));
            assert!(err.to_string().contains("bb-t1"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    // The failed start changed nothing that matters.
    assert_eq!(verify(&s.db, plan.expected()).unwrap().state, "created");
    assert_no_process_left(&s.state().display().to_string());
}

#[test]
fn start_without_kvm_permission_is_classified_with_the_preflight_remedy() {
    let Some(real) = real_engine() else { return };
    if !can_fake_devices() {
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        skip("there is no /dev/kvm to bind a 0660 copy over");
        return;
    }
    let Some(engine_dir) = real.path.parent() else {
        panic!("engine path {} has no directory", real.path.display())
    };
    let engine_name = real.path.file_name().unwrap().to_string_lossy().into_owned();
    let dir = tempfile::Builder::new().prefix("svp").tempdir_in("/tmp").unwrap();
    let root = dir.path();
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
    let state = root.join("s");
    let mount = root.join("eng");
    let kvm = root.join("kvm");
    for d in [&state, &mount, &kvm] {
        fs::create_dir(d).unwrap();
    }
    rustix::fs::chown(
        &state,
        Some(rustix::process::Uid::from_raw(65534)),
        Some(rustix::process::Gid::from_raw(65534)),
    )
    .unwrap();
    // uid 65534 runs the engine through a bind mount (the real one may sit under a 0700 home) against a fresh
    // 0660 root-owned /dev/kvm it cannot open (research/smolvm-harness/kvmperm.sh).
    let inner = root.join("kvmperm.sh");
    script(
        &inner,
        &format!(
            "mount --bind {engine_dir} {mount}\nmount -t tmpfs tmpfs {kvm}\nmknod -m 660 {kvm}/kvm c 10 232\n\
             mount --bind {kvm}/kvm /dev/kvm\n\
             exec setpriv --reuid=65534 --regid=65534 --clear-groups {mount}/{engine_name} \"$@\"",
            engine_dir = engine_dir.display(),
            mount = mount.display(),
            kvm = kvm.display(),
        ),
    );
    let outer = root.join("smolvm-kvmperm");
    script(&outer, &format!("exec unshare -m {} \"$@\"", inner.display()));
    let engine = Engine {
        path: outer,
        ..real.clone()
    };
    let smolvm = Smolvm::new(&engine, Some(&state)).unwrap();
    let db = smolvm.db_path().unwrap();
    let plan = plan(MachineSpec {
        bottle: BottleName::parse("p1").unwrap(),
        image: None,
        cpus: Some(1),
        memory_mib: Some(512),
        workspace: None,
        shares: Vec::new(),
        interceptor: INTERCEPTOR,
        token: InterceptorToken::random().unwrap(),
    })
    .unwrap();
    smolvm.create(&plan).unwrap();
    verify_or_patch(&db, plan.expected()).unwrap();
    match smolvm.start(&plan) {
        Err(err @ StartError::KvmPermissionDenied { .. }) => {
            assert_eq!(err.remedy(), Some(KVM_PERMISSION_REMEDY))
        }
        other => panic!("{other:?}"),
    }
    verify(&db, plan.expected()).unwrap();
    assert_no_process_left(&state.display().to_string());
}

#[test]
fn a_real_start_on_this_host_fails_classified_or_times_out_cleanly() {
    let Some(engine) = real_engine() else { return };
    let s = Scratch::new(&engine);
    let plan = s.created();
    // smolvm waits up to 30 s for the guest agent; a nested-KVM guest never answers.
    let timeouts = Timeouts {
        start: Duration::from_secs(60),
        ..Timeouts::default()
    };
    let smolvm = Smolvm::new(&engine, Some(&s.state())).unwrap().with_timeouts(timeouts);
    let result = smolvm.start(&plan);
    eprintln!("machine start on this host: {result:?}");
    match &result {
        // A host with working KVM: the guest is up; take it down again.
        Ok(()) => {
            let stop = os(&["machine", "stop", "--name", "bb-t1"]);
            smolvm.invoke(&stop, &[], Duration::from_secs(60)).unwrap();
        }
        // Root with the engine under a 0700 home (this project's hosts): the per-VM uid cannot load libkrun.
        Err(err @ StartError::EngineLibrariesUnreachable { .. }) => {
            assert_eq!(err.remedy(), Some(ENGINE_LIBRARIES_REMEDY))
        }
        Err(
            StartError::KvmNotAvailable { .. }
            | StartError::KvmPermissionDenied { .. }
            | StartError::KvmDeniedAfterPrivilegeDrop { .. },
        ) => {}
        Err(StartError::Cli(CliError::TimedOut { .. })) => {}
        // The nested-KVM hang as smolvm itself reports it.
        Err(StartError::Cli(CliError::Engine { error, .. })) if error.message.contains("ready") => {}
        Err(other) => panic!("unclassified start failure: {other}"),
    }
    assert_eq!(smolvm.delete(plan.name()).unwrap(), Deleted::Removed);
    assert_no_process_left(&s.state().display().to_string());
}

#[test]
fn the_database_path_matches_what_smolvm_creates_without_a_state_dir() {
    let Some(engine) = real_engine() else { return };
    // A private HOME stands in for the user's: smolvm follows HOME (and XDG_DATA_HOME) when no --state-dir is given.
    let home = tempfile::Builder::new().prefix("svH").tempdir_in("/tmp").unwrap();
    let xdg = home.path().join("xdg");
    for env in [
        vec![("HOME", home.path().as_os_str().to_owned())],
        vec![
            ("HOME", home.path().as_os_str().to_owned()),
            ("XDG_DATA_HOME", xdg.clone().into_os_string()),
        ],
    ] {
        let mut parent: Vec<(OsString, OsString)> = env.into_iter().map(|(k, v)| (k.into(), v)).collect();
        parent.extend(std::env::var_os("PATH").map(|p| ("PATH".into(), p)));
        let smolvm = Smolvm::with_runner(
            &engine,
            None,
            parent,
            Box::new(bottle_sandbox::smolmachines::cli::ProcessRunner),
        )
        .unwrap();
        let db = smolvm.db_path().unwrap();
        assert!(!db.exists());
        assert_eq!(smolvm.list().unwrap(), []);
        assert!(db.is_file(), "smolvm did not create {}", db.display());
    }
    assert!(db::db_path(None, &[]).is_err());
}
