//! The one line a probe prints: `{"case", "escaped", "evidence"}` plus an optional `detail` object, and the ways a
//! probe can fail to make its attempt at all (bad usage, or an attempt that could not be set up).

use serde_json::Value;

/// What one attempt found.
#[derive(Debug)]
pub struct Verdict {
    case: &'static str,
    escaped: bool,
    evidence: String,
    detail: Value,
}

impl Verdict {
    pub fn new(case: &'static str, escaped: bool, evidence: impl Into<String>) -> Self {
        Self {
            case,
            escaped,
            evidence: evidence.into(),
            detail: Value::Null,
        }
    }

    /// The confinement held: the attempt was made and failed.
    pub fn held(case: &'static str, evidence: impl Into<String>) -> Self {
        Self::new(case, false, evidence)
    }

    /// The attempt got through.
    pub fn escaped(case: &'static str, evidence: impl Into<String>) -> Self {
        Self::new(case, true, evidence)
    }

    /// Structured facts beside the evidence (status codes, timings, lists), for the suite's own assertions.
    pub fn with(mut self, detail: Value) -> Self {
        self.detail = detail;
        self
    }

    pub fn to_json(&self) -> String {
        let mut v = serde_json::json!({
            "case": self.case,
            "escaped": self.escaped,
            "evidence": self.evidence,
        });
        if !self.detail.is_null() {
            v["detail"] = self.detail.clone();
        }
        v.to_string()
    }
}

/// Why no verdict was printed. Neither is ever a pass.
#[derive(Debug)]
pub enum Failure {
    /// Unknown case or wrong arguments (exit 2).
    Usage(String),
    /// The attempt could not be set up, so it proves nothing either way (exit 3).
    CannotRun(String),
}

pub type Outcome = Result<Verdict, Failure>;

pub fn usage(msg: impl Into<String>) -> Failure {
    Failure::Usage(msg.into())
}

pub fn cannot_run(msg: impl Into<String>) -> Failure {
    Failure::CannotRun(msg.into())
}
