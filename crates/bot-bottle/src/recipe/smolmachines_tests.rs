//! The smolmachines recipe after its preflight step, called directly (unit level: there is no way to skip the
//! preflight from the CLI). Two engines:
//! - the REAL smolvm 1.32.2: on this project's hosts `machine start` fails before any boot (no kvm group, libkrun
//!   unreachable for the per-VM uid), which shows the start error stated plainly and that nothing is left behind;
//! - `tests/fixtures/fake_smolvm_boots.sh`, a FAKE engine whose machines "boot", for the steps after the start
//!   (readiness, init, the agent, teardown): no guest can boot here (nested KVM hangs guests). It hands create, delete,
//!   ls and status to the real engine, so the database the recipe verifies is still smolvm's own; without a real
//!   engine those tests skip.
//!
//! Skips say why; `BOTTLE_TEST_REQUIRE=smolmachines` turns them into failures.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bottle_policy::{Overrides, Policy, Source};
use bottle_sandbox::engine::{Engine, EngineSource};
use bottle_sandbox::lease::Registry;
use bottle_sandbox::smolmachines::cli::ProcessRunner;
use bottle_sandbox::smolmachines::{StartError, Timeouts};
use bottle_sandbox::state::{BottleState, STATE_FILE, URLS_FILE};
use tempfile::TempDir;

use super::*;
use crate::exit;
use bottle_proxy::CA_KEY_FILE;
use bottle_sandbox::engine::{self};
use bottle_sandbox::ready::WaitError;
use bottle_sandbox::smolmachines::backend::{
    AGENT_FILE, SMOLVM_STATE_DIR, Smolmachines, StepError, Tuning, exec_with, guest_can_reach, probe_args, smolvm_for,
};
use bottle_sandbox::smolmachines::plan::MACHINE_PREFIX;
use bottle_sandbox::smolmachines::{CliError, DbError, MachineName, Smolvm};
use std::time::Instant;

const INTERCEPTOR_KEY: &str = "interceptor";
const PROXY_KEY: &str = "proxy";

/// The smolmachines backend on `engine`, with test bounds.
fn backend(engine: &Engine, tuning: Tuning) -> Smolmachines {
    Smolmachines {
        engine: Some(engine.clone()),
        tuning,
    }
}

const COMPONENT: &str = "smolmachines";
const FAKE_ENGINE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake_smolvm_boots.sh");

/// Skips with a reason, unless `BOTTLE_TEST_REQUIRE` names smolmachines, in which case the skip is a failure.
fn skip(why: &str) {
    bottle_test_support::require::skip(COMPONENT, why);
}

fn real_engine() -> Option<Engine> {
    match engine::discover_verified(&RealHost) {
        Ok(engine) => Some(engine),
        Err(err) => {
            skip(&format!("no verified smolvm engine is installed: {err}"));
            None
        }
    }
}

fn fake_engine() -> Engine {
    Engine {
        path: FAKE_ENGINE.into(),
        version: "1.32.2".into(),
        source: EngineSource::Env,
    }
}

/// A short scratch state root (smolvm's sockets live under it) and a workspace the per-VM uid may read.
struct Scene {
    _dir: TempDir,
    root: PathBuf,
    workspace: PathBuf,
}

impl Scene {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("bb").tempdir_in("/tmp").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let root = dir.path().join("s");
        let workspace = dir.path().join("w");
        fs::create_dir(&workspace).unwrap();
        fs::set_permissions(&workspace, fs::Permissions::from_mode(0o755)).unwrap();
        // A tool directory the policy mounts (#14), readable by the per-VM uid like the workspace.
        fs::create_dir(dir.path().join("tools")).unwrap();
        fs::set_permissions(dir.path().join("tools"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir_all(root.join(SMOLVM_STATE_DIR)).unwrap();
        Self {
            _dir: dir,
            root,
            workspace,
        }
    }

    fn smolvm_state(&self) -> PathBuf {
        self.root.join(SMOLVM_STATE_DIR)
    }

    /// The real engine on the recipe's smolvm state directory.
    fn real(&self, engine: &Engine) -> Smolvm {
        Smolvm::with_runner(
            engine,
            Some(&self.smolvm_state()),
            std::env::vars_os(),
            Box::new(ProcessRunner),
        )
        .unwrap()
    }

    fn request(&self, name: &str, command: &[&str]) -> Request {
        let toml = format!(
            r#"
[bottle]
name = "{name}"
backend = "smolmachines"
workspace = "{}"
[bottle.env]
FOO = "bar"

[[mount]]
source = "{}/../tools"
target = "/opt/tools"

[network]
allow = ["upstream.test:*"]
allow_cidr = ["127.0.0.1/32"]
[network.resolve]
"upstream.test" = "127.0.0.1"
"#,
            self.workspace.display(),
            self.workspace.display()
        );
        let policy: Policy = bottle_policy::from_str(
            &Source {
                text: &toml,
                path: None,
            },
            &Overrides::default(),
        )
        .unwrap_or_else(|e| panic!("test policy: {e}"));
        Request {
            policy,
            command: command.iter().map(|s| s.to_string()).collect(),
            upstream_ca: Vec::new(),
            detached: true,
            remove: false,
        }
    }

    fn state_of(&self, bottle: &str) -> BottleState {
        serde_json::from_slice(&fs::read(self.root.join(bottle).join(STATE_FILE)).unwrap()).unwrap()
    }

    fn file(&self, bottle: &str, name: &str) -> String {
        fs::read_to_string(self.root.join(bottle).join(name)).unwrap_or_default()
    }

    /// Nothing of a finished bottle is left: no `bb-` machine but `keep`, no lease, nothing listening.
    fn assert_nothing_left(&self, engine: &Engine, bottle: &str, keep: &[&str]) {
        let machines: BTreeSet<String> = self.real(engine).list().unwrap().into_iter().map(|m| m.name).collect();
        let ours: Vec<&String> = machines
            .iter()
            .filter(|m| m.starts_with(MACHINE_PREFIX) && !keep.contains(&m.as_str()))
            .collect();
        assert!(ours.is_empty(), "machines left behind: {ours:?}");
        assert_eq!(Registry::new(&self.root).list().unwrap(), []);
        let urls: serde_json::Value = serde_json::from_str(&self.file(bottle, URLS_FILE)).unwrap();
        let interceptor: std::net::SocketAddr = urls[INTERCEPTOR_KEY].as_str().unwrap().parse().unwrap();
        #[allow(clippy::disallowed_methods)] // a literal address, nothing to resolve
        let dialled = std::net::TcpStream::connect_timeout(&interceptor, Duration::from_secs(2));
        assert!(dialled.is_err(), "the proxy still listens on {interceptor}");
        assert!(!self.root.join(bottle).join(CA_KEY_FILE).exists());
    }
}

fn tuning(ready: Duration) -> Tuning {
    Tuning {
        ready_timeout: ready,
        timeouts: Timeouts {
            start: Duration::from_secs(90),
            ..Timeouts::default()
        },
    }
}

/// The smolmachines backend's typed step error in an error chain.
fn step_error(err: &anyhow::Error) -> &StepError {
    err.chain()
        .find_map(|c| {
            c.downcast_ref::<BackendError>()
                .and_then(|b| b.downcast_ref::<StepError>())
        })
        .unwrap_or_else(|| panic!("no step error in: {err:#}"))
}

/// What the fake engine was asked, one argv per invocation.
fn fake_calls(scene: &Scene) -> Vec<Vec<String>> {
    let log = fs::read(scene.smolvm_state().join("fake-smolvm.log")).unwrap_or_default();
    log.split(|&b| b == 0x1e)
        .filter(|call| !call.is_empty())
        .map(|call| {
            call.split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .collect()
}

fn configure_fake(scene: &Scene, real: &Engine, settings: &str) {
    let env = format!("REAL_SMOLVM='{}'\n{settings}\n", real.path.display());
    fs::write(scene.smolvm_state().join("fake-smolvm.env"), env).unwrap();
}

/// A plain HTTP/1.1 upstream answering `200 ok` to everything.
fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    port
}

#[test]
fn real_engine_start_fails_plainly_after_create_and_verify_and_nothing_is_left() {
    let Some(engine) = real_engine() else { return };
    let scene = Scene::new();
    let req = scene.request("realstart", &["true"]);
    let result = launch(req, &backend(&engine, tuning(Duration::from_secs(60))), &scene.root);
    let state = scene.state_of("realstart");
    match &result {
        // A host where KVM works: the machine booted and `true` ran in it.
        Ok(exit) => {
            assert_eq!(exit.code, 0);
            assert_eq!(state.status, Status::Exited);
        }
        Err(err) => {
            eprintln!("the recipe on this host: {err:#}");
            // A nested-KVM guest that smolvm reported up but never answers an exec.
            if let StepError::Ready { source, .. } = step_error(err)
                && matches!(**source, WaitError::Timeout { .. })
            {
                scene.assert_nothing_left(&engine, "realstart", &[]);
                return;
            }
            let StepError::Start { machine, source } = step_error(err) else {
                panic!("expected the start step to fail, got: {err:#}");
            };
            assert_eq!(machine.as_str(), "bb-realstart");
            match &**source {
                StartError::EngineLibrariesUnreachable { remedy, .. }
                | StartError::KvmNotAvailable { remedy, .. }
                | StartError::KvmPermissionDenied { remedy, .. }
                | StartError::KvmDeniedAfterPrivilegeDrop { remedy, .. }
                | StartError::GuestNeverBooted { remedy, .. } => {
                    assert!(format!("{err:#}").contains(remedy), "the remedy is not in: {err:#}");
                    assert_eq!(exit::classify(err), exit::PREFLIGHT);
                }
                // A nested-KVM host where the guest hangs: smolvm's own 30 s wait, or ours.
                StartError::Cli(CliError::TimedOut { .. }) => {}
                StartError::Cli(CliError::Engine { error, .. }) if error.message.contains("ready") => {}
                other => panic!("unclassified start failure: {other}"),
            }
            assert_eq!(state.status, Status::Failed);
            assert!(
                state.error.as_deref().unwrap_or_default().contains("step start"),
                "{state:?}"
            );
        }
    }
    scene.assert_nothing_left(&engine, "realstart", &[]);
}

#[test]
fn fake_engine_boot_path_polls_until_ready_inits_runs_the_agent_and_tears_down() {
    let Some(real) = real_engine() else { return };
    let scene = Scene::new();
    let port = upstream();
    configure_fake(
        &scene,
        &real,
        &format!("NOT_READY_PROBES=3\nPROBE_URLS='http://upstream.test:{port}/ok http://denied.test/'"),
    );
    // Machines already there: a bottle that is gone, a live bottle's, and one that is not bot-bottle's.
    let smolvm = scene.real(&real);
    let create = |name: &str, labels: &[&str]| {
        let mut args: Vec<OsString> = ["machine", "create", "--name", name].map(OsString::from).to_vec();
        for label in labels {
            args.extend(["--label".into(), OsString::from(label)]);
        }
        smolvm.invoke(&args, &[], Duration::from_secs(60)).unwrap();
    };
    create("bb-gone", &["owner=bot-bottle", "bottle=gone"]);
    create("bb-alive", &["owner=bot-bottle", "bottle=alive"]);
    create("other", &[]);
    let alive = StateDir::create(&scene.root, "alive").unwrap();
    alive
        .write(
            &state::starting(
                &BottleName::parse("alive").unwrap(),
                backend::Kind::Smolmachines,
                std::net::Ipv4Addr::new(127, 0, 0, 200),
                true,
            )
            .unwrap(),
        )
        .unwrap();

    let agent = r#"echo "proxy=$HTTPS_PROXY ca=$SSL_CERT_FILE foo=$FOO"; exit 7"#;
    let req = scene.request("boots", &["/bin/sh", "-c", agent]);
    let code = launch(
        req,
        &backend(&fake_engine(), tuning(Duration::from_secs(30))),
        &scene.root,
    )
    .unwrap()
    .code;

    // The agent's exit code passes through, with the proxy settings and the policy's env.
    assert_eq!(code, 7);
    let state = scene.state_of("boots");
    assert_eq!((state.status, state.exit_code), (Status::Exited, Some(7)));
    let urls: serde_json::Value = serde_json::from_str(&scene.file("boots", URLS_FILE)).unwrap();
    let interceptor = urls[INTERCEPTOR_KEY].as_str().unwrap().to_owned();
    let guest_url = format!("http://100.96.0.1:{}", interceptor.rsplit(':').next().unwrap());
    assert_eq!(urls[PROXY_KEY], guest_url.as_str());
    assert_eq!(state.proxy_url.as_deref(), Some(guest_url.as_str()));
    assert_eq!(
        scene.file("boots", state::AGENT_LOG),
        format!("proxy={guest_url} ca=/etc/bot-bottle/ca-bundle.pem foo=bar\n")
    );

    // The engine was asked exactly this, in order.
    let calls = fake_calls(&scene);
    let verbs: Vec<String> = calls.iter().map(|c| c[..2].join(" ")).collect();
    let mut want = vec!["machine create", "machine start"];
    want.extend(["machine exec"; 4 + 1 + 1]); // 3 refused probes + the ready one, init, agent
    want.extend(["machine delete", "machine ls", "machine delete"]);
    assert_eq!(verbs, want, "{calls:#?}");
    assert_eq!(
        calls[1][2..],
        ["--name", "bb-boots", "--egress-interceptor", interceptor.as_str()]
    );
    // The policy's mount is a read-only shared folder after the workspace (#14).
    let tools = scene.workspace.parent().unwrap().join("tools").canonicalize().unwrap();
    let workspace = scene.workspace.canonicalize().unwrap();
    let volumes: Vec<&String> = calls[0].iter().filter(|a| a.starts_with("--volume=")).collect();
    assert_eq!(
        volumes,
        [
            &format!("--volume={}:/workspace", workspace.display()),
            &format!("--volume={}:/opt/tools:ro", tools.display()),
        ],
        "{:?}",
        calls[0]
    );
    for probe in &calls[2..6] {
        assert_eq!(
            probe[..],
            probe_args(&MachineName::parse("bb-boots").unwrap())
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()[..]
        );
    }
    let init = &calls[6];
    assert!(init.windows(2).any(|w| w == ["--user", "0"]), "{init:?}");
    let ca = scene.file("boots", "ca.pem");
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(
        fs::read_to_string(scene.smolvm_state().join("fake-guest-ca.pem"))
            .unwrap()
            .trim(),
        ca.trim()
    );
    let agent_call = &calls[7];
    assert!(agent_call.windows(2).any(|w| w == ["--workdir", "/workspace"]));
    assert!(agent_call.windows(2).any(|w| w == ["-e", "FOO=bar"]));
    assert!(agent_call.ends_with(&["--".into(), "/bin/sh".into(), "-c".into(), agent.into()]));
    assert_eq!(calls[8][2..], ["--name", "bb-boots", "-f"]);
    assert_eq!(calls[10][2..], ["--name", "bb-gone", "-f"]);

    // The relay the fake played with the token it was started with: the guest's proxy URL is the policed proxy.
    let relay = fs::read_to_string(scene.smolvm_state().join("fake-smolvm.relay")).unwrap();
    assert_eq!(
        relay,
        format!(
            "http://upstream.test:{port}/ok reply=00 status=HTTP/1.1 200 OK\n\
             http://denied.test/ reply=00 status=HTTP/1.1 403 Forbidden\n"
        )
    );
    let audit = scene.file("boots", state::AUDIT_FILE);
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"host\":\"denied.test\"") && l.contains("\"decision\":\"deny\""))
    );

    // Teardown: our machine and the gone bottle's are deleted; the live bottle's and the foreign one stay.
    scene.assert_nothing_left(&real, "boots", &["bb-alive"]);
    let names: BTreeSet<String> = scene.real(&real).list().unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(names, BTreeSet::from(["bb-alive".to_owned(), "other".to_owned()]));
}

#[test]
fn fake_engine_a_guest_that_never_gets_ready_times_out_loudly_and_is_removed() {
    let Some(real) = real_engine() else { return };
    let scene = Scene::new();
    configure_fake(&scene, &real, "NOT_READY_PROBES=100000");
    let req = scene.request("neverready", &["true"]);
    let err = launch(
        req,
        &backend(&fake_engine(), tuning(Duration::from_millis(800))),
        &scene.root,
    )
    .unwrap_err();
    let StepError::Ready { source, .. } = step_error(&err) else {
        panic!("{err:#}")
    };
    assert!(matches!(**source, WaitError::Timeout { .. }), "{source}");
    assert_eq!(exit::classify(&err), exit::SANDBOX);
    assert!(format!("{err:#}").contains("waiting for the guest agent"), "{err:#}");
    let verbs: Vec<String> = fake_calls(&scene).iter().map(|c| c[..2].join(" ")).collect();
    assert_eq!(verbs.last().map(String::as_str), Some("machine ls"));
    assert!(verbs.contains(&"machine delete".to_owned()));
    assert_eq!(scene.state_of("neverready").status, Status::Failed);
    scene.assert_nothing_left(&real, "neverready", &[]);
}

#[test]
fn fake_engine_a_row_with_an_unknown_field_is_refused_before_any_start() {
    let Some(real) = real_engine() else { return };
    // The fake alters the row with the sqlite3 CLI.
    if std::process::Command::new("sqlite3").arg("-version").output().is_err() {
        return skip("the sqlite3 CLI is not installed (`apt-get install sqlite3`)");
    }
    let scene = Scene::new();
    let sql = r#"UPDATE vms SET data = CAST(json_set(CAST(data AS TEXT), '$.surprise', json('true')) AS BLOB)"#;
    configure_fake(
        &scene,
        &real,
        &format!("AFTER_CREATE_SQL='{}'", sql.replace('\'', r"'\''")),
    );
    let req = scene.request("badrow", &["true"]);
    let err = launch(
        req,
        &backend(&fake_engine(), tuning(Duration::from_secs(5))),
        &scene.root,
    )
    .unwrap_err();
    let StepError::Db { step, source, .. } = step_error(&err) else {
        panic!("{err:#}")
    };
    assert_eq!(*step, "verify/patch");
    let message = format!("{err:#}");
    let db = scene.smolvm_state().join(".local/share/smolvm/server/smolvm.db");
    assert!(
        message.contains(&db.display().to_string()) && message.contains("`surprise`"),
        "{message}"
    );
    assert!(matches!(**source, DbError::UnknownField { .. }));
    let verbs: Vec<String> = fake_calls(&scene).iter().map(|c| c[..2].join(" ")).collect();
    assert_eq!(verbs, ["machine create", "machine delete", "machine ls"]);
    scene.assert_nothing_left(&real, "badrow", &[]);
}

#[test]
fn the_workspace_must_be_reachable_by_others_when_the_engine_runs_as_root() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    fs::create_dir(&ws).unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(&ws, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(guest_can_reach(&ws, false).is_ok());
    let err = guest_can_reach(&ws, true).unwrap_err();
    assert!(
        matches!(&err, StepError::WorkspaceAccess { path, need: "x", .. } if path == dir.path()),
        "{err}"
    );
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    fs::set_permissions(&ws, fs::Permissions::from_mode(0o700)).unwrap();
    let err = guest_can_reach(&ws, true).unwrap_err();
    assert!(
        matches!(&err, StepError::WorkspaceAccess { path, need: "rx", .. } if path == &ws),
        "{err}"
    );
    fs::set_permissions(&ws, fs::Permissions::from_mode(0o755)).unwrap();
    assert!(guest_can_reach(&ws, true).is_ok());
}

#[test]
fn a_state_root_too_long_for_smolvm_sockets_is_refused() {
    let long = Path::new("/tmp").join("d".repeat(60));
    let err = smolvm_for(&fake_engine(), &long, Timeouts::default()).unwrap_err();
    assert!(matches!(err, StepError::StatePathTooLong { .. }), "{err}");
    assert!(!long.exists());
}

#[test]
fn fake_engine_exec_runs_in_the_machine_with_the_agents_environment() {
    let Some(real) = real_engine() else { return };
    let scene = Scene::new();
    configure_fake(&scene, &real, "");
    // The agent waits for `stop` (the fake engine runs it on the host, in the workspace path given here).
    let stop = scene.workspace.join("stop");
    let agent = format!("while [ ! -e '{}' ]; do sleep 0.05; done", stop.display());
    let req = scene.request("execd", &["/bin/sh", "-c", &agent]);
    let (root, engine) = (scene.root.clone(), fake_engine());
    let launched = std::thread::spawn(move || launch(req, &backend(&engine, tuning(Duration::from_secs(30))), &root));
    let dir = StateDir {
        path: scene.root.join("execd"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(dir.file(STATE_FILE).exists() && scene.state_of("execd").status == Status::Running) {
        assert!(Instant::now() < deadline, "the bottle never ran");
        assert!(!launched.is_finished(), "the launch ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let record = dir.file(AGENT_FILE);
    assert_eq!(fs::metadata(&record).unwrap().permissions().mode() & 0o777, 0o600);

    let out = scene.workspace.join("exec.out");
    let command = format!("echo \"$HTTPS_PROXY $FOO\" > '{}'; exit 5", out.display());
    let code = exec_with(
        &dir,
        &scene.root,
        &fake_engine(),
        Timeouts::default(),
        &["/bin/sh".into(), "-c".into(), command],
        &|_| {},
    )
    .unwrap();
    assert_eq!(code, 5);
    let proxy = scene.state_of("execd").proxy_url.unwrap();
    assert_eq!(fs::read_to_string(&out).unwrap(), format!("{proxy} bar\n"));
    let exec_call = fake_calls(&scene).into_iter().last().unwrap();
    assert_eq!(exec_call[..4], ["machine", "exec", "--name", "bb-execd"]);
    assert!(exec_call.windows(2).any(|w| w == ["--workdir", "/workspace"]));

    fs::write(&stop, "").unwrap();
    assert_eq!(launched.join().unwrap().unwrap().code, 0);
    // The record (it may hold pass_env values) goes with the bottle; an exec after that fails and says why.
    assert!(!record.exists());
    let err = exec_with(
        &dir,
        &scene.root,
        &fake_engine(),
        Timeouts::default(),
        &["true".into()],
        &|_| {},
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("not running"), "{err:#}");
    scene.assert_nothing_left(&real, "execd", &[]);
}
