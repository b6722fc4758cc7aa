//! Shared scenario machinery: when to skip (and when a skip is a failure), the probe binary, a scenario's
//! directories, the script a bottle runs (many probe invocations, one bottle), running it inside a lab, and reading
//! back one verdict per step. Every way a scenario can go wrong (setup, a probe that cannot run, an unparseable or
//! missing verdict) is a test failure: nothing here passes by default.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bottle_probe::catalogue::{self, Case, Expect, Family, Values};
use serde_json::Value;

pub use crate::backend::{Backend, Cells, backends, family, skip};
use crate::lab::Lab;

pub const BB: &str = env!("CARGO_BIN_EXE_bot-bottle");
pub const CURL: &str = "/usr/bin/curl";
/// How long one bottle run may take before the scenario fails (a hang is never a pass).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(240);
/// An unprivileged user for runs that must not be root on the host.
pub const NOBODY: u32 = 65534;

// ---------------------------------------------------------------------------------------------------------------
// The probe binary

/// `bottle-probe`, built by cargo beside the bot-bottle binary (`BOTTLE_PROBE=<path>` uses a prebuilt one).
pub fn probe_binary() -> &'static Path {
    bottle_test_support::probe::binary(BB)
}

// ---------------------------------------------------------------------------------------------------------------
// Directories

/// A scenario's directories: a workspace (the bottle's current dir), a private state home, a fake `$HOME` full of
/// decoy secrets, and `host/` for files that must stay invisible. The workspace holds a copy of the probe.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new().prefix("bb-escape-").tempdir().unwrap();
        for sub in ["work", "state", "home", "host"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let env = Env { dir };
        let probe = env.work().join("bottle-probe");
        std::fs::copy(probe_binary(), &probe).unwrap();
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
        env
    }

    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn host(&self) -> PathBuf {
        self.dir.path().join("host")
    }

    /// `path` under the fake home, with `contents`.
    pub fn home_file(&self, path: &str, contents: &str) -> PathBuf {
        let p = self.home().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// Lets `uid` use every directory (for runs as an unprivileged user).
    pub fn open_to(&self, uid: u32) {
        for p in [self.dir.path().to_path_buf(), self.work(), self.state(), self.home()] {
            std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
        }
    }

    pub fn bottle_dir(&self, name: &str) -> PathBuf {
        self.state().join("bot-bottle").join(name)
    }

    pub fn state_json(&self, name: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.bottle_dir(name).join("state.json")).unwrap()).unwrap()
    }

    pub fn audit(&self, name: &str) -> Vec<Value> {
        std::fs::read_to_string(self.bottle_dir(name).join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `bot-bottle ARGS` inside `lab`, in the workspace, with the private state home and fake `$HOME`.
    pub fn bb(&self, lab: &Lab, as_user: Option<u32>, args: &[String]) -> Command {
        let mut c = match as_user {
            None => lab.command(BB),
            Some(uid) => {
                let mut c = lab.command("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "--",
                    BB,
                ]);
                c
            }
        };
        c.args(args)
            .current_dir(self.work())
            .env("XDG_STATE_HOME", self.state())
            .env("HOME", self.home())
            .env_remove("BOT_BOTTLE_LOG")
            .env_remove("SSH_AUTH_SOCK");
        c
    }
}

/// Hex, so a needle passed on a command line never appears there literally (the probe decodes `hex:`).
pub fn hex(s: &str) -> String {
    catalogue::hex(s)
}

/// A random token for decoy secrets and markers.
pub fn token(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).unwrap();
    format!(
        "{prefix}{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Runs `cmd` to completion or kills it after `timeout`.
pub fn output_within(mut cmd: Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------------------------------
// Scripts and verdicts

fn quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// What the bottle runs: each step prints `@@step ID`, the probe's verdict line, `@@rc N`.
#[derive(Default)]
pub struct Script {
    steps: Vec<String>,
    background: Vec<String>,
    ids: Vec<String>,
}

impl Script {
    fn line(&mut self, id: &str, argv: &[&str]) -> String {
        assert!(!self.ids.iter().any(|i| i == id), "duplicate step id {id}");
        self.ids.push(id.to_string());
        let argv: Vec<String> = argv.iter().map(|a| quote(a)).collect();
        format!("step {} ./bottle-probe {}", quote(id), argv.join(" "))
    }

    /// `./bottle-probe ARGS` as step `id`.
    pub fn probe(&mut self, id: &str, args: &[&str]) -> &mut Self {
        let line = self.line(id, args);
        self.steps.push(line);
        self
    }

    /// The same, started before every other step and running alongside them (slow attempts).
    pub fn background(&mut self, id: &str, args: &[&str]) -> &mut Self {
        let n = self.background.len();
        let line = self.line(id, args);
        self.background.push(format!("( {line} ) >/tmp/.escape-bg-{n} 2>&1 &"));
        self
    }

    /// Step `ctl-tools`: every tool the shell steps use is in the bottle. A missing tool would make its steps
    /// "hold" for the wrong reason, so every family requires this control (`Ran::tools_present`).
    pub fn tools(&mut self, tools: &[&str]) -> &mut Self {
        let cmd = format!(
            "for t in {}; do command -v \"$t\" >/dev/null || {{ echo \"$t is not installed\"; exit 1; }}; done",
            tools.join(" ")
        );
        self.shell("ctl-tools", &cmd)
    }

    /// Every case of `family`, templates filled from `values`, after a `ctl-tools` step for the tools its cases
    /// drive. A template without a value fails the test.
    pub fn catalogue(&mut self, family: &Family, values: &Values) -> &mut Self {
        self.tools(&family.tools());
        for c in family.cases {
            self.case(c, values);
        }
        self
    }

    /// One catalogue case as a step named by its id; a slow one starts first and runs alongside the others.
    pub fn case(&mut self, c: &Case, values: &Values) -> &mut Self {
        let argv = c
            .argv(values)
            .unwrap_or_else(|e| panic!("catalogue case {}: {e}", c.id));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        if c.slow {
            self.background(c.id, &argv)
        } else {
            self.probe(c.id, &argv)
        }
    }

    /// A shell command as a step (`command sh -c CMD`): escaped means it exited 0.
    pub fn shell(&mut self, id: &str, cmd: &str) -> &mut Self {
        self.probe(id, &["command", "sh", "-c", cmd])
    }

    pub fn render(&self) -> String {
        let mut s = String::from("step() { id=$1; shift; echo \"@@step $id\"; \"$@\"; echo \"@@rc $?\"; }\n");
        for b in &self.background {
            s.push_str(b);
            s.push('\n');
        }
        for l in &self.steps {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("wait\nfor f in /tmp/.escape-bg-*; do [ -e \"$f\" ] && cat \"$f\"; done\necho '@@done'\n");
        s
    }
}

/// One probe verdict.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub case: String,
    pub escaped: bool,
    pub evidence: String,
    pub detail: Value,
}

impl Verdict {
    pub fn parse(line: &str) -> Option<Verdict> {
        let v: Value = serde_json::from_str(line).ok()?;
        Some(Verdict {
            case: v.get("case")?.as_str()?.to_string(),
            escaped: v.get("escaped")?.as_bool()?,
            evidence: v.get("evidence")?.as_str()?.to_string(),
            detail: v.get("detail").cloned().unwrap_or(Value::Null),
        })
    }

    /// `detail.status`, for proxy answers.
    pub fn status(&self) -> Option<u64> {
        self.detail.get("status").and_then(Value::as_u64)
    }

    /// `detail.stdout` of a command step.
    pub fn stdout(&self) -> &str {
        self.detail.get("stdout").and_then(Value::as_str).unwrap_or("")
    }
}

/// A finished bottle run and its steps' verdicts.
pub struct Ran {
    pub name: String,
    pub out: Output,
    steps: BTreeMap<String, Result<Verdict, String>>,
}

impl Ran {
    pub fn parse(name: &str, out: Output) -> Ran {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut steps = BTreeMap::new();
        let mut current: Option<(String, Vec<String>)> = None;
        for line in stdout.lines() {
            if let Some(id) = line.strip_prefix("@@step ") {
                if let Some((open, _)) = current.take() {
                    steps.insert(open, Err("the step printed no exit status".into()));
                }
                current = Some((id.to_string(), Vec::new()));
            } else if let Some(rc) = line.strip_prefix("@@rc ") {
                let Some((id, lines)) = current.take() else { continue };
                let verdicts: Vec<Verdict> = lines.iter().filter_map(|l| Verdict::parse(l)).collect();
                let result = match (rc.trim(), verdicts.as_slice()) {
                    ("0", [v]) => Ok(v.clone()),
                    ("0", []) => Err(format!("no parseable verdict in {lines:?}")),
                    ("0", _) => Err(format!("more than one verdict in {lines:?}")),
                    (rc, _) => Err(format!("the probe could not run (exit {rc}); output {lines:?}")),
                };
                steps.insert(id, result);
            } else if let Some((_, lines)) = current.as_mut() {
                lines.push(line.to_string());
            }
        }
        Ran {
            name: name.to_string(),
            out,
            steps,
        }
    }

    pub fn context(&self) -> String {
        format!("bottle {}: {}", self.name, text(&self.out))
    }

    /// The verdict of step `id`; fails the test when the step did not produce one.
    pub fn verdict(&self, id: &str) -> &Verdict {
        match self.steps.get(id) {
            Some(Ok(v)) => v,
            Some(Err(e)) => panic!("step {id}: {e}\n{}", self.context()),
            None => panic!("step {id} never ran\n{}", self.context()),
        }
    }

    /// Step `id` is a control that must succeed (the allowed path works, so the held ones mean something).
    pub fn reached(&self, id: &str) -> &Verdict {
        let v = self.verdict(id);
        assert!(
            v.escaped,
            "control step {id} failed: {}\n{v:#?}\n{}",
            v.evidence,
            self.context()
        );
        v
    }

    /// The `ctl-tools` control passed.
    pub fn tools_present(&self) -> &Self {
        let v = self.verdict("ctl-tools");
        assert!(
            v.escaped,
            "a tool the scenario drives is missing in the bottle: {}",
            v.stdout()
        );
        self
    }
}

/// Lets an unprivileged launcher read what it is handed on the host side (a policy, an upstream CA): directories
/// 0755, files 0644.
pub fn readable(paths: &[&Path]) {
    for p in paths {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// Who launches a family's shared bottle: root, and an unprivileged user (`nobody`), because the two take different
/// paths through the user namespace. Every family that runs twice asserts the same verdicts for both.
pub const LAUNCHERS: [(&str, Option<u32>); 2] = [("root", None), ("nobody", Some(NOBODY))];

/// The launchers of the scenario being set up: both on the namespace backend; root alone on the container backend
/// (a container engine answers root, and an unprivileged user only through its group, which is host root too).
pub fn launchers() -> &'static [(&'static str, Option<u32>)] {
    match crate::backend::current() {
        Backend::Container | Backend::Gvisor => &LAUNCHERS[..1],
        _ => &LAUNCHERS,
    }
}

/// The same script's runs, one per launcher; each check holds for every run and names the launcher that failed it.
pub struct Runs(pub Vec<(&'static str, Ran)>);

impl Runs {
    /// Step `id`'s verdict in every run.
    pub fn verdicts(&self, id: &str) -> Vec<(&'static str, &Verdict)> {
        self.0.iter().map(|(who, r)| (*who, r.verdict(id))).collect()
    }

    /// Step `id` held in every run.
    pub fn held(&self, id: &str) -> Vec<(&'static str, &Verdict)> {
        let vs = self.verdicts(id);
        for (who, v) in &vs {
            assert!(
                !v.escaped,
                "ESCAPE ({who} launcher) in step {id} ({}): {}\n{v:#?}",
                v.case, v.evidence
            );
        }
        vs
    }

    /// Step `id` is a control that succeeded in every run.
    pub fn reached(&self, id: &str) -> Vec<(&'static str, &Verdict)> {
        for (who, r) in &self.0 {
            let v = r.verdict(id);
            assert!(
                v.escaped,
                "control step {id} failed ({who} launcher): {}\n{v:#?}\n{}",
                v.evidence,
                r.context()
            );
        }
        self.verdicts(id)
    }

    /// Step `id` held with an explicit policy refusal (403 + `x-bottle-denied`) in every run.
    pub fn refused(&self, id: &str) -> Vec<(&'static str, &Verdict)> {
        let vs = self.held(id);
        for (who, v) in &vs {
            assert_eq!(
                v.status(),
                Some(403),
                "step {id} was not refused with a 403 ({who} launcher): {v:#?}"
            );
            assert!(
                v.detail["denied"].is_string(),
                "step {id}: no x-bottle-denied header ({who} launcher): {v:#?}"
            );
        }
        vs
    }

    /// Every case of `family` met the catalogue's expectation in every run (held, refused, or a control reached).
    pub fn meet_the_catalogue(&self, family: &Family) {
        for c in family.cases {
            match c.expect {
                Expect::Held => {
                    self.held(c.id);
                }
                Expect::Refused => {
                    self.refused(c.id);
                }
                Expect::Control => {
                    self.reached(c.id);
                }
                Expect::JudgedOutside => {
                    self.verdicts(c.id);
                }
            }
        }
    }

    /// The `ctl-tools` control passed in every run.
    pub fn tools_present(&self) -> &Self {
        for (who, r) in &self.0 {
            let v = r.verdict("ctl-tools");
            assert!(
                v.escaped,
                "a tool the scenario drives is missing in the bottle ({who} launcher): {}",
                v.stdout()
            );
        }
        self
    }
}

/// One `bot-bottle run` of a scenario: which lab, which directories, which user, which flags and host variables.
pub struct Launch<'a> {
    lab: &'a Lab,
    env: &'a Env,
    name: String,
    user: Option<u32>,
    flags: Vec<String>,
    vars: Vec<(String, String)>,
}

impl<'a> Launch<'a> {
    pub fn new(lab: &'a Lab, env: &'a Env, name: &str) -> Self {
        Launch {
            lab,
            env,
            name: name.to_string(),
            user: None,
            flags: Vec::new(),
            vars: Vec::new(),
        }
    }

    pub fn user(mut self, uid: Option<u32>) -> Self {
        self.user = uid;
        self
    }

    /// Flags before `--` (policy, `-d`, `--upstream-ca`, ...).
    pub fn flags<S: ToString>(mut self, flags: &[S]) -> Self {
        self.flags.extend(flags.iter().map(ToString::to_string));
        self
    }

    /// A variable in the launcher's (the host's) environment.
    pub fn var(mut self, key: &str, value: impl ToString) -> Self {
        self.vars.push((key.to_string(), value.to_string()));
        self
    }

    /// The `bot-bottle run` command for `argv`, not started. On the container backend the bottle is a container of
    /// the suite's image, whose workspace a root launcher's agent owns as `nobody`.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut args: Vec<String> = vec!["run".into(), "--name".into(), self.name.clone()];
        if matches!(crate::backend::current(), Backend::Container | Backend::Gvisor) {
            let image = bottle_test_support::container::escape_image(probe_binary());
            args.extend(["--backend".into(), "container".into(), "--image".into(), image.into()]);
            if crate::backend::current() == Backend::Gvisor {
                args.extend(["--runtime".into(), bottle_test_support::container::GVISOR.into()]);
            }
            std::os::unix::fs::chown(self.env.work(), Some(NOBODY), Some(NOBODY)).unwrap();
        }
        args.extend(self.flags.iter().cloned());
        args.push("--".into());
        args.extend(argv.iter().map(ToString::to_string));
        let mut cmd = self.env.bb(self.lab, self.user, &args);
        cmd.envs(self.vars.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs `script` in the bottle to completion and reads back every step's verdict.
    pub fn run(&self, script: &Script) -> Ran {
        let rendered = script.render();
        let out = output_within(self.command(&["sh", "-c", &rendered]), RUN_TIMEOUT);
        let ran = Ran::parse(&self.name, out);
        if std::env::var_os("ESCAPE_SUITE_VERBOSE").is_some() {
            eprintln!("{}", ran.context());
        }
        assert!(
            String::from_utf8_lossy(&ran.out.stdout).contains("@@done"),
            "the bottle's script did not finish\n{}",
            ran.context()
        );
        ran
    }
}

/// One probe run straight in the lab, outside any bottle: confinement deliberately off (the self-check, and
/// host-side clients of a standalone proxy).
pub fn probe_unconfined(lab: &Lab, vars: &[(&str, &str)], args: &[&str]) -> Verdict {
    let mut cmd = lab.command(probe_binary());
    cmd.args(args).envs(vars.iter().copied());
    let out = output_within(cmd, Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(0),
        "the probe could not run {args:?}: {}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    Verdict::parse(stdout.trim()).unwrap_or_else(|| panic!("no verdict from {args:?}: {}", text(&out)))
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn ran(stdout: &str) -> Ran {
        let out = Output {
            status: std::process::ExitStatus::from_raw(0),
            stdout: stdout.as_bytes().to_vec(),
            stderr: Vec::new(),
        };
        Ran::parse("t", out)
    }

    #[test]
    fn a_step_yields_a_verdict_only_when_the_probe_ran_and_printed_exactly_one() {
        let v = r#"{"case":"c","escaped":false,"evidence":"e"}"#;
        let r = ran(&format!(
            "@@step ok\n{v}\n@@rc 0\n@@step failed\n@@rc 3\n@@step silent\n@@rc 0\n@@step twice\n{v}\n{v}\n@@rc 0\n\
             @@step garbled\n{{\"case\":1}}\n@@rc 0\n@@step cut\n{v}\n"
        ));
        assert!(!r.verdict("ok").escaped);
        for id in ["failed", "silent", "twice", "garbled", "cut", "absent"] {
            let result = std::panic::catch_unwind(|| r.verdict(id).escaped);
            assert!(result.is_err(), "step {id} must not yield a verdict");
        }
    }

    #[test]
    fn scripts_quote_every_argument() {
        let mut sc = Script::default();
        sc.probe("a", &["read-file", "it's here"]);
        assert!(
            sc.render()
                .contains(r"step 'a' ./bottle-probe 'read-file' 'it'\''s here'")
        );
    }
}
