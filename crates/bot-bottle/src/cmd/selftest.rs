//! `selftest`: the escape catalogue (`bottle_probe::catalogue`, the cases the escape suite runs) run against this
//! host with the installed binaries: every case that needs no test-only fixture and no tool this host lacks. The
//! others are listed as left out, each with the reason. One bottle is launched with this very executable
//! (`bot-bottle run`, in a temporary workspace and state directory that are removed afterwards); `bottle-probe`,
//! found next to this executable, makes each attempt inside it, aimed at decoys on the host's loopback (TCP, UDP,
//! agent sockets, an abstract socket, a secret file, a marked process), at addresses that only exist outside the
//! bottle, and at the host's public resolvers and TEST-NET addresses (RFC 5737), which an escape would reach.
//! Trusts the probe's verdicts and the decoys' counters; anything it cannot read counts as an error, never as "held".
//!
//! On the container backend (`--image NAME`) the bottle is a container of the user's image; the probe runs there
//! with the launcher's own loader and libraries (bound into every container bottle), and the cases that drive a
//! tool run only where the image has it (a first bottle lists them).
//!
//! Prints `CASE  BACKEND  VERDICT` (`held`, `ESCAPED` or `error`), then the left-out cases; exit 0 when every case
//! held, 123 otherwise.

mod host;

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use bottle_probe::catalogue::{self, Case, Expect, Family};
use serde::Serialize;

use crate::cli::SelftestArgs;
use crate::exit::{SANDBOX, Unavailable};
use crate::output::Output;
use host::{CREDENTIAL_HOST, HOST_ENV_VAR, Planted, Scratch, TOKEN_VAR, UPSTREAM_IP};

const PROBE: &str = "bottle-probe";
/// The host the bottle's own confinement self-test asks for (bottle_sandbox::namespace::init::SELFTEST_HOST).
const INIT_SELFTEST_HOST: &str = "selftest.bot-bottle.invalid";

/// The backend the self-test's bottle runs on.
enum Target {
    Namespace,
    /// A container of this image: the probe runs with the launcher's loader and libraries (bound into every
    /// container bottle), the cases that drive tools run only where the image has those tools.
    Container(String, Option<String>),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Self::Namespace => "namespace",
            Self::Container(..) => "container",
        }
    }
}

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
    family: &'static str,
    backend: &'static str,
    verdict: Verdict,
    evidence: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
struct LeftOut {
    case: &'static str,
    family: &'static str,
    reason: String,
}

#[derive(Debug, Serialize)]
struct Report {
    backend: &'static str,
    held: usize,
    escaped: usize,
    errors: usize,
    cases: Vec<Row>,
    left_out: Vec<LeftOut>,
}

pub fn run(args: &SelftestArgs, out: &Output) -> anyhow::Result<u8> {
    let target = match (args.backend.as_str(), &args.image) {
        ("namespace", None) => Target::Namespace,
        ("container", Some(image)) => Target::Container(archive_from_here(image)?, args.runtime.clone()),
        ("container", None) => {
            return Err(crate::exit::Usage(
                "`selftest --backend container` needs --image NAME: the image your agents' bottles run".into(),
            )
            .into());
        }
        (_, Some(_)) if args.backend != "smolmachines" => {
            return Err(crate::exit::Usage("--image is for `selftest --backend container`".into()).into());
        }
        _ => {
            return Err(Unavailable {
                verb: "selftest",
                reason: "the smolmachines backend cannot be self-tested: the catalogue's cases would have to run \
                         inside a guest and be judged against decoys the guest can reach, which is not built yet",
            }
            .into());
        }
    };
    let report = match selftest(&target) {
        Ok((rows, left_out)) => report(rows, left_out, target.name()),
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

fn report(cases: Vec<Row>, left_out: Vec<LeftOut>, backend: &'static str) -> Report {
    let count = |v| cases.iter().filter(|r| r.verdict == v).count();
    Report {
        backend,
        held: count(Verdict::Held),
        escaped: count(Verdict::Escaped),
        errors: count(Verdict::Error),
        cases,
        left_out,
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
        "\n{} cases: {} held, {} escaped, {} errors; {} catalogue cases left out",
        r.cases.len(),
        r.held,
        r.escaped,
        r.errors,
        r.left_out.len()
    );
    for c in r.cases.iter().filter(|c| c.verdict != Verdict::Held) {
        let _ = writeln!(s, "{} {}: {}", c.verdict.word(), c.case, c.evidence);
    }
    if !r.left_out.is_empty() {
        s.push('\n');
    }
    for l in &r.left_out {
        let _ = writeln!(s, "left out {}: {}", l.case, l.reason);
    }
    s
}

/// A catalogue case the self-test runs.
struct Chosen {
    family: &'static Family,
    case: &'static Case,
    argv: Vec<String>,
}

/// Splits the catalogue into the cases this host can run and the ones it leaves out, with why.
fn choose(p: &Planted, has_tool: impl Fn(&str) -> bool) -> (Vec<Chosen>, Vec<LeftOut>) {
    let mut chosen = Vec::new();
    let mut left_out = Vec::new();
    for (family, case) in catalogue::all() {
        let mut leave = |reason: String| {
            left_out.push(LeftOut {
                case: case.id,
                family: family.name,
                reason,
            });
        };
        if let Some(need) = case.test_only() {
            leave(need.reason());
            continue;
        }
        if let Some(need) = case
            .needs
            .iter()
            .find(|n| matches!(n, catalogue::Needs::Tool(t) if !has_tool(t)))
        {
            leave(need.reason());
            continue;
        }
        if let Some((_, why)) = p.missing.iter().find(|(name, _)| case.placeholders().contains(name)) {
            leave(why.clone());
            continue;
        }
        match case.argv(&p.values) {
            Ok(argv) => chosen.push(Chosen { family, case, argv }),
            Err(e) => leave(format!("the self-test has {e}")),
        }
    }
    (chosen, left_out)
}

fn quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// Step `tools` checks that every tool a chosen case drives is in the bottle; then one step per chosen case.
/// `probe` is how the bottle starts the probe (`./bottle-probe`, or that behind the launcher's loader).
fn script(probe: &str, tools: &[&str], chosen: &[Chosen]) -> String {
    let mut s = String::from("step() { id=$1; shift; echo \"@@step $id\"; \"$@\"; echo \"@@rc $?\"; }\n");
    let check = format!(
        "for t in {}; do command -v \"$t\" >/dev/null || {{ echo \"$t is not installed\"; exit 1; }}; done",
        tools.join(" ")
    );
    let _ = writeln!(s, "step tools {probe} command sh -c {}", quote(&check));
    for (i, c) in chosen.iter().enumerate() {
        let args: Vec<String> = c.argv.iter().map(|a| quote(a)).collect();
        let _ = writeln!(s, "step {i} {probe} {}", args.join(" "));
    }
    s.push_str("echo @@done\n");
    s
}

/// What one step's probe printed.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    escaped: bool,
    evidence: String,
    detail: serde_json::Value,
}

type Step = Result<Seen, String>;

/// Each step's outcome by id (`tools`, `0`, `1`, ...), or why there is no verdict.
fn parse(stdout: &str) -> std::collections::BTreeMap<String, Step> {
    let mut out = std::collections::BTreeMap::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    for line in stdout.lines() {
        if let Some(id) = line.strip_prefix("@@step ") {
            current = Some((id.trim().to_string(), Vec::new()));
        } else if let Some(rc) = line.strip_prefix("@@rc ") {
            let Some((id, lines)) = current.take() else { continue };
            let verdicts: Vec<serde_json::Value> = lines.iter().filter_map(|l| serde_json::from_str(l).ok()).collect();
            let result = match (rc.trim(), verdicts.as_slice()) {
                ("0", [v]) => match (v["escaped"].as_bool(), v["evidence"].as_str()) {
                    (Some(escaped), Some(evidence)) => Ok(Seen {
                        escaped,
                        evidence: evidence.to_string(),
                        detail: v.get("detail").cloned().unwrap_or_default(),
                    }),
                    _ => Err(format!("unparseable verdict {v}")),
                },
                ("0", _) => Err(format!("expected one verdict, got {lines:?}")),
                (rc, _) => Err(format!("the probe could not run (exit {rc})")),
            };
            out.insert(id, result);
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line);
        }
    }
    out
}

/// A step's verdict under the catalogue's expectation. A refusal must be the proxy's (403 with `x-bottle-denied`); a
/// control must get through, or the cases around it prove nothing.
fn judge(expect: Expect, step: Option<&Step>) -> (Verdict, String) {
    let seen = match step {
        None => return (Verdict::Error, "the step never ran".into()),
        Some(Err(e)) => return (Verdict::Error, e.clone()),
        Some(Ok(seen)) => seen,
    };
    let e = seen.evidence.clone();
    match (expect, seen.escaped) {
        (Expect::Control, true) => (Verdict::Held, format!("control reached: {e}")),
        (Expect::Control, false) => (Verdict::Error, format!("the control failed, so it proves nothing: {e}")),
        (Expect::JudgedOutside, _) => (
            Verdict::Held,
            format!("inside the bottle: {e}; what counts is checked outside it (c44-host-untouched)"),
        ),
        (_, true) => (Verdict::Escaped, e),
        (Expect::Held, false) => (Verdict::Held, e),
        (Expect::Refused, false) => {
            let refused = seen.detail["status"] == 403 && seen.detail["denied"].is_string();
            if refused {
                (Verdict::Held, e)
            } else {
                (
                    Verdict::Error,
                    format!("held, but not by the proxy's refusal (403): {e}"),
                )
            }
        }
    }
}

fn selftest(target: &Target) -> anyhow::Result<(Vec<Row>, Vec<LeftOut>)> {
    let backend = target.name();
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let probe = exe.with_file_name(PROBE);
    if !probe.is_file() {
        bail!(
            "{PROBE} is not installed next to {}: install it beside bot-bottle (`cargo install --path crates/{PROBE}`, \
             or `cargo build --workspace`)",
            exe.display()
        );
    }
    let scratch = Scratch::new()?;
    let (work, state, host_dir) = (scratch.work(), scratch.state(), scratch.host());
    let in_work = work.join(PROBE);
    std::fs::copy(&probe, &in_work).with_context(|| format!("cannot copy {}", probe.display()))?;
    std::fs::set_permissions(&in_work, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let mut planted = host::plant(&scratch, &home)?;
    let name = format!("selftest-{}", &host::random_hex()?[..6]);
    let control = state.join("bot-bottle").join(&name).join(crate::live::CONTROL_SOCKET);
    planted.values.set("control_sock", control.display());
    let policy = host_dir.join("policy.toml");
    let port = planted.upstream_port;
    std::fs::write(
        &policy,
        format!(
            "[network]\nallow = [\"{CREDENTIAL_HOST}:{port}\"]\nallow_cidr = [\"{UPSTREAM_IP}/32\"]\n\
             [network.resolve]\n\"{CREDENTIAL_HOST}\" = \"{UPSTREAM_IP}\"\n\n[[credential]]\n\
             host = \"{CREDENTIAL_HOST}\"\nheader = \"authorization\"\nfrom_env = \"{TOKEN_VAR}\"\n"
        ),
    )?;
    let bottle = |cmd: &mut Command| {
        cmd.current_dir(&work)
            .env("XDG_STATE_HOME", &state)
            .env_remove("BOT_BOTTLE_LOG");
        if let Target::Container(image, runtime) = target {
            cmd.args(["--backend", "container", "--image", image]);
            if let Some(runtime) = runtime {
                cmd.args(["--runtime", runtime]);
            }
        }
    };
    // The probe as the bottle starts it; on the container backend the image's tools are the ones that count.
    let (probe_argv, found_tools) = match target {
        Target::Namespace => (format!("./{PROBE}"), None),
        Target::Container(..) => {
            // SECURITY: a root launcher's container bottle runs as the workspace's owner, never root.
            if rustix::process::geteuid().is_root() {
                std::os::unix::fs::chown(&work, Some(NOBODY), Some(NOBODY))?;
            }
            let runtime = bottle_sandbox::container::sockets::Runtime::of_this_process()
                .context("cannot find this executable's libraries")?;
            let mut argv = runtime.loader_prefix();
            argv.push(format!("./{PROBE}"));
            (argv.join(" "), Some(image_tools(&exe, &bottle)?))
        }
    };
    let has_tool = |t: &str| match &found_tools {
        Some(found) => found.iter().any(|f| f == t),
        None => host::has_tool(t),
    };
    let (chosen, left_out) = choose(&planted, has_tool);
    let mut tools: Vec<&str> = chosen.iter().flat_map(|c| c.case.tools()).collect();
    tools.sort_unstable();
    tools.dedup();
    let mut cmd = Command::new(&exe);
    cmd.args(["run", "--name", &name, "--policy"]).arg(&policy);
    bottle(&mut cmd);
    cmd.args(["--", "sh", "-c", &script(&probe_argv, &tools, &chosen)])
        .current_dir(&work)
        .env("XDG_STATE_HOME", &state)
        .env(TOKEN_VAR, &planted.secret)
        .env(HOST_ENV_VAR, &planted.host_env)
        .env("SSH_AUTH_SOCK", &planted.agent_path)
        .env_remove("BOT_BOTTLE_LOG");
    let result = host::run_bottle(cmd);
    let (status, stdout, stderr) = result?;
    if !stdout.contains("@@done") {
        bail!("the self-test bottle failed ({status}): {}", stderr.trim());
    }
    let steps = parse(&stdout);
    let tools_ok = match judge(Expect::Control, steps.get("tools")) {
        (Verdict::Held, _) => None,
        (_, why) => Some(format!("a tool the case drives is missing in the bottle: {why}")),
    };
    let mut rows: Vec<Row> = chosen
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (mut verdict, mut evidence) = judge(c.case.expect, steps.get(&i.to_string()));
            if let (Some(why), true) = (&tools_ok, c.case.tools().next().is_some()) {
                (verdict, evidence) = (Verdict::Error, why.clone());
            }
            let names = c.case.placeholders();
            let contacts: usize = planted
                .decoys
                .iter()
                .filter(|(name, _)| names.contains(name))
                .map(|(_, hits)| hits.count())
                .sum();
            if contacts > 0 {
                (verdict, evidence) = (
                    Verdict::Escaped,
                    format!("the host-side decoy was contacted {contacts} times ({evidence})"),
                );
            }
            Row {
                case: c.case.id.to_string(),
                family: c.family.name,
                backend,
                verdict,
                evidence,
            }
        })
        .collect();
    rows.push(unwritten_row(&planted.unwritten, backend));
    rows.push(self_test_row(
        &state.join("bot-bottle").join(&name).join("audit.jsonl"),
        backend,
    ));
    drop(planted);
    drop(scratch);
    Ok((rows, left_out))
}

/// An archive's relative path (`./…`, `../…`) made absolute here: the bottle runs from its own workspace.
fn archive_from_here(image: &str) -> anyhow::Result<String> {
    if !(image.starts_with("./") || image.starts_with("../")) {
        return Ok(image.to_string());
    }
    let here = std::env::current_dir().context("cannot read the current directory")?;
    Ok(here.join(image).display().to_string())
}

/// The uid a root launcher's container bottle runs as (the workspace is handed to it).
const NOBODY: u32 = 65534;

/// The tools of the catalogue the image has (`command -v` in a bottle of it).
fn image_tools(exe: &Path, bottle: &dyn Fn(&mut Command)) -> anyhow::Result<Vec<String>> {
    let all: Vec<&str> = {
        let mut t: Vec<&str> = catalogue::all().flat_map(|(_, c)| c.tools()).collect();
        t.sort_unstable();
        t.dedup();
        t
    };
    let mut cmd = Command::new(exe);
    cmd.args(["run", "--rm"]);
    bottle(&mut cmd);
    let check = format!(
        "for t in {}; do command -v \"$t\" >/dev/null 2>&1 && echo \"@@tool $t\"; done; echo @@done",
        all.join(" ")
    );
    cmd.args(["--", "sh", "-c", &check]);
    let (status, stdout, stderr) = host::run_bottle(cmd)?;
    if !stdout.contains("@@done") {
        bail!(
            "a bottle of the image could not list its tools ({status}): {}",
            stderr.trim()
        );
    }
    Ok(stdout
        .lines()
        .filter_map(|l| l.strip_prefix("@@tool "))
        .map(String::from)
        .collect())
}

/// Escape case 44 on the host side: none of the paths the bottle tried to write exists on the host (a path that
/// does is removed again, and reported).
fn unwritten_row(paths: &[std::path::PathBuf], backend: &'static str) -> Row {
    let written: Vec<String> = paths
        .iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .map(|p| {
            let _ = std::fs::remove_file(p);
            p.display().to_string()
        })
        .collect();
    let (verdict, evidence) = if written.is_empty() {
        (Verdict::Held, format!("none of {} host paths was created", paths.len()))
    } else {
        (
            Verdict::Escaped,
            format!("the bottle created {} on the host", written.join(", ")),
        )
    };
    Row {
        case: "c44-host-untouched".into(),
        family: catalogue::LOCAL_IPC_KERNEL.name,
        backend,
        verdict,
        evidence,
    }
}

/// Escape case 47: the bottle's own confinement self-test ran, and was refused, before anything the agent did.
fn self_test_row(audit: &Path, backend: &'static str) -> Row {
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
        case: "c47-confinement-self-test".into(),
        family: "lifecycle",
        backend,
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
                   @@step 1\nnoise\n@@rc 3\n@@step 2\nnot json\n@@rc 0\n@@step 3\n";
        let r = parse(out);
        assert_eq!(judge(Expect::Held, r.get("0")), (Verdict::Held, "no".to_string()));
        assert!(judge(Expect::Held, r.get("1")).1.contains("exit 3"));
        assert_eq!(judge(Expect::Held, r.get("2")).0, Verdict::Error);
        assert_eq!(
            judge(Expect::Held, r.get("3")),
            (Verdict::Error, "the step never ran".into())
        );
    }

    #[test]
    fn a_refusal_must_be_the_proxys_and_a_control_must_get_through() {
        let seen = |escaped, detail| -> Step {
            Ok(Seen {
                escaped,
                evidence: "e".into(),
                detail,
            })
        };
        let denied = serde_json::json!({"status": 403, "denied": "rule=not-allowed"});
        assert_eq!(judge(Expect::Refused, Some(&seen(false, denied))).0, Verdict::Held);
        let reset = serde_json::json!({"status": 502});
        assert_eq!(judge(Expect::Refused, Some(&seen(false, reset))).0, Verdict::Error);
        assert_eq!(
            judge(Expect::Refused, Some(&seen(true, serde_json::Value::Null))).0,
            Verdict::Escaped
        );
        assert_eq!(
            judge(Expect::Control, Some(&seen(true, serde_json::Value::Null))).0,
            Verdict::Held
        );
        assert_eq!(
            judge(Expect::Control, Some(&seen(false, serde_json::Value::Null))).0,
            Verdict::Error
        );
    }

    #[test]
    fn every_test_only_case_is_left_out_with_its_reason_and_so_is_a_missing_tool() {
        let s = Scratch::new().unwrap();
        let p = host::plant(&s, "/nonexistent-home").unwrap();
        let (chosen, left_out) = choose(&p, |t| t != "ssh");
        assert_eq!(chosen.len() + left_out.len(), catalogue::all().count());
        for (_, c) in catalogue::all() {
            let left = left_out.iter().find(|l| l.case == c.id);
            if let Some(need) = c.test_only() {
                assert_eq!(left.map(|l| l.reason.clone()), Some(need.reason()), "{}", c.id);
            }
        }
        let ssh = left_out.iter().find(|l| l.case == "c07-ssh-client").unwrap();
        assert!(ssh.reason.contains("`ssh`"), "{ssh:?}");
        assert!(chosen.len() >= 51, "{}", chosen.len());
    }

    #[test]
    fn table_has_the_three_columns_names_escapes_and_lists_what_was_left_out() {
        let row = |case: &str, verdict, evidence: &str| Row {
            case: case.into(),
            family: "f",
            backend: "namespace",
            verdict,
            evidence: evidence.into(),
        };
        let r = report(
            vec![
                row("c01-a", Verdict::Held, ""),
                row("c02-b", Verdict::Escaped, "got out"),
            ],
            vec![LeftOut {
                case: "c10-c",
                family: "f",
                reason: "needs a second bottle".into(),
            }],
            "namespace",
        );
        let t = render(&r);
        assert!(
            t.lines()
                .next()
                .unwrap()
                .split_whitespace()
                .eq(["CASE", "BACKEND", "VERDICT"])
        );
        assert!(t.contains("c02-b  namespace  ESCAPED"));
        assert!(t.contains("ESCAPED c02-b: got out"));
        assert!(t.contains("left out c10-c: needs a second bottle"));
        assert_eq!((r.held, r.escaped, r.errors), (1, 1, 0));
    }
}
