//! Escape cases 35–45, local IPC and kernel surface, plus our own kernel-surface cases. The same attempts run in two
//! bottles, one launched by root and one by an unprivileged user (`nobody`), because the two take different paths
//! through the user namespace. Host-side decoys: the host's real container sockets, an ssh-agent and gpg-agent
//! socket, an abstract socket in the bottle's parent network namespace, a marked host process, secrets in a fake
//! `$HOME`, and a host file that symlinks in the workspace point at.

use std::process::Child;

use bottle_probe::catalogue::{Expect, LOCAL_IPC_KERNEL, Values};

use crate::decoys::{self, Decoy};
use crate::lab::Lab;
use crate::scenario::{self, Env, Launch, Ran, Script};

struct Run {
    who: &'static str,
    ran: Ran,
    /// Host processes' sockets in this run's workspace (#12): at launch, made after it (once asked), datagram.
    workspace_sock: Decoy,
    late_sock: Option<Decoy>,
    dgram_sock: Decoy,
    /// The workspace symlink's target existed on the host while the bottle ran.
    link_target_existed: bool,
}

struct Ipc {
    _lab: Lab,
    runs: Vec<Run>,
    agent: Decoy,
    gpg: Decoy,
    abstract_sock: Decoy,
    /// Host paths the bottle tried to create.
    written: Vec<std::path::PathBuf>,
}

static FAMILY: scenario::Cells<Ipc> = scenario::Cells::new();

fn family() -> Vec<&'static Ipc> {
    scenario::family(&FAMILY, setup, |f| {
        for r in &f.runs {
            r.ran.tools_present();
        }
    })
}

const SYSCALLS_38: [&str; 13] = [
    "ptrace",
    "mount",
    "umount",
    "unshare-user",
    "unshare-net",
    "unshare-mount",
    "setns",
    "chroot",
    "bpf",
    "keyctl",
    "add-key",
    "userfaultfd",
    "kexec-load",
];
/// Sockets of host processes in the workspace (#12), relative to it.
const WORKSPACE_SOCK: &str = ".git/fsmonitor--daemon.ipc";
const LATE_MARKER: &str = "late-ready";
const LATE_SOCK: &str = "late.sock";
const DGRAM_SOCK: &str = "host-dgram.sock";

/// Host-side things one run's script points at.
struct Targets {
    agent_path: String,
    gpg_path: String,
    abstract_name: String,
    marker: String,
    marker_pid: u32,
    host_env: String,
    write_token: String,
    work: std::path::PathBuf,
}

fn script(env: &Env, t: &Targets, name: &str) -> Script {
    let mut values = Values::default();
    values
        .set("home", env.home().display())
        .set("agent_path", &t.agent_path)
        .set("gpg_path", &t.gpg_path)
        .set("abstract_name", &t.abstract_name)
        .set("marker", &t.marker)
        .set("marker_pid", t.marker_pid)
        .set("host_env", &t.host_env)
        .set("write_token", &t.write_token)
        .set("workspace_sock", t.work.join(WORKSPACE_SOCK).display())
        .set("workspace_sock_rel", WORKSPACE_SOCK)
        .set("late_marker", t.work.join(LATE_MARKER).display())
        .set("late_sock", t.work.join(LATE_SOCK).display())
        .set("dgram_sock", t.work.join(DGRAM_SOCK).display())
        .set("control_sock", env.bottle_dir(name).join("control.sock").display())
        .set("parent", env.dir.path().display())
        .set("machine_id", machine_id());
    let mut sc = Script::default();
    sc.catalogue(&LOCAL_IPC_KERNEL, &values);
    // 43: the host's real users' homes, one step each (how many is the host's business, so not in the catalogue).
    for user in host_home_users() {
        sc.probe(
            &format!("c43-home-user-{user}"),
            &["list-dir", &format!("/home/{user}")],
        );
    }
    sc
}

/// The host's real users' home directories (never "agent", the unprivileged bottle's own home).
fn host_home_users() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/home") else {
        return Vec::new();
    };
    dir.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|u| u != "agent")
        .collect()
}

fn machine_id() -> String {
    std::fs::read_to_string("/etc/machine-id").map_or_else(|_| "no-machine-id-on-this-host".into(), |s| s.trim().into())
}

/// The workspace's symlinks to host paths.
fn plant_symlinks(env: &Env) {
    let target = env.host().join("target.txt");
    std::fs::write(&target, format!("host-target-{}\n", scenario::token(""))).unwrap();
    let work = env.work();
    std::os::unix::fs::symlink(&target, work.join("escape-link")).unwrap();
    std::os::unix::fs::symlink("../host/target.txt", work.join("escape-link-rel")).unwrap();
    std::os::unix::fs::symlink(env.host(), work.join("escape-dir")).unwrap();
    std::os::unix::fs::symlink("/etc/machine-id", work.join("escape-link-machine-id")).unwrap();
}

fn marked_process(marker: &str) -> Child {
    std::process::Command::new("bash")
        .args(["-c", &format!("exec -a {marker} sleep 600")])
        .spawn()
        .unwrap()
}

fn setup() -> Ipc {
    let lab = Lab::new();
    let shared_dir = tempfile::Builder::new().prefix("bb-escape-agents-").tempdir().unwrap();
    let agent_path = shared_dir.path().join("ssh-agent.sock");
    let agent = decoys::unix(&agent_path);
    let gpg_path = shared_dir.path().join("S.gpg-agent");
    let gpg = decoys::unix(&gpg_path);
    let abstract_name = scenario::token("bb-escape-abstract-");
    let abstract_sock = lab.enter(|| decoys::abstract_unix(&abstract_name));
    let marker = scenario::token("bb-escape-host-process-");
    let mut host_process = marked_process(&marker);
    let host_env = scenario::token("host-env-");
    let mut runs = Vec::new();
    let mut written = Vec::new();
    for &(who, user) in scenario::launchers() {
        let env = Env::new();
        plant_symlinks(&env);
        env.home_file(".ssh/id_ed25519", &scenario::token("ssh-key-"));
        env.home_file(".aws/credentials", &scenario::token("aws-"));
        env.home_file(".config/gh/hosts.yml", &scenario::token("gh-"));
        let targets = Targets {
            agent_path: agent_path.display().to_string(),
            // The catalogue adds $HOME/.gnupg/S.gpg-agent and /run/user/0/gnupg/S.gpg-agent.
            gpg_path: gpg_path.display().to_string(),
            abstract_name: abstract_name.clone(),
            marker: marker.clone(),
            marker_pid: host_process.id(),
            host_env: host_env.clone(),
            write_token: scenario::token("bb-escape-write-"),
            work: env.work(),
        };
        let workspace_sock = decoys::unix_open_to_all(&env.work().join(WORKSPACE_SOCK));
        let dgram_sock = decoys::unix_datagram(&env.work().join(DGRAM_SOCK));
        let late = decoys::unix_when(env.work().join(LATE_MARKER), env.work().join(LATE_SOCK));
        let name = format!("ipc-{who}");
        let sc = script(&env, &targets, &name);
        if let Some(uid) = user {
            env.open_to(uid);
        }
        let w = &targets.write_token;
        written.extend(
            [
                format!("/usr/{w}"),
                format!("/usr/bin/{w}"),
                format!("/etc/{w}"),
                format!("/etc/ssl/certs/{w}"),
                format!("/{w}"),
                format!("/tmp/{w}"),
            ]
            .map(std::path::PathBuf::from),
        );
        written.push(env.dir.path().join(w));
        let ran = Launch::new(&lab, &env, &name)
            .user(user)
            .var("SSH_AUTH_SOCK", agent_path.display())
            .var("BOTTLE_TEST_HOST_ONLY", &host_env)
            .run(&sc);
        let link_target_existed = env.work().join("escape-link").exists();
        runs.push(Run {
            who,
            ran,
            workspace_sock,
            late_sock: late.join().unwrap(),
            dgram_sock,
            link_target_existed,
        });
    }
    let _ = host_process.kill();
    let _ = host_process.wait();
    // Nothing of a family may stay on disk: its statics are never dropped. The decoys keep their descriptors.
    drop(shared_dir);
    Ipc {
        _lab: lab,
        runs,
        agent,
        gpg,
        abstract_sock,
        written,
    }
}

/// Step `id` held in every run.
fn held_everywhere(f: &Ipc, id: &str) {
    for r in &f.runs {
        let v = r.ran.verdict(id);
        assert!(
            !v.escaped,
            "ESCAPE ({} launcher) in {id}: {}\n{v:#?}",
            r.who, v.evidence
        );
    }
}

#[test]
fn case_35_container_daemon_sockets_and_run_are_not_present() {
    for f in family() {
        for id in ["c35-container-sockets", "c35-socket-scan", "c35-run-dir"] {
            held_everywhere(f, id);
        }
    }
}

#[test]
fn case_36_ssh_agent_and_gpg_agent_sockets_are_not_present() {
    for f in family() {
        held_everywhere(f, "c36-ssh-agent");
        held_everywhere(f, "c36-gpg-agent");
        assert_eq!(f.agent.log.count(), 0, "{:?}", f.agent.log.lines());
        assert_eq!(f.gpg.log.count(), 0, "{:?}", f.gpg.log.lines());
    }
}

/// #12: a host process's Unix socket in the workspace is found through the filesystem, not the network namespace;
/// the socket warden refuses it (at launch and made later), and no Unix datagram reaches one.
#[test]
fn issue_12_host_sockets_in_the_workspace_are_out_of_reach() {
    for f in family() {
        for id in ["x-workspace-socket", "x-workspace-socket-late", "x-workspace-datagram"] {
            held_everywhere(f, id);
        }
        for r in &f.runs {
            let late = r
                .late_sock
                .as_ref()
                .unwrap_or_else(|| panic!("({}) the bottle never asked for the late socket", r.who));
            for (what, decoy) in [
                ("at launch", &r.workspace_sock),
                ("made later", late),
                ("datagram", &r.dgram_sock),
            ] {
                assert_eq!(decoy.log.count(), 0, "({}) {what}: {:?}", r.who, decoy.log.lines());
            }
        }
    }
}

#[test]
fn case_37_no_new_privs_is_set_and_capability_sets_are_empty() {
    for f in family() {
        held_everywhere(f, "c37-proc-status");
        for r in &f.runs {
            let d = &r.ran.verdict("c37-proc-status").detail;
            assert_eq!(d["NoNewPrivs"], "1", "{}: {d}", r.who);
            assert_eq!(d["CapEff"], "0000000000000000", "{}: {d}", r.who);
            assert_eq!(d["CapBnd"], "0000000000000000", "{}: {d}", r.who);
        }
    }
}

#[test]
fn case_38_ptrace_mount_unshare_setns_bpf_keyctl_userfaultfd_kexec_are_denied() {
    for f in family() {
        for name in SYSCALLS_38 {
            held_everywhere(f, &format!("syscall-{name}"));
        }
    }
}

#[test]
fn case_39_raw_and_packet_sockets_are_denied() {
    for f in family() {
        for kind in ["inet", "inet6", "ip-raw", "packet", "packet-dgram"] {
            held_everywhere(f, &format!("c39-raw-{kind}"));
        }
    }
}

#[test]
fn case_40_firewall_and_route_edits_have_no_effect_on_confinement() {
    for f in family() {
        for id in [
            "c40-netlink-route",
            "c40-iptables",
            "c40-ip-route-add",
            "c40-ip-addr-add",
            "c40-ip-link-down",
            "c40-iptables-flush",
            "c40-after-direct",
        ] {
            held_everywhere(f, id);
        }
        for r in &f.runs {
            r.ran.reached("c40-after-proxy");
        }
    }
}

#[test]
fn case_41_unshare_n_gives_no_new_network() {
    for f in family() {
        for id in [
            "c41-unshare-n",
            "c41-unshare-urn",
            "c41-unshare-u",
            "syscall-unshare-net",
            "syscall-unshare-user",
        ] {
            held_everywhere(f, id);
        }
    }
}

#[test]
fn case_42_only_the_bottles_own_processes_are_visible() {
    for f in family() {
        held_everywhere(f, "c42-processes");
        held_everywhere(f, "c42-signal-host-pid");
        for r in &f.runs {
            let v = r.ran.verdict("c42-processes");
            let count = v.detail["count"].as_u64().unwrap();
            assert!(count <= 8, "{}: {count} processes visible in the bottle: {v:#?}", r.who);
        }
    }
}

#[test]
fn case_43_the_users_ssh_aws_config_and_root_are_not_present() {
    for f in family() {
        for user in host_home_users() {
            held_everywhere(f, &format!("c43-home-user-{user}"));
        }
        for id in [
            "c43-home-file-0",
            "c43-home-file-1",
            "c43-home-file-2",
            "c43-home-dir",
            "c43-root-ssh",
            "c43-root-config",
            "c43-root-bashrc",
            "c43-etc-shadow",
            "c43-host-passwd",
        ] {
            held_everywhere(f, id);
        }
    }
}

#[test]
fn case_44_writes_outside_the_workspace_are_read_only_or_private() {
    for f in family() {
        for i in 0..8 {
            held_everywhere(f, &format!("c44-write-{i}"));
        }
        for r in &f.runs {
            r.ran.reached("c44-private-tmp");
        }
        for p in &f.written {
            assert!(!p.exists(), "ESCAPE: the bottle created {} on the host", p.display());
        }
    }
}

#[test]
fn case_45_workspace_symlinks_resolve_inside_the_bottle() {
    for f in family() {
        for id in [
            "c45-symlink-0",
            "c45-symlink-1",
            "c45-symlink-2",
            "c45-symlink-machine-id",
        ] {
            held_everywhere(f, id);
        }
        for r in &f.runs {
            assert!(r.link_target_existed, "the symlink's target must exist on the host");
        }
    }
}

#[test]
fn extra_io_uring_is_denied() {
    for f in family() {
        held_everywhere(f, "syscall-io-uring");
    }
}

#[test]
fn extra_perf_events_are_denied() {
    for f in family() {
        held_everywhere(f, "syscall-perf-event-open");
    }
}

#[test]
fn extra_open_by_handle_at_shocker_is_denied() {
    for f in family() {
        held_everywhere(f, "syscall-open-by-handle");
    }
}

#[test]
fn extra_tiocsti_terminal_injection_is_denied() {
    for f in family() {
        held_everywhere(f, "syscall-tiocsti");
    }
}

#[test]
fn extra_personality_cannot_disable_aslr() {
    for f in family() {
        held_everywhere(f, "syscall-personality");
    }
}

#[test]
fn extra_kernel_log_and_module_loading_are_denied() {
    for f in family() {
        held_everywhere(f, "syscall-syslog");
        held_everywhere(f, "syscall-init-module");
    }
}

#[test]
fn extra_proc_sys_writes_are_denied() {
    for f in family() {
        for id in [
            "x-proc-sys-core_pattern",
            "x-proc-sys-ip_forward",
            "x-proc-sys-hostname",
        ] {
            held_everywhere(f, id);
        }
    }
}

/// #12: a root launcher's bottle was host root (`0 0 1`): its files were root's, root-only host files such as
/// /etc/ssl/private's key were readable. Both cases were seen to escape with the launcher's mapping put back.
#[test]
fn extra_issue_12_no_id_of_the_bottle_is_host_root() {
    for f in family() {
        held_everywhere(f, "x-host-root-ids");
        held_everywhere(f, "x-root-only-host-files");
    }
}

#[test]
fn extra_kernel_memory_devices_and_sysfs_are_absent() {
    for f in family() {
        for i in 0..6 {
            held_everywhere(f, &format!("x-kernel-memory-{i}"));
        }
        held_everywhere(f, "x-sysfs");
        held_everywhere(f, "x-cgroup-release-agent");
    }
}

#[test]
fn extra_abstract_unix_socket_of_the_host_is_unreachable() {
    for f in family() {
        held_everywhere(f, "x-abstract-socket");
        assert_eq!(f.abstract_sock.log.count(), 0, "{:?}", f.abstract_sock.log.lines());
    }
}

#[test]
fn extra_the_bottles_control_socket_is_unreachable_from_inside() {
    for f in family() {
        held_everywhere(f, "x-control-socket");
    }
}

#[test]
fn extra_the_bottle_init_memory_and_environment_are_protected() {
    for f in family() {
        held_everywhere(f, "x-init-mem");
        held_everywhere(f, "x-init-environ");
        held_everywhere(f, "x-host-env-anywhere");
    }
}

#[test]
fn extra_every_local_ipc_kernel_catalogue_case_meets_its_expectation() {
    for f in family() {
        for r in &f.runs {
            for c in LOCAL_IPC_KERNEL.cases {
                let v = r.ran.verdict(c.id);
                match c.expect {
                    // The family's case 44 test checks the host for what these wrote.
                    Expect::JudgedOutside => {}
                    Expect::Control => assert!(v.escaped, "control {} failed ({} launcher): {v:#?}", c.id, r.who),
                    Expect::Held => assert!(!v.escaped, "ESCAPE ({} launcher) in {}: {v:#?}", r.who, c.id),
                    Expect::Refused => {
                        assert!(!v.escaped, "ESCAPE ({} launcher) in {}: {v:#?}", r.who, c.id);
                        assert_eq!(v.status(), Some(403), "{} ({} launcher): {v:#?}", c.id, r.who);
                    }
                }
            }
        }
    }
}
