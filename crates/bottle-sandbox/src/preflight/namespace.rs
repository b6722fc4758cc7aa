//! Checks for the namespace backend: user/mount/pid/net/ipc/uts/cgroup namespaces, seccomp, Landlock,
//! no_new_privs, and the system calls a launch needs. Trusts the `Host` probes; decides verdicts and remedies.

use std::io;

use super::host::{Host, KernelCall, NamespaceProbe, SeccompSupport, Unshare};
use super::{Check, Status};

pub(super) const NOT_LINUX_REMEDY: &str = "run bot-bottle on Linux, or use the container or smolmachines backend";
pub(super) const SECCOMP_REMEDY: &str = "rebuild the kernel with CONFIG_SECCOMP_FILTER";
pub(super) const FORK_REMEDY: &str = "fork(2) failed: raise the process limit (`ulimit -u`) or free memory, then retry";
pub(super) const USERNS_KERNEL_REMEDY: &str = "no sysctl forbids user namespaces, so the kernel lacks CONFIG_USER_NS \
     or a seccomp profile forbids unshare(2) (as inside a default Docker container): run bot-bottle directly on a \
     host whose kernel has CONFIG_USER_NS";
pub(super) const ISOLATION_KERNEL_REMEDY: &str = "use a kernel built with CONFIG_PID_NS, CONFIG_NET_NS, CONFIG_IPC_NS \
     and CONFIG_UTS_NS, outside any seccomp profile that forbids unshare(2)";
pub(super) const KERNEL_UPGRADE_REMEDY: &str = "upgrade to Linux 3.5 or newer";
pub(super) const SYSCALL_FORBIDDEN_REMEDY: &str = "a seccomp profile or security module forbids it (as inside a \
     container): run bot-bottle directly on the host";
/// PR_SET_NO_NEW_PRIVS appeared in Linux 3.5 (prctl(2)).
const NO_NEW_PRIVS_SINCE: (u32, u32) = (3, 5);

pub(super) fn checks(host: &dyn Host) -> Vec<Check> {
    if !cfg!(target_os = "linux") {
        return vec![not_linux()];
    }
    let user = host.try_unshare(NamespaceProbe::User);
    let user_ok = matches!(user, Ok(Unshare::Done));
    vec![
        user_namespaces(host, user),
        isolation_namespaces(host, user_ok),
        cgroup_namespace(host),
        seccomp(host),
        landlock(host),
        no_new_privs(host),
        kernel_calls(host),
        resource_limits(host),
        bottle_ids(host),
    ]
}

/// Whose ids bottles run with (#12). An unprivileged launcher's bottles have its own ids. A root launcher's bottles
/// get host ids of their own, which must be free, and see the workspace through an idmapped mount, probed here on
/// the current directory (where `run` takes its workspace from by default).
fn bottle_ids(host: &dyn Host) -> Check {
    const NAME: &str = "bottle ids";
    if host.euid() != 0 {
        return Check::ok(NAME, "your own ids, mapped to themselves");
    }
    if let Err(why) = host.bottle_ids_free() {
        return Check::new(
            NAME,
            Status::missing(
                why,
                "free that id (remove the account or subordinate id range that holds it), or narrow BOT_BOTTLE_POOL \
                 to addresses whose ids are free",
            ),
        );
    }
    match host.idmapped_mount(std::path::Path::new(".")) {
        Ok(()) => Check::ok(
            NAME,
            "root's bottles run as host ids of their own (2130706432 + N for 127.0.0.N), never as root; the current \
             directory can be shown to them through an idmapped mount",
        ),
        Err(e) => Check::new(
            NAME,
            Status::missing(
                format!("the current directory cannot be shown to a bottle through an idmapped mount ({e})"),
                "keep the workspace on a filesystem with idmapped mounts (ext4, xfs, btrfs; tmpfs from Linux 6.3), or \
                 run bot-bottle as your own user",
            ),
        ),
    }
}

/// Whether bottles get their memory, process and cpu limits here. Without cgroups a bottle still confines, with
/// bounded tmpfs sizes; a policy that writes a limit is refused.
fn resource_limits(host: &dyn Host) -> Check {
    const NAME: &str = "resource limits (cgroups)";
    match host.cgroups() {
        Ok(crate::cgroup::Hierarchy::V2 { base }) => Check::ok(NAME, format!("cgroup v2 under {}", base.display())),
        Ok(crate::cgroup::Hierarchy::V1 { .. }) => {
            Check::ok(NAME, "cgroup v1 memory, pids and cpu controllers, as root")
        }
        Err(e) => Check::new(
            NAME,
            Status::degraded(format!(
                "{e}; bottles run without default memory and process limits, and a policy that sets \
                 [bottle.resources] is refused"
            )),
        ),
    }
}

/// The system calls a launch cannot do without (it fails closed on them; this says so before it is tried).
fn kernel_calls(host: &dyn Host) -> Check {
    const NAME: &str = "system calls";
    let names: Vec<&str> = KernelCall::ALL.iter().map(|c| c.name()).collect();
    for call in KernelCall::ALL {
        match host.kernel_call(call) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
                return Check::new(
                    NAME,
                    Status::missing(
                        format!("{}(2) is forbidden here: {err}", call.name()),
                        SYSCALL_FORBIDDEN_REMEDY,
                    ),
                );
            }
            Err(err) => {
                return Check::new(
                    NAME,
                    Status::missing(
                        format!(
                            "this kernel lacks {}(2), added in Linux {}: {err}",
                            call.name(),
                            call.since()
                        ),
                        format!("upgrade to Linux {} or newer", call.since()),
                    ),
                );
            }
        }
    }
    Check::ok(NAME, names.join(", "))
}

pub(super) fn not_linux() -> Check {
    Check::new(
        "linux",
        Status::missing("the namespace backend needs Linux", NOT_LINUX_REMEDY),
    )
    .with_detail(std::env::consts::OS)
}

fn user_namespaces(host: &dyn Host, probe: io::Result<Unshare>) -> Check {
    const NAME: &str = "user namespaces";
    match probe {
        Ok(Unshare::Done) => Check::ok(NAME, "unshare(CLONE_NEWUSER) succeeded in a child process"),
        Ok(Unshare::Refused(err)) => {
            let (remedy, observed) = userns_remedy(host);
            Check::new(
                NAME,
                Status::missing(format!("the kernel refused unshare(CLONE_NEWUSER): {err}"), remedy),
            )
            .with_detail(observed)
        }
        Err(err) => Check::new(
            NAME,
            Status::missing(format!("could not fork the unshare probe: {err}"), FORK_REMEDY),
        ),
    }
}

fn isolation_namespaces(host: &dyn Host, user_ok: bool) -> Check {
    const NAME: &str = "mount/pid/net/ipc/uts namespaces";
    const FLAGS: &str = "CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWNET|CLONE_NEWIPC|CLONE_NEWUTS";
    match host.try_unshare(NamespaceProbe::Isolation) {
        Ok(Unshare::Done) => Check::ok(NAME, format!("unshare({FLAGS}) succeeded in a child process")),
        Ok(Unshare::Refused(err)) => {
            let reason = format!("the kernel refused unshare({FLAGS}): {err}");
            if user_ok {
                return Check::new(NAME, Status::missing(reason, ISOLATION_KERNEL_REMEDY));
            }
            let (remedy, observed) = userns_remedy(host);
            Check::new(NAME, Status::missing(reason, remedy)).with_detail(observed)
        }
        Err(err) => Check::new(
            NAME,
            Status::missing(format!("could not fork the unshare probe: {err}"), FORK_REMEDY),
        ),
    }
}

/// Which sysctl forbids user namespaces, as the commands that lift it, plus the values read.
fn userns_remedy(host: &dyn Host) -> (String, String) {
    let root = host.euid() == 0;
    // (sysctl, value that forbids, value that allows, applies to root too?)
    let knobs = [
        ("user.max_user_namespaces", "0", "15000", true),
        // Debian/Ubuntu patch: 0 forbids user namespaces to unprivileged users.
        ("kernel.unprivileged_userns_clone", "0", "1", false),
        // Ubuntu 23.10+: AppArmor denies unprivileged user namespaces to unconfined programs.
        ("kernel.apparmor_restrict_unprivileged_userns", "1", "0", false),
    ];
    let mut observed = Vec::new();
    let mut fixes = Vec::new();
    for (name, forbids, allows, applies_to_root) in knobs {
        let Ok(value) = host.sysctl(name) else { continue };
        if value == forbids && (applies_to_root || !root) {
            fixes.push(format!("`sudo sysctl -w {name}={allows}`"));
        }
        observed.push(format!("{name}={value}"));
    }
    let observed = if observed.is_empty() {
        "none of the userns sysctls exist".to_owned()
    } else {
        observed.join(", ")
    };
    if fixes.is_empty() {
        return (USERNS_KERNEL_REMEDY.to_owned(), observed);
    }
    (
        format!(
            "allow user namespaces: {} (persist it in /etc/sysctl.d/)",
            fixes.join(" and ")
        ),
        observed,
    )
}

fn cgroup_namespace(host: &dyn Host) -> Check {
    const NAME: &str = "cgroup namespace";
    match host.try_unshare(NamespaceProbe::Cgroup) {
        Ok(Unshare::Done) => Check::ok(
            NAME,
            "unshare(CLONE_NEWUSER|CLONE_NEWCGROUP) succeeded in a child process",
        ),
        Ok(Unshare::Refused(err)) => Check::new(
            NAME,
            Status::degraded(format!(
                "the kernel refused unshare(CLONE_NEWCGROUP): {err}; the bottle will see the host's cgroup paths \
                 (cgroup namespaces need Linux 4.6 and CONFIG_CGROUPS)"
            )),
        ),
        Err(err) => Check::new(
            NAME,
            Status::degraded(format!("could not fork the unshare probe: {err}")),
        ),
    }
}

fn seccomp(host: &dyn Host) -> Check {
    const NAME: &str = "seccomp";
    match host.seccomp() {
        Ok(SeccompSupport::Filter { current_mode }) => Check::ok(
            NAME,
            format!("SECCOMP_MODE_FILTER is available (this process runs in mode {current_mode})"),
        ),
        Ok(SeccompSupport::StrictOnly) => Check::new(
            NAME,
            Status::missing("the kernel has seccomp strict mode but no BPF filters", SECCOMP_REMEDY),
        ),
        Ok(SeccompSupport::Absent) => Check::new(
            NAME,
            Status::missing("the kernel has no seccomp (PR_GET_SECCOMP: EINVAL)", SECCOMP_REMEDY),
        ),
        Err(err) => Check::new(
            NAME,
            Status::missing(format!("could not probe seccomp: {err}"), SECCOMP_REMEDY),
        ),
    }
}

fn landlock(host: &dyn Host) -> Check {
    const NAME: &str = "landlock";
    const ENABLE: &str = "Landlock is defence in depth only; to enable it add `landlock` to the `lsm=` boot \
                          parameter (e.g. `lsm=landlock,lockdown,yama,apparmor,bpf`)";
    match host.landlock_abi() {
        Ok(abi) => Check::ok(NAME, format!("ABI {abi}")),
        Err(err) if err.raw_os_error() == Some(libc::ENOSYS) => Check::new(
            NAME,
            Status::degraded(format!(
                "this kernel is built without Landlock (CONFIG_SECURITY_LANDLOCK); {ENABLE} on a kernel that has it"
            )),
        ),
        Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => Check::new(
            NAME,
            Status::degraded(format!("Landlock is built in but not enabled at boot; {ENABLE}")),
        ),
        Err(err) => Check::new(
            NAME,
            Status::degraded(format!("could not probe Landlock: {err}; {ENABLE}")),
        ),
    }
}

fn no_new_privs(host: &dyn Host) -> Check {
    const NAME: &str = "no_new_privs";
    let release = match host.sysctl("kernel.osrelease") {
        Ok(release) => release,
        Err(err) => {
            return Check::new(
                NAME,
                Status::degraded(format!("could not read the kernel release: {err}")),
            );
        }
    };
    match kernel_version(&release) {
        Some(version) if version < NO_NEW_PRIVS_SINCE => Check::new(
            NAME,
            Status::missing(
                format!("kernel {release} predates PR_SET_NO_NEW_PRIVS (Linux 3.5)"),
                KERNEL_UPGRADE_REMEDY,
            ),
        ),
        Some(_) => Check::ok(NAME, format!("kernel {release}")),
        None => Check::new(
            NAME,
            Status::degraded(format!("unrecognised kernel release {release:?}")),
        ),
    }
}

/// `major.minor` of a release such as `6.18.44-fc-v657`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::super::Severity;
    use super::super::fake::FakeHost;
    use super::*;

    fn check<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    fn remedy(check: &Check) -> &str {
        match &check.status {
            Status::Missing { remedy, .. } => remedy,
            other => panic!("{} is {other:?}, not missing", check.name),
        }
    }

    #[test]
    fn healthy_host_is_ok_and_reports_abi_and_kernel() {
        let checks = checks(&FakeHost::healthy());
        assert!(checks.iter().all(|c| c.status == Status::Ok), "{checks:#?}");
        assert_eq!(check(&checks, "landlock").detail.as_deref(), Some("ABI 7"));
        assert_eq!(check(&checks, "no_new_privs").detail.as_deref(), Some("kernel 6.18.44"));
    }

    #[test]
    fn a_kernel_without_mount_setattr_is_missing_with_the_release_that_added_it() {
        let mut host = FakeHost::healthy();
        host.kernel_calls.insert(KernelCall::MountSetattr, libc::ENOSYS);
        let found = checks(&host);
        let calls = check(&found, "system calls");
        assert_eq!(remedy(calls), "upgrade to Linux 5.12 or newer");
        assert!(matches!(&calls.status, Status::Missing { reason, .. } if reason.contains("mount_setattr(2)")));
        // A forbidding profile is named as such, not blamed on the kernel's age.
        let mut host = FakeHost::healthy();
        host.kernel_calls.insert(KernelCall::CloseRange, libc::EPERM);
        assert_eq!(remedy(check(&checks(&host), "system calls")), SYSCALL_FORBIDDEN_REMEDY);
    }

    #[test]
    fn this_kernel_has_every_call_a_launch_needs() {
        // The real probes, on this host (Linux 6.x in CI): both calls exist, and probing them has no effect.
        for call in KernelCall::ALL {
            assert!(crate::preflight::RealHost.kernel_call(call).is_ok(), "{}", call.name());
        }
    }

    #[test]
    fn max_user_namespaces_zero_names_the_sysctl_even_for_root() {
        let mut host = FakeHost::healthy();
        host.unshare.insert(NamespaceProbe::User, libc::ENOSPC);
        host.unshare.insert(NamespaceProbe::Isolation, libc::ENOSPC);
        host.sysctls.insert("user.max_user_namespaces".into(), "0".into());
        let checks = checks(&host);
        let expected = "allow user namespaces: `sudo sysctl -w user.max_user_namespaces=15000` (persist it in \
                        /etc/sysctl.d/)";
        assert_eq!(remedy(check(&checks, "user namespaces")), expected);
        assert_eq!(remedy(check(&checks, "mount/pid/net/ipc/uts namespaces")), expected);
        assert_eq!(
            check(&checks, "user namespaces").detail.as_deref(),
            Some("user.max_user_namespaces=0")
        );
    }

    #[test]
    fn unprivileged_knobs_are_named_for_a_normal_user() {
        let mut host = FakeHost::healthy();
        host.euid = 1000;
        host.unshare.insert(NamespaceProbe::User, libc::EPERM);
        host.sysctls
            .insert("kernel.unprivileged_userns_clone".into(), "0".into());
        host.sysctls
            .insert("kernel.apparmor_restrict_unprivileged_userns".into(), "1".into());
        let checks = checks(&host);
        assert_eq!(
            remedy(check(&checks, "user namespaces")),
            "allow user namespaces: `sudo sysctl -w kernel.unprivileged_userns_clone=1` and `sudo sysctl -w \
             kernel.apparmor_restrict_unprivileged_userns=0` (persist it in /etc/sysctl.d/)"
        );
    }

    #[test]
    fn without_a_forbidding_sysctl_the_kernel_or_a_seccomp_profile_is_blamed() {
        let mut host = FakeHost::healthy();
        host.unshare.insert(NamespaceProbe::User, libc::EPERM);
        // Root is exempt from the unprivileged-only knob.
        host.sysctls
            .insert("kernel.unprivileged_userns_clone".into(), "0".into());
        let checks = checks(&host);
        let user = check(&checks, "user namespaces");
        assert_eq!(remedy(user), USERNS_KERNEL_REMEDY);
        assert!(
            user.status
                == Status::missing(
                    "the kernel refused unshare(CLONE_NEWUSER): Operation not permitted (os error 1)",
                    USERNS_KERNEL_REMEDY
                )
        );
    }

    #[test]
    fn other_namespaces_refused_while_userns_works_blames_the_kernel_config() {
        let mut host = FakeHost::healthy();
        host.unshare.insert(NamespaceProbe::Isolation, libc::EINVAL);
        let checks = checks(&host);
        assert_eq!(check(&checks, "user namespaces").status, Status::Ok);
        assert_eq!(
            remedy(check(&checks, "mount/pid/net/ipc/uts namespaces")),
            ISOLATION_KERNEL_REMEDY
        );
    }

    #[test]
    fn missing_cgroup_namespace_only_degrades() {
        let mut host = FakeHost::healthy();
        host.unshare.insert(NamespaceProbe::Cgroup, libc::EINVAL);
        let checks = checks(&host);
        assert_eq!(check(&checks, "cgroup namespace").status.severity(), Severity::Degraded);
    }

    #[test]
    fn seccomp_without_filters_is_missing_with_the_kernel_option() {
        for support in [
            Ok(SeccompSupport::StrictOnly),
            Ok(SeccompSupport::Absent),
            Err(libc::EPERM),
        ] {
            let mut host = FakeHost::healthy();
            host.seccomp = support;
            assert_eq!(
                remedy(check(&checks(&host), "seccomp")),
                "rebuild the kernel with CONFIG_SECCOMP_FILTER"
            );
        }
    }

    #[test]
    fn absent_landlock_degrades_with_the_boot_parameter() {
        for code in [libc::ENOSYS, libc::EOPNOTSUPP] {
            let mut host = FakeHost::healthy();
            host.landlock = Err(code);
            let checks = checks(&host);
            let Status::Degraded { reason } = &check(&checks, "landlock").status else {
                panic!("{checks:#?}")
            };
            assert!(
                reason.contains("defence in depth only") && reason.contains("`lsm=landlock,"),
                "{reason}"
            );
        }
    }

    #[test]
    fn a_kernel_older_than_3_5_lacks_no_new_privs() {
        let mut host = FakeHost::healthy();
        host.sysctls.insert("kernel.osrelease".into(), "3.2.0-4-amd64".into());
        assert_eq!(remedy(check(&checks(&host), "no_new_privs")), KERNEL_UPGRADE_REMEDY);
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
    }

    #[test]
    fn a_failed_fork_is_missing_with_the_process_limit_remedy() {
        let mut host = FakeHost::healthy();
        host.fork_error = Some(libc::EAGAIN);
        let checks = checks(&host);
        assert_eq!(remedy(check(&checks, "user namespaces")), FORK_REMEDY);
        assert_eq!(check(&checks, "cgroup namespace").status.severity(), Severity::Degraded);
    }

    #[test]
    fn not_linux_is_missing() {
        assert_eq!(remedy(&not_linux()), NOT_LINUX_REMEDY);
        assert_eq!(
            not_linux().status,
            Status::missing("the namespace backend needs Linux", NOT_LINUX_REMEDY)
        );
    }

    #[test]
    fn without_cgroups_limits_are_degraded_and_the_backend_stays_usable() {
        let mut host = FakeHost::healthy();
        assert_eq!(
            check(&checks(&host), "resource limits (cgroups)").status.severity(),
            Severity::Ok
        );
        host.cgroups = None;
        let checks = checks(&host);
        let limits = check(&checks, "resource limits (cgroups)");
        assert_eq!(limits.status.severity(), Severity::Degraded);
        assert!(format!("{:?}", limits.status).contains("[bottle.resources] is refused"));
    }

    #[test]
    fn a_root_launcher_needs_free_bottle_ids_and_idmapped_mounts() {
        let host = FakeHost::healthy();
        assert_eq!(check(&checks(&host), "bottle ids").status.severity(), Severity::Ok);
        assert!(host.called("idmapped_mount ."));
        let mut taken = FakeHost::healthy();
        taken.ids_taken = Some("host id 2130706434 belongs to odd in /etc/passwd".into());
        let c = check(&checks(&taken), "bottle ids").clone();
        assert!(
            matches!(&c.status, Status::Missing { reason, .. } if reason.contains("odd")),
            "{c:?}"
        );
        let mut no_idmap = FakeHost::healthy();
        no_idmap.idmap = Some(libc::EINVAL);
        let c = check(&checks(&no_idmap), "bottle ids").clone();
        assert!(
            matches!(&c.status, Status::Missing { remedy, .. } if remedy.contains("your own user")),
            "{c:?}"
        );
        let mut user = FakeHost::healthy();
        user.euid = 1000;
        assert_eq!(check(&checks(&user), "bottle ids").status.severity(), Severity::Ok);
        assert!(
            !user.called("idmapped_mount"),
            "an unprivileged launcher needs no idmap"
        );
    }
}
