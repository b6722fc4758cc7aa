//! The command line (clap derive). Verbs mirror docker and smolvm.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::policy_args::PolicyArgs;

#[derive(Debug, Parser)]
#[command(
    name = "bot-bottle",
    version,
    about = "Run AI coding agents in a bottle whose only way out is a policed egress proxy",
    long_about = "Run AI coding agents (Claude Code, Codex, Gemini CLI, aider) in a bottle: an isolated sandbox \
whose only way out is a host-side egress proxy that enforces the bottle's policy, intercepts TLS with a CA minted \
for that bottle, injects credentials so secrets never enter the bottle, and logs every decision.\n\n\
Exit codes: 0 success; 2 usage; 119 no such bottle, or not in a state for this verb; 120 not available yet; \
121 invalid policy; 122 preflight failed; 123 sandbox failed; 124 proxy failed; 125 other bot-bottle error; \
otherwise the agent's own exit code."
)]
pub struct Cli {
    /// Machine-readable output: one JSON document on stdout, errors as JSON on stderr.
    #[arg(long, global = true)]
    pub json: bool,

    /// More diagnostics on stderr (-v info, -vv debug, -vvv trace); BOT_BOTTLE_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a bottle and run the agent (or CMD) in it.
    Run(RunArgs),
    /// List bottles: name, backend, address, state, uptime, allowed/denied counts.
    Ls,
    /// Run a command in a running bottle.
    Exec(ExecArgs),
    /// Show a bottle's output, or its egress audit log.
    Logs(LogsArgs),
    /// Stop a running bottle: agent, proxy, lease.
    Stop(NameArg),
    /// Remove a stopped bottle's state (its audit log, CA certificate, agent log).
    Rm(RmArgs),
    /// Check whether this host can run each backend, with the exact remedy for anything missing.
    Doctor(DoctorArgs),
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Agent homes kept between runs (one per agent preset by default): list or remove them.
    #[command(subcommand)]
    Home(HomeCommand),
    /// Allow a host in a running bottle, at once and without a restart (validated as a policy line; audited).
    Allow(LiveArgs),
    /// Deny a host in a running bottle, at once, for new requests (validated as a policy line; audited).
    Deny(LiveArgs),
    /// Ask mode (`run --ask`): list the requests bottles hold for an answer, or answer one
    /// (`approvals NAME ID allow-once|allow|deny`).
    Approvals(ApprovalsArgs),
    /// Run the egress proxy alone, in the foreground (benchmarks, containers, debugging).
    Proxy(ProxyArgs),
    /// Attempt a representative set of escapes from a real bottle on this host; exit 123 if any gets out.
    Selftest(SelftestArgs),
    /// Internal: joins a running bottle for `exec`.
    #[command(name = "__bottle-exec", hide = true)]
    BottleExec {
        spec: PathBuf,
        init_pid: u32,
        supervisor_pid: u32,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Internal: in a container bottle, starts a command under the socket warden.
    #[command(name = "__warden-exec", hide = true)]
    WardenExec {
        /// Under gVisor: no warden (gVisor keeps host sockets out itself), the seccomp filter alone.
        #[arg(long, conflicts_with = "socket", required_unless_present = "socket")]
        gvisor: bool,
        socket: Option<PathBuf>,
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Internal: a container bottle's first command under gVisor: reports what gVisor says of it, then is its init.
    #[command(name = "__gvisor-check", hide = true)]
    GvisorCheck {
        decoy: PathBuf,
        report: PathBuf,
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Run in the background; manage it with ls, logs, exec, stop.
    #[arg(short, long)]
    pub detach: bool,
    /// Remove the bottle's state (audit log included) when it exits, like `docker run --rm`.
    #[arg(long)]
    pub rm: bool,
    /// Extra trusted root for upstream TLS (PEM), e.g. an internal service's CA. Repeatable.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,
    /// The command to run in the bottle (default: the agent preset's command).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The bottle's name.
    pub name: String,
    /// The command to run.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The bottle's name.
    pub name: String,
    /// Show the egress audit log (one JSON line per decision) instead of the agent's output.
    #[arg(long)]
    pub egress: bool,
    /// Only denied requests (implies --egress).
    #[arg(long)]
    pub denied: bool,
    /// Keep printing as lines arrive.
    #[arg(short, long)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct NameArg {
    /// The bottle's name.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The bottle's name.
    pub name: String,
    /// Stop the bottle first if it is running.
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Check one backend only; exit 122 if it cannot run here.
    #[arg(long, value_name = "BACKEND", value_parser = ["namespace", "container", "smolmachines"])]
    pub backend: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum HomeCommand {
    /// List the homes under bot-bottle's state directory.
    Ls,
    /// Remove a home (everything an agent kept in it: config, sessions, its own login).
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy and print the effective policy (presets expanded, flags applied), or the error.
    Check(Box<PolicyCheckArgs>),
    /// Draft policy lines from what a bottle's proxy refused: exactly that, nothing broader.
    Suggest(PolicySuggestArgs),
    /// Print a bottle's policy as it is now (live changes included).
    Show(PolicySuggestArgs),
}

#[derive(Debug, Args)]
pub struct LiveArgs {
    /// The running bottle.
    pub name: String,
    /// As `--allow` / `--deny` take it: HOST[:PORT], a wildcard, an IP:PORT.
    pub entry: String,
}

#[derive(Debug, Args)]
pub struct ApprovalsArgs {
    /// The bottle (default: every running bottle, for listing).
    pub name: Option<String>,
    /// The question to answer, as listed.
    #[arg(requires = "decision")]
    pub id: Option<u64>,
    /// allow-once (this request only), allow (this host and port from now on), or deny (this host from now on).
    #[arg(value_parser = ["allow-once", "allow", "deny"])]
    pub decision: Option<String>,
    /// Why (recorded in the audit log).
    #[arg(long, requires = "decision")]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct PolicySuggestArgs {
    /// The bottle whose audit log is read.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct PolicyCheckArgs {
    /// The policy files (default: ./bottle.toml if present, else the agent preset). `-` reads stdin. Each is
    /// checked; the exit code is 121 if any is invalid.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Address to listen on, e.g. 127.0.0.1:3128.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:3128")]
    pub listen: SocketAddr,
    /// Where the CA (ca.pem, ca-key.pem 0600) and the audit log (audit.jsonl) go.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Sign leaf certificates with this existing CA certificate (PEM) instead of minting one.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The private key (PEM) of --ca-cert.
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Extra trusted root for upstream TLS (PEM). Repeatable.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// The backend to test: namespace, or container with --image (smolmachines exits 120).
    #[arg(
        long,
        value_name = "BACKEND",
        default_value = "namespace",
        value_parser = ["namespace", "container", "smolmachines"]
    )]
    pub backend: String,
    /// The image the container backend's bottle runs (the one your agents use); container only.
    #[arg(long, value_name = "NAME")]
    pub image: Option<String>,
    /// The container engine's runtime the bottle runs under (`runsc`: gVisor); container only.
    #[arg(long, value_name = "NAME", requires = "image")]
    pub runtime: Option<String>,
}
