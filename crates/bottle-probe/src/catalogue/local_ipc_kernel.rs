//! Escape cases 35–45, local IPC and kernel surface, plus our own kernel-surface cases. Values: `home` (the
//! launcher's `$HOME`), `agent_path` and `gpg_path` (agent sockets of the host), `abstract_name` (an abstract socket
//! in the launcher's network namespace), `marker` and `marker_pid` (a marked host process), `host_env` (a variable
//! only the launcher has), `write_token` (a unique file name), `parent` (the directory holding the workspace),
//! `machine_id` (the host's /etc/machine-id). The workspace holds symlinks to host paths: `escape-link` and
//! `escape-link-rel` (to `../host/target.txt`, whose content starts `host-target-`), `escape-dir` (to `../host`),
//! `escape-link-machine-id` (to /etc/machine-id).

use super::Needs::{DisposableNetwork, Tool};
use super::{Case, probe, shell};

/// `hex:` of `daemon:`, a line of every host's /etc/passwd.
const DAEMON: &str = "hex:6461656d6f6e3a";
/// `hex:` of `host-target-`, the start of the symlinks' target file.
const HOST_TARGET: &str = "hex:686f73742d7461726765742d";

pub const CASES: &[Case] = &[
    // 35
    probe(
        "c35-container-sockets",
        &[
            "unix-connect",
            "/run/docker.sock",
            "/var/run/docker.sock",
            "/run/containerd/containerd.sock",
            "/run/podman/podman.sock",
            "/var/run/crio/crio.sock",
            "/run/user/0/podman/podman.sock",
        ],
    ),
    probe(
        "c35-socket-scan",
        &[
            "unix-scan",
            "/run",
            "/var/run",
            "/tmp",
            "/dev/shm",
            "/var/lib",
            "{{home}}",
        ],
    ),
    probe("c35-run-dir", &["list-dir", "/run"]),
    // 36
    probe("c36-ssh-agent", &["ssh-agent", "{{agent_path}}"]),
    probe(
        "c36-gpg-agent",
        &[
            "unix-connect",
            "{{gpg_path}}",
            "{{home}}/.gnupg/S.gpg-agent",
            "/run/user/0/gnupg/S.gpg-agent",
        ],
    ),
    // 37
    probe("c37-proc-status", &["proc-status"]),
    // 38
    probe("syscall-ptrace", &["syscall", "ptrace"]),
    probe("syscall-mount", &["syscall", "mount"]),
    probe("syscall-umount", &["syscall", "umount"]),
    probe("syscall-unshare-user", &["syscall", "unshare-user"]),
    probe("syscall-unshare-net", &["syscall", "unshare-net"]),
    probe("syscall-unshare-mount", &["syscall", "unshare-mount"]),
    probe("syscall-setns", &["syscall", "setns"]),
    probe("syscall-chroot", &["syscall", "chroot"]),
    probe("syscall-bpf", &["syscall", "bpf"]),
    probe("syscall-keyctl", &["syscall", "keyctl"]),
    probe("syscall-add-key", &["syscall", "add-key"]),
    probe("syscall-userfaultfd", &["syscall", "userfaultfd"]),
    probe("syscall-kexec-load", &["syscall", "kexec-load"]),
    // Our own syscalls
    probe("syscall-io-uring", &["syscall", "io-uring"]),
    probe("syscall-perf-event-open", &["syscall", "perf-event-open"]),
    probe("syscall-open-by-handle", &["syscall", "open-by-handle"]),
    probe("syscall-tiocsti", &["syscall", "tiocsti"]),
    probe("syscall-personality", &["syscall", "personality"]),
    probe("syscall-syslog", &["syscall", "syslog"]),
    probe("syscall-init-module", &["syscall", "init-module"]),
    // 39
    probe("c39-raw-inet", &["raw-socket", "inet"]),
    probe("c39-raw-inet6", &["raw-socket", "inet6"]),
    probe("c39-raw-ip-raw", &["raw-socket", "ip-raw"]),
    probe("c39-raw-packet", &["raw-socket", "packet"]),
    probe("c39-raw-packet-dgram", &["raw-socket", "packet-dgram"]),
    // 40: try to reconfigure the network, then check nothing changed. The probe's own attempts undo themselves; the
    // shell ones would not, so they run only where a wrecked network is the lab's.
    probe("c40-netlink-route", &["netlink-route"]),
    probe("c40-iptables", &["iptables"]),
    shell("c40-ip-route-add", "ip route add blackhole 198.51.100.0/24").needs(&[DisposableNetwork, Tool("ip")]),
    shell("c40-ip-addr-add", "ip addr add 10.9.9.9/32 dev lo").needs(&[DisposableNetwork, Tool("ip")]),
    shell("c40-ip-link-down", "ip link set lo down").needs(&[DisposableNetwork, Tool("ip")]),
    shell("c40-iptables-flush", "iptables -F 2>&1 || nft flush ruleset").needs(&[DisposableNetwork]),
    probe("c40-after-direct", &["tcp-connect", "192.0.2.1:80"]),
    probe("c40-after-proxy", &["tcp-connect", "127.0.0.1:3128"]).control(),
    // 41
    shell("c41-unshare-n", "unshare -n true").needs(&[Tool("unshare")]),
    shell("c41-unshare-urn", "unshare -Urn true").needs(&[Tool("unshare")]),
    shell("c41-unshare-u", "unshare -U true").needs(&[Tool("unshare")]),
    // 42
    probe("c42-processes", &["processes", "{{hex:marker}}"]),
    probe("c42-signal-host-pid", &["kill", "{{marker_pid}}"]),
    // 43 (the host's real users' homes, one step each, are added by the escape suite: their number is the host's)
    probe("c43-home-file-0", &["read-file", "{{home}}/.ssh/id_ed25519"]),
    probe("c43-home-file-1", &["read-file", "{{home}}/.aws/credentials"]),
    probe("c43-home-file-2", &["read-file", "{{home}}/.config/gh/hosts.yml"]),
    probe("c43-home-dir", &["list-dir", "{{home}}"]),
    probe("c43-root-ssh", &["list-dir", "/root/.ssh"]),
    probe("c43-root-config", &["list-dir", "/root/.config"]),
    probe("c43-root-bashrc", &["read-file", "/root/.bashrc"]),
    probe("c43-etc-shadow", &["read-file", "/etc/shadow"]),
    probe("c43-host-passwd", &["read-file", "/etc/passwd", DAEMON]),
    // 44
    probe("c44-write-0", &["write-file", "/usr/{{write_token}}"]),
    probe("c44-write-1", &["write-file", "/usr/bin/{{write_token}}"]),
    probe("c44-write-2", &["write-file", "/etc/{{write_token}}"]),
    probe("c44-write-3", &["write-file", "/etc/passwd"]),
    probe("c44-write-4", &["write-file", "/etc/hosts"]),
    probe("c44-write-5", &["write-file", "/etc/ssl/certs/{{write_token}}"]),
    probe("c44-write-6", &["write-file", "/etc/bot-bottle/ca-bundle.pem"]),
    probe("c44-write-7", &["write-file", "/{{write_token}}"]),
    // Beside the workspace and in /tmp the bottle has its own tmpfs: writing there is allowed and must stay private
    // (the runner checks the host).
    shell("c44-private-tmp", "echo x > /tmp/{{write_token}}").control(),
    probe("c44-beside-workspace", &["write-file", "{{parent}}/{{write_token}}"]).judged_outside(),
    // 45
    probe("c45-symlink-0", &["read-file", "escape-link", HOST_TARGET]),
    probe("c45-symlink-1", &["read-file", "escape-link-rel", HOST_TARGET]),
    probe("c45-symlink-2", &["read-file", "escape-dir/target.txt", HOST_TARGET]),
    probe(
        "c45-symlink-machine-id",
        &["read-file", "escape-link-machine-id", "{{hex:machine_id}}"],
    ),
    // Our own
    // #12: a root launcher's bottle held host root's ids: its files were root's on the host, root-only host files
    // were readable, /proc/sys writable but for Landlock.
    probe("x-host-root-ids", &["host-ids"]),
    probe("x-root-only-host-files", &["root-only-files", "/etc", "/usr"]),
    probe(
        "x-proc-sys-core_pattern",
        &["proc-sys-write", "/proc/sys/kernel/core_pattern"],
    ),
    probe(
        "x-proc-sys-ip_forward",
        &["proc-sys-write", "/proc/sys/net/ipv4/ip_forward"],
    ),
    probe("x-proc-sys-hostname", &["proc-sys-write", "/proc/sys/kernel/hostname"]),
    probe("x-kernel-memory-0", &["read-file", "/proc/kcore"]),
    probe("x-kernel-memory-1", &["read-file", "/dev/mem"]),
    probe("x-kernel-memory-2", &["read-file", "/dev/kmem"]),
    probe("x-kernel-memory-3", &["read-file", "/dev/port"]),
    probe("x-kernel-memory-4", &["read-file", "/dev/kmsg"]),
    probe("x-kernel-memory-5", &["read-file", "/sys/kernel/notes"]),
    probe("x-sysfs", &["list-dir", "/sys"]),
    probe(
        "x-cgroup-release-agent",
        &["write-file", "/sys/fs/cgroup/release_agent"],
    ),
    probe("x-abstract-socket", &["abstract-connect", "{{abstract_name}}"]),
    // The bottle's own control socket (live policy changes, ask-mode answers) is its owner's, on the host only.
    probe("x-control-socket", &["unix-connect", "{{control_sock}}"]),
    // #12: a host process's Unix socket in the workspace (the workspace is a bind of the host directory, and a
    // pathname socket is found through the filesystem, not the network namespace), by absolute and relative path;
    // one the host makes after the launch (the bottle writes `{{late_marker}}` and waits for `{{late_sock}}`); and a
    // datagram sent to a host socket by path, from a socket and from a socketpair.
    probe(
        "x-workspace-socket",
        &["unix-connect", "{{workspace_sock}}", "{{workspace_sock_rel}}"],
    ),
    // The control: a socket the bottle makes itself answers (so the refusals above are the warden's).
    probe("ctl-unix-own", &["unix-own", "own.sock"]).control(),
    probe(
        "x-workspace-socket-late",
        &["unix-connect-late", "{{late_marker}}", "{{late_sock}}"],
    ),
    probe("x-workspace-datagram", &["unix-dgram", "{{dgram_sock}}"]),
    probe("x-init-mem", &["proc-mem", "1"]),
    probe("x-init-environ", &["read-file", "/proc/1/environ", "{{hex:host_env}}"]),
    probe("x-host-env-anywhere", &["find-secret", "{{hex:host_env}}"]),
];
