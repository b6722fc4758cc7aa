//! Whose ids the bottle holds on the host (#12): a root launcher's bottle whose ids are host root owns every
//! root-owned host file it can see and every knob root may write. From inside, the user namespace's id maps say
//! which host ids the bottle's are; a root-only file of the host's system tree says whether they are root's.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::exact;
use crate::verdict::{Outcome, Verdict, cannot_run};

/// How much of the system tree `root-only-files` looks at.
const WALK_MAX_DEPTH: usize = 6;
const WALK_MAX_FILES: usize = 20_000;

/// Escaped if an id of this user namespace is host uid or gid 0, or if host root's supplementary groups remain.
pub fn host_ids(args: &[String]) -> Outcome {
    let [] = exact(args)?;
    let mut problems = Vec::new();
    let mut detail = Vec::new();
    for file in ["/proc/self/uid_map", "/proc/self/gid_map"] {
        let map = fs::read_to_string(file).map_err(|e| cannot_run(format!("{file}: {e}")))?;
        for line in map.lines().map(str::trim).filter(|l| !l.is_empty()) {
            detail.push(format!("{file}: {line}"));
            let f: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            if let [_, outside, count] = f[..]
                && outside == 0
                && count > 0
            {
                problems.push(format!("{file} maps host id 0 ({line})"));
            }
        }
    }
    // A map that includes host id 0 (a container engine without user-namespace remapping shares the host's ids) is
    // only a way to host root for a process that holds id 0 or could take it: one with a capability left to bound
    // it, or without no_new_privs (a set-id program would hand it over).
    let status = fs::read_to_string("/proc/self/status").map_err(|e| cannot_run(format!("/proc/self/status: {e}")))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(str::trim)
            .unwrap_or_default()
    };
    let holds_zero = ["Uid", "Gid"]
        .into_iter()
        .any(|f| field(f).split_whitespace().any(|id| id == "0"));
    let nnp = Some(field("NoNewPrivs")).filter(|v| !v.is_empty());
    let could_take = !field("CapBnd").trim_start_matches('0').is_empty() || !crate::host::no_new_privs(nnp);
    let v = if problems.is_empty() {
        Verdict::held("host-ids", "no id of the bottle is host root's")
    } else if !holds_zero && !could_take {
        Verdict::held(
            "host-ids",
            format!(
                "{}, but this process cannot take it: ids {} / {}, no capability, no_new_privs",
                problems.join("; "),
                field("Uid"),
                field("Gid")
            ),
        )
    } else {
        Verdict::escaped("host-ids", problems.join("; "))
    };
    Ok(v.with(serde_json::json!({ "maps": detail })))
}

/// Escaped if a file of `roots` that only its owner or group may read (no read bit for others), owned by host
/// root, can be opened: the bottle's ids are root's. Held when there is none to open.
pub fn root_only_files(args: &[String]) -> Outcome {
    if args.is_empty() {
        return Err(cannot_run("give the directories to search"));
    }
    let mut found = Vec::new();
    // Each root with its own budget, in the order given: a large tree does not crowd out the next.
    for root in args {
        let mut seen = 0;
        let mut stack = vec![(PathBuf::from(root), 0)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                seen += 1;
                let path = entry.path();
                let Ok(meta) = fs::symlink_metadata(&path) else {
                    continue;
                };
                if meta.is_dir() && depth < WALK_MAX_DEPTH {
                    stack.push((path.clone(), depth + 1));
                }
                if meta.mode() & 0o004 == 0 && (meta.is_file() || meta.is_dir()) {
                    found.push((path, meta.is_dir()));
                }
            }
            if seen > WALK_MAX_FILES {
                break;
            }
        }
    }
    let opened: Vec<String> = found
        .iter()
        .filter(|(p, dir)| opens(p, *dir))
        .map(|(p, _)| p.display().to_string())
        .take(5)
        .collect();
    Ok(if opened.is_empty() {
        Verdict::held(
            "root-only-files",
            format!("none of the {} files without a read bit for others opened", found.len()),
        )
    } else {
        Verdict::escaped("root-only-files", format!("opened {}", opened.join(", ")))
    })
}

fn opens(path: &Path, dir: bool) -> bool {
    if dir {
        fs::read_dir(path).is_ok()
    } else {
        fs::File::open(path).is_ok()
    }
}
