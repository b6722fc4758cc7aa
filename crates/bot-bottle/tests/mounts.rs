//! Host paths on purpose (#14): `--mount` and `[[mount]]` show a host path in real namespace bottles, read-only
//! unless written `rw`, with its tool directory on PATH; what must never be shown is refused before anything
//! starts; a link planted in a kept home cannot point a mount (or the directories made for it) at a host path.
//! Skips (saying why) where namespace bottles cannot run; `BOTTLE_TEST_REQUIRE=namespace` makes a skip a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bottle_test_support::bottles::{self, text};
use bottle_test_support::require;

const BB: &str = env!("CARGO_BIN_EXE_bot-bottle");

macro_rules! need_namespace {
    () => {
        if let Some(why) = bottles::namespace_unavailable(BB) {
            require::skip("namespace", &why);
            return;
        }
    };
}

/// A user's home with a tool directory and a credential store, a project, and bot-bottle's state beside them.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        for d in [".cargo/bin", ".ssh", "project", "tools"] {
            std::fs::create_dir_all(home.join(d)).unwrap();
        }
        let cargo = home.join(".cargo/bin/cargo");
        std::fs::write(&cargo, "#!/bin/sh\necho \"cargo 0.0.0 (mounted)\"\n").unwrap();
        std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(home.join(".ssh/id_ed25519"), "PRIVATE KEY\n").unwrap();
        Self { dir }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn bb(&self, args: &[&str]) -> Output {
        Command::new(BB)
            .args(args)
            .current_dir(self.home().join("project"))
            .env("HOME", self.home())
            .env("XDG_STATE_HOME", self.state())
            .output()
            .unwrap()
    }
}

#[test]
fn issue_14_a_mounted_tool_directory_is_on_path_and_read_only_unless_rw() {
    need_namespace!();
    let scene = Scene::new();
    let script =
        "cargo --version; touch ~/.cargo/x 2>/dev/null && echo wrote-ro; touch /opt/tools/made && echo wrote-rw";
    let tools = format!("{}:/opt/tools:rw", scene.home().join("tools").display());
    let out = scene.bb(&[
        "run", "--rm", "--mount", "~/.cargo", "--mount", &tools, "--", "sh", "-c", script,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("cargo 0.0.0 (mounted)"), "{}", text(&out));
    assert!(
        !stdout.contains("wrote-ro"),
        "a read-only mount was written: {}",
        text(&out)
    );
    assert!(stdout.contains("wrote-rw"), "{}", text(&out));
    assert!(!scene.home().join(".cargo/x").exists());
    assert!(scene.home().join("tools/made").exists());
}

#[test]
fn issue_14_the_users_real_toolchain_runs_when_mounted() {
    need_namespace!();
    let Some(real_home) = std::env::var_os("HOME").map(PathBuf::from) else {
        return;
    };
    if !real_home.join(".cargo/bin/cargo").exists() || !real_home.join(".rustup").is_dir() {
        eprintln!("skipped: no rustup toolchain under {}", real_home.display());
        return;
    }
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("w")).unwrap();
    let out = Command::new(BB)
        .args([
            "run",
            "--rm",
            "--mount",
            "~/.cargo:ro",
            "--mount",
            "~/.rustup:ro",
            "--",
            "cargo",
            "--version",
        ])
        .current_dir(work.path().join("w"))
        .env("XDG_STATE_HOME", work.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("cargo "),
        "{}",
        text(&out)
    );
}

#[test]
fn issue_14_credential_stores_the_home_itself_daemon_sockets_and_the_state_are_refused() {
    let scene = Scene::new();
    std::fs::create_dir_all(scene.state()).unwrap();
    let state = scene.state().display().to_string();
    let cases: [(&str, &str); 5] = [
        ("~/.ssh", "where credentials live"),
        ("~", "whole home directory"),
        ("/run", "daemon socket"),
        (&state, "state directory"),
        ("/", "whole host filesystem"),
    ];
    for (source, why) in cases {
        if source == "/run" && !Path::new("/run/docker.sock").exists() && !Path::new("/var/run/docker.sock").exists() {
            continue;
        }
        let out = scene.bb(&["run", "--rm", "--mount", source, "--", "true"]);
        assert_eq!(out.status.code(), Some(121), "--mount {source}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(why),
            "--mount {source}: {}",
            text(&out)
        );
    }
    // Nothing was started, so nothing was kept.
    assert!(
        !scene.state().join("bot-bottle/leases").exists()
            || std::fs::read_dir(scene.state().join("bot-bottle/leases"))
                .unwrap()
                .count()
                == 0
    );
    // A policy file says the same, and `policy check` renders what it allows.
    let policy = scene.dir.path().join("m.toml");
    std::fs::write(
        &policy,
        "[[mount]]\nsource = \"~/.cargo\"\n\n[[mount]]\nsource = \"tools\"\ntarget = \"/opt/tools\"\nmode = \"rw\"\n",
    )
    .unwrap();
    let out = scene.bb(&["policy", "check", policy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let bad = scene.dir.path().join("bad.toml");
    std::fs::write(&bad, "[[mount]]\nsource = \"~/.cargo\"\nmode = \"rwx\"\n").unwrap();
    let out = scene.bb(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(121), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"ro\" or \"rw\""),
        "{}",
        text(&out)
    );
}

#[test]
fn issue_14_a_link_planted_in_a_kept_home_cannot_aim_a_mount_at_the_host() {
    need_namespace!();
    let scene = Scene::new();
    let kept = scene.dir.path().join("kept-home");
    let planted = scene.dir.path().join("planted-on-host");
    // An earlier run leaves a link where the next run's mount point would be.
    let script = format!("ln -s {} ~/.cargo", planted.display());
    let out = scene.bb(&[
        "run",
        "--rm",
        "--home",
        kept.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        std::fs::symlink_metadata(kept.join(".cargo"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let out = scene.bb(&[
        "run",
        "--rm",
        "--home",
        kept.to_str().unwrap(),
        "--mount",
        "~/.cargo",
        "--",
        "true",
    ]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("symbolic link"),
        "{}",
        text(&out)
    );
    assert!(!planted.exists(), "the mount made {} on the host", planted.display());
}
