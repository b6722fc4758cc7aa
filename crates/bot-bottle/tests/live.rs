//! Live policy (#16): `allow` and `deny` change a running bottle's policy for its next request, validated as a
//! policy line (an over-broad entry is refused with the loader's reason), written to its snapshot, audited with who
//! asked; only the owner reaches the control socket, and nothing in the bottle sees it. Real bottles, a real local
//! upstream. Needs root and namespace bottles; `BOTTLE_TEST_REQUIRE=namespace` makes a skip a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::process::Command;

use bottle_test_support::bottles::{self, text};
use bottle_test_support::{require, upstream};

const BB: &str = env!("CARGO_BIN_EXE_bot-bottle");

fn skip_reason() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("another uid's attempt on the control socket needs root to become that uid".into());
    }
    bottles::namespace_unavailable(BB)
}

#[test]
fn issue_16_allow_and_deny_change_a_running_bottle_for_its_next_request() {
    if let Some(why) = skip_reason() {
        require::skip("namespace", &why);
        return;
    }
    let up = upstream::http();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("w")).unwrap();
    let state = dir.path().join("state");
    let bb = |args: &[&str]| {
        Command::new(BB)
            .args(args)
            .current_dir(dir.path().join("w"))
            .env("XDG_STATE_HOME", &state)
            .env("HOME", dir.path())
            .output()
            .unwrap()
    };
    let out = bb(&[
        "run",
        "-d",
        "--name",
        "live",
        "--resolve",
        "new.test=127.0.0.1",
        "--allow-cidr",
        "127.0.0.1/32",
        "--",
        "sleep",
        "600",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let url = format!("http://new.test:{}/", up.port);
    let curl = || {
        let out = bb(&[
            "exec",
            "live",
            "--",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(curl(), "403");
        let entry = format!("new.test:{}", up.port);
        let out = bb(&["allow", "live", &entry]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert_eq!(curl(), "200");
        // Validated as a policy line: the loader's own refusal, exit 121, nothing changed.
        let out = bb(&["allow", "live", "*.com"]);
        assert_eq!(out.status.code(), Some(121), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("too broad"),
            "{}",
            text(&out)
        );
        let out = bb(&["deny", "live", "new.test"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert_eq!(curl(), "403");
        let shown = bb(&["policy", "show", "live"]);
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert!(
            shown.contains(&format!("\"{entry}\"")) && shown.contains("deny = [\"new.test:*\"]"),
            "{shown}"
        );
        // Where the lines came from: the changes made while it runs, in order.
        let history = shown.split("# Changed while running").nth(1).unwrap_or_default();
        assert!(
            history.contains(&format!("live-allow {entry} by uid 0"))
                && history.contains("live-deny new.test by uid 0"),
            "{shown}"
        );
        let audit = std::fs::read_to_string(state.join("bot-bottle/live/audit.jsonl")).unwrap();
        let changes: Vec<&str> = audit.lines().filter(|l| l.contains("\"policy-change\"")).collect();
        assert_eq!(changes.len(), 2, "{audit}");
        assert!(
            changes[0].contains(&format!("live-allow {entry} by uid 0")),
            "{}",
            changes[0]
        );

        // Another uid cannot reach the socket; the bottle does not see it at all.
        let socket = state.join("bot-bottle/live/control.sock");
        let nobody = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                "curl",
                "-s",
                "--max-time",
                "3",
            ])
            .arg("--unix-socket")
            .arg(&socket)
            .arg("http://x/")
            .output()
            .unwrap();
        assert_ne!(nobody.status.code(), Some(0), "{}", text(&nobody));
        let inside = bb(&[
            "exec",
            "live",
            "--",
            "sh",
            "-c",
            &format!("ls {} 2>&1; echo rc=$?", socket.display()),
        ]);
        assert!(
            !String::from_utf8_lossy(&inside.stdout).contains("rc=0"),
            "{}",
            text(&inside)
        );
    }));
    let _ = bb(&["rm", "-f", "live"]);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
