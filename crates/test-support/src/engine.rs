//! Engine fixtures for the smolmachines tests: executable scripts written safely from a multi-threaded test, and
//! a wrapper that runs the real engine in a private mount namespace whose /dev has no kvm node.

use std::path::{Path, PathBuf};

/// Writes an executable script (`#!/bin/sh`, `set -e`, then `body`). A child `sh` does the writing, so the write
/// descriptor never exists in this multi-threaded test process: a sibling test's fork would otherwise inherit it
/// for an instant, and running the script then fails with ETXTBSY ("Text file busy").
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

/// A script in `dir` that runs `engine` (its arguments passed on) in a private mount namespace whose /dev has no
/// kvm node (research/smolvm.md §2.3, first row; research/smolvm-harness/nokvm.sh). Needs root and util-linux.
pub fn without_kvm(engine: &Path, dir: &Path) -> PathBuf {
    let dev = dir.join("dev");
    std::fs::create_dir(&dev).unwrap();
    let inner = dir.join("nokvm.sh");
    script(
        &inner,
        &format!(
            "d={dev}\nmount -t tmpfs tmpfs \"$d\"\n\
             for n in null zero urandom random full tty; do touch \"$d/$n\"; mount --bind \"/dev/$n\" \"$d/$n\"; done\n\
             mkdir \"$d/pts\" \"$d/shm\"; mount --bind /dev/pts \"$d/pts\"; mount -t tmpfs tmpfs \"$d/shm\"\n\
             ln -s /proc/self/fd \"$d/fd\"\nmount --move \"$d\" /dev\nexec {engine} \"$@\"",
            dev = dev.display(),
            engine = engine.display()
        ),
    );
    let outer = dir.join("smolvm-nokvm");
    script(&outer, &format!("exec unshare -m {} \"$@\"", inner.display()));
    outer
}
