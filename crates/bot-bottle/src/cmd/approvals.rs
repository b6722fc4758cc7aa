//! `approvals [NAME]`: the requests running bottles hold in ask mode, oldest first; `approvals NAME ID DECISION`
//! answers one. Answers go through the bottle's control socket (its owner only); the first answer wins.

use std::fmt::Write as _;

use bottle_proxy::Decision;
use bottle_sandbox::state::{self, Status};
use serde::Serialize;

use crate::asks::Waiting;
use crate::cli::ApprovalsArgs;
use crate::cmd::live::ask_supervisor;
use crate::live::Change;
use crate::output::Output;

#[derive(Serialize)]
struct Row {
    bottle: String,
    #[serde(flatten)]
    waiting: Waiting,
}

pub fn run(args: &ApprovalsArgs, out: &Output) -> anyhow::Result<u8> {
    match (&args.name, args.id, &args.decision) {
        (Some(name), Some(id), Some(decision)) => answer(name, id, decision, args.reason.as_deref(), out),
        (None, Some(_), _) => Err(crate::exit::Usage(
            "name the bottle to answer: bot-bottle approvals NAME ID allow-once|allow|deny".into(),
        )
        .into()),
        (name, _, _) => list(name.as_deref(), out),
    }
}

fn answer(name: &str, id: u64, decision: &str, reason: Option<&str>, out: &Output) -> anyhow::Result<u8> {
    let decision = match decision {
        "allow-once" => Decision::AllowOnce,
        "allow" => Decision::Allow,
        _ => Decision::Deny,
    };
    let answer = ask_supervisor(
        name,
        &Change {
            op: "answer".into(),
            id: Some(id),
            decision: Some(decision),
            reason: reason.map(str::to_string),
            ..Change::default()
        },
    )?;
    if let Some(error) = answer.error {
        return Err(crate::exit::Usage(format!("{name}: {error}")).into());
    }
    out.emit(
        &serde_json::json!({ "bottle": name, "id": id, "decision": decision }),
        || format!("{name}: question {id} answered\n"),
    )?;
    Ok(0)
}

fn list(name: Option<&str>, out: &Output) -> anyhow::Result<u8> {
    let names: Vec<String> = match name {
        Some(n) => vec![n.to_string()],
        None => {
            let root = state::state_root()?;
            if !root.exists() {
                Vec::new()
            } else {
                state::list(&root)?
                    .into_iter()
                    .filter_map(Result::ok)
                    .filter(|s| s.is_live() && s.status == Status::Running)
                    .map(|s| s.name.to_string())
                    .collect()
            }
        }
    };
    let mut rows = Vec::new();
    let mut unreachable = Vec::new();
    for n in &names {
        match ask_supervisor(
            n,
            &Change {
                op: "pending".into(),
                ..Change::default()
            },
        ) {
            Ok(answer) => rows.extend(answer.pending.unwrap_or_default().into_iter().map(|w| Row {
                bottle: n.to_string(),
                waiting: w,
            })),
            // Naming one bottle that cannot answer is an error; while listing them all it is a note.
            Err(e) if name.is_some() => return Err(e),
            Err(e) => unreachable.push(format!("{n}: {e:#}")),
        }
    }
    out.emit(&rows, || {
        let mut t = String::new();
        if rows.is_empty() {
            t.push_str("nothing is waiting for an answer\n");
        }
        for r in &rows {
            let q = &r.waiting.question;
            let request = match (&q.method, &q.path) {
                (Some(m), Some(p)) => format!(" {m} {p}"),
                _ => String::new(),
            };
            let private = if q.private { ", a private address" } else { "" };
            let _ = writeln!(
                t,
                "{} #{}: {}:{}{request} ({}{private}), waiting {} s\n  answer: bot-bottle approvals {} {} allow-once|allow|deny",
                r.bottle, q.id, q.host, q.port, q.addr, r.waiting.waiting_s, r.bottle, q.id
            );
        }
        for u in &unreachable {
            let _ = writeln!(t, "  ! {u}");
        }
        t
    })?;
    Ok(0)
}
