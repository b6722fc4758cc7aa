//! The container a bottle is, as data: what the engine is asked to create. Pure; every setting that confines the
//! bottle is here, where a test reads it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountTmpfsOptions, MountType};

use super::runtime::{Chosen, Confinement};
use super::sockets::{self, Runtime};
use crate::backend::{BottleSpec, MountTarget};
use crate::namespace::spec::IN_BOTTLE_CA_BUNDLE;

/// Where the gate the agent waits at (a FIFO) and the CA bundle appear in the container.
pub const IN_CONTAINER_DIR: &str = "/.bot-bottle";
pub const GATE: &str = "gate";
/// The credentials' placeholders, as `export` lines the gate (and `exec`) source.
pub const ENV_FILE: &str = "env";
/// The workspace's path, for `exec`.
pub const WORKDIR_FILE: &str = "workdir";
/// The CA bundle (system roots and the bottle CA), also shown at `IN_BOTTLE_CA_BUNDLE`.
pub const CA_FILE: &str = "ca-bundle.pem";
/// The container's /etc/resolv.conf: no resolver.
pub const RESOLV_FILE: &str = "resolv.conf";
/// The agent's home when the bottle keeps none.
pub const HOME: &str = "/home/agent";
/// Labels every bottle's container carries (the orphan sweep finds them by these).
pub const OWNER_LABEL: (&str, &str) = ("owner", "bot-bottle");
pub const BOTTLE_LABEL: &str = "bottle";
/// `/tmp` (and a fresh home) are tmpfs of at most this, counted against the container's memory.
const TMPFS_BYTES: i64 = 256 << 20;
/// Labels naming the state root a container belongs to (sweeps never touch another root's bottles).
pub const ROOT_LABEL: &str = "bot-bottle.root";

/// What the plan needs besides the spec.
pub struct Inputs<'a> {
    pub spec: &'a BottleSpec,
    pub image: &'a str,
    /// `uid:gid` the agent runs as (never 0).
    pub user: (u32, u32),
    /// The host directory holding the gate FIFO and the CA bundle (shown read-only at `IN_CONTAINER_DIR`).
    pub shared_dir: &'a Path,
    /// The whole environment (proxy, CA, the policy's) as `KEY=VALUE`.
    pub env: &'a BTreeMap<String, String>,
    /// bot-bottle's state root, as a label.
    pub root: &'a Path,
    /// The launcher's binary and libraries, shown read-only: every command starts under the socket warden.
    pub runtime: &'a Runtime,
    /// The engine's runtime the container runs under, and how it keeps host sockets out.
    pub oci: &'a Chosen,
}

/// The name of a bottle's container.
pub fn container_name(bottle: &str) -> String {
    format!("bot-bottle-{bottle}")
}

pub fn plan(i: &Inputs<'_>) -> ContainerCreateBody {
    let spec = i.spec;
    let home = PathBuf::from(HOME);
    let mut binds = vec![
        bind(&spec.workspace, &spec.workspace, true),
        bind(i.shared_dir, Path::new(IN_CONTAINER_DIR), false),
        // The CA bundle where every backend's bottle has it.
        bind(&i.shared_dir.join(CA_FILE), Path::new(IN_BOTTLE_CA_BUNDLE), false),
        // SECURITY: the engine copies the host's resolv.conf even into a container without a network; the bottle
        // learns nothing of the host's resolvers (it resolves nothing: its proxy does).
        bind(&i.shared_dir.join(RESOLV_FILE), Path::new("/etc/resolv.conf"), false),
    ];
    if let Some(h) = &spec.home {
        binds.push(bind(h, &home, true));
    }
    for m in &spec.mounts {
        let target = match &m.target {
            MountTarget::Absolute(p) => p.clone(),
            MountTarget::InHome(rel) => home.join(rel),
        };
        binds.push(bind(&m.source, &target, m.writable));
    }
    binds.extend(i.runtime.binds());
    if i.oci.confinement == Confinement::Gvisor {
        // gVisor opens a host FIFO for writing only on a writable bind: the report FIFO's own folder (root's, 0755:
        // nothing can be made in it) is the one writable bind of bot-bottle's.
        binds.push(bind(
            &i.shared_dir.join(sockets::REPORT_DIR),
            Path::new(sockets::IN_CONTAINER_REPORT_DIR),
            true,
        ));
    }
    // SECURITY: the engine shows the host's sysfs (read-only) in the container; a bottle sees none of it.
    let mut tmpfs = vec![tmpfs_at("/tmp", 0o1777), empty_at("/sys")];
    if spec.home.is_none() {
        tmpfs.push(tmpfs_at(HOME, 0o700));
    }
    let gate = format!("{IN_CONTAINER_DIR}/{GATE}");
    // The agent starts only once the bottle's confinement was verified from outside: it waits at the gate.
    // Under gVisor the first command reports what gVisor's kernel says of it before anything else runs, then is
    // the container's init.
    let mut cmd = match i.oci.confinement {
        Confinement::Warden => Vec::new(),
        Confinement::Gvisor => i.runtime.gvisor_check_prefix(),
    };
    cmd.extend([
        "/bin/sh".to_string(),
        "-c".into(),
        format!(
            ". {gate} || exit 125; . {IN_CONTAINER_DIR}/{ENV_FILE} || exit 125; cd \"$1\" || exit 125; shift; \
             exec \"$@\""
        ),
        "bot-bottle-gate".into(),
        // The working directory, here rather than the engine's `WorkingDir`: Docker 20.10 creates that one in the
        // image before the tmpfs mounts, which then lose their mode (a /tmp of 0755 when the workspace is under it).
        spec.workspace.display().to_string(),
    ]);
    // SECURITY (#12): the command starts under the socket warden, which judges every connect it makes. Under
    // gVisor, whose kernel refuses host sockets itself, the first command is the init and confines the gate's shell
    // with the seccomp filter alone.
    if i.oci.confinement == Confinement::Warden {
        cmd.extend(i.runtime.prefix(i.oci.confinement));
    }
    cmd.extend(spec.argv.iter().cloned());
    let labels = HashMap::from([
        (OWNER_LABEL.0.to_string(), OWNER_LABEL.1.to_string()),
        (BOTTLE_LABEL.to_string(), spec.name.to_string()),
        (ROOT_LABEL.to_string(), i.root.display().to_string()),
    ]);
    // An interactive run: the container gets a terminal of its own, joined to the user's through a local pty.
    let terminal = matches!(spec.io, crate::backend::AgentIo::Terminal);
    ContainerCreateBody {
        tty: Some(terminal),
        open_stdin: Some(terminal),
        attach_stdin: Some(terminal),
        image: Some(i.image.to_string()),
        entrypoint: Some(Vec::new()),
        cmd: Some(cmd),
        env: Some(i.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        user: Some(format!("{}:{}", i.user.0, i.user.1)),
        labels: Some(labels),
        hostname: Some(spec.name.to_string()),
        host_config: Some(HostConfig {
            // SECURITY: only `lo`; the proxy's listener is put into this namespace from the host.
            network_mode: Some("none".into()),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            readonly_rootfs: Some(true),
            mounts: Some(tmpfs),
            binds: Some(binds),
            memory: spec
                .memory_mib
                .map(|m| i64::try_from(m.saturating_mul(1 << 20)).unwrap_or(i64::MAX)),
            // No swap beyond the memory limit.
            memory_swap: spec
                .memory_mib
                .map(|m| i64::try_from(m.saturating_mul(1 << 20)).unwrap_or(i64::MAX)),
            pids_limit: Some(spec.pids.map_or(DEFAULT_PIDS, i64::from)),
            nano_cpus: spec.cpus.map(|c| i64::from(c) * 1_000_000_000),
            // The container's init is bot-bottle's own (`sockets::exec_under_warden`): the agent cannot read or write
            // it, `stop`'s SIGTERM reaches the agent, zombies are reaped. The engine's would be the agent's to ptrace.
            init: Some(false),
            privileged: Some(false),
            // The engine's default runtime unless the policy names one (`runsc`: gVisor).
            runtime: i.oci.name.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `command` run with the placeholders of the bottle's credentials in its environment, under the socket warden
/// (for `exec`).
pub fn with_env(runtime: &Runtime, confinement: Confinement, command: &[String]) -> Vec<String> {
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        format!(
            ". {IN_CONTAINER_DIR}/{ENV_FILE} || exit 125; cd \"$(cat {IN_CONTAINER_DIR}/{WORKDIR_FILE})\" || exit 125; \
             exec \"$@\""
        ),
        "bot-bottle-exec".into(),
    ];
    argv.extend(runtime.prefix(confinement));
    argv.extend(command.iter().cloned());
    argv
}

/// The pids cap when the policy names none (as the namespace backend's default).
pub const DEFAULT_PIDS: i64 = 4096;

fn tmpfs_at(target: &str, mode: i64) -> Mount {
    Mount {
        target: Some(target.into()),
        typ: Some(MountType::TMPFS),
        tmpfs_options: Some(MountTmpfsOptions {
            size_bytes: Some(TMPFS_BYTES),
            mode: Some(mode),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An empty read-only tmpfs over `target`.
fn empty_at(target: &str) -> Mount {
    Mount {
        target: Some(target.into()),
        typ: Some(MountType::TMPFS),
        read_only: Some(true),
        tmpfs_options: Some(MountTmpfsOptions {
            size_bytes: Some(4096),
            mode: Some(0o555),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn bind(source: &Path, target: &Path, writable: bool) -> String {
    let mode = if writable { "rw" } else { "ro" };
    format!("{}:{}:{mode}", source.display(), target.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{AgentIo, MountSpec};

    fn spec() -> BottleSpec {
        BottleSpec {
            name: bottle_policy::BottleName::parse("b1").unwrap(),
            addr: std::net::Ipv4Addr::new(127, 0, 0, 2),
            argv: vec!["echo".into(), "hi there".into()],
            workspace: "/w".into(),
            home: None,
            env: BTreeMap::new(),
            pass_env: BTreeMap::new(),
            image: Some("local/busybox".into()),
            runtime: None,
            cpus: Some(2),
            memory_mib: Some(64),
            pids: None,
            mounts: vec![MountSpec {
                source: "/h/.cargo".into(),
                target: MountTarget::InHome(".cargo".into()),
                writable: false,
            }],
            share_sockets: Vec::new(),
            io: AgentIo::Inherit,
        }
    }

    #[test]
    fn the_container_is_confined_and_waits_at_the_gate() {
        let s = spec();
        let env = BTreeMap::from([("HOME".to_string(), HOME.to_string())]);
        let runtime = Runtime {
            exe: "/opt/bb/bot-bottle".into(),
            libs: vec!["/lib/libc.so.6".into(), "/lib64/ld-linux-x86-64.so.2".into()],
            loader: "/lib64/ld-linux-x86-64.so.2".into(),
        };
        let body = plan(&Inputs {
            spec: &s,
            image: "local/busybox",
            user: (1000, 1000),
            shared_dir: Path::new("/state/b1/container"),
            env: &env,
            root: Path::new("/state"),
            runtime: &runtime,
            oci: &Chosen {
                name: None,
                confinement: Confinement::Warden,
            },
        });
        let hc = body.host_config.unwrap();
        assert_eq!(hc.runtime, None);
        assert_eq!(hc.network_mode.as_deref(), Some("none"));
        assert_eq!(hc.cap_drop.unwrap(), ["ALL"]);
        assert_eq!(hc.security_opt.unwrap(), ["no-new-privileges"]);
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert_eq!(hc.memory, Some(64 << 20));
        assert_eq!(hc.memory_swap, Some(64 << 20));
        assert_eq!(hc.pids_limit, Some(DEFAULT_PIDS));
        assert_eq!(hc.nano_cpus, Some(2_000_000_000));
        assert_eq!(
            hc.binds.unwrap(),
            [
                "/w:/w:rw",
                "/state/b1/container:/.bot-bottle:ro",
                "/state/b1/container/ca-bundle.pem:/etc/bot-bottle/ca-bundle.pem:ro",
                "/state/b1/container/resolv.conf:/etc/resolv.conf:ro",
                "/h/.cargo:/home/agent/.cargo:ro",
                "/opt/bb/bot-bottle:/.bot-bottle-rt/bot-bottle:ro",
                "/lib/libc.so.6:/.bot-bottle-rt/lib/libc.so.6:ro",
                "/lib64/ld-linux-x86-64.so.2:/.bot-bottle-rt/lib/ld-linux-x86-64.so.2:ro",
            ]
        );
        let tmpfs: Vec<_> = hc
            .mounts
            .unwrap()
            .into_iter()
            .map(|m| (m.target.unwrap(), m.tmpfs_options.unwrap().mode, m.read_only))
            .collect();
        assert_eq!(
            tmpfs,
            [
                ("/tmp".to_string(), Some(0o1777), None),
                // The host's sysfs is hidden under an empty read-only tmpfs.
                ("/sys".to_string(), Some(0o555), Some(true)),
                (HOME.to_string(), Some(0o700), None)
            ]
        );
        // bot-bottle's own init, not the engine's.
        assert_eq!(hc.init, Some(false));
        assert_eq!(body.user.as_deref(), Some("1000:1000"));
        let cmd = body.cmd.unwrap();
        assert_eq!(cmd[..2], ["/bin/sh", "-c"]);
        assert!(cmd[2].starts_with(". /.bot-bottle/gate ||"));
        // The command starts under the socket warden.
        assert_eq!(
            cmd[4..],
            [
                "/w",
                "/.bot-bottle-rt/lib/ld-linux-x86-64.so.2",
                "--library-path",
                "/.bot-bottle-rt/lib",
                "/.bot-bottle-rt/bot-bottle",
                "__warden-exec",
                "/.bot-bottle/warden.sock",
                "--",
                "echo",
                "hi there"
            ]
        );
        assert_eq!(body.working_dir, None);
        assert_eq!(body.labels.unwrap()["owner"], "bot-bottle");
    }

    #[test]
    fn under_gvisor_the_runtime_is_named_and_the_command_starts_without_the_warden() {
        let s = spec();
        let env = BTreeMap::new();
        let runtime = Runtime {
            exe: "/opt/bb/bot-bottle".into(),
            libs: vec!["/lib64/ld-linux-x86-64.so.2".into()],
            loader: "/lib64/ld-linux-x86-64.so.2".into(),
        };
        let body = plan(&Inputs {
            spec: &s,
            image: "local/busybox",
            user: (1000, 1000),
            shared_dir: Path::new("/state/b1/container"),
            env: &env,
            root: Path::new("/state"),
            runtime: &runtime,
            oci: &Chosen {
                name: Some("runsc".into()),
                confinement: Confinement::Gvisor,
            },
        });
        let hc = body.host_config.unwrap();
        assert_eq!(hc.runtime.as_deref(), Some("runsc"));
        // Every other setting is the same as under runc.
        assert_eq!(hc.network_mode.as_deref(), Some("none"));
        assert_eq!(hc.cap_drop.unwrap(), ["ALL"]);
        let cmd = body.cmd.unwrap();
        // First the report of what gVisor says of the container (then the init), then the gate, then the command;
        // no warden.
        assert_eq!(
            cmd[4..8],
            [
                "__gvisor-check",
                "/.bot-bottle/decoy.sock",
                "/.bot-bottle-report/report",
                "--"
            ]
        );
        assert_eq!(cmd[8..10], ["/bin/sh", "-c"]);
        assert_eq!(cmd[12..], ["/w", "echo", "hi there"]);
        assert!(!cmd.iter().any(|a| a.contains("warden.sock")), "{cmd:?}");
    }
}
