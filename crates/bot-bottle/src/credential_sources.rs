//! Credential files, resolved on the host before anything starts: `~/` and relative paths made absolute (relative
//! to the policy file), links followed, and refused where the bottle could read them.
//!
//! SECURITY: the bottle holds placeholders only. A `from_file` that lies in the workspace, directly or as the
//! target of a link, or under a host path the backend shows inside, would hand the agent the real value; so would
//! a second hard link to it (which may sit anywhere, the workspace included).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bottle_policy::{Policy, PolicyError, SecretSource};

/// A host path the bottle can read, and how the user would recognise it.
pub struct Shown {
    pub path: PathBuf,
    pub what: &'static str,
}

impl Shown {
    pub fn new(path: &Path, what: &'static str) -> Self {
        Self {
            path: path.canonicalize().unwrap_or_else(|_| path.to_path_buf()),
            what,
        }
    }
}

/// Makes every credential file absolute and canonical; refuses one the bottle could read. A file that does not
/// exist is left for the proxy, which fails a required credential and skips an optional one.
pub fn resolve(policy: &mut Policy, shown: &[Shown]) -> Result<(), PolicyError> {
    let base = policy.bottle.base_dir.clone();
    let refuse = |msg: String| PolicyError::whole_file(None, msg);
    for cred in &mut policy.credentials {
        let SecretSource::FromFile(written) = &cred.source else {
            continue;
        };
        let absolute =
            absolute(written, base.as_deref()).map_err(|m| refuse(format!("credential `{}`: {m}", cred.env)))?;
        let Ok(canonical) = absolute.canonicalize() else {
            cred.source = SecretSource::FromFile(absolute);
            continue;
        };
        if let Some(s) = shown.iter().find(|s| canonical.starts_with(&s.path)) {
            let via = if canonical == absolute {
                String::new()
            } else {
                format!(" (it leads to {})", canonical.display())
            };
            return Err(refuse(format!(
                "credential `{}`: its file {}{via} lies inside {} {}, which the bottle can read; keep the secret outside it",
                cred.env,
                written.display(),
                s.what,
                s.path.display()
            )));
        }
        if let Ok(meta) = std::fs::metadata(&canonical)
            && meta.nlink() > 1
        {
            return Err(refuse(format!(
                "credential `{}`: its file {} has {} hard links, and another one could be inside the bottle; keep the secret in a file with one link",
                cred.env,
                canonical.display(),
                meta.nlink()
            )));
        }
        cred.source = SecretSource::FromFile(canonical);
    }
    Ok(())
}

/// A path as the user wrote it (in a policy or a flag), made absolute: `~/` is their home, a relative path is
/// relative to the policy file (else the working directory). Nothing is resolved or created.
pub fn absolute(written: &Path, base: Option<&Path>) -> Result<PathBuf, String> {
    if let Ok(rest) = written.strip_prefix("~") {
        let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
        let home = home.ok_or_else(|| format!("{} starts with `~` but HOME is not set", written.display()))?;
        return Ok(PathBuf::from(home).join(rest));
    }
    if written.is_absolute() {
        return Ok(written.to_path_buf());
    }
    match base {
        Some(b) => Ok(b.join(written)),
        None => std::env::current_dir()
            .map(|cwd| cwd.join(written))
            .map_err(|e| format!("cannot read the current directory: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bottle_policy::{Overrides, Source};

    fn policy_with_file(file: &Path) -> Policy {
        let text = format!(
            "[network]\nallow = [\"api.test\"]\n[[credential]]\nhost = \"api.test\"\nheader = \"authorization\"\nfrom_file = \"{}\"\nenv = \"API_TOKEN\"\n",
            file.display()
        );
        bottle_policy::from_str(
            &Source {
                text: &text,
                path: None,
            },
            &Overrides::default(),
        )
        .unwrap()
    }

    fn source(p: &Policy) -> PathBuf {
        match &p.credentials[0].source {
            SecretSource::FromFile(f) => f.clone(),
            SecretSource::FromEnv(_) => unreachable!(),
        }
    }

    #[test]
    fn a_credential_file_in_the_workspace_or_linked_from_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("work");
        std::fs::create_dir(&workspace).unwrap();
        std::fs::write(workspace.join("token"), "real").unwrap();
        let shown = [Shown::new(&workspace, "the workspace")];
        let err = resolve(&mut policy_with_file(&workspace.join("token")), &shown).unwrap_err();
        assert!(err.to_string().contains("inside the workspace"), "{err}");

        // A link outside that leads into the workspace.
        let link = dir.path().join("innocent");
        std::os::unix::fs::symlink(workspace.join("token"), &link).unwrap();
        let err = resolve(&mut policy_with_file(&link), &shown).unwrap_err();
        assert!(err.to_string().contains("it leads to"), "{err}");

        // A second hard link (which could sit in the workspace).
        let outside = dir.path().join("secret");
        std::fs::write(&outside, "real").unwrap();
        std::fs::hard_link(&outside, dir.path().join("other-name")).unwrap();
        let err = resolve(&mut policy_with_file(&outside), &shown).unwrap_err();
        assert!(err.to_string().contains("hard links"), "{err}");
    }

    #[test]
    fn a_credential_file_outside_is_made_canonical() {
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("work");
        std::fs::create_dir(&workspace).unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "real").unwrap();
        let mut p = policy_with_file(&dir.path().join("work/../token"));
        resolve(&mut p, &[Shown::new(&workspace, "the workspace")]).unwrap();
        assert_eq!(source(&p), file.canonicalize().unwrap());
    }
}
