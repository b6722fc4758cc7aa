//! A bottle cannot starve the host (#12): real bottles with `[bottle.resources]` written and without, on this host's
//! cgroups (v1 here as root; v2 elsewhere). A fork bomb stops at the bottle's own cap while another bottle still
//! starts; a memory limit stops an allocation over it; each tmpfs is bounded; a written limit that cannot be
//! enforced refuses the launch. Needs root and namespace bottles; `BOTTLE_TEST_REQUIRE=namespace` makes a skip a
//! failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bottle_test_support::bottles::{self, text};
use bottle_test_support::require;

const BB: &str = env!("CARGO_BIN_EXE_bot-bottle");

/// Whether this host can run these tests; `None` means yes.
fn skip_reason() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("the limits are enforced through cgroups only root may create on this host".into());
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
        std::fs::create_dir(dir.path().join("work")).unwrap();
        Self { dir }
    }

    fn policy(&self, name: &str, toml: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        path
    }

    fn command(&self, as_user: Option<u32>, args: &[&str]) -> Command {
        let mut cmd = match as_user {
            None => Command::new(BB),
            Some(uid) => {
                let mut c = Command::new("setpriv");
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
        cmd.args(args)
            .current_dir(self.dir.path().join("work"))
            .env("XDG_STATE_HOME", self.dir.path().join("state"))
            .env("HOME", self.dir.path());
        cmd
    }

    fn bb(&self, args: &[&str]) -> Output {
        self.command(None, args).output().unwrap()
    }
}

/// The bottle's cgroup directories left anywhere under the cgroup mounts.
fn leftover_cgroups(name: &str) -> Vec<PathBuf> {
    let leaf = format!("bot-bottle-{name}");
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if e.file_name() == leaf.as_str() {
                    found.push(e.path());
                }
                // The launcher's own cgroups are a few levels down at most.
                if e.path().components().count() < 9 {
                    stack.push(e.path());
                }
            }
        }
    }
    found
}

#[test]
fn issue_12_a_memory_limit_stops_an_allocation_over_it_and_tmpfs_is_bounded() {
    need_root_bottles!();
    let scene = Scene::new();
    let policy = scene.policy(
        "mem",
        "[bottle]\nname = \"mem64\"\n[bottle.resources]\nmemory_mib = 64\n",
    );
    // 300 MiB held in a shell variable; then /tmp filled past its bound.
    let script = "x=$(head -c 314572800 /dev/zero | tr '\\0' a); echo \"held ${#x}\"";
    let out = scene.bb(&[
        "run",
        "--rm",
        "--policy",
        policy.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("held"), "{}", text(&out));

    let fill = "df -k /tmp /dev/shm | tail -2; head -c 100000000 /dev/zero > /tmp/big; echo rc=$?; wc -c < /tmp/big";
    let out = scene.bb(&[
        "run",
        "--rm",
        "--policy",
        policy.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        fill,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("rc=1"), "{}", text(&out));
    // Half the 64 MiB limit per tmpfs.
    assert!(
        stdout.contains("\n33554432\n") || stdout.ends_with("33554432\n"),
        "{}",
        text(&out)
    );
    assert!(
        stdout
            .lines()
            .take(2)
            .all(|l| l.split_whitespace().nth(1) == Some("32768")),
        "{}",
        text(&out)
    );

    // Without a written limit the same allocation fits (the default is half the host's RAM, at most 8 GiB).
    let out = scene.bb(&["run", "--rm", "--", "sh", "-c", script]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("held 314572800"),
        "{}",
        text(&out)
    );
    assert_eq!(leftover_cgroups("mem64"), Vec::<PathBuf>::new());
}

#[test]
fn issue_12_a_fork_bomb_stops_at_the_bottles_cap_while_another_bottle_starts() {
    need_root_bottles!();
    let scene = Scene::new();
    let policy = scene.policy("pids", "[bottle]\nname = \"bomb\"\n[bottle.resources]\npids = 50\n");
    // A fork bomb that records how far it got, detached so the host can start another bottle beside it.
    let bomb = "i=0; while [ $i -lt 200 ]; do sleep 30 & i=$((i+1)); echo $i > count; done 2>/dev/null; sleep 30";
    let out = scene.bb(&[
        "run",
        "-d",
        "--policy",
        policy.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        bomb,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let count = scene.dir.path().join("work/count");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    loop {
        let now = std::fs::read_to_string(&count).unwrap_or_default();
        if !now.is_empty() && now == last {
            break;
        }
        assert!(Instant::now() < deadline, "the fork bomb never settled (at {now:?})");
        last = now;
        std::thread::sleep(Duration::from_millis(300));
    }
    let forked: u32 = last.trim().parse().unwrap();
    assert!(forked < 50, "the bottle forked {forked} processes under pids = 50");

    let other = scene.bb(&["run", "--rm", "--", "sh", "-c", "echo second bottle ran"]);
    assert!(
        String::from_utf8_lossy(&other.stdout).contains("second bottle ran"),
        "{}",
        text(&other)
    );
    let stopped = scene.bb(&["rm", "-f", "bomb"]);
    assert_eq!(stopped.status.code(), Some(0), "{}", text(&stopped));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !leftover_cgroups("bomb").is_empty() {
        assert!(
            Instant::now() < deadline,
            "cgroups left: {:?}",
            leftover_cgroups("bomb")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn issue_12_a_written_limit_this_host_cannot_enforce_refuses_the_launch() {
    need_root_bottles!();
    // An unprivileged launcher on a cgroup v1 host (this one) cannot create cgroups; elsewhere it may be delegated.
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        eprintln!("skipped: a cgroup v2 host may delegate cgroups to an unprivileged launcher");
        return;
    }
    let scene = Scene::new();
    std::fs::set_permissions(scene.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::set_permissions(
        scene.dir.path().join("work"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let policy = scene.policy("nobody", "[bottle.resources]\npids = 50\n");
    std::fs::set_permissions(&policy, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let nobody = 65534;
    let out = scene
        .command(
            Some(nobody),
            &["run", "--rm", "--policy", policy.to_str().unwrap(), "--", "true"],
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(122), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("processes to 50") && stderr.contains("Delegate=yes"),
        "{}",
        text(&out)
    );
    // Without a written limit the launch goes on, saying what it could not apply.
    let out = scene
        .command(Some(nobody), &["run", "--rm", "--", "sh", "-c", "echo ran"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("ran"), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without its default memory and process limits"));
}
