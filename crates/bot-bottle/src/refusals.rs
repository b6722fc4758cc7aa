//! What the proxy refused, told where the user looks: a short summary on stderr when a run ends (host, why, the
//! exact flag or policy line that would allow it), and the audit log as a table for `logs --egress`.
//!
//! Real clients show little of a refusal (`npm error 403 Forbidden`, cargo's "CONNECT tunnel failed, response 403");
//! the remedy is in the proxy's answer headers and the audit log, so it is brought here.

use bottle_sandbox::backend::SELFTEST_HOST;
use bottle_sandbox::state::{AUDIT_FILE, StateDir};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};

/// Refusals of one kind: same host, port and rule.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub host: String,
    pub port: u64,
    pub rule: String,
    pub addr: Option<String>,
    pub hint: Option<String>,
    pub count: usize,
}

/// The agent's lines of a bottle's audit log (opened without following a link planted in its place), as JSON; the
/// launch self-test's own probe is bot-bottle's request, not the agent's, and is left out. `ls` counts them, the
/// end-of-run summary groups the refusals.
pub fn agent_lines(dir: &StateDir) -> impl Iterator<Item = serde_json::Value> {
    let file = dir.open_log(AUDIT_FILE).ok();
    file.into_iter()
        .flat_map(|f| BufReader::new(f).lines().map_while(Result::ok))
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
        .filter(|v| v["host"] != SELFTEST_HOST)
}

/// The refusals in a bottle's audit log, grouped, most frequent first.
pub fn read(dir: &StateDir) -> Vec<Refused> {
    let mut groups: BTreeMap<(String, u64, String), Refused> = BTreeMap::new();
    for v in agent_lines(dir) {
        if v["decision"] != "deny" || v["event"] == "unrecorded" {
            continue;
        }
        let text = |k: &str| v[k].as_str().map(str::to_string);
        let key = (
            text("host").unwrap_or_default(),
            v["port"].as_u64().unwrap_or(0),
            text("rule").unwrap_or_default(),
        );
        let entry = groups.entry(key.clone()).or_insert_with(|| Refused {
            host: key.0,
            port: key.1,
            rule: key.2,
            addr: text("addr"),
            hint: text("hint"),
            count: 0,
        });
        entry.count += 1;
    }
    let mut out: Vec<Refused> = groups.into_values().collect();
    out.sort_by_key(|r| std::cmp::Reverse(r.count));
    out
}

/// The end-of-run summary, or nothing when nothing was refused.
pub fn summary(refused: &[Refused], bottle: &str, kept: bool) -> Option<String> {
    let total: usize = refused.iter().map(|r| r.count).sum();
    if total == 0 {
        return None;
    }
    let mut t = format!(
        "bot-bottle: the egress proxy refused {total} request{} in this run:\n",
        if total == 1 { "" } else { "s" }
    );
    const SHOWN: usize = 10;
    for r in refused.iter().take(SHOWN) {
        let target = if r.host.is_empty() {
            "(malformed request)".to_string()
        } else {
            format!("{}:{}", r.host, r.port)
        };
        let times = if r.count > 1 {
            format!(" ×{}", r.count)
        } else {
            String::new()
        };
        let addr = r
            .addr
            .as_ref()
            .map_or_else(String::new, |a| format!(" (resolves to {a})"));
        let _ = writeln!(t, "  {target}{addr}: {}{times}", r.rule);
        if let Some(hint) = &r.hint {
            let _ = writeln!(t, "      allow with: {hint}");
        }
    }
    if refused.len() > SHOWN {
        let _ = writeln!(t, "  … and {} more kinds", refused.len() - SHOWN);
    }
    if kept {
        let _ = writeln!(t, "every refusal: bot-bottle logs {bottle} --denied");
    }
    Some(t)
}

/// One audit line as a row of `logs --egress` (None: not a JSON line, shown as is by the caller).
pub fn row(line: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let time = s("time").get(11..19).unwrap_or("").to_string();
    let event = s("event");
    let target = match v["port"].as_u64() {
        Some(p) if p != 0 => format!("{}:{p}", s("host")),
        _ => s("host"),
    };
    if event == "end" {
        let status = v["status"].as_u64().map_or_else(|| "-".to_string(), |c| c.to_string());
        return Some(format!(
            "{time}  {:<7} {:<32} {:<7} {:<30} {} ↑{} ↓{} {}ms{}",
            "end",
            target,
            s("method"),
            s("path"),
            status,
            v["bytes_up"].as_u64().unwrap_or(0),
            v["bytes_down"].as_u64().unwrap_or(0),
            v["duration_ms"].as_u64().unwrap_or(0),
            if v["outcome"] == "error" {
                format!(" error: {}", s("rule"))
            } else {
                String::new()
            }
        ));
    }
    let mut row = format!(
        "{time}  {:<7} {:<32} {:<7} {:<30} {}",
        s("decision"),
        target,
        s("method"),
        s("path"),
        s("rule")
    );
    if let Some(addr) = v["addr"].as_str().filter(|_| v["decision"] == "deny") {
        let _ = write!(row, " (resolves to {addr})");
    }
    if let Some(hint) = v["hint"].as_str() {
        let _ = write!(row, "  → {hint}");
    }
    Some(row)
}

pub const TABLE_HEADER: &str =
    "TIME      DECISION TARGET                           METHOD  PATH                           RULE";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_grouped_with_their_remedy_and_the_self_test_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit.jsonl");
        let deny = |host: &str, rule: &str| {
            format!(
                "{{\"event\":\"connect\",\"host\":\"{host}\",\"port\":443,\"decision\":\"deny\",\"rule\":\"{rule}\",\"hint\":\"bot-bottle run --allow {host}:443\"}}\n"
            )
        };
        let text = [
            deny("packages.example.org", "not-allowed"),
            deny("packages.example.org", "not-allowed"),
            deny(SELFTEST_HOST, "not-allowed"),
            "{\"event\":\"request\",\"host\":\"a.test\",\"port\":80,\"decision\":\"allow\",\"rule\":\"a.test\"}\n"
                .into(),
            "not json\n".into(),
        ]
        .concat();
        std::fs::write(&audit, text).unwrap();
        let refused = read(&StateDir {
            path: dir.path().to_path_buf(),
        });
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].count, 2);
        let shown = summary(&refused, "b1", true).unwrap();
        assert!(shown.contains("refused 2 requests"), "{shown}");
        assert!(shown.contains("packages.example.org:443: not-allowed ×2"), "{shown}");
        assert!(
            shown.contains("allow with: bot-bottle run --allow packages.example.org:443"),
            "{shown}"
        );
        assert!(shown.contains("bot-bottle logs b1 --denied"), "{shown}");
        assert!(summary(&[], "b1", true).is_none());
    }
}
