//! The launcher's side of a namespace bottle: re-execute ourselves as the bottle init (early: it waits for the
//! spec), take its in-namespace proxy listener, release it into the self-test, and wait until it reports ready. A `Bottle` that is dropped
//! before the agent finished kills the init, and with it every process in the bottle.

use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use super::control::{self, Message};
use super::init::INIT_SUBCOMMAND;
use crate::ready::WaitError;

/// The binary re-executes itself; `/proc/self/exe` names exactly the running file.
const SELF_EXE: &str = "/proc/self/exe";

/// How often a wait for the init also checks whether it is still alive.
const CHILD_CHECK: Duration = Duration::from_millis(50);

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

/// Starts the init, which waits for `spec_written` before it reads the spec at `spec_path`: the launcher starts it
/// ahead of the proxy, so its process start-up overlaps the bundle.
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

    /// Lets the init read its spec (written completely by now).
    pub fn spec_written(&self) -> Result<(), LaunchError> {
        control::send(&self.control, &Message::Spec, None).map_err(|source| LaunchError::Control { source })
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

    /// The init's next message. Event-driven: the wait wakes when a message arrives or the init's end closes,
    /// never on a polling schedule (a sleep-and-check loop put whole backoff periods into every launch).
    fn next(&mut self, step: &'static str, timeout: Duration) -> Result<(Message, Option<OwnedFd>), LaunchError> {
        let start = Instant::now();
        let timed_out = |start: Instant| WaitError::Timeout {
            step,
            waited: start.elapsed(),
        };
        loop {
            let remaining = timeout.checked_sub(start.elapsed()).ok_or_else(|| timed_out(start))?;
            // Bounded so a child that died while another process still holds its end is noticed too.
            let slice = remaining.min(CHILD_CHECK);
            let mut fds = [PollFd::new(&self.control, PollFlags::IN)];
            let ts = Timespec {
                tv_sec: slice.as_secs() as _,
                tv_nsec: slice.subsec_nanos() as _,
            };
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(WaitError::Failed { step, source: e.into() }.into()),
            }
            let closed = fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR);
            match control::recv(&self.control, true).map_err(|source| WaitError::Failed { step, source })? {
                Some((Message::Fail(reason), _)) => return Err(LaunchError::Init { reason }),
                Some(m) => return Ok(m),
                None => {}
            }
            let exited = if closed {
                // The end closed: the init is exiting; reap it (bounded by the deadline).
                self.wait_exit(start, timeout)
                    .map_err(|source| WaitError::Failed { step, source })?
            } else {
                self.child
                    .try_wait()
                    .map_err(|source| WaitError::Failed { step, source })?
            };
            if let Some(status) = exited {
                return Err(LaunchError::Exited { status, step });
            }
        }
    }

    /// After the control channel closed: the init's exit status, once it is there or the deadline passed.
    fn wait_exit(&mut self, start: Instant, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(1));
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
