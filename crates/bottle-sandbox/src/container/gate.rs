//! The files the container sees at `/.bot-bottle` (read-only): the CA bundle, the placeholders the gate sources, and
//! the gate itself, opened once the bottle was verified.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::namespace::spec::SYSTEM_ROOTS;

/// System roots (for passthrough hosts) and the bottle CA, in place (the container's bind holds the inode).
pub(super) fn write_ca_bundle(path: &Path, bottle_ca: &str) -> std::io::Result<()> {
    let mut bundle = SYSTEM_ROOTS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .unwrap_or_default();
    if !bundle.ends_with(b"\n") && !bundle.is_empty() {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(bottle_ca.as_bytes());
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(path)?;
    f.write_all(&bundle)?;
    f.sync_all()
}

/// `export KEY='VALUE'` lines for the gate's shell (values single-quoted, so nothing in them is read as shell).
fn exports(vars: &BTreeMap<String, String>) -> String {
    let mut text = String::new();
    for (k, v) in vars {
        if !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        text.push_str(&format!("export {k}='{}'\n", v.replace('\'', "'\\''")));
    }
    text
}

/// The placeholders file `exec` sources (placeholders say nothing of a secret: they may be on disk).
pub(super) fn write_env(path: &Path, vars: &BTreeMap<String, String>) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(path)?;
    f.write_all(exports(vars).as_bytes())?;
    f.sync_all()
}

/// Lets the agent start: the shell at the gate sources what comes through the FIFO, here the `pass_env` values.
/// SECURITY: they travel through the pipe only, never in the engine's container config (which the engine keeps on
/// disk) nor in a file. The FIFO is opened without blocking, so a container whose shell is gone is an error, not a
/// hang; the write then blocks (values may be longer than the pipe's buffer).
pub(super) fn open_gate(path: &Path, pass_env: &BTreeMap<String, String>) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut f = writer(path, deadline)?;
    let flags = rustix::fs::fcntl_getfl(&f)? - rustix::fs::OFlags::NONBLOCK;
    rustix::fs::fcntl_setfl(&f, flags)?;
    // Never nothing: gVisor's reader of a host FIFO sees no end when the writer closes without writing.
    f.write_all(format!("# the bottle's gate\n{}", exports(pass_env)).as_bytes())?;
    until_read(&f, deadline)
}

/// The FIFO at `path` opened for writing without blocking, once a reader has it open (ENXIO until then: the
/// container's shell is starting), until `deadline`.
fn writer(path: &Path, deadline: std::time::Instant) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            opened => return opened,
        }
    }
}

/// Keeps the gate's write end open until the shell has read all of it. Under gVisor the open can succeed before the
/// shell's own open (gVisor's gofer holds the host FIFO open for reading), and a shell whose open comes after the
/// writer closed waits for a writer forever, the gate's text unread in the pipe (measured: one launch in a few dozen).
fn until_read(f: &std::fs::File, deadline: std::time::Instant) -> std::io::Result<()> {
    loop {
        if rustix::io::ioctl_fionread(f)? == 0 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(std::io::Error::other(
                "the container's shell did not read its gate within 10 s",
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Turns away a shell that waits, or is about to wait, at the gate of a bottle that is not to start: it is told to
/// exit (125, "never passed the gate"), so the container ends at once. For gVisor, which cannot kill a process
/// blocked opening a host FIFO until its sandbox is torn down (~10 s, and the engine then fails to remove the
/// container). Waits up to `within` for the shell to come to the gate.
pub(super) fn turn_away(path: &Path, within: std::time::Duration) {
    if let Ok(mut f) = writer(path, std::time::Instant::now() + within) {
        let _ = f.write_all(b"exit 125\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_exported_single_quoted_and_odd_names_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env");
        std::fs::write(&path, b"").unwrap();
        let vars = BTreeMap::from([
            ("KEY".to_string(), "it's $(x)".to_string()),
            ("BAD NAME".to_string(), "x".to_string()),
        ]);
        write_env(&path, &vars).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "export KEY='it'\\''s $(x)'\n");
        let out = std::process::Command::new("sh")
            .args(["-c", ". \"$1\"; printf %s \"$KEY\"", "sh"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $(x)");
    }
}
