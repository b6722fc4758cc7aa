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

pub struct Relay {
    /// The user's terminal settings before the relay made it raw.
    saved: Option<(File, Termios)>,
    output: Option<JoinHandle<()>>,
}

impl Relay {
    /// Makes the user's terminal raw and starts copying both ways; window-size changes are followed on `runtime`.
    pub fn start(master: OwnedFd, runtime: &tokio::runtime::Handle) -> io::Result<Self> {
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
        let to_agent = Arc::clone(&master);
        // Never joined: it stays blocked on the user's next key until the process exits.
        std::thread::Builder::new()
            .name("bottle-tty-in".into())
            .spawn(move || copy(stdin, &*to_agent))?;
        let from_agent = Arc::clone(&master);
        let screen = stdout.try_clone()?;
        let output = std::thread::Builder::new()
            .name("bottle-tty-out".into())
            .spawn(move || copy(&*from_agent, screen))?;
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

/// Copies until end of input or an error (a pty master reads EIO once its last peer is closed).
fn copy(mut from: impl Read, mut to: impl Write) {
    let mut buf = [0u8; 8192];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
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
