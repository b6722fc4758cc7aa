//! The suite checks itself: the same probes, run straight in a lab with no bottle at all (confinement deliberately
//! off, as root on the host side), against the same kinds of decoys, must report `escaped: true`. A probe that cannot
//! see an escape would make every "held" above worthless.

use crate::decoys;
use crate::lab::Lab;
use crate::scenario::{self, BB, Env, hex, probe_unconfined};

/// Extra environment for the probe, and its arguments.
type Attempt<'a> = (Vec<(&'a str, &'a str)>, Vec<String>);

/// ENOSYS (asm-generic/errno.h).
fn libc_enosys() -> serde_json::Value {
    serde_json::json!(38)
}

#[test]
fn self_check_probes_detect_escapes_when_unconfined() {
    // No bottle here, so no backend of its own: it needs the lab, which is what the namespace families need.
    if scenario::skip(scenario::Backend::Namespace) {
        return;
    }
    let lab = Lab::new();
    let env = Env::new();
    let ca = decoys::mint_ca(&env.host());
    let lo = lab.enter(|| decoys::tcp("127.0.0.1:0", b""));
    let web80 = lab.enter(|| decoys::tcp("[::]:80", b""));
    let lo_udp = lab.enter(|| decoys::udp("127.0.0.1:0"));
    let udp443 = lab.enter(|| decoys::udp("[::]:443"));
    let dns = lab.enter(|| decoys::dns("[::]:53", vec![("selfcheck.test".into(), "8.8.8.8".parse().unwrap())]));
    let dot = lab.enter(|| decoys::tcp("[::]:853", b""));
    let ssh = lab.enter(|| decoys::tcp("[::]:22", b"SSH-2.0-decoy\r\n"));
    let naive = lab.enter(|| decoys::http("127.0.0.1:0", "naive-proxy"));
    let tls = lab.enter(|| decoys::https("127.0.0.1:0", "tls", &ca, &["up.test"]));
    let agent_path = env.host().join("agent.sock");
    let agent = decoys::unix(&agent_path);
    let abstract_name = scenario::token("bb-selfcheck-");
    let abstract_sock = lab.enter(|| decoys::abstract_unix(&abstract_name));
    let secret = scenario::token("selfcheck-secret-");
    let host_file = env.host().join("secret.txt");
    std::fs::write(&host_file, &secret).unwrap();
    let marker = scenario::token("bb-selfcheck-process-");
    let mut marked = std::process::Command::new("bash")
        .args(["-c", &format!("exec -a {marker} sleep 600")])
        .spawn()
        .unwrap();

    // A real proxy that allows up.test, for the SNI probe's positive case.
    let state = env.host().join("proxy");
    let mut proxy = lab
        .command(BB)
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--allow",
            &format!("up.test:{}", tls.port),
        ])
        .args([
            "--resolve",
            "up.test=127.0.0.1",
            "--allow-cidr",
            "127.0.0.1/32",
            "--upstream-ca",
        ])
        .arg(&ca.cert_path)
        .arg("--state-dir")
        .arg(&state)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(proxy.stdout.take().unwrap()), &mut line).unwrap();
    let real_proxy = line.trim().trim_start_matches("listening on ").to_string();

    let naive_addr = format!("127.0.0.1:{}", naive.port);
    let agent_env = agent_path.display().to_string();
    let via_naive = [("BOTTLE_PROBE_PROXY", naive_addr.as_str())];
    let lo_addr = format!("127.0.0.1:{}", lo.port);
    let udp_addr = format!("127.0.0.1:{}", lo_udp.port);
    let pid = marked.id().to_string();
    let write_target = env.host().join("written").display().to_string();
    // The host's real filesystem is large; the secret is in the environment, so search one small root.
    let host_dir = env.host().display().to_string();
    let sni_target = format!("up.test:{}", tls.port);
    let naive_url = format!("http://plain.test:{}/x", naive.port);
    let attempts: Vec<Attempt<'_>> = [
        (vec![], vec!["tcp-connect", &lo_addr]),
        (vec![], vec!["tcp-connect", "192.0.2.1:80"]),
        (vec![], vec!["tcp-connect", "[2001:db8::1]:80"]),
        (vec![], vec!["udp-send", &udp_addr]),
        (vec![], vec!["quic", "8.8.8.8:443"]),
        (vec![], vec!["ping-raw", "8.8.8.8"]),
        (vec![], vec!["raw-socket", "inet"]),
        (vec![], vec!["raw-socket", "packet"]),
        (vec![], vec!["resolve", "selfcheck.test"]),
        (vec![], vec!["dns-udp", "8.8.8.8:53", "udp.selfcheck.test"]),
        (vec![], vec!["dns-tcp", "8.8.8.8:53", "tcp.selfcheck.test"]),
        (vec![], vec!["dot", "1.1.1.1:853"]),
        (vec![], vec!["ssh", "192.0.2.10:22"]),
        (vec![], vec!["port-scan", "127.0.0.1", "3128", &lo.port.to_string()]),
        (vec![], vec!["unix-connect", &agent_env]),
        (vec![("SSH_AUTH_SOCK", agent_env.as_str())], vec!["ssh-agent"]),
        (vec![], vec!["abstract-connect", &abstract_name]),
        (
            vec![],
            vec!["read-file", &host_file.display().to_string(), &hex(&secret)],
        ),
        (
            vec![("SELFCHECK_SECRET", secret.as_str())],
            vec!["find-secret", &hex(&secret), &host_dir],
        ),
        (vec![], vec!["proc-status"]),
        (vec![], vec!["processes", &hex(&marker)]),
        (vec![], vec!["kill", &pid]),
        (vec![], vec!["write-file", &write_target]),
        (vec![], vec!["netlink-route"]),
        (vec![], vec!["command", "true"]),
        (via_naive.to_vec(), vec!["proxy-get", &naive_url]),
        (via_naive.to_vec(), vec!["proxy-connect", "anything.test:443"]),
        (via_naive.to_vec(), vec!["proxy-ws", &naive_url]),
        (
            via_naive.to_vec(),
            vec!["proxy-smuggle", "cl-te", &naive_url, "/smuggled"],
        ),
        (via_naive.to_vec(), vec!["proxy-malformed", "garbage", &naive_url]),
        (via_naive.to_vec(), vec!["proxy-slowloris", &naive_url, "3"]),
        (
            vec![("BOTTLE_PROBE_PROXY", real_proxy.as_str())],
            vec!["proxy-sni", &sni_target, "up.test"],
        ),
    ]
    .into_iter()
    .map(|(env, args)| (env, args.into_iter().map(str::to_string).collect()))
    .collect();
    let syscalls = [
        "ptrace",
        "umount",
        "unshare-user",
        "setns",
        "chroot",
        "bpf",
        "keyctl",
        "add-key",
        "userfaultfd",
        "io-uring",
        "perf-event-open",
        "open-by-handle",
        "tiocsti",
        "personality",
        "syslog",
        "init-module",
    ];

    let mut blind = Vec::new();
    let mut checked = 0;
    for (vars, args) in attempts.iter().map(|(v, a)| (v.clone(), a.clone())).chain(
        syscalls
            .iter()
            .map(|s| (vec![], vec!["syscall".to_string(), s.to_string()])),
    ) {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let v = probe_unconfined(&lab, &vars, &argv);
        checked += 1;
        if !v.escaped && v.detail["errno"] == libc_enosys() {
            // The kernel lacks the call altogether (e.g. no module support): nothing to escape through, nothing to see.
            eprintln!("not applicable on this kernel: {argv:?}: {}", v.evidence);
            continue;
        }
        if !v.escaped {
            blind.push(format!("{argv:?}: {}", v.evidence));
        }
    }
    let _ = marked.kill();
    let _ = marked.wait();
    let _ = proxy.kill();
    let _ = proxy.wait();
    assert!(
        blind.is_empty(),
        "probes that cannot see an escape:\n{}",
        blind.join("\n")
    );
    assert!(checked >= 40, "{checked}");
    // The decoys saw the contacts the probes reported.
    for (what, d) in [
        ("loopback tcp", &lo),
        ("web", &web80),
        ("udp", &lo_udp),
        ("quic", &udp443),
        ("dns", &dns),
        ("dot", &dot),
        ("ssh", &ssh),
        ("agent", &agent),
        ("abstract", &abstract_sock),
    ] {
        assert!(d.log.count() > 0, "the {what} decoy saw nothing");
    }
    assert!(
        naive.seen().iter().any(|s| s.target == "/smuggled"),
        "{:?}",
        naive.seen()
    );
}
