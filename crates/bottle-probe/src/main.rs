//! Runs inside a bottle, attempts one named escape, prints one JSON verdict line:
//! `{"case": ..., "escaped": bool, "evidence": ..., "detail": {...}}` (`detail` only when there is some).
//!
//! Exit 0 when the attempt ran, whatever the verdict; 2 when the case is unknown or its arguments are wrong; 3 when
//! the attempt could not even be set up (no verdict is printed then). A probe that cannot run is never a pass.
//! It needs nothing from the bottle but the kernel: no resolver, no proxy variables, no files beyond what a case
//! names. `bottle-probe list` prints every case.

mod host;
mod ids;
mod kernel;
mod net;
mod proxy;
mod sys;
mod tls;
mod verdict;

use std::io::Write;
use std::process::ExitCode;

use verdict::{Failure, Outcome, usage};

/// One named escape attempt.
struct Case {
    name: &'static str,
    args: &'static str,
    what: &'static str,
    run: fn(&[String]) -> Outcome,
}

const fn case(name: &'static str, args: &'static str, what: &'static str, run: fn(&[String]) -> Outcome) -> Case {
    Case { name, args, what, run }
}

const CASES: &[Case] = &[
    // Raw egress
    case(
        "tcp-connect",
        "ADDR:PORT",
        "open a TCP connection directly, bypassing the proxy",
        net::tcp_connect,
    ),
    case(
        "udp-send",
        "ADDR:PORT",
        "send a UDP datagram directly and wait for any answer",
        net::udp_send,
    ),
    case(
        "quic",
        "ADDR:PORT",
        "send a QUIC v1 Initial-shaped datagram (HTTP/3)",
        net::quic,
    ),
    case(
        "ping-raw",
        "ADDR",
        "ICMP echo over socket(SOCK_RAW, IPPROTO_ICMP[V6])",
        net::ping_raw,
    ),
    case(
        "ping-dgram",
        "ADDR",
        "ICMP echo over an unprivileged socket(SOCK_DGRAM, IPPROTO_ICMP[V6])",
        net::ping_dgram,
    ),
    case(
        "raw-socket",
        "inet|inet6|ip-raw|packet|packet-dgram",
        "create a raw or packet socket",
        net::raw_socket,
    ),
    case(
        "ssh",
        "HOST:PORT",
        "resolve and connect like `ssh`, reading the server banner",
        net::ssh,
    ),
    case(
        "port-scan",
        "ADDR PROXY-PORT PORT|LO-HI...",
        "connect to each port; only the proxy may answer",
        net::port_scan,
    ),
    // DNS
    case(
        "resolve",
        "NAME",
        "getaddrinfo(NAME) through whatever resolver the bottle has",
        net::resolve,
    ),
    case(
        "dns-udp",
        "SERVER:PORT NAME",
        "send a DNS query for NAME over UDP",
        net::dns_udp,
    ),
    case(
        "dns-tcp",
        "SERVER:PORT NAME",
        "send a DNS query for NAME over TCP",
        net::dns_tcp,
    ),
    case(
        "dot",
        "SERVER:PORT",
        "DNS over TLS: connect and send a ClientHello",
        net::dot,
    ),
    // Proxy
    case("proxy-get", "URL", "absolute-form GET through the proxy", proxy::get),
    case(
        "proxy-connect",
        "HOST:PORT",
        "CONNECT through the proxy",
        proxy::connect,
    ),
    case(
        "proxy-sni",
        "HOST:PORT SNI",
        "CONNECT to HOST, then a ClientHello naming SNI",
        proxy::sni,
    ),
    case(
        "proxy-ws",
        "URL",
        "WebSocket upgrade through the proxy (plain HTTP)",
        proxy::websocket,
    ),
    case(
        "proxy-smuggle",
        "cl-te|te-cl|double-cl|get-body URL PATH",
        "hide a request for PATH in a body",
        proxy::smuggle,
    ),
    case(
        "proxy-malformed",
        "KIND URL",
        "a malformed or oversized request head; then the proxy must still serve",
        proxy::malformed,
    ),
    case(
        "proxy-slowloris",
        "URL SECS",
        "drip a request head; the proxy must close the connection",
        proxy::slowloris,
    ),
    // Local IPC
    case(
        "unix-connect",
        "PATH...",
        "connect to unix sockets (docker, podman, containerd, agents)",
        net::unix_connect,
    ),
    case(
        "unix-own",
        "PATH",
        "control: a socket made in the bottle answers it (the socket warden lets it through)",
        net::unix_own,
    ),
    case(
        "unix-dgram",
        "PATH",
        "send a datagram to a unix socket by path (from a socket and from a socketpair)",
        net::unix_dgram,
    ),
    case(
        "unix-connect-late",
        "MARKER PATH",
        "touch MARKER, wait for a socket at PATH (made by the host), connect",
        net::unix_connect_late,
    ),
    case(
        "unix-scan",
        "DIR...",
        "find and connect to every unix socket under DIR",
        net::unix_scan,
    ),
    case(
        "abstract-connect",
        "NAME",
        "connect to an abstract unix socket (per network namespace)",
        net::abstract_connect,
    ),
    case(
        "ssh-agent",
        "[PATH...]",
        "reach an ssh-agent via $SSH_AUTH_SOCK or PATH",
        net::ssh_agent,
    ),
    // Host surface
    case(
        "read-file",
        "PATH [NEEDLE]",
        "read a file that must not be visible (containing NEEDLE)",
        host::read_file,
    ),
    case(
        "list-dir",
        "PATH",
        "list a directory that must not be visible",
        host::list_dir,
    ),
    case(
        "write-file",
        "PATH",
        "open a path outside the workspace for writing",
        host::write_file,
    ),
    case(
        "find-secret",
        "NEEDLE [ROOT...]",
        "search env, /proc/*/environ, cmdlines and files for NEEDLE",
        host::find_secret,
    ),
    case(
        "proc-status",
        "",
        "no_new_privs set, every capability set empty, seccomp on",
        host::proc_status,
    ),
    case(
        "processes",
        "MARKER",
        "list processes; none may be a host process carrying MARKER",
        host::processes,
    ),
    case("kill", "PID", "signal 0 to a host pid", host::kill),
    case("proc-mem", "PID", "open /proc/PID/mem for writing", host::proc_mem),
    case(
        "host-ids",
        "",
        "no id of the bottle's user namespace is host uid or gid 0",
        ids::host_ids,
    ),
    case(
        "root-only-files",
        "DIR...",
        "open every file and directory under DIR without a read bit for others",
        ids::root_only_files,
    ),
    case(
        "proc-sys-write",
        "PATH",
        "write a /proc/sys value back unchanged",
        host::proc_sys_write,
    ),
    case(
        "command",
        "CMD [ARG...]",
        "run a command; escaped means it exited 0",
        host::command,
    ),
    // Kernel
    case(
        "syscall",
        "NAME",
        "a syscall the bottle must deny (`bottle-probe list` for names)",
        kernel::syscall,
    ),
    case("netlink-route", "", "add a route over rtnetlink", kernel::netlink_route),
    case("iptables", "", "read the iptables filter table", kernel::iptables),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((name, rest)) = args.split_first() else {
        eprintln!("usage: bottle-probe CASE ARGS... (bottle-probe list)");
        return ExitCode::from(2);
    };
    if name == kernel::TRACEE {
        // The ptrace case's target: a child of our own, so the attempt needs no binary from the bottle.
        std::thread::sleep(std::time::Duration::from_secs(30));
        return ExitCode::SUCCESS;
    }
    if name == "list" {
        // A closed pipe (`bottle-probe list | head`) is not an error worth a panic.
        let mut out = std::io::stdout().lock();
        for c in CASES {
            let _ = writeln!(out, "{:<18}{:<40}{}", c.name, c.args, c.what);
        }
        let _ = writeln!(out, "\nsyscall names: {}", kernel::SYSCALLS.join(", "));
        return ExitCode::SUCCESS;
    }
    let outcome = match CASES.iter().find(|c| c.name == name) {
        Some(c) => (c.run)(rest).map_err(|f| match f {
            Failure::Usage(msg) => Failure::Usage(format!("{msg}\nusage: bottle-probe {} {}", c.name, c.args)),
            other => other,
        }),
        None => Err(usage(format!("unknown case `{name}` (bottle-probe list)"))),
    };
    report(outcome)
}

fn report(outcome: Outcome) -> ExitCode {
    match outcome {
        Ok(v) => {
            println!("{}", v.to_json());
            ExitCode::SUCCESS
        }
        Err(Failure::Usage(msg)) => {
            eprintln!("bottle-probe: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::CannotRun(msg)) => {
            eprintln!("bottle-probe: the attempt could not be made: {msg}");
            ExitCode::from(3)
        }
    }
}

/// Exactly `N` arguments.
fn exact<const N: usize>(args: &[String]) -> Result<[&str; N], Failure> {
    let v: Vec<&str> = args.iter().map(String::as_str).collect();
    v.try_into()
        .map_err(|v: Vec<&str>| usage(format!("expected {N} argument(s), got {}", v.len())))
}

#[cfg(test)]
mod tests {
    use bottle_probe::catalogue::{self, Attempt};

    use super::CASES;

    #[test]
    fn every_catalogue_attempt_is_a_case_of_this_probe() {
        for (f, c) in catalogue::all() {
            let name = match c.attempt {
                Attempt::Probe(args) => args.first().copied().unwrap_or_default(),
                Attempt::Shell(_) => "command",
            };
            assert!(
                CASES.iter().any(|k| k.name == name),
                "{}: {}: no probe case `{name}`",
                f.name,
                c.id
            );
            if let Attempt::Probe(["syscall", which]) = c.attempt {
                assert!(
                    crate::kernel::SYSCALLS.contains(which),
                    "{}: no syscall `{which}`",
                    c.id
                );
            }
        }
    }
}
