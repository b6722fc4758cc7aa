//! Preflight: what each backend needs from the host, as a report of `Ok | Degraded | Missing` checks that `doctor`
//! prints and `run` refuses on. Owns the verdicts and remedies; trusts only what the `Host` seam observes.

pub(crate) mod container;
mod host;
mod loopback;
mod namespace;
mod smolmachines;
mod state_dir;

#[cfg(test)]
pub(crate) mod fake;

use bottle_policy::Backend;
use serde::Serialize;

pub use container::DAEMON_REMEDY;
pub use host::{
    CommandOutput, FileKind, FileMeta, Host, KernelCall, KvmProbe, NamespaceProbe, Platform, RealHost, SeccompSupport,
    Unshare,
};
pub use loopback::{AliasError, AliasOutcome, ensure_alias};
pub use state_dir::state_dir_check;

/// The verdict of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, with less protection or less certainty than intended.
    Degraded {
        reason: String,
    },
    /// The backend cannot work until `remedy` is applied.
    Missing {
        reason: String,
        remedy: String,
    },
}

/// How bad a status is, for ordering (`Ok < Degraded < Missing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Degraded,
    Missing,
}

impl Status {
    pub fn degraded(reason: impl Into<String>) -> Self {
        Self::Degraded { reason: reason.into() }
    }

    pub fn missing(reason: impl Into<String>, remedy: impl Into<String>) -> Self {
        Self::Missing {
            reason: reason.into(),
            remedy: remedy.into(),
        }
    }

    pub fn severity(&self) -> Severity {
        match self {
            Self::Ok => Severity::Ok,
            Self::Degraded { .. } => Severity::Degraded,
            Self::Missing { .. } => Severity::Missing,
        }
    }
}

/// One named observation about the host, e.g. "user namespaces".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    #[serde(flatten)]
    pub status: Status,
    /// What was observed, whatever the verdict (a version, a path, an errno).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Check {
    pub fn new(name: &'static str, status: Status) -> Self {
        Self {
            name,
            status,
            detail: None,
        }
    }

    pub fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self::new(name, Status::Ok).with_detail(detail)
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// Every check one backend needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendReport {
    pub backend: Backend,
    pub checks: Vec<Check>,
}

impl BackendReport {
    /// True when no check is `Missing`: `run` may use this backend.
    pub fn usable(&self) -> bool {
        self.worst() < Severity::Missing
    }

    /// The worst status among the checks (`Ok` for an empty report).
    pub fn worst(&self) -> Severity {
        self.checks
            .iter()
            .map(|check| check.status.severity())
            .max()
            .unwrap_or(Severity::Ok)
    }

    /// The check called `name`, if this backend has one.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|check| check.name == name)
    }

    /// The checks that make this backend unusable.
    pub fn missing(&self) -> impl Iterator<Item = &Check> {
        self.checks
            .iter()
            .filter(|check| check.status.severity() == Severity::Missing)
    }
}

/// Runs every check `backend` needs against `host`.
pub fn report(backend: Backend, host: &dyn Host) -> BackendReport {
    let checks = match backend {
        Backend::Namespace => namespace::checks(host),
        Backend::Container => container::checks(host),
        Backend::Smolmachines => smolmachines::checks(host),
    };
    for check in &checks {
        let (backend, check_name) = (backend.as_str(), check.name);
        tracing::debug!(backend, check = check_name, status = ?check.status, detail = ?check.detail, "preflight");
    }
    BackendReport { backend, checks }
}

/// `report` for every backend, in `Backend::ALL` order.
pub fn report_all(host: &dyn Host) -> Vec<BackendReport> {
    Backend::ALL.iter().map(|&backend| report(backend, host)).collect()
}

#[cfg(test)]
mod tests {
    use super::fake::FakeHost;
    use super::*;

    fn report_of(statuses: Vec<Status>) -> BackendReport {
        BackendReport {
            backend: Backend::Namespace,
            checks: statuses.into_iter().map(|status| Check::new("x", status)).collect(),
        }
    }

    #[test]
    fn worst_and_usable_follow_the_most_severe_check() {
        assert_eq!(report_of(vec![]).worst(), Severity::Ok);
        let degraded = report_of(vec![Status::Ok, Status::degraded("d")]);
        assert_eq!(degraded.worst(), Severity::Degraded);
        assert!(degraded.usable());
        let missing = report_of(vec![Status::missing("m", "r"), Status::degraded("d")]);
        assert_eq!(missing.worst(), Severity::Missing);
        assert!(!missing.usable());
        assert_eq!(missing.missing().count(), 1);
    }

    #[test]
    fn json_flattens_the_status_tag_into_the_check() {
        let report = BackendReport {
            backend: Backend::Smolmachines,
            checks: vec![
                Check::ok("tar", "/usr/bin/tar"),
                Check::new("/dev/kvm", Status::missing("gone", "load it")),
                Check::new("landlock", Status::degraded("off")),
            ],
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "backend": "smolmachines",
                "checks": [
                    {"name": "tar", "status": "ok", "detail": "/usr/bin/tar"},
                    {"name": "/dev/kvm", "status": "missing", "reason": "gone", "remedy": "load it"},
                    {"name": "landlock", "status": "degraded", "reason": "off"},
                ]
            })
        );
    }

    #[test]
    fn a_healthy_host_passes_every_backend() {
        let host = FakeHost::healthy();
        let reports = report_all(&host);
        assert_eq!(reports.iter().map(|r| r.backend).collect::<Vec<_>>(), Backend::ALL);
        for report in &reports {
            assert_eq!(report.worst(), Severity::Ok, "{report:#?}");
        }
    }

    #[test]
    fn each_backend_observes_only_what_it_needs() {
        let host = FakeHost::healthy();
        report(Backend::Container, &host);
        assert!(
            !host.called("try_unshare") && !host.called("open_kvm"),
            "{:?}",
            host.calls()
        );
        let host = FakeHost::healthy();
        report(Backend::Namespace, &host);
        assert!(
            !host.called("run") && !host.called("unix_exchange"),
            "{:?}",
            host.calls()
        );
    }
}
