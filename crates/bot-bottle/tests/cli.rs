//! The `bot-bottle` binary as a user drives it: real processes, real files, documented exit codes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use predicates::prelude::*;

const POLICY: i32 = 121;
const UNAVAILABLE: i32 = 120;
const USAGE: i32 = 2;
const TARGET: i32 = 119;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The binary with a private state home and working directory, so that no test sees another's state.
fn bb(dir: &Path) -> Command {
    let mut cmd = Command::cargo_bin("bot-bottle").unwrap();
    cmd.current_dir(dir)
        .env("XDG_STATE_HOME", dir.join("state"))
        .env("XDG_DATA_HOME", dir.join("data"))
        .env_remove("BOT_BOTTLE_LOG");
    cmd
}

fn examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

fn bad_fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("crates/bottle-policy/tests/fixtures/bad"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn help_lists_every_verb() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bb(tmp.path())
        .arg("--help")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let help = String::from_utf8(out).unwrap();
    for verb in ["run", "ls", "exec", "logs", "stop", "rm", "doctor", "policy", "proxy"] {
        assert!(help.contains(&format!("  {verb} ")), "{verb} missing from:\n{help}");
    }
    assert!(
        help.contains("121 invalid policy"),
        "exit codes are documented in --help"
    );
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    bb(tmp.path()).arg("frobnicate").assert().code(USAGE);
    bb(tmp.path())
        .args(["proxy", "--listen", "not-an-address", "--state-dir", "x"])
        .assert()
        .code(USAGE);
    bb(tmp.path()).args(["exec", "name"]).assert().code(USAGE);
}

#[test]
fn policy_check_accepts_every_shipped_example() {
    let tmp = tempfile::tempdir().unwrap();
    for example in examples() {
        bb(tmp.path())
            .args(["policy", "check"])
            .arg(&example)
            .assert()
            .success()
            .stdout(predicate::str::contains("ok. The effective policy:"))
            .stdout(predicate::str::contains("[network]"));
    }
}

#[test]
fn policy_check_expands_presets() {
    let tmp = tempfile::tempdir().unwrap();
    bb(tmp.path())
        .args(["policy", "check", "--agent", "claude"])
        .assert()
        .success()
        .stdout(predicate::str::contains("api.anthropic.com"))
        .stdout(predicate::str::contains("x-api-key"));
}

#[test]
fn policy_check_reads_bottle_toml_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("bottle.toml"),
        "[network]\nallow = [\"only-here.example.com\"]\n",
    )
    .unwrap();
    bb(tmp.path())
        .args(["policy", "check"])
        .assert()
        .success()
        .stdout(predicate::str::contains("only-here.example.com"));
}

#[test]
fn policy_check_rejects_every_bad_fixture_pointing_at_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = bad_fixtures();
    assert!(fixtures.len() >= 20);
    for bad in fixtures {
        let out = bb(tmp.path())
            .args(["policy", "check"])
            .arg(&bad)
            .assert()
            .code(POLICY)
            .get_output()
            .clone();
        let stderr = String::from_utf8(out.stderr).unwrap();
        let name = bad.file_name().unwrap().to_string_lossy().into_owned();
        assert!(stderr.starts_with("error: invalid policy: "), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("{name}:")),
            "{name}: no file:line:col in {stderr}"
        );
        assert!(stderr.contains(" | "), "{name}: no source line in {stderr}");
        assert!(stderr.contains('^'), "{name}: no caret in {stderr}");
        assert!(out.stdout.is_empty(), "{name}: printed a policy anyway");
    }
}

#[test]
fn policy_errors_as_json() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = repo().join("crates/bottle-policy/tests/fixtures/bad/wildcard-tld.toml");
    let out = bb(tmp.path())
        .args(["--json", "policy", "check"])
        .arg(&bad)
        .assert()
        .code(POLICY)
        .get_output()
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(v["error"]["kind"], "policy");
    assert_eq!(v["error"]["exit_code"], POLICY);
    assert!(
        v["error"]["where"]
            .as_str()
            .unwrap()
            .ends_with("wildcard-tld.toml:2:10")
    );
}

#[test]
fn bad_flags_are_policy_errors_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    bb(tmp.path())
        .args(["policy", "check", "--allow", "*.com"])
        .assert()
        .code(POLICY)
        .stderr(predicate::str::contains("--allow \"*.com\""));
}

#[test]
fn hostile_policy_files_get_one_error_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let huge = tmp.path().join("huge.toml");
    std::fs::write(&huge, vec![b'#'; 2 << 20]).unwrap();
    let binary = tmp.path().join("binary.toml");
    std::fs::write(&binary, [0x7f, b'E', b'L', b'F', 0, 0xff, 0xfe]).unwrap();
    let nested = tmp.path().join("nested.toml");
    std::fs::write(&nested, format!("x = {}{}", "[".repeat(50_000), "]".repeat(50_000))).unwrap();
    for (file, needle) in [
        (&huge, "the limit is"),
        (&binary, "binary"),
        (&nested, "nested.toml:1:"),
    ] {
        for verb in [
            &["policy", "check"][..],
            &["run", "--policy"][..],
            &["proxy", "--state-dir", "s", "--policy"][..],
        ] {
            bb(tmp.path())
                .args(verb)
                .arg(file)
                .assert()
                .code(POLICY)
                .stderr(predicate::str::contains(needle));
        }
    }
    let mut left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["binary.toml", "huge.toml", "nested.toml"],
        "a refused policy must leave no state behind"
    );
}

#[test]
fn lifecycle_verbs_on_unknown_bottles_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    for args in [
        &["exec", "b1", "--", "true"][..],
        &["logs", "b1"][..],
        &["stop", "b1"][..],
        &["rm", "b1"][..],
    ] {
        bb(tmp.path())
            .args(args)
            .assert()
            .code(TARGET)
            .stderr(predicate::str::contains("no bottle named `b1`"));
    }
    bb(tmp.path())
        .args(["logs", "../etc"])
        .assert()
        .code(USAGE)
        .stderr(predicate::str::contains("not valid"));
    bb(tmp.path())
        .arg("ls")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("NAME"));
}

#[test]
fn the_container_backend_without_an_image_says_how_to_name_one_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    bb(tmp.path())
        .args(["run", "--backend", "container", "--", "true"])
        .assert()
        .code(122)
        .stderr(predicate::str::contains(
            "needs an image: `--image NAME` or `[bottle] image`",
        ));
    assert!(!tmp.path().join("state").exists(), "a refused launch wrote state");
}

#[test]
fn selftest_on_a_backend_it_cannot_test_exits_120_saying_why_and_launches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    bb(tmp.path())
        .args(["selftest", "--backend", "smolmachines"])
        .assert()
        .code(UNAVAILABLE)
        .stdout(predicate::str::is_empty())
        .stderr(predicate::str::contains("not available yet").and(predicate::str::contains("inside a guest")));
    // The container backend's self-test runs the image the user names; without one, or with one elsewhere, it is a
    // usage error.
    for (args, why) in [
        (&["--backend", "container"][..], "needs --image NAME"),
        (&["--image", "x"][..], "--image is for `selftest --backend container`"),
    ] {
        bb(tmp.path())
            .arg("selftest")
            .args(args)
            .assert()
            .code(USAGE)
            .stdout(predicate::str::is_empty())
            .stderr(predicate::str::contains(why));
    }
    assert!(!tmp.path().join("state").exists(), "selftest wrote state");
}

#[test]
fn run_without_a_command_or_agent_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("w")).unwrap();
    bb(&tmp.path().join("w"))
        .env("HOME", tmp.path())
        .arg("run")
        .assert()
        .code(USAGE)
        .stderr(predicate::str::contains("no command to run"));
}

#[test]
fn doctor_reports_every_backend() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bb(tmp.path())
        .arg("doctor")
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let text = String::from_utf8(out).unwrap();
    for backend in ["namespace", "container", "smolmachines"] {
        assert!(
            text.lines().any(|l| l.starts_with(backend)),
            "{backend} missing:\n{text}"
        );
    }
    let out = bb(tmp.path())
        .args(["--json", "doctor"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let reports = v.as_array().unwrap();
    assert_eq!(reports.len(), 3);
    for r in reports {
        for c in r["checks"].as_array().unwrap() {
            let status = c["status"].as_str().unwrap();
            assert!(["ok", "degraded", "missing"].contains(&status), "{c}");
            if status == "missing" {
                assert!(!c["remedy"].as_str().unwrap().is_empty(), "missing without remedy: {c}");
            }
        }
    }
}

#[test]
fn doctor_for_one_backend_exits_122_exactly_when_it_cannot_run() {
    let tmp = tempfile::tempdir().unwrap();
    for backend in ["namespace", "container", "smolmachines"] {
        let out = bb(tmp.path())
            .args(["--json", "doctor", "--backend", backend])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let missing = v[0]["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["status"] == "missing");
        assert_eq!(out.status.code(), Some(if missing { 122 } else { 0 }), "{backend}: {v}");
    }
}

/// A state dir as a supervisor would leave it (the supervisor is this test process, so it reads as alive).
fn fake_state(tmp: &Path, name: &str, backend: &str, status: &str) {
    let dir = tmp.join("state/bot-bottle").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let start = start_time(std::process::id());
    let state = serde_json::json!({
        "name": name, "backend": backend, "addr": "127.0.0.9", "status": status,
        "supervisor_pid": std::process::id(), "supervisor_start": start, "init_pid": null,
        "started_at": 0, "exit_code": null, "error": null, "proxy_url": null, "detached": true,
    });
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
}

#[test]
fn exec_goes_by_the_bottles_backend_and_refuses_what_is_not_running() {
    let tmp = tempfile::tempdir().unwrap();
    fake_state(tmp.path(), "sm-done", "smolmachines", "exited");
    fake_state(tmp.path(), "sm-starting", "smolmachines", "starting");
    for name in ["sm-done", "sm-starting"] {
        bb(tmp.path())
            .args(["exec", name, "--", "true"])
            .assert()
            .code(TARGET)
            .stderr(predicate::str::contains("is not running"));
    }
    // A container bottle's `exec` goes through the engine: tests/container.rs.
}

#[test]
fn a_credential_file_the_bottle_could_read_is_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("token"), "real-secret\n").unwrap();
    std::os::unix::fs::symlink(work.join("token"), tmp.path().join("token-link")).unwrap();
    for from_file in ["token", "../token-link"] {
        std::fs::write(
            work.join("bottle.toml"),
            format!(
                "[network]\nallow = [\"api.test\"]\n[[credential]]\nhost = \"api.test\"\nheader = \"authorization\"\n\
                 from_file = \"{from_file}\"\nenv = \"API_TOKEN\"\n"
            ),
        )
        .unwrap();
        bb(tmp.path())
            .current_dir(&work)
            .args(["run", "--backend", "namespace", "--", "true"])
            .assert()
            .code(POLICY)
            .stderr(predicate::str::contains("inside the workspace"));
        assert!(!tmp.path().join("state").exists(), "a refused launch wrote state");
    }
}

#[test]
fn every_toml_block_in_the_readme_passes_policy_check() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .collect();
    assert!(!blocks.is_empty(), "README.md has no TOML block");
    let tmp = tempfile::tempdir().unwrap();
    for (i, block) in blocks.iter().enumerate() {
        let file = tmp.path().join(format!("readme-{i}.toml"));
        std::fs::write(&file, block).unwrap();
        bb(tmp.path()).args(["policy", "check"]).arg(&file).assert().success();
    }
}

/// Every row of README.md's exit-code table, produced by the verb it describes. 123 (the sandbox failed) needs a
/// sabotaged lab and is asserted by the escape suite's case 46; the agent's own code needs a real bottle (root).
#[test]
fn the_readme_exit_code_table_matches_what_each_verb_returns() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let table = readme.split("| code | meaning |").nth(1).unwrap();
    let documented: Vec<String> = table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.split('|').nth(1).unwrap().trim().to_string())
        .collect();
    let covered = ["0", "2", "119", "120", "121", "122", "123", "124", "125", "other"];
    assert_eq!(documented, covered, "README's table and this test disagree");

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let example = repo().join("examples/minimal.toml");
    let code = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = bb(dir);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.args(args).output().unwrap().status.code()
    };
    let check = |want: i32, got: Option<i32>, what: &str| assert_eq!(got, Some(want), "{what}");
    check(
        0,
        code(&["policy", "check", example.to_str().unwrap()], &[]),
        "policy check of an example",
    );
    check(2, code(&["--no-such-flag"], &[]), "an unknown flag");
    check(2, code(&["stop", "Not A Name"], &[]), "an invalid bottle name");
    std::fs::create_dir(dir.join("w")).unwrap();
    let w = dir.join("w");
    let mut run = bb(dir);
    run.current_dir(&w)
        .env("BOT_BOTTLE_POOL", "9-3")
        .args(["run", "--", "true"]);
    check(2, run.output().unwrap().status.code(), "a bad BOT_BOTTLE_POOL");
    check(119, code(&["stop", "nosuch"], &[]), "no bottle of that name");
    check(
        120,
        code(
            &[
                "run",
                "--backend",
                "smolmachines",
                "--home",
                "/nonexistent",
                "--",
                "true",
            ],
            &[],
        ),
        "a setting the backend does not do",
    );
    check(
        121,
        code(&["policy", "check", "--allow", "*.com"], &[]),
        "an over-broad allow",
    );
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let mut run = bb(dir);
    run.current_dir(&w)
        .args(["run", "--upstream-ca", junk.to_str().unwrap(), "--", "true"]);
    check(121, run.output().unwrap().status.code(), "a junk --upstream-ca");
    assert!(!dir.join("state").exists(), "a refused run wrote state");
    check(
        122,
        code(
            &["run", "--backend", "smolmachines", "--", "true"],
            &[("BOT_BOTTLE_SMOLVM", "/nonexistent/smolvm")],
        ),
        "smolmachines without its engine",
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = busy.local_addr().unwrap().to_string();
    let state = dir.join("proxy-state");
    check(
        124,
        code(
            &["proxy", "--listen", &listen, "--state-dir", state.to_str().unwrap()],
            &[],
        ),
        "a proxy whose port is taken",
    );
    let file = dir.join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    check(
        125,
        code(&["ls"], &[("XDG_STATE_HOME", file.to_str().unwrap())]),
        "a state home that is a file",
    );
}

#[test]
fn policy_check_takes_several_files_and_fails_if_any_is_invalid() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = bb(tmp.path());
    cmd.args(["policy", "check"]).args(examples());
    cmd.assert().success();
    let mut cmd = bb(tmp.path());
    cmd.args(["policy", "check"])
        .args(examples())
        .arg(bad_fixtures().first().unwrap());
    cmd.assert().code(POLICY).stdout(predicate::str::contains(": ok."));
}

#[test]
fn names_that_would_land_on_bot_bottles_own_entries_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["leases", "homes"] {
        bb(tmp.path())
            .args(["policy", "check", "--name", name])
            .assert()
            .code(POLICY)
            .stderr(predicate::str::contains("is reserved"));
    }
}

fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

/// #13: one damaged bottle never hides the others, and a running bottle whose state is damaged can still be
/// stopped and removed (through its lease, which names its supervisor by pid and start time).
#[test]
fn a_damaged_bottle_is_listed_as_such_and_rm_f_stops_it() {
    let tmp = tempfile::tempdir().unwrap();
    fake_state(tmp.path(), "healthy", "namespace", "exited");
    let mut supervisor = std::process::Command::new("sleep").arg("600").spawn().unwrap();
    let pid = supervisor.id();
    let root = tmp.path().join("state/bot-bottle");
    std::fs::create_dir_all(root.join("broken")).unwrap();
    std::fs::write(root.join("broken/state.json"), "{ damaged").unwrap();
    std::fs::create_dir_all(root.join("leases")).unwrap();
    let lease = serde_json::json!({"name": "broken", "addr": "127.0.0.77", "pid": pid, "pid_start": start_time(pid)});
    std::fs::write(root.join("leases/127.0.0.77.json"), lease.to_string()).unwrap();
    std::fs::write(root.join("leases/127.0.0.78.json"), "{ also damaged").unwrap();

    let out = bb(tmp.path()).arg("ls").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("healthy"), "{text}");
    assert!(text.contains("broken") && text.contains("damaged, running"), "{text}");
    assert!(
        text.contains("rm -f broken") && text.contains("127.0.0.78.json"),
        "{text}"
    );

    bb(tmp.path()).args(["rm", "-f", "broken"]).assert().success();
    let status = supervisor.wait().unwrap();
    assert!(!status.success(), "the supervisor was not stopped");
    assert!(!root.join("broken").exists());
    bb(tmp.path()).args(["rm", "-f", "broken"]).assert().code(TARGET);
}

/// #13: `stop` signalled whatever pid `state.json` named. A state naming a live process that the bottle's lease does
/// not name (with its real start time, so it looks alive) is refused, and the process lives on.
#[test]
fn stop_never_signals_a_process_that_is_not_a_bot_bottle_supervisor() {
    let tmp = tempfile::tempdir().unwrap();
    let mut victim = std::process::Command::new("sleep").arg("600").spawn().unwrap();
    let pid = victim.id();
    fake_state(tmp.path(), "planted", "namespace", "running");
    let path = tmp.path().join("state/bot-bottle/planted/state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    state["supervisor_pid"] = pid.into();
    state["supervisor_start"] = start_time(pid).into();
    std::fs::write(&path, state.to_string()).unwrap();
    bb(tmp.path())
        .args(["stop", "planted"])
        .assert()
        .code(TARGET)
        .stderr(predicate::str::contains("its lease does not"));
    assert!(victim.try_wait().unwrap().is_none(), "stop killed an unrelated process");
    victim.kill().unwrap();
    let _ = victim.wait();
}

/// #13: a `run --rm` whose launcher was killed left its directory behind for good; `ls` reaps it, as promised.
#[test]
fn a_killed_run_rm_leaves_nothing_once_ls_reaps_it() {
    let tmp = tempfile::tempdir().unwrap();
    fake_state(tmp.path(), "gone", "namespace", "running");
    fake_state(tmp.path(), "kept", "namespace", "running");
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    dead.wait().unwrap();
    for (name, remove) in [("gone", true), ("kept", false)] {
        let path = tmp.path().join(format!("state/bot-bottle/{name}/state.json"));
        let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        state["supervisor_pid"] = dead.id().into();
        state["supervisor_start"] = 1.into();
        state["remove"] = remove.into();
        std::fs::write(&path, state.to_string()).unwrap();
    }
    let out = bb(tmp.path()).arg("ls").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("gone") && text.contains("kept"), "{text}");
    assert!(
        !tmp.path().join("state/bot-bottle/gone").exists(),
        "the --rm bottle's directory is still there"
    );
    assert!(tmp.path().join("state/bot-bottle/kept").exists());
}

/// #13: while the audit log cannot be written, `ls` and `logs` say so (the proxy leaves the note beside the log).
#[test]
fn ls_and_logs_say_when_the_audit_log_is_failing() {
    let tmp = tempfile::tempdir().unwrap();
    fake_state(tmp.path(), "noisy", "namespace", "exited");
    let dir = tmp.path().join("state/bot-bottle/noisy");
    std::fs::write(dir.join("audit.jsonl"), "").unwrap();
    std::fs::write(dir.join("audit.failing"), "No space left on device (os error 28)\n").unwrap();
    bb(tmp.path())
        .arg("ls")
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "the audit log cannot be written (No space left on device",
        ));
    bb(tmp.path())
        .args(["logs", "noisy", "--egress"])
        .assert()
        .success()
        .stderr(predicate::str::contains("the audit log cannot be written"));
}

/// A written setting is enforced or refused: launched by root, a smolmachines guest cannot be given a kept home (its
/// per-VM uid could open it only if every local user could), so `--home DIR` is refused there rather than ignored.
#[test]
fn a_kept_home_the_backend_cannot_share_is_refused_not_ignored() {
    if !rustix::process::geteuid().is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("agent-home");
    bb(tmp.path())
        .args(["run", "--backend", "smolmachines", "--home"])
        .arg(&home)
        .args(["--", "true"])
        .assert()
        .code(UNAVAILABLE)
        .stderr(predicate::str::contains("when bot-bottle runs as root"));
    assert!(!tmp.path().join("state").exists());
    assert!(!home.exists());
}

/// A link planted where the audit log was is not followed by `ls` (a link to /dev/zero made it read forever).
#[test]
fn ls_never_reads_the_audit_log_through_a_planted_link() {
    let tmp = tempfile::tempdir().unwrap();
    fake_state(tmp.path(), "linked", "namespace", "exited");
    let dir = tmp.path().join("state/bot-bottle/linked");
    std::os::unix::fs::symlink("/dev/zero", dir.join("audit.jsonl")).unwrap();
    bb(tmp.path())
        .arg("ls")
        .timeout(std::time::Duration::from_secs(20))
        .assert()
        .success()
        .stdout(predicate::str::contains("linked"));
}

#[test]
fn a_standalone_proxy_in_ask_mode_without_a_reviewer_is_refused_as_a_policy_error() {
    let tmp = tempfile::tempdir().unwrap();
    bb(tmp.path())
        .args(["proxy", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(tmp.path().join("px"))
        .arg("--ask")
        .assert()
        .code(121)
        .stderr(predicate::str::contains("needs a reviewer in a standalone proxy"));
    assert!(!tmp.path().join("px").exists(), "a refused proxy created its state");
}

#[test]
fn an_image_on_the_namespace_backend_is_refused_not_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    bb(tmp.path())
        .args(["run", "--image", "debian:12", "--", "true"])
        .assert()
        .code(UNAVAILABLE)
        .stderr(predicate::str::contains(
            "is for the container and smolmachines backends",
        ));
    assert!(!tmp.path().join("state").exists(), "a refused launch wrote state");
}

#[test]
fn a_runtime_on_the_namespace_or_smolmachines_backend_is_refused_not_ignored() {
    for (backend, says) in [
        ("namespace", "a namespace bottle runs on this host's kernel"),
        ("smolmachines", "a smolmachines bottle is a microVM of its own"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        bb(tmp.path())
            .args(["run", "--backend", backend, "--runtime", "runsc", "--", "true"])
            .assert()
            .code(UNAVAILABLE)
            .stderr(predicate::str::contains(says));
        assert!(!tmp.path().join("state").exists(), "a refused launch wrote state");
    }
}

#[test]
fn a_runtime_name_that_is_no_name_is_a_policy_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("p.toml"), "[bottle]\nruntime = \"run sc\"\n").unwrap();
    bb(tmp.path())
        .args(["policy", "check", "p.toml"])
        .assert()
        .code(121)
        .stderr(predicate::str::contains("runtime `run sc` is not a runtime name"));
}
