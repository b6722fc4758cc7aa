//! `run_standalone`: serves until SIGTERM, reloads on SIGHUP, keeps the old policy when the new file is invalid.
//! Signals go to this test process, so this file holds one test (its own process).
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use std::time::Duration;

use fixture::*;

fn signal(name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn status_through(proxy: std::net::SocketAddr, url: &str) -> u16 {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let mut client = h1(stream).await;
    text(client.send_request(get(url, "x")).await.unwrap()).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_reloads_on_sighup_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, _) = http_upstream().await;
    let policy_path = dir.path().join("policy.toml");
    let allow = |host: &str| {
        format!(
            "[network]\nallow = [\"{host}:*\"]\nallow_cidr = [\"127.0.0.1/32\"]\n[network.resolve]\n\"{host}\" = \"127.0.0.1\"\n"
        )
    };
    std::fs::write(&policy_path, allow("one.test")).unwrap();
    let overrides = bottle_policy::Overrides::default();
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let opts = bottle_proxy::StandaloneOptions {
        policy: bottle_policy::load_file(&policy_path, &overrides).unwrap(),
        policy_path: Some(policy_path.clone()),
        overrides,
        listen,
        state_dir: dir.path().join("state"),
        ca_cert: None,
        ca_key: None,
        upstream_ca: Vec::new(),
        bottle: "standalone".into(),
        reviewer: None,
    };
    let handle = std::thread::spawn(move || bottle_proxy::run_standalone(opts));
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let one = format!("http://one.test:{}/", upstream.port());
    let two = format!("http://two.test:{}/", upstream.port());
    assert_eq!(status_through(listen, &one).await, 200);
    assert_eq!(status_through(listen, &two).await, 403);

    std::fs::write(&policy_path, allow("two.test")).unwrap();
    signal("HUP");
    let mut reloaded = false;
    for _ in 0..100 {
        if status_through(listen, &two).await == 200 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reloaded, "SIGHUP did not reload");
    assert_eq!(status_through(listen, &one).await, 403);

    // An invalid file is refused; the last good policy stays.
    std::fs::write(&policy_path, "[network]\nallow = [\"*\"]\n").unwrap();
    signal("HUP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status_through(listen, &two).await, 200);
    let audit = std::fs::read_to_string(dir.path().join("state/audit.jsonl")).unwrap();
    assert!(audit.contains("reload-refused"), "{audit}");

    signal("TERM");
    let result = tokio::task::spawn_blocking(move || handle.join().unwrap())
        .await
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(dir.path().join("state/ca.pem").exists());
}
