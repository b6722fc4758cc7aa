//! The audit log fails closed: with the state directory on a full filesystem (a real tmpfs, filled), nothing is
//! forwarded that cannot be recorded, the client is told why, the failure is noted beside the log, and once there
//! is room again requests flow and are recorded. Needs root (to mount the tmpfs); skips saying so otherwise, and
//! `BOTTLE_TEST_REQUIRE=namespace` (as CI sets) turns the skip into a failure.
#![allow(clippy::disallowed_methods, clippy::unwrap_used)]

mod fixture;

use std::path::{Path, PathBuf};
use std::process::Command;

use bottle_test_support::require;
use fixture::*;

/// A small tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    // Small files may still fit in a partial page; fill those too.
    let _ = std::io::Write::write_all(&mut f, &[0u8; 1]);
    filler
}

#[tokio::test]
async fn a_full_disk_refuses_what_it_cannot_record_and_recovers() {
    if !rustix::process::geteuid().is_root() {
        require::skip("namespace", "needs root to mount a small tmpfs as the state directory");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (http, rec) = http_upstream().await;
    let Some(_fs) = Tmpfs::mount(&dir.path().join("state"), "256k") else {
        panic!("cannot mount a tmpfs as root");
    };
    let lab = Lab::start(
        dir,
        ca,
        "[network]\nallow = [\"upstream.test:*\"]\nallow_cidr = [\"127.0.0.1/32\"]\n[network.resolve]\n\"upstream.test\" = \"127.0.0.1\"\n",
    )
    .await;
    let url = |p: &str| format!("http://upstream.test:{}/{p}", http.port());
    let mut client = lab.h1_to_proxy().await;
    let (status, _, _) = text(client.send_request(get(&url("before"), "")).await.unwrap()).await;
    assert_eq!(status, 200);

    let state = lab.dir.path().join("state");
    let filler = fill(&state);
    // The log's last page may still hold a few lines: those requests are recorded, and pass. Then every one that
    // cannot be recorded is refused.
    let mut refused = Vec::new();
    for i in 0..40 {
        let path = format!("full-{i}");
        let mut client = lab.h1_to_proxy().await;
        let (status, headers, body) = text(client.send_request(get(&url(&path), "")).await.unwrap()).await;
        if status == 503 {
            assert!(
                denied(&headers).contains("rule=audit-log-failing"),
                "{}",
                denied(&headers)
            );
            assert!(body.contains("cannot be written"), "{body}");
            refused.push(format!("/{path}"));
        } else {
            assert_eq!(status, 200, "{body}");
        }
    }
    assert!(refused.len() >= 30, "the full disk refused only {refused:?}");
    assert!(state.join(bottle_proxy::AUDIT_FAILING_FILE).exists(), "no note for ls");
    let recorded: Vec<String> = lab
        .audit()
        .iter()
        .filter(|v| v["event"] == "request")
        .map(|v| v["path"].as_str().unwrap().to_string())
        .collect();
    for seen in rec.requests() {
        assert!(recorded.contains(&seen.uri), "{} went out unrecorded", seen.uri);
        assert!(
            !refused.contains(&seen.uri),
            "{} was refused yet reached the upstream",
            seen.uri
        );
    }

    std::fs::remove_file(&filler).unwrap();
    let mut client = lab.h1_to_proxy().await;
    let (status, _, _) = text(client.send_request(get(&url("after"), "")).await.unwrap()).await;
    assert_eq!(status, 200, "requests flow again once there is room");
    lab.wait_audit(|v| v["path"] == "/after" && v["decision"] == "allow")
        .await;
    // Counts stay exact: the decisions the log could not hold are counted once it can (all were refusals).
    let unrecorded = lab.wait_audit(|v| v["event"] == "unrecorded").await;
    assert_eq!(unrecorded["decision"], "deny");
    assert_eq!(
        unrecorded["count"].as_u64().unwrap() as usize,
        refused.len(),
        "{unrecorded}"
    );
    assert!(
        !state.join(bottle_proxy::AUDIT_FAILING_FILE).exists(),
        "the failure note outlived the failure"
    );
}
