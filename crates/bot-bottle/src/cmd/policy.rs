//! `policy check`: validate a policy and print the effective policy, or the one error that stops it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use bottle_policy::Effective;

use crate::cli::PolicyCheckArgs;
use crate::output::Output;

pub fn check(args: &PolicyCheckArgs, out: &Output) -> anyhow::Result<u8> {
    let [_, _, ..] = args.files.as_slice() else {
        return check_one(args, args.files.first().map(PathBuf::as_path), out);
    };
    // Several files (`policy check examples/*.toml`): each one's result, and 121 if any is invalid.
    let mut worst = 0;
    for file in &args.files {
        match check_one(args, Some(file), out) {
            Ok(code) => worst = worst.max(code),
            Err(e) => {
                let code = crate::exit::classify(&e);
                out.error(&e, code);
                worst = worst.max(code);
            }
        }
    }
    Ok(worst)
}

fn check_one(args: &PolicyCheckArgs, file: Option<&Path>, out: &Output) -> anyhow::Result<u8> {
    let (policy, file) = args.policy.load(file)?;
    let effective = Effective::of(&policy);
    let source = file.map_or_else(|| "the agent preset and flags".to_string(), |f| f.display().to_string());
    let toml = effective.to_toml().context("cannot render the effective policy")?;
    out.emit(&effective, || format!("# {source}: ok. The effective policy:\n{toml}"))?;
    Ok(0)
}
