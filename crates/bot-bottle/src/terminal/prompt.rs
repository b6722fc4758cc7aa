//! Ask mode at the user's terminal: while a question waits, the agent's output is held back, the bottom line shows
//! the question, and the next key answers it (`o` once, `a` always, `d` deny) instead of reaching the agent. When
//! the question is answered (here, by `approvals`, by a reviewer command) or given up on, the line is cleared, the
//! cursor put back, the held output shown, and the agent asked to redraw (its window size is nudged, so it gets a
//! SIGWINCH). Other keys while asking are swallowed: nothing typed at the question reaches the agent.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

use bottle_proxy::Decision;

use crate::asks::{Asks, Waiting};

/// Agent output held while asking, at most; past it the agent waits (its writes block) until the answer.
const MAX_HELD: usize = 4 << 20;

pub struct Screen {
    state: Mutex<State>,
    /// Wakes a writer waiting for room while the question is shown.
    room: std::sync::Condvar,
    asks: Arc<Asks>,
    bottle: String,
    /// The agent's terminal (for the redraw nudge).
    agent: Arc<File>,
}

struct State {
    out: File,
    /// The question shown, if one is.
    asking: Option<u64>,
    held: Vec<u8>,
}

impl Screen {
    /// `None` without questions to ask.
    pub fn new(out: File, agent: Arc<File>, asks: Option<(Arc<Asks>, &str)>) -> Option<Arc<Self>> {
        let (asks, bottle) = asks?;
        Some(Arc::new(Self {
            state: Mutex::new(State {
                out,
                asking: None,
                held: Vec::new(),
            }),
            room: std::sync::Condvar::new(),
            asks,
            bottle: bottle.to_string(),
            agent,
        }))
    }

    /// Told whenever the questions change.
    pub fn watch(&self) -> std::sync::mpsc::Receiver<()> {
        self.asks.watch()
    }

    /// The agent wrote `bytes`: shown now, or held while a question is.
    pub fn agent_output(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while s.asking.is_some() && s.held.len() >= MAX_HELD {
            s = self.room.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        if s.asking.is_some() {
            s.held.extend_from_slice(bytes);
            return Ok(());
        }
        s.out.write_all(bytes)?;
        s.out.flush()
    }

    /// The user typed `bytes`: `Some` to pass on to the agent, `None` when they answered (or were swallowed by) the
    /// question shown.
    pub fn keys<'a>(&self, bytes: &'a [u8]) -> Option<&'a [u8]> {
        let asking = self.state.lock().unwrap_or_else(PoisonError::into_inner).asking;
        let Some(id) = asking else {
            return Some(bytes);
        };
        let decision = bytes.iter().find_map(|b| match b.to_ascii_lowercase() {
            b'o' | b'y' => Some(Decision::AllowOnce),
            b'a' => Some(Decision::Allow),
            b'd' | b'n' => Some(Decision::Deny),
            _ => None,
        });
        if let Some(decision) = decision {
            // Answered elsewhere first: the refresh that follows takes the line down either way.
            let _ = self.asks.answer(id, decision, "answered at the terminal", "terminal");
        }
        None
    }

    /// Shows the oldest waiting question, or takes the line down when none waits.
    pub fn refresh(&self) {
        let first = self.asks.waiting().into_iter().next();
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let shown = s.asking;
        match (shown, first) {
            (None, None) => {}
            (Some(id), Some(w)) if w.question.id == id => {}
            (Some(_), None) => {
                // Clear the line, put the cursor back, then what the agent wrote meanwhile.
                let held = std::mem::take(&mut s.held);
                let _ = s.out.write_all(b"\r\x1b[2K\x1b8");
                let _ = s.out.write_all(&held);
                let _ = s.out.flush();
                s.asking = None;
                drop(s);
                self.room.notify_all();
                self.nudge();
            }
            (shown, Some(w)) => {
                if shown.is_none() {
                    let _ = s.out.write_all(b"\x1b7");
                }
                let rows = rustix::termios::tcgetwinsize(&s.out).map_or(24, |size| size.ws_row.max(1));
                let line = self.line(&w, rows);
                let _ = s.out.write_all(line.as_bytes());
                let _ = s.out.flush();
                s.asking = Some(w.question.id);
            }
        }
    }

    fn line(&self, w: &Waiting, rows: u16) -> String {
        let q = &w.question;
        let request = match (&q.method, &q.path) {
            (Some(m), Some(p)) => format!(" {m} {p}"),
            _ => String::new(),
        };
        let private = if q.private { ", private" } else { "" };
        let text: String = format!(
            "bot-bottle: {} asks for {}:{}{request} ({}{private}) - [o]nce [a]lways [d]eny",
            self.bottle, q.host, q.port, q.addr
        )
        .chars()
        .filter(|c| !c.is_control())
        .collect();
        format!("\x1b[{rows};1H\x1b[2K\x1b[7m{text}\x1b[0m")
    }

    /// A SIGWINCH for the agent: its window shrinks by a column and comes back, so a TUI redraws what the question
    /// covered.
    fn nudge(&self) {
        if let Ok(size) = rustix::termios::tcgetwinsize(&*self.agent)
            && size.ws_col > 1
        {
            let smaller = rustix::termios::Winsize {
                ws_col: size.ws_col - 1,
                ..size
            };
            let _ = rustix::termios::tcsetwinsize(&*self.agent, smaller);
            std::thread::sleep(std::time::Duration::from_millis(20));
            let _ = rustix::termios::tcsetwinsize(&*self.agent, size);
        }
    }
}
