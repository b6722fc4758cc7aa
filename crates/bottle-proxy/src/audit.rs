//! The audit log: one JSON line per decision in `STATE_DIR/audit.jsonl`, and for a relayed exchange a second,
//! `"event":"end"`, with its byte counts and outcome. The record types have no field that could hold a header
//! value, a body or a secret; paths keep query parameter names and drop their values.
//!
//! SECURITY: the log fails closed. A decision to forward is written before anything is forwarded, and a request
//! whose decision cannot be written is refused (`write` says so). A log file that was deleted or replaced is
//! reopened at its path; while writes fail, `audit.failing` beside the log names the cause (for `ls`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use time::format_description::well_known::Rfc3339;

/// Audit file mode: the log names every host the bottle reached; keep it to the owner.
const AUDIT_FILE_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Allow,
    Deny,
    /// Allowed, and a credential placeholder was replaced by its real value.
    Inject,
    Error,
    /// Held for a reviewer (ask mode); the answer is a line of its own.
    Ask,
}

/// The decision could not be recorded: nothing may be forwarded on it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the audit log {path} cannot be written: {cause}")]
pub struct AuditFailure {
    pub path: PathBuf,
    pub cause: String,
}

/// Next to the log while it cannot be written; holds the cause.
pub const AUDIT_FAILING_FILE: &str = "audit.failing";

/// One audit record, minus the time and bottle name the log adds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Event {
    /// `request`, `connect`, `tunnel`, `placeholder-leak`, `reload`, `connection`.
    pub event: &'static str,
    /// Pairs a decision with its `end` line (0: a decision with no end line).
    #[serde(skip_serializing_if = "is_zero")]
    pub id: u64,
    pub client: Arc<str>,
    pub method: String,
    pub scheme: &'static str,
    pub host: String,
    pub port: u16,
    pub path: String,
    pub decision: Verdict,
    pub rule: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<String>,
    /// The protocol a request switched to (`websocket`, or one a host opted into).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
    /// The address dialled, or the private address a name resolved to (a refusal's reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// Ask mode: the question's id, on the `ask` line and on the decision line that answers it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ask: Option<u64>,
    /// Ask mode: who answered and why (`approvals (uid 1000): ok`), or why nobody did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reviewer: Option<String>,
    /// For a refusal: the flag or policy line that would allow it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
}

impl Event {
    /// Makes this the record of a refusal: the rule, the remedy, and for a private answer the address.
    pub fn refused(&mut self, reason: &crate::decide::DenyReason, start: Instant) {
        self.decision = Verdict::Deny;
        self.rule = reason.code().to_string();
        self.duration_ms = elapsed_ms(start);
        if !reason.is_malformed() {
            self.hint = Some(reason.hint(&self.host, self.port));
        }
        if let crate::decide::DenyReason::PrivateAddress { ip, .. } = reason {
            self.addr = Some(ip.to_string());
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The end of a relayed exchange: not a decision (it has no `decision` field), its bytes and outcome.
#[derive(Debug, serde::Serialize)]
struct End<'a> {
    event: &'static str,
    id: u64,
    client: &'a str,
    method: &'a str,
    host: &'a str,
    port: u16,
    path: &'a str,
    /// `ok`, or `error` with the cause in `rule`.
    outcome: &'static str,
    rule: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    upgrade: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    addr: Option<&'a str>,
    /// The upstream's status code, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    bytes_up: u64,
    bytes_down: u64,
    duration_ms: u64,
}

#[derive(serde::Serialize)]
struct Line<'a, T: serde::Serialize> {
    time: String,
    bottle: &'a str,
    #[serde(flatten)]
    event: &'a T,
}

pub struct AuditLog {
    bottle: String,
    path: PathBuf,
    out: Mutex<Out>,
    next_id: AtomicU64,
}

/// The open log and the identity of the file it is, to notice a deletion or replacement.
struct Out {
    file: File,
    id: (u64, u64),
    failing: bool,
    /// Decisions that could not be written while failing (each one a refusal: nothing was forwarded on it).
    lost: u64,
}

/// Written once the log can be written again: how many decisions it could not hold. All were refusals (a decision
/// that cannot be recorded is not acted on), so `ls` counts them as denials.
#[derive(serde::Serialize)]
struct Unrecorded {
    event: &'static str,
    decision: Verdict,
    rule: &'static str,
    count: u64,
}

fn open_log(path: &Path) -> std::io::Result<(File, (u64, u64))> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(AUDIT_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    Ok((file, (meta.dev(), meta.ino())))
}

impl AuditLog {
    pub fn open(path: &Path, bottle: &str) -> Result<Self, AuditError> {
        let (file, id) = open_log(path).map_err(|source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            bottle: bottle.to_string(),
            path: path.to_path_buf(),
            out: Mutex::new(Out {
                file,
                id,
                failing: false,
                lost: 0,
            }),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A fresh id pairing a decision with its `end` line.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Writes one decision. `Err`: it is not on disk, so nothing may be forwarded on it.
    pub fn write(&self, event: &Event) -> Result<(), AuditFailure> {
        self.write_line(event, true)
    }

    /// `decision`: the line records a decision (counted when lost), not an `end` line.
    fn write_line<T: serde::Serialize>(&self, event: &T, decision: bool) -> Result<(), AuditFailure> {
        let time = time::OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_else(|_| "unknown".into());
        let line = Line {
            time,
            bottle: &self.bottle,
            event,
        };
        let fail = |cause: String| AuditFailure {
            path: self.path.clone(),
            cause,
        };
        let mut bytes = serde_json::to_vec(&line).map_err(|e| fail(format!("cannot serialise a record: {e}")))?;
        bytes.push(b'\n');
        let mut out = self.out.lock().map_err(|_| fail("its lock is poisoned".into()))?;
        let result = self.reopen_if_replaced(&mut out).and_then(|()| {
            let before = out.file.metadata()?.len();
            out.file.write_all(&bytes).inspect_err(|_| {
                // A write cut short (ENOSPC after a partial page) would leave a torn line: take it back.
                let _ = out.file.set_len(before);
            })
        });
        match result {
            Ok(()) => {
                if out.failing {
                    let lost = Line {
                        time: line.time.clone(),
                        bottle: &self.bottle,
                        event: &Unrecorded {
                            event: "unrecorded",
                            decision: Verdict::Deny,
                            rule: "audit-log-failing",
                            count: out.lost,
                        },
                    };
                    let mut text = serde_json::to_vec(&lost).unwrap_or_default();
                    text.push(b'\n');
                    if out.file.write_all(&text).is_ok() {
                        out.failing = false;
                        out.lost = 0;
                        tracing::warn!(path = %self.path.display(), "the audit log is written again");
                        let _ = std::fs::remove_file(self.failing_marker());
                    }
                }
                Ok(())
            }
            Err(e) => {
                out.lost += u64::from(decision);
                let cause = e.to_string();
                if !out.failing {
                    out.failing = true;
                    tracing::error!(path = %self.path.display(), error = %cause, "cannot write the audit log; refusing what cannot be recorded");
                    let _ = std::fs::write(self.failing_marker(), format!("{cause}\n"));
                }
                Err(fail(cause))
            }
        }
    }

    /// The log at its path is not the file we hold (deleted, or replaced by a rename): open it anew there.
    fn reopen_if_replaced(&self, out: &mut Out) -> std::io::Result<()> {
        let current = std::fs::symlink_metadata(&self.path).map(|m| (m.dev(), m.ino()));
        if current.as_ref().is_ok_and(|id| *id == out.id) {
            return Ok(());
        }
        let (file, id) = open_log(&self.path)?;
        tracing::warn!(path = %self.path.display(), "the audit log was deleted or replaced; reopened");
        out.file = file;
        out.id = id;
        Ok(())
    }

    fn failing_marker(&self) -> PathBuf {
        self.path.with_file_name(AUDIT_FAILING_FILE)
    }
}

pub struct Pending {
    log: Arc<AuditLog>,
    event: Mutex<Event>,
    start: Instant,
    pub up: AtomicU64,
    pub down: AtomicU64,
    /// The upstream's status code (0: none yet).
    status: AtomicU64,
}

impl Pending {
    pub fn new(log: Arc<AuditLog>, event: Event, start: Instant) -> Arc<Self> {
        Arc::new(Self {
            log,
            event: Mutex::new(event),
            start,
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            status: AtomicU64::new(0),
        })
    }

    /// The exchange failed after it was allowed (upstream error, failed upgrade).
    /// Records why the exchange failed. The first cause wins: a scanner that cut a body makes the upstream
    /// request fail too, and the audit line must name the cut, not its consequence.
    pub fn fail(&self, rule: &str) {
        if let Ok(mut e) = self.event.lock()
            && e.decision != Verdict::Error
        {
            e.decision = Verdict::Error;
            e.rule = rule.to_string();
        }
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(u64::from(status), Ordering::Relaxed);
    }

    /// The failure recorded so far, if any.
    pub fn failure(&self) -> Option<String> {
        let e = self.event.lock().ok()?;
        (e.decision == Verdict::Error).then(|| e.rule.clone())
    }

    pub fn add(&self, up: u64, down: u64) {
        self.up.fetch_add(up, Ordering::Relaxed);
        self.down.fetch_add(down, Ordering::Relaxed);
    }
}

impl Drop for Pending {
    /// The `end` line of an exchange whose decision line was written before it was forwarded.
    fn drop(&mut self) {
        let event = match self.event.get_mut() {
            Ok(e) => std::mem::take(e),
            Err(poisoned) => std::mem::take(poisoned.into_inner()),
        };
        let end = End {
            event: "end",
            id: event.id,
            client: &event.client,
            method: &event.method,
            host: &event.host,
            port: event.port,
            path: &event.path,
            outcome: if event.decision == Verdict::Error {
                "error"
            } else {
                "ok"
            },
            rule: &event.rule,
            upgrade: event.upgrade.as_deref(),
            addr: event.addr.as_deref(),
            status: match self.status.load(Ordering::Relaxed) {
                0 => None,
                s => u16::try_from(s).ok(),
            },
            bytes_up: self.up.load(Ordering::Relaxed),
            bytes_down: self.down.load(Ordering::Relaxed),
            duration_ms: elapsed_ms(self.start),
        };
        // The decision is on disk already; a lost end line loses only its counts (and `audit.failing` says so).
        let _ = self.log.write_line(&end, false);
    }
}

pub fn elapsed_ms(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// `/p?token=abc&x=1` → `/p?token&x`: parameter names stay (they say what was asked), values go (they may be
/// secrets or personal data).
pub fn redact_path(path: &str, query: Option<&str>) -> String {
    let Some(query) = query else {
        return path.to_string();
    };
    let names: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').map_or(p, |(k, _)| k))
        .collect();
    format!("{path}?{}", names.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_dropped() {
        assert_eq!(redact_path("/a", Some("k=secret&flag&x=1")), "/a?k&flag&x");
        assert_eq!(redact_path("/a", None), "/a");
    }

    #[test]
    fn lines_are_json_with_time_and_bottle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, "b1").unwrap();
        log.write(&Event {
            event: "request",
            host: "example.com".into(),
            ..Event::default()
        })
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["bottle"], "b1");
        assert_eq!(v["decision"], "allow");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_deleted_or_replaced_log_is_reopened_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, "b1").unwrap();
        let line = |host: &str| Event {
            event: "request",
            host: host.into(),
            ..Event::default()
        };
        log.write(&line("one.test")).unwrap();
        std::fs::remove_file(&path).unwrap();
        log.write(&line("two.test")).unwrap();
        std::fs::write(dir.path().join("other"), "").unwrap();
        std::fs::rename(dir.path().join("other"), &path).unwrap();
        log.write(&line("three.test")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("three.test") && !text.contains("one.test"), "{text}");
    }

    #[test]
    fn a_log_that_cannot_be_written_refuses_and_says_so_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, "b1").unwrap();
        // A link where the log was: it is not followed, so every write fails (as on a full disk).
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let err = log.write(&Event::default()).unwrap_err();
        assert!(err.to_string().contains("cannot be written"), "{err}");
        let marker = dir.path().join(AUDIT_FAILING_FILE);
        assert!(marker.exists(), "ls has nothing to show");
        std::fs::remove_file(&path).unwrap();
        log.write(&Event::default()).unwrap();
        assert!(!marker.exists(), "the marker outlived the failure");
    }
}
