//! What the smolmachines recipe runs inside the guest, all through `machine exec`: the readiness probe, the init that
//! installs the bottle CA and proxy settings, and the agent. Trusts the engine's exit status only as far as
//! research/smolvm.md §4 allows: rc 1 is ambiguous, so smolvm's `{"error":…}` line tells an engine failure from the
//! guest command's own exit code.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::smolmachines::cli::parse_error_line;
use crate::smolmachines::{CliError, EngineError, ErrorCode, MachineName, Smolvm};

/// The guest's own roots plus the bottle CA, as the init script writes them.
pub const GUEST_CA_BUNDLE: &str = "/etc/bot-bottle/ca-bundle.pem";
/// What the readiness probe runs (the Python SDK's `_wait_for_execution` does the same, research §4).
pub const PROBE_COMMAND: [&str; 3] = ["/bin/sh", "-c", "true"];
/// `machine exec --timeout` for the probe, inside the guest; the agent's `TIMEOUT_EXIT_CODE` when it expires.
const PROBE_GUEST_TIMEOUT: &str = "2s";
const GUEST_TIMEOUT_EXIT: i32 = 124;
/// Our bound on one probe run (engine start-up included).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
const INIT_GUEST_TIMEOUT: &str = "60s";
const INIT_TIMEOUT: Duration = Duration::from_secs(90);
/// The init's variables: the CA certificate (public) and the profile script for login shells.
pub const CA_ENV: &str = "BOT_BOTTLE_CA_PEM";
pub const PROFILE_ENV: &str = "BOT_BOTTLE_PROFILE";
/// Printed by the init script as its last line, so a silent no-op (a shell that ignored the script) is not success.
pub const INIT_DONE: &str = "bot-bottle-init-done";
/// Host-side variable names carrying `pass_env` values to `--secret-env` (never an argument: argv is world-readable).
const PASS_ENV_PREFIX: &str = "BOT_BOTTLE_PASS_";
/// How long the agent's stderr copier may lag behind its exit (something else may hold the pipe).
const STDERR_DRAIN: Duration = Duration::from_secs(2);
/// Bytes of the agent's stderr kept to look for smolvm's error line.
const STDERR_TAIL_BYTES: usize = 8 * 1024;

/// Installs the CA where the guest's tools look, and leaves a profile script for login shells. POSIX sh, run as
/// root; every path it writes is fixed here, every value arrives in the environment.
const INIT_SCRIPT: &str = r#"set -eu
umask 022
mkdir -p /etc/bot-bottle
printf '%s\n' "$BOT_BOTTLE_CA_PEM" > /etc/bot-bottle/ca.pem
roots=
for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do
  if [ -z "$roots" ] && [ -f "$f" ]; then roots=$f; fi
done
if [ -n "$roots" ]; then
  cat "$roots" /etc/bot-bottle/ca.pem > /etc/bot-bottle/ca-bundle.pem
  cat /etc/bot-bottle/ca.pem >> "$roots"
else
  cp /etc/bot-bottle/ca.pem /etc/bot-bottle/ca-bundle.pem
fi
if [ -d /usr/local/share/ca-certificates ]; then
  cp /etc/bot-bottle/ca.pem /usr/local/share/ca-certificates/bot-bottle.crt
fi
if [ -d /etc/profile.d ]; then
  printf '%s\n' "$BOT_BOTTLE_PROFILE" > /etc/profile.d/bot-bottle.sh
fi
echo bot-bottle-init-done
"#;

/// A readiness probe that cannot succeed later.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("machine {machine} disappeared while waiting for its agent: {error}")]
    Gone { machine: MachineName, error: EngineError },
    #[error("`/bin/sh -c true` in machine {machine} exited {status}; the guest has no working /bin/sh")]
    Command { machine: MachineName, status: i32 },
    #[error("cannot run the readiness probe")]
    Engine(#[source] CliError),
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("the init in machine {machine} failed")]
    Exec {
        machine: MachineName,
        #[source]
        source: CliError,
    },
    #[error("the init in machine {machine} did not finish (its output lacks `{INIT_DONE}`)")]
    Incomplete { machine: MachineName },
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot run `{}` to start the agent", engine.display())]
    Spawn {
        engine: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot wait for the agent")]
    Wait(#[source] io::Error),
    #[error("smolvm could not run the agent: {0}")]
    Engine(EngineError),
}

/// `machine exec --name N --timeout 2s -- /bin/sh -c true`.
pub fn probe_args(name: &MachineName) -> Vec<OsString> {
    let mut args = os(&[
        "machine",
        "exec",
        "--name",
        name.as_str(),
        "--timeout",
        PROBE_GUEST_TIMEOUT,
        "--",
    ]);
    args.extend(os(&PROBE_COMMAND));
    args
}

/// One readiness probe: `Some(())` once the guest ran the command, `None` while the engine says it cannot yet.
pub fn probe(smolvm: &Smolvm, name: &MachineName) -> Result<Option<()>, ProbeError> {
    match smolvm.invoke(&probe_args(name), &[], PROBE_TIMEOUT) {
        Ok(_) => Ok(Some(())),
        // An engine error line: smolvm, not the guest command, failed.
        Err(CliError::Engine { error, .. }) if error.code == ErrorCode::NotFound => Err(ProbeError::Gone {
            machine: name.clone(),
            error,
        }),
        Err(CliError::Engine { error, .. }) => {
            tracing::debug!(machine = %name, %error, "guest agent not ready yet");
            Ok(None)
        }
        // No error line: the status is the guest command's. 124 is the guest-side timeout; anything else means
        // `true` itself failed, which waiting will not fix.
        Err(CliError::Failed { status, .. }) if status == GUEST_TIMEOUT_EXIT => Ok(None),
        Err(CliError::TimedOut { .. }) => Ok(None),
        Err(CliError::Failed { status, .. }) => Err(ProbeError::Command {
            machine: name.clone(),
            status,
        }),
        Err(other) => Err(ProbeError::Engine(other)),
    }
}

/// `machine exec --name N -u 0 --timeout 60s -e BOT_BOTTLE_CA_PEM=… -e BOT_BOTTLE_PROFILE=… -- /bin/sh -c SCRIPT`.
pub fn init_args(name: &MachineName, ca_pem: &str, profile: &str) -> Vec<OsString> {
    let mut args = os(&[
        "machine",
        "exec",
        "--name",
        name.as_str(),
        "--user",
        "0",
        "--timeout",
        INIT_GUEST_TIMEOUT,
    ]);
    // The CA certificate is public; `-e` applies to this exec only and is not persisted (research §4).
    args.push("-e".into());
    args.push(format!("{CA_ENV}={}", ca_pem.trim_end()).into());
    args.push("-e".into());
    args.push(format!("{PROFILE_ENV}={profile}").into());
    args.extend(os(&["--", "/bin/sh", "-c", INIT_SCRIPT]));
    args
}

/// Installs the bottle CA in the guest trust store and the proxy settings for login shells.
pub fn init(
    smolvm: &Smolvm,
    name: &MachineName,
    ca_pem: &str,
    settings: &BTreeMap<String, String>,
) -> Result<(), InitError> {
    let out = smolvm
        .invoke(&init_args(name, ca_pem, &profile(settings)), &[], INIT_TIMEOUT)
        .map_err(|source| InitError::Exec {
            machine: name.clone(),
            source,
        })?;
    if !out.stdout.lines().any(|l| l.trim() == INIT_DONE) {
        return Err(InitError::Incomplete { machine: name.clone() });
    }
    Ok(())
}

/// `export KEY='value'` lines. Values are bot-bottle's own URLs and paths; a `'` is escaped all the same.
fn profile(settings: &BTreeMap<String, String>) -> String {
    settings
        .iter()
        .map(|(k, v)| format!("export {k}='{}'", v.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The proxy and CA settings every process in the guest gets (the names the policy reserves).
pub fn proxy_settings(guest_proxy_url: &str) -> BTreeMap<String, String> {
    bottle_policy::proxy_and_ca_env(guest_proxy_url, GUEST_CA_BUNDLE)
}

/// The agent's environment: `plain` goes in `-e` arguments (policy values, placeholders, proxy settings); `passed`
/// holds `pass_env` values from the host, handed over with `--secret-env` so they never appear in an argv.
#[derive(Debug, Default)]
pub struct AgentEnv {
    pub plain: BTreeMap<String, String>,
    pub passed: Vec<(String, String)>,
}

/// How the agent's standard streams are connected.
pub enum AgentStdio {
    /// Stdin is a terminal: `-i -t`.
    Terminal,
    /// Foreground without a terminal: `--stream` (output as it arrives; stdin is not forwarded).
    Inherit,
    /// Detached: stdout and stderr to the agent log.
    Log(File),
}

/// `machine exec --name N -w /workspace (-i -t | --stream) -e K=V… --secret-env K=HOSTVAR… -- ARGV…`, and the
/// host environment the `--secret-env` names refer to.
pub fn agent_args(
    name: &MachineName,
    workdir: &str,
    terminal: bool,
    env: &AgentEnv,
    argv: &[String],
) -> (Vec<OsString>, Vec<(OsString, OsString)>) {
    let mut args = os(&["machine", "exec", "--name", name.as_str(), "--workdir", workdir]);
    args.extend(os(if terminal { &["-i", "-t"][..] } else { &["--stream"][..] }));
    for (k, v) in &env.plain {
        args.push("-e".into());
        args.push(format!("{k}={v}").into());
    }
    let mut host_env = Vec::new();
    for (i, (k, v)) in env.passed.iter().enumerate() {
        let host_var = format!("{PASS_ENV_PREFIX}{i}");
        args.push("--secret-env".into());
        args.push(format!("{k}={host_var}").into());
        host_env.push((host_var.into(), v.into()));
    }
    args.push("--".into());
    args.extend(argv.iter().map(OsString::from));
    (args, host_env)
}

/// Runs the agent through `machine exec` with the terminal (or the log) attached; returns its exit code. `spawned`
/// gets the engine's pid at once (for signal forwarding). A status of 1 with smolvm's error line on stderr is the
/// engine's failure, not the agent's.
pub fn run_agent(
    smolvm: &Smolvm,
    args: &[OsString],
    host_env: &[(OsString, OsString)],
    stdio: AgentStdio,
    spawned: impl FnOnce(u32),
) -> Result<u8, AgentError> {
    let invocation = smolvm.invocation(args, host_env);
    let mut command = Command::new(&invocation.program);
    command
        .args(&invocation.args)
        .env_clear()
        .envs(invocation.env.iter().map(|(k, v)| (k, v)))
        .stderr(Stdio::piped());
    let spawn_err = |source| AgentError::Spawn {
        engine: invocation.program.clone(),
        source,
    };
    let sink: Box<dyn Write + Send> = match stdio {
        AgentStdio::Terminal | AgentStdio::Inherit => {
            let stdin = if matches!(stdio, AgentStdio::Terminal) {
                Stdio::inherit()
            } else {
                Stdio::null()
            };
            command.stdin(stdin).stdout(Stdio::inherit());
            Box::new(io::stderr())
        }
        AgentStdio::Log(log) => {
            command.stdin(Stdio::null()).stdout(log.try_clone().map_err(spawn_err)?);
            Box::new(log)
        }
    };
    let mut child = command.spawn().map_err(spawn_err)?;
    spawned(child.id());
    let (tail_tx, tail_rx) = mpsc::channel();
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            let _ = tail_tx.send(copy_keeping_tail(stderr, sink));
        });
    }
    let status = child.wait().map_err(AgentError::Wait)?;
    let tail = tail_rx.recv_timeout(STDERR_DRAIN).unwrap_or_default();
    if status.code() == Some(1)
        && let Some(error) = parse_error_line(&tail)
    {
        return Err(AgentError::Engine(error));
    }
    Ok(exit_code(status))
}

/// Copies everything to `sink` as it arrives; returns the last `STDERR_TAIL_BYTES` as text.
fn copy_keeping_tail(mut from: impl Read, mut sink: impl Write) -> String {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let _ = sink.write_all(&buf[..n]).and_then(|()| sink.flush());
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > STDERR_TAIL_BYTES {
            tail.drain(..tail.len() - STDERR_TAIL_BYTES);
        }
    }
    String::from_utf8_lossy(&tail).into_owned()
}

/// The agent's code; a signal `n` becomes `128 + n`, as shells report it.
fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(u8::MAX),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(u8::MAX),
        _ => u8::MAX,
    }
}

fn os(items: &[&str]) -> Vec<OsString> {
    items.iter().map(OsString::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> MachineName {
        MachineName::parse("bb-demo").unwrap()
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn the_probe_is_a_bounded_sh_true() {
        assert_eq!(
            strings(&probe_args(&name())),
            [
                "machine",
                "exec",
                "--name",
                "bb-demo",
                "--timeout",
                "2s",
                "--",
                "/bin/sh",
                "-c",
                "true"
            ]
        );
    }

    #[test]
    fn pass_env_values_travel_only_in_the_environment() {
        let env = AgentEnv {
            plain: BTreeMap::from([("HTTPS_PROXY".to_owned(), "http://100.96.0.1:4000".to_owned())]),
            passed: vec![("API_KEY".to_owned(), "s3cret".to_owned())],
        };
        let argv = ["claude".to_owned(), "--x".to_owned()];
        let (args, host_env) = agent_args(&name(), "/workspace", false, &env, &argv);
        let args = strings(&args);
        assert_eq!(
            args,
            [
                "machine",
                "exec",
                "--name",
                "bb-demo",
                "--workdir",
                "/workspace",
                "--stream",
                "-e",
                "HTTPS_PROXY=http://100.96.0.1:4000",
                "--secret-env",
                "API_KEY=BOT_BOTTLE_PASS_0",
                "--",
                "claude",
                "--x"
            ]
        );
        assert!(args.iter().all(|a| !a.contains("s3cret")));
        assert_eq!(host_env, [("BOT_BOTTLE_PASS_0".into(), "s3cret".into())]);
        let (tty, _) = agent_args(&name(), "/workspace", true, &AgentEnv::default(), &argv);
        assert_eq!(strings(&tty)[6..8], ["-i", "-t"]);
    }

    #[test]
    fn the_profile_quotes_values() {
        let settings = BTreeMap::from([("A".to_owned(), "x'y".to_owned()), ("B".to_owned(), "/p".to_owned())]);
        assert_eq!(profile(&settings), "export A='x'\\''y'\nexport B='/p'");
        let proxy = proxy_settings("http://100.96.0.1:4000");
        for key in bottle_policy::PROXY_ENV
            .iter()
            .chain(&bottle_policy::NO_PROXY_ENV)
            .chain(&bottle_policy::CA_ENV)
        {
            assert!(proxy.contains_key(*key), "{key}");
        }
        assert_eq!(proxy["SSL_CERT_FILE"], GUEST_CA_BUNDLE);
        assert!(INIT_SCRIPT.contains(&format!("> {GUEST_CA_BUNDLE}")));
        assert!(INIT_SCRIPT.trim_end().ends_with(&format!("echo {INIT_DONE}")));
    }

    #[test]
    fn stderr_is_copied_whole_and_its_tail_kept() {
        let mut text = "x".repeat(3 * STDERR_TAIL_BYTES);
        text.push_str("\n{\"error\":{\"code\":\"SMOLVM_ERROR\",\"message\":\"m\"}}\n");
        let mut sink = Vec::new();
        let tail = copy_keeping_tail(text.as_bytes(), &mut sink);
        assert_eq!(sink, text.as_bytes());
        assert_eq!(tail.len(), STDERR_TAIL_BYTES);
        assert_eq!(parse_error_line(&tail).unwrap().message, "m");
    }
}
