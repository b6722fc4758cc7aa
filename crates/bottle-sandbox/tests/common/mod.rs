//! What the smolvm test files share: the skip rule, writing scripts, and the real engine in a private /dev with
//! no kvm node. `mod common;` in each test file that needs it (a test-only module, not a crate).

#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::OsString;
use std::fs;
use std::path::Path;

use bottle_sandbox::engine::Engine;

pub const COMPONENT: &str = "smolmachines";

/// Skips with a reason, unless `BOTTLE_TEST_REQUIRE` names smolmachines, in which case the skip is a failure.
pub fn skip(why: &str) {
    let required = std::env::var("BOTTLE_TEST_REQUIRE").unwrap_or_default();
    assert!(
        !required.split(',').any(|c| c.trim() == COMPONENT),
        "{COMPONENT} required but unavailable: {why}"
    );
    eprintln!("skipping: {why}");
}

/// Writes an executable script. A child `sh` does the writing, so the write descriptor never exists in this
/// multi-threaded test process: a sibling test's fork would otherwise inherit it for an instant, and running the
/// script then fails with ETXTBSY ("Text file busy").
pub fn script(path: &Path, body: &str) {
    use std::io::Write;
    let mut sh = std::process::Command::new("/bin/sh")
        .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = sh.stdin.take().unwrap();
    stdin
        .write_all(format!("#!/bin/sh\nset -e\n{body}\n").as_bytes())
        .unwrap();
    drop(stdin);
    assert!(sh.wait().unwrap().success(), "could not write {}", path.display());
}

/// The real engine in a private mount namespace whose /dev has no kvm node (research/smolvm.md §2.3, first row;
/// research/smolvm-harness/nokvm.sh). Needs root and util-linux.
pub fn engine_without_kvm(real: &Engine, dir: &Path) -> Engine {
    let dev = dir.join("dev");
    fs::create_dir(&dev).unwrap();
    let inner = dir.join("nokvm.sh");
    script(
        &inner,
        &format!(
            "d={dev}\nmount -t tmpfs tmpfs \"$d\"\n\
             for n in null zero urandom random full tty; do touch \"$d/$n\"; mount --bind \"/dev/$n\" \"$d/$n\"; done\n\
             mkdir \"$d/pts\" \"$d/shm\"; mount --bind /dev/pts \"$d/pts\"; mount -t tmpfs tmpfs \"$d/shm\"\n\
             ln -s /proc/self/fd \"$d/fd\"\nmount --move \"$d\" /dev\nexec {engine} \"$@\"",
            dev = dev.display(),
            engine = real.path.display()
        ),
    );
    let outer = dir.join("smolvm-nokvm");
    script(&outer, &format!("exec unshare -m {} \"$@\"", inner.display()));
    Engine {
        path: outer,
        ..real.clone()
    }
}

pub fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}
