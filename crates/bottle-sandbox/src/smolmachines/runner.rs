//! The subprocess seam under `cli.rs`: an `Invocation` is run with exactly the environment it names, stdin closed,
//! output captured to anonymous temporary files, in its own process group, and killed as a group on timeout.
//! `ProcessRunner` is the real thing; tests inject recording fakes through `Runner`.

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Largest stdout/stderr kept from one run.
const MAX_CAPTURE_BYTES: u64 = 1 << 20;
/// How often a running engine is polled for exit.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// After a timeout: how long SIGTERM gets before the whole group is SIGKILLed.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// One engine run, fully specified: nothing is inherited from this process.
#[derive(Clone, PartialEq, Eq)]
pub struct Invocation {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
}

impl fmt::Debug for Invocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token travels in the environment; keys only.
        let keys: Vec<_> = self.env.iter().map(|(k, _)| k).collect();
        f.debug_struct("Invocation")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env_keys", &keys)
            .finish()
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// The timeout expired; the process group was terminated.
    TimedOut,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    pub exit: Exit,
    pub stdout: String,
    pub stderr: String,
}

/// The subprocess seam: production uses `ProcessRunner`; tests inject a recording fake.
pub trait Runner: Send + Sync {
    fn run(&self, invocation: &Invocation, timeout: Duration) -> io::Result<RunOutput>;
}

/// Runs the engine in its own process group with stdout/stderr going to anonymous temporary files: a VMM that
/// outlives the CLI (a started machine) keeps no pipe of ours open, so reading output never blocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessRunner;

impl Runner for ProcessRunner {
    fn run(&self, invocation: &Invocation, timeout: Duration) -> io::Result<RunOutput> {
        let mut stdout = tempfile::tempfile()?;
        let mut stderr = tempfile::tempfile()?;
        let mut child = Command::new(&invocation.program)
            .args(&invocation.args)
            .env_clear()
            .envs(invocation.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout.try_clone()?)
            .stderr(stderr.try_clone()?)
            .process_group(0)
            .spawn()?;
        let pid = rustix::process::Pid::from_child(&child);
        let deadline = Instant::now() + timeout;
        let exit = loop {
            if exited_unreaped(pid)? {
                let status = child.wait()?;
                break status_exit(status);
            }
            if Instant::now() >= deadline {
                kill_group(pid, &mut child)?;
                break Exit::TimedOut;
            }
            thread::sleep(POLL_INTERVAL);
        };
        Ok(RunOutput {
            exit,
            stdout: read_capture(&mut stdout)?,
            stderr: read_capture(&mut stderr)?,
        })
    }
}

/// Has the child exited? Leaves it unreaped (`WNOWAIT`), so its pid — the group id — cannot be reused meanwhile.
fn exited_unreaped(pid: rustix::process::Pid) -> io::Result<bool> {
    use rustix::process::{WaitId, WaitIdOptions, waitid};
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    Ok(waitid(WaitId::Pid(pid), options)?.is_some())
}

/// SIGTERM to the group, a grace period for smolvm to stop its VMM, then SIGKILL to whatever is left, then reap.
fn kill_group(pid: rustix::process::Pid, child: &mut std::process::Child) -> io::Result<()> {
    use rustix::process::{Signal, kill_process_group};
    let _ = kill_process_group(pid, Signal::TERM);
    let grace = Instant::now() + TERM_GRACE;
    while Instant::now() < grace && !exited_unreaped(pid)? {
        thread::sleep(POLL_INTERVAL);
    }
    // The leader is not reaped yet, so the group id is still ours even if every member has exited (ESRCH).
    let _ = kill_process_group(pid, Signal::KILL);
    child.wait()?;
    Ok(())
}

fn status_exit(status: std::process::ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        (None, None) => Exit::Signal(0),
    }
}

fn read_capture(file: &mut File) -> io::Result<String> {
    file.rewind()?;
    let mut buf = Vec::new();
    file.take(MAX_CAPTURE_BYTES).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_runner_captures_output_and_kills_the_group_on_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("grandchild-survived");
        let sh = |script: String| Invocation {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("ONLY".into(), "this".into())],
        };
        let out = ProcessRunner
            .run(
                &sh("echo \"$ONLY $HOME\"; echo err >&2; exit 3".into()),
                Duration::from_secs(10),
            )
            .unwrap();
        let expected = RunOutput {
            exit: Exit::Code(3),
            stdout: "this \n".into(),
            stderr: "err\n".into(),
        };
        assert_eq!(out, expected);
        // A grandchild that ignores SIGTERM must still die with the group.
        let script = format!("(trap '' TERM; sleep 1; touch {}) & wait", marker.display());
        let started = Instant::now();
        let out = ProcessRunner.run(&sh(script), Duration::from_millis(300)).unwrap();
        assert_eq!(out.exit, Exit::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(1) + TERM_GRACE);
        thread::sleep(Duration::from_millis(1500));
        assert!(!marker.exists(), "a process of the group survived the timeout");
    }
}
