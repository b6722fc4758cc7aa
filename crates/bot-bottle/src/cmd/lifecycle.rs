//! `run`, `ls`, `exec`, `logs`, `stop`, `rm`: the bottle lifecycle. Until the launch recipe lands (issue #4) these
//! say so plainly and exit 120; `run` still validates its policy first, so a bad policy is reported as such.

use crate::cli::RunArgs;
use crate::exit::Unavailable;

const REASON: &str = "the launch recipe and the namespace backend land with issue #4";

pub fn run(args: &RunArgs) -> anyhow::Result<u8> {
    let _ = args.policy.load(None)?;
    Err(Unavailable {
        verb: "run",
        reason: REASON,
    }
    .into())
}

pub fn unavailable(verb: &'static str) -> anyhow::Result<u8> {
    Err(Unavailable { verb, reason: REASON }.into())
}
