//! `run` (foreground or `-d`), `ls`, `logs`, `stop`, `rm`: the bottle lifecycle, driven from the state dirs.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use bottle_policy::BottleName;
use bottle_sandbox::lease::Registry;
use bottle_sandbox::ready::{WaitError, poll};
use bottle_sandbox::state::{self, BottleState, StateDir, Status};
use serde::Serialize;

use crate::cli::{LogsArgs, NameArg, RmArgs, RunArgs};
use crate::output::Output;
use crate::recipe::{self, Request};

/// Marks the re-executed supervisor of a detached bottle.
const SUPERVISOR_ENV: &str = "BOT_BOTTLE_SUPERVISOR";
const DETACH_READY_TIMEOUT: Duration = Duration::from_secs(40);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(args: &RunArgs, out: &Output) -> anyhow::Result<u8> {
    let (policy, _) = args.policy.load(None)?;
    crate::policy_args::check_upstream_ca(&args.upstream_ca)?;
    let supervising = std::env::var_os(SUPERVISOR_ENV).is_some();
    if args.detach && !supervising {
        return detach(&policy, out);
    }
    let exit = recipe::run(Request {
        policy,
        command: args.command.clone(),
        upstream_ca: args.upstream_ca.clone(),
        detached: supervising,
        remove: args.rm,
    })?;
    // The line itself went where the agent's output goes (and to a detached run's stderr); `--json` gets it too.
    if let Some(line) = &exit.start_failure
        && out.is_json()
    {
        out.error(&anyhow::anyhow!("{line}"), exit.code);
    }
    Ok(exit.code)
}

/// `run -d`: re-executes this command as a supervisor in its own process group, waits until the bottle is
/// running (or has failed), prints its name and returns.
fn detach(policy: &bottle_policy::Policy, out: &Output) -> anyhow::Result<u8> {
    let name = match &policy.bottle.name {
        Some(n) => n.clone(),
        None => recipe::generated_name()?,
    };
    let mut argv: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "-d" && a != "--detach")
        .collect();
    if policy.bottle.name.is_none() {
        argv.insert(
            argv.iter().position(|a| a == "run").map_or(0, |i| i + 1),
            format!("--name={name}"),
        );
    }
    let root = state::state_root()?;
    let mut child = Command::new("/proc/self/exe")
        .args(&argv)
        .env(SUPERVISOR_ENV, "1")
        .env(
            crate::SUPERVISOR_LOG_ENV,
            root.join(name.as_str()).join("supervisor.log"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("cannot start the bottle's supervisor")?;
    let waited = poll(
        "the detached bottle to start",
        DETACH_READY_TIMEOUT,
        || -> std::io::Result<_> {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(Err(status)));
            }
            Ok(match StateDir::open(&root, name.as_str()).and_then(|d| d.read()) {
                Ok(s) if s.supervisor_pid == child.id() && s.status != Status::Starting => Some(Ok(s)),
                _ => None,
            })
        },
    );
    match waited {
        Ok(Ok(s)) if s.status == Status::Running => {
            drop(child.stderr.take());
            out.emit(&s, || format!("{}\n", s.name))?;
            Ok(0)
        }
        // It ran and ended before this poll looked. A command that could not start says why, with its code (127,
        // 126) as in the foreground; one that ran is a started bottle (its exit is in `ls`).
        Ok(Ok(s)) if s.status == Status::Exited => match (&s.error, s.exit_code) {
            (Some(why), Some(code @ (126 | 127))) => {
                eprintln!("{why}");
                Ok(u8::try_from(code).unwrap_or(125))
            }
            _ => {
                drop(child.stderr.take());
                out.emit(&s, || format!("{}\n", s.name))?;
                Ok(0)
            }
        },
        Ok(Ok(s)) => Err(crate::exit::SandboxFailed(format!(
            "bottle {} failed to start: {}",
            s.name,
            s.error.unwrap_or_default()
        ))
        .into()),
        Ok(Err(status)) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            let _ = std::io::stderr().write_all(err.as_bytes());
            Ok(u8::try_from(status.code().unwrap_or(125)).unwrap_or(125))
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e).context("the detached bottle did not start")
        }
    }
}

#[derive(Serialize)]
struct Row {
    name: String,
    backend: String,
    address: String,
    /// `running`, `exited(N)`, …, or `damaged`.
    state: String,
    uptime_secs: Option<u64>,
    allowed: usize,
    denied: usize,
    /// Ask mode: requests held for an answer now (`bot-bottle approvals NAME`).
    asking: usize,
    exit_code: Option<i32>,
    error: Option<String>,
    /// Why the audit log cannot be written, while it cannot (the proxy refuses what it cannot record).
    #[serde(skip_serializing_if = "Option::is_none")]
    audit_failing: Option<String>,
}

/// The row of a bottle whose state cannot be read: its name (from the path), and how to remove it.
fn damaged_row(e: &anyhow::Error, leases: &[bottle_sandbox::lease::LeaseRecord]) -> Row {
    let name = e
        .chain()
        .find_map(|c| match c.downcast_ref::<state::StateError>() {
            Some(state::StateError::Damaged { path, .. } | state::StateError::Read { path, .. }) => path
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned()),
            _ => None,
        })
        .unwrap_or_else(|| "?".into());
    let lease = leases.iter().find(|l| l.name == name);
    Row {
        address: lease.map_or_else(|| "?".into(), |l| l.addr.to_string()),
        backend: "?".into(),
        state: if lease.is_some() {
            "damaged, running".into()
        } else {
            "damaged".into()
        },
        uptime_secs: None,
        allowed: 0,
        denied: 0,
        asking: 0,
        exit_code: None,
        error: Some(format!("{e:#}; `bot-bottle rm -f {name}` stops and removes it")),
        audit_failing: None,
        name,
    }
}

/// The proxy's note that the audit log cannot be written (see `bottle_proxy::AUDIT_FAILING_FILE`).
fn audit_failing(dir: &StateDir) -> Option<String> {
    let text = std::fs::read_to_string(dir.file(bottle_proxy::AUDIT_FAILING_FILE)).ok()?;
    Some(text.trim().chars().take(200).collect())
}

pub fn ls(out: &Output) -> anyhow::Result<u8> {
    let root = state::state_root()?;
    // Listing reaps leases of dead supervisors, so a bottle killed with -9 frees its address here.
    let (leases, damaged_leases) = if root.exists() {
        let registry = Registry::new(&root);
        (registry.list()?, registry.damaged()?)
    } else {
        (Vec::new(), Vec::new())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut rows = Vec::new();
    // One damaged bottle never hides the others: it gets a row saying so, and how to remove it.
    for entry in state::list(&root)? {
        let row = match entry.map_err(anyhow::Error::from).and_then(|s| {
            let dir = StateDir::open(&root, s.name.as_str())?;
            Ok((reap_if_dead(&dir, s)?, dir))
        }) {
            Ok((s, dir)) => {
                let Counts {
                    allowed,
                    denied,
                    asking,
                } = count_decisions(&dir);
                let state = match (s.effective_status(), s.exit_code) {
                    (Status::Exited, Some(c)) => format!("exited({c})"),
                    (st, _) => format!("{st:?}").to_lowercase(),
                };
                Row {
                    uptime_secs: s.is_live().then(|| now.saturating_sub(s.started_at)),
                    state,
                    name: s.name.to_string(),
                    backend: s.backend.to_string(),
                    address: s.addr.to_string(),
                    allowed,
                    denied,
                    asking: if s.is_live() { asking } else { 0 },
                    exit_code: s.exit_code,
                    error: s.error,
                    audit_failing: audit_failing(&dir),
                }
            }
            // A `run --rm` bottle whose launcher was killed: reaped and removed just now.
            Err(e)
                if e.chain()
                    .any(|c| matches!(c.downcast_ref(), Some(state::StateError::NotFound(_)))) =>
            {
                continue;
            }
            Err(e) => damaged_row(&e, &leases),
        };
        rows.push(row);
    }
    // A bottle whose state directory was deleted while it runs still holds its name and address: show it.
    let stateless: Vec<_> = leases
        .iter()
        .filter(|l| !rows.iter().any(|r| r.name == l.name))
        .collect();
    for lease in stateless {
        rows.push(Row {
            name: lease.name.clone(),
            backend: "?".into(),
            address: lease.addr.to_string(),
            state: "running (no state)".into(),
            uptime_secs: None,
            allowed: 0,
            denied: 0,
            asking: 0,
            exit_code: None,
            error: Some(format!(
                "its state directory is gone; `bot-bottle rm -f {}` stops it (supervisor pid {})",
                lease.name, lease.pid
            )),
            audit_failing: None,
        });
    }
    for d in &damaged_leases {
        tracing::warn!("{d}");
    }
    out.emit(&rows, || {
        let mut t = format!(
            "{:<20} {:<13} {:<12} {:<12} {:>8} {:>8} {:>8}\n",
            "NAME", "BACKEND", "ADDRESS", "STATE", "UPTIME", "ALLOWED", "DENIED"
        );
        for r in &rows {
            let state = &r.state;
            let uptime = r.uptime_secs.map_or_else(|| "-".to_string(), |u| format!("{u}s"));
            let _ = writeln!(
                t,
                "{:<20} {:<13} {:<12} {:<12} {:>8} {:>8} {:>8}",
                r.name, r.backend, r.address, state, uptime, r.allowed, r.denied
            );
            // Why a bottle failed (its command could not start, its supervisor was killed, …) under its row.
            if let Some(why) = &r.error {
                let _ = writeln!(t, "  ! {}: {why}", r.name);
            }
            if r.asking > 0 {
                let _ = writeln!(
                    t,
                    "  ? {}: {} request(s) waiting for an answer: bot-bottle approvals {}",
                    r.name, r.asking, r.name
                );
            }
            if let Some(why) = &r.audit_failing {
                let _ = writeln!(
                    t,
                    "  ! {}: the audit log cannot be written ({why}); requests are refused until it can, and the counts miss them",
                    r.name
                );
            }
        }
        for d in &damaged_leases {
            let _ = writeln!(t, "  ! {d}");
        }
        t
    })?;
    Ok(0)
}

/// A bottle whose supervisor vanished (kill -9) is recorded as failed, once.
fn reap_if_dead(dir: &StateDir, mut s: BottleState) -> anyhow::Result<BottleState> {
    if matches!(s.status, Status::Starting | Status::Running) && s.effective_status() == Status::Failed {
        if s.remove {
            // `run --rm` promised nothing is kept; its launcher was killed before it could keep that promise.
            StateDir { path: dir.path.clone() }.remove()?;
            reap_backend(dir, &s);
            return Err(state::StateError::NotFound(s.name.to_string()).into());
        }
        s.status = Status::Failed;
        s.error = Some("its supervisor was killed; the bottle died with it".into());
        dir.write(&s)?;
        reap_backend(dir, &s);
    }
    Ok(s)
}

/// What the bottle's backend holds for bottles that are gone (a container outlives a killed supervisor).
fn reap_backend(dir: &StateDir, s: &BottleState) {
    if let (Ok(backend), Some(root)) = (bottle_sandbox::backend::for_kind(s.backend), dir.path.parent()) {
        backend.reap(root);
    }
}

struct Counts {
    allowed: usize,
    denied: usize,
    /// `ask` lines no decision line answers yet.
    asking: usize,
}

fn count_decisions(dir: &StateDir) -> Counts {
    let (mut allowed, mut denied) = (0, 0);
    let mut asked = std::collections::BTreeSet::new();
    for v in crate::refusals::agent_lines(dir) {
        // The proxy's own records (a reload, a live change) decide no request.
        if v["client"] == "proxy" {
            continue;
        }
        if let Some(id) = v["ask"].as_u64() {
            if v["decision"] == "ask" {
                asked.insert(id);
            } else {
                asked.remove(&id);
            }
        }
        // An `unrecorded` line counts the decisions the log could not hold while failing (all refusals).
        let n = v["count"]
            .as_u64()
            .map_or(1, |c| usize::try_from(c).unwrap_or(usize::MAX));
        match v["decision"].as_str() {
            Some("allow") => allowed += n,
            Some("deny") => denied += n,
            _ => {}
        }
    }
    Counts {
        allowed,
        denied,
        asking: asked.len(),
    }
}

fn open(name: &str) -> anyhow::Result<(StateDir, BottleState)> {
    BottleName::parse(name).map_err(crate::exit::Usage)?;
    let dir = StateDir::open(&state::state_root()?, name)?;
    let s = dir.read()?;
    let s = reap_if_dead(&dir, s)?;
    Ok((dir, s))
}

/// `logs NAME`: the agent's output (`-d` runs); with `--egress` the audit log, as a table for people or the JSON
/// lines themselves with `--json`.
pub fn logs(args: &LogsArgs, out: &Output) -> anyhow::Result<u8> {
    let (dir, s) = open(&args.name)?;
    if let Some(why) = audit_failing(&dir) {
        eprintln!(
            "warning: bottle {}: the audit log cannot be written ({why}); requests are refused until it can",
            s.name
        );
    }
    let egress = args.egress || args.denied;
    let path = dir.file(if egress { state::AUDIT_FILE } else { state::AGENT_LOG });
    if !path.exists() {
        if !egress && !s.detached {
            bail!(
                "bottle {} ran in the foreground, so its output went to the terminal; try --egress",
                s.name
            );
        }
        return Ok(0);
    }
    let name = if egress { state::AUDIT_FILE } else { state::AGENT_LOG };
    let mut file = dir
        .open_log(name)
        .with_context(|| format!("cannot open {} (a link there is not followed)", path.display()))?;
    let keep = |line: &str| !args.denied || line.contains("\"decision\":\"deny\"");
    let table = egress && !out.is_json();
    let mut stdout = std::io::stdout().lock();
    if table {
        writeln!(stdout, "{}", crate::refusals::TABLE_HEADER)?;
    }
    let mut reader = BufReader::new(&mut file);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n > 0 {
            if keep(&line) {
                match crate::refusals::row(line.trim_end()).filter(|_| table) {
                    Some(row) => writeln!(stdout, "{row}")?,
                    None => stdout.write_all(line.as_bytes())?,
                }
            }
            continue;
        }
        stdout.flush()?;
        if !args.follow || !open(&args.name).map(|(_, s)| s.is_live()).unwrap_or(false) {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(200));
        let pos = reader.stream_position()?;
        reader.seek(std::io::SeekFrom::Start(pos))?;
    }
}

pub fn stop(args: &NameArg, out: &Output) -> anyhow::Result<u8> {
    let (dir, s) = open(&args.name)?;
    if !s.is_live() {
        out.emit(&s, || format!("{} is not running\n", s.name))?;
        return Ok(0);
    }
    let s = stop_bottle(&dir, s)?;
    out.emit(&s, || format!("{}\n", s.name))?;
    Ok(0)
}

/// SIGTERM to the supervisor (it reaches the agent through init and pid 1), then SIGKILL after a grace period.
fn stop_bottle(dir: &StateDir, s: BottleState) -> anyhow::Result<BottleState> {
    // SECURITY: the state file names the process to signal; a damaged or planted one must not make `stop` kill an
    // unrelated process. `is_live` already matched its start time; the bottle's lease, written by the supervisor
    // itself under the registry lock, must name the same process.
    if !lease_names_supervisor(&s) {
        return Err(crate::exit::WrongState(format!(
            "bottle {}'s state names pid {} as its supervisor, but its lease does not; nothing was signalled",
            s.name, s.supervisor_pid
        ))
        .into());
    }
    signal(s.supervisor_pid, rustix::process::Signal::TERM);
    let stopped = poll("the bottle to stop", STOP_TIMEOUT, || -> std::io::Result<_> {
        Ok(dir.read().ok().filter(|s| !s.is_live()))
    });
    let s = match stopped {
        Ok(s) => s,
        Err(WaitError::Timeout { .. }) | Err(WaitError::Failed { .. }) => {
            // SECURITY: a bottle that ignores SIGTERM is killed; its init dies with the supervisor (PDEATHSIG).
            signal(s.supervisor_pid, rustix::process::Signal::KILL);
            let _ = poll("the supervisor to die", STOP_TIMEOUT, || -> std::io::Result<_> {
                Ok((!dir.read().map(|s| s.is_live()).unwrap_or(false)).then_some(()))
            });
            reap_if_dead(dir, dir.read()?)?
        }
    };
    Ok(s)
}

pub fn rm(args: &RmArgs, out: &Output) -> anyhow::Result<u8> {
    let (dir, s) = match open(&args.name) {
        Ok(found) => found,
        Err(e) if args.force && e.chain().any(|c| c.is::<state::StateError>()) => {
            return force_remove(&args.name, e, out);
        }
        Err(e) => return Err(e),
    };
    if s.is_live() {
        if !args.force {
            return Err(
                crate::exit::WrongState(format!("bottle {} is running; stop it first or use `rm -f`", s.name)).into(),
            );
        }
        stop_bottle(&dir, s.clone())?;
    }
    let kept = StateDir { path: dir.path.clone() };
    dir.remove()?;
    reap_backend(&kept, &s);
    out.emit(&serde_json::json!({ "removed": s.name }), || format!("{}\n", s.name))?;
    Ok(0)
}

/// `rm -f` of a bottle whose state is damaged or gone: its lease still names its supervisor (pid and start time,
/// so a recycled pid is never signalled); the supervisor is stopped, and the directory removed.
fn force_remove(name: &str, cause: anyhow::Error, out: &Output) -> anyhow::Result<u8> {
    BottleName::parse(name).map_err(crate::exit::Usage)?;
    let root = state::state_root()?;
    let lease = Registry::new(&root).list()?.into_iter().find(|l| l.name == name);
    let path = root.join(name);
    let present = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
    if lease.is_none() && !present {
        return Err(cause);
    }
    if let Some(l) = &lease {
        tracing::warn!(
            name,
            pid = l.pid,
            "stopping a bottle whose state cannot be read, through its lease"
        );
        for sig in [rustix::process::Signal::TERM, rustix::process::Signal::KILL] {
            if lease_alive(l) {
                signal(l.pid, sig);
                let _ = poll("the supervisor to exit", STOP_TIMEOUT, || -> std::io::Result<_> {
                    Ok((!lease_alive(l)).then_some(()))
                });
            }
        }
        if lease_alive(l) {
            anyhow::bail!("bottle {name}'s supervisor (pid {}) did not exit", l.pid);
        }
    }
    if present {
        StateDir { path }.remove()?;
    }
    out.emit(&serde_json::json!({ "removed": name }), || format!("{name}\n"))?;
    Ok(0)
}

/// The bottle's live lease names the same supervisor (pid and start time) as its state.
fn lease_names_supervisor(s: &BottleState) -> bool {
    let Ok(root) = state::state_root() else { return false };
    Registry::new(&root).list().is_ok_and(|leases| {
        leases
            .iter()
            .any(|l| l.name == s.name.as_str() && l.pid == s.supervisor_pid && l.pid_start == s.supervisor_start)
    })
}

/// The lease's owner is still the process that took it (same pid and start time).
fn lease_alive(l: &bottle_sandbox::lease::LeaseRecord) -> bool {
    bottle_sandbox::lease::pid_start_time(l.pid) == Some(l.pid_start)
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}
