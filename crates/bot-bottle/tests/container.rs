//! The container backend (#15) with a real Docker daemon and a local image (no registry): an allowed HTTPS host is
//! reached through the bottle's proxy with interception, while direct connections, DNS (over UDP) and the host's
//! loopback are not; the container is confined (no capability, no new privileges, read-only root, never host root, only
//! `lo`); `stop` ends it and nothing is left; a launcher killed with -9 leaves a container that the next `ls`
//! removes; an absent image is refused before anything starts. Needs root and a Docker daemon;
//! `BOTTLE_TEST_REQUIRE=container` makes a skip a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bottle_test_support::bottles::text;
use bottle_test_support::ca::{TestCa, server_config};
use bottle_test_support::{container, require, upstream};

const BB: &str = env!("CARGO_BIN_EXE_bot-bottle");

/// A scratch state root and a workspace owned by `nobody` (a root launcher runs the agent as the workspace's owner).
struct Scene {
    dir: tempfile::TempDir,
    /// `DOCKER_HOST` for bot-bottle, when the engine is not Docker's own socket.
    engine: Option<String>,
}

impl Scene {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("w");
        std::fs::create_dir(&w).unwrap();
        std::os::unix::fs::chown(&w, Some(65534), Some(65534)).unwrap();
        Self { dir, engine: None }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn bb(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(BB);
        cmd.args(args)
            .current_dir(self.dir.path().join("w"))
            .env("XDG_STATE_HOME", self.state())
            .env("HOME", self.dir.path());
        if let Some(host) = &self.engine {
            cmd.env("DOCKER_HOST", host);
        }
        cmd.output().unwrap()
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `run --name NAME --backend container --image IMAGE -- ARGV`.
    fn run_container(&self, name: &str, image: &str, argv: &[&str]) -> Output {
        let mut args = vec!["run", "--name", name, "--backend", "container", "--image", image, "--"];
        args.extend(argv);
        self.bb(&args)
    }

    /// `run -d --name NAME` of `sleep 600` in a container of `image`.
    fn detached(&self, name: &str, image: &str) {
        let out = self.bb(&[
            "run",
            "-d",
            "--name",
            name,
            "--backend",
            "container",
            "--image",
            image,
            "--",
            "sleep",
            "600",
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
}

fn skip() -> bool {
    match container::unavailable() {
        Some(why) => {
            require::skip("container", &why);
            true
        }
        None => false,
    }
}

#[test]
fn issue_15_an_allowed_https_host_is_reached_through_the_proxy_and_nothing_else_is() {
    if skip() {
        return;
    }
    reaches_the_allowed_host_and_nothing_else(Scene::new(), "docker", None);
}

/// Podman's Docker-compatible socket, as `podman system service` serves it for root.
const PODMAN_SOCKET: &str = "/run/podman/podman.sock";

#[test]
fn issue_15_rootful_podman_confines_a_bottle_as_docker_does() {
    if skip() {
        return;
    }
    let why = if !Path::new("/usr/bin/podman").is_file() {
        Some("podman is missing (apt-get install podman runc)".to_string())
    } else if std::os::unix::net::UnixStream::connect(PODMAN_SOCKET).is_err() {
        Some(format!(
            "Podman's API does not answer at {PODMAN_SOCKET}: `podman system service -t 0 unix://{PODMAN_SOCKET} &`"
        ))
    } else {
        None
    };
    if let Some(why) = why {
        require::skip("podman", &why);
        return;
    }
    // The test image, moved from Docker's store to Podman's.
    let moved = Command::new("sh")
        .args(["-c", &format!("docker save {} | podman load -q", container::image())])
        .output()
        .unwrap();
    assert!(moved.status.success(), "{}", text(&moved));
    let mut scene = Scene::new();
    scene.engine = Some(format!("unix://{PODMAN_SOCKET}"));
    reaches_the_allowed_host_and_nothing_else(scene, "podman", None);
}

/// Rootless Podman's API as `.ci/run` starts it (a user with subordinate ids; README.md, "BOTTLE_TEST_REQUIRE").
const ROOTLESS_PODMAN_SOCKET: &str = "/run/bb-rootless/podman.sock";

#[test]
fn issue_15_a_rootless_engine_is_refused_with_the_rootful_socket_to_use() {
    if skip() {
        return;
    }
    if std::os::unix::net::UnixStream::connect(ROOTLESS_PODMAN_SOCKET).is_err() {
        require::skip(
            "podman-rootless",
            &format!("rootless Podman's API does not answer at {ROOTLESS_PODMAN_SOCKET} (.ci/run starts it as a user)"),
        );
        return;
    }
    let mut scene = Scene::new();
    scene.engine = Some(format!("unix://{ROOTLESS_PODMAN_SOCKET}"));
    let out = scene.run_container("ct-rootless", container::image(), &["true"]);
    assert_eq!(out.status.code(), Some(122), "{}", text(&out));
    says(
        &out.stderr,
        "the engine is rootless; container bottles need a rootful engine",
        &out,
    );
    says(&out.stderr, "unix:///var/run/docker.sock", &out);
    // cgroup v1 (no cgroup2 root): a rootless engine there ignores limits, and the refusal says so.
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        says(&out.stderr, "ignores every resource limit", &out);
    }
    // Nothing was asked of the engine beyond what it is.
    let listed = Command::new("curl")
        .args([
            "-sS",
            "--unix-socket",
            ROOTLESS_PODMAN_SOCKET,
            "http://d/v1.41/containers/json?all=1",
        ])
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", text(&listed));
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("bot-bottle-"),
        "{}",
        text(&listed)
    );
    let doctor = scene.bb(&["doctor", "--backend", "container"]);
    says(&doctor.stdout, "rootless", &doctor);
    says(&doctor.stdout, "container bottles need a rootful engine", &doctor);
}

/// A bottle on the engine `cli` names (under `runtime`, else the engine's default) reaches an allowed HTTPS host
/// through interception, and nothing else: no direct address, no DNS, no UDP, not the host's loopback; no
/// capability, no-new-privs, a read-only root, only `lo`.
fn reaches_the_allowed_host_and_nothing_else(scene: Scene, cli: &str, runtime: Option<&str>) {
    let image = container::image();
    let ca = TestCa::mint(scene.path(), "upstream-ca", "container test upstream CA");
    let up = upstream::https(server_config(&ca.leaf(&["up.test"]), &[b"http/1.1"]));
    // A service on the host's loopback: the bottle's own loopback is another one.
    let canary = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let canary_port = canary.local_addr().unwrap().port();
    let port = up.port;
    let script = format!(
        "curl -sS https://up.test:{port}/ ; echo; \
         echo direct=$(curl -s --noproxy '*' --max-time 3 -o /dev/null -w '%{{http_code}}' http://93.184.216.34/ || echo fail); \
         echo loopback=$(nc -z -w 2 127.0.0.1 {canary_port} && echo open || echo closed); \
         echo dns=$(nslookup -timeout=2 example.com 8.8.8.8 >/dev/null 2>&1 && echo answered || echo none); \
         echo udp=$(nslookup -type=a -timeout=2 example.com 1.1.1.1 2>&1 | grep -c Address: ); \
         echo ifaces=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ' '); \
         echo sys=$(ls -A /sys | tr '\\n' ,); \
         grep -E '^(CapEff|NoNewPrivs):' /proc/self/status | tr -s '\\t' ' '; \
         echo uid=$(id -u); touch /rootfs-write 2>/dev/null && echo root-writable || echo root-read-only"
    );
    let allow = format!("up.test:{port}");
    let mut args = vec!["run", "--backend", "container", "--image", image];
    if let Some(runtime) = runtime {
        args.extend(["--runtime", runtime]);
    }
    args.extend([
        "--upstream-ca",
        ca.cert_path.to_str().unwrap(),
        "--resolve",
        "up.test=127.0.0.1",
        "--allow-cidr",
        "127.0.0.1/32",
        "--allow",
        &allow,
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let out = scene.bb(&args);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(shown.contains("hello from tls upstream: GET /"), "{shown}");
    assert_eq!(up.requests(), 1, "{shown}");
    for line in [
        "direct=000",
        "loopback=closed",
        "dns=none",
        "CapEff: 0000000000000000",
        "uid=65534",
        "root-read-only",
    ] {
        assert!(shown.contains(line), "{line:?} missing: {shown}");
    }
    // gVisor's kernel does not list no-new-privs (the escape suite's probe asks it with prctl there).
    if runtime.is_none() {
        assert!(shown.contains("NoNewPrivs: 1"), "{shown}");
    }
    // DNS over UDP to two public resolvers: no answer at all (the datagrams have nowhere to go).
    assert!(shown.contains("udp=0"), "{shown}");
    assert!(shown.contains("ifaces=lo\n"), "{shown}");
    // The host's sysfs is not shown: an empty directory (Podman mounts the container's own cgroups, read-only, at
    // /sys/fs/cgroup over it).
    let sys = if cli == "podman" { "sys=fs,\n" } else { "sys=\n" };
    assert!(shown.contains(sys), "{sys:?} missing: {shown}");
    // The interception is on record: the CONNECT and the request inside it.
    let names: Vec<String> = std::fs::read_dir(scene.state().join("bot-bottle"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bottle-"))
        .collect();
    let audit = std::fs::read_to_string(scene.state().join("bot-bottle").join(&names[0]).join("audit.jsonl")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"event\":\"request\"")
            && l.contains("\"scheme\":\"https\"")
            && l.contains("up.test")),
        "{audit}"
    );
    // Nothing of the run is left in the engine.
    let left = Command::new(cli)
        .args(["ps", "-a", "--format", "{{.Names}}"])
        .output()
        .unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains(&format!("bot-bottle-{}", names[0])), "{left}");
    drop(canary);
}

#[test]
fn issue_15_the_agent_never_runs_in_the_host_root_group() {
    if skip() {
        return;
    }
    let scene = Scene::new();
    // What `chown -R nobody DIR` leaves of a directory root made: the user's, in root's group.
    std::os::unix::fs::chown(scene.path().join("w"), Some(65534), Some(0)).unwrap();
    let out = scene.bb(&[
        "run",
        "--rm",
        "--backend",
        "container",
        "--image",
        container::image(),
        "--",
        "sh",
        "-c",
        "echo ids=$(id -u):$(id -G)",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    says(&out.stdout, "ids=65534:65534\n", &out);
}

#[test]
fn issue_15_stop_ends_a_container_bottle_and_a_killed_launcher_is_swept() {
    if skip() {
        return;
    }
    let image = container::image();
    let scene = Scene::new();
    scene.detached("ct-stop", image);
    assert_eq!(container::containers("bot-bottle-ct-stop"), ["bot-bottle-ct-stop"]);
    let exec = scene.bb(&["exec", "ct-stop", "--", "sh", "-c", "pwd; echo $HTTPS_PROXY"]);
    let shown = String::from_utf8_lossy(&exec.stdout);
    assert!(shown.contains("/w\nhttp://127.0.0.1:3128"), "{}", text(&exec));
    let stop = scene.bb(&["stop", "ct-stop"]);
    assert_eq!(stop.status.code(), Some(0), "{}", text(&stop));
    assert!(container::containers("bot-bottle-ct-stop").is_empty());
    assert_eq!(scene.bb(&["rm", "ct-stop"]).status.code(), Some(0));

    // kill -9 of the launcher: its teardown never runs; the next `ls` finds the bottle dead and removes its container.
    scene.detached("ct-kill", image);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(scene.state().join("bot-bottle/ct-kill/state.json")).unwrap()).unwrap();
    let pid = i32::try_from(state["supervisor_pid"].as_u64().unwrap()).unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(container::containers("bot-bottle-ct-kill"), ["bot-bottle-ct-kill"]);
    let ls = scene.bb(&["ls"]);
    assert!(
        String::from_utf8_lossy(&ls.stdout).contains("its supervisor was killed"),
        "{}",
        text(&ls)
    );
    assert!(
        container::containers("bot-bottle-ct-kill").is_empty(),
        "the killed bottle's container was not removed"
    );
    let _ = scene.bb(&["rm", "-f", "ct-kill"]);
}

#[test]
fn issue_15_a_missing_image_is_refused_before_anything_starts() {
    if skip() {
        return;
    }
    let scene = Scene::new();
    let out = scene.bb(&["run", "--name", "ct-none", "--backend", "container", "--", "true"]);
    assert_eq!(out.status.code(), Some(122), "{}", text(&out));
    says(&out.stderr, "needs an image: `--image NAME`", &out);
    let out = scene.run_container("ct-none", "bot-bottle-test/absent:0", &["true"]);
    assert_eq!(out.status.code(), Some(122), "{}", text(&out));
    // The engine tried to pull it (no registry answers for that name here) and said why it could not.
    says(
        &out.stderr,
        "is not on this engine and the engine could not pull it (",
        &out,
    );
    assert!(container::containers("bot-bottle-ct-none").is_empty());
}

#[test]
fn issue_15_an_unprivileged_launcher_is_refused_before_anything_starts() {
    if skip() {
        return;
    }
    // As a member of the docker group would launch it: refused with the fix, before the engine is asked anything.
    let scene = Scene::new();
    std::os::unix::fs::chown(scene.path(), Some(65534), Some(65534)).unwrap();
    let out = Command::new(BB)
        .args([
            "run",
            "--name",
            "ct-user",
            "--backend",
            "container",
            "--image",
            container::image(),
            "--",
            "true",
        ])
        .current_dir(scene.path().join("w"))
        .env("XDG_STATE_HOME", scene.state())
        .env("HOME", scene.path())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(122), "{}", text(&out));
    says(&out.stderr, "container bottles are launched by root", &out);
    says(&out.stderr, "sudo bot-bottle run --backend container", &out);
    assert!(container::containers("bot-bottle-ct-user").is_empty());
    assert!(!scene.state().join("bot-bottle").join("ct-user").exists());
}

/// `stream` of `out` holds `words`.
fn says(stream: &[u8], words: impl AsRef<str>, out: &Output) {
    let words = words.as_ref();
    assert!(
        String::from_utf8_lossy(stream).contains(words),
        "{words:?} missing: {}",
        text(out)
    );
}

fn docker(args: &[&str]) -> Output {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(out.status.success(), "docker {args:?}: {}", text(&out));
    out
}

#[test]
fn issue_15_an_image_archive_is_loaded_and_named_by_its_path() {
    if skip() {
        return;
    }
    let scene = Scene::new();
    // An image that exists only in the archive `docker save` wrote.
    let name = "bot-bottle-test/archived:1";
    docker(&["tag", container::image(), name]);
    let archive = scene.path().join("img.tar");
    docker(&["save", "-o", archive.to_str().unwrap(), name]);
    docker(&["rmi", name]);
    // A relative path is the working directory's (here the workspace, under the scene).
    let out = scene.run_container("ct-load", "../img.tar", &["echo", "from-archive"]);
    let _ = Command::new("docker").args(["rmi", name]).output();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    says(&out.stdout, "from-archive", &out);
    says(&out.stderr, format!("loaded {name}"), &out);
    // Not an archive: refused before anything starts, saying what the engine said.
    std::fs::write(scene.path().join("junk.tar"), b"not a tar").unwrap();
    let out = scene.run_container("ct-junk", "../junk.tar", &["true"]);
    assert_eq!(out.status.code(), Some(122), "{}", text(&out));
    says(&out.stderr, "could not load the image archive", &out);
    assert!(container::containers("bot-bottle-ct-junk").is_empty());
}

/// A registry of the distribution project's (Debian's `docker-registry`) on a free loopback port, serving from `dir`.
struct Registry {
    child: std::process::Child,
    port: u16,
}

impl Registry {
    fn start(dir: &Path) -> Option<Self> {
        let bin = Path::new("/usr/bin/docker-registry");
        if !bin.is_file() {
            require::skip(
                "container",
                "/usr/bin/docker-registry is missing (apt-get install docker-registry)",
            );
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: \
                 127.0.0.1:{port}\n",
                dir.join("registry").display()
            ),
        )
        .unwrap();
        // Killed and reaped on drop, also when it never listens.
        let registry = Self {
            child: Command::new(bin).arg("serve").arg(&config).spawn().unwrap(),
            port,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(registry);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the registry did not listen on 127.0.0.1:{port}");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn issue_15_a_missing_image_is_pulled_with_progress() {
    if skip() {
        return;
    }
    let scene = Scene::new();
    let Some(registry) = Registry::start(scene.path()) else {
        return;
    };
    // The image is in the registry and not on the engine: a layer of its own (that the pull downloads) over the test
    // image's.
    let name = format!("127.0.0.1:{}/bot-bottle-test/pulled:1", registry.port);
    let ctx = scene.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    let unique = format!("{:?}", std::time::SystemTime::now());
    std::fs::write(ctx.join("marker"), unique).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {}\nCOPY marker /marker\n", container::image()),
    )
    .unwrap();
    docker(&["build", "-q", "-t", &name, ctx.to_str().unwrap()]);
    docker(&["push", &name]);
    docker(&["rmi", &name]);
    let out = scene.run_container("ct-pull", &name, &["echo", "from-pulled"]);
    let present = Command::new("docker")
        .args(["image", "inspect", &name])
        .output()
        .unwrap();
    let _ = Command::new("docker").args(["rmi", &name]).output();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    says(&out.stdout, "from-pulled", &out);
    let err = String::from_utf8_lossy(&out.stderr);
    // The progress, where the user is looking: the layer's own lines, then the result.
    for line in [
        format!("pulling image {name}"),
        "Pull complete".into(),
        format!("pulled {name}"),
    ] {
        assert!(err.contains(&line), "{line:?} missing: {}", text(&out));
    }
    assert!(present.status.success(), "the pulled image is on the engine");
}

#[test]
fn issue_15_an_interactive_run_gets_a_terminal_of_its_own() {
    if skip() {
        return;
    }
    let image = container::image();
    let scene = Scene::new();
    let mut launcher = Command::new(BB);
    launcher
        .args([
            "run",
            "--name",
            "ct-tty",
            "--backend",
            "container",
            "--image",
            image,
            "-e",
            "PS1=$ ",
            "--",
            "sh",
        ])
        .env("XDG_STATE_HOME", scene.state())
        .env("HOME", scene.path());
    let mut tui = bottle_test_support::tui::Tui::start(&launcher, &scene.path().join("w"));
    tui.type_keys(b"echo typed-$((40+2)); tty; stty size\r");
    // A terminal of its own, whose size is the user's (40 rows, 120 columns in the harness).
    tui.wait_for("typed-42 /dev/pts/0 40 120");
    tui.type_keys(b"exit 7\r");
    let shown = tui.finish();
    assert!(container::containers("bot-bottle-ct-tty").is_empty(), "{shown}");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(scene.state().join("bot-bottle/ct-tty/state.json")).unwrap()).unwrap();
    assert_eq!(state["exit_code"], 7, "{shown}");
}

#[test]
fn issue_15_exec_from_a_terminal_gets_a_terminal_in_the_container() {
    if skip() {
        return;
    }
    let image = container::image();
    let scene = Scene::new();
    scene.detached("ct-exec", image);
    let mut launcher = Command::new(BB);
    launcher
        .args(["exec", "ct-exec", "--", "sh"])
        .env("XDG_STATE_HOME", scene.state())
        .env("HOME", scene.path());
    let mut tui = bottle_test_support::tui::Tui::start(&launcher, &scene.path().join("w"));
    tui.type_keys(b"echo in-$((3+4)) $(tty) $(stty size) $HTTPS_PROXY\r");
    // Its own terminal, the user's size, and the bottle's environment.
    tui.wait_for("in-7 /dev/pts/0 40 120 http://127.0.0.1:3128");
    tui.type_keys(b"exit\r");
    let _ = tui.finish();
    let _ = scene.bb(&["rm", "-f", "ct-exec"]);
    assert!(container::containers("bot-bottle-ct-exec").is_empty());
}

#[test]
fn issue_15_written_limits_are_the_containers() {
    if skip() {
        return;
    }
    let image = container::image();
    let scene = Scene::new();
    std::fs::write(
        scene.path().join("w/bottle.toml"),
        "[bottle.resources]\nmemory_mib = 64\npids = 40\n",
    )
    .unwrap();
    // 300 MiB held by one process under a 64 MiB limit: the kernel kills it (137); 60 processes under a cap of 40:
    // some cannot be forked.
    let script = "head -c 300000000 /dev/zero | sort >/dev/null; echo mem=$?; \
                  ( for i in $(seq 60); do ( echo x >> /tmp/n; sleep 5 ) & done ) 2>/dev/null; \
                  sleep 1; echo started=$(wc -l < /tmp/n)";
    let out = scene.bb(&[
        "run",
        "--backend",
        "container",
        "--image",
        image,
        "--",
        "sh",
        "-c",
        script,
    ]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("mem=137"), "{}", text(&out));
    let started: usize = shown
        .lines()
        .find_map(|l| l.strip_prefix("started="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}", text(&out)));
    assert!(
        started < 40,
        "{started} processes started under pids = 40: {}",
        text(&out)
    );
}

#[test]
fn issue_15_a_container_of_that_name_that_is_not_the_bottles_is_never_touched() {
    if skip() {
        return;
    }
    let image = container::image();
    let scene = Scene::new();
    let theirs = Command::new("docker")
        .args(["create", "--name", "bot-bottle-ct-taken", image, "true"])
        .output()
        .unwrap();
    assert!(theirs.status.success(), "{}", text(&theirs));
    let out = scene.run_container("ct-taken", image, &["true"]);
    let _ = Command::new("docker")
        .args(["rm", "-f", "bot-bottle-ct-taken"])
        .output();
    assert_eq!(out.status.code(), Some(122), "{}", text(&out));
    says(&out.stderr, "exists and is not this bottle's", &out);
}

#[test]
fn issue_15_pass_env_values_reach_the_agent_but_never_the_engines_config() {
    if skip() {
        return;
    }
    let image = container::image();
    let scene = Scene::new();
    std::fs::write(
        scene.path().join("w/bottle.toml"),
        "[bottle]\npass_env = [\"BB_PASSED\"]\n",
    )
    .unwrap();
    let value = "passed-value-4c1e9d";
    let out = Command::new(BB)
        .args([
            "run",
            "-d",
            "--name",
            "ct-pass",
            "--backend",
            "container",
            "--image",
            image,
            "--",
        ])
        .args(["sh", "-c", "echo got=$BB_PASSED; sleep 600"])
        .current_dir(scene.path().join("w"))
        .env("XDG_STATE_HOME", scene.state())
        .env("HOME", scene.path())
        .env("BB_PASSED", value)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let inspect = Command::new("docker")
        .args(["inspect", "bot-bottle-ct-pass"])
        .output()
        .unwrap();
    let config = String::from_utf8_lossy(&inspect.stdout).into_owned();
    let mut logs = String::new();
    for _ in 0..50 {
        logs = String::from_utf8_lossy(&scene.bb(&["logs", "ct-pass"]).stdout).into_owned();
        if logs.contains("got=") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = scene.bb(&["rm", "-f", "ct-pass"]);
    assert!(inspect.status.success(), "{config}");
    assert!(!config.contains(value), "the engine's config holds the value: {config}");
    assert!(logs.contains(&format!("got={value}")), "{logs}");
}

/// A host listener on a Unix socket that counts connections (0777: only the warden stands in the way).
fn host_socket(path: &Path) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = std::sync::Arc::clone(&count);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    count
}

/// Whether the probe's verdict line for `case` (in order of appearance, `nth`) says it got through.
fn probe_escaped(stdout: &str, case: &str, nth: usize) -> bool {
    let line = stdout
        .lines()
        .filter(|l| l.contains(&format!("\"case\":\"{case}\"")))
        .nth(nth)
        .unwrap_or_else(|| panic!("no verdict #{nth} for {case} in:\n{stdout}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["escaped"].as_bool().unwrap()
}

/// #12 on this backend: the workspace is a bind of the host directory, so a host process's Unix socket there
/// answered the container. The container's commands (the agent and each `exec`) start under the socket warden: a
/// host socket present at launch, one made later and a datagram to one are refused; the container's own socket and
/// one `share_sockets` names answer.
#[test]
fn issue_12_a_container_bottle_connects_only_to_its_own_sockets_and_shared_ones() {
    if skip() {
        return;
    }
    let probe = bottle_test_support::probe::binary(BB);
    let image = container::image_with("bot-bottle-test/probe:1", probe, "bottle-probe");
    let scene = Scene::new();
    let w = scene.path().join("w");
    let present = host_socket(&w.join("host.sock"));
    let shared = host_socket(&w.join("dev.sock"));
    let dgram = std::os::unix::net::UnixDatagram::bind(w.join("host-dgram.sock")).unwrap();
    std::fs::set_permissions(
        w.join("host-dgram.sock"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    dgram.set_nonblocking(true).unwrap();
    let (ready, late_path) = (w.join("ready"), w.join("late.sock"));
    let late = std::thread::spawn(move || {
        for _ in 0..800 {
            if ready.exists() {
                return Some(host_socket(&late_path));
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        None
    });
    let policy = scene.path().join("policy.toml");
    std::fs::write(&policy, "[bottle]\nshare_sockets = [\"dev.sock\"]\n").unwrap();
    let script = format!(
        "bottle-probe unix-connect host.sock {w}/host.sock; bottle-probe unix-own own.sock; \
         bottle-probe unix-connect dev.sock; bottle-probe unix-connect-late ready late.sock; \
         bottle-probe unix-dgram host-dgram.sock",
        w = w.display()
    );
    let name = "ct-sockets";
    let out = scene.bb(&[
        "run",
        "-d",
        "--name",
        name,
        "--backend",
        "container",
        "--image",
        &image,
        "--policy",
        policy.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &format!("{script}; sleep 600"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let log = scene.state().join(format!("bot-bottle/{name}/agent.log"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut stdout = String::new();
    while std::time::Instant::now() < deadline {
        stdout = std::fs::read_to_string(&log).unwrap_or_default();
        if stdout.contains("\"case\":\"unix-dgram\"") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // An `exec`'d command is under the warden too.
    let exec = scene.bb(&["exec", name, "--", "bottle-probe", "unix-connect", "host.sock"]);
    let exec_out = String::from_utf8_lossy(&exec.stdout).into_owned();
    let _ = scene.bb(&["stop", name]);
    let _ = scene.bb(&["rm", name]);
    let all = format!("{stdout}\n--- exec\n{}", text(&exec));
    assert!(
        !probe_escaped(&stdout, "unix-connect", 0),
        "a host socket at launch answered: {all}"
    );
    assert!(
        probe_escaped(&stdout, "unix-own", 0),
        "the container's own socket did not answer: {all}"
    );
    assert!(
        probe_escaped(&stdout, "unix-connect", 1),
        "the shared socket did not answer: {all}"
    );
    assert!(
        !probe_escaped(&stdout, "unix-connect-late", 0),
        "a host socket made later answered: {all}"
    );
    assert!(
        !probe_escaped(&stdout, "unix-dgram", 0),
        "a datagram reached a host socket: {all}"
    );
    assert!(
        !probe_escaped(&exec_out, "unix-connect", 0),
        "exec reached a host socket: {all}"
    );
    let late = late
        .join()
        .unwrap()
        .expect("the container never asked for the late socket");
    assert_eq!(present.load(std::sync::atomic::Ordering::SeqCst), 0, "{all}");
    assert_eq!(late.load(std::sync::atomic::Ordering::SeqCst), 0, "{all}");
    assert_eq!(shared.load(std::sync::atomic::Ordering::SeqCst), 1, "{all}");
    assert!(dgram.recv(&mut [0u8; 16]).is_err(), "a datagram arrived: {all}");
}

/// Skips (or fails, under `BOTTLE_TEST_REQUIRE=runsc`) where no gVisor runtime is registered as bottles need it.
fn skip_gvisor() -> bool {
    if skip() {
        return true;
    }
    match container::gvisor_unavailable() {
        Some(why) => {
            require::skip("runsc", &why);
            true
        }
        None => false,
    }
}

#[test]
fn issue_15_under_gvisor_an_allowed_https_host_is_reached_through_the_proxy_and_nothing_else_is() {
    if skip_gvisor() {
        return;
    }
    reaches_the_allowed_host_and_nothing_else(Scene::new(), "docker", Some(container::GVISOR));
}

#[test]
fn issue_15_a_gvisor_bottle_is_gvisors_and_exec_and_stop_work_on_it() {
    if skip_gvisor() {
        return;
    }
    let scene = Scene::new();
    let out = scene.bb(&[
        "run",
        "-d",
        "--name",
        "ct-gvisor",
        "--backend",
        "container",
        "--image",
        container::image(),
        "--runtime",
        container::GVISOR,
        "--",
        "sleep",
        "600",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let runtime = docker(&["inspect", "-f", "{{.HostConfig.Runtime}}", "bot-bottle-ct-gvisor"]);
    says(&runtime.stdout, format!("{}\n", container::GVISOR), &runtime);
    // gVisor's kernel, the bottle's filter (no warden: gVisor refuses the listener), the proxy in the environment.
    let exec = scene.bb(&[
        "exec",
        "ct-gvisor",
        "--",
        "sh",
        "-c",
        "uname -r; grep Seccomp: /proc/self/status; echo $HTTPS_PROXY",
    ]);
    assert_eq!(exec.status.code(), Some(0), "{}", text(&exec));
    let shown = String::from_utf8_lossy(&exec.stdout);
    assert!(shown.starts_with("4.4.0\n"), "not gVisor's kernel: {}", text(&exec));
    assert!(shown.contains("Seccomp:\t2\nhttp://127.0.0.1:3128"), "{}", text(&exec));
    let stop = scene.bb(&["stop", "ct-gvisor"]);
    assert_eq!(stop.status.code(), Some(0), "{}", text(&stop));
    assert!(container::containers("bot-bottle-ct-gvisor").is_empty());
    assert_eq!(scene.bb(&["rm", "ct-gvisor"]).status.code(), Some(0));
}

#[test]
fn issue_15_a_runtime_the_engine_lacks_is_refused_before_anything_starts() {
    if skip() {
        return;
    }
    let scene = Scene::new();
    let out = scene.bb(&[
        "run",
        "--name",
        "ct-noruntime",
        "--backend",
        "container",
        "--image",
        container::image(),
        "--runtime",
        "bb-absent",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(122), "{}", text(&out));
    says(&out.stderr, "the container engine has no runtime `bb-absent`", &out);
    says(
        &out.stderr,
        r#""runtimeArgs": ["--network=host", "--host-fifo=open"]"#,
        &out,
    );
    assert!(container::containers("bot-bottle-ct-noruntime").is_empty());
}

#[test]
fn issue_15_a_shared_socket_under_gvisor_is_refused_not_ignored() {
    if skip_gvisor() {
        return;
    }
    let scene = Scene::new();
    let policy = scene.path().join("bottle.toml");
    std::fs::write(&policy, "[bottle]\nshare_sockets = [\"dev.sock\"]\n").unwrap();
    let out = scene.bb(&[
        "run",
        "--name",
        "ct-gvshare",
        "--policy",
        policy.to_str().unwrap(),
        "--backend",
        "container",
        "--image",
        container::image(),
        "--runtime",
        container::GVISOR,
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(120), "{}", text(&out));
    says(&out.stderr, "`share_sockets` cannot be kept there", &out);
    assert!(container::containers("bot-bottle-ct-gvshare").is_empty());
}

/// A gVisor registered as if it kept host sockets out, whose wrapper lets them through (`.ci/run` registers it as a
/// test fixture): the launch's own check inside the container catches it, and the agent never starts.
const LEAKY_GVISOR: &str = "bb-test-runsc-host-uds";

#[test]
fn issue_15_a_gvisor_that_lets_host_sockets_through_is_caught_before_the_agent_starts() {
    if skip_gvisor() {
        return;
    }
    let runtimes = docker(&["info", "--format", "{{json .Runtimes}}"]);
    if !String::from_utf8_lossy(&runtimes.stdout).contains(LEAKY_GVISOR) {
        require::skip(
            "runsc",
            &format!("the test fixture runtime {LEAKY_GVISOR} is not registered (.ci/run registers it)"),
        );
        return;
    }
    let scene = Scene::new();
    let marker = scene.path().join("w").join("agent-ran");
    let out = scene.bb(&[
        "run",
        "--name",
        "ct-leaky",
        "--backend",
        "container",
        "--image",
        container::image(),
        "--runtime",
        LEAKY_GVISOR,
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(123), "{}", text(&out));
    says(&out.stderr, "answered a process inside gVisor", &out);
    assert!(!marker.exists(), "the agent ran");
    assert!(container::containers("bot-bottle-ct-leaky").is_empty());
}
