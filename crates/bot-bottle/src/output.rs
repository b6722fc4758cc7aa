//! All user-facing output goes through here: text for people, one JSON document with `--json`.

use std::io::Write;

use serde::Serialize;

pub struct Output {
    json: bool,
}

impl Output {
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    /// True with `--json`: machine-readable output.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Prints a value: `text` for people, the serialised value with `--json`.
    pub fn emit<T: Serialize>(&self, value: &T, text: impl FnOnce() -> String) -> anyhow::Result<()> {
        let mut stdout = std::io::stdout().lock();
        if self.json {
            serde_json::to_writer_pretty(&mut stdout, value)?;
            writeln!(stdout)?;
        } else {
            write!(stdout, "{}", text())?;
        }
        stdout.flush()?;
        Ok(())
    }

    /// The error of a failed command, on stderr.
    pub fn error(&self, err: &anyhow::Error, code: u8) {
        let mut stderr = std::io::stderr().lock();
        if self.json {
            let mut detail = serde_json::json!({
                "kind": crate::exit::kind(code),
                "exit_code": code,
                "message": message(err),
            });
            if let Some(p) = err.chain().find_map(|c| c.downcast_ref::<bottle_policy::PolicyError>()) {
                detail["where"] = serde_json::Value::String(p.where_());
                detail["problem"] = serde_json::Value::String(p.message.clone());
            }
            let _ = writeln!(stderr, "{}", serde_json::json!({ "error": detail }));
        } else {
            let _ = writeln!(stderr, "error: {}", message(err));
        }
    }
}

/// The error and its causes joined by `: `, leaving out a cause whose words the message already holds (an error that
/// shows its source in its own text would otherwise say it twice).
pub fn message(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let words = cause.to_string();
        if text.contains(&words) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&words);
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let inner = std::io::Error::other("no such host");
        let err = anyhow::Error::new(inner).context("pull failed (no such host)");
        assert_eq!(super::message(&err), "pull failed (no such host)");
        let err = anyhow::Error::new(std::io::Error::other("EOF")).context("cannot load");
        assert_eq!(super::message(&err), "cannot load: EOF");
    }
}
