//! `BOTTLE_TEST_REQUIRE`: a comma-separated list of capabilities this host promises (`namespace`, `container`,
//! `smolmachines`, `smolmachines-boot`, `agents`, `podman`). A test that needs a capability the host lacks skips, saying why, unless the
//! capability is listed: then the skip is a failure with the same reason. CI lists what it can run
//! (`namespace,smolmachines`), so nothing it promises is skipped silently.
//!
//! What each capability promises:
//! - `namespace`: namespace bottles run here, as root, with the tools their tests drive them with (`curl`); tests
//!   that only need root (a tmpfs, a private mount namespace) or curl need this one too.
//! - `container`: a rootful Docker daemon answers and container bottles run here (root; busybox-static and curl
//!   for the test image, `docker-registry` for the pull test); the escape suite's families run on the container
//!   backend too.
//! - `podman`: rootful Podman's Docker-compatible API answers at `/run/podman/podman.sock` (with `container`).
//! - `smolmachines`: a verified smolvm engine is installed and runs every step up to the guest's boot.
//! - `smolmachines-boot`: guests also boot (KVM works, not nested).
//! - `agents`: the pinned real agent CLIs (`claude`, `codex`, `gemini`, from the npm registry) are installed, and namespace
//!   bottles run (as for `namespace`).

/// The environment variable.
pub const ENV: &str = "BOTTLE_TEST_REQUIRE";

/// Whether `BOTTLE_TEST_REQUIRE` lists `capability`.
pub fn required(capability: &str) -> bool {
    lists(&std::env::var(ENV).unwrap_or_default(), capability)
}

/// Skips with `why` (printed), unless `capability` is required, in which case this panics with `why`. The caller
/// returns right after.
pub fn skip(capability: &str, why: &str) {
    assert!(
        !required(capability),
        "{ENV} lists {capability}, but this host cannot run it: {why}"
    );
    eprintln!("skipped (needs {capability}): {why}");
}

/// Whether the comma-separated `value` lists `capability` (whole entries, blanks around them ignored).
fn lists(value: &str, capability: &str) -> bool {
    value.split(',').any(|c| c.trim() == capability)
}

#[cfg(test)]
mod tests {
    use super::lists;

    #[test]
    fn a_capability_is_listed_only_as_a_whole_entry() {
        assert!(lists("namespace,smolmachines", "smolmachines"));
        assert!(lists(" namespace , container ", "container"));
        assert!(!lists("smolmachines-boot", "smolmachines"));
        assert!(!lists("namespaces", "namespace"));
        assert!(!lists("", "namespace"));
    }
}
