//! `policy suggest` (#16): a real bottle is refused a host it lacks and a path its host's rules lack; the draft from
//! its audit log loads as a policy, and a second bottle run with it gets exactly those requests through while a
//! request the first bottle never made is still refused. Needs namespace bottles; `BOTTLE_TEST_REQUIRE=namespace`
//! makes a skip a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::process::Command;

use bottle_test_support::bottles::{self, text};
use bottle_test_support::{require, upstream};

const BB: &str = env!("CARGO_BIN_EXE_bot-bottle");

#[test]
fn issue_16_policy_suggest_drafts_exactly_what_was_refused() {
    if let Some(why) = bottles::namespace_unavailable(BB) {
        require::skip("namespace", &why);
        return;
    }
    let up = upstream::http();
    let port = up.port;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("w")).unwrap();
    let bb = |args: &[&str]| {
        Command::new(BB)
            .args(args)
            .current_dir(dir.path().join("w"))
            .env("XDG_STATE_HOME", dir.path().join("state"))
            .env("HOME", dir.path())
            .output()
            .unwrap()
    };
    // `rules.test` is allowed for GET /ok only; `new.test` not at all. Both resolve to the local upstream.
    let base = format!(
        "[network]\nallow_cidr = [\"127.0.0.1/32\"]\n[network.resolve]\n\"new.test\" = \"127.0.0.1\"\n\
         \"rules.test\" = \"127.0.0.1\"\n[[host]]\nname = \"rules.test:{port}\"\n[[host.rule]]\nmethods = [\"GET\"]\n\
         paths = [\"/ok\"]\n"
    );
    let base_file = dir.path().join("base.toml");
    std::fs::write(&base_file, &base).unwrap();
    let requests = format!(
        "for u in http://new.test:{port}/a http://rules.test:{port}/ok; do curl -s -o /dev/null -w '%{{http_code}} ' $u; done; \
         curl -s -o /dev/null -w '%{{http_code}} ' -X POST http://rules.test:{port}/submit; \
         curl -s -o /dev/null -w '%{{http_code}}' -X DELETE http://rules.test:{port}/submit"
    );
    let first = bb(&[
        "run",
        "--name",
        "learn",
        "--policy",
        base_file.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &requests,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&first.stdout),
        "403 200 403 403",
        "{}",
        text(&first)
    );

    let out = bb(&["policy", "suggest", "learn"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let draft = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(draft.contains(&format!("\"new.test:{port}\"")), "{draft}");
    assert!(
        draft.contains("methods = [\"DELETE\"]") && draft.contains("methods = [\"POST\"]"),
        "{draft}"
    );
    assert!(draft.contains("paths = [\"/submit\"]"), "{draft}");

    // The draft beside the base policy (its [network] allow and rules added to the base's): what was refused now
    // passes, and nothing more: a path never asked for stays refused.
    let merged = base.replace("[network]\n", &format!("[network]\nallow = [\"new.test:{port}\"]\n"))
        + &draft
            .split("\n[[host]]\n")
            .skip(1)
            .flat_map(|block| {
                block
                    .lines()
                    .skip(1)
                    .take_while(|l| !l.starts_with('#') || l.starts_with("[["))
            })
            .map(|l| format!("{l}\n"))
            .collect::<String>();
    let merged_file = dir.path().join("merged.toml");
    std::fs::write(&merged_file, &merged).unwrap();
    let check = bb(&["policy", "check", merged_file.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{merged}\n{}", text(&check));
    let again = format!("{requests}; curl -s -o /dev/null -w ' %{{http_code}}' -X POST http://rules.test:{port}/other");
    let second = bb(&[
        "run",
        "--rm",
        "--policy",
        merged_file.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &again,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&second.stdout),
        "200 200 200 200 403",
        "{merged}\n{}",
        text(&second)
    );
}
