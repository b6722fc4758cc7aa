//! Container-engine fixtures: whether a Docker daemon answers here, and a local test image built without any
//! registry (static busybox for the shell, plus the host's `curl` with the libraries it links, `FROM scratch`).

use std::path::Path;
use std::process::Command;

/// The test image's name; built once per machine (the build is cached by the engine afterwards).
pub const IMAGE: &str = "bot-bottle-test/curl:1";

/// Why container tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("the container tests need root (a rootful engine)".into());
    }
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "no Docker daemon answers: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("no docker CLI: {e}")),
    }
}

/// The engine's runtime gVisor bottles run under in the tests.
pub const GVISOR: &str = "runsc";

/// Why container bottles under gVisor cannot run here (no rootful engine, or no `runsc` runtime registered as
/// bottles need it: `.ci/run` writes the daemon.json entry), or `None` when they can.
pub fn gvisor_unavailable() -> Option<String> {
    if let Some(why) = unavailable() {
        return Some(why);
    }
    let out = Command::new("docker")
        .args(["info", "--format", "{{json .Runtimes}}"])
        .output()
        .ok()?;
    let runtimes = String::from_utf8_lossy(&out.stdout);
    let registered = runtimes.contains(&format!("\"{GVISOR}\":"))
        && runtimes.contains("--network=host")
        && runtimes.contains("--host-fifo=open");
    (!registered).then(|| {
        format!(
            "the engine has no runtime `{GVISOR}` registered with --network=host --host-fifo=open (it has {}); \
             see README.md, gVisor",
            runtimes.trim()
        )
    })
}

/// Builds `IMAGE` from this host's busybox and curl; panics if it cannot.
pub fn image() -> &'static str {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| build(IMAGE, &[]));
    IMAGE
}

/// An image with `IMAGE`'s tools plus `binary` (and the libraries it links) at `/usr/local/bin/<name>`, and an
/// `/etc/passwd` naming `nobody` (agents look their user up). Built on each call (the engine caches the layers).
pub fn image_with(tag: &str, binary: &Path, name: &str) -> String {
    build(tag, &[(binary, name)]);
    tag.to_string()
}

/// The escape suite's image: `IMAGE`'s tools, the probe at `/usr/local/bin/bottle-probe`, and the host's tools the
/// catalogue's shell cases drive that busybox lacks (bash, getent, openssl, ssh, git and its https helper), each
/// with the libraries it links, at their host paths.
pub const ESCAPE_IMAGE: &str = "bot-bottle-test/escape:1";

pub fn escape_image(probe: &Path) -> &'static str {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let tools = [
            "/usr/bin/bash",
            "/usr/bin/getent",
            "/usr/bin/openssl",
            "/usr/bin/ssh",
            "/usr/bin/git",
            "/usr/lib/git-core/git-remote-http",
        ];
        build_with(ESCAPE_IMAGE, &[(probe, "bottle-probe")], &tools.map(Path::new));
    });
    ESCAPE_IMAGE
}

fn build(tag: &str, extra: &[(&Path, &str)]) {
    build_with(tag, extra, &[]);
}

fn build_with(tag: &str, extra: &[(&Path, &str)], tools: &[&Path]) {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path();
    copy_into(ctx, Path::new("/bin/busybox"));
    let curl = Path::new("/usr/bin/curl");
    copy_into(ctx, curl);
    copy_libs(ctx, curl);
    for tool in tools {
        copy_into(ctx, tool);
        copy_libs(ctx, tool);
    }
    if tools.iter().any(|t| t.ends_with("git-remote-http")) {
        std::os::unix::fs::symlink("git-remote-http", ctx.join("root/usr/lib/git-core/git-remote-https")).unwrap();
    }
    for (binary, name) in extra {
        let at = ctx.join("root/usr/local/bin").join(name);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::copy(binary, &at).unwrap();
        copy_libs(ctx, binary);
    }
    let etc = ctx.join("root/etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home/agent:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(etc.join("group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY root/ /\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCMD [\"/bin/sh\"]\n",
    )
    .unwrap();
    let out = Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .arg(ctx)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The libraries `binary` links (as `ldd` lists them), at their paths.
fn copy_libs(ctx: &Path, binary: &Path) {
    let ldd = Command::new("ldd").arg(binary).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`
        let path = line
            .split("=>")
            .last()
            .and_then(|p| p.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(p) = path {
            copy_into(ctx, Path::new(p));
        }
    }
}

/// Copies `path` (following links) into `ctx/root` at the same path.
fn copy_into(ctx: &Path, path: &Path) {
    let at = ctx.join("root").join(path.strip_prefix("/").unwrap());
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::fs::copy(path, &at).unwrap();
}

/// Names of the containers (running or not) whose name starts with `prefix`.
pub fn containers(prefix: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-a", "--format", "{{.Names}}"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}
