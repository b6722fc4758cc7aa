//! `bot-bottle`: run AI coding agents in a bottle whose only way out is a policed egress proxy.

mod cli;
mod cmd;
mod credential_sources;
mod exit;
mod output;
mod policy_args;
mod recipe;
mod recipe_smolmachines;
mod refusals;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version print to stdout and exit 0; usage errors exit 2 (exit::USAGE).
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(exit::USAGE));
        }
    };
    init_logging(cli.verbose);
    let out = output::Output::new(cli.json);
    match cmd::dispatch(cli.command, &out) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let code = exit::classify(&err);
            out.error(&err, code);
            ExitCode::from(code)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BOT_BOTTLE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
