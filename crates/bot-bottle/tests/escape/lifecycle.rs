//! Escape cases 46–51, lifecycle and fail-closed: the agent never runs when the proxy or the confinement check fails,
//! the self-test's evidence, a rejected policy reload, `kill -9` of the launcher, two bottles launched at the same
//! instant, and a 64 MiB upload through an allowed tunnel. Each case drives its own bottles (they are about launches,
//! so they cannot share one); they share one lab. Also `bot-bottle selftest`, the same idea run by users.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::decoys;
use crate::lab::Lab;
use crate::scenario::{self, BB, Env, LAUNCHERS, Launch, RUN_TIMEOUT, Script, hex, output_within, text};

static LAB: scenario::Cells<Lab> = scenario::Cells::new();

/// The lab the cases share, once per backend that runs here. Each case drives its own bottles in it.
fn labs() -> Vec<&'static Lab> {
    scenario::family(&LAB, Lab::new, |_| {})
}

/// Polls `done` every 50 ms for up to `timeout`.
fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// Host pids whose command line contains `marker`.
fn host_pids_with(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .collect()
}

#[test]
fn case_46_when_the_proxy_or_the_confinement_check_fails_the_agent_never_runs() {
    for lab in labs() {
        for (who, user) in LAUNCHERS {
            let env = Env::new();
            let agent = |name: &str| {
                let marker = env.work().join(format!("{name}.agent-ran"));
                (vec!["touch".to_string(), marker.display().to_string()], marker)
            };

            // The proxy cannot start: its upstream CA does not parse.
            let bad_ca = env.host().join("bad-ca.pem");
            std::fs::write(&bad_ca, "this is not a certificate\n").unwrap();
            if let Some(uid) = user {
                // Readable, so the launcher fails on the contents, not on permissions.
                scenario::readable(&[&env.host(), &bad_ca]);
                env.open_to(uid);
            }
            let (touch, marker) = agent("c46-bad-ca");
            let out = output_within(
                Launch::new(lab, &env, "c46-bad-ca")
                    .user(user)
                    .flags(&["--upstream-ca", &bad_ca.display().to_string()])
                    .command(&touch.iter().map(String::as_str).collect::<Vec<_>>()),
                RUN_TIMEOUT,
            );
            // A bad --upstream-ca is a bad flag: refused before anything starts (issue #13).
            assert_eq!(out.status.code(), Some(121), "({who} launcher) {}", text(&out));
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("bad-ca.pem"),
                "the error must say why ({who} launcher): {}",
                text(&out)
            );
            assert!(
                !marker.exists(),
                "the agent ran although the proxy could not start ({who} launcher)"
            );

            // The proxy cannot listen: the bottle's address cannot be bound where the launcher runs. The lab's loopback
            // holds 127.0.0.1/32 alone, which no user (root or not) can bind a 127.0.0.N address beside.
            let unbindable = Lab::without_bottle_addresses();
            let (touch, marker) = agent("c46-unbindable");
            let out = output_within(
                Launch::new(&unbindable, &env, "c46-unbindable")
                    .user(user)
                    .command(&touch.iter().map(String::as_str).collect::<Vec<_>>()),
                RUN_TIMEOUT,
            );
            assert!(!out.status.success(), "({who} launcher) {}", text(&out));
            assert!(
                matches!(out.status.code(), Some(122..=125)),
                "not a bot-bottle failure ({who} launcher): {}",
                text(&out)
            );
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("127.0.0."),
                "the error must name the address ({who} launcher): {}",
                text(&out)
            );
            assert!(
                !marker.exists(),
                "the agent ran although the proxy could not listen ({who} launcher)"
            );

            // The confinement self-test fails: a policy that allows the self-test's own probe host makes the proxy
            // answer it.
            let sabotage = Lab::new();
            let up = sabotage.enter(|| decoys::http("127.0.0.1:80", "selftest-sabotage"));
            let (touch, marker) = agent("c46-self-test");
            let out = output_within(
                Launch::new(&sabotage, &env, "c46-self-test")
                    .user(user)
                    .flags(&[
                        "--allow",
                        "selftest.bot-bottle.invalid:80",
                        "--resolve",
                        "selftest.bot-bottle.invalid=127.0.0.1",
                        "--allow-cidr",
                        "127.0.0.1/32",
                    ])
                    .command(&touch.iter().map(String::as_str).collect::<Vec<_>>()),
                RUN_TIMEOUT,
            );
            let why = text(&out);
            if out.status.code() == Some(121) {
                // The policy refused to allow the self-test host: the self-test cannot be fooled this way either.
                assert!(why.contains("selftest"), "({who} launcher) {why}");
            } else {
                assert_eq!(out.status.code(), Some(123), "({who} launcher) {why}");
                assert!(
                    why.contains("self-test"),
                    "the error must name the failed self-test ({who} launcher): {why}"
                );
                assert_eq!(
                    up.seen().len(),
                    1,
                    "the self-test's request should have reached the sabotaging upstream ({who} launcher)"
                );
            }
            assert!(
                !marker.exists(),
                "the agent ran although the confinement self-test failed ({who} launcher)"
            );
        }
    }
}

#[test]
fn case_47_before_the_agent_starts_proxy_reachable_and_direct_egress_blocked_are_checked() {
    for lab in labs() {
        for (who, user) in LAUNCHERS {
            let env = Env::new();
            if let Some(uid) = user {
                env.open_to(uid);
            }
            let mut sc = Script::default();
            sc.probe("proxy-reachable", &["tcp-connect", "127.0.0.1:3128"])
                .probe("direct-blocked", &["tcp-connect", "192.0.2.1:80"])
                .probe("agent-request", &["proxy-get", "http://agent-first.test/"]);
            let ran = scenario::Runs(vec![(who, Launch::new(lab, &env, "c47").user(user).run(&sc))]);
            ran.reached("proxy-reachable");
            ran.held("direct-blocked");
            ran.refused("agent-request");
            let audit = env.audit("c47");
            let first = audit
                .first()
                .unwrap_or_else(|| panic!("empty audit log ({who} launcher)"));
            assert_eq!(
                first["host"], "selftest.bot-bottle.invalid",
                "the self-test must come first ({who} launcher): {audit:#?}"
            );
            assert_eq!(first["decision"], "deny", "({who} launcher) {first}");
            let agent_at = audit
                .iter()
                .position(|l| l["host"] == "agent-first.test")
                .unwrap_or_else(|| panic!("the agent's request ({who} launcher)"));
            assert!(agent_at > 0, "({who} launcher) {audit:#?}");
            assert_eq!(env.state_json("c47")["status"], "exited", "({who} launcher)");
        }
    }
}

// Launches no bottle: it drives a standalone `bot-bottle proxy` and signals it, so there is no launcher user to vary.
#[test]
fn case_48_a_rejected_policy_reload_keeps_the_previous_policy() {
    for lab in labs() {
        let env = Env::new();
        let up = lab.enter(|| decoys::http("127.0.0.1:0", "reload"));
        let port = up.port;
        let policy = env.host().join("policy.toml");
        let write = |allow: &str| {
            let toml = format!(
                "[network]\nallow = [{allow}]\nallow_cidr = [\"127.0.0.1/32\"]\n[network.resolve]\n\
             \"a.test\" = \"127.0.0.1\"\n\"b.test\" = \"127.0.0.1\"\n"
            );
            std::fs::write(&policy, toml).unwrap();
        };
        write("\"a.test:*\"");
        let state = env.host().join("proxy-state");
        let mut child = lab
            .command(BB)
            .args([
                "proxy",
                "--policy",
                &policy.display().to_string(),
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
            ])
            .arg(&state)
            .env_remove("BOT_BOTTLE_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .expect("no listen line")
            .to_string();
        let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
        let get = |host: &str| {
            scenario::probe_unconfined(
                lab,
                &[("BOTTLE_PROBE_PROXY", &addr)],
                &["proxy-get", &format!("http://{host}:{port}/c48")],
            )
        };
        let audit_has = |rule: &str| {
            let rule = rule.to_string();
            eventually(Duration::from_secs(10), || {
                std::fs::read_to_string(state.join("audit.jsonl")).is_ok_and(|a| a.contains(&rule))
            })
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            assert!(get("a.test").escaped, "a.test must be allowed at first");
            assert!(!get("b.test").escaped);

            std::fs::write(&policy, "[network]\nallow = [\"*\"]\n").unwrap();
            rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
            assert!(audit_has("reload-refused"), "the bad policy was not refused");
            let a = get("a.test");
            assert!(a.escaped, "the previous policy must stay in force: {a:#?}");
            let b = get("b.test");
            assert!(!b.escaped && b.status() == Some(403), "{b:#?}");

            // A good reload does take effect, so the refusal above was a real decision.
            write("\"b.test:*\"");
            rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
            assert!(audit_has("policy-reloaded"), "the good policy was not loaded");
            assert!(!get("a.test").escaped);
            assert!(get("b.test").escaped);
        }));
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let _ = child.wait();
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }
}

#[test]
fn case_49_kill_9_of_the_launcher_leaves_nothing_running_and_the_lease_reaped() {
    for lab in labs() {
        for (who, user) in LAUNCHERS {
            let env = Env::new();
            if let Some(uid) = user {
                env.open_to(uid);
            }
            let markers: Vec<String> = (0..4).map(|_| scenario::token("bb-escape-survivor-")).collect();
            // The agent tries to outlive its bottle: a background child, a new session, nohup, and ignoring TERM/HUP.
            let agent = format!(
                "bash -c 'exec -a {0} sleep 600' &\n\
             setsid bash -c 'exec -a {1} sleep 600' &\n\
             nohup bash -c 'trap \"\" HUP TERM; exec -a {2} sleep 600' >/dev/null 2>&1 &\n\
             exec bash -c 'trap \"\" HUP TERM INT; exec -a {3} sleep 600'",
                markers[0], markers[1], markers[2], markers[3]
            );
            let out = output_within(
                Launch::new(lab, &env, "c49")
                    .user(user)
                    .flags(&["-d"])
                    .command(&["sh", "-c", &agent]),
                RUN_TIMEOUT,
            );
            assert!(out.status.success(), "({who} launcher) {}", text(&out));
            assert!(
                eventually(Duration::from_secs(10), || markers
                    .iter()
                    .all(|m| !host_pids_with(m).is_empty())),
                "the agent's processes never all started ({who} launcher)"
            );
            let st = env.state_json("c49");
            let supervisor = st["supervisor_pid"].as_u64().unwrap() as i32;
            let init = st["init_pid"].as_u64().unwrap() as i32;
            let proxy: std::net::SocketAddr = st["proxy_url"]
                .as_str()
                .unwrap()
                .trim_start_matches("http://")
                .parse()
                .unwrap();
            rustix::process::kill_process(
                rustix::process::Pid::from_raw(supervisor).unwrap(),
                rustix::process::Signal::KILL,
            )
            .unwrap();
            let gone = eventually(Duration::from_secs(10), || {
                markers.iter().all(|m| host_pids_with(m).is_empty()) && !Path::new(&format!("/proc/{init}")).exists()
            });
            let left: Vec<u32> = markers.iter().flat_map(|m| host_pids_with(m)).collect();
            assert!(gone, "processes outlived the launcher ({who} launcher): {left:?}");
            let spec = env.bottle_dir("c49").display().to_string();
            assert!(
                host_pids_with(&spec).is_empty(),
                "a bottle helper outlived the launcher ({who} launcher)"
            );
            assert!(
                !lab.enter(|| decoys::reachable(proxy)),
                "the proxy outlived the launcher ({who} launcher)"
            );
            let out = output_within(env.bb(lab, user, &["--json".into(), "ls".into()]), RUN_TIMEOUT);
            let rows: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("({who} launcher) ls: {e}: {}", text(&out)));
            assert_eq!(rows[0]["state"], "failed", "({who} launcher) {rows}");
            let leases = std::fs::read_dir(env.state().join("bot-bottle/leases"))
                .unwrap()
                .count();
            assert_eq!(leases, 0, "the lease was not reaped ({who} launcher)");
        }
    }
}

#[test]
fn case_50_bottles_launched_at_the_same_instant_get_different_addresses_and_cas() {
    for lab in labs() {
        let up = lab.enter(|| decoys::http("127.0.0.1:0", "twins"));
        let allow = format!("up.test:{}", up.port);
        let flags = [
            "-d",
            "--allow",
            &allow,
            "--resolve",
            "up.test=127.0.0.1",
            "--allow-cidr",
            "127.0.0.1/32",
        ];
        for (who, user) in LAUNCHERS {
            let env = Env::new();
            if let Some(uid) = user {
                env.open_to(uid);
            }
            let barrier = Barrier::new(2);
            let outs: Vec<_> = std::thread::scope(|s| {
                let handles: Vec<_> = ["twin-a", "twin-b"]
                    .map(|name| {
                        let (env, barrier) = (&env, &barrier);
                        s.spawn(move || {
                            let cmd = Launch::new(lab, env, name)
                                .user(user)
                                .flags(&flags)
                                .command(&["sleep", "600"]);
                            barrier.wait();
                            output_within(cmd, RUN_TIMEOUT)
                        })
                    })
                    .into_iter()
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                for out in &outs {
                    assert!(out.status.success(), "({who} launcher) {}", text(out));
                }
                let (a, b) = (env.state_json("twin-a"), env.state_json("twin-b"));
                assert_ne!(a["addr"], b["addr"], "two bottles share an address ({who} launcher)");
                let ca = |name: &str| std::fs::read_to_string(env.bottle_dir(name).join("ca.pem")).unwrap();
                let (ca_a, ca_b) = (ca("twin-a"), ca("twin-b"));
                assert_ne!(ca_a, ca_b, "two bottles share a CA ({who} launcher)");
                let exec = |name: &str, args: &[&str]| {
                    let mut argv: Vec<String> = vec!["exec".into(), name.into(), "--".into(), "./bottle-probe".into()];
                    argv.extend(args.iter().map(ToString::to_string));
                    let out = output_within(env.bb(lab, user, &argv), RUN_TIMEOUT);
                    assert_eq!(out.status.code(), Some(0), "({who} launcher) {}", text(&out));
                    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    v["escaped"].as_bool().unwrap()
                };
                let port = up.port;
                assert!(
                    exec("twin-a", &["proxy-get", &format!("http://up.test:{port}/from-a-{who}")]),
                    "({who} launcher) bottle a cannot reach its upstream"
                );
                assert!(
                    exec("twin-b", &["proxy-get", &format!("http://up.test:{port}/from-b-{who}")]),
                    "({who} launcher) bottle b cannot reach its upstream"
                );
                let b_proxy = b["proxy_url"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("http://")
                    .to_string();
                assert!(
                    !exec("twin-a", &["tcp-connect", &b_proxy]),
                    "bottle a reached bottle b's proxy ({who} launcher)"
                );
                let b_ca_line = ca_b.lines().nth(3).unwrap();
                assert!(
                    !exec(
                        "twin-a",
                        &["read-file", "/etc/bot-bottle/ca-bundle.pem", &hex(b_ca_line)]
                    ),
                    "bottle a trusts bottle b's CA ({who} launcher)"
                );
                let audit = |name: &str| {
                    env.audit(name)
                        .iter()
                        .map(|l| l["path"].as_str().unwrap_or("").to_string())
                        .collect::<Vec<_>>()
                };
                let (aa, ab) = (audit("twin-a"), audit("twin-b"));
                let (pa, pb) = (format!("/from-a-{who}"), format!("/from-b-{who}"));
                assert!(aa.contains(&pa) && !aa.contains(&pb), "({who} launcher) {aa:?}");
                assert!(ab.contains(&pb) && !ab.contains(&pa), "({who} launcher) {ab:?}");
            }));
            for name in ["twin-a", "twin-b"] {
                let _ = output_within(env.bb(lab, user, &["stop".into(), name.into()]), RUN_TIMEOUT);
            }
            if let Err(e) = result {
                std::panic::resume_unwind(e);
            }
        }
    }
}

#[test]
fn case_51_a_64_mib_upload_through_an_allowed_tunnel_arrives_intact() {
    const SIZE: u64 = 64 * 1024 * 1024;
    for lab in labs() {
        for (who, user) in LAUNCHERS {
            let env = Env::new();
            let ca = decoys::mint_ca(&env.host());
            if let Some(uid) = user {
                scenario::readable(&[&env.host(), &ca.cert_path]);
                env.open_to(uid);
            }
            let up = lab.enter(|| decoys::https("127.0.0.1:0", "big", &ca, &["upstream.test"]));
            let mut sc = Script::default();
            sc.shell(
                "upload",
                &format!(
                    "head -c {SIZE} /dev/urandom > /tmp/blob && sha256sum /tmp/blob && \
                 curl -sS --fail --max-time 200 -H 'Expect:' --data-binary @/tmp/blob https://upstream.test:{}/upload",
                    up.port
                ),
            );
            let flags = [
                "--allow".to_string(),
                format!("upstream.test:{}", up.port),
                "--resolve".into(),
                "upstream.test=127.0.0.1".into(),
                "--allow-cidr".into(),
                "127.0.0.1/32".into(),
                "--upstream-ca".into(),
                ca.cert_path.display().to_string(),
            ];
            let start = Instant::now();
            let runs = scenario::Runs(vec![(
                who,
                Launch::new(lab, &env, "c51").user(user).flags(&flags).run(&sc),
            )]);
            let (_, v) = runs.reached("upload")[0];
            eprintln!(
                "64 MiB through the intercepted tunnel in {:?} ({who} launcher)",
                start.elapsed()
            );
            let sent = v.stdout().split_whitespace().next().unwrap().to_string();
            let got = up
                .seen()
                .into_iter()
                .find(|s| s.target == "/upload")
                .unwrap_or_else(|| panic!("the upload never arrived ({who} launcher)"));
            assert_eq!(got.body_len, SIZE, "({who} launcher) {got:?}");
            assert_eq!(got.body_sha256, sent, "the upload was corrupted ({who} launcher)");
            assert!(
                v.stdout().contains(&format!("sha256={sent}")),
                "the upstream's answer did not come back ({who} launcher): {v:#?}"
            );
        }
    }
}

#[test]
fn selftest_verb_prints_the_table_and_every_case_holds() {
    for backend in scenario::backends() {
        match backend {
            // The escape image: the tools the catalogue's shell cases drive are there.
            scenario::Backend::Container => {
                let image = bottle_test_support::container::escape_image(scenario::probe_binary());
                selftest_on("container", &["--image", image]);
            }
            scenario::Backend::Gvisor => {
                let image = bottle_test_support::container::escape_image(scenario::probe_binary());
                selftest_on(
                    "container",
                    &["--image", image, "--runtime", bottle_test_support::container::GVISOR],
                );
            }
            other => selftest_on(other.name(), &[]),
        }
    }
}

#[test]
fn selftest_on_a_container_leaves_out_the_cases_whose_tools_the_image_lacks() {
    if !scenario::backends().contains(&scenario::Backend::Container) {
        return;
    }
    // busybox and curl only: no ssh, no git, no openssl.
    let out = Command::new(BB)
        .args(["--json", "selftest", "--backend", "container", "--image"])
        .arg(bottle_test_support::container::image())
        .env_remove("BOT_BOTTLE_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ssh = doc["left_out"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["case"] == "c07-ssh-client")
        .unwrap_or_else(|| panic!("the ssh case ran in an image without ssh: {doc:#}"));
    assert!(ssh["reason"].as_str().unwrap().contains("`ssh`"), "{ssh}");
    assert!(doc["held"].as_u64().unwrap() >= 51, "{doc:#}");
}

/// `bot-bottle selftest --backend B`: at least 51 catalogue cases, every one held, and the catalogue cases it left
/// out named with a reason, in the JSON and in the table.
fn selftest_on(backend: &str, extra: &[&str]) {
    let probe = scenario::probe_binary();
    let beside = Path::new(BB).with_file_name("bottle-probe");
    assert_eq!(
        probe, beside,
        "the selftest finds bottle-probe next to bot-bottle; BOTTLE_PROBE points elsewhere"
    );
    let out = Command::new(BB)
        .args(["--json", "selftest", "--backend", backend])
        .args(extra)
        .env_remove("BOT_BOTTLE_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = doc["cases"].as_array().unwrap();
    assert!(rows.len() >= 51, "only {} cases: {doc:#}", rows.len());
    assert_eq!(
        (doc["escaped"].as_u64(), doc["errors"].as_u64()),
        (Some(0), Some(0)),
        "{doc:#}"
    );
    assert_eq!(doc["held"].as_u64(), Some(rows.len() as u64), "{doc:#}");
    assert!(
        rows.iter().all(|r| r["verdict"] == "held" && r["backend"] == backend),
        "{doc:#}"
    );
    let left_out = doc["left_out"].as_array().unwrap();
    assert!(!left_out.is_empty(), "{doc:#}");
    for l in left_out {
        assert!(l["case"].as_str().is_some_and(|c| !c.is_empty()), "{l}");
        assert!(l["reason"].as_str().is_some_and(|r| r.len() > 10), "{l}");
    }
    let out = Command::new(BB)
        .args(["selftest", "--backend", backend])
        .args(extra)
        .env_remove("BOT_BOTTLE_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .eq(["CASE", "BACKEND", "VERDICT"]),
        "{table}"
    );
    let first_left_out = left_out[0]["case"].as_str().unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.contains(first_left_out) && l.contains("left out")),
        "the table does not name the left-out case {first_left_out}: {table}"
    );
}
