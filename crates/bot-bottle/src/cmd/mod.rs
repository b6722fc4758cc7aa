//! One module per verb; `dispatch` returns the process exit code on success.

mod approvals;
mod doctor;
mod exec;
pub mod home;
mod lifecycle;
mod live;
pub mod placeholder_key;
mod policy;
mod proxy;
mod selftest;
mod suggest;

use crate::cli::Command;
use crate::output::Output;

pub fn dispatch(command: Command, out: &Output) -> anyhow::Result<u8> {
    match command {
        Command::Run(args) => lifecycle::run(&args, out),
        Command::Ls => lifecycle::ls(out),
        Command::Exec(args) => exec::run(&args),
        Command::Logs(args) => lifecycle::logs(&args, out),
        Command::Stop(args) => lifecycle::stop(&args, out),
        Command::Rm(args) => lifecycle::rm(&args, out),
        Command::Doctor(args) => doctor::run(&args, out),
        Command::Policy(crate::cli::PolicyCommand::Check(args)) => policy::check(&args, out),
        Command::Policy(crate::cli::PolicyCommand::Suggest(args)) => suggest::run(&args, out),
        Command::Policy(crate::cli::PolicyCommand::Show(args)) => live::show(&args.name, out),
        Command::Allow(args) => live::change("allow", &args, out),
        Command::Deny(args) => live::change("deny", &args, out),
        Command::Approvals(args) => approvals::run(&args, out),
        Command::Home(command) => home::run(&command, out),
        Command::Proxy(args) => proxy::run(args, out),
        Command::Selftest(args) => selftest::run(&args, out),
        Command::BottleExec {
            spec,
            init_pid,
            supervisor_pid,
            command,
        } => {
            let code = bottle_sandbox::backend::exec_helper(&spec, init_pid, supervisor_pid, &command);
            Ok(u8::try_from(code).unwrap_or(crate::exit::SANDBOX))
        }
        Command::WardenExec {
            gvisor: _,
            socket,
            command,
        } => {
            let code = bottle_sandbox::container::sockets::exec_under_warden(socket.as_deref(), &command);
            Ok(u8::try_from(code).unwrap_or(crate::exit::SANDBOX))
        }
        Command::GvisorCheck { decoy, report, command } => {
            let code = bottle_sandbox::container::sockets::gvisor_check_and_exec(&decoy, &report, &command);
            Ok(u8::try_from(code).unwrap_or(crate::exit::SANDBOX))
        }
    }
}
