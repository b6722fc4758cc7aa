//! Checks for the smolmachines backend: a verified smolvm engine; on Linux a usable /dev/kvm and the `kvm` group
//! smolvm needs as root, on macOS Hypervisor.framework and the lo0 alias pool (`loopback.rs`); `tar`; and the state
//! dir (`state_dir.rs`). The platform comes from the `Host` seam, so both branches run in unit tests anywhere.

use std::path::Path;
use std::time::Duration;

use super::host::{FileKind, Host, Platform};
use super::{Check, Status, loopback};
use crate::engine::{self, EngineError, VERIFIED_SMOLVM_VERSIONS};

pub(super) const KVM_NOT_ENABLED_REMEDY: &str =
    "load kvm-intel or kvm-amd (`sudo modprobe kvm_intel` or `kvm_amd`) and enable virtualization in firmware";
pub(super) const KVM_PERMISSION_REMEDY: &str =
    "add your user to the kvm group (`sudo usermod -aG kvm $USER`), then log out and back in";
pub(super) const KVM_GROUP_REMEDY: &str = "create the group and give it /dev/kvm: `sudo groupadd -r kvm && sudo chgrp \
                                           kvm /dev/kvm && sudo chmod 660 /dev/kvm`";
pub(super) const KVM_OWNER_REMEDY: &str =
    "give group kvm /dev/kvm: `sudo chgrp kvm /dev/kvm && sudo chmod 660 /dev/kvm`";
pub(super) const KVM_API_REMEDY: &str = "use a kernel whose KVM reports API version 12 (every kernel since 2.6.22)";
pub(super) const NESTED_REASON: &str = "nested virtualization: KVM answers but guest boot could not be verified \
                                        (nested KVM often hangs guests)";
const HVF_REMEDY: &str = "use a Mac whose CPU supports Hypervisor.framework (`sysctl kern.hv_support` must print 1)";
pub(super) const TAR_REMEDY: &str = "install it: `sudo apt-get install tar`";
pub(super) const ENV_ENGINE_REMEDY: &str = "point BOT_BOTTLE_SMOLVM at a smolvm binary, or unset it";
const KVM_DEVICE: &str = "/dev/kvm";
/// `sysctl -n` reads one kernel value; it answers in milliseconds.
const SYSCTL_TIMEOUT: Duration = Duration::from_secs(5);
/// The only KVM API version there has ever been (linux/kvm.h `KVM_API_VERSION`).
const KVM_API_VERSION: i32 = 12;

pub(super) fn checks(host: &dyn Host) -> Vec<Check> {
    let mut checks = vec![engine_check(host)];
    match host.platform() {
        Platform::MacOs => checks.extend([hypervisor_framework(host), loopback::lo0_alias_pool(host)]),
        Platform::Linux => checks.extend([kvm_device(host), kvm_group(host)]),
    }
    checks.push(tar(host));
    checks.push(super::state_dir::smolvm_state_dir(host));
    checks
}

fn newest_verified() -> &'static str {
    VERIFIED_SMOLVM_VERSIONS.last().copied().unwrap_or_default()
}

/// "bot-bottle has verified smolvm 1.32.2 only; install it with `pip install smolmachines==1.32.2` or set …".
pub(super) fn unverified_remedy() -> String {
    format!(
        "bot-bottle has verified smolvm {} only; install it with `pip install smolmachines=={}` or set \
         BOT_BOTTLE_SMOLVM",
        VERIFIED_SMOLVM_VERSIONS.join(", "),
        newest_verified()
    )
}

pub(super) fn install_remedy() -> String {
    // Pinned, so that following the remedy cannot lead straight to the unverified-version verdict.
    format!(
        "`pip install smolmachines=={}`, or set BOT_BOTTLE_SMOLVM to a smolvm binary",
        newest_verified()
    )
}

fn engine_check(host: &dyn Host) -> Check {
    const NAME: &str = "smolvm engine";
    let err = match engine::discover(host) {
        Ok(engine) if engine.is_verified() => {
            let detail = format!(
                "smolvm {} at {} (from {})",
                engine.version,
                engine.path.display(),
                engine.source.as_str()
            );
            return Check::ok(NAME, detail);
        }
        Ok(engine) => EngineError::Unverified {
            path: engine.path,
            version: engine.version,
        },
        Err(err) => err,
    };
    let remedy = match &err {
        EngineError::NotFound | EngineError::PypiWithoutEngine { .. } => install_remedy(),
        EngineError::EnvPath { .. } => ENV_ENGINE_REMEDY.to_owned(),
        EngineError::Run { .. } | EngineError::Version { .. } | EngineError::Unverified { .. } => unverified_remedy(),
    };
    let check = Check::new(NAME, Status::missing(error_chain(&err), remedy));
    match err {
        EngineError::Version { output, .. } => check.with_detail(output),
        _ => check,
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

fn hypervisor_framework(host: &dyn Host) -> Check {
    const NAME: &str = "Hypervisor.framework";
    let sysctl = Path::new("/usr/sbin/sysctl");
    match host.run(sysctl, &["-n", "kern.hv_support"], SYSCTL_TIMEOUT) {
        Ok(out) if out.success() && out.stdout.trim() == "1" => Check::ok(NAME, "kern.hv_support = 1"),
        Ok(out) => Check::new(
            NAME,
            Status::missing(format!("kern.hv_support = {:?}", out.stdout.trim()), HVF_REMEDY),
        ),
        Err(err) => Check::new(
            NAME,
            Status::missing(format!("could not run sysctl kern.hv_support: {err}"), HVF_REMEDY),
        ),
    }
}

/// Mirrors smolvm's own order (research/smolvm.md §2.3, §6): exists → opens read-write → API 12 → creates a VM.
fn kvm_device(host: &dyn Host) -> Check {
    const NAME: &str = "/dev/kvm";
    let missing = |reason: String, remedy: &str| Check::new(NAME, Status::missing(reason, remedy));
    match host.metadata(Path::new(KVM_DEVICE)) {
        Ok(meta) if meta.kind == FileKind::CharDevice => {}
        Ok(_) => {
            return missing(
                "KVM is not enabled: /dev/kvm is not a character device".into(),
                KVM_NOT_ENABLED_REMEDY,
            );
        }
        Err(err) => return missing(format!("KVM is not enabled: /dev/kvm: {err}"), KVM_NOT_ENABLED_REMEDY),
    }
    let probe = match host.open_kvm(Path::new(KVM_DEVICE)) {
        Ok(probe) => probe,
        Err(err) if matches!(err.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {
            return missing(format!("no permission on /dev/kvm: {err}"), KVM_PERMISSION_REMEDY);
        }
        Err(err) => {
            return missing(
                format!("KVM is not enabled: opening /dev/kvm read-write failed: {err}"),
                KVM_NOT_ENABLED_REMEDY,
            );
        }
    };
    match probe.api_version {
        Ok(KVM_API_VERSION) => {}
        Ok(other) => {
            return missing(
                format!("KVM API version is {other}, smolvm needs {KVM_API_VERSION}"),
                KVM_API_REMEDY,
            );
        }
        Err(err) => {
            return missing(
                format!("KVM_GET_API_VERSION on /dev/kvm failed: {err}"),
                KVM_NOT_ENABLED_REMEDY,
            );
        }
    }
    if let Err(err) = probe.create_vm {
        return missing(format!("KVM_CREATE_VM failed: {err}"), KVM_NOT_ENABLED_REMEDY);
    }
    let detail = format!("API version {KVM_API_VERSION}; a test VM was created and closed");
    match host.cpu_hypervisor_flag() {
        Ok(false) => Check::ok(NAME, detail),
        Ok(true) => Check::new(NAME, Status::degraded(NESTED_REASON)).with_detail(detail),
        Err(err) => {
            Check::new(NAME, Status::degraded(format!("could not read /proc/cpuinfo: {err}"))).with_detail(detail)
        }
    }
}

/// As root, smolvm drops each VM to its own uid keeping only the `kvm` group (research/smolvm.md §5), so /dev/kvm
/// must be reachable through that group (or by everyone).
fn kvm_group(host: &dyn Host) -> Check {
    const NAME: &str = "kvm group";
    if host.euid() != 0 {
        return Check::ok(
            NAME,
            "not needed: not running as root, so smolvm keeps your uid and groups",
        );
    }
    let gid = match host.group_gid("kvm") {
        Ok(Some(gid)) => gid,
        Ok(None) => {
            let reason = "there is no `kvm` group; as root, smolvm drops each VM to its own uid keeping only the \
                          `kvm` group";
            return Check::new(NAME, Status::missing(reason, KVM_GROUP_REMEDY));
        }
        Err(err) => {
            return Check::new(
                NAME,
                Status::missing(format!("could not read /etc/group: {err}"), KVM_GROUP_REMEDY),
            );
        }
    };
    let meta = match host.metadata(Path::new(KVM_DEVICE)) {
        Ok(meta) => meta,
        Err(err) => {
            return Check::new(
                NAME,
                Status::missing(format!("/dev/kvm: {err}"), KVM_NOT_ENABLED_REMEDY),
            );
        }
    };
    let observed = format!(
        "/dev/kvm is mode {:04o} uid {} gid {}; group kvm is gid {gid}",
        meta.mode, meta.uid, meta.gid
    );
    let group_rw = meta.gid == gid && meta.mode & 0o060 == 0o060;
    let other_rw = meta.mode & 0o006 == 0o006;
    if group_rw || other_rw {
        return Check::ok(NAME, observed);
    }
    let reason = "/dev/kvm is not read-write for group `kvm`, so the per-VM uids smolvm uses as root cannot open it";
    Check::new(NAME, Status::missing(reason, KVM_OWNER_REMEDY)).with_detail(observed)
}

fn tar(host: &dyn Host) -> Check {
    const NAME: &str = "tar";
    match host.which("tar") {
        Some(path) => Check::ok(NAME, path.display().to_string()),
        None => Check::new(
            NAME,
            Status::missing(
                "`tar` is not on PATH; smolvm extracts its agent rootfs with `tar -xpf -`",
                TAR_REMEDY,
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{FakeHost, LO0_DEFAULT, meta, output};
    use super::*;

    fn check(host: &FakeHost, name: &str) -> Check {
        checks(host).into_iter().find(|c| c.name == name).unwrap()
    }

    fn remedy(check: &Check) -> &str {
        match &check.status {
            Status::Missing { remedy, .. } => remedy,
            other => panic!("{} is {other:?}", check.name),
        }
    }

    #[test]
    fn healthy_host_is_ok() {
        let checks = checks(&FakeHost::healthy());
        assert!(checks.iter().all(|c| c.status == Status::Ok), "{checks:#?}");
        let names: Vec<_> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            ["smolvm engine", "/dev/kvm", "kvm group", "tar", "state directory"]
        );
    }

    #[test]
    fn engine_remedies() {
        assert_eq!(
            unverified_remedy(),
            "bot-bottle has verified smolvm 1.32.2 only; install it with `pip install smolmachines==1.32.2` or set \
             BOT_BOTTLE_SMOLVM"
        );
        let mut host = FakeHost::healthy();
        host.command("/usr/bin/smolvm --version", Ok(output(0, "smolvm 1.33.0\n", "")));
        assert_eq!(remedy(&check(&host, "smolvm engine")), unverified_remedy());
        host.command("/usr/bin/smolvm --version", Ok(output(0, "garbage\n", "")));
        let garbage = check(&host, "smolvm engine");
        assert_eq!(
            (remedy(&garbage), garbage.detail.as_deref()),
            (unverified_remedy().as_str(), Some("garbage"))
        );
        host.commands.remove("/usr/bin/smolvm --version");
        let unrunnable = check(&host, "smolvm engine");
        assert_eq!(remedy(&unrunnable), unverified_remedy());
        assert!(matches!(&unrunnable.status, Status::Missing { reason, .. } if reason.contains("No such file")));

        host.path.remove("smolvm");
        assert_eq!(
            remedy(&check(&host, "smolvm engine")),
            "`pip install smolmachines==1.32.2`, or set BOT_BOTTLE_SMOLVM to a smolvm binary"
        );
        host.set_env("BOT_BOTTLE_SMOLVM", "/nope");
        assert_eq!(remedy(&check(&host, "smolvm engine")), ENV_ENGINE_REMEDY);
    }

    #[test]
    fn absent_kvm_is_not_enabled() {
        let mut host = FakeHost::healthy();
        host.files.remove(Path::new("/dev/kvm"));
        let kvm = check(&host, "/dev/kvm");
        assert_eq!(
            remedy(&kvm),
            "load kvm-intel or kvm-amd (`sudo modprobe kvm_intel` or `kvm_amd`) and enable virtualization in firmware"
        );
        assert!(!host.called("open_kvm"));
        host.file("/dev/kvm", meta(FileKind::File, 0o666, 0, 0));
        assert_eq!(remedy(&check(&host, "/dev/kvm")), KVM_NOT_ENABLED_REMEDY);
    }

    #[test]
    fn unopenable_kvm_needs_the_group_or_the_module() {
        for code in [libc::EACCES, libc::EPERM] {
            let mut host = FakeHost::healthy();
            host.kvm.open = Err(code);
            assert_eq!(
                remedy(&check(&host, "/dev/kvm")),
                "add your user to the kvm group (`sudo usermod -aG kvm $USER`), then log out and back in"
            );
        }
        let mut host = FakeHost::healthy();
        host.kvm.open = Err(libc::ENXIO);
        assert_eq!(remedy(&check(&host, "/dev/kvm")), KVM_NOT_ENABLED_REMEDY);
    }

    #[test]
    fn kvm_must_speak_api_12_and_create_a_vm() {
        let mut host = FakeHost::healthy();
        host.kvm.api_version = Ok(11);
        assert_eq!(remedy(&check(&host, "/dev/kvm")), KVM_API_REMEDY);
        host.kvm.api_version = Err(libc::ENOTTY);
        assert_eq!(remedy(&check(&host, "/dev/kvm")), KVM_NOT_ENABLED_REMEDY);
        host.kvm.api_version = Ok(12);
        host.kvm.create_vm = Err(libc::EBUSY);
        assert_eq!(remedy(&check(&host, "/dev/kvm")), KVM_NOT_ENABLED_REMEDY);
    }

    #[test]
    fn a_guest_cpu_degrades_kvm_to_unverified_nested() {
        let mut host = FakeHost::healthy();
        host.hypervisor = true;
        assert_eq!(check(&host, "/dev/kvm").status, Status::degraded(NESTED_REASON));
    }

    #[test]
    fn root_needs_a_kvm_group_owning_dev_kvm() {
        let mut host = FakeHost::healthy();
        host.groups.clear();
        assert_eq!(
            remedy(&check(&host, "kvm group")),
            "create the group and give it /dev/kvm: `sudo groupadd -r kvm && sudo chgrp kvm /dev/kvm && sudo chmod \
             660 /dev/kvm`"
        );
        let mut host = FakeHost::healthy();
        host.file("/dev/kvm", meta(FileKind::CharDevice, 0o600, 0, 0));
        let group = check(&host, "kvm group");
        assert_eq!(
            remedy(&group),
            "give group kvm /dev/kvm: `sudo chgrp kvm /dev/kvm && sudo chmod 660 /dev/kvm`"
        );
        assert_eq!(
            group.detail.as_deref(),
            Some("/dev/kvm is mode 0600 uid 0 gid 0; group kvm is gid 108")
        );
        // World read-write also lets the per-VM uid in.
        host.file("/dev/kvm", meta(FileKind::CharDevice, 0o666, 0, 0));
        assert_eq!(check(&host, "kvm group").status, Status::Ok);
        // A normal user keeps their own groups; the open probe covers them.
        host.euid = 1000;
        host.groups.clear();
        assert_eq!(check(&host, "kvm group").status, Status::Ok);
    }

    #[test]
    fn linux_never_asks_for_hypervisor_framework_or_lo0() {
        let host = FakeHost::healthy();
        checks(&host);
        assert!(
            !host.called("run /usr/sbin/sysctl") && !host.called("run /sbin/ifconfig"),
            "{:?}",
            host.calls()
        );
    }

    #[test]
    fn healthy_mac_is_ok_without_kvm() {
        let host = FakeHost::healthy_mac();
        let checks = checks(&host);
        assert!(checks.iter().all(|c| c.status == Status::Ok), "{checks:#?}");
        let names: Vec<_> = checks.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "smolvm engine",
                "Hypervisor.framework",
                "lo0 alias pool",
                "tar",
                "state directory"
            ]
        );
        assert!(
            !host.called("open_kvm") && !host.called("metadata /dev/kvm") && !host.called("group_gid"),
            "{:?}",
            host.calls()
        );
        // Preflight only looks: it never adds the alias itself.
        assert!(!host.called("run /usr/bin/sudo"), "{:?}", host.calls());
    }

    #[test]
    fn mac_needs_hypervisor_framework() {
        let mut host = FakeHost::healthy_mac();
        assert_eq!(
            check(&host, "Hypervisor.framework"),
            Check::ok("Hypervisor.framework", "kern.hv_support = 1")
        );
        host.command("/usr/sbin/sysctl -n kern.hv_support", Ok(output(0, "0\n", "")));
        let absent = check(&host, "Hypervisor.framework");
        assert_eq!(
            remedy(&absent),
            "use a Mac whose CPU supports Hypervisor.framework (`sysctl kern.hv_support` must print 1)"
        );
        assert!(matches!(&absent.status, Status::Missing { reason, .. } if reason == "kern.hv_support = \"0\""));
        // An unknown sysctl name makes sysctl(8) fail; that is no evidence of support.
        host.command(
            "/usr/sbin/sysctl -n kern.hv_support",
            Ok(output(1, "", "sysctl: unknown oid 'kern.hv_support'\n")),
        );
        assert_eq!(remedy(&check(&host, "Hypervisor.framework")), HVF_REMEDY);
        host.commands.remove("/usr/sbin/sysctl -n kern.hv_support");
        let unrunnable = check(&host, "Hypervisor.framework");
        assert_eq!(remedy(&unrunnable), HVF_REMEDY);
        assert!(
            matches!(&unrunnable.status, Status::Missing { reason, .. } if reason.starts_with("could not run sysctl"))
        );
    }

    #[test]
    fn mac_without_the_pool_alias_is_degraded_but_usable() {
        let mut host = FakeHost::healthy_mac();
        host.command("/sbin/ifconfig lo0", Ok(output(0, LO0_DEFAULT, "")));
        let report = super::super::report(bottle_policy::Backend::Smolmachines, &host);
        assert_eq!(report.worst(), super::super::Severity::Degraded, "{report:#?}");
        assert!(report.usable());
        let pool = report.check("lo0 alias pool").unwrap();
        assert!(
            matches!(&pool.status, Status::Degraded { reason } if reason.contains("sudo ifconfig lo0 alias 127.0.0.2 up")),
            "{pool:?}"
        );
    }

    #[test]
    fn tar_is_required() {
        let mut host = FakeHost::healthy();
        host.path.remove("tar");
        assert_eq!(remedy(&check(&host, "tar")), "install it: `sudo apt-get install tar`");
    }
}
