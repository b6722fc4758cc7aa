//! The launcher's side of a namespace bottle: clone the bottle init straight into the bottle's namespaces (early:
//! it sets them up while the launcher starts the proxy, then waits for the spec), take its in-namespace proxy
//! listener, release it into the self-test, and wait until it reports ready. A `Bottle` that is dropped before the
//! agent finished kills the init (the bottle's pid 1), and with it every process in the bottle.
//!
//! The init is cloned, not re-executed: an exec of this binary (loader, relocations, CPU feature probing) was the
//! largest single cost of a launch; and it is cloned into its namespaces in one step rather than forked, unshared
//! and forked again. Cloning is only sound while the launcher is single-threaded, so `spawn` checks that first and
//! refuses otherwise; the child scrubs what it inherited (descriptors, environment) before it does anything else.

use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, WaitOptions};

use super::control::{self, Message};
use super::ids;
use super::init;
use super::spec::EarlySpec;
use crate::ready::WaitError;
use crate::sys::ns::{self as sys, Forked};

/// How often a wait for the init also checks whether it is still alive.
const CHILD_CHECK: Duration = Duration::from_millis(50);
/// How long the launcher waits for the init's reason when the init stopped listening before it got its spec.
const SPEC_REFUSED_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("the control channel to the bottle init failed")]
    Control { source: std::io::Error },
    #[error("cannot start the bottle init")]
    Spawn { source: std::io::Error },
    #[error(
        "cannot create the bottle's user, mount, pid, network, ipc and uts namespaces (`bot-bottle doctor` checks this)"
    )]
    Namespaces { source: std::io::Error },
    #[error("cannot clone the bottle init: the launcher runs {threads} threads (it must clone before starting any)")]
    Threads { threads: usize },
    #[error("cannot map the bottle's ids to its own host id")]
    Ids { source: std::io::Error },
    #[error(
        "cannot show {path} to the bottle under its own ids (an idmapped mount: Linux 5.12 or later, and a filesystem \
         that supports them, such as ext4, xfs, btrfs or tmpfs; run bot-bottle as your own user otherwise)"
    )]
    Tree { path: PathBuf, source: std::io::Error },
    #[error("the bottle init failed: {reason}")]
    Init { reason: String },
    #[error("the bottle init exited ({status}) before {step}")]
    Exited { status: ExitStatus, step: &'static str },
    #[error(transparent)]
    Wait(#[from] WaitError<std::io::Error>),
    #[error("unexpected message from the bottle init during {step}: {message:?}")]
    Protocol { step: &'static str, message: Message },
}

/// The standard streams of the bottle init (and so of the agent); `None` keeps the launcher's.
#[derive(Default)]
pub struct Stdio3 {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

impl Stdio3 {
    pub fn inherit() -> Self {
        Self::default()
    }
}

pub struct Bottle {
    pid: Pid,
    control: OwnedFd,
    finished: bool,
    /// Why the agent's command could not start, when it said so before the init said ready.
    no_start: Option<String>,
}

/// Clones the init into the bottle's namespaces; it sets them up from `early` at once and waits for `spec_written` before it
/// reads the spec at `spec_path`: the launcher starts it ahead of the proxy, so its start-up overlaps the bundle.
/// Must be called before the launcher starts any thread.
pub fn spawn(spec_path: &Path, early: &EarlySpec, stdio: Stdio3) -> Result<Bottle, LaunchError> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|source| LaunchError::Spawn { source })?
        .count();
    if threads != 1 {
        return Err(LaunchError::Threads { threads });
    }
    let (ours, theirs) = control::pair().map_err(|source| LaunchError::Control { source })?;
    match sys::clone_into(init::namespaces(early)).map_err(|source| LaunchError::Namespaces { source })? {
        Forked::Child => {
            drop(ours);
            // SECURITY: a panic must never unwind into the launcher's frames above: their destructors (the lease,
            // the state dir) belong to the parent, which still uses them.
            let streams = [stdio.stdin, stdio.stdout, stdio.stderr];
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                init::cloned(spec_path, early, theirs, streams)
            }))
            .unwrap_or(init::INIT_FAILED);
            sys::exit_child(code)
        }
        Forked::Parent { child } => {
            drop(theirs);
            let pid = Pid::from_raw(child).ok_or_else(|| LaunchError::Spawn {
                source: std::io::Error::other("clone returned pid 0 to the parent"),
            })?;
            let bottle = Bottle {
                pid,
                control: ours,
                finished: false,
                no_start: None,
            };
            // SECURITY (#12): before the init reads its spec, which it does only after `spec_written`. On failure
            // the dropped `Bottle` kills the init.
            if let Some(id) = early.host_id {
                ids::write_maps(bottle.pid(), id).map_err(|source| LaunchError::Ids { source })?;
            }
            Ok(bottle)
        }
    }
}

impl Bottle {
    pub fn pid(&self) -> u32 {
        self.pid.as_raw_nonzero().get().unsigned_abs()
    }

    /// With a root launcher (`host_id`): hands the init the host paths of its spec's `trees()`, each a detached
    /// mount idmapped through the bottle's user namespace, so the bottle's uid 0 sees the invoking user's files as
    /// its own while its ids are not the user's. Before `spec_written`.
    pub fn send_trees(&mut self, trees: &[PathBuf]) -> Result<(), LaunchError> {
        if trees.is_empty() {
            return Ok(());
        }
        let userns =
            std::fs::File::open(format!("/proc/{}/ns/user", self.pid())).map_err(|source| LaunchError::Tree {
                path: PathBuf::from("the bottle's user namespace"),
                source,
            })?;
        for (i, path) in trees.iter().enumerate() {
            let tree = sys::idmapped_tree(path, userns.as_fd()).map_err(|source| LaunchError::Tree {
                path: path.clone(),
                source,
            })?;
            let i = u32::try_from(i).map_err(|_| LaunchError::Control {
                source: std::io::Error::other("too many host trees"),
            })?;
            control::send(&self.control, &Message::Tree(i), Some(tree.as_fd()))
                .map_err(|source| LaunchError::Control { source })?;
        }
        Ok(())
    }

    /// Lets the init read its spec (written completely by now).
    pub fn spec_written(&mut self) -> Result<(), LaunchError> {
        let Err(source) = control::send(&self.control, &Message::Spec, None) else {
            return Ok(());
        };
        // The init may have failed already, building the namespaces: its reason is waiting in our queue.
        match self.next("the bottle namespaces", SPEC_REFUSED_GRACE) {
            Err(e @ (LaunchError::Init { .. } | LaunchError::Exited { .. })) => Err(e),
            _ => Err(LaunchError::Control { source }),
        }
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

    /// Lets the init run its self-test (the proxy now serves the listener) and waits for its verdict. Returns the
    /// master side of the agent's terminal when the spec asked for one.
    pub fn go_and_wait_ready(&mut self, timeout: Duration) -> Result<Option<OwnedFd>, LaunchError> {
        if let Err(source) = control::send(&self.control, &Message::Go, None) {
            // The init may have failed building the bottle's filesystem: its reason is waiting in our queue.
            return match self.next("the bottle's filesystem", SPEC_REFUSED_GRACE) {
                Err(e @ (LaunchError::Init { .. } | LaunchError::Exited { .. })) => Err(e),
                _ => Err(LaunchError::Control { source }),
            };
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next("the confinement self-test", left)? {
                (Message::Ready, master) => return Ok(master),
                // The agent's process is forked before the init says ready: a command that cannot start may say so
                // first. The bottle is up all the same; `wait` reports the reason with the command's exit code.
                (Message::NoStart(reason), _) => self.no_start = Some(reason),
                (message, _) => {
                    return Err(LaunchError::Protocol {
                        step: "the confinement self-test",
                        message,
                    });
                }
            }
        }
    }

    /// Waits for the agent; returns its exit status, and the reason the command could not start if it could not
    /// (the agent's process says so on the control channel before it exits with 127 or 126).
    pub fn wait(mut self) -> std::io::Result<(ExitStatus, Option<String>)> {
        let status = self.reap(WaitOptions::empty())?;
        self.finished = true;
        let status = status.ok_or_else(|| std::io::Error::other("waitpid returned no status"))?;
        let reason = match self.no_start.take() {
            Some(reason) => Some(reason),
            None => match control::recv(&self.control, true) {
                Ok(Some((Message::NoStart(reason) | Message::Fail(reason), _))) => Some(reason),
                _ => None,
            },
        };
        Ok((status, reason))
    }

    /// The init's exit status if it has exited (`NOHANG`), or once it does.
    fn reap(&mut self, options: WaitOptions) -> std::io::Result<Option<ExitStatus>> {
        loop {
            match rustix::process::waitpid(Some(self.pid), options) {
                Ok(found) => return Ok(found.map(|(_, status)| ExitStatus::from_raw(status.as_raw()))),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
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
            let received = match control::recv(&self.control, true) {
                // An init that exits with our last message unread resets the channel (unix(7)): the error is
                // reported once, then what it sent before (its reason) is still there to read.
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => control::recv(&self.control, true),
                other => other,
            };
            match received.map_err(|source| WaitError::Failed { step, source })? {
                Some((Message::Fail(reason), _)) => return Err(LaunchError::Init { reason }),
                Some(m) => return Ok(m),
                None => {}
            }
            let exited = if closed {
                // The end closed: the init is exiting; reap it (bounded by the deadline).
                self.wait_exit(start, timeout)
                    .map_err(|source| WaitError::Failed { step, source })?
            } else {
                self.reap(WaitOptions::NOHANG)
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
            if let Some(status) = self.reap(WaitOptions::NOHANG)? {
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
            let _ = rustix::process::kill_process(self.pid, rustix::process::Signal::KILL);
            let _ = self.reap(WaitOptions::empty());
        }
    }
}
