//! `bot-bottle`: run AI coding agents in a bottle whose only way out is a policed egress proxy.

mod asks;
mod cli;
mod cmd;
mod credential_sources;
mod exit;
mod host_sockets;
mod live;
mod mounts;
mod output;
mod policy_args;
mod recipe;
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        // SECURITY: a failed log write must never panic (tracing would report it with eprintln!, which panics on a
        // closed stderr): a detached bottle's proxy died on its first warning that way (#12).
        .log_internal_errors(false);
    match std::env::var_os(SUPERVISOR_LOG_ENV) {
        // A detached bottle's supervisor: its stderr goes away once the bottle is up, so it logs to its own file.
        Some(path) => builder.with_writer(append_to(std::path::PathBuf::from(path))).init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
}

/// Where a detached bottle's supervisor logs (`STATE_DIR/supervisor.log`), set by `run -d` for its supervisor.
pub const SUPERVISOR_LOG_ENV: &str = "BOT_BOTTLE_SUPERVISOR_LOG";

/// A log writer that appends to `path` (0600, never through a link) and drops what it cannot write.
fn append_to(path: std::path::PathBuf) -> impl Fn() -> Box<dyn std::io::Write> + Send + Sync + 'static {
    move || {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => Box::new(f),
            Err(_) => Box::new(std::io::sink()),
        }
    }
}
