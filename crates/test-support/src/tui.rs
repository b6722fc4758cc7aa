//! A real terminal for interactive runs: a pty whose peer is the launcher's controlling terminal and standard
//! streams; what it shows is collected and read as words.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// An interactive run in a real terminal: a pty whose peer is the launcher's controlling terminal and standard
/// streams, its output collected as words (escape sequences, which move the cursor between words, read as spaces).
pub struct Tui {
    child: Child,
    keys: std::fs::File,
    screen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Tui {
    pub fn start(launcher: &Command, cwd: &Path) -> Self {
        use rustix::pty::OpenptFlags;
        let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
        rustix::pty::unlockpt(&master).unwrap();
        let peer = rustix::pty::ioctl_tiocgptpeer(&master, OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        let size = rustix::termios::Winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&master, size).unwrap();
        let mut setsid = Command::new("setsid");
        setsid
            .args(["-w", "-c"])
            .arg(launcher.get_program())
            .args(launcher.get_args());
        for (k, v) in launcher.get_envs() {
            match v {
                Some(v) => setsid.env(k, v),
                None => setsid.env_remove(k),
            };
        }
        let stream = || Stdio::from(peer.try_clone().unwrap());
        let child = setsid
            .current_dir(cwd)
            .stdin(stream())
            .stdout(stream())
            .stderr(stream())
            .spawn()
            .unwrap();
        // Only the child holds the peer now: the reader sees the end when it is gone.
        drop(setsid);
        drop(peer);
        let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let screen = screen.clone();
            let mut from = std::fs::File::from(master.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = std::io::Read::read(&mut from, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    screen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        Self {
            child,
            keys: std::fs::File::from(master),
            screen,
        }
    }

    /// Everything shown so far, escape sequences included.
    pub fn raw(&self) -> Vec<u8> {
        self.screen.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        let raw = String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned();
        let mut out = String::new();
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while chars.next().is_some_and(|c| !c.is_ascii_alphabetic() && c != '~') {}
                } else {
                    chars.next();
                }
                out.push(' ');
            } else {
                out.push(c);
            }
        }
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    /// Waits until the screen shows `words` (after what it showed when called); panics with the screen if not.
    pub fn wait_for(&self, words: &str) {
        let start = std::time::Instant::now();
        let from = self.text().len();
        while !self.text().get(from..).unwrap_or_default().contains(words) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{words:?} never appeared; the screen shows: {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn type_keys(&mut self, keys: &[u8]) {
        std::thread::sleep(Duration::from_millis(300));
        std::io::Write::write_all(&mut self.keys, keys).unwrap();
    }

    /// Ends the run (TERM to the launcher, then KILL) and returns all it showed.
    pub fn finish(mut self) -> String {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        if crate::child::wait_timeout(&mut self.child, Duration::from_secs(20)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.text()
    }
}
