//! Ask mode (`[network] unknown = "ask"`): a request for a host the policy does not cover is held while a
//! reviewer answers allow-once, allow or deny, up to the policy's `ask_timeout` (a timeout denies). Who reviews
//! (the user's `approvals`, a reviewer command) is the embedder's business, behind `Reviewer`.
//!
//! SECURITY: only a *named* host the policy does not mention is ever asked, and only once its resolution passed the
//! address check: IP literals, private answers, denied hosts, rule refusals and placeholder leaks are refused as in
//! deny mode, before any reviewer sees them. Every question and every answer is an audit line (`ask`, then
//! `approved-once` | `approved` | `denied-by-reviewer` | `timeout` | `withdrawn`); nothing is forwarded before the
//! answer's line is on disk.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bottle_policy::address::private_kind;
use bottle_policy::host::{HostPattern, PatternUse};
use bottle_policy::{HostRule, Origin, Policy, TlsMode, Unknown};
use serde::{Deserialize, Serialize};

use crate::audit::{self, Event, Verdict};
use crate::decide::{DenyReason, Target};
use crate::proxy::Proxy;
use crate::upstream::{self, Checked};

/// Answers the questions of ask mode. The answer for `Decision::Allow` is given once the host is allowed for the
/// rest of the bottle's life (the reviewer makes that change); the proxy lets the asked request through either way.
pub trait Reviewer: Send + Sync + 'static {
    fn review(&self, question: Question) -> Pin<Box<dyn Future<Output = Answer> + Send>>;
}

/// What a reviewer is asked. Every field came from the bottle except `addr`/`private` (the proxy's resolution).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Question {
    /// Unique in this proxy's audit log (`"ask"` on the `ask` line and on its answer's line).
    pub id: u64,
    pub host: String,
    pub port: u16,
    /// Only for plain HTTP: inside TLS the host is asked before any request is seen.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<String>,
    /// The address the request would go to.
    pub addr: String,
    /// Whether that address is in a private range (reachable only because an allow_cidr covers it).
    pub private: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// This request (or this tunnel) only; the next one asks again.
    AllowOnce,
    /// This and every later request to the host and port, for the rest of the bottle's life.
    Allow,
    /// Refused, and the host denied for the rest of the bottle's life.
    Deny,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub decision: Decision,
    /// Why, in the reviewer's words (shown in the audit log).
    pub reason: String,
    /// Who answered: `approvals (uid 1000)`, `reviewer /usr/local/bin/review`.
    pub by: String,
}

/// A host the reviewer let through: the rule its requests are judged by (every method and path; the bottle's
/// credentials are still never sent there, and a placeholder sent there is still a leak).
pub(crate) struct Granted {
    pub rule: Arc<HostRule>,
    pub checked: Checked,
}

/// Whether a refusal for `reason` would be asked under `policy` instead.
pub(crate) fn asks(proxy: &Proxy, policy: &Policy, target: &Target, reason: &DenyReason) -> bool {
    policy.network.unknown == Unknown::Ask
        && proxy.inner.reviewer.is_some()
        && *reason == DenyReason::HostNotAllowed
        && matches!(target, Target::Name(_))
}

/// Holds the request while the reviewer answers. `event` is the caller's decision record: the `ask` line is made
/// from it, and the answer is put into it (`ask`, `reviewer`, and for an approval the rule `approved-once` or
/// `approved`); the caller writes it as the request's one decision line, a refusal (`denied-by-reviewer`,
/// `timeout`) through its usual refusal path.
pub(crate) async fn ask(
    proxy: &Proxy,
    policy: &Policy,
    event: &mut Event,
    target: &Target,
    port: u16,
    request: Option<(&str, &str)>,
) -> Result<Granted, DenyReason> {
    let (Some(reviewer), Target::Name(name)) = (proxy.inner.reviewer.as_ref(), target) else {
        return Err(DenyReason::HostNotAllowed);
    };
    let limits = &proxy.inner.limits;
    // A private answer is refused as in deny mode, never asked; a name that does not resolve is not asked either.
    let checked = match upstream::resolve(&policy.network, target, port, limits.connect_timeout).await {
        Ok(c) => c,
        Err(e) => return Err(e.as_denial().unwrap_or(DenyReason::HostNotAllowed)),
    };
    let addr = checked.first().ip();
    let id = proxy.inner.audit.next_id();
    let question = Question {
        id,
        host: target.to_string(),
        port,
        method: request.map(|(m, _)| m.to_string()),
        path: request.map(|(_, p)| p.to_string()),
        addr: addr.to_string(),
        private: private_kind(addr).is_some(),
    };
    event.ask = Some(id);
    event.addr = Some(question.addr.clone());
    let line = Event {
        event: "ask",
        decision: Verdict::Ask,
        rule: DenyReason::HostNotAllowed.code().into(),
        ..event.clone()
    };
    // Nothing is held that is not on record.
    if proxy.inner.audit.write(&line).is_err() {
        return Err(DenyReason::HostNotAllowed);
    }
    let mut open = Open {
        proxy,
        line,
        start: Instant::now(),
        done: false,
    };
    let answer = tokio::time::timeout(policy.network.ask.timeout, reviewer.review(question)).await;
    open.done = true;
    let answer = match answer {
        Ok(a) => a,
        Err(_) => {
            let secs = policy.network.ask.timeout.as_secs();
            event.reviewer = Some(format!("no answer within {secs} s"));
            return Err(DenyReason::AskTimeout { secs });
        }
    };
    let said = format!("{}: {}", answer.by, one_line(&answer.reason));
    event.reviewer = Some(said.clone());
    let label = match answer.decision {
        Decision::Deny => return Err(DenyReason::Reviewer { reason: said }),
        Decision::AllowOnce => "approved-once",
        Decision::Allow => "approved",
    };
    event.rule = label.into();
    let pattern =
        HostPattern::parse(&format!("{name}:{port}"), PatternUse::Allow).map_err(|_| DenyReason::BadTarget)?;
    Ok(Granted {
        rule: Arc::new(HostRule {
            pattern,
            tls: TlsMode::Intercept,
            rules: Vec::new(),
            upgrades: Vec::new(),
            origin: Origin::Flag,
        }),
        checked,
    })
}

/// A question whose request went away before its answer (the client hung up): its `withdrawn` line, so that every
/// `ask` line has an answer.
struct Open<'a> {
    proxy: &'a Proxy,
    line: Event,
    start: Instant,
    done: bool,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.line.decision = Verdict::Deny;
            self.line.rule = "withdrawn".into();
            self.line.reviewer = Some("the request went away before an answer".into());
            self.line.duration_ms = audit::elapsed_ms(self.start);
            let _ = self.proxy.inner.audit.write(&self.line);
        }
    }
}

/// A reviewer's words on one line, bounded: they go into the audit log and the bottle's 403.
fn one_line(text: &str) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    match flat.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}
