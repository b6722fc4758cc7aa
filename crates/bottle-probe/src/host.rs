//! The host's files, processes and secrets as seen from inside: reading host paths, writing outside the workspace,
//! searching for a secret everywhere a process can look, the process's own privileges (`/proc/self/status`), other
//! processes, `/proc` writes, and running a command (for tools such as curl, bash or unshare).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;

use crate::exact;
use crate::verdict::{Failure, Outcome, Verdict, cannot_run, usage};

/// Bytes read from one file, by `read-file` and by the secret search.
const READ_LIMIT_BYTES: u64 = 1024 * 1024;
/// How much of a command's output the verdict keeps.
const OUTPUT_KEEP_BYTES: usize = 4096;
/// Where `find-secret` looks when given no roots: everywhere a host file could show through, except `/usr` (the
/// host's read-only system, large and bound on purpose) and the kernel filesystems walked separately.
const SECRET_ROOTS: [&str; 10] = [
    "/etc", "/home", "/root", "/tmp", "/run", "/var", "/opt", "/srv", "/mnt", "/media",
];
const WALK_MAX_DEPTH: usize = 8;
const WALK_MAX_FILES: usize = 50_000;

pub fn read_file(args: &[String]) -> Outcome {
    let (path, needle) = match args {
        [p] => (p.as_str(), None),
        [p, n] => (p.as_str(), Some(needle(n)?)),
        _ => return Err(usage("expected PATH [NEEDLE]")),
    };
    let mut buf = Vec::new();
    let read = fs::File::open(path).and_then(|f| f.take(READ_LIMIT_BYTES).read_to_end(&mut buf));
    Ok(match read {
        Err(e) => Verdict::held("read-file", format!("{path}: {e}")),
        Ok(n) => match needle {
            None => Verdict::escaped("read-file", format!("read {n} bytes of {path}")),
            Some(needle) if contains(&buf, &needle) => {
                Verdict::escaped("read-file", format!("{path} holds the host's secret"))
            }
            Some(_) => Verdict::held(
                "read-file",
                format!("{path} exists inside the bottle but without the host's secret ({n} bytes)"),
            ),
        },
    })
}

/// A needle as given, or `hex:<bytes>` so that the text searched for never appears on any command line (the probe's
/// own, or the script's that runs it) where the search itself would find it.
fn needle(raw: &str) -> Result<Vec<u8>, Failure> {
    let Some(hex) = raw.strip_prefix("hex:") else {
        return Ok(raw.as_bytes().to_vec());
    };
    let bad = || usage(format!("`{raw}` is not valid hex"));
    if hex.len() % 2 != 0 {
        return Err(bad());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

pub fn list_dir(args: &[String]) -> Outcome {
    let [path] = exact(args)?;
    Ok(match fs::read_dir(path) {
        Err(e) => Verdict::held("list-dir", format!("{path}: {e}")),
        Ok(entries) => {
            let names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if names.is_empty() {
                Verdict::held("list-dir", format!("{path} is empty inside the bottle"))
            } else {
                Verdict::escaped("list-dir", format!("{path} lists {names:?}"))
            }
        }
    })
}

/// Opens for writing without writing: an existing file is left untouched, a created one is removed again.
pub fn write_file(args: &[String]) -> Outcome {
    let [path] = exact(args)?;
    let p = Path::new(path);
    if p.exists() {
        return Ok(match OpenOptions::new().write(true).open(p) {
            Ok(_) => Verdict::escaped("write-file", format!("{path} is open for writing")),
            Err(e) => Verdict::held("write-file", format!("{path}: {e}")),
        });
    }
    Ok(
        match OpenOptions::new().write(true).create_new(true).mode(0o600).open(p) {
            Ok(_) => {
                let _ = fs::remove_file(p);
                Verdict::escaped("write-file", format!("created {path}"))
            }
            Err(e) => Verdict::held("write-file", format!("{path}: {e}")),
        },
    )
}

pub fn find_secret(args: &[String]) -> Outcome {
    let [raw, roots @ ..] = args else {
        return Err(usage("expected NEEDLE [ROOT...]"));
    };
    let needle = needle(raw)?;
    if needle.len() < 8 {
        return Err(usage("a NEEDLE shorter than 8 bytes would match by chance"));
    }
    let needle = needle.as_slice();
    let mut found = Vec::new();
    for (k, v) in std::env::vars_os() {
        if contains(k.as_encoded_bytes(), needle) || contains(v.as_encoded_bytes(), needle) {
            found.push(format!("env {}", k.to_string_lossy()));
        }
    }
    let mut procs = 0;
    for entry in fs::read_dir("/proc")
        .map_err(|e| cannot_run(format!("/proc: {e}")))?
        .flatten()
    {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        procs += 1;
        for file in ["environ", "cmdline"] {
            let path = entry.path().join(file);
            if let Ok(bytes) = fs::read(&path)
                && contains(&bytes, needle)
            {
                found.push(path.display().to_string());
            }
        }
    }
    let roots: Vec<String> = if roots.is_empty() {
        let mut r: Vec<String> = SECRET_ROOTS.iter().map(|s| s.to_string()).collect();
        if let Ok(cwd) = std::env::current_dir() {
            r.push(cwd.display().to_string());
        }
        r
    } else {
        roots.to_vec()
    };
    let mut files = 0usize;
    for root in &roots {
        walk_files(Path::new(root), 0, &mut files, &mut |path, bytes| {
            if contains(bytes, needle) {
                found.push(path.display().to_string());
            }
        });
    }
    let detail = json!({ "processes": procs, "files": files, "roots": roots, "found": found });
    let v = if found.is_empty() {
        Verdict::held(
            "find-secret",
            format!("not in the environment, {procs} processes or {files} files"),
        )
    } else {
        Verdict::escaped("find-secret", format!("found in {}", found.join(", ")))
    };
    Ok(v.with(detail))
}

fn walk_files(dir: &Path, depth: usize, files: &mut usize, visit: &mut dyn FnMut(&Path, &[u8])) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if *files >= WALK_MAX_FILES {
            return;
        }
        let Ok(ty) = entry.file_type() else { continue };
        let path = entry.path();
        if ty.is_dir() && depth < WALK_MAX_DEPTH {
            walk_files(&path, depth + 1, files, visit);
        } else if ty.is_file() {
            *files += 1;
            let mut buf = Vec::new();
            if fs::File::open(&path)
                .and_then(|f| f.take(READ_LIMIT_BYTES).read_to_end(&mut buf))
                .is_ok()
            {
                visit(&path, &buf);
            }
        } else if ty.is_symlink() || ty.is_socket() || ty.is_fifo() {
            // Never followed: a symlink out of a root would make the search read the host through the bottle's
            // view of it, which the dedicated symlink case tests on purpose.
        }
    }
}

pub fn proc_status(args: &[String]) -> Outcome {
    let [] = exact(args)?;
    let status = fs::read_to_string("/proc/self/status").map_err(|e| cannot_run(format!("/proc/self/status: {e}")))?;
    let fields: BTreeMap<&str, &str> = status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .filter(|(k, _)| k.starts_with("Cap") || *k == "NoNewPrivs" || *k == "Seccomp")
        .collect();
    let mut problems = Vec::new();
    if !no_new_privs(fields.get("NoNewPrivs").copied()) {
        problems.push(format!("NoNewPrivs={:?}", fields.get("NoNewPrivs")));
    }
    if fields.get("Seccomp") != Some(&"2") {
        problems.push(format!("Seccomp={:?}", fields.get("Seccomp")));
    }
    let empty = |cap: &str| fields.get(cap).is_some_and(|v| v.bytes().all(|b| b == b'0'));
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        // A kernel that does not list the ambient set (gVisor): it is a subset of the permitted and inheritable
        // sets, so empty when either is.
        let ambient_implied = cap == "CapAmb" && !fields.contains_key(cap) && (empty("CapPrm") || empty("CapInh"));
        if !(empty(cap) || ambient_implied) {
            problems.push(format!("{cap}={:?}", fields.get(cap)));
        }
    }
    let mut detail = json!(fields);
    if !fields.contains_key("NoNewPrivs") {
        let nnp = if no_new_privs(None) { "1" } else { "0" };
        detail["NoNewPrivs"] = json!(nnp);
        detail["NoNewPrivsFrom"] = json!("prctl(PR_GET_NO_NEW_PRIVS): not in /proc/self/status");
    }
    let v = if problems.is_empty() {
        Verdict::held(
            "proc-status",
            "no_new_privs=1, seccomp filter on, every capability set empty",
        )
    } else {
        Verdict::escaped("proc-status", format!("privileges remain: {}", problems.join(", ")))
    };
    Ok(v.with(detail))
}

/// Whether no_new_privs is set: the status line, or where the kernel does not list it (gVisor), prctl's answer.
pub fn no_new_privs(status_line: Option<&str>) -> bool {
    match status_line {
        Some(v) => v == "1",
        None => rustix::thread::no_new_privs().unwrap_or(false),
    }
}

pub fn processes(args: &[String]) -> Outcome {
    let [raw] = exact(args)?;
    let marker = String::from_utf8_lossy(&needle(raw)?).into_owned();
    let mut pids = Vec::new();
    let mut matches = Vec::new();
    for entry in fs::read_dir("/proc")
        .map_err(|e| cannot_run(format!("/proc: {e}")))?
        .flatten()
    {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        pids.push(pid);
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&marker) {
            matches.push(format!("{pid}: {}", cmdline.trim()));
        }
    }
    let detail = json!({ "count": pids.len(), "pids": pids });
    let v = if matches.is_empty() {
        Verdict::held(
            "processes",
            format!("{} processes visible, none is the host's marked process", pids.len()),
        )
    } else {
        Verdict::escaped("processes", format!("host processes visible: {}", matches.join("; ")))
    };
    Ok(v.with(detail))
}

fn pid(raw: &str) -> Result<rustix::process::Pid, Failure> {
    raw.parse::<i32>()
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| usage(format!("`{raw}` is not a pid")))
}

pub fn kill(args: &[String]) -> Outcome {
    let [raw] = exact(args)?;
    Ok(match rustix::process::test_kill_process(pid(raw)?) {
        Ok(()) => Verdict::escaped("kill", format!("pid {raw} exists and can be signalled")),
        Err(e) => Verdict::held("kill", format!("pid {raw}: {e}")),
    })
}

pub fn proc_mem(args: &[String]) -> Outcome {
    let [raw] = exact(args)?;
    pid(raw)?;
    let path = format!("/proc/{raw}/mem");
    Ok(match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(_) => Verdict::escaped("proc-mem", format!("{path} is open for writing")),
        Err(e) => Verdict::held("proc-mem", format!("{path}: {e}")),
    })
}

/// Writes the current value back: if the write is allowed nothing changes, and the probe reports it.
pub fn proc_sys_write(args: &[String]) -> Outcome {
    let [path] = exact(args)?;
    if !path.starts_with("/proc/sys/") {
        return Err(usage("PATH must be under /proc/sys/"));
    }
    let current = match fs::read(path) {
        Ok(v) => v,
        Err(e) => return Ok(Verdict::held("proc-sys-write", format!("{path} unreadable: {e}"))),
    };
    Ok(match fs::write(path, &current) {
        Ok(()) => Verdict::escaped("proc-sys-write", format!("{path} is writable")),
        Err(e) => Verdict::held("proc-sys-write", format!("{path}: {e}")),
    })
}

fn keep(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(OUTPUT_KEEP_BYTES)]).into_owned()
}

pub fn command(args: &[String]) -> Outcome {
    let [program, rest @ ..] = args else {
        return Err(usage("expected CMD [ARG...]"));
    };
    let out = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| cannot_run(format!("cannot start {program}: {e}")))?;
    let detail = json!({
        "exit": out.status.code(),
        "stdout": keep(&out.stdout),
        "stderr": keep(&out.stderr),
    });
    let v = if out.status.success() {
        Verdict::escaped("command", format!("`{}` succeeded", args.join(" ")))
    } else {
        Verdict::held("command", format!("`{}` failed: {}", args.join(" "), out.status))
    };
    Ok(v.with(detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_needs_a_needle() {
        assert!(contains(b"abcdef", b"cde"));
        assert!(!contains(b"abc", b""));
        assert!(!contains(b"ab", b"abc"));
    }

    #[test]
    fn hex_needles() {
        assert_eq!(needle("hex:6162").unwrap(), b"ab");
        assert_eq!(needle("plain").unwrap(), b"plain");
        assert!(needle("hex:6").is_err());
        assert!(needle("hex:zz").is_err());
    }
}
