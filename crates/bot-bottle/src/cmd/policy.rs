//! `policy check`: validate a policy and print the effective policy, or the one error that stops it.

use anyhow::Context;
use bottle_policy::Effective;

use crate::cli::PolicyCheckArgs;
use crate::output::Output;

pub fn check(args: &PolicyCheckArgs, out: &Output) -> anyhow::Result<u8> {
    let (policy, file) = args.policy.load(args.file.as_deref())?;
    let effective = Effective::of(&policy);
    let source = file.map_or_else(|| "the agent preset and flags".to_string(), |f| f.display().to_string());
    let toml = effective.to_toml().context("cannot render the effective policy")?;
    out.emit(&effective, || format!("# {source}: ok. The effective policy:\n{toml}"))?;
    Ok(0)
}
