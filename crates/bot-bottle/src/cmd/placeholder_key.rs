//! The key the placeholders of kept homes are derived from: one per state root, made once, never in a bottle.

use std::path::Path;

/// Beside the bottles' state directories: the key placeholders of kept homes are derived from (0600, 32 bytes).
const PLACEHOLDER_KEY: &str = "placeholder.key";
const PLACEHOLDER_KEY_BYTES: usize = 32;

/// The seed of the placeholders of every bottle whose home is `home`: the same in each run, so an agent that
/// remembers which key it approved (Claude Code does, in its kept home) is not asked again. A key of this state
/// root (made once, never in a bottle) and the home's path; a placeholder derived from it says nothing of a value.
pub fn placeholder_seed(state_root: &Path, home: &Path) -> anyhow::Result<Vec<u8>> {
    let path = state_root.join(PLACEHOLDER_KEY);
    let key = match read_placeholder_key(&path)? {
        Some(key) => key,
        None => make_placeholder_key(state_root, &path)?,
    };
    let mut seed = key.to_vec();
    seed.extend_from_slice(home.as_os_str().as_encoded_bytes());
    Ok(seed)
}

/// The key if the file is there; `None` if it is not (yet).
fn read_placeholder_key(path: &Path) -> anyhow::Result<Option<[u8; PLACEHOLDER_KEY_BYTES]>> {
    use anyhow::Context;
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut all = Vec::new();
    (&mut f)
        .take(PLACEHOLDER_KEY_BYTES as u64 + 1)
        .read_to_end(&mut all)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let key = all.try_into().map_err(|all: Vec<u8>| {
        anyhow::anyhow!(
            "{} is damaged ({}{} bytes, not {PLACEHOLDER_KEY_BYTES}); remove it (agents in kept homes will ask once \
             more about their key)",
            path.display(),
            if all.len() > PLACEHOLDER_KEY_BYTES { "over " } else { "" },
            all.len().min(PLACEHOLDER_KEY_BYTES)
        )
    })?;
    Ok(Some(key))
}

/// Makes the key whole in a file of its own, then puts it in place only if no other launch did first (launches
/// started together all end up with the one key; none ever reads a half-written file).
fn make_placeholder_key(state_root: &Path, path: &Path) -> anyhow::Result<[u8; PLACEHOLDER_KEY_BYTES]> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; PLACEHOLDER_KEY_BYTES];
    let n = rustix::rand::getrandom(&mut key, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| anyhow::anyhow!("no randomness for {}: {e}", path.display()))?;
    anyhow::ensure!(n == key.len(), "short randomness for {}", path.display());
    // The temporary name says nothing of the key: the pid and a nonce of its own.
    let mut nonce = [0u8; 4];
    let _ = rustix::rand::getrandom(&mut nonce, rustix::rand::GetRandomFlags::empty());
    let tmp = state_root.join(format!(
        ".{PLACEHOLDER_KEY}.{}.{:08x}.tmp",
        std::process::id(),
        u32::from_le_bytes(nonce)
    ));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(&key)?;
        f.sync_all()
    })();
    let placed = written.and_then(|()| {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &tmp,
            rustix::fs::CWD,
            path,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(std::io::Error::from)
    });
    match placed {
        Ok(()) => Ok(key),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                // Another launch placed its key first: that one is the key.
                read_placeholder_key(path)?.with_context(|| format!("{} vanished while being made", path.display()))
            } else {
                Err(e).with_context(|| format!("cannot create {}", path.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launches_started_together_all_get_the_one_whole_key() {
        for round in 0..20 {
            let root = tempfile::tempdir().unwrap();
            let seeds: Vec<Vec<u8>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..16)
                    .map(|_| s.spawn(|| placeholder_seed(root.path(), Path::new("/h")).unwrap()))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(seeds.iter().all(|s| s == &seeds[0]), "round {round}: keys differ");
            let on_disk = std::fs::read(root.path().join(PLACEHOLDER_KEY)).unwrap();
            assert_eq!(on_disk.len(), PLACEHOLDER_KEY_BYTES);
            assert_eq!(&seeds[0][..PLACEHOLDER_KEY_BYTES], &on_disk[..]);
            let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
            assert_eq!(left.len(), 1, "round {round}: temporary files left behind");
        }
    }

    #[test]
    fn the_seed_is_stable_per_home_and_differs_between_homes() {
        let root = tempfile::tempdir().unwrap();
        let a = placeholder_seed(root.path(), Path::new("/a")).unwrap();
        assert_eq!(a, placeholder_seed(root.path(), Path::new("/a")).unwrap());
        assert_ne!(a, placeholder_seed(root.path(), Path::new("/b")).unwrap());
    }

    #[test]
    fn a_damaged_key_is_refused_with_the_fix() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join(PLACEHOLDER_KEY), b"short").unwrap();
        let err = placeholder_seed(root.path(), Path::new("/a")).unwrap_err().to_string();
        assert!(err.contains("is damaged (5 bytes, not 32); remove it"), "{err}");
    }

    #[test]
    fn a_planted_link_is_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("elsewhere");
        std::fs::write(&target, [7u8; 32]).unwrap();
        std::os::unix::fs::symlink(&target, root.path().join(PLACEHOLDER_KEY)).unwrap();
        assert!(placeholder_seed(root.path(), Path::new("/a")).is_err());
    }
}
