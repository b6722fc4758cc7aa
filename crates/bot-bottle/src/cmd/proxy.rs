//! `proxy`: the egress proxy alone, in the foreground.

use anyhow::Context;
use bottle_proxy::StandaloneOptions;

use crate::cli::ProxyArgs;
use crate::output::Output;

pub fn run(args: ProxyArgs, _out: &Output) -> anyhow::Result<u8> {
    let (policy, policy_path) = args.policy.load(None)?;
    crate::policy_args::check_upstream_ca(&args.upstream_ca)?;
    let bottle = policy
        .bottle
        .name
        .as_ref()
        .map_or_else(|| "standalone".to_string(), ToString::to_string);
    // Ask mode here has only the policy's reviewer command (no `approvals`: a standalone proxy has no control socket).
    if policy.network.unknown == bottle_policy::Unknown::Ask && policy.network.ask.reviewer.is_none() {
        return Err(bottle_policy::PolicyError::whole_file(
            policy_path.as_deref(),
            "unknown = \"ask\" needs a reviewer in a standalone proxy (it has no `bot-bottle approvals`): set \
             [network.ask] reviewer, or run the agent in a bottle (`bot-bottle run --ask`)"
                .to_string(),
        )
        .into());
    }
    let reviewer: Option<std::sync::Arc<dyn bottle_proxy::Reviewer>> =
        policy.network.ask.reviewer.is_some().then(|| {
            let asks = crate::asks::Asks::new(&bottle, args.state_dir.clone(), &policy);
            std::sync::Arc::new(crate::asks::Reviewing(asks)) as _
        });
    let opts = StandaloneOptions {
        reviewer,
        policy,
        policy_path,
        overrides: args.policy.overrides(),
        listen: args.listen,
        state_dir: args.state_dir,
        ca_cert: args.ca_cert,
        ca_key: args.ca_key,
        upstream_ca: args.upstream_ca,
        bottle,
    };
    bottle_proxy::run_standalone(opts).context("egress proxy failed")?;
    Ok(0)
}
