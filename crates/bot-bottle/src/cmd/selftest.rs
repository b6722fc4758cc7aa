//! `selftest`: a representative subset of the escape suite (issue #6), run against this host with the installed
//! binaries. One bottle is launched with this very executable (`bot-bottle run`, in a temporary workspace and state
//! directory that are removed afterwards); `bottle-probe`, found next to this executable, makes each attempt inside
//! it, aimed at decoys on the host's loopback (a TCP and a UDP service, an agent socket, an abstract socket, a secret
//! file, a marked process) and at addresses that only exist outside the bottle. Trusts the probe's verdicts and the
//! decoys' counters; anything it cannot read counts as an error, never as "held".
//!
//! Prints `CASE  BACKEND  VERDICT` (`held`, `ESCAPED` or `error`); exit 0 when every case held, 123 otherwise.

use std::fmt::Write as _;
use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cli::SelftestArgs;
use crate::exit::{SANDBOX, Unavailable};
use crate::output::Output;

const PROBE: &str = "bottle-probe";
/// How long the whole bottle run may take; a hang is an error, not a pass.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// The launcher-side variable of the decoy credential; inside the bottle it holds only a placeholder.
const TOKEN_VAR: &str = "BOT_BOTTLE_SELFTEST_TOKEN";
/// The one allowed host, which the decoy credential is bound to (`.test`, RFC 2606), pinned by the policy to an
/// unusual loopback address where a silent decoy upstream listens: no lookup and no dial leaves the host.
const CREDENTIAL_HOST: &str = "selftest.bot-bottle.test";
const UPSTREAM_IP: &str = "127.1.2.3";
/// The host the bottle's own confinement self-test asks for (bottle_sandbox::namespace::init::SELFTEST_HOST).
const INIT_SELFTEST_HOST: &str = "selftest.bot-bottle.invalid";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Held,
    Escaped,
    Error,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Escaped => "ESCAPED",
            Self::Error => "error",
        }
    }
}

#[derive(Debug, Serialize)]
struct Row {
    case: String,
    backend: &'static str,
    verdict: Verdict,
    evidence: String,
}

#[derive(Debug, Serialize)]
struct Report {
    backend: &'static str,
    held: usize,
    escaped: usize,
    errors: usize,
    cases: Vec<Row>,
}

pub fn run(args: &SelftestArgs, out: &Output) -> anyhow::Result<u8> {
    if args.backend != "namespace" {
        return Err(Unavailable {
            verb: "selftest",
            reason: "only the namespace backend can be self-tested so far (container and smolmachines: later)",
        }
        .into());
    }
    let report = match selftest() {
        Ok(rows) => report(rows),
        Err(e) => {
            out.error(&e.context("the self-test could not run"), SANDBOX);
            return Ok(SANDBOX);
        }
    };
    out.emit(&report, || render(&report))?;
    Ok(if report.escaped + report.errors == 0 {
        0
    } else {
        SANDBOX
    })
}

fn report(cases: Vec<Row>) -> Report {
    let count = |v| cases.iter().filter(|r| r.verdict == v).count();
    Report {
        backend: "namespace",
        held: count(Verdict::Held),
        escaped: count(Verdict::Escaped),
        errors: count(Verdict::Error),
        cases,
    }
}

fn render(r: &Report) -> String {
    let width = r.cases.iter().map(|c| c.case.len()).max().unwrap_or(4).max(4) + 2;
    let mut s = format!("{:<width$}{:<11}VERDICT\n", "CASE", "BACKEND");
    for c in &r.cases {
        let _ = writeln!(s, "{:<width$}{:<11}{}", c.case, c.backend, c.verdict.word());
    }
    let _ = writeln!(
        s,
        "\n{} cases: {} held, {} escaped, {} errors",
        r.cases.len(),
        r.held,
        r.escaped,
        r.errors
    );
    for c in r.cases.iter().filter(|c| c.verdict != Verdict::Held) {
        let _ = writeln!(s, "{} {}: {}", c.verdict.word(), c.case, c.evidence);
    }
    s
}

/// A temporary directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn random_hex() -> anyhow::Result<String> {
    let mut bytes = [0u8; 8];
    rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).context("no randomness")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Hex, so a needle on the probe's command line never appears there literally (the probe decodes `hex:`).
fn hex(s: &str) -> String {
    format!("hex:{}", s.bytes().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Counts contacts with one decoy.
#[derive(Clone, Default)]
struct Hits(Arc<AtomicUsize>);

impl Hits {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn spawn_counter<T: Send + 'static>(hits: &Hits, next: impl Fn() -> std::io::Result<T> + Send + 'static) {
    let hits = hits.clone();
    std::thread::spawn(move || {
        while next().is_ok() {
            hits.0.fetch_add(1, Ordering::SeqCst);
        }
    });
}

/// The host-side decoys and the values the cases look for.
struct Decoys {
    upstream_port: u16,
    tcp_port: u16,
    udp_port: u16,
    tcp: Hits,
    udp: Hits,
    agent: Hits,
    abstract_sock: Hits,
    agent_path: PathBuf,
    abstract_name: String,
    secret: String,
    file_secret: String,
    marker: String,
}

/// A child process killed and reaped on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn decoys(host: &Path) -> anyhow::Result<(Decoys, Reaped)> {
    use std::os::linux::net::SocketAddrExt;
    let upstream = TcpListener::bind((UPSTREAM_IP, 0)).context("decoy upstream")?;
    let tcp = TcpListener::bind("127.0.0.1:0").context("decoy TCP listener")?;
    let udp = UdpSocket::bind("127.0.0.1:0").context("decoy UDP socket")?;
    let agent_path = host.join("agent.sock");
    let agent = UnixListener::bind(&agent_path).context("decoy agent socket")?;
    let abstract_name = format!("bot-bottle-selftest-{}", random_hex()?);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())?;
    let abstract_sock = UnixListener::bind_addr(&addr).context("decoy abstract socket")?;
    let d = Decoys {
        upstream_port: upstream.local_addr()?.port(),
        tcp_port: tcp.local_addr()?.port(),
        udp_port: udp.local_addr()?.port(),
        tcp: Hits::default(),
        udp: Hits::default(),
        agent: Hits::default(),
        abstract_sock: Hits::default(),
        agent_path,
        abstract_name,
        secret: format!("selftest-secret-{}", random_hex()?),
        file_secret: format!("selftest-file-{}", random_hex()?),
        // `sleep` takes fractions: a duration nothing else uses marks the host process.
        marker: format!("86399.{}", u32::from_str_radix(&random_hex()?[..6], 16)?),
    };
    // The allowed upstream: the proxy may dial it; it never answers, so no TLS handshake can complete.
    spawn_counter(&Hits::default(), move || upstream.accept());
    spawn_counter(&d.tcp, move || tcp.accept());
    spawn_counter(&d.udp, move || udp.recv_from(&mut [0u8; 512]));
    spawn_counter(&d.agent, move || agent.accept());
    spawn_counter(&d.abstract_sock, move || abstract_sock.accept());
    std::fs::write(host.join("secret.txt"), &d.file_secret)?;
    let marked = Command::new("sleep")
        .arg(&d.marker)
        .stdin(Stdio::null())
        .spawn()
        .context("cannot start the marked host process (sleep)")?;
    Ok((d, Reaped(marked)))
}

/// One case: a label, the probe's arguments, and the decoy whose counter must stay at zero.
struct Case<'a> {
    label: &'static str,
    args: Vec<String>,
    decoy: Option<&'a Hits>,
}

fn cases<'a>(d: &'a Decoys, home: &str) -> Vec<Case<'a>> {
    let (tcp, udp) = (format!("127.0.0.1:{}", d.tcp_port), format!("127.0.0.1:{}", d.udp_port));
    let tag = &d.marker;
    let c = |label, args: &[&str], decoy| Case {
        label,
        args: args.iter().map(ToString::to_string).collect(),
        decoy,
    };
    vec![
        c(
            "01 direct TCP to a host loopback service",
            &["tcp-connect", &tcp],
            Some(&d.tcp),
        ),
        c("02 direct TCP to an IP literal", &["tcp-connect", "192.0.2.1:80"], None),
        c("03 ICMP echo over a raw socket", &["ping-raw", "192.0.2.1"], None),
        c("04 UDP to a host loopback service", &["udp-send", &udp], Some(&d.udp)),
        c(
            "09 port scan of loopback",
            &["port-scan", "127.0.0.1", "3128", "1-1024", &d.tcp_port.to_string()],
            Some(&d.tcp),
        ),
        c(
            "11 proxy asked for a loopback address",
            &["proxy-get", &format!("http://{tcp}/")],
            Some(&d.tcp),
        ),
        c(
            "13 proxy asked for a non-allowed host",
            &["proxy-connect", "not-allowed.bot-bottle.invalid:443"],
            None,
        ),
        c(
            "14 name lookup from inside",
            &["resolve", "selftest.bot-bottle.invalid"],
            None,
        ),
        c(
            "15 DNS query straight to 8.8.8.8",
            &["dns-udp", "8.8.8.8:53", "selftest.bot-bottle.invalid"],
            None,
        ),
        c(
            "20 CONNECT with another SNI",
            &[
                "proxy-sni",
                &format!("{CREDENTIAL_HOST}:{}", d.upstream_port),
                "other.bot-bottle.test",
            ],
            None,
        ),
        c(
            "31 the real credential searched for",
            &["find-secret", &hex(&d.secret)],
            None,
        ),
        c(
            "35 container daemon sockets",
            &[
                "unix-connect",
                "/run/docker.sock",
                "/var/run/docker.sock",
                "/run/containerd/containerd.sock",
                "/run/podman/podman.sock",
            ],
            None,
        ),
        c(
            "36 the user's ssh-agent",
            &["ssh-agent", &d.agent_path.display().to_string()],
            Some(&d.agent),
        ),
        c("37 no_new_privs and no capabilities", &["proc-status"], None),
        c("38 ptrace", &["syscall", "ptrace"], None),
        c("38 mount", &["syscall", "mount"], None),
        c("38 unshare a user namespace", &["syscall", "unshare-user"], None),
        c("38 bpf", &["syscall", "bpf"], None),
        c("38 keyctl", &["syscall", "keyctl"], None),
        c("39 raw socket", &["raw-socket", "inet"], None),
        c("40 route change over rtnetlink", &["netlink-route"], None),
        c(
            "42 host processes visible",
            &["processes", &hex(&format!("sleep {tag}"))],
            None,
        ),
        c("43 the user's ~/.ssh", &["list-dir", &format!("{home}/.ssh")], None),
        c(
            "44 write to /usr",
            &["write-file", &format!("/usr/.bot-bottle-selftest-{tag}")],
            None,
        ),
        c(
            "44 write to /etc",
            &["write-file", &format!("/etc/.bot-bottle-selftest-{tag}")],
            None,
        ),
        c(
            "45 workspace symlink to a host file",
            &["read-file", "host-link", &hex(&d.file_secret)],
            None,
        ),
        c(
            "xx abstract socket of the host",
            &["abstract-connect", &d.abstract_name],
            Some(&d.abstract_sock),
        ),
        c("xx io_uring", &["syscall", "io-uring"], None),
    ]
}

fn quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

fn script(cases: &[Case<'_>]) -> String {
    let mut s = String::from("step() { id=$1; shift; echo \"@@step $id\"; \"$@\"; echo \"@@rc $?\"; }\n");
    for (i, c) in cases.iter().enumerate() {
        let args: Vec<String> = c.args.iter().map(|a| quote(a)).collect();
        let _ = writeln!(s, "step {i} ./{PROBE} {}", args.join(" "));
    }
    s.push_str("echo @@done\n");
    s
}

/// Each step's outcome: `Ok((escaped, evidence))`, or why there is no verdict.
fn parse(stdout: &str, n: usize) -> Vec<Result<(bool, String), String>> {
    let mut out: Vec<Result<(bool, String), String>> = (0..n).map(|_| Err("the step never ran".into())).collect();
    let mut current: Option<(usize, Vec<&str>)> = None;
    for line in stdout.lines() {
        if let Some(id) = line.strip_prefix("@@step ") {
            current = id.trim().parse().ok().map(|i| (i, Vec::new()));
        } else if let Some(rc) = line.strip_prefix("@@rc ") {
            let Some((i, lines)) = current.take() else { continue };
            let verdicts: Vec<serde_json::Value> = lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
            let result = match (rc.trim(), verdicts.as_slice()) {
                ("0", [v]) => match (v["escaped"].as_bool(), v["evidence"].as_str()) {
                    (Some(escaped), Some(evidence)) => Ok((escaped, evidence.to_string())),
                    _ => Err(format!("unparseable verdict {v}")),
                },
                ("0", _) => Err(format!("expected one verdict, got {lines:?}")),
                (rc, _) => Err(format!("the probe could not run (exit {rc})")),
            };
            if let Some(slot) = out.get_mut(i) {
                *slot = result;
            }
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line);
        }
    }
    out
}

/// Runs `cmd` to completion, killing it after `RUN_TIMEOUT`.
fn run_bottle(mut cmd: Command) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start bot-bottle run")?;
    let read_all = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read_all(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = read_all(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the self-test bottle did not finish within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let join = |h: std::thread::JoinHandle<String>| h.join().unwrap_or_default();
    Ok((status, join(out), join(err)))
}

fn selftest() -> anyhow::Result<Vec<Row>> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let probe = exe.with_file_name(PROBE);
    if !probe.is_file() {
        bail!(
            "{PROBE} is not installed next to {}: install it beside bot-bottle (`cargo install --path crates/{PROBE}`, \
             or `cargo build --workspace`)",
            exe.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("bot-bottle-selftest-{}-{}", std::process::id(), random_hex()?));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let scratch = Scratch(dir);
    let (work, state, host) = (scratch.0.join("work"), scratch.0.join("state"), scratch.0.join("host"));
    for d in [&work, &state, &host] {
        std::fs::create_dir(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let in_work = work.join(PROBE);
    std::fs::copy(&probe, &in_work).with_context(|| format!("cannot copy {}", probe.display()))?;
    std::fs::set_permissions(&in_work, std::fs::Permissions::from_mode(0o755))?;
    std::os::unix::fs::symlink(host.join("secret.txt"), work.join("host-link"))?;
    let policy = host.join("policy.toml");
    let (d, marked) = decoys(&host)?;
    let port = d.upstream_port;
    std::fs::write(
        &policy,
        format!(
            "[network]\nallow = [\"{CREDENTIAL_HOST}:{port}\"]\nallow_cidr = [\"{UPSTREAM_IP}/32\"]\n\
             [network.resolve]\n\"{CREDENTIAL_HOST}\" = \"{UPSTREAM_IP}\"\n\n[[credential]]\n\
             host = \"{CREDENTIAL_HOST}\"\nheader = \"authorization\"\nfrom_env = \"{TOKEN_VAR}\"\n"
        ),
    )?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cases = cases(&d, &home);
    let name = format!("selftest-{}", &random_hex()?[..6]);
    let mut cmd = Command::new(&exe);
    cmd.args(["run", "--name", &name, "--policy"])
        .arg(&policy)
        .args(["--", "sh", "-c", &script(&cases)])
        .current_dir(&work)
        .env("XDG_STATE_HOME", &state)
        .env(TOKEN_VAR, &d.secret)
        .env("SSH_AUTH_SOCK", &d.agent_path)
        .env_remove("BOT_BOTTLE_LOG");
    let result = run_bottle(cmd);
    drop(marked);
    let (status, stdout, stderr) = result?;
    if !stdout.contains("@@done") {
        bail!("the self-test bottle failed ({status}): {}", stderr.trim());
    }
    let mut rows: Vec<Row> = cases
        .iter()
        .zip(parse(&stdout, cases.len()))
        .map(|(c, r)| {
            let (verdict, evidence) = match r {
                Ok((false, e)) => (Verdict::Held, e),
                Ok((true, e)) => (Verdict::Escaped, e),
                Err(e) => (Verdict::Error, e),
            };
            match c.decoy.map(Hits::count) {
                Some(n) if n > 0 => Row {
                    case: c.label.to_string(),
                    backend: "namespace",
                    verdict: Verdict::Escaped,
                    evidence: format!("the host-side decoy was contacted {n} times ({evidence})"),
                },
                _ => Row {
                    case: c.label.to_string(),
                    backend: "namespace",
                    verdict,
                    evidence,
                },
            }
        })
        .collect();
    rows.push(self_test_row(&state.join("bot-bottle").join(&name).join("audit.jsonl")));
    Ok(rows)
}

/// Escape case 47: the bottle's own confinement self-test ran, and was refused, before anything the agent did.
fn self_test_row(audit: &Path) -> Row {
    let first = std::fs::read_to_string(audit)
        .ok()
        .and_then(|a| a.lines().next().map(str::to_string))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok());
    let (verdict, evidence) = match first {
        Some(l) if l["host"] == INIT_SELFTEST_HOST && l["decision"] == "deny" => (
            Verdict::Held,
            "the audit log opens with the self-test's refused request".to_string(),
        ),
        Some(l) => (
            Verdict::Error,
            format!("the audit log does not open with the self-test: {l}"),
        ),
        None => (Verdict::Error, format!("no audit log at {}", audit.display())),
    };
    Row {
        case: "47 confinement self-test before the agent".into(),
        backend: "namespace",
        verdict,
        evidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_each_step_and_fails_closed() {
        let out = "@@step 0\n{\"case\":\"x\",\"escaped\":false,\"evidence\":\"no\"}\n@@rc 0\n\
                   @@step 1\nnoise\n@@rc 3\n@@step 2\nnot json\n@@rc 0\n";
        let r = parse(out, 4);
        assert_eq!(r[0], Ok((false, "no".to_string())));
        assert!(r[1].as_ref().unwrap_err().contains("exit 3"));
        assert!(r[2].is_err());
        assert!(r[3].as_ref().unwrap_err().contains("never ran"));
    }

    #[test]
    fn table_has_the_three_columns_and_names_escapes() {
        let r = report(vec![
            Row {
                case: "01 a".into(),
                backend: "namespace",
                verdict: Verdict::Held,
                evidence: String::new(),
            },
            Row {
                case: "02 b".into(),
                backend: "namespace",
                verdict: Verdict::Escaped,
                evidence: "got out".into(),
            },
        ]);
        let t = render(&r);
        assert!(
            t.lines()
                .next()
                .unwrap()
                .split_whitespace()
                .eq(["CASE", "BACKEND", "VERDICT"])
        );
        assert!(t.contains("02 b  namespace  ESCAPED"));
        assert!(t.contains("ESCAPED 02 b: got out"));
        assert_eq!((r.held, r.escaped, r.errors), (1, 1, 0));
    }
}
