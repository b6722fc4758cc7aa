//! Unix sockets of host processes in the workspace (#12): the bottle's socket warden refuses every socket the bottle
//! did not make, unless `[bottle] share_sockets` names it. At launch the user hears which ones it found there and
//! did not share, so a tool that stops working inside is not a mystery. Trusts nothing in the workspace: the walk
//! never follows a link, stays on the workspace's filesystem and stops after `MAX_ENTRIES`.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// How many directory entries the launch looks at before it stops looking (a large repository is not walked whole).
const MAX_ENTRIES: usize = 20_000;
/// How many socket paths the message names.
const NAMED: usize = 5;

/// `share_sockets` as absolute paths inside the bottle (relative ones are relative to the workspace).
pub fn shared(written: &[PathBuf], workspace: &Path) -> Vec<PathBuf> {
    written.iter().map(|p| workspace.join(p)).collect()
}

/// Prints, on the launcher's stderr, the host sockets found in the workspace that the bottle will not reach.
pub fn report(workspace: &Path, share: &[PathBuf]) {
    let shared = shared(share, workspace);
    let (found, complete) = sockets_under(workspace, MAX_ENTRIES);
    let unshared: Vec<&PathBuf> = found.iter().filter(|p| !shared.contains(p)).collect();
    if let Some(line) = message(workspace, &unshared, complete) {
        eprintln!("{line}");
    }
}

fn message(workspace: &Path, unshared: &[&PathBuf], complete: bool) -> Option<String> {
    if unshared.is_empty() {
        return None;
    }
    let names: Vec<String> = unshared
        .iter()
        .take(NAMED)
        .map(|p| p.strip_prefix(workspace).unwrap_or(p).display().to_string())
        .collect();
    let more = match unshared.len().saturating_sub(NAMED) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    let partial = if complete {
        ""
    } else {
        " (the workspace was looked at in part)"
    };
    Some(format!(
        "bot-bottle: the bottle cannot connect to {} Unix socket{} of host processes in the workspace{partial}: {}{more}; \
         to share one, add it to `share_sockets = [\"…\"]` under [bottle] in the policy",
        unshared.len(),
        if unshared.len() == 1 { "" } else { "s" },
        names.join(", "),
    ))
}

/// Socket files under `root` (not following links, not leaving its filesystem), and whether the walk saw everything
/// before `budget` entries.
fn sockets_under(root: &Path, budget: usize) -> (Vec<PathBuf>, bool) {
    let Ok(top) = std::fs::symlink_metadata(root) else {
        return (Vec::new(), true);
    };
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    let mut seen = 0usize;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > budget {
                return (found, false);
            }
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            let kind = meta.file_type();
            if kind.is_socket() {
                found.push(entry.path());
            } else if kind.is_dir() && meta.dev() == top.dev() {
                stack.push(entry.path());
            }
        }
    }
    found.sort();
    (found, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_found_links_are_not_followed_and_shared_ones_are_not_named() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        std::fs::create_dir_all(w.join(".git")).unwrap();
        let _a = std::os::unix::net::UnixListener::bind(w.join(".git/fsmonitor--daemon.ipc")).unwrap();
        let _b = std::os::unix::net::UnixListener::bind(w.join("dev.sock")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        let _c = std::os::unix::net::UnixListener::bind(outside.path().join("elsewhere.sock")).unwrap();
        std::os::unix::fs::symlink(outside.path(), w.join("link")).unwrap();
        let (found, complete) = sockets_under(w, 100);
        assert!(complete);
        assert_eq!(found, vec![w.join(".git/fsmonitor--daemon.ipc"), w.join("dev.sock")]);

        let share = shared(&["dev.sock".into()], w);
        let unshared: Vec<&PathBuf> = found.iter().filter(|p| !share.contains(p)).collect();
        let line = message(w, &unshared, complete).unwrap();
        assert!(line.contains("1 Unix socket of host processes"), "{line}");
        assert!(line.contains(".git/fsmonitor--daemon.ipc;"), "{line}");
        assert!(!line.contains("dev.sock"), "{line}");
        assert!(message(w, &[], true).is_none());
    }

    #[test]
    fn the_walk_stops_at_its_budget_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..10 {
            std::fs::write(dir.path().join(format!("f{i}")), b"").unwrap();
        }
        let (_, complete) = sockets_under(dir.path(), 5);
        assert!(!complete);
        let p = dir.path().join("s");
        let line = message(dir.path(), &[&p], false).unwrap();
        assert!(line.contains("looked at in part"), "{line}");
    }
}
