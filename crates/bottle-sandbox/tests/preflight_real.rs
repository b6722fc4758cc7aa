//! Runs the whole preflight against this machine (`RealHost`) and asserts what is true of it. Checks that depend on
//! root, a daemon or KVM say why they skip; `BOTTLE_TEST_REQUIRE=namespace,container,smolmachines` makes them fail.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use bottle_policy::Backend;
use bottle_sandbox::preflight::{BackendReport, DAEMON_REMEDY, RealHost, Severity, Status, report_all};
use bottle_test_support::require::skip;

fn find(reports: &[BackendReport], backend: Backend) -> &BackendReport {
    reports
        .iter()
        .find(|r| r.backend == backend)
        .expect("report_all covers every backend")
}

/// Our own `/_ping`, independent of the code under test.
fn docker_sock_answers(path: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(path) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.") && reply.ends_with("OK")
}

#[test]
fn report_all_on_this_machine() {
    let reports = report_all(&RealHost);
    eprintln!("{}", serde_json::to_string_pretty(&reports).unwrap());
    assert_eq!(reports.iter().map(|r| r.backend).collect::<Vec<_>>(), Backend::ALL);

    for report in &reports {
        assert!(!report.checks.is_empty(), "{:?} has no checks", report.backend);
        for check in &report.checks {
            assert!(!check.name.is_empty());
            if let Status::Missing { reason, remedy } = &check.status {
                assert!(!reason.trim().is_empty(), "{}: empty reason", check.name);
                assert!(!remedy.trim().is_empty(), "{}: empty remedy", check.name);
            }
        }
        assert_eq!(report.usable(), report.worst() < Severity::Missing);
    }

    let namespace = find(&reports, Backend::Namespace);
    let userns_enabled = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .is_ok_and(|v| v.trim().parse::<u64>().is_ok_and(|n| n > 0));
    if rustix::process::geteuid().is_root() && userns_enabled {
        assert!(namespace.usable(), "{namespace:#?}");
        assert_eq!(namespace.check("user namespaces").unwrap().status, Status::Ok);
        assert_eq!(namespace.check("seccomp").unwrap().status, Status::Ok);
    } else {
        skip("namespace", "not root, or user.max_user_namespaces is 0");
    }

    let container = find(&reports, Backend::Container);
    let daemon = container.check("container daemon").unwrap();
    if std::env::var_os("DOCKER_HOST").is_some() {
        skip(
            "container",
            "DOCKER_HOST is set, so /var/run/docker.sock is not the socket under test",
        );
    } else if docker_sock_answers(Path::new("/var/run/docker.sock")) {
        assert_eq!(daemon.status, Status::Ok, "{daemon:#?}");
    } else if Path::new("/run/podman/podman.sock").exists() || std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        skip("container", "a podman socket may answer in place of docker's");
    } else {
        assert!(
            matches!(&daemon.status, Status::Missing { remedy, .. } if remedy == DAEMON_REMEDY),
            "{daemon:#?}"
        );
        skip(
            "container",
            "no docker daemon answers on /var/run/docker.sock (checked that it is reported Missing)",
        );
    }

    let smol = find(&reports, Backend::Smolmachines);
    let kvm = smol.check("/dev/kvm").unwrap();
    // Our own open, independent of the code under test: as root (or in group kvm) it succeeds here.
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        assert_ne!(kvm.status.severity(), Severity::Missing, "{kvm:#?}");
    } else {
        assert!(matches!(kvm.status, Status::Missing { .. }), "{kvm:#?}");
        skip(
            "smolmachines",
            "/dev/kvm is absent or not openable read-write (checked that it is reported Missing)",
        );
    }
}
