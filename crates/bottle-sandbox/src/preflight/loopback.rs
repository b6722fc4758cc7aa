//! Loopback aliases for the bottle address pool. Linux routes all of 127.0.0.0/8 to `lo`, so any `127.0.0.N` can be
//! bound at once and nothing is run; macOS configures only 127.0.0.1 on `lo0`, and binding any other `127.0.0.N`
//! fails with EADDRNOTAVAIL until it is aliased (`ifconfig lo0 alias`, which needs root). Owns that alias step and
//! the `lo0 alias pool` check; trusts `ifconfig lo0` output as read through the `Host` seam.

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use super::host::{CommandOutput, Host, Platform};
use super::{Check, Status};
use crate::lease::DEFAULT_POOL;

/// Where macOS keeps ifconfig(8). Absolute, so a PATH entry cannot stand in for it under sudo.
const IFCONFIG: &str = "/sbin/ifconfig";
const SUDO: &str = "/usr/bin/sudo";
/// `ifconfig lo0` only reads interface state; it answers in milliseconds.
const IFCONFIG_TIMEOUT: Duration = Duration::from_secs(5);
/// `sudo -n` never waits for a password, but may consult a directory service for the sudoers policy.
const SUDO_TIMEOUT: Duration = Duration::from_secs(15);

/// What `ensure_alias` had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasOutcome {
    /// Linux: all of 127/8 is loopback already; no command was run.
    NotNeeded,
    /// `lo0` already carried the address; nothing was changed.
    AlreadyAliased,
    /// The alias was added with sudo and `lo0` now lists it.
    Added,
}

/// Why `ensure_alias` could not make an address usable. Every message ends with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum AliasError {
    #[error("{addr} is outside 127.0.0.0/8; only loopback addresses are ever aliased on lo0")]
    NotLoopback { addr: Ipv4Addr },
    #[error("cannot run `/sbin/ifconfig lo0` to see whether {addr} is aliased on lo0; {}", remedy(.addr))]
    InspectRun { addr: Ipv4Addr, source: io::Error },
    #[error("`/sbin/ifconfig lo0` failed ({status}): {stderr}; {}", remedy(.addr))]
    InspectFailed {
        addr: Ipv4Addr,
        status: String,
        stderr: String,
    },
    #[error("cannot run `/usr/bin/sudo -n /sbin/ifconfig lo0 alias {addr} up`; {}", remedy(.addr))]
    SudoRun { addr: Ipv4Addr, source: io::Error },
    #[error("`/usr/bin/sudo -n /sbin/ifconfig lo0 alias {addr} up` failed ({status}): {stderr}; {}", remedy(.addr))]
    SudoFailed {
        addr: Ipv4Addr,
        status: String,
        stderr: String,
    },
    #[error(
        "`/usr/bin/sudo -n /sbin/ifconfig lo0 alias {addr} up` exited 0 but `ifconfig lo0` still does not list {addr}; {}",
        remedy(.addr)
    )]
    StillMissing { addr: Ipv4Addr },
}

fn remedy(addr: &Ipv4Addr) -> String {
    format!(
        "add the alias yourself with `sudo ifconfig lo0 alias {addr} up`, or allow that command without a password \
         in sudoers (`$USER ALL=(root) NOPASSWD: /sbin/ifconfig lo0 alias {addr} up`)"
    )
}

/// Makes `addr` bindable on this host: nothing to do on Linux; on macOS, aliases it on `lo0` with non-interactive
/// sudo unless it already is, then checks that it now is.
pub fn ensure_alias(host: &dyn Host, addr: Ipv4Addr) -> Result<AliasOutcome, AliasError> {
    // SECURITY: an alias on lo0 makes this host answer for that address itself, so aliasing anything outside 127/8
    // would silently capture the host's traffic to a real machine. Only loopback addresses get past here.
    if !addr.is_loopback() {
        return Err(AliasError::NotLoopback { addr });
    }
    if host.platform() == Platform::Linux {
        return Ok(AliasOutcome::NotNeeded);
    }
    if lo0_addresses(host, addr)?.contains(&addr) {
        return Ok(AliasOutcome::AlreadyAliased);
    }
    // `-n`: sudo reads a password from the terminal, not stdin, so without it a launch could stop at a prompt.
    // The argv goes to sudo as is (no shell) and `addr` is a formatted Ipv4Addr, so nothing can be injected.
    let addr_text = addr.to_string();
    let args = ["-n", IFCONFIG, "lo0", "alias", addr_text.as_str(), "up"];
    let out = host
        .run(Path::new(SUDO), &args, SUDO_TIMEOUT)
        .map_err(|source| AliasError::SudoRun { addr, source })?;
    if !out.success() {
        return Err(AliasError::SudoFailed {
            addr,
            status: exit_status(&out),
            stderr: stderr_text(&out),
        });
    }
    // Fail closed: an exit status of 0 is not proof (a sudoers rule or wrapper may run something else), and a bottle
    // on an address lo0 does not carry would fail later with a far less helpful bind error.
    if lo0_addresses(host, addr)?.contains(&addr) {
        return Ok(AliasOutcome::Added);
    }
    Err(AliasError::StillMissing { addr })
}

/// The `lo0 alias pool` check (macOS only): informational, since `ensure_alias` adds each bottle's alias at launch.
pub(super) fn lo0_alias_pool(host: &dyn Host) -> Check {
    const NAME: &str = "lo0 alias pool";
    let first = Ipv4Addr::new(127, 0, 0, *DEFAULT_POOL.start());
    let launch = "bot-bottle aliases each bottle's address at launch with non-interactive \
                  `sudo ifconfig lo0 alias 127.0.0.N up`";
    let addrs = match lo0_addresses(host, first) {
        Ok(addrs) => addrs,
        Err(err) => {
            let cause = std::error::Error::source(&err)
                .map(|cause| format!(": {cause}"))
                .unwrap_or_default();
            return Check::new(NAME, Status::degraded(format!("{err}{cause}; {launch}")));
        }
    };
    let shown: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
    let detail = format!("lo0 carries {}", shown.join(", "));
    if addrs.contains(&first) {
        return Check::ok(NAME, detail);
    }
    let reason = format!(
        "{first}, the first address of the bottle pool, is not aliased on lo0; {launch}, which must be allowed \
         without a password in sudoers; or add it now: `sudo ifconfig lo0 alias {first} up`"
    );
    Check::new(NAME, Status::degraded(reason)).with_detail(detail)
}

/// The IPv4 addresses `ifconfig lo0` lists; `addr` is only what the error reports on.
fn lo0_addresses(host: &dyn Host, addr: Ipv4Addr) -> Result<Vec<Ipv4Addr>, AliasError> {
    let out = host
        .run(Path::new(IFCONFIG), &["lo0"], IFCONFIG_TIMEOUT)
        .map_err(|source| AliasError::InspectRun { addr, source })?;
    if !out.success() {
        return Err(AliasError::InspectFailed {
            addr,
            status: exit_status(&out),
            stderr: stderr_text(&out),
        });
    }
    Ok(parse_inet(&out.stdout))
}

/// Every `inet A.B.C.D …` line of ifconfig(8) output. Parsed as addresses, not matched as text, so that
/// 127.0.0.2 is never taken for 127.0.0.20.
fn parse_inet(ifconfig: &str) -> Vec<Ipv4Addr> {
    ifconfig
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "inet").then_some(())?;
            words.next()?.parse().ok()
        })
        .collect()
}

fn exit_status(out: &CommandOutput) -> String {
    match (out.timed_out, out.code) {
        (true, _) => "timed out".to_owned(),
        (false, Some(code)) => format!("exit status {code}"),
        (false, None) => "killed by a signal".to_owned(),
    }
}

fn stderr_text(out: &CommandOutput) -> String {
    match out.stderr.trim() {
        "" => "no output".to_owned(),
        text => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{FakeHost, LO0_DEFAULT, LO0_WITH_POOL, output};
    use super::*;

    const LO0: &str = "/sbin/ifconfig lo0";
    const SUDO_ALIAS_2: &str = "/usr/bin/sudo -n /sbin/ifconfig lo0 alias 127.0.0.2 up";
    const ADDR_2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

    /// A Mac whose lo0 does not carry 127.0.0.2 yet.
    fn bare_mac() -> FakeHost {
        let mut host = FakeHost::healthy_mac();
        host.command(LO0, Ok(output(0, LO0_DEFAULT, "")));
        host
    }

    fn runs(host: &FakeHost) -> Vec<String> {
        host.calls()
            .into_iter()
            .filter(|call| call.starts_with("run "))
            .collect()
    }

    #[test]
    fn inet_lines_parse_as_whole_addresses() {
        let text = "lo0: flags=8049<UP> mtu 16384\n\tinet 127.0.0.1 netmask 0xff000000\n\tinet6 ::1 prefixlen \
                    128\n\tinet 127.0.0.20 netmask 0xff000000\n\tinet bogus\n";
        assert_eq!(
            parse_inet(text),
            [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 20)]
        );
        assert!(!parse_inet(text).contains(&ADDR_2));
        assert_eq!(parse_inet(LO0_WITH_POOL), [Ipv4Addr::LOCALHOST, ADDR_2]);
    }

    #[test]
    fn linux_runs_no_command() {
        let host = FakeHost::healthy();
        for last in [2, 254] {
            let outcome = ensure_alias(&host, Ipv4Addr::new(127, 0, 0, last)).unwrap();
            assert_eq!(outcome, AliasOutcome::NotNeeded);
        }
        assert_eq!(host.calls(), Vec::<String>::new());
    }

    #[test]
    fn mac_already_aliased_needs_no_sudo() {
        let host = FakeHost::healthy_mac();
        assert_eq!(ensure_alias(&host, ADDR_2).unwrap(), AliasOutcome::AlreadyAliased);
        assert_eq!(runs(&host), [format!("run {LO0}")]);
    }

    #[test]
    fn mac_missing_alias_is_added_with_one_non_interactive_sudo() {
        let mut host = bare_mac();
        host.command(SUDO_ALIAS_2, Ok(output(0, "", "")));
        host.command_once(LO0, Ok(output(0, LO0_DEFAULT, "")));
        host.command(LO0, Ok(output(0, LO0_WITH_POOL, "")));
        assert_eq!(ensure_alias(&host, ADDR_2).unwrap(), AliasOutcome::Added);
        assert_eq!(
            runs(&host),
            [
                format!("run {LO0}"),
                format!("run {SUDO_ALIAS_2}"),
                format!("run {LO0}")
            ]
        );
    }

    #[test]
    fn mac_sudo_failure_names_the_remedy() {
        let mut host = bare_mac();
        host.command(SUDO_ALIAS_2, Ok(output(1, "", "sudo: a password is required\n")));
        let err = ensure_alias(&host, ADDR_2).unwrap_err();
        assert!(matches!(err, AliasError::SudoFailed { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "`/usr/bin/sudo -n /sbin/ifconfig lo0 alias 127.0.0.2 up` failed (exit status 1): sudo: a password is \
             required; add the alias yourself with `sudo ifconfig lo0 alias 127.0.0.2 up`, or allow that command \
             without a password in sudoers (`$USER ALL=(root) NOPASSWD: /sbin/ifconfig lo0 alias 127.0.0.2 up`)"
        );
        // No second read after a failed sudo: there is nothing to verify.
        assert_eq!(runs(&host).len(), 2, "{:?}", host.calls());

        let host = bare_mac(); // no scripted sudo: it cannot be run at all
        let err = ensure_alias(&host, ADDR_2).unwrap_err();
        assert!(matches!(err, AliasError::SudoRun { .. }), "{err:?}");
        assert!(
            err.to_string().contains("`sudo ifconfig lo0 alias 127.0.0.2 up`"),
            "{err}"
        );
    }

    #[test]
    fn mac_alias_still_absent_after_sudo_fails_closed() {
        let mut host = bare_mac();
        host.command(SUDO_ALIAS_2, Ok(output(0, "", "")));
        let err = ensure_alias(&host, ADDR_2).unwrap_err();
        assert!(
            matches!(err, AliasError::StillMissing { addr } if addr == ADDR_2),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("`sudo ifconfig lo0 alias 127.0.0.2 up`"),
            "{err}"
        );
        assert_eq!(runs(&host).len(), 3, "{:?}", host.calls());
    }

    #[test]
    fn mac_unreadable_lo0_fails_before_sudo() {
        let mut host = bare_mac();
        host.command(LO0, Ok(output(1, "", "ifconfig: interface lo0 does not exist\n")));
        let err = ensure_alias(&host, ADDR_2).unwrap_err();
        assert!(matches!(err, AliasError::InspectFailed { .. }), "{err:?}");
        assert!(!host.called("run /usr/bin/sudo"), "{:?}", host.calls());
    }

    #[test]
    fn non_loopback_addresses_are_refused_before_any_command() {
        for host in [FakeHost::healthy(), bare_mac()] {
            for addr in [
                Ipv4Addr::new(10, 0, 0, 2),
                Ipv4Addr::new(128, 0, 0, 2),
                Ipv4Addr::UNSPECIFIED,
            ] {
                let err = ensure_alias(&host, addr).unwrap_err();
                assert!(
                    matches!(err, AliasError::NotLoopback { addr: a } if a == addr),
                    "{err:?}"
                );
            }
            assert_eq!(host.calls(), Vec::<String>::new());
        }
    }

    #[test]
    fn pool_check_is_ok_when_the_first_address_is_aliased() {
        let check = lo0_alias_pool(&FakeHost::healthy_mac());
        assert_eq!(check.status, Status::Ok);
        assert_eq!(check.detail.as_deref(), Some("lo0 carries 127.0.0.1, 127.0.0.2"));
    }

    #[test]
    fn pool_check_degrades_without_the_alias() {
        let check = lo0_alias_pool(&bare_mac());
        let Status::Degraded { reason } = &check.status else {
            panic!("{check:?}");
        };
        assert!(reason.contains("`sudo ifconfig lo0 alias 127.0.0.N up`"), "{reason}");
        assert!(reason.contains("`sudo ifconfig lo0 alias 127.0.0.2 up`"), "{reason}");
        assert_eq!(check.detail.as_deref(), Some("lo0 carries 127.0.0.1"));

        let mut host = bare_mac();
        host.commands.remove(LO0);
        let check = lo0_alias_pool(&host);
        let Status::Degraded { reason } = &check.status else {
            panic!("{check:?}");
        };
        assert!(reason.starts_with("cannot run `/sbin/ifconfig lo0`"), "{reason}");
        assert!(reason.contains("No such file"), "{reason}");
    }
}
