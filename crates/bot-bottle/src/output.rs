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
                "message": format!("{err:#}"),
            });
            if let Some(p) = err.chain().find_map(|c| c.downcast_ref::<bottle_policy::PolicyError>()) {
                detail["where"] = serde_json::Value::String(p.where_());
                detail["problem"] = serde_json::Value::String(p.message.clone());
            }
            let _ = writeln!(stderr, "{}", serde_json::json!({ "error": detail }));
        } else {
            let _ = writeln!(stderr, "error: {err:#}");
        }
    }
}
