//! The backends the families run on, and skips: each family runs once per backend that can run here; every other
//! backend says why it skips, and `BOTTLE_TEST_REQUIRE` naming that backend's requirement makes the skip a failure.
//! A family's shared scenario is set up at most once per backend.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use crate::scenario::{BB, CURL};

/// A backend the families can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Namespace,
    Container,
    /// The container backend under gVisor (`--runtime runsc`).
    Gvisor,
    Smolmachines,
}

/// Every backend, in the order the families try them.
pub const BACKENDS: [Backend; 4] = [
    Backend::Namespace,
    Backend::Container,
    Backend::Gvisor,
    Backend::Smolmachines,
];

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Namespace => "namespace",
            Self::Container => "container",
            Self::Gvisor => "container under gVisor",
            Self::Smolmachines => "smolmachines",
        }
    }

    /// The `BOTTLE_TEST_REQUIRE` word that turns this backend's skip into a failure.
    ///
    /// The families need a bottle whose attempts land in the suite's lab. On smolmachines that means a guest that
    /// boots, which is its own capability: CI sets `BOTTLE_TEST_REQUIRE=namespace,smolmachines` on hosts where the
    /// smolmachines launch tests run but guests cannot boot (nested KVM hangs), so `smolmachines` alone must not
    /// make these families fail. `smolmachines-boot` does.
    pub fn requirement(self) -> &'static str {
        match self {
            Self::Namespace => "namespace",
            // Wherever the container backend's own tests must run, the families must run on it too.
            Self::Container => "container",
            Self::Gvisor => "runsc",
            Self::Smolmachines => "smolmachines-boot",
        }
    }

    /// Why the families cannot run on this backend here, or `None` when they can.
    fn skip_reason(self) -> Option<String> {
        match self {
            Self::Namespace => namespace_skip_reason(),
            Self::Container => bottle_test_support::container::unavailable(),
            Self::Gvisor => bottle_test_support::container::gvisor_unavailable(),
            Self::Smolmachines => Some(
                "the families have no smolmachines runner yet: a guest's attempts would have to land in the lab \
                 (its egress path is the host's, not a netns the suite owns), and a guest must boot (nested KVM \
                 hangs on some CI hosts); BOTTLE_TEST_REQUIRE=smolmachines-boot makes this a failure"
                    .into(),
            ),
        }
    }
}

std::thread_local! {
    /// The backend whose scenario this thread is setting up (a family's setup runs on the thread that asked for it).
    static CURRENT: std::cell::Cell<Backend> = const { std::cell::Cell::new(Backend::Namespace) };
}

/// The backend the scenario being set up runs on: `Launch` adds its flags, `launchers` its launchers.
pub fn current() -> Backend {
    CURRENT.get()
}

/// Whether `BOTTLE_TEST_REQUIRE` names `word` (the one rule, in the test-support crate).
pub fn required(word: &str) -> bool {
    bottle_test_support::require::required(word)
}

fn namespace_skip_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            let out = Command::new(BB)
                .args(["doctor", "--backend", "namespace"])
                .output()
                .unwrap();
            if !out.status.success() {
                return Some(format!(
                    "the namespace backend is unavailable here:\n{}",
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
            if !rustix::process::geteuid().is_root() {
                return Some("the suite's private lab network (a netns the decoys join) needs root".into());
            }
            for tool in ["/usr/bin/unshare", "/usr/bin/nsenter", "/usr/bin/setpriv"] {
                if !Path::new(tool).is_file() {
                    return Some(format!("{tool} is missing (apt-get install util-linux)"));
                }
            }
            if !Path::new("/usr/sbin/ip").is_file() && !Path::new("/sbin/ip").is_file() {
                return Some("`ip` is missing (apt-get install iproute2)".into());
            }
            if !Path::new(CURL).is_file() {
                return Some(format!(
                    "{CURL} is missing (apt-get install curl); the proxy cases drive it"
                ));
            }
            None
        })
        .clone()
}

/// True when a family must skip `backend`: prints why. When `BOTTLE_TEST_REQUIRE` names the backend's requirement,
/// a skip is a failure.
pub fn skip(backend: Backend) -> bool {
    let Some(why) = backend.skip_reason() else { return false };
    let word = backend.requirement();
    assert!(!required(word), "BOTTLE_TEST_REQUIRE={word} but: {why}");
    eprintln!("skipped on {}: {why}", backend.name());
    true
}

/// The backends a family runs on here. Every other backend says why it skips (a failure when required).
pub fn backends() -> Vec<Backend> {
    BACKENDS.into_iter().filter(|b| !skip(*b)).collect()
}

/// A family's shared scenario per backend, each set up at most once.
pub struct Cells<T>([OnceLock<Result<T, String>>; BACKENDS.len()]);

impl<T> Cells<T> {
    pub const fn new() -> Self {
        Self([const { OnceLock::new() }; BACKENDS.len()])
    }
}

/// A family's shared scenarios, one per backend that runs here (each backend that cannot says why, via `skip`).
/// Each is set up once, then `tools_present` checks that its runs had what they needed. A setup that panics fails
/// every test of the family with the same message (it is not retried).
///
/// A setup runs with `current()` naming its backend: `Launch` and `launchers` follow it, so one setup serves the
/// namespace and container backends (a container's attempts land in the lab too: its launcher joins the lab's
/// network namespace and the engine's `none` network leaves only the bottle's own path out).
pub fn family<T: Send + Sync>(cells: &'static Cells<T>, setup: fn() -> T, tools_present: fn(&T)) -> Vec<&'static T> {
    let mut runs = Vec::new();
    for (i, backend) in BACKENDS.into_iter().enumerate() {
        if skip(backend) {
            continue;
        }
        CURRENT.set(backend);
        let f = shared(&cells.0[i], setup);
        CURRENT.set(Backend::Namespace);
        tools_present(f);
        runs.push(f);
    }
    runs
}

fn shared<T: Send + Sync>(cell: &'static OnceLock<Result<T, String>>, setup: fn() -> T) -> &'static T {
    let result = cell.get_or_init(|| {
        std::panic::catch_unwind(setup).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a non-string panic".into())
        })
    });
    match result {
        Ok(v) => v,
        Err(e) => panic!("the scenario's setup failed, so none of its cases ran:\n{e}"),
    }
}
