//! `bot-bottle proxy` as a user runs it (issue #3's acceptance): the real binary, the real `curl`, and local
//! upstreams on 127.0.0.1 (TLS with a CA minted here, and plain HTTP). Nothing leaves loopback: the upstream's
//! name resolves through `--resolve`, and every denied name is refused before any lookup.
//!
//! Skips, saying why, when /usr/bin/curl is missing; `BOTTLE_TEST_REQUIRE=namespace` (whose hosts drive bottles with
//! curl, as CI's do) turns that skip into a failure.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bottle_test_support::ca::{TestCa, server_config};
use bottle_test_support::child::{self, Lines, NoLine};
use bottle_test_support::{require, upstream};

const CURL: &str = "/usr/bin/curl";
/// Exit code for an invalid policy (src/exit.rs, README).
const EXIT_POLICY: i32 = 121;
/// A debug build on a shared 2-core machine can be slow to start; the wait returns as soon as the line appears.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
const AUDIT_TIMEOUT: Duration = Duration::from_secs(15);
const CURL_MAX_TIME_SECS: &str = "30";
const UPSTREAM_NAME: &str = "upstream.test";

// ---------------------------------------------------------------------------------------------------------------
// Skips

/// `Some(reason)` when curl is not there to drive the proxy.
fn curl_missing() -> Option<String> {
    if Path::new(CURL).is_file() {
        return None;
    }
    Some(format!("{CURL} is not installed (apt-get install curl)"))
}

macro_rules! need_curl {
    () => {
        if let Some(why) = curl_missing() {
            require::skip("namespace", &why);
            return;
        }
    };
}

/// The TLS upstream these tests use: a leaf for `upstream.test` signed by `ca`, HTTP/1.1 only. Returns its port.
fn tls_upstream(ca: &TestCa) -> u16 {
    upstream::https(server_config(&ca.leaf(&[UPSTREAM_NAME]), &[b"http/1.1"])).port
}

// ---------------------------------------------------------------------------------------------------------------
// The proxy process

struct RunningProxy {
    child: Child,
    addr: SocketAddr,
    stderr_path: PathBuf,
}

impl RunningProxy {
    /// Starts `bot-bottle proxy <args>` in `dir` (so no stray ./bottle.toml is read) and waits for its one line
    /// of output, `listening on <addr>`. `args` is split on whitespace (temporary paths hold none).
    fn start(dir: &Path, args: &str) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bot-bottle"));
        cmd.arg("proxy").args(args.split_whitespace());
        Self::spawn(cmd, dir)
    }

    /// As `start`, with the proxy in a private mount namespace where `hosts` is its `/etc/hosts`: the system
    /// resolver (getaddrinfo) then gives the proxy these answers, as a DNS server would. Needs root.
    fn start_with_hosts(dir: &Path, args: &str, hosts: &Path) -> Self {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
            .arg(hosts)
            .arg(env!("CARGO_BIN_EXE_bot-bottle"))
            .arg("proxy")
            .args(args.split_whitespace());
        Self::spawn(cmd, dir)
    }

    fn spawn(mut cmd: Command, dir: &Path) -> Self {
        let stderr_path = dir.join("proxy.stderr");
        let mut child = cmd
            .current_dir(dir)
            .env_remove("BOT_BOTTLE_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let lines = Lines::new(child.stdout.take().unwrap());
        let mut proxy = Self {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            stderr_path,
        };
        match lines.next_within(READY_TIMEOUT) {
            Ok(line) => {
                let Some(addr) = line.strip_prefix("listening on ") else {
                    panic!("unexpected output before `listening on`: {line}");
                };
                proxy.addr = addr.trim().parse().unwrap();
                proxy
            }
            Err(NoLine::Timeout) => panic!("no `listening on` within {READY_TIMEOUT:?}:\n{}", proxy.stderr()),
            Err(NoLine::Closed) => {
                let status = proxy.child.wait().unwrap();
                panic!(
                    "the proxy closed stdout ({status}) before listening:\n{}",
                    proxy.stderr()
                );
            }
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    fn terminate(mut self) -> ExitStatus {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let Some(status) = child::wait_timeout(&mut self.child, EXIT_TIMEOUT) else {
            panic!(
                "the proxy did not exit within {EXIT_TIMEOUT:?} of SIGTERM:\n{}",
                self.stderr()
            );
        };
        status
    }
}

impl Drop for RunningProxy {
    /// A failed assertion must not leave the proxy running.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// curl

struct Curl {
    /// curl's own exit code (0, or e.g. 56 for a refused CONNECT, 60 for an untrusted certificate).
    exit: i32,
    body: String,
    /// `%{http_code}`: the final response's status (0 when none).
    status: u16,
    /// `%{http_connect}`: the proxy's answer to CONNECT (0 when no CONNECT was sent).
    connect: u16,
    /// `-v` output: request and response headers, TLS details.
    verbose: String,
}

impl Curl {
    /// The value of a response header seen in the verbose output (`< name: value`), CONNECT responses included.
    fn header(&self, name: &str) -> Option<&str> {
        self.verbose.lines().find_map(|l| {
            let (n, v) = l.strip_prefix("< ")?.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// `curl -v --proxy http://<proxy> [--cacert <ca>] <url>` with no environment (no proxy or CA variables leak in),
/// no ~/.curlrc, and an empty CA directory: `ca` is the only certificate curl trusts.
fn curl(proxy: SocketAddr, ca: Option<&Path>, url: &str) -> Curl {
    let empty = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(CURL);
    cmd.env_clear()
        .arg("-q")
        .args(["-sS", "-v", "--max-time", CURL_MAX_TIME_SECS])
        .args(["--proxy", &format!("http://{proxy}")])
        .arg("--capath")
        .arg(empty.path());
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    let out = cmd
        .args(["-w", "\n%{http_code} %{http_connect}", url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, codes) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let mut codes = codes.split(' ').map(|c| c.trim().parse::<u16>().unwrap_or(0));
    Curl {
        exit: out.status.code().unwrap_or(-1),
        body: body.to_string(),
        status: codes.next().unwrap_or(0),
        connect: codes.next().unwrap_or(0),
        verbose: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The audit log

fn audit_lines(state: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}")))
        .collect()
}

/// Waits (bounded, with backoff) for an audit line with these field values: request records are written when the
/// exchange ends, which may be just after curl returns.
fn wait_audit(state: &Path, want: &[(&str, &str)]) -> serde_json::Value {
    let start = Instant::now();
    let mut wait = Duration::from_millis(10);
    loop {
        let lines = audit_lines(state);
        if let Some(hit) = lines
            .iter()
            .find(|v| want.iter().all(|(k, val)| v[*k].as_str() == Some(*val)))
        {
            return hit.clone();
        }
        assert!(
            start.elapsed() < AUDIT_TIMEOUT,
            "no audit line with {want:?} in:\n{}",
            lines.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tests

#[test]
fn intercepts_allowed_https_refuses_denied_hosts_naming_the_rule_and_audits_both() {
    need_curl!();
    let dir = tempfile::tempdir().unwrap();
    let upstream_ca = TestCa::mint(dir.path(), "upstream-ca", "bot-bottle test upstream CA");
    let (tls_port, http_port) = (tls_upstream(&upstream_ca), upstream::http().port);
    let state = dir.path().join("state");
    let port = upstream::free_port();
    let proxy = RunningProxy::start(
        dir.path(),
        &format!(
            "--listen 127.0.0.1:{port} --state-dir {state} \
             --allow {UPSTREAM_NAME}:{tls_port} --allow {UPSTREAM_NAME}:{http_port} --deny evil.test \
             --allow-cidr 127.0.0.1/32 --resolve {UPSTREAM_NAME}=127.0.0.1 --upstream-ca {upstream_ca}",
            state = state.display(),
            upstream_ca = upstream_ca.cert_path.display(),
        ),
    );
    assert_eq!(proxy.addr, SocketAddr::from(([127, 0, 0, 1], port)));
    let bottle_ca = state.join("ca.pem");
    assert!(bottle_ca.is_file(), "the proxy minted no CA in {}", state.display());

    // Allowed HTTPS: intercepted (curl trusts only the proxy's CA) and relayed to the TLS upstream.
    let ok = curl(
        proxy.addr,
        Some(&bottle_ca),
        &format!("https://{UPSTREAM_NAME}:{tls_port}/hello?q=1"),
    );
    assert_eq!((ok.exit, ok.connect, ok.status), (0, 200, 200), "{}", ok.verbose);
    assert_eq!(ok.body, "hello from tls upstream: GET /hello?q=1\n", "{}", ok.verbose);
    assert_eq!(ok.header("x-upstream"), Some("tls"));

    // Trusting only the upstream's own CA fails: the certificate curl sees is the proxy's, not the upstream's.
    let not_trusted = curl(
        proxy.addr,
        Some(&upstream_ca.cert_path),
        &format!("https://{UPSTREAM_NAME}:{tls_port}/"),
    );
    assert_eq!(not_trusted.exit, 60, "{}", not_trusted.verbose);

    // A host outside the allow list: 403 at CONNECT, the header names the rule and the fix.
    let denied = curl(proxy.addr, Some(&bottle_ca), "https://denied.test:443/");
    assert_eq!(denied.connect, 403, "{}", denied.verbose);
    assert_ne!(denied.exit, 0);
    assert_eq!(
        denied.header("x-bottle-denied"),
        Some("host=denied.test; rule=not-allowed; allow with: bot-bottle run --allow denied.test:443"),
        "{}",
        denied.verbose
    );
    // A deny-listed host.
    let evil = curl(proxy.addr, Some(&bottle_ca), "https://evil.test/");
    assert_eq!(evil.connect, 403, "{}", evil.verbose);
    let why = evil.header("x-bottle-denied").unwrap_or_default();
    assert!(why.contains("host=evil.test; rule=deny-list"), "{}", evil.verbose);

    // Plain HTTP, absolute-form: allowed and relayed; denied with the same header.
    let plain = curl(proxy.addr, None, &format!("http://{UPSTREAM_NAME}:{http_port}/plain"));
    assert_eq!((plain.exit, plain.status), (0, 200), "{}", plain.verbose);
    assert_eq!(plain.body, "hello from plain upstream: GET /plain\n");
    let plain_denied = curl(proxy.addr, None, &format!("http://other.test:{http_port}/x"));
    assert_eq!(
        (plain_denied.exit, plain_denied.status),
        (0, 403),
        "{}",
        plain_denied.verbose
    );
    let why = plain_denied.header("x-bottle-denied").unwrap_or_default();
    assert!(
        why.starts_with("host=other.test; rule=not-allowed"),
        "{}",
        plain_denied.verbose
    );
    assert!(plain_denied.body.contains("denied"), "{}", plain_denied.body);

    // The audit log has both verdicts, with the rule.
    wait_audit(
        &state,
        &[("decision", "allow"), ("host", UPSTREAM_NAME), ("scheme", "https")],
    );
    wait_audit(
        &state,
        &[("decision", "allow"), ("host", UPSTREAM_NAME), ("scheme", "http")],
    );
    wait_audit(
        &state,
        &[("decision", "deny"), ("host", "denied.test"), ("rule", "not-allowed")],
    );
    wait_audit(
        &state,
        &[("decision", "deny"), ("host", "evil.test"), ("rule", "deny-list")],
    );
    wait_audit(
        &state,
        &[("decision", "deny"), ("host", "other.test"), ("rule", "not-allowed")],
    );

    let stderr_path = proxy.stderr_path.clone();
    let status = proxy.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM should stop the proxy cleanly ({status}):\n{}",
        std::fs::read_to_string(stderr_path).unwrap_or_default()
    );
}

#[test]
fn signs_leaves_with_the_ca_it_is_given() {
    need_curl!();
    let dir = tempfile::tempdir().unwrap();
    let upstream_ca = TestCa::mint(dir.path(), "upstream-ca", "bot-bottle test upstream CA");
    let given = TestCa::mint(dir.path(), "given-ca", "bot-bottle test given CA");
    let tls_port = tls_upstream(&upstream_ca);
    let state = dir.path().join("state");
    let proxy = RunningProxy::start(
        dir.path(),
        &format!(
            "--listen 127.0.0.1:{port} --state-dir {state} --ca-cert {cert} --ca-key {key} \
             --allow {UPSTREAM_NAME}:{tls_port} --allow-cidr 127.0.0.1/32 --resolve {UPSTREAM_NAME}=127.0.0.1 \
             --upstream-ca {upstream_ca}",
            port = upstream::free_port(),
            state = state.display(),
            cert = given.cert_path.display(),
            key = given.key_path.display(),
            upstream_ca = upstream_ca.cert_path.display(),
        ),
    );
    let url = format!("https://{UPSTREAM_NAME}:{tls_port}/signed");
    let ok = curl(proxy.addr, Some(&given.cert_path), &url);
    assert_eq!((ok.exit, ok.status), (0, 200), "{}", ok.verbose);
    assert_eq!(ok.body, "hello from tls upstream: GET /signed\n");
    assert!(
        ok.verbose.contains("issuer: CN=bot-bottle test given CA"),
        "the leaf was not issued by the given CA:\n{}",
        ok.verbose
    );
    let other = curl(proxy.addr, Some(&upstream_ca.cert_path), &url);
    assert_eq!(other.exit, 60, "{}", other.verbose);
    // Given a CA, the proxy mints none of its own.
    assert!(!state.join("ca.pem").exists() && !state.join("ca-key.pem").exists());

    let status = proxy.terminate();
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn a_bad_flag_value_exits_121_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("fresh-state");
    let existing = dir.path().join("existing-state");
    std::fs::create_dir(&existing).unwrap();
    for state in [&fresh, &existing] {
        let out = Command::new(env!("CARGO_BIN_EXE_bot-bottle"))
            .args(["proxy", "--listen"])
            .arg(format!("127.0.0.1:{}", upstream::free_port()))
            .arg("--state-dir")
            .arg(state)
            .args(["--allow", "*.com"])
            .current_dir(dir.path())
            .env_remove("BOT_BOTTLE_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_POLICY), "{stderr}");
        assert!(
            stderr.contains("*.com"),
            "the error should name the bad value: {stderr}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
    }
    assert!(!fresh.exists(), "a refused policy created the state directory");
    assert_eq!(
        std::fs::read_dir(&existing).unwrap().count(),
        0,
        "a refused policy wrote state"
    );
}

/// `--deny HOST` takes no port, and "deny wins over allow" (README): a deny entry refuses its host on every port.
/// Regression: a port-less deny pattern once meant the default ports (80, 443) only, as for allow entries, so
/// `--allow '*.upstream.test:*' --deny secret.upstream.test` let `secret.upstream.test:<other port>` through.
#[test]
fn a_deny_entry_without_a_port_wins_on_every_port() {
    need_curl!();
    let dir = tempfile::tempdir().unwrap();
    let upstream_ca = TestCa::mint(dir.path(), "upstream-ca", "bot-bottle test upstream CA");
    let tls_port = tls_upstream(&upstream_ca);
    let state = dir.path().join("state");
    let proxy = RunningProxy::start(
        dir.path(),
        &format!(
            "--listen 127.0.0.1:{port} --state-dir {state} --allow *.upstream.test:* --deny secret.upstream.test \
             --allow-cidr 127.0.0.1/32 --resolve secret.upstream.test=127.0.0.1 --upstream-ca {upstream_ca}",
            port = upstream::free_port(),
            state = state.display(),
            upstream_ca = upstream_ca.cert_path.display(),
        ),
    );
    let bottle_ca = state.join("ca.pem");
    let on_443 = curl(proxy.addr, Some(&bottle_ca), "https://secret.upstream.test/");
    assert_eq!(on_443.connect, 403, "{}", on_443.verbose);
    let other_port = curl(
        proxy.addr,
        Some(&bottle_ca),
        &format!("https://secret.upstream.test:{tls_port}/"),
    );
    assert_eq!(
        other_port.connect, 403,
        "deny did not win on port {tls_port}:\n{}",
        other_port.verbose
    );
    assert_eq!(proxy.terminate().code(), Some(0));
}

/// Regression: AAAA answers in IPv6 forms that embed a private IPv4 address (local-use NAT64, SIIT, 6to4, Teredo)
/// were dialled. The answers come from the real system resolver (an `/etc/hosts` in the proxy's own mount
/// namespace), not from `--resolve`.
#[test]
fn aaaa_answers_that_embed_a_private_ipv4_address_are_never_dialled() {
    need_curl!();
    if !rustix::process::geteuid().is_root() {
        require::skip("namespace", "needs root to give the proxy its own /etc/hosts");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    let names = [
        ("64:ff9b:1::a00:1", "nat64.test"),
        ("::ffff:0:a00:1", "siit.test"),
        ("2002:a00:1::1", "sixtofour.test"),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "teredo.test"),
    ];
    let text: String = names.iter().map(|(ip, name)| format!("{ip} {name}\n")).collect();
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n{text}")).unwrap();
    let state = dir.path().join("state");
    let allow: String = names.iter().map(|(_, n)| format!(" --allow {n}")).collect();
    let proxy = RunningProxy::start_with_hosts(
        dir.path(),
        &format!(
            "--listen 127.0.0.1:{port} --state-dir {state}{allow}",
            port = upstream::free_port(),
            state = state.display()
        ),
        &hosts,
    );
    for (ip, name) in names {
        let out = curl(proxy.addr, None, &format!("http://{name}/"));
        assert_eq!(
            out.status,
            403,
            "{name} ({ip}) was not refused:\n{}\n{}",
            out.verbose,
            proxy.stderr()
        );
        let why = out.header("x-bottle-denied").unwrap_or_default().to_string();
        assert!(why.contains("rule=private-address"), "{name}: {why}");
    }
    assert_eq!(proxy.terminate().code(), Some(0));
}
