//! The plan of a namespace bottle: pure data, written by the launcher to the bottle's state dir (0600) and read
//! by the re-executed init. Building it has no side effects, so every decision about what the bottle sees is
//! unit-testable without root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Port of the proxy listener inside the bottle's own network namespace (its `lo` is private to it).
pub const IN_BOTTLE_PROXY_PORT: u16 = 3128;
/// Where the bottle CA bundle (system roots + bottle CA) appears inside the bottle.
pub const IN_BOTTLE_CA_BUNDLE: &str = "/etc/bot-bottle/ca-bundle.pem";
/// Host paths that must never be visible in a bottle (checked by tests against every plan).
pub const NEVER_VISIBLE: [&str; 6] = ["/run", "/var/run", "/root/.ssh", "/home", "/proc/1", "/sys"];

/// Entries of the host's `/etc` bound read-only into the bottle when present: what dynamic linking, TLS roots,
/// time zones and Debian alternatives need. Never `passwd`/`shadow`/`group` (the bottle gets its own).
pub const ETC_READ_ONLY: [&str; 14] = [
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "localtime",
    "os-release",
    "debian_version",
    "ssl",
    "ca-certificates",
    "terminfo",
    "protocols",
    "services",
    "mime.types",
    "bash.bashrc",
];

/// Distribution CA bundles replaced inside the bottle by the bottle's bundle (Debian/Ubuntu, Fedora/RHEL).
pub const SYSTEM_CA_BUNDLES: [&str; 2] = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"];

/// Where the host's trusted roots are read from for the bottle's CA bundle (Debian, Fedora, Arch, Alpine).
pub const SYSTEM_ROOTS: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Top-level host entries provided from the host's `/usr` (merged-/usr systems make these symlinks).
pub const USR_LINKS: [&str; 6] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// A host path the user chose to show, and where (inside the bottle).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserMount {
    pub from: PathBuf,
    pub at: PathBuf,
    pub writable: bool,
}

/// What the init needs before the spec exists: enough to build the bottle's namespaces and its proxy listener
/// while the launcher mints the CA and starts the proxy. The spec repeats these and must agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlySpec {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_ns: bool,
    /// See `InitSpec::host_id`.
    pub host_id: Option<u32>,
    /// SECURITY: the values of `pass_env` variables. They reach the init in memory (it is cloned from the
    /// launcher), never through the spec file on disk, which a killed launcher would leave behind.
    pub pass_env: BTreeMap<String, String>,
}

impl InitSpec {
    /// Adds the `pass_env` values from `values`, for the names this spec lists, where `env` has none.
    pub fn add_pass_env(&mut self, values: impl Fn(&str) -> Option<String>) {
        for key in &self.pass_env {
            if !self.env.contains_key(key)
                && let Some(v) = values(key)
            {
                self.env.insert(key.clone(), v);
            }
        }
    }
}

impl InitSpec {
    /// The host paths the launcher opens for the bottle when it maps the bottle's ids (`host_id`), one per use, in
    /// plan order: the init, whose ids are not the invoking user's, cannot reach them by path (a workspace in a
    /// 0700 directory, the kept home under the state root, a tool directory in `/root`).
    pub fn trees(&self) -> Vec<PathBuf> {
        if self.host_id.is_none() {
            return Vec::new();
        }
        let mut trees: Vec<PathBuf> = self.home_source.iter().cloned().collect();
        trees.push(self.workspace.clone());
        trees.extend(self.mounts.iter().map(|m| m.from.clone()));
        trees
    }
}

impl EarlySpec {
    /// Whether `spec` was written for the namespaces this init already built.
    pub fn agrees_with(&self, spec: &InitSpec) -> bool {
        self.name == spec.name
            && self.uid == spec.uid
            && self.gid == spec.gid
            && self.cgroup_ns == spec.cgroup_ns
            && self.host_id == spec.host_id
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitSpec {
    pub name: String,
    /// Empty directory on the host that becomes the bottle's root (a tmpfs is mounted on it).
    pub root: PathBuf,
    /// The ids inside the bottle (the agent's).
    pub uid: u32,
    pub gid: u32,
    /// SECURITY (#12): `Some(h)` when the launcher is root: the bottle's uid and gid 0 are host uid and gid `h`, an
    /// id no user owns, and nothing in the bottle is ever host uid 0 or in a host group. The launcher writes that
    /// mapping and hands in the host paths the bottle writes to (`trees`) as idmapped mounts, which show the
    /// invoking user's files as the bottle's own. `None`: the invoking ids map to themselves.
    #[serde(default)]
    pub host_id: Option<u32>,
    /// Host directory bound read-write into the bottle at the same path.
    pub workspace: PathBuf,
    pub home: PathBuf,
    /// A host directory bound read-write at `home` (kept between runs); `None`: a fresh tmpfs.
    #[serde(default)]
    pub home_source: Option<PathBuf>,
    /// The bottle CA certificate (PEM); the init appends it to the host's system roots in the bottle's own tmpfs.
    pub bottle_ca: String,
    pub argv: Vec<String>,
    /// The agent's environment, less the values of `pass_env` variables (see `EarlySpec::pass_env`).
    pub env: BTreeMap<String, String>,
    /// The `pass_env` variables whose values the init (from `EarlySpec`) and `exec` (from the environment of whoever
    /// runs it) add to `env`; a name already in `env` keeps its value there.
    #[serde(default)]
    pub pass_env: Vec<String>,
    pub cgroup_ns: bool,
    /// A host-side listener on the bottle's lease address that must be unreachable from inside (self-test).
    pub canary: Option<std::net::SocketAddr>,
    /// The agent gets a terminal of the bottle's own devpts (its controlling terminal); the launcher receives the
    /// master side and relays the user's terminal to it. Otherwise the agent inherits the launcher's streams.
    #[serde(default)]
    pub tty: bool,
    /// The user's terminal size (rows, columns) when the launch began: the agent's terminal has it before the agent
    /// starts (the relay only follows later changes, and an agent may ask at once).
    #[serde(default)]
    pub tty_size: Option<(u16, u16)>,
    /// The size of each tmpfs in the bottle (`/tmp`, `/dev/shm`, a fresh home, the root); `None`: the kernel's
    /// default, half the host's RAM.
    #[serde(default)]
    pub tmpfs_bytes: Option<u64>,
    /// Host paths shown on purpose (`--mount`), bound after the workspace.
    #[serde(default)]
    pub mounts: Vec<UserMount>,
    /// Unix sockets of host processes the bottle may connect to (`[bottle] share_sockets`), as absolute paths
    /// inside the bottle; every other socket not bound in the bottle is refused by the socket warden.
    #[serde(default)]
    pub share_sockets: Vec<PathBuf>,
}

/// One step of the filesystem the init builds, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsStep {
    /// A host path the user chose to show. SECURITY: its mount point may lie under a host directory the agent could
    /// write in an earlier run (the kept home, the workspace), so it is made without following any link.
    Mount {
        from: PathBuf,
        at: PathBuf,
        read_only: bool,
    },
    /// tmpfs at a path inside the new root.
    Tmpfs { at: PathBuf, mode: u32 },
    /// Bind a host path, read-only or read-write.
    Bind {
        from: PathBuf,
        at: PathBuf,
        read_only: bool,
    },
    /// A symlink inside the new root.
    Symlink { target: PathBuf, at: PathBuf },
    /// A file written into the new root.
    File { at: PathBuf, contents: String },
    /// The bottle's CA bundle written into the new root: the host bundle at `system` (read by the init, before the
    /// root changes), then `bottle_ca`. Built in the bottle's tmpfs, so no copy of the system roots is written to
    /// the host's disk for each launch.
    CaBundle {
        at: PathBuf,
        system: Option<PathBuf>,
        bottle_ca: String,
    },
    /// Everything built so far becomes read-only at once (one recursive mount attribute change, not a remount per
    /// bind); what later steps mount stays writable. Read-only binds come before it, writable mounts after it.
    Seal,
    /// Fresh procfs for the bottle's pid namespace.
    Proc,
    /// Fresh devpts instance.
    DevPts,
}

/// Entries of the bottle's procfs made read-only (as runc and Docker do).
pub const PROC_READ_ONLY: [&str; 4] = ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"];

/// What the host looks like, for planning (a seam: tests pass a fixed host).
pub trait HostFs {
    fn exists(&self, path: &Path) -> bool;
    fn symlink_target(&self, path: &Path) -> Option<PathBuf>;
}

pub struct RealFs;

impl HostFs for RealFs {
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn symlink_target(&self, path: &Path) -> Option<PathBuf> {
        std::fs::read_link(path).ok()
    }
}

/// Host paths the namespace backend shows inside every bottle (read-only), whatever the spec: the system tree and
/// the few `/etc` entries tools need. A secret under one of them is readable by the agent.
pub fn visible_host_paths(host: &dyn HostFs) -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("/usr")];
    for name in USR_LINKS {
        let host_path = Path::new("/").join(name);
        if host.symlink_target(&host_path).is_none() && host.exists(&host_path) {
            paths.push(host_path);
        }
    }
    for name in ETC_READ_ONLY {
        let host_path = Path::new("/etc").join(name);
        if host.exists(&host_path) {
            paths.push(host_path);
        }
    }
    paths
}

/// The ordered filesystem steps for a spec, as seen from inside the new root ("/x" means "<root>/x").
pub fn fs_plan(spec: &InitSpec, host: &dyn HostFs) -> Vec<FsStep> {
    let p = PathBuf::from;
    let mut steps = vec![FsStep::Bind {
        from: p("/usr"),
        at: p("/usr"),
        read_only: true,
    }];
    for name in USR_LINKS {
        let host_path = Path::new("/").join(name);
        match host.symlink_target(&host_path) {
            Some(target) => steps.push(FsStep::Symlink { target, at: host_path }),
            None if host.exists(&host_path) => steps.push(FsStep::Bind {
                from: host_path.clone(),
                at: host_path,
                read_only: true,
            }),
            None => {}
        }
    }
    for name in ETC_READ_ONLY {
        let host_path = Path::new("/etc").join(name);
        if host.exists(&host_path) {
            steps.push(FsStep::Bind {
                from: host_path.clone(),
                at: host_path,
                read_only: true,
            });
        }
    }
    steps.push(FsStep::CaBundle {
        at: p(IN_BOTTLE_CA_BUNDLE),
        system: SYSTEM_ROOTS.iter().map(PathBuf::from).find(|b| host.exists(b)),
        bottle_ca: spec.bottle_ca.clone(),
    });
    // Tools that ignore SSL_CERT_FILE and friends read the distribution bundle: show them ours (system roots +
    // the bottle CA) at the same path.
    let ours = spec.root.join(IN_BOTTLE_CA_BUNDLE.trim_start_matches('/'));
    for bundle in SYSTEM_CA_BUNDLES {
        if host.exists(Path::new(bundle)) {
            steps.push(FsStep::Bind {
                from: ours.clone(),
                at: PathBuf::from(bundle),
                read_only: true,
            });
        }
    }
    let user = if spec.uid == 0 { "root" } else { "agent" };
    let home = spec.home.display();
    steps.extend([
        FsStep::File {
            at: p("/etc/passwd"),
            contents: format!("{user}:x:{}:{}:{user}:{home}:/bin/sh\n", spec.uid, spec.gid),
        },
        FsStep::File {
            at: p("/etc/group"),
            contents: format!("{user}:x:{}:\n", spec.gid),
        },
        FsStep::File {
            at: p("/etc/hostname"),
            contents: format!("{}\n", spec.name),
        },
        FsStep::File {
            at: p("/etc/hosts"),
            contents: format!("127.0.0.1\tlocalhost {}\n::1\tlocalhost\n", spec.name),
        },
        // SECURITY: no resolver inside; names are resolved by the proxy, so DNS cannot carry data out.
        FsStep::File {
            at: p("/etc/resolv.conf"),
            contents: "# no DNS in a bottle: the egress proxy resolves names\n".into(),
        },
        FsStep::File {
            at: p("/etc/nsswitch.conf"),
            contents: "passwd: files\ngroup: files\nhosts: files\n".into(),
        },
        FsStep::Seal,
        FsStep::Tmpfs {
            at: p("/tmp"),
            mode: 0o1777,
        },
        match &spec.home_source {
            Some(source) => FsStep::Bind {
                from: source.clone(),
                at: spec.home.clone(),
                read_only: false,
            },
            None => FsStep::Tmpfs {
                at: spec.home.clone(),
                mode: 0o700,
            },
        },
        FsStep::Bind {
            from: spec.workspace.clone(),
            at: spec.workspace.clone(),
            read_only: false,
        },
    ]);
    // After the home and the workspace, so one may sit inside them; never through a link (see `FsStep::Mount`).
    steps.extend(spec.mounts.iter().map(|m| FsStep::Mount {
        from: m.from.clone(),
        at: m.at.clone(),
        read_only: !m.writable,
    }));
    steps.push(FsStep::Proc);
    // SECURITY: the kernel's knobs are read-only inside whatever Landlock does (it is best-effort): with a root
    // launcher the bottle's root is host root to /proc/sys (core_pattern runs a program as host root), as container
    // runtimes also mask (#12). Each is the bottle's own procfs entry, bound onto itself read-only.
    for entry in PROC_READ_ONLY {
        if host.exists(Path::new(entry)) {
            steps.push(FsStep::Bind {
                from: spec.root.join(entry.trim_start_matches('/')),
                at: p(entry),
                read_only: true,
            });
        }
    }
    steps.push(FsStep::Tmpfs {
        at: p("/dev"),
        mode: 0o755,
    });
    for dev in ["null", "zero", "full", "random", "urandom", "tty"] {
        steps.push(FsStep::Bind {
            from: Path::new("/dev").join(dev),
            at: Path::new("/dev").join(dev),
            read_only: false,
        });
    }
    steps.extend([
        FsStep::DevPts,
        FsStep::Symlink {
            target: p("pts/ptmx"),
            at: p("/dev/ptmx"),
        },
        FsStep::Tmpfs {
            at: p("/dev/shm"),
            mode: 0o1777,
        },
        FsStep::Symlink {
            target: p("/proc/self/fd"),
            at: p("/dev/fd"),
        },
        FsStep::Symlink {
            target: p("/proc/self/fd/0"),
            at: p("/dev/stdin"),
        },
        FsStep::Symlink {
            target: p("/proc/self/fd/1"),
            at: p("/dev/stdout"),
        },
        FsStep::Symlink {
            target: p("/proc/self/fd/2"),
            at: p("/dev/stderr"),
        },
    ]);
    steps
}

/// The environment every bottle gets: proxy and CA settings (these names are reserved in the policy).
pub fn bottle_env(home: &Path, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let proxy = format!("http://127.0.0.1:{IN_BOTTLE_PROXY_PORT}");
    let mut env: BTreeMap<String, String> = extra.clone();
    // The user's PATH (`-e PATH=…`, `bottle.env`) is honoured; the default covers the system's tools.
    env.entry("PATH".into())
        .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin".into());
    env.insert("HOME".into(), home.display().to_string());
    env.entry("TERM".into()).or_insert_with(|| "xterm-256color".into());
    env.extend(bottle_policy::proxy_and_ca_env(&proxy, IN_BOTTLE_CA_BUNDLE));
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Debian;
    impl HostFs for Debian {
        fn exists(&self, path: &Path) -> bool {
            !path.starts_with("/etc/terminfo")
        }
        fn symlink_target(&self, path: &Path) -> Option<PathBuf> {
            match path.to_str()? {
                "/bin" => Some("usr/bin".into()),
                "/lib" => Some("usr/lib".into()),
                _ => None,
            }
        }
    }

    fn spec() -> InitSpec {
        InitSpec {
            name: "b1".into(),
            root: "/state/b1/root".into(),
            uid: 1000,
            gid: 1000,
            host_id: None,
            workspace: "/home/u/project".into(),
            home: "/home/agent".into(),
            home_source: None,
            bottle_ca: "-----BEGIN CERTIFICATE-----\nbottle\n-----END CERTIFICATE-----\n".into(),
            argv: vec!["true".into()],
            env: BTreeMap::new(),
            pass_env: Vec::new(),
            cgroup_ns: true,
            canary: None,
            tty: false,
            tty_size: None,
            tmpfs_bytes: None,
            mounts: Vec::new(),
            share_sockets: Vec::new(),
        }
    }

    #[test]
    fn only_usr_etc_entries_devices_and_the_workspace_come_from_the_host() {
        let steps = fs_plan(&spec(), &Debian);
        let host_sources: Vec<&Path> = steps
            .iter()
            .filter_map(|s| match s {
                FsStep::Bind { from, .. } => Some(from.as_path()),
                _ => None,
            })
            .collect();
        for src in &host_sources {
            let ok = src.starts_with("/usr")
                || src.starts_with("/etc")
                || src.starts_with("/dev")
                || src.starts_with("/lib")
                || *src == Path::new("/home/u/project")
                || *src == Path::new("/state/b1/root/etc/bot-bottle/ca-bundle.pem")
                // The bottle's own procfs entries, bound onto themselves read-only.
                || PROC_READ_ONLY.iter().any(|e| *src == Path::new("/state/b1/root").join(e.trim_start_matches('/')))
                || USR_LINKS.iter().any(|l| *src == Path::new("/").join(l));
            assert!(ok, "unexpected host path bound: {}", src.display());
            for never in NEVER_VISIBLE {
                let under_workspace = Path::new(never).starts_with("/home") && src.starts_with("/home/u/project");
                assert!(
                    under_workspace || !src.starts_with(never),
                    "{never} is visible via {}",
                    src.display()
                );
            }
        }
        for etc in ["passwd", "shadow", "group", "sudoers"] {
            assert!(
                !host_sources.contains(&Path::new("/etc").join(etc).as_path()),
                "host /etc/{etc} bound"
            );
        }
    }

    #[test]
    fn a_kept_home_is_bound_read_write_after_the_seal_in_place_of_the_tmpfs() {
        let mut s = spec();
        s.home_source = Some("/state/homes/claude".into());
        let steps = fs_plan(&s, &Debian);
        let seal = steps.iter().position(|x| x == &FsStep::Seal).unwrap();
        let at = steps
            .iter()
            .position(|x| {
                *x == FsStep::Bind {
                    from: "/state/homes/claude".into(),
                    at: "/home/agent".into(),
                    read_only: false,
                }
            })
            .expect("the home is bound");
        assert!(at > seal);
        assert!(
            !steps
                .iter()
                .any(|x| matches!(x, FsStep::Tmpfs { at, .. } if at == Path::new("/home/agent")))
        );
    }

    #[test]
    fn host_bindings_are_read_only_except_workspace_and_devices() {
        for step in fs_plan(&spec(), &Debian) {
            if let FsStep::Bind { from, read_only, .. } = step {
                let writable = from == Path::new("/home/u/project") || from.starts_with("/dev");
                assert_eq!(read_only, !writable, "{}", from.display());
            }
        }
    }

    #[test]
    fn the_kernels_knobs_in_proc_are_read_only_binds_after_procfs_is_mounted() {
        let steps = fs_plan(&spec(), &Debian);
        let proc_at = steps.iter().position(|s| *s == FsStep::Proc).unwrap();
        for entry in PROC_READ_ONLY {
            let i = steps
                .iter()
                .position(|s| matches!(s, FsStep::Bind { at, read_only: true, .. } if at == Path::new(entry)))
                .unwrap_or_else(|| panic!("{entry} is not made read-only"));
            assert!(i > proc_at, "{entry} before procfs");
        }
    }

    #[test]
    fn read_only_binds_come_before_the_seal_and_writable_mounts_after_it() {
        let steps = fs_plan(&spec(), &Debian);
        let seal = steps.iter().position(|s| s == &FsStep::Seal).unwrap();
        assert_eq!(steps.iter().filter(|s| **s == FsStep::Seal).count(), 1);
        for (i, step) in steps.iter().enumerate() {
            let writable = match step {
                // The bottle's procfs is mounted after the seal; its entries made read-only come after it too.
                FsStep::Bind { at, .. } if at.starts_with("/proc") => true,
                FsStep::Bind { read_only, .. } => !read_only,
                // The user's mounts come after the home and the workspace they may sit in, read-only or not.
                FsStep::Mount { .. } => true,
                FsStep::Tmpfs { .. } | FsStep::Proc | FsStep::DevPts => true,
                // Written into the root tmpfs, which the seal makes read-only.
                FsStep::File { .. } | FsStep::CaBundle { .. } => false,
                FsStep::Symlink { at, .. } => at.starts_with("/dev"),
                FsStep::Seal => continue,
            };
            assert_eq!(writable, i > seal, "{step:?} is on the wrong side of the seal");
        }
    }

    #[test]
    fn user_mounts_follow_the_home_and_the_workspace_and_keep_their_mode() {
        let mut spec = spec();
        spec.mounts = vec![
            UserMount {
                from: "/home/u/.cargo".into(),
                at: "/home/agent/.cargo".into(),
                writable: false,
            },
            UserMount {
                from: "/srv/tools".into(),
                at: "/opt/tools".into(),
                writable: true,
            },
        ];
        let steps = fs_plan(&spec, &Debian);
        let workspace = steps
            .iter()
            .position(|s| matches!(s, FsStep::Bind { at, .. } if at == &spec.workspace))
            .unwrap();
        let mounts: Vec<(usize, &FsStep)> = steps
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, FsStep::Mount { .. }))
            .collect();
        assert_eq!(mounts.len(), 2);
        assert!(mounts.iter().all(|(i, _)| *i > workspace));
        assert_eq!(
            mounts[0].1,
            &FsStep::Mount {
                from: "/home/u/.cargo".into(),
                at: "/home/agent/.cargo".into(),
                read_only: true
            }
        );
        assert!(matches!(mounts[1].1, FsStep::Mount { read_only: false, .. }));
    }

    #[test]
    fn the_distribution_bundle_is_the_bottle_bundle() {
        let steps = fs_plan(&spec(), &Debian);
        let ssl = steps
            .iter()
            .position(|s| matches!(s, FsStep::Bind { at, .. } if at == Path::new("/etc/ssl")))
            .unwrap();
        let overlay = steps
            .iter()
            .position(|s| matches!(s, FsStep::Bind { from, at, .. } if from == Path::new("/state/b1/root/etc/bot-bottle/ca-bundle.pem") && at == Path::new("/etc/ssl/certs/ca-certificates.crt")))
            .unwrap();
        assert!(
            overlay > ssl,
            "the overlay must be mounted over the /etc/ssl bind, not under it"
        );
        // The bundle is built in the bottle's root (from the host's roots and the bottle CA) before it is bound.
        let built = steps
            .iter()
            .position(|s| {
                s == &FsStep::CaBundle {
                    at: IN_BOTTLE_CA_BUNDLE.into(),
                    system: Some("/etc/ssl/certs/ca-certificates.crt".into()),
                    bottle_ca: spec().bottle_ca,
                }
            })
            .unwrap();
        assert!(built < overlay);
    }

    #[test]
    fn merged_usr_links_are_recreated_not_bound() {
        let steps = fs_plan(&spec(), &Debian);
        assert!(steps.contains(&FsStep::Symlink {
            target: "usr/bin".into(),
            at: "/bin".into()
        }));
        assert!(
            !steps
                .iter()
                .any(|s| matches!(s, FsStep::Bind { at, .. } if at == Path::new("/etc/terminfo")))
        );
    }

    #[test]
    fn bottle_env_points_every_tool_at_the_proxy_and_the_ca() {
        let env = bottle_env(Path::new("/home/agent"), &BTreeMap::from([("FOO".into(), "1".into())]));
        assert_eq!(env["HTTPS_PROXY"], "http://127.0.0.1:3128");
        assert_eq!(env["https_proxy"], env["HTTPS_PROXY"]);
        assert_eq!(env["NO_PROXY"], "localhost,127.0.0.1,::1");
        assert_eq!(env["no_proxy"], env["NO_PROXY"]);
        assert_eq!(env["NODE_EXTRA_CA_CERTS"], IN_BOTTLE_CA_BUNDLE);
        assert_eq!(env["FOO"], "1");
        assert_eq!(env["HOME"], "/home/agent");
        assert!(env["PATH"].starts_with("/usr/local/bin:"));
        let own = bottle_env(
            Path::new("/root"),
            &BTreeMap::from([("PATH".into(), "/opt/tools/bin:/usr/bin".into())]),
        );
        assert_eq!(
            own["PATH"], "/opt/tools/bin:/usr/bin",
            "a PATH the user set is honoured"
        );
    }

    #[test]
    fn a_mapped_bottle_gets_every_written_host_path_as_a_tree_and_an_unmapped_one_none() {
        let mut s = spec();
        s.home_source = Some("/state/homes/claude".into());
        s.mounts = vec![UserMount {
            from: "/root/.cargo".into(),
            at: "/root/.cargo".into(),
            writable: false,
        }];
        assert!(s.trees().is_empty(), "self-mapped ids reach their own paths");
        s.host_id = Some(2_130_706_434);
        assert_eq!(
            s.trees(),
            [
                PathBuf::from("/state/homes/claude"),
                "/home/u/project".into(),
                "/root/.cargo".into()
            ]
        );
        // Every one of them is a source the plan binds, so the init attaches each tree it got.
        let steps = fs_plan(&s, &Debian);
        for tree in s.trees() {
            assert!(
                steps
                    .iter()
                    .any(|st| matches!(st, FsStep::Bind { from, .. } | FsStep::Mount { from, .. } if *from == tree)),
                "{tree:?} is not bound by the plan"
            );
        }
    }
}
