//! The launcher's side of a namespace bottle: re-execute ourselves as the bottle init, take its in-namespace
//! proxy listener, release it into the self-test, and wait until it reports ready. A `Bottle` that is dropped
//! before the agent finished kills the init, and with it every process in the bottle.

use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::control::{self, Message};
use super::init::INIT_SUBCOMMAND;
use crate::ready::{WaitError, poll};

/// The binary re-executes itself; `/proc/self/exe` names exactly the running file.
const SELF_EXE: &str = "/proc/self/exe";

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot create the control channel")]
    Control { source: std::io::Error },
    #[error("cannot start the bottle init")]
    Spawn { source: std::io::Error },
    #[error("the bottle init failed: {reason}")]
    Init { reason: String },
    #[error("the bottle init exited ({status}) before {step}")]
    Exited { status: ExitStatus, step: &'static str },
    #[error(transparent)]
    Wait(#[from] WaitError<std::io::Error>),
    #[error("unexpected message from the bottle init during {step}: {message:?}")]
    Protocol { step: &'static str, message: Message },
}

/// The standard streams of the bottle init (and so of the agent).
pub struct Stdio3 {
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
}

impl Stdio3 {
    pub fn inherit() -> Self {
        Self {
            stdin: Stdio::inherit(),
            stdout: Stdio::inherit(),
            stderr: Stdio::inherit(),
        }
    }
}

pub struct Bottle {
    child: Child,
    control: OwnedFd,
    finished: bool,
}

/// Starts the init with the spec at `spec_path`.
pub fn spawn(spec_path: &Path, stdio: Stdio3) -> Result<Bottle, LaunchError> {
    let (ours, theirs) = control::pair().map_err(|source| LaunchError::Control { source })?;
    // Only the child's end crosses exec; ours stays close-on-exec.
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())
        .map_err(|e| LaunchError::Control { source: e.into() })?;
    // SECURITY: the init gets no environment: the launcher's holds real credential secrets, and the bottle's pid 1
    // must not carry them (the agent's environment comes from the spec alone).
    let child = Command::new(SELF_EXE)
        .env_clear()
        .arg(INIT_SUBCOMMAND)
        .arg(spec_path)
        .arg(theirs.as_raw_fd().to_string())
        .stdin(stdio.stdin)
        .stdout(stdio.stdout)
        .stderr(stdio.stderr)
        .spawn()
        .map_err(|source| LaunchError::Spawn { source })?;
    drop(theirs);
    Ok(Bottle {
        child,
        control: ours,
        finished: false,
    })
}

impl Bottle {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The listening socket the init created in the bottle's network namespace.
    pub fn proxy_listener(&mut self, timeout: Duration) -> Result<TcpListener, LaunchError> {
        match self.next("the proxy listener", timeout)? {
            (Message::Listener, Some(fd)) => Ok(TcpListener::from(fd)),
            (message, _) => Err(LaunchError::Protocol {
                step: "the proxy listener",
                message,
            }),
        }
    }

    /// Lets the init run its self-test (the proxy now serves the listener) and waits for its verdict.
    pub fn go_and_wait_ready(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        control::send(&self.control, &Message::Go, None).map_err(|source| LaunchError::Control { source })?;
        match self.next("the confinement self-test", timeout)? {
            (Message::Ready, _) => Ok(()),
            (message, _) => Err(LaunchError::Protocol {
                step: "the confinement self-test",
                message,
            }),
        }
    }

    /// Waits for the agent; returns its exit status.
    pub fn wait(mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait()?;
        self.finished = true;
        Ok(status)
    }

    /// Asks the bottle to stop (SIGTERM reaches the agent through init and pid 1).
    pub fn terminate(&self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }

    fn next(&mut self, step: &'static str, timeout: Duration) -> Result<(Message, Option<OwnedFd>), LaunchError> {
        let control = &self.control;
        let child = &mut self.child;
        let got = poll(step, timeout, || {
            if let Some(m) = control::recv(control, true)? {
                return Ok(Some(Ok(m)));
            }
            match child.try_wait()? {
                Some(status) => Ok(Some(Err(status))),
                None => Ok(None),
            }
        })?;
        match got {
            Ok((Message::Fail(reason), _)) => Err(LaunchError::Init { reason }),
            Ok(m) => Ok(m),
            Err(status) => {
                // A failure reason may have been sent just before the exit.
                if let Ok(Some((Message::Fail(reason), _))) = control::recv(control, true) {
                    return Err(LaunchError::Init { reason });
                }
                Err(LaunchError::Exited { status, step })
            }
        }
    }
}

impl Drop for Bottle {
    fn drop(&mut self) {
        if !self.finished {
            // SECURITY: a bottle that is not waited for is not left running.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
