//! The engine's runtime a container bottle runs under, judged from how the engine registered it (`GET /info`:
//! `Runtimes`, `DefaultRuntime`). Pure.
//!
//! An OCI runtime of the runc kind runs the container's processes on the host's kernel: every connect goes through
//! the bottle's socket warden (seccomp user notification). gVisor (`runsc`) runs them on its own kernel, which
//! refuses that listener (`EINVAL`); it keeps the Unix-socket promise itself instead: with `--host-uds` off (its
//! default) no host socket in a bind answers the bottle. Its network stack must be the host's (`--network=host`),
//! or the proxy's listener, put into the container's network namespace from the host, would not be seen; and it
//! must open host FIFOs (`--host-fifo=open`, as runc does), or the agent could not wait at the bottle's gate.

use std::collections::BTreeMap;

/// How the engine registered a runtime.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registered {
    pub path: String,
    pub args: Vec<String>,
}

/// What keeps the bottle's host sockets out of its reach, by the kind of runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confinement {
    /// The host's kernel: bot-bottle's socket warden judges every connect.
    Warden,
    /// gVisor's kernel: it refuses host sockets itself (`--host-uds` off), checked before the agent starts.
    Gvisor,
}

/// The runtime a bottle runs under: the name the engine is asked for (`None`: its default) and how it confines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub name: Option<String>,
    pub confinement: Confinement,
}

/// The daemon.json entry that registers gVisor as bottles need it.
pub const RUNSC_ENTRY: &str =
    r#"{"runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=host", "--host-fifo=open"]}}}"#;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuntimeError {
    #[error(
        "the container engine has no runtime `{name}` (it has: {have}); for gVisor install it (`apt-get install \
         runsc`) and register it in /etc/docker/daemon.json: {RUNSC_ENTRY}, then reload the daemon (`kill -HUP \
         $(pidof dockerd)`); or leave `runtime` out for the engine's default"
    )]
    Absent { name: String, have: String },
    #[error(
        "runtime `{name}` is gVisor with its own network stack, which does not see the bottle's proxy (its listener \
         is put into the container's network namespace from the host): register it with \"runtimeArgs\": \
         [\"--network=host\"] (the container still has no interface but `lo`): {RUNSC_ENTRY}"
    )]
    GvisorNetstack { name: String },
    #[error(
        "runtime `{name}` is gVisor without `--host-fifo=open`: the agent waits at the bottle's gate, a FIFO shown \
         from the host, until its confinement was verified; add it to its \"runtimeArgs\" (host FIFOs in a bottle's \
         binds then open as under runc): {RUNSC_ENTRY}"
    )]
    GvisorFifo { name: String },
    #[error(
        "runtime `{name}` is gVisor registered with `{arg}`, which lets a bottle connect to host Unix sockets in its \
         binds; bottles need it off (gVisor's default): remove `{arg}` from its \"runtimeArgs\""
    )]
    GvisorHostUds { name: String, arg: String },
    #[error(
        "runtime `{name}` is gVisor, which refuses every host socket in a bottle; `share_sockets` cannot be kept \
         there: remove it from the policy, or choose a runc runtime (leave `runtime` out)"
    )]
    GvisorShare { name: String },
}

/// The runtime of a bottle that asks for `asked` (else the engine's `default`), on an engine with `registered`.
pub fn choose(
    asked: Option<&str>,
    default: Option<&str>,
    registered: &BTreeMap<String, Registered>,
    shares_sockets: bool,
) -> Result<Chosen, RuntimeError> {
    let name = asked.or(default);
    let entry = match (asked, name.and_then(|n| registered.get(n))) {
        (_, Some(e)) => Some(e),
        (Some(n), None) => {
            let have: Vec<&str> = registered.keys().map(String::as_str).collect();
            return Err(RuntimeError::Absent {
                name: n.to_string(),
                have: if have.is_empty() {
                    "none listed".into()
                } else {
                    have.join(", ")
                },
            });
        }
        // The engine's default, not listed: an OCI runtime of the runc kind as far as anyone can tell; the warden's
        // filter fails closed in the container if it is not.
        (None, None) => None,
    };
    let confinement = match entry {
        Some(e) if is_gvisor(e) => {
            let name = name.unwrap_or_default().to_string();
            gvisor_fits(&name, e)?;
            if shares_sockets {
                return Err(RuntimeError::GvisorShare { name });
            }
            Confinement::Gvisor
        }
        _ => Confinement::Warden,
    };
    Ok(Chosen {
        name: asked.map(str::to_string),
        confinement,
    })
}

/// gVisor is the `runsc` binary (a wrapper script of another name is judged as runc; the warden's filter then fails
/// closed inside gVisor, and says so).
pub fn is_gvisor(e: &Registered) -> bool {
    std::path::Path::new(&e.path).file_name().is_some_and(|n| n == "runsc")
}

/// A gVisor registration a bottle can run under: the host's network stack, host sockets off.
fn gvisor_fits(name: &str, e: &Registered) -> Result<(), RuntimeError> {
    // runsc takes `--flag=value` and `--flag value`, with one dash or two.
    let mut network = None;
    let mut host_uds = None;
    let mut host_fifo = None;
    let mut args = e.args.iter().peekable();
    while let Some(arg) = args.next() {
        let flag = arg.trim_start_matches('-');
        let (key, inline) = match flag.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (flag, None),
        };
        let mut value = || inline.clone().or_else(|| args.next().cloned()).unwrap_or_default();
        match key {
            "network" => network = Some(value()),
            "host-uds" => host_uds = Some((arg.clone(), value())),
            "host-fifo" => host_fifo = Some(value()),
            _ => {}
        }
    }
    if let Some((arg, value)) = host_uds
        && value != "none"
    {
        let arg = if arg.contains('=') {
            arg
        } else {
            format!("{arg} {value}")
        };
        return Err(RuntimeError::GvisorHostUds {
            name: name.to_string(),
            arg,
        });
    }
    if network.as_deref() != Some("host") {
        return Err(RuntimeError::GvisorNetstack { name: name.to_string() });
    }
    if host_fifo.as_deref() != Some("open") {
        return Err(RuntimeError::GvisorFifo { name: name.to_string() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(entries: &[(&str, &str, &[&str])]) -> BTreeMap<String, Registered> {
        entries
            .iter()
            .map(|(n, p, a)| {
                (
                    n.to_string(),
                    Registered {
                        path: p.to_string(),
                        args: a.iter().map(|s| s.to_string()).collect(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn the_default_runtime_is_the_wardens_and_a_named_runc_too() {
        let e = engine(&[
            ("runc", "runc", &[]),
            ("runsc", "/usr/bin/runsc", &["--network=host", "--host-fifo=open"]),
        ]);
        let chosen = choose(None, Some("runc"), &e, true).unwrap();
        assert_eq!((chosen.name, chosen.confinement), (None, Confinement::Warden));
        let chosen = choose(Some("runc"), Some("runc"), &e, false).unwrap();
        assert_eq!(
            (chosen.name.as_deref(), chosen.confinement),
            (Some("runc"), Confinement::Warden)
        );
    }

    #[test]
    fn runsc_with_the_hosts_network_is_gvisor_and_so_is_a_gvisor_default() {
        let e = engine(&[
            ("runc", "runc", &[]),
            ("gv", "/usr/bin/runsc", &["--network", "host", "-host-fifo", "open"]),
        ]);
        let chosen = choose(Some("gv"), Some("runc"), &e, false).unwrap();
        assert_eq!(
            (chosen.name.as_deref(), chosen.confinement),
            (Some("gv"), Confinement::Gvisor)
        );
        let chosen = choose(None, Some("gv"), &e, false).unwrap();
        assert_eq!((chosen.name, chosen.confinement), (None, Confinement::Gvisor));
    }

    #[test]
    fn an_absent_runtime_is_refused_with_what_the_engine_has_and_how_to_register_gvisor() {
        let e = engine(&[("runc", "runc", &[])]);
        let err = choose(Some("runsc"), Some("runc"), &e, false).unwrap_err();
        assert_eq!(
            err,
            RuntimeError::Absent {
                name: "runsc".into(),
                have: "runc".into()
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("apt-get install runsc") && text.contains(r#""--network=host""#),
            "{text}"
        );
    }

    #[test]
    fn gvisor_with_its_own_network_stack_or_host_sockets_or_a_share_is_refused() {
        let netstack = engine(&[("runsc", "/usr/bin/runsc", &[])]);
        assert!(matches!(
            choose(Some("runsc"), None, &netstack, false),
            Err(RuntimeError::GvisorNetstack { .. })
        ));
        let sandbox = engine(&[("runsc", "runsc", &["--network=sandbox", "--host-fifo=open"])]);
        assert!(matches!(
            choose(Some("runsc"), None, &sandbox, false),
            Err(RuntimeError::GvisorNetstack { .. })
        ));
        let no_fifo = engine(&[("runsc", "runsc", &["--network=host"])]);
        assert!(matches!(
            choose(Some("runsc"), None, &no_fifo, false),
            Err(RuntimeError::GvisorFifo { .. })
        ));
        for args in [
            &["--network=host", "--host-uds=open"][..],
            &["-network=host", "-host-uds", "all"],
        ] {
            let e = engine(&[("runsc", "/usr/bin/runsc", args)]);
            let err = choose(Some("runsc"), None, &e, false).unwrap_err();
            assert!(matches!(err, RuntimeError::GvisorHostUds { .. }), "{err}");
        }
        let off = engine(&[(
            "runsc",
            "/usr/bin/runsc",
            &["--network=host", "--host-uds=none", "--host-fifo=open"],
        )]);
        assert_eq!(
            choose(Some("runsc"), None, &off, false).unwrap().confinement,
            Confinement::Gvisor
        );
        assert!(matches!(
            choose(Some("runsc"), None, &off, true),
            Err(RuntimeError::GvisorShare { .. })
        ));
    }
}
