//! Children waited on with a bound: a test that hangs on a child that never exits (or never prints its ready line)
//! fails with what the child said instead of stalling the suite.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ExitStatus};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// First and longest pause between polls.
const POLL_START: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(250);

/// Waits up to `timeout` for `child` to exit; `None` if it is still running then.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    let mut pause = POLL_START;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(pause.min(timeout.saturating_sub(start.elapsed())));
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// Runs `cmd` with its output captured; kills it if it has not exited within `timeout` and panics with what it
/// said so far.
pub fn output_within(cmd: &mut std::process::Command, timeout: Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = wait_timeout(&mut child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    match status {
        Some(status) => std::process::Output { status, stdout, stderr },
        None => panic!(
            "{cmd:?} did not exit within {timeout:?}\n--- stdout\n{}--- stderr\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// The lines a child writes to a pipe, read on a thread so that waiting for one can be bounded.
pub struct Lines(Receiver<String>);

/// How waiting for a line ended without one.
#[derive(Debug)]
pub enum NoLine {
    /// The pipe is still open; nothing came within the timeout.
    Timeout,
    /// The child closed the pipe (usually it exited).
    Closed,
}

impl Lines {
    pub fn new<R: Read + Send + 'static>(pipe: R) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self(rx)
    }

    /// The next line, waiting up to `timeout`.
    pub fn next_within(&self, timeout: Duration) -> Result<String, NoLine> {
        self.0.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => NoLine::Timeout,
            RecvTimeoutError::Disconnected => NoLine::Closed,
        })
    }
}
