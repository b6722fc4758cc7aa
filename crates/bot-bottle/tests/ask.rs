//! Ask mode (#16): a request for a host the policy does not cover waits while a reviewer answers. The user answers
//! with `approvals` (allow-once asks again next time, allow stops the asking, deny stays denied); a reviewer command
//! answers a hundred held requests; a reviewer that hangs, crashes or prints garbage denies; private destinations,
//! denied hosts and IP literals are never asked. Real bottles, real local upstreams (HTTPS through interception
//! with a test CA). Needs root and namespace bottles; `BOTTLE_TEST_REQUIRE=namespace` makes a skip a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bottle_test_support::bottles::{self, text};
use bottle_test_support::ca::{TestCa, server_config};
use bottle_test_support::tui::Tui;
use bottle_test_support::{require, upstream};

const BB: &str = env!("CARGO_BIN_EXE_bot-bottle");

fn skip_reason() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("bottles on this host need root here".into());
    }
    bottles::namespace_unavailable(BB)
}

/// A scratch state root and workspace, and the binary run against them.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("w")).unwrap();
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn state(&self) -> PathBuf {
        self.path().join("state")
    }

    fn bb(&self, args: &[&str]) -> Output {
        Command::new(BB)
            .args(args)
            .current_dir(self.path().join("w"))
            .env("XDG_STATE_HOME", self.state())
            .env("HOME", self.path())
            .output()
            .unwrap()
    }

    fn audit(&self, name: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.state().join(format!("bot-bottle/{name}/audit.jsonl"))).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The questions `approvals NAME --json` lists, once there are `n` (or after 20 s, whatever there is).
    fn pending(&self, name: &str, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.bb(&["--json", "approvals", name]);
            assert_eq!(out.status.code(), Some(0), "{}", text(&out));
            let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            if rows.len() >= n || Instant::now() > deadline {
                return rows;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `f`, then removes the bottle whatever happened.
    fn with_bottle(&self, name: &str, f: impl FnOnce()) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = self.bb(&["rm", "-f", name]);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }
}

/// `curl` in the bottle, in the background: its `http_code` (and body) when it ends.
fn curl_in(scene: &Scene, name: &str, url: &str) -> std::thread::JoinHandle<String> {
    let (state, home, w) = (scene.state(), scene.path().to_path_buf(), scene.path().join("w"));
    let (name, url) = (name.to_string(), url.to_string());
    std::thread::spawn(move || {
        let out = Command::new(BB)
            .args([
                "exec",
                &name,
                "--",
                "curl",
                "-sS",
                "--max-time",
                "60",
                "-w",
                " %{http_connect} %{http_code}",
                &url,
            ])
            .current_dir(w)
            .env("XDG_STATE_HOME", state)
            .env("HOME", home)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    })
}

#[test]
fn issue_16_the_user_answers_allow_once_then_allow_then_deny() {
    if let Some(why) = skip_reason() {
        require::skip("namespace", &why);
        return;
    }
    let scene = Scene::new();
    let ca = TestCa::mint(scene.path(), "upstream-ca", "ask test upstream CA");
    let up = upstream::https(server_config(&ca.leaf(&["new.example", "no.example"]), &[b"http/1.1"]));
    let out = scene.bb(&[
        "run",
        "-d",
        "--ask",
        "--name",
        "ask",
        "--upstream-ca",
        ca.cert_path.to_str().unwrap(),
        "--resolve",
        "new.example=127.0.0.1",
        "--resolve",
        "no.example=127.0.0.1",
        "--allow-cidr",
        "127.0.0.1/32",
        "--",
        "sleep",
        "600",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let url = format!("https://new.example:{}/", up.port);
    scene.with_bottle("ask", || {
        // Held until the user answers; nothing reaches the upstream before.
        let first = curl_in(&scene, "ask", &url);
        let asked = scene.pending("ask", 1);
        assert_eq!(asked.len(), 1, "{asked:?}");
        let q = &asked[0];
        assert_eq!(
            (
                q["host"].as_str(),
                q["port"].as_u64(),
                q["addr"].as_str(),
                q["private"].as_bool()
            ),
            (
                Some("new.example"),
                Some(u64::from(up.port)),
                Some("127.0.0.1"),
                Some(true)
            ),
            "{q}"
        );
        assert_eq!(up.requests(), 0);
        let ls = scene.bb(&["ls"]);
        assert!(
            String::from_utf8_lossy(&ls.stdout)
                .contains("1 request(s) waiting for an answer: bot-bottle approvals ask"),
            "{}",
            text(&ls)
        );
        let listed = scene.bb(&["approvals"]);
        assert!(
            String::from_utf8_lossy(&listed.stdout)
                .contains(&format!("new.example:{} (127.0.0.1, a private address)", up.port)),
            "{}",
            text(&listed)
        );
        let id = q["id"].as_u64().unwrap().to_string();
        let out = scene.bb(&["approvals", "ask", &id, "allow-once", "--reason", "just this once"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let got = first.join().unwrap();
        assert!(
            got.contains("hello from tls upstream") && got.ends_with(" 200 200"),
            "{got}"
        );
        // A second answer to the same question is refused: the first answer won.
        let again = scene.bb(&["approvals", "ask", &id, "deny"]);
        assert_eq!(again.status.code(), Some(2), "{}", text(&again));

        // Once means once: the next request asks again; `allow` stops the asking.
        let second = curl_in(&scene, "ask", &url);
        let asked = scene.pending("ask", 1);
        assert_eq!(asked.len(), 1, "the next request must ask again: {asked:?}");
        let id = asked[0]["id"].as_u64().unwrap().to_string();
        assert_eq!(scene.bb(&["approvals", "ask", &id, "allow"]).status.code(), Some(0));
        let second = second.join().unwrap();
        assert!(second.ends_with(" 200 200"), "{second}");
        let third = curl_in(&scene, "ask", &url).join().unwrap();
        assert!(third.ends_with(" 200 200"), "{third}");
        assert!(scene.pending("ask", 0).is_empty());
        // `ls` counts the bottle's decisions only, a CONNECT and its request each (not the live change the answer
        // made, nor the reload it caused).
        let ls = scene.bb(&["--json", "ls"]);
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&ls.stdout).unwrap();
        let row = rows.iter().find(|r| r["name"] == "ask").unwrap();
        assert_eq!(
            (row["allowed"].as_u64(), row["asking"].as_u64()),
            (Some(6), Some(0)),
            "{row}"
        );

        // Deny is remembered: the next request to that host is refused without a question.
        let no = format!("https://no.example:{}/", up.port);
        let denied = curl_in(&scene, "ask", &no);
        let asked = scene.pending("ask", 1);
        let id = asked[0]["id"].as_u64().unwrap().to_string();
        assert_eq!(
            scene
                .bb(&["approvals", "ask", &id, "deny", "--reason", "not this one"])
                .status
                .code(),
            Some(0)
        );
        let denied = denied.join().unwrap();
        assert!(denied.ends_with(" 403 000"), "{denied}");
        let again = curl_in(&scene, "ask", &no).join().unwrap();
        assert!(again.ends_with(" 403 000"), "{again}");

        // Every question and every answer is on record, paired by the question's id.
        let audit = scene.audit("ask");
        let asks: Vec<_> = audit.iter().filter(|v| v["event"] == "ask").collect();
        assert_eq!(asks.len(), 3, "{audit:?}");
        let answered = |rule: &str| {
            audit
                .iter()
                .filter(|v| v["rule"] == rule && v["ask"].is_u64() && v["event"] != "ask")
                .count()
        };
        assert_eq!(
            (
                answered("approved-once"),
                answered("approved"),
                answered("denied-by-reviewer")
            ),
            (1, 1, 1),
            "{audit:?}"
        );
        let once = audit.iter().find(|v| v["rule"] == "approved-once").unwrap();
        assert!(once["reviewer"].as_str().unwrap().ends_with("just this once"), "{once}");
        assert!(
            audit
                .iter()
                .any(|v| v["host"] == "no.example" && v["rule"] == "deny-list"),
            "the remembered denial refuses without asking: {audit:?}"
        );
    });
}

#[test]
fn issue_16_a_reviewer_command_answers_a_hundred_held_requests_and_anything_odd_denies() {
    if let Some(why) = skip_reason() {
        require::skip("namespace", &why);
        return;
    }
    let scene = Scene::new();
    let up = upstream::http();
    let seen = scene.path().join("questions.jsonl");
    // The reviewer logs each question, then (by the question's own host, not one in its recent refusals): allow ok.test, hang on hang.test, crash on crash.test, print garbage
    // for junk.test.
    let reviewer = format!(
        r#"read q; printf '%s\n' "$q" >> {seen}; printf '%s\n' "${{BB_ASK_TEST_TOKEN:-unset}}" >> {seen}.env
case "$q" in
  '{{"bottle":"rev","id":'*',"host":"ok.test",'*) echo '{{"decision":"allow-once","reason":"fine"}}';;
  '{{"bottle":"rev","id":'*',"host":"hang.test",'*) sleep 600;;
  '{{"bottle":"rev","id":'*',"host":"crash.test",'*) exit 3;;
  *) echo 'sure, go ahead';;
esac"#,
        seen = seen.display()
    );
    let policy = format!(
        "[network]\nunknown = \"ask\"\nask_timeout = 3\nallow = [\"cred.test\"]\ndeny = [\"denied.test\"]\n\
         allow_cidr = [\"127.0.0.1/32\"]\n\n\
         [[credential]]\nhost = \"cred.test\"\nheader = \"authorization\"\nfrom_env = \"BB_ASK_TEST_TOKEN\"\n\n\
         [network.resolve]\n\"ok.test\" = \"127.0.0.1\"\n\"hang.test\" = \"127.0.0.1\"\n\"crash.test\" = \"127.0.0.1\"\n\
         \"junk.test\" = \"127.0.0.1\"\n\"leak.test\" = \"127.0.0.1\"\n\"denied.test\" = \"127.0.0.1\"\n\n\
         [network.ask]\nreviewer = [\"sh\", \"-c\", {}]\n",
        toml_string(&reviewer)
    );
    let file = scene.path().join("w/bottle.toml");
    std::fs::write(&file, policy).unwrap();
    let checked = scene.bb(&["policy", "check"]);
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked));
    let out = Command::new(BB)
        .args(["run", "-d", "--name", "rev", "--", "sleep", "600"])
        .current_dir(scene.path().join("w"))
        .env("XDG_STATE_HOME", scene.state())
        .env("HOME", scene.path())
        .env("BB_ASK_TEST_TOKEN", "real-secret-of-the-ask-test")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let port = up.port;
    scene.with_bottle("rev", || {
        // A hundred requests held at once, each answered by its own run of the reviewer.
        let script = format!(
            "for i in $(seq 100); do curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 60 \
             http://ok.test:{port}/n$i & done; wait"
        );
        let out = scene.bb(&["exec", "rev", "--", "sh", "-c", &script]);
        let codes = String::from_utf8_lossy(&out.stdout);
        assert_eq!(codes.lines().filter(|c| *c == "200").count(), 100, "{codes}");
        assert_eq!(up.requests(), 100);

        let code = |host: &str| {
            let out = scene.bb(&[
                "exec",
                "rev",
                "--",
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "30",
                &format!("http://{host}:{port}/"),
            ]);
            let got = String::from_utf8_lossy(&out.stdout).to_string();
            if got != "403" {
                eprintln!("{host}: {}", text(&out));
            }
            got
        };
        let started = Instant::now();
        assert_eq!(code("hang.test"), "403");
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "a hung reviewer denies at ask_timeout"
        );
        assert_eq!(code("crash.test"), "403");
        assert_eq!(code("junk.test"), "403");
        // Never asked: a denied host, an IP literal, a name resolving to a private address no allow_cidr covers
        // (here the registries' names resolve into a documentation range; where they do not, that part is moot).
        assert_eq!(code("denied.test"), "403");
        assert_eq!(code("93.184.216.34"), "403");
        let registry_is_private = resolves_into_documentation_range(REGISTRY);
        if registry_is_private {
            assert_eq!(code(REGISTRY), "403");
        }
        // A placeholder sent in plain HTTP to a host the policy does not cover: a leak, refused without a question.
        let leak = scene.bb(&[
            "exec", "rev", "--", "sh", "-c",
            &format!("curl -s -o /dev/null -w '%{{http_code}}' -H \"authorization: $BB_ASK_TEST_TOKEN\" http://leak.test:{port}/"),
        ]);
        assert_eq!(String::from_utf8_lossy(&leak.stdout), "403", "{}", text(&leak));
        assert_eq!(up.requests(), 100, "nothing refused reached the upstream");

        let audit = scene.audit("rev");
        let rule_of = |host: &str| {
            audit
                .iter()
                .filter(|v| v["host"] == host && v["event"] != "ask")
                .map(|v| v["rule"].as_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(rule_of("hang.test"), ["timeout"], "{audit:?}");
        assert_eq!(rule_of("crash.test"), ["denied-by-reviewer"]);
        assert_eq!(rule_of("junk.test"), ["denied-by-reviewer"]);
        let crash = audit
            .iter()
            .find(|v| v["host"] == "crash.test" && v["event"] != "ask")
            .unwrap();
        assert!(
            crash["reviewer"].as_str().unwrap().contains("the reviewer failed"),
            "{crash}"
        );
        let junk = audit
            .iter()
            .find(|v| v["host"] == "junk.test" && v["event"] != "ask")
            .unwrap();
        assert!(
            junk["reviewer"].as_str().unwrap().contains("is not {\"decision\""),
            "{junk}"
        );
        let questions = std::fs::read_to_string(&seen).unwrap();
        // The reviewer never sees the real credential the launcher holds.
        let reviewer_env = std::fs::read_to_string(seen.with_extension("jsonl.env")).unwrap();
        assert!(
            !reviewer_env.is_empty() && reviewer_env.lines().all(|l| l == "unset"),
            "{reviewer_env}"
        );
        if registry_is_private {
            assert_eq!(rule_of(REGISTRY), ["private-address"], "{audit:?}");
        }
        assert_eq!(rule_of("leak.test"), ["placeholder-leak"]);
        for never in ["denied.test", "93.184.216.34", REGISTRY, "leak.test"] {
            assert!(
                !questions.contains(&format!("\"host\":\"{never}")),
                "{never} was asked: {questions}"
            );
        }
        let first: serde_json::Value = serde_json::from_str(questions.lines().next().unwrap()).unwrap();
        assert_eq!(
            (first["bottle"].as_str(), first["method"].as_str()),
            (Some("rev"), Some("GET")),
            "{first}"
        );
        assert!(first["recent_refusals"].is_array(), "{first}");
    });
}

#[test]
fn issue_16_an_interactive_run_asks_at_its_terminal_and_restores_the_screen() {
    if let Some(why) = skip_reason() {
        require::skip("namespace", &why);
        return;
    }
    let scene = Scene::new();
    let ca = TestCa::mint(scene.path(), "upstream-ca", "ask test upstream CA");
    let up = upstream::https(server_config(&ca.leaf(&["new.example"]), &[b"http/1.1"]));
    let mut launcher = Command::new(BB);
    launcher
        .args(["run", "--ask", "--name", "tty", "--upstream-ca"])
        .arg(&ca.cert_path)
        .args([
            "--resolve",
            "new.example=127.0.0.1",
            "--allow-cidr",
            "127.0.0.1/32",
            "-e",
            "PS1=$ ",
        ])
        .args(["--", "bash", "--norc", "--noprofile", "-i"])
        .env("XDG_STATE_HOME", scene.state())
        .env("HOME", scene.path());
    let mut tui = Tui::start(&launcher, &scene.path().join("w"));
    scene.with_bottle("tty", || {
        tui.type_keys(b"echo ready-$((20+1))\r");
        tui.wait_for("ready-21");
        // The program in the foreground (a TUI would redraw on the SIGWINCH the answer sends it) says it got one.
        let url = format!("https://new.example:{}/", up.port);
        tui.type_keys(
            format!("bash -c \"trap 'echo WINCH-SEEN' WINCH; curl -sS -w ' code=%{{http_code}}' {url}; echo\"\r")
                .as_bytes(),
        );
        tui.wait_for(&format!(
            "tty asks for new.example:{} (127.0.0.1, private) - [o]nce [a]lways [d]eny",
            up.port
        ));
        assert_eq!(up.requests(), 0);
        // A key that is no answer is swallowed; `o` answers.
        tui.type_keys(b"x");
        tui.type_keys(b"o");
        tui.wait_for("hello from tls upstream: GET / code=200");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tui.text().contains("WINCH-SEEN") {
            assert!(Instant::now() < deadline, "no redraw signal: {}", tui.text());
            std::thread::sleep(Duration::from_millis(100));
        }
        // Keys reach the agent again, and nothing typed at the question did.
        tui.type_keys(b"echo after-$((1+1))\r");
        tui.wait_for("after-2");
        assert!(!tui.text().contains("xecho"), "{}", tui.text());
        // The cursor was saved before the question and put back after it, the question's line cleared.
        let raw = String::from_utf8_lossy(&tui.raw()).into_owned();
        let saved = raw.find("\u{1b}7").expect("cursor saved");
        let restored = raw.find("\r\u{1b}[2K\u{1b}8").expect("line cleared, cursor restored");
        assert!(saved < restored, "{raw:?}");
        let audit = scene.audit("tty");
        let answered = audit
            .iter()
            .find(|v| v["rule"] == "approved-once")
            .expect("answered once");
        assert_eq!(answered["reviewer"], "terminal: answered at the terminal");
    });
    let _ = tui.finish();
}

/// A name that resolves, on these machines, into a documentation range (a private destination for the proxy).
const REGISTRY: &str = "registry.npmjs.org";

fn resolves_into_documentation_range(name: &str) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(addrs) = (name, 443).to_socket_addrs() else {
        return false;
    };
    let addrs: Vec<_> = addrs.collect();
    !addrs.is_empty()
        && addrs.iter().all(|a| match a.ip() {
            std::net::IpAddr::V4(v4) => matches!(v4.octets(), [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _]),
            std::net::IpAddr::V6(_) => false,
        })
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
