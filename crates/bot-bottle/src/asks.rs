//! Ask mode's reviewers (#16): the questions a bottle's proxy holds, answered by whichever comes first of the
//! user (`bot-bottle approvals`, through the control socket) and the policy's reviewer command. An `allow` answer
//! becomes a live change (`allow HOST:PORT`), a `deny` one too (`deny HOST`), so neither is asked again.
//!
//! The reviewer command gets one JSON object on stdin and must print one on stdout, `{"decision": "allow-once" |
//! "allow" | "deny", "reason": "…"}`, before the policy's `ask_timeout`; a non-zero exit, a timeout, or anything
//! else on stdout is a denial (with the cause as its reason). It runs on the host as the user who launched the
//! bottle, never in the bottle.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bottle_proxy::{Answer, Decision, Question, Reviewer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, oneshot};

use crate::live::Live;

/// Reviewer commands running at once; further questions wait their turn (their timeout still runs).
const MAX_REVIEWERS_AT_ONCE: usize = 16;
/// The most a reviewer may print.
const MAX_REVIEWER_OUTPUT: u64 = 64 * 1024;
/// Refusals shown to a reviewer command, newest last.
const RECENT_REFUSALS: usize = 10;

/// A question as `approvals` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Waiting {
    #[serde(flatten)]
    pub question: Question,
    /// How long it has waited, in seconds.
    pub waiting_s: u64,
}

struct Held {
    question: Question,
    since: Instant,
    reply: oneshot::Sender<(Answer, Stick)>,
}

/// Whether an answer is remembered for the bottle (a reviewer that failed denies this request only).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stick {
    AsAnswered,
    ThisRequestOnly,
}

/// The questions of one bottle (or one standalone proxy) and who may answer them.
pub struct Asks {
    bottle: String,
    /// For the recent refusals a reviewer command is shown.
    state_dir: PathBuf,
    command: Option<Vec<String>>,
    /// SECURITY: the real credentials' variables: a reviewer sees the question, never the secrets the proxy injects.
    secret_vars: Vec<String>,
    /// The proxy gives up on a question after this; a reviewer command still running then is killed.
    timeout: Duration,
    held: Mutex<BTreeMap<u64, Held>>,
    /// Set once the bottle's proxy runs; without it (a standalone proxy) `allow`/`deny` answers hold once.
    live: OnceLock<Arc<Live>>,
    reviewers: Arc<Semaphore>,
    /// Told whenever the questions change (the terminal prompt of an interactive run).
    watcher: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl Asks {
    /// `policy`'s ask settings; the variables its credentials are read from are kept from the reviewer command.
    pub fn new(bottle: &str, state_dir: PathBuf, policy: &bottle_policy::Policy) -> Arc<Self> {
        let ask = &policy.network.ask;
        let secret_vars = policy
            .credentials
            .iter()
            .filter_map(|c| match &c.source {
                bottle_policy::SecretSource::FromEnv(var) => Some(var.clone()),
                bottle_policy::SecretSource::FromFile(_) => None,
            })
            .collect();
        Arc::new(Self {
            secret_vars,
            bottle: bottle.to_string(),
            state_dir,
            command: ask.reviewer.clone(),
            timeout: ask.timeout,
            held: Mutex::new(BTreeMap::new()),
            live: OnceLock::new(),
            reviewers: Arc::new(Semaphore::new(MAX_REVIEWERS_AT_ONCE)),
            watcher: Mutex::new(None),
        })
    }

    /// A channel told whenever a question arrives or goes (one watcher; a new one replaces the old).
    pub fn watch(&self) -> std::sync::mpsc::Receiver<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.watcher.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
        rx
    }

    fn changed(&self) {
        if let Some(tx) = &*self.watcher.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            let _ = tx.send(());
        }
    }

    pub fn set_live(&self, live: Arc<Live>) {
        let _ = self.live.set(live);
    }

    /// What is waiting now, oldest first.
    pub fn waiting(&self) -> Vec<Waiting> {
        let held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        held.values()
            .map(|h| Waiting {
                question: h.question.clone(),
                waiting_s: h.since.elapsed().as_secs(),
            })
            .collect()
    }

    /// Answers question `id`; the first answer wins, later ones are told it is gone.
    pub fn answer(&self, id: u64, decision: Decision, reason: &str, by: &str) -> Result<(), String> {
        self.reply(id, decision, reason, by, Stick::AsAnswered)
    }

    fn reply(&self, id: u64, decision: Decision, reason: &str, by: &str, stick: Stick) -> Result<(), String> {
        let held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
        self.changed();
        let Some(held) = held else {
            return Err(format!(
                "no question {id} is waiting (answered already, timed out, or its request went away)"
            ));
        };
        let answer = Answer {
            decision,
            reason: reason.to_string(),
            by: by.to_string(),
        };
        held.reply
            .send((answer, stick))
            .map_err(|_| format!("question {id}'s request went away"))
    }

    /// Makes an answer stick for the bottle: `allow` allows the host and port, `deny` denies the host. A change the
    /// live policy refuses turns an `allow` into `allow-once` (and a `deny` into a one-time denial), saying why.
    fn remember(&self, question: &Question, mut answer: Answer) -> Answer {
        let (op, entry) = match answer.decision {
            Decision::AllowOnce => return answer,
            Decision::Allow => ("allow", format!("{}:{}", question.host, question.port)),
            Decision::Deny => ("deny", question.host.clone()),
        };
        let outcome = match self.live.get() {
            Some(live) => live.change(op, &entry, &answer.by),
            None => Err("no live policy here".into()),
        };
        if let Err(why) = outcome {
            if answer.decision == Decision::Allow {
                answer.decision = Decision::AllowOnce;
            }
            answer.reason = format!("{} (for this request only: {why})", answer.reason);
        }
        answer
    }

    fn run_command(self: &Arc<Self>, question: &Question) {
        let Some(argv) = self.command.clone() else { return };
        let (me, question) = (Arc::clone(self), question.clone());
        tokio::spawn(async move {
            let Ok(_turn) = Arc::clone(&me.reviewers).acquire_owned().await else {
                return;
            };
            if !me.is_held(question.id) {
                return;
            }
            let input = me.reviewer_input(&question);
            let hidden = me.secret_vars.clone();
            // The proxy's own timeout answers first (as `timeout`); this one only makes sure the reviewer is killed.
            let limit = me.timeout + Duration::from_secs(1);
            let (decision, reason, stick) =
                match tokio::time::timeout(limit, run_reviewer(&argv, &hidden, &input)).await {
                    Ok(Ok(said)) => (said.decision, said.reason, Stick::AsAnswered),
                    Ok(Err(why)) => (Decision::Deny, why, Stick::ThisRequestOnly),
                    Err(_) => (
                        Decision::Deny,
                        "the reviewer did not answer in time; killed".into(),
                        Stick::ThisRequestOnly,
                    ),
                };
            let by = format!("reviewer {}", argv[0]);
            let _ = me.reply(question.id, decision, &reason, &by, stick);
        });
    }

    fn is_held(&self, id: u64) -> bool {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&id)
    }

    fn reviewer_input(&self, question: &Question) -> String {
        let dir = bottle_sandbox::state::StateDir {
            path: self.state_dir.clone(),
        };
        let mut refusals: Vec<serde_json::Value> = crate::refusals::agent_lines(&dir)
            .filter(|v| v["decision"] == "deny")
            .map(|v| {
                serde_json::json!({
                    "time": v["time"], "host": v["host"], "port": v["port"], "method": v["method"],
                    "path": v["path"], "rule": v["rule"],
                })
            })
            .collect();
        let keep = refusals.len().saturating_sub(RECENT_REFUSALS);
        refusals.drain(..keep);
        let input = ReviewerInput {
            bottle: &self.bottle,
            question,
            recent_refusals: refusals,
        };
        let mut text = serde_json::to_string(&input).unwrap_or_default();
        text.push('\n');
        text
    }
}

/// What a reviewer command reads: the bottle, the question's fields, then the bottle's latest refusals.
#[derive(Serialize)]
struct ReviewerInput<'a> {
    bottle: &'a str,
    #[serde(flatten)]
    question: &'a Question,
    recent_refusals: Vec<serde_json::Value>,
}

/// Takes the question off the table when the proxy stops waiting (answered, timed out, or the request went away).
struct Unhold<'a>(&'a Asks, u64);

impl Drop for Unhold<'_> {
    fn drop(&mut self) {
        self.0
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.1);
        self.0.changed();
    }
}

/// The proxy's handle on a bottle's questions.
pub struct Reviewing(pub Arc<Asks>);

impl Reviewer for Reviewing {
    fn review(&self, question: Question) -> Pin<Box<dyn Future<Output = Answer> + Send>> {
        let me = Arc::clone(&self.0);
        Box::pin(async move {
            let (reply, answered) = oneshot::channel();
            let id = question.id;
            me.held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(
                    id,
                    Held {
                        question: question.clone(),
                        since: Instant::now(),
                        reply,
                    },
                );
            let _unhold = Unhold(&me, id);
            me.changed();
            me.run_command(&question);
            match answered.await {
                Ok((answer, Stick::AsAnswered)) => me.remember(&question, answer),
                Ok((answer, Stick::ThisRequestOnly)) => answer,
                Err(_) => Answer {
                    decision: Decision::Deny,
                    reason: "the question was dropped".into(),
                    by: "bot-bottle".into(),
                },
            }
        })
    }
}

/// Kills a reviewer's process group when dropped.
struct KillGroup(Option<rustix::process::Pid>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    }
}

/// What a reviewer command must print.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Said {
    decision: Decision,
    #[serde(default)]
    reason: String,
}

/// Runs the reviewer once: `Ok` only for a zero exit with exactly one JSON answer on stdout. Killed when the
/// question is given up (the task holding it is dropped with the child).
async fn run_reviewer(argv: &[String], hidden: &[String], input: &str) -> Result<Said, String> {
    let mut command = tokio::process::Command::new(&argv[0]);
    for var in hidden {
        command.env_remove(var);
    }
    let mut child = command
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run the reviewer {}: {e}", argv[0]))?;
    // Whatever the reviewer started goes with it, answered or given up on: nothing is left running.
    let _group = KillGroup(child.id().and_then(|id| rustix::process::Pid::from_raw(id as i32)));
    if let Some(mut stdin) = child.stdin.take() {
        // A reviewer that does not read its question still answers; a closed pipe is not an error here.
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    let mut out = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        stdout
            .take(MAX_REVIEWER_OUTPUT)
            .read_to_end(&mut out)
            .await
            .map_err(|e| format!("cannot read the reviewer's answer: {e}"))?;
    }
    let status = child
        .wait()
        .await
        .map_err(|e| format!("cannot wait for the reviewer: {e}"))?;
    if !status.success() {
        return Err(format!("the reviewer failed ({status})"));
    }
    let text = String::from_utf8_lossy(&out);
    serde_json::from_str::<Said>(text.trim()).map_err(|e| {
        format!(
            "the reviewer's answer is not {{\"decision\": \"allow-once\" | \"allow\" | \"deny\", \"reason\": …}}: {e}"
        )
    })
}
