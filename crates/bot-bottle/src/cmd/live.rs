//! `allow NAME ENTRY`, `deny NAME ENTRY`: change a running bottle's policy through its supervisor's control socket;
//! `policy show NAME`: the bottle's policy as it is now. A change the policy loader refuses is a policy error (121),
//! with the loader's reason.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::Context;
use bottle_policy::{BottleName, PolicyError};
use bottle_sandbox::state::{self, StateDir, Status};
use serde::Serialize;

use crate::cli::LiveArgs;
use crate::live::{Answer, CONTROL_SOCKET, Change};
use crate::output::Output;

/// How long the supervisor may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize)]
struct Changed<'a> {
    name: &'a str,
    op: &'a str,
    entry: &'a str,
    policy: String,
}

/// Sends one request to a running bottle's supervisor and reads its answer.
pub fn ask_supervisor(name: &str, change: &Change) -> anyhow::Result<Answer> {
    BottleName::parse(name).map_err(crate::exit::Usage)?;
    let dir = StateDir::open(&state::state_root()?, name)?;
    let s = dir.read()?;
    if !(s.is_live() && s.status == Status::Running) {
        return Err(state::StateError::NotRunning(name.to_string()).into());
    }
    let path = dir.file(CONTROL_SOCKET);
    let mut stream = UnixStream::connect(&path).with_context(|| format!("cannot reach {}", path.display()))?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .context("control socket")?;
    let mut request = serde_json::to_string(change)?;
    request.push('\n');
    stream
        .write_all(request.as_bytes())
        .context("cannot send the request")?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("the bottle's supervisor did not answer")?;
    serde_json::from_str(&line).context("the bottle's supervisor answered nonsense")
}

pub fn change(op: &str, args: &LiveArgs, out: &Output) -> anyhow::Result<u8> {
    let answer = ask_supervisor(
        &args.name,
        &Change {
            op: op.into(),
            entry: args.entry.clone(),
            ..Change::default()
        },
    )?;
    if let Some(error) = answer.error {
        return Err(PolicyError::whole_file(None, error).into());
    }
    let changed = Changed {
        name: &args.name,
        op,
        entry: &args.entry,
        policy: answer.policy.unwrap_or_default(),
    };
    out.emit(&changed, || {
        format!("{}: {op} {} (for new requests, now)\n", args.name, args.entry)
    })?;
    Ok(0)
}

pub fn show(name: &str, out: &Output) -> anyhow::Result<u8> {
    BottleName::parse(name).map_err(crate::exit::Usage)?;
    let dir = StateDir::open(&state::state_root()?, name)?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut dir
            .open_log(state::POLICY_FILE)
            .with_context(|| format!("cannot read {}", dir.file(state::POLICY_FILE).display()))?,
        &mut text,
    )?;
    // Where the lines came from: the launch's policy, then each change made while it runs, from the audit log.
    let changes: Vec<serde_json::Value> = crate::refusals::agent_lines(&dir)
        .filter(|v| v["event"] == "policy-change")
        .map(|v| serde_json::json!({ "time": v["time"], "change": v["rule"] }))
        .collect();
    let shown = || {
        let mut t = text.clone();
        if !changes.is_empty() {
            t.push_str("\n# Changed while running (the lines above include these):\n");
            for c in &changes {
                let change: String = c["change"]
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .filter(|c| !c.is_control())
                    .collect();
                t.push_str(&format!("#   {} {change}\n", c["time"].as_str().unwrap_or_default()));
            }
        }
        t
    };
    out.emit(
        &serde_json::json!({ "name": name, "policy": text, "changes": changes }),
        shown,
    )?;
    Ok(0)
}
