//! Checks for the container backend: a docker/podman CLI, a daemon answering `/_ping` on its unix socket, its
//! default runtime, and optional gVisor. Trusts the `Host` seam; treats the daemon's replies as untrusted bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::host::Host;
use super::{Check, Status};
use crate::container::runtime::{RUNSC_ENTRY, Registered, choose, is_gvisor};

/// The remedy when no Docker daemon answers.
pub const DAEMON_REMEDY: &str = "start the daemon: `sudo systemctl start docker` (or `sudo dockerd &` where there is \
                                 no systemd); install it with `sudo apt-get install docker.io`";
pub(super) const PODMAN_DAEMON_REMEDY: &str = "start podman's API service: `sudo systemctl start podman.socket` (or \
                                               `sudo podman system service --time=0 &` where there is no systemd)";
pub(super) const CLI_REMEDY: &str = "install Docker: `sudo apt-get install docker.io`";
pub(super) const DOCKER_HOST_REMEDY: &str =
    "set DOCKER_HOST to the daemon's unix socket (`unix:///var/run/docker.sock`) or unset it";
/// Bound on `docker version`, which waits for the daemon.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one request to the daemon's socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(2);
const PING_REQUEST: &[u8] = b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n";
const INFO_REQUEST: &[u8] = b"GET /info HTTP/1.0\r\nHost: docker\r\n\r\n";

pub(super) fn checks(host: &dyn Host) -> Vec<Check> {
    let cli = find_cli(host);
    let mut checks = vec![launcher_check(host), cli_check(host, cli.as_ref())];
    let (daemon, socket) = daemon_check(host, cli.as_ref());
    checks.push(daemon);
    let info = socket.as_deref().and_then(|socket| info(host, socket));
    if let Some(runtime) = info.as_ref().and_then(runtime_check) {
        checks.push(runtime);
    }
    checks.push(gvisor_check(host, info.as_ref()));
    checks
}

/// Why a container bottle needs a root launcher, and the fix (the container backend says the same at launch).
pub const NOT_ROOT_REASON: &str = "container bottles are launched by root: the launcher puts the proxy's listener \
                                   into the container's network namespace and serves its socket warden from the host, \
                                   which takes root there (a member of the docker group is root on this host anyway)";
pub const NOT_ROOT_REMEDY: &str = "run it as root (`sudo bot-bottle run --backend container …`); the agent still runs as \
                                   the workspace's owner, never root";

fn launcher_check(host: &dyn Host) -> Check {
    const NAME: &str = "container launcher";
    if host.euid() == 0 {
        Check::ok(NAME, "root")
    } else {
        Check::new(NAME, Status::missing(NOT_ROOT_REASON, NOT_ROOT_REMEDY))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Docker,
    Podman,
}

struct Cli {
    flavour: Flavour,
    path: PathBuf,
}

fn find_cli(host: &dyn Host) -> Option<Cli> {
    if let Some(path) = host.which("docker") {
        return Some(Cli {
            flavour: Flavour::Docker,
            path,
        });
    }
    host.which("podman").map(|path| Cli {
        flavour: Flavour::Podman,
        path,
    })
}

fn cli_check(host: &dyn Host, cli: Option<&Cli>) -> Check {
    const NAME: &str = "container cli";
    let Some(cli) = cli else {
        return Check::new(
            NAME,
            Status::missing("neither `docker` nor `podman` is on PATH", CLI_REMEDY),
        );
    };
    // Local podman has no server part; its client version is the engine's.
    let format = match cli.flavour {
        Flavour::Docker => "{{.Server.Version}}",
        Flavour::Podman => "{{.Client.Version}}",
    };
    let server = match host.run(&cli.path, &["version", "--format", format], VERSION_TIMEOUT) {
        Ok(out) if out.success() && !out.stdout.trim().is_empty() => format!("server {}", out.stdout.trim()),
        Ok(out) if out.timed_out => format!("server version unknown: `version` timed out after {VERSION_TIMEOUT:?}"),
        Ok(out) => match out.code {
            Some(code) => format!("server version unknown: `version` exited with status {code}"),
            None => "server version unknown: `version` was killed by a signal".to_owned(),
        },
        Err(err) => format!("server version unknown: {err}"),
    };
    Check::ok(NAME, format!("{} ({server})", cli.path.display()))
}

/// The sockets to ping, in order: `$DOCKER_HOST`, else Docker's and podman's well-known sockets.
fn candidate_sockets(host: &dyn Host) -> Result<Vec<PathBuf>, String> {
    if let Some(docker_host) = host.env("DOCKER_HOST") {
        let docker_host = docker_host.to_string_lossy().into_owned();
        return match docker_host.strip_prefix("unix://") {
            Some(path) => Ok(vec![PathBuf::from(path)]),
            None => Err(docker_host),
        };
    }
    let mut sockets = vec![
        PathBuf::from("/var/run/docker.sock"),
        PathBuf::from("/run/podman/podman.sock"),
    ];
    if let Some(runtime_dir) = host.env("XDG_RUNTIME_DIR") {
        sockets.push(Path::new(&runtime_dir).join("podman/podman.sock"));
    }
    Ok(sockets)
}

/// Pings each candidate socket; returns the check and the socket that answered.
fn daemon_check(host: &dyn Host, cli: Option<&Cli>) -> (Check, Option<PathBuf>) {
    const NAME: &str = "container daemon";
    let sockets = match candidate_sockets(host) {
        Ok(sockets) => sockets,
        Err(docker_host) => {
            let reason =
                format!("DOCKER_HOST={docker_host} is not a unix:// socket; bot-bottle probes only unix sockets");
            return (Check::new(NAME, Status::missing(reason, DOCKER_HOST_REMEDY)), None);
        }
    };
    let mut failures = Vec::new();
    for socket in sockets {
        match host.unix_exchange(&socket, PING_REQUEST, SOCKET_TIMEOUT) {
            Ok(reply) => match parse_http(&reply) {
                Some((200, body)) if body.trim_ascii() == b"OK" => {
                    let check = Check::ok(NAME, format!("{} answered GET /_ping with OK", socket.display()));
                    return (check, Some(socket));
                }
                Some((status, _)) => failures.push(format!("{}: GET /_ping answered HTTP {status}", socket.display())),
                None => failures.push(format!("{}: GET /_ping got no HTTP reply", socket.display())),
            },
            Err(err) => failures.push(format!("{}: {err}", socket.display())),
        }
    }
    let remedy = match cli.map(|cli| cli.flavour) {
        Some(Flavour::Podman) => PODMAN_DAEMON_REMEDY,
        Some(Flavour::Docker) | None => DAEMON_REMEDY,
    };
    let check = Check::new(NAME, Status::missing("no container daemon answered GET /_ping", remedy))
        .with_detail(failures.join("; "));
    (check, None)
}

#[derive(Deserialize)]
struct Info {
    #[serde(rename = "DefaultRuntime")]
    default_runtime: Option<String>,
    #[serde(rename = "CgroupVersion")]
    cgroup_version: Option<String>,
    /// `name=seccomp,profile=default`, `name=rootless`, …
    #[serde(rename = "SecurityOptions", default)]
    security_options: Vec<String>,
    /// Podman's word for it (its `SecurityOptions` do not say `rootless`).
    #[serde(rename = "Rootless", default)]
    rootless: bool,
    #[serde(rename = "Runtimes", default)]
    runtimes: BTreeMap<String, InfoRuntime>,
}

#[derive(Deserialize)]
struct InfoRuntime {
    path: Option<String>,
    #[serde(rename = "runtimeArgs", default)]
    runtime_args: Vec<String>,
}

/// The daemon's `GET /info`; `None` when it does not answer it.
fn info(host: &dyn Host, socket: &Path) -> Option<Info> {
    let reply = host.unix_exchange(socket, INFO_REQUEST, SOCKET_TIMEOUT).ok()?;
    let (200, body) = parse_http(&reply)? else { return None };
    serde_json::from_slice(body).ok()
}

/// The daemon's default runtime from `GET /info`; `None` when the daemon does not say.
fn runtime_check(info: &Info) -> Option<Check> {
    const NAME: &str = "container runtime";
    let runtime = info.default_runtime.clone()?;
    let cgroup = info.cgroup_version.clone().unwrap_or_else(|| "unknown".to_owned());
    let rootless = info.rootless
        || info
            .security_options
            .iter()
            .any(|o| o.split(',').any(|kv| kv == "name=rootless"));
    let detail = format!(
        "default runtime {runtime}, cgroup v{cgroup}, {}",
        if rootless { "rootless" } else { "rootful" }
    );
    // The container backend puts the proxy's listener into the container's network namespace from the host, which a
    // rootless engine's namespaces do not let it do.
    if rootless {
        // Measured on a cgroup v1 host: rootless Podman says "Resource limits are not supported and ignored on
        // cgroups V1 rootless systems" and reads back no pids or memory limit.
        let reason = if cgroup == "1" {
            "the engine is rootless; container bottles need a rootful engine (and on cgroup v1 a rootless engine \
             ignores every resource limit)"
        } else {
            "the engine is rootless; container bottles need a rootful engine"
        };
        let remedy = "start a rootful daemon (`sudo systemctl start docker`, or `sudo dockerd &`) and point DOCKER_HOST \
                      at its socket (`unix:///var/run/docker.sock`)";
        return Some(Check::new(NAME, Status::missing(reason, remedy)).with_detail(detail));
    }
    // crun 1.8 refuses hybrid cgroup v1 hosts ("cgroups in hybrid mode not supported"); runc works there
    // (research/engines.md §2).
    if runtime == "crun" && cgroup == "1" {
        let reason = "the default runtime crun fails on cgroup v1 hosts; make runc the default runtime \
                      (`default-runtime` in daemon.json, `runtime = \"runc\"` in containers.conf)";
        return Some(Check::new(NAME, Status::degraded(reason)).with_detail(detail));
    }
    Some(Check::ok(NAME, detail))
}

/// gVisor, said rather than judged unless the engine has it registered: a bottle runs under it only when asked
/// (`runtime = "runsc"`), and then only if the registration fits (the launch refuses otherwise, as this says).
fn gvisor_check(host: &dyn Host, info: Option<&Info>) -> Check {
    const NAME: &str = "gVisor (runsc)";
    let registered: BTreeMap<String, Registered> = info
        .map(|i| {
            i.runtimes
                .iter()
                .map(|(name, r)| {
                    let path = r.path.clone().unwrap_or_else(|| name.clone());
                    (
                        name.clone(),
                        Registered {
                            path,
                            args: r.runtime_args.clone(),
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let gvisors: Vec<&String> = registered
        .iter()
        .filter(|(_, r)| is_gvisor(r))
        .map(|(n, _)| n)
        .collect();
    let installed = host.which("runsc");
    if gvisors.is_empty() {
        let detail = match (installed, info) {
            (Some(path), Some(_)) => format!(
                "installed at {}, not registered with the engine; to run bottles under it (`--runtime runsc`) \
                 register it in /etc/docker/daemon.json: {RUNSC_ENTRY}",
                path.display()
            ),
            (Some(path), None) => format!("installed at {}", path.display()),
            (None, _) => "not installed; bottles run under the engine's default runtime (`apt-get install runsc` \
                          for gVisor)"
                .to_string(),
        };
        return Check::ok(NAME, detail);
    }
    let mut fit = Vec::new();
    for name in gvisors {
        match choose(Some(name), None, &registered, false) {
            Ok(_) => fit.push(format!("`--runtime {name}`")),
            Err(e) => {
                return Check::new(NAME, Status::degraded(e.to_string())).with_detail(format!(
                    "registered as runtime `{name}` with {:?}",
                    registered[name].args
                ));
            }
        }
    }
    Check::ok(
        NAME,
        format!("registered; bottles run under gVisor with {}", fit.join(" or ")),
    )
}

/// Splits an HTTP/1.x reply into its status code and body. Only what `/_ping` and `/info` need: no chunking
/// (HTTP/1.0 replies cannot be chunked, RFC 9112 §6.1).
fn parse_http(reply: &[u8]) -> Option<(u16, &[u8])> {
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&reply[..split]).ok()?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status = parts.next()?.parse().ok()?;
    Some((status, &reply[split + 4..]))
}

#[cfg(test)]
mod tests {
    use super::super::fake::{FakeHost, output};
    use super::super::{BackendReport, Severity};
    use super::*;
    use bottle_policy::Backend;

    fn run(host: &FakeHost) -> BackendReport {
        super::super::report(Backend::Container, host)
    }

    /// A healthy host whose Docker socket answers `GET /info` with `json`.
    fn with_info(json: &str) -> FakeHost {
        let mut host = FakeHost::healthy();
        host.socket(
            "/var/run/docker.sock",
            "/info",
            &format!("HTTP/1.0 200 OK\r\n\r\n{json}"),
        );
        host
    }

    fn remedy<'a>(report: &'a BackendReport, name: &str) -> &'a str {
        match &report.check(name).unwrap().status {
            Status::Missing { remedy, .. } => remedy,
            other => panic!("{name} is {other:?}"),
        }
    }

    #[test]
    fn healthy_daemon_reports_version_and_runtime() {
        let report = run(&FakeHost::healthy());
        assert_eq!(
            report.check("container cli").unwrap().detail.as_deref(),
            Some("/usr/bin/docker (server 20.10.24)")
        );
        assert_eq!(
            report.check("container runtime").unwrap().detail.as_deref(),
            Some("default runtime runc, cgroup v1, rootful")
        );
        assert_eq!(report.worst(), Severity::Ok);
    }

    #[test]
    fn no_cli_on_path_is_missing() {
        let mut host = FakeHost::healthy();
        host.path.remove("docker");
        assert_eq!(remedy(&run(&host), "container cli"), CLI_REMEDY);
    }

    #[test]
    fn silent_daemon_is_missing_with_the_start_remedy_and_every_socket_tried() {
        let mut host = FakeHost::healthy();
        host.sockets.clear();
        host.set_env("XDG_RUNTIME_DIR", "/run/user/1000");
        host.command(
            "/usr/bin/docker version --format {{.Server.Version}}",
            Ok(output(1, "", "Cannot connect")),
        );
        let report = run(&host);
        assert_eq!(remedy(&report, "container daemon"), DAEMON_REMEDY);
        assert_eq!(
            remedy(&report, "container daemon"),
            "start the daemon: `sudo systemctl start docker` (or `sudo dockerd &` where there is no systemd); \
             install it with `sudo apt-get install docker.io`"
        );
        for socket in [
            "/var/run/docker.sock",
            "/run/podman/podman.sock",
            "/run/user/1000/podman/podman.sock",
        ] {
            assert!(
                host.called(&format!("unix_exchange {socket} /_ping")),
                "{:?}",
                host.calls()
            );
        }
        assert!(report.check("container runtime").is_none());
        assert_eq!(
            report.check("container cli").unwrap().detail.as_deref(),
            Some("/usr/bin/docker (server version unknown: `version` exited with status 1)")
        );
    }

    #[test]
    fn podman_only_host_gets_the_podman_remedy() {
        let mut host = FakeHost::healthy();
        host.path.remove("docker");
        host.path.insert("podman".into(), "/usr/bin/podman".into());
        host.sockets.clear();
        let report = run(&host);
        assert_eq!(remedy(&report, "container daemon"), PODMAN_DAEMON_REMEDY);
        assert!(host.called("run /usr/bin/podman version --format {{.Client.Version}}"));
    }

    #[test]
    fn docker_host_unix_path_is_the_only_socket_tried() {
        let mut host = FakeHost::healthy();
        host.set_env("DOCKER_HOST", "unix:///tmp/d.sock");
        host.socket("/tmp/d.sock", "/_ping", "HTTP/1.1 200 OK\r\n\r\nOK\n");
        let report = run(&host);
        assert_eq!(report.check("container daemon").unwrap().status, Status::Ok);
        assert!(!host.called("unix_exchange /var/run/docker.sock"));
    }

    #[test]
    fn docker_host_over_tcp_is_missing() {
        let mut host = FakeHost::healthy();
        host.set_env("DOCKER_HOST", "tcp://10.0.0.1:2375");
        assert_eq!(remedy(&run(&host), "container daemon"), DOCKER_HOST_REMEDY);
    }

    #[test]
    fn a_non_ok_ping_is_missing() {
        let mut host = FakeHost::healthy();
        host.socket(
            "/var/run/docker.sock",
            "/_ping",
            "HTTP/1.0 500 Internal Server Error\r\n\r\nnope",
        );
        let report = run(&host);
        assert_eq!(remedy(&report, "container daemon"), DAEMON_REMEDY);
        let detail = report.check("container daemon").unwrap().detail.clone().unwrap();
        assert!(
            detail.contains("/var/run/docker.sock: GET /_ping answered HTTP 500"),
            "{detail}"
        );
    }

    #[test]
    fn crun_on_cgroup_v1_degrades() {
        let host = with_info(r#"{"DefaultRuntime":"crun","CgroupVersion":"1"}"#);
        assert_eq!(
            run(&host).check("container runtime").unwrap().status.severity(),
            Severity::Degraded
        );
    }

    #[test]
    fn a_rootless_engine_is_missing_with_the_rootful_remedy() {
        let report = run(&with_info(
            r#"{"DefaultRuntime":"runc","CgroupVersion":"2","SecurityOptions":["name=seccomp,profile=default","name=rootless"]}"#,
        ));
        let check = report.check("container runtime").unwrap();
        assert_eq!(
            check.detail.as_deref(),
            Some("default runtime runc, cgroup v2, rootless")
        );
        assert!(
            remedy(&report, "container runtime").contains("rootful daemon"),
            "{check:#?}"
        );
        assert!(
            !format!("{check:?}").contains("ignores every resource limit"),
            "{check:#?}"
        );
    }

    #[test]
    fn rootless_podman_is_known_by_its_own_field() {
        // As rootless Podman 4.3.1 answers `GET /info` on its Docker-compatible socket.
        let report = run(&with_info(
            r#"{"DefaultRuntime":"crun","CgroupVersion":"2","SecurityOptions":["name=seccomp,profile=default"],"Rootless":true}"#,
        ));
        let check = report.check("container runtime").unwrap();
        assert_eq!(check.status.severity(), Severity::Missing, "{check:#?}");
    }

    #[test]
    fn a_rootless_engine_on_cgroup_v1_is_said_to_ignore_limits() {
        let report = run(&with_info(
            r#"{"DefaultRuntime":"runc","CgroupVersion":"1","SecurityOptions":["name=rootless"]}"#,
        ));
        let check = report.check("container runtime").unwrap();
        assert_eq!(check.status.severity(), Severity::Missing);
        assert!(
            format!("{check:?}").contains("ignores every resource limit"),
            "{check:#?}"
        );
    }

    #[test]
    fn an_unprivileged_launcher_is_missing_with_the_root_remedy() {
        let mut host = FakeHost::healthy();
        host.euid = 1000;
        let report = run(&host);
        assert!(!report.usable());
        assert!(remedy(&report, "container launcher").contains("sudo bot-bottle run"));
    }

    #[test]
    fn runsc_unregistered_or_absent_is_reported_and_changes_nothing() {
        let mut host = FakeHost::healthy();
        let with = run(&host);
        let check = with.check("gVisor (runsc)").unwrap();
        assert!(
            format!("{check:?}").contains("not registered with the engine"),
            "{check:#?}"
        );
        host.path.remove("runsc");
        let without = run(&host);
        assert!(format!("{:?}", without.check("gVisor (runsc)")).contains("not installed"));
        for report in [&with, &without] {
            let check = report.check("gVisor (runsc)").unwrap();
            assert_eq!(check.status.severity(), Severity::Ok, "{check:#?}");
            assert!(report.usable());
        }
    }

    #[test]
    fn a_registered_runsc_is_judged_as_a_launch_would() {
        for (args, severity, says) in [
            (
                r#"["--network=host","--host-fifo=open"]"#,
                Severity::Ok,
                "--runtime runsc",
            ),
            (r#"[]"#, Severity::Degraded, "--network=host"),
            (
                r#"["--network=host","--host-fifo=open","--host-uds=all"]"#,
                Severity::Degraded,
                "--host-uds=all",
            ),
        ] {
            let mut host = FakeHost::healthy();
            host.socket(
                "/var/run/docker.sock",
                "/info",
                &format!(
                    "HTTP/1.0 200 OK\r\n\r\n{{\"DefaultRuntime\":\"runc\",\"CgroupVersion\":\"1\",\"Runtimes\":\
                     {{\"runc\":{{\"path\":\"runc\"}},\"runsc\":{{\"path\":\"/usr/bin/runsc\",\"runtimeArgs\":{args}}}}}}}"
                ),
            );
            let report = run(&host);
            let check = report.check("gVisor (runsc)").unwrap();
            assert_eq!(check.status.severity(), severity, "{check:#?}");
            assert!(format!("{check:?}").contains(says), "{check:#?}");
            assert!(report.usable());
        }
    }

    #[test]
    fn http_parsing_wants_a_status_line_and_a_blank_line() {
        assert_eq!(
            parse_http(b"HTTP/1.0 200 OK\r\nA: b\r\n\r\nOK"),
            Some((200, &b"OK"[..]))
        );
        assert_eq!(parse_http(b"SSH-2.0\r\n\r\n"), None);
        assert_eq!(parse_http(b"HTTP/1.0 200 OK\r\n"), None);
    }
}
