//! `[network] unknown`, `ask_timeout` and `[network.ask] reviewer` (and `--ask`): ask mode, or none of it. A
//! setting that would do nothing (a reviewer or a timeout without ask mode) is refused rather than ignored.

use std::time::Duration;

use super::{R, Validator};
use crate::model::{Ask, Network, Unknown};
use crate::raw::RawNetwork;

impl Validator<'_> {
    pub(super) fn ask(&self, raw: &RawNetwork, network: &mut Network) -> R<()> {
        network.unknown = match &raw.unknown {
            None => Unknown::Deny,
            Some(u) => self.at(u, |s| match s.as_str() {
                "deny" => Ok(Unknown::Deny),
                "ask" => Ok(Unknown::Ask),
                other => Err(format!("unknown `{other}`; expected \"deny\" or \"ask\"")),
            })?,
        };
        if self.overrides.ask {
            network.unknown = Unknown::Ask;
        }
        let asking = network.unknown == Unknown::Ask;
        if let Some(t) = &raw.ask_timeout {
            let secs = self.at(t, |n| {
                u64::try_from(*n)
                    .ok()
                    .filter(|n| (1..=Ask::MAX_TIMEOUT_SECS).contains(n))
                    .ok_or_else(|| format!("ask_timeout must be 1 to {} seconds", Ask::MAX_TIMEOUT_SECS))
            })?;
            if !asking {
                return Err(self.err(
                    t.span(),
                    "ask_timeout does nothing unless unknown = \"ask\" (or `run --ask`); remove it or set unknown",
                ));
            }
            network.ask.timeout = Duration::from_secs(secs);
        }
        if let Some(ask) = &raw.ask {
            if !asking {
                return Err(self.err(
                    ask.span(),
                    "[network.ask] does nothing unless unknown = \"ask\" (or `run --ask`); remove it or set unknown",
                ));
            }
            if let Some(reviewer) = &ask.get_ref().reviewer {
                let argv: Vec<String> = reviewer.get_ref().iter().map(|a| a.get_ref().clone()).collect();
                self.at(reviewer, |_| check_reviewer(&argv))?;
                network.ask.reviewer = Some(argv);
            }
        }
        Ok(())
    }
}

fn check_reviewer(argv: &[String]) -> Result<(), String> {
    match argv.first() {
        None => Err("reviewer is empty; give the command and its arguments, e.g. [\"/usr/local/bin/review\"]".into()),
        Some(cmd) if cmd.is_empty() => Err("reviewer's command is empty".into()),
        Some(_) if argv.iter().any(|a| a.contains('\0')) => Err("reviewer holds a NUL byte".into()),
        Some(_) => Ok(()),
    }
}
