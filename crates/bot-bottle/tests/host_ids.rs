//! A bottle never holds host root (#12): launched by root, its uid and gid 0 are a host id of its own (no user's),
//! with no supplementary group, for the init, the agent and `exec`; the workspace and a mounted tool directory are
//! still the invoking user's (idmapped mounts), and what the agent writes there is stored as the user's. Real
//! bottles, as root (the mapped launcher) and as `nobody` (ids map to themselves). Needs root and namespace bottles;
//! `BOTTLE_TEST_REQUIRE=namespace` makes a skip a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use bottle_test_support::bottles::{self, text};
use bottle_test_support::require;

const BB: &str = env!("CARGO_BIN_EXE_bot-bottle");

fn skip_reason() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("a mapped bottle needs a root launcher".into());
    }
    bottles::namespace_unavailable(BB)
}

macro_rules! need_root_bottles {
    () => {
        if let Some(why) = skip_reason() {
            require::skip("namespace", &why);
            return;
        }
    };
}

struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for d in ["work", "state", "tools/bin"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        Self { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn bb(&self, as_user: Option<u32>, args: &[&str]) -> Output {
        let mut cmd = bottles::launcher(BB, as_user);
        cmd.args(args)
            .current_dir(self.path("work"))
            .env("XDG_STATE_HOME", self.path("state"))
            .env("HOME", self.dir.path())
            .env_remove("BOT_BOTTLE_LOG")
            .output()
            .unwrap()
    }
}

/// `Uid:`/`Gid:` (real, effective, saved, fs) and `Groups:` of a host process, as the host sees them.
fn host_ids_of(pid: u32) -> (String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

/// The host pids of every process whose parent chain reaches `init`.
fn bottle_processes(init: u32) -> Vec<u32> {
    let mut found = vec![init];
    let mut grew = true;
    while grew {
        grew = false;
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let ppid = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .and_then(|p| p.trim().parse::<u32>().ok());
            if ppid.is_some_and(|p| found.contains(&p)) && !found.contains(&pid) {
                found.push(pid);
                grew = true;
            }
        }
    }
    found
}

#[test]
fn a_root_launchers_bottle_runs_as_its_own_host_id_and_the_users_files_stay_the_users() {
    need_root_bottles!();
    let s = Scene::new();
    // A root-only file in the workspace and in a tool directory under a 0700 directory, as in /root.
    std::fs::write(s.path("work/secret-of-the-user"), "mine\n").unwrap();
    std::fs::set_permissions(
        s.path("work/secret-of-the-user"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(s.path("tools/bin/tool"), "#!/bin/sh\necho tool-ran\n").unwrap();
    std::fs::set_permissions(s.path("tools/bin/tool"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(s.path("tools"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let tools = format!("{}:/opt/tools:ro", s.path("tools").display());
    let out = s.bb(
        None,
        &[
            "run",
            "-d",
            "--name",
            "ids",
            "--mount",
            &tools,
            "--",
            "sh",
            "-c",
            "sleep 600 & wait",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.path("state/bot-bottle/ids/state.json")).unwrap()).unwrap();
    let init = u32::try_from(state["init_pid"].as_u64().unwrap()).unwrap();
    // The agent's shell forks its sleep after `run -d` returns: wait for all three.
    let start = std::time::Instant::now();
    let mut procs = bottle_processes(init);
    while procs.len() < 3 && start.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        procs = bottle_processes(init);
    }
    assert!(procs.len() >= 3, "init, agent shell and sleep: {procs:?}");
    let (uid, gid, groups) = host_ids_of(init);
    let id: u32 = uid.split(' ').next().unwrap().parse().unwrap();
    assert!(
        id >= 0x7f00_0000,
        "the bottle's host id {id} is in its documented range"
    );
    for pid in &procs {
        let seen = host_ids_of(*pid);
        assert_eq!(
            seen,
            (
                format!("{id} {id} {id} {id}"),
                format!("{id} {id} {id} {id}"),
                String::new()
            ),
            "pid {pid}"
        );
    }
    assert_eq!(
        (uid.as_str(), gid.as_str()),
        (seen_all(id).as_str(), seen_all(id).as_str())
    );
    assert_eq!(groups, "");

    // Inside: root of the bottle, owning the user's files; what it writes is the user's on the host.
    let script = "id -u; cat secret-of-the-user; echo changed >> secret-of-the-user; echo new > written; \
                  mkdir made; /opt/tools/bin/tool; cat /proc/self/uid_map";
    let exec = s.bb(None, &["exec", "ids", "--", "sh", "-c", script]);
    assert!(exec.status.success(), "{}", text(&exec));
    let said = String::from_utf8_lossy(&exec.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines[..3], ["0", "mine", "tool-ran"], "{}", text(&exec));
    let map: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(map, ["0", &id.to_string(), "1"], "{}", text(&exec));
    for made in ["written", "made", "secret-of-the-user"] {
        let meta = std::fs::metadata(s.path("work").join(made)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{made} on the host");
    }
    assert_eq!(
        std::fs::read_to_string(s.path("work/secret-of-the-user")).unwrap(),
        "mine\nchanged\n"
    );
    let rm = s.bb(None, &["rm", "-f", "ids"]);
    assert!(rm.status.success(), "{}", text(&rm));
    assert!(!Path::new(&format!("/proc/{init}")).exists(), "the bottle is gone");
}

fn seen_all(id: u32) -> String {
    format!("{id} {id} {id} {id}")
}

#[test]
fn an_unprivileged_launchers_bottle_keeps_its_own_ids() {
    need_root_bottles!();
    let s = Scene::new();
    for p in [s.dir.path().to_path_buf(), s.path("work"), s.path("state")] {
        std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
    }
    let out = s.bb(
        Some(65534),
        &[
            "run",
            "--rm",
            "--",
            "sh",
            "-c",
            "id -u; cat /proc/self/uid_map; touch w",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines[0], "65534", "{}", text(&out));
    assert_eq!(lines[1].split_whitespace().collect::<Vec<_>>(), ["65534", "65534", "1"]);
    assert_eq!(std::fs::metadata(s.path("work/w")).unwrap().uid(), 65534);
}
