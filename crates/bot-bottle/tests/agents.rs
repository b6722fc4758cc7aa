//! Real agents in real bottles (#14): the pinned Claude Code, Codex and Gemini CLIs from the npm registry and aider
//! from PyPI (installed by `.ci/run`), run with their presets against a FAKE model API (tests/fixtures/fake_model_api.py) that the proxy
//! reaches through `--resolve` and `--upstream-ca`, on a loopback address of its own at port 443. For each agent:
//! the non-interactive mode prints the fake's reply; the fake saw the real key and the bottle only the placeholder;
//! a second run in the same kept home continues the first. Hosts the proxy refused are printed. Needs root (port
//! 443) and the CLIs; `BOTTLE_TEST_REQUIRE=agents` makes a skip a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use bottle_test_support::bottles::{self, text};
use bottle_test_support::ca::TestCa;
use bottle_test_support::require;
use bottle_test_support::tui::Tui;

const BB: &str = env!("CARGO_BIN_EXE_bot-bottle");
const REAL_KEY: &str = "sk-real-key-of-the-host-7f3a9c";

fn skip_reason(cli: &str) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("the fake API listens on port 443, which needs root".into());
    }
    if !Command::new(cli)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Some(format!("`{cli}` is not installed (npm install -g, pinned in .ci/run)"));
    }
    bottles::namespace_unavailable(BB)
}

macro_rules! need_agent {
    ($cli:expr) => {
        if let Some(why) = skip_reason($cli) {
            require::skip("agents", &why);
            return;
        }
    };
}

/// The FAKE API on `addr`:443, for `host`.
struct FakeApi {
    child: Child,
    log: PathBuf,
}

impl FakeApi {
    fn start(dir: &Path, ca: &TestCa, hosts: &[&str], addr: &str, reply: &str) -> Self {
        let (cert, key) = ca.leaf_files(dir, hosts[0], hosts);
        let log = dir.join(format!("{}.requests.jsonl", hosts[0]));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_model_api.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--addr", addr, "--port", "443", "--reply", reply])
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg("--log")
            .arg(&log)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the fake API did not start");
        Self { child, log }
    }

    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Scene {
    dir: tempfile::TempDir,
    ca: TestCa,
    /// Launch as this uid (`setpriv`) instead of root; the scene is then theirs.
    user: Option<u32>,
    /// Run the bottles on the container backend with this image instead of the namespace backend.
    image: Option<String>,
    /// `--mount` arguments for every bottle.
    mounts: Vec<String>,
}

impl Scene {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["work", "state", "pki"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let ca = TestCa::mint(&dir.path().join("pki"), "upstream-ca", "bot-bottle agents test CA");
        Self {
            dir,
            ca,
            user: None,
            image: None,
            mounts: Vec::new(),
        }
    }

    /// A scene whose bottles are containers of `image`; the workspace is `nobody`'s (a root launcher's container
    /// bottle runs as the workspace's owner).
    fn in_container(image: String) -> Self {
        let mut s = Self::new();
        std::os::unix::fs::chown(s.path("work"), Some(65534), Some(65534)).unwrap();
        s.image = Some(image);
        s
    }

    /// A scene whose files belong to `uid`, who launches its bottles.
    fn of_user(uid: u32) -> Self {
        let mut s = Self::new();
        let mut stack = vec![s.dir.path().to_path_buf()];
        while let Some(p) = stack.pop() {
            std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
            }
        }
        s.user = Some(uid);
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `bot-bottle run --agent AGENT` with the fake at `addr` standing in for `host`, `key_var` set to the real key.
    fn run(&self, agent: &str, host: &str, addr: &str, key_var: &str, command: &[&str]) -> Output {
        let mut cmd = self.command(agent, &[host], addr, key_var);
        cmd.args(["--rm", "--"]).args(command).stdin(Stdio::null());
        bottle_test_support::child::output_within(&mut cmd, Duration::from_secs(90))
    }

    /// `bot-bottle run --agent AGENT` with the fake at `addr` standing in for `hosts`, before `--` and the command.
    fn command(&self, agent: &str, hosts: &[&str], addr: &str, key_var: &str) -> Command {
        let mut cmd = bottles::launcher(BB, self.user);
        cmd.args(["run", "--agent", agent]);
        if let Some(image) = &self.image {
            cmd.args(["--backend", "container", "--image", image]);
        }
        for m in &self.mounts {
            cmd.args(["--mount", m]);
        }
        for host in hosts {
            cmd.args(["--resolve", &format!("{host}={addr}")]);
        }
        cmd.args(["--allow-cidr", &format!("{addr}/32")])
            .arg("--upstream-ca")
            .arg(&self.ca.cert_path)
            .current_dir(self.path("work"))
            .env("XDG_STATE_HOME", self.path("state"))
            .env("HOME", self.dir.path())
            .env(key_var, REAL_KEY)
            .env_remove("BOT_BOTTLE_LOG");
        cmd
    }

    /// Inside a bottle of `agent`'s preset, `var` holds a placeholder, never the real key; and no file of the kept
    /// homes holds the real key.
    fn holds_only_the_placeholder(&self, agent: &str, host: &str, addr: &str, var: &str) {
        let echo = format!("echo \"${var}\"");
        let env = self.run(agent, host, addr, var, &["sh", "-c", &echo]);
        assert!(env.status.success(), "{}", text(&env));
        let inside = String::from_utf8_lossy(&env.stdout);
        assert!(
            !inside.trim().is_empty() && !inside.contains(REAL_KEY),
            "{}",
            text(&env)
        );
        assert_eq!(self.homes_holding_the_key(), Vec::<PathBuf>::new());
    }

    /// Every file of the kept homes (on the host) that holds the real key.
    fn homes_holding_the_key(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![self.path("state/bot-bottle/homes")];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if std::fs::read(&p).is_ok_and(|b| b.windows(REAL_KEY.len()).any(|w| w == REAL_KEY.as_bytes())) {
                    found.push(p);
                }
            }
        }
        found
    }
}

/// What the run said on stderr: a run with refusals ends with their summary (host, rule, the flag that would
/// allow it), printed in the test output.
fn print_refused(agent: &str, out: &Output) {
    eprintln!(
        "{agent}: the run's stderr (refusals, if any):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn claude_code_answers_from_the_fake_api_with_the_real_key_and_continues_in_its_kept_home() {
    need_agent!("claude");
    // As root (a mapped bottle) and as an unprivileged user (ids of their own).
    claude_round(Scene::new(), "127.0.1.14");
    claude_round(Scene::of_user(65534), "127.0.1.24");
}

/// The same round in a container bottle: an image with the host's `claude` (a single executable) and busybox.
#[test]
fn claude_code_in_a_container_bottle_answers_with_the_real_key_and_continues() {
    need_agent!("claude");
    if let Some(why) = bottle_test_support::container::unavailable() {
        require::skip("container", &why);
        return;
    }
    let claude = std::fs::canonicalize(which("claude")).unwrap();
    let image = bottle_test_support::container::image_with("bot-bottle-test/claude:1", &claude, "claude");
    claude_round(Scene::in_container(image), "127.0.1.34");
}

/// A container bottle of an image that has node (the host's, with the libraries it links, and busybox) and the
/// host's npm package `package` shown read-only at /opt/PACKAGE-NAME (`--mount`): the command that runs its `js`.
fn node_agent_in_container(package: &str, js: &str) -> Option<(Scene, Vec<String>)> {
    if let Some(why) = bottle_test_support::container::unavailable() {
        require::skip("container", &why);
        return None;
    }
    let node = std::fs::canonicalize(which("node")).unwrap();
    let image = bottle_test_support::container::image_with("bot-bottle-test/node:1", &node, "node");
    let installed = Path::new("/usr/lib/node_modules").join(package);
    assert!(
        installed.is_dir(),
        "{} is missing (npm install -g {package})",
        installed.display()
    );
    let at = format!("/opt/{}", package.rsplit('/').next().unwrap());
    let mut s = Scene::in_container(image);
    s.mounts.push(format!("{}:{at}", installed.display()));
    Some((s, vec!["node".to_string(), format!("{at}/{js}")]))
}

/// Gemini CLI (node) in a container bottle: the same round as in a namespace bottle.
#[test]
fn gemini_cli_in_a_container_bottle_answers_with_the_real_key() {
    need_agent!("gemini");
    let Some((s, gemini)) = node_agent_in_container("@google/gemini-cli", "bundle/gemini.js") else {
        return;
    };
    gemini_round_with(s, "127.0.1.64", &gemini);
}

/// Codex (node launcher, native binary) in a container bottle: the same round, its session kept in the home.
#[test]
fn codex_in_a_container_bottle_answers_with_the_real_key_and_keeps_its_session() {
    need_agent!("codex");
    let Some((s, codex)) = node_agent_in_container("@openai/codex", "bin/codex.js") else {
        return;
    };
    codex_round_with(s, "127.0.1.65", &codex);
}

/// `cli` on PATH.
fn which(cli: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(cli)).find(|f| f.is_file()))
        .unwrap_or_else(|| panic!("{cli} is not on PATH"))
}

fn claude_round(s: Scene, addr: &str) {
    let api = FakeApi::start(&s.path("pki"), &s.ca, &["api.anthropic.com"], addr, "FAKE-CLAUDE-REPLY");
    let first = s.run(
        "claude",
        "api.anthropic.com",
        addr,
        "ANTHROPIC_API_KEY",
        &["claude", "-p", "first prompt MARKER-ONE"],
    );
    print_refused("claude", &first);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("FAKE-CLAUDE-REPLY"),
        "{}",
        text(&first)
    );
    let requests = api.requests();
    let messages: Vec<_> = requests
        .iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with("/v1/messages"))
        .collect();
    assert!(!messages.is_empty(), "no model call: {requests:#?}");
    for m in &messages {
        assert_eq!(m["headers"]["x-api-key"], REAL_KEY, "the API got another key: {m:#}");
    }
    // Inside, only the placeholder; and the kept home holds no real key.
    s.holds_only_the_placeholder("claude", "api.anthropic.com", addr, "ANTHROPIC_API_KEY");

    // A second run in the same kept home continues the first: the model sees the first exchange again.
    let before = api.requests().len();
    let second = s.run(
        "claude",
        "api.anthropic.com",
        addr,
        "ANTHROPIC_API_KEY",
        &["claude", "-p", "--continue", "second prompt"],
    );
    assert!(second.status.success(), "{}", text(&second));
    let again: Vec<_> = api.requests()[before..]
        .iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with("/v1/messages"))
        .cloned()
        .collect();
    assert!(
        again.iter().any(|r| {
            let body = r["body"].as_str().unwrap();
            body.contains("MARKER-ONE") && body.contains("FAKE-CLAUDE-REPLY") && body.contains("second prompt")
        }),
        "the second run did not continue the first: {again:#?}"
    );
}

#[test]
fn gemini_cli_answers_from_the_fake_api_with_the_real_key() {
    need_agent!("gemini");
    gemini_round(Scene::new(), "127.0.1.44");
    gemini_round(Scene::of_user(65534), "127.0.1.54");
}

fn gemini_round(s: Scene, addr: &str) {
    gemini_round_with(s, addr, &["gemini".to_string()]);
}

/// `gemini` is the command that starts Gemini CLI.
fn gemini_round_with(s: Scene, addr: &str, gemini: &[String]) {
    let host = "generativelanguage.googleapis.com";
    let api = FakeApi::start(&s.path("pki"), &s.ca, &[host], addr, "FAKE-GEMINI-REPLY");
    let mut argv: Vec<&str> = gemini.iter().map(String::as_str).collect();
    argv.extend(["-p", "say hi MARKER-G"]);
    let out = s.run("gemini", host, addr, "GEMINI_API_KEY", &argv);
    print_refused("gemini", &out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("FAKE-GEMINI-REPLY"),
        "{}",
        text(&out)
    );
    let calls: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with("/v1beta/models/"))
        .collect();
    assert!(
        calls
            .iter()
            .any(|r| r["path"].as_str().unwrap().contains(":streamGenerateContent")
                && r["body"].as_str().unwrap().contains("MARKER-G")),
        "no model call with the prompt: {calls:#?}"
    );
    for c in &calls {
        assert_eq!(
            c["headers"]["x-goog-api-key"], REAL_KEY,
            "the API got another key: {c:#}"
        );
    }
    s.holds_only_the_placeholder("gemini", host, addr, "GEMINI_API_KEY");
}

/// aider (`aider-chat` on PyPI, pinned in `.ci/run`, in a venv under /usr/local so the bottle sees it) against a
/// FAKE Chat Completions API: the reply is printed, every call carried the real key, the bottle only the placeholder.
#[test]
fn aider_answers_from_the_fake_api_with_the_real_key() {
    need_agent!("aider");
    aider_round(Scene::new(), "127.0.1.45");
    aider_round(Scene::of_user(65534), "127.0.1.55");
}

fn aider_round(s: Scene, addr: &str) {
    let host = "api.openai.com";
    let api = FakeApi::start(&s.path("pki"), &s.ca, &[host], addr, "FAKE-AIDER-REPLY");
    let aider = [
        "aider",
        "--message",
        "say hi MARKER-A",
        "--yes-always",
        "--no-git",
        "--no-check-update",
        "--analytics-disable",
        "--model",
        "gpt-4o",
    ];
    let out = s.run("aider", host, addr, "OPENAI_API_KEY", &aider);
    print_refused("aider", &out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("FAKE-AIDER-REPLY"),
        "{}",
        text(&out)
    );
    let calls: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r["path"] == "/v1/chat/completions")
        .collect();
    assert!(
        calls.iter().any(|r| r["body"].as_str().unwrap().contains("MARKER-A")),
        "no model call with the prompt: {calls:#?}"
    );
    for c in &calls {
        assert_eq!(
            c["headers"]["authorization"],
            format!("Bearer {REAL_KEY}"),
            "the API got another key: {c:#}"
        );
    }
    s.holds_only_the_placeholder("aider", host, addr, "OPENAI_API_KEY");
}

#[test]
fn codex_answers_from_the_fake_api_with_the_real_key_and_keeps_its_session() {
    need_agent!("codex");
    // As root (a mapped bottle) and as an unprivileged user (ids of their own).
    codex_round(Scene::new(), "127.0.1.15");
    codex_round(Scene::of_user(65534), "127.0.1.25");
}

fn codex_round(s: Scene, addr: &str) {
    codex_round_with(s, addr, &["codex".to_string()]);
}

/// `codex` is the command that starts Codex.
fn codex_round_with(s: Scene, addr: &str, codex: &[String]) {
    let api = FakeApi::start(&s.path("pki"), &s.ca, &["api.openai.com"], addr, "FAKE-CODEX-REPLY");
    let with = |args: &[&'static str]| -> Vec<&str> {
        let mut argv: Vec<&str> = codex.iter().map(String::as_str).collect();
        argv.extend(args);
        argv
    };
    let first = s.run(
        "codex",
        "api.openai.com",
        addr,
        "CODEX_API_KEY",
        &with(&["exec", "--skip-git-repo-check", "first prompt MARKER-ONE"]),
    );
    print_refused("codex", &first);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("FAKE-CODEX-REPLY"),
        "{}",
        text(&first)
    );
    let requests = api.requests();
    let calls: Vec<_> = requests
        .iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with("/v1/responses"))
        .collect();
    assert!(!calls.is_empty(), "no model call: {requests:#?}");
    for c in &calls {
        assert_eq!(
            c["headers"]["authorization"],
            format!("Bearer {REAL_KEY}"),
            "the API got another key: {c:#}"
        );
    }
    s.holds_only_the_placeholder("codex", "api.openai.com", addr, "CODEX_API_KEY");
    // The session was kept in the home: `codex exec resume --last` sends the first exchange again.
    let before = api.requests().len();
    let second = s.run(
        "codex",
        "api.openai.com",
        addr,
        "CODEX_API_KEY",
        &with(&["exec", "--skip-git-repo-check", "resume", "--last", "second prompt"]),
    );
    print_refused("codex", &second);
    assert!(second.status.success(), "{}", text(&second));
    let again: Vec<_> = api.requests()[before..]
        .iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with("/v1/responses"))
        .cloned()
        .collect();
    assert!(
        again.iter().any(|r| {
            let body = r["body"].as_str().unwrap();
            body.contains("MARKER-ONE") && body.contains("FAKE-CODEX-REPLY") && body.contains("second prompt")
        }),
        "the second run did not resume the first: {again:#?}"
    );
}

/// Claude Code's TUI in a real terminal: it reaches its first screen with no network error (it first calls
/// platform.claude.com, which the preset allows); onboarding is answered once, and the second run in the kept home
/// goes straight to the prompt (the placeholder it approved is the same).
#[test]
fn claude_codes_tui_starts_without_a_network_error_and_onboards_once() {
    need_agent!("claude");
    // As root and as an unprivileged user.
    claude_tui_round(Scene::new(), "127.0.1.16");
    claude_tui_round(Scene::of_user(65534), "127.0.1.26");
}

fn claude_tui_round(s: Scene, addr: &str) {
    let hosts = ["api.anthropic.com", "platform.claude.com"];
    let api = FakeApi::start(&s.path("pki"), &s.ca, &hosts, addr, "FAKE-CLAUDE-REPLY");
    let launcher = s.command("claude", &hosts, addr, "ANTHROPIC_API_KEY");

    let mut first = Tui::start(&launcher, &s.path("work"));
    first.wait_for("Choose the text style");
    first.type_keys(b"\r");
    first.wait_for("Do you want to use this API key?");
    // "No (recommended)" is preselected; the key in the bottle is the placeholder the proxy replaces.
    first.type_keys(b"\x1b[A");
    first.type_keys(b"\r");
    first.wait_for("Press Enter to continue");
    first.type_keys(b"\r");
    first.wait_for("trust this folder");
    first.type_keys(b"\r");
    first.wait_for("? for shortcuts");
    let shown = first.finish();
    assert!(
        !shown.contains("Unable to connect"),
        "the TUI hit a network error: {shown:?}"
    );

    let second = Tui::start(&launcher, &s.path("work"));
    second.wait_for("? for shortcuts");
    let shown = second.finish();
    for onboarding in [
        "Choose the text style",
        "Do you want to use this API key?",
        "trust this folder",
    ] {
        assert!(
            !shown.contains(onboarding),
            "the second run asked again ({onboarding}): {shown:?}"
        );
    }
    assert!(
        !shown.contains("Unable to connect"),
        "the TUI hit a network error: {shown:?}"
    );
    let paths: Vec<String> = api
        .requests()
        .iter()
        .map(|r| {
            format!(
                "{} {}{}",
                r["method"].as_str().unwrap(),
                r["headers"]["host"].as_str().unwrap_or(""),
                r["path"].as_str().unwrap()
            )
        })
        .collect();
    eprintln!("the TUI called: {paths:#?}");
}

/// Codex's TUI in a real terminal reaches its first screen (the sign-in choice: the TUI keeps its own login in the
/// home; `CODEX_API_KEY` is for `codex exec`) with no network error.
#[test]
fn codexs_tui_starts_without_a_network_error() {
    need_agent!("codex");
    // As root and as an unprivileged user.
    codex_tui_round(Scene::new(), "127.0.1.17");
    codex_tui_round(Scene::of_user(65534), "127.0.1.27");
}

fn codex_tui_round(s: Scene, addr: &str) {
    let hosts = ["api.openai.com", "chatgpt.com", "auth.openai.com"];
    let _api = FakeApi::start(&s.path("pki"), &s.ca, &hosts, addr, "FAKE-CODEX-REPLY");
    let launcher = s.command("codex", &hosts, addr, "CODEX_API_KEY");
    let tui = Tui::start(&launcher, &s.path("work"));
    tui.wait_for("Choose how you want to use Codex");
    std::thread::sleep(Duration::from_secs(3));
    let shown = tui.finish();
    assert!(shown.contains("Welcome to Codex"), "{shown:?}");
    for error in ["error", "Error", "Unable to", "failed"] {
        assert!(!shown.contains(error), "the TUI showed {error:?}: {shown:?}");
    }
}
