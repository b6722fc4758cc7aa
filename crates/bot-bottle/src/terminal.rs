//! The user's terminal, relayed to the agent's terminal inside the bottle (a pty of the bottle's own devpts whose
//! master side the init hands over). The user's terminal goes raw for the relay, so Ctrl-C, Ctrl-Z and every other
//! key reach the agent's line discipline; window-size changes follow on SIGWINCH. The terminal is restored when the
//! relay ends, on every path (`Drop`).
//!
//! Trusts nothing from the bottle but bytes: the agent writes to the user's screen, as any terminal program does,
//! and never gets a descriptor of the user's terminal (so no ioctl on it, TIOCSTI included).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use rustix::termios::{OptionalActions, Termios};

use crate::asks::Asks;

mod prompt;

pub struct Relay {
    /// The user's terminal settings before the relay made it raw.
    saved: Option<(File, Termios)>,
    output: Option<JoinHandle<()>>,
}

impl Relay {
    /// Makes the user's terminal raw and starts copying both ways; window-size changes are followed on `runtime`.
    /// With `asks`, the bottle's ask-mode questions are put to the user here (see `prompt`).
    pub fn start(
        master: OwnedFd,
        runtime: &tokio::runtime::Handle,
        asks: Option<(Arc<Asks>, &str)>,
    ) -> io::Result<Self> {
        let stdin = File::from(rustix::io::dup(rustix::stdio::stdin())?);
        let stdout = File::from(rustix::io::dup(rustix::stdio::stdout())?);
        let master = Arc::new(File::from(master));
        let saved = rustix::termios::tcgetattr(&stdin)?;
        // From the raw switch on, `relay` puts the user's terminal back on every way out, errors included.
        let mut relay = Self {
            saved: Some((stdin.try_clone()?, saved.clone())),
            output: None,
        };
        follow_size(&stdout, &master);
        let mut raw = saved;
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, OptionalActions::Now, &raw)?;
        let screen = prompt::Screen::new(stdout.try_clone()?, Arc::clone(&master), asks);
        if let Some(screen) = &screen {
            let (screen, changes) = (Arc::clone(screen), screen.watch());
            // Ends when the bottle's questions are gone with the process.
            std::thread::Builder::new()
                .name("bottle-tty-ask".into())
                .spawn(move || {
                    for () in changes {
                        screen.refresh();
                    }
                })?;
        }
        let to_agent = Arc::clone(&master);
        let keys = screen.clone();
        // Never joined: it stays blocked on the user's next key until the process exits.
        std::thread::Builder::new()
            .name("bottle-tty-in".into())
            .spawn(move || copy(stdin, Sink::Agent(&to_agent, keys)))?;
        let from_agent = Arc::clone(&master);
        let sink = match screen {
            Some(screen) => Sink::Screen(screen),
            None => Sink::File(stdout.try_clone()?),
        };
        let output = std::thread::Builder::new()
            .name("bottle-tty-out".into())
            .spawn(move || copy(&*from_agent, sink))?;
        runtime.spawn(async move {
            let Ok(mut winch) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                follow_size(&stdout, &master);
            }
        });
        relay.output = Some(output);
        Ok(relay)
    }

    /// Waits until the agent's side is drained (its terminal closes when the last process of the bottle is gone),
    /// then restores the user's terminal.
    pub fn finish(mut self) {
        if let Some(output) = self.output.take() {
            let _ = output.join();
        }
        self.restore();
    }

    fn restore(&mut self) {
        if let Some((stdin, saved)) = self.saved.take() {
            let _ = rustix::termios::tcsetattr(&stdin, OptionalActions::Now, &saved);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The agent's terminal takes the size of the user's.
fn follow_size(user: &File, agent: &File) {
    if let Ok(size) = rustix::termios::tcgetwinsize(user) {
        let _ = rustix::termios::tcsetwinsize(agent, size);
    }
}

/// Where relayed bytes go.
enum Sink<'a> {
    File(File),
    /// The user's screen, with a question shown at times.
    Screen(Arc<prompt::Screen>),
    /// The agent's terminal; keys answer a question first, when one is shown.
    Agent(&'a File, Option<Arc<prompt::Screen>>),
}

impl Sink<'_> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Self::File(f) => f.write_all(bytes).and_then(|()| f.flush()),
            Self::Screen(screen) => screen.agent_output(bytes),
            Self::Agent(agent, screen) => {
                let pass = match screen {
                    Some(screen) => screen.keys(bytes),
                    None => Some(bytes),
                };
                match pass {
                    Some(bytes) => agent.write_all(bytes).and_then(|()| agent.flush()),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Copies until end of input or an error (a pty master reads EIO once its last peer is closed).
fn copy(mut from: impl Read, mut to: Sink<'_>) {
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.put(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

impl bottle_sandbox::backend::Relay for Relay {
    fn finish(self: Box<Self>) {
        Relay::finish(*self);
    }
}
