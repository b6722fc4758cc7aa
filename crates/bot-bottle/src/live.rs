//! Live policy changes to a running bottle (#16): its supervisor listens on `STATE_DIR/control.sock` (0600, in the
//! 0700 state directory, never shown in the bottle) and takes one request per connection from the bottle's owner:
//! `allow ENTRY` or `deny ENTRY`, and for ask mode `pending` and `answer ID DECISION`. A change is validated as a
//! policy file would be (the effective policy plus the entry, through the policy loader: same errors, same
//! over-broad refusals), swapped into the proxy for new requests at once, written to the policy snapshot and
//! recorded in the audit log with who asked.
//!
//! Trusts the kernel's peer credentials: a connection from any uid but the launcher's is refused before it is read.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bottle_policy::{Effective, Overrides, Policy, Source};
use bottle_proxy::{Decision, Proxy};
use bottle_sandbox::state::{self, StateDir};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::asks::{Asks, Waiting};

/// The control socket's name in a bottle's state directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The most a request may hold.
const MAX_REQUEST_BYTES: usize = 4096;

/// One request on the control socket.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// `allow`, `deny`, `pending` or `answer`.
    pub op: String,
    /// For `allow` / `deny`: as `--allow` / `--deny` take it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub entry: String,
    /// For `answer`: the question's id (as `pending` lists it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The effective policy after the change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// For `pending`: the questions waiting for an answer, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<Vec<Waiting>>,
}

impl Answer {
    fn refused(error: String) -> Self {
        Self {
            error: Some(error),
            ..Self::default()
        }
    }
}

/// A running bottle's policy as it is now, and the one way to change it.
pub struct Live {
    proxy: Proxy,
    current: Mutex<Policy>,
    dir: PathBuf,
}

impl Live {
    pub fn new(proxy: Proxy, policy: Policy, dir: &StateDir) -> Self {
        Self {
            proxy,
            current: Mutex::new(policy),
            dir: dir.path.clone(),
        }
    }

    /// `allow` or `deny` one entry, asked by `who`. `Err` says why it was refused (nothing changed then).
    pub fn change(&self, op: &str, entry: &str, who: &str) -> Result<String, String> {
        let mut overrides = Overrides::default();
        match op {
            "allow" => overrides.allow.push(entry.to_string()),
            "deny" => overrides.deny.push(entry.to_string()),
            other => return Err(format!("unknown change `{other}`: allow or deny")),
        }
        let mut current = self
            .current
            .lock()
            .map_err(|_| "the bottle's policy is unavailable".to_string())?;
        let text = Effective::of(&current)
            .to_toml()
            .map_err(|e| format!("cannot render the bottle's policy: {e}"))?;
        // The same loader as a policy file: a change it refuses is refused here, with its reason.
        let mut next = bottle_policy::from_str(
            &Source {
                text: &text,
                path: None,
            },
            &overrides,
        )
        .map_err(|e| e.to_string())?;
        // Only the network changes: credentials stay as resolved at launch (the bottle holds their placeholders),
        // and so does everything the bottle already is.
        next.credentials = current.credentials.clone();
        next.bottle = current.bottle.clone();
        let rendered = Effective::of(&next).to_toml().unwrap_or_default();
        let dir = StateDir { path: self.dir.clone() };
        dir.write_file(state::POLICY_FILE, rendered.as_bytes())
            .map_err(|e| format!("cannot record the change: {e}"))?;
        self.proxy.reload(next.clone());
        self.proxy.record_change(&format!("live-{op} {entry} by {who}"));
        *current = next;
        Ok(rendered)
    }
}

/// Binds the control socket (0600) and serves it on `handle` for as long as the runtime lives.
pub fn serve(handle: &tokio::runtime::Handle, dir: &StateDir, live: Arc<Live>, asks: Arc<Asks>) -> std::io::Result<()> {
    let path = dir.file(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = {
        let _in_runtime = handle.enter();
        tokio::net::UnixListener::bind(&path)?
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let owner = rustix::process::geteuid().as_raw();
    handle.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let peer = stream.peer_cred().map(|c| c.uid()).ok();
            let (live, asks) = (Arc::clone(&live), Arc::clone(&asks));
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let answer = if peer != Some(owner) {
                    Answer::refused(format!("only uid {owner} may change this bottle"))
                } else {
                    let mut line = String::new();
                    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES as u64);
                    match reader.read_line(&mut line).await {
                        Ok(_) => handle_request(&line, &live, &asks, owner),
                        Err(e) => Answer::refused(format!("cannot read the request: {e}")),
                    }
                };
                let mut text = serde_json::to_string(&answer).unwrap_or_default();
                text.push('\n');
                let _ = write.write_all(text.as_bytes()).await;
            });
        }
    });
    Ok(())
}

fn handle_request(line: &str, live: &Live, asks: &Asks, uid: u32) -> Answer {
    let change: Change = match serde_json::from_str(line.trim()) {
        Ok(c) => c,
        Err(e) => return Answer::refused(format!("not a request: {e}")),
    };
    match change.op.as_str() {
        "pending" => Answer {
            pending: Some(asks.waiting()),
            ..Answer::default()
        },
        "answer" => {
            let (Some(id), Some(decision)) = (change.id, change.decision) else {
                return Answer::refused("an answer needs an id and a decision".into());
            };
            let reason = change.reason.unwrap_or_else(|| "answered by the user".into());
            match asks.answer(id, decision, &reason, &format!("approvals (uid {uid})")) {
                Ok(()) => Answer::default(),
                Err(e) => Answer::refused(e),
            }
        }
        op => match live.change(op, &change.entry, &format!("uid {uid}")) {
            Ok(policy) => Answer {
                policy: Some(policy),
                ..Answer::default()
            },
            Err(e) => Answer::refused(e),
        },
    }
}
