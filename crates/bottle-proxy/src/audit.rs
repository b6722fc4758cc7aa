//! The audit log: one JSON line per decision in `STATE_DIR/audit.jsonl`. The record type has no field that could
//! hold a header value, a body or a secret; paths keep query parameter names and drop their values.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
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
}

/// One audit record, minus the time and bottle name the log adds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Event {
    /// `request`, `connect`, `tunnel`, `placeholder-leak`, `reload`, `connection`.
    pub event: &'static str,
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
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
}

#[derive(serde::Serialize)]
struct Line<'a> {
    time: String,
    bottle: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}

pub struct AuditLog {
    bottle: String,
    path: PathBuf,
    out: Mutex<BufWriter<File>>,
}

impl AuditLog {
    pub fn open(path: &Path, bottle: &str) -> Result<Self, AuditError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(AUDIT_FILE_MODE)
            .open(path)
            .map_err(|source| AuditError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            bottle: bottle.to_string(),
            path: path.to_path_buf(),
            out: Mutex::new(BufWriter::new(file)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line and flushes it, so a crash loses at most the line being written.
    pub fn write(&self, event: &Event) {
        let time = time::OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_else(|_| "unknown".into());
        let line = Line {
            time,
            bottle: &self.bottle,
            event,
        };
        let mut bytes = match serde_json::to_vec(&line) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot serialise an audit record");
                return;
            }
        };
        bytes.push(b'\n');
        let Ok(mut out) = self.out.lock() else {
            tracing::warn!("audit log lock poisoned; record dropped");
            return;
        };
        if let Err(e) = out.write_all(&bytes).and_then(|()| out.flush()) {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot write the audit log");
        }
    }
}

/// A record written when the exchange ends: held by the request and response bodies, written on the last drop,
/// with the bytes each body counted.
pub struct Pending {
    log: Arc<AuditLog>,
    event: Mutex<Event>,
    start: Instant,
    pub up: AtomicU64,
    pub down: AtomicU64,
}

impl Pending {
    pub fn new(log: Arc<AuditLog>, event: Event, start: Instant) -> Arc<Self> {
        Arc::new(Self {
            log,
            event: Mutex::new(event),
            start,
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
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
    fn drop(&mut self) {
        let mut event = match self.event.get_mut() {
            Ok(e) => std::mem::take(e),
            Err(poisoned) => std::mem::take(poisoned.into_inner()),
        };
        event.bytes_up = self.up.load(Ordering::Relaxed);
        event.bytes_down = self.down.load(Ordering::Relaxed);
        event.duration_ms = elapsed_ms(self.start);
        self.log.write(&event);
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
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["bottle"], "b1");
        assert_eq!(v["decision"], "allow");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
