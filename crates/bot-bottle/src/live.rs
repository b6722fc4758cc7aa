//! Live policy changes to a running bottle (#16): its supervisor listens on `STATE_DIR/control.sock` (0600, in the
//! 0700 state directory, never shown in the bottle) and takes one change per connection from the bottle's owner:
//! `allow ENTRY` or `deny ENTRY`. A change is validated as a policy file would be (the effective policy plus the
//! entry, through the policy loader: same errors, same over-broad refusals), swapped into the proxy for new
//! requests at once, written to the policy snapshot and recorded in the audit log with who asked.
//!
//! Trusts the kernel's peer credentials: a connection from any uid but the launcher's is refused before it is read.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bottle_policy::{Effective, Overrides, Policy, Source};
use bottle_proxy::Proxy;
use bottle_sandbox::state::{self, StateDir};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The control socket's name in a bottle's state directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The most a request may hold.
const MAX_REQUEST_BYTES: usize = 4096;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// `allow` or `deny`.
    pub op: String,
    /// As `--allow` / `--deny` take it.
    pub entry: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The effective policy after the change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// Binds the control socket (0600) and serves it on `handle` for as long as the runtime lives.
pub fn serve(handle: &tokio::runtime::Handle, dir: &StateDir, proxy: Proxy, policy: Policy) -> std::io::Result<()> {
    let path = dir.file(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = {
        let _in_runtime = handle.enter();
        tokio::net::UnixListener::bind(&path)?
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let owner = rustix::process::geteuid().as_raw();
    let current = Arc::new(Mutex::new(policy));
    let snapshot = dir.path.clone();
    handle.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let peer = stream.peer_cred().map(|c| c.uid()).ok();
            let (proxy, current, snapshot) = (proxy.clone(), Arc::clone(&current), snapshot.clone());
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let answer = if peer != Some(owner) {
                    Answer::refused(format!("only uid {owner} may change this bottle"))
                } else {
                    let mut line = String::new();
                    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES as u64);
                    match reader.read_line(&mut line).await {
                        Ok(_) => apply(&line, &proxy, &current, &snapshot, owner),
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

impl Answer {
    fn refused(error: String) -> Self {
        Self {
            error: Some(error),
            policy: None,
        }
    }
}

fn apply(line: &str, proxy: &Proxy, current: &Mutex<Policy>, dir: &Path, uid: u32) -> Answer {
    let change: Change = match serde_json::from_str(line.trim()) {
        Ok(c) => c,
        Err(e) => return Answer::refused(format!("not a change: {e}")),
    };
    let mut overrides = Overrides::default();
    match change.op.as_str() {
        "allow" => overrides.allow.push(change.entry.clone()),
        "deny" => overrides.deny.push(change.entry.clone()),
        other => return Answer::refused(format!("unknown change `{other}`: allow or deny")),
    }
    let Ok(mut current) = current.lock() else {
        return Answer::refused("the bottle's policy is unavailable".into());
    };
    let text = match Effective::of(&current).to_toml() {
        Ok(t) => t,
        Err(e) => return Answer::refused(format!("cannot render the bottle's policy: {e}")),
    };
    // The same loader as a policy file: a change it refuses is refused here, with its reason.
    let mut next = match bottle_policy::from_str(
        &Source {
            text: &text,
            path: None,
        },
        &overrides,
    ) {
        Ok(p) => p,
        Err(e) => return Answer::refused(e.to_string()),
    };
    // Only the network changes: credentials stay as resolved at launch (the bottle holds their placeholders), and
    // so does everything the bottle already is.
    next.credentials = current.credentials.clone();
    next.bottle = current.bottle.clone();
    let rendered = Effective::of(&next).to_toml().unwrap_or_default();
    let dir = StateDir {
        path: dir.to_path_buf(),
    };
    if let Err(e) = dir.write_file(state::POLICY_FILE, rendered.as_bytes()) {
        return Answer::refused(format!("cannot record the change: {e}"));
    }
    proxy.reload(next.clone());
    proxy.record_change(&format!("live-{} {} by uid {uid}", change.op, change.entry));
    *current = next;
    Answer {
        error: None,
        policy: Some(rendered),
    }
}
