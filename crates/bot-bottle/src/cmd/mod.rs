//! One module per verb; `dispatch` returns the process exit code on success.

mod doctor;
mod lifecycle;
mod policy;
mod proxy;

use crate::cli::Command;
use crate::output::Output;

pub fn dispatch(command: Command, out: &Output) -> anyhow::Result<u8> {
    match command {
        Command::Run(args) => lifecycle::run(&args),
        Command::Ls => lifecycle::unavailable("ls"),
        Command::Exec(_) => lifecycle::unavailable("exec"),
        Command::Logs(_) => lifecycle::unavailable("logs"),
        Command::Stop(_) => lifecycle::unavailable("stop"),
        Command::Rm(_) => lifecycle::unavailable("rm"),
        Command::Doctor(args) => doctor::run(&args, out),
        Command::Policy(crate::cli::PolicyCommand::Check(args)) => policy::check(&args, out),
        Command::Proxy(args) => proxy::run(args, out),
    }
}
