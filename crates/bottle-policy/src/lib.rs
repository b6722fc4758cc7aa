//! The bottle policy: parsed from TOML into types that cannot hold an invalid policy, plus the pure decisions the
//! proxy asks of it. No I/O beyond reading the one policy file, no syscalls, no async.

#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod address;
mod error;
pub mod host;
mod model;
pub mod preset;
mod raw;
mod render;
pub mod rules;
mod validate;

use std::path::Path;

pub use error::{Location, PolicyError};
pub use model::{
    AddressVerdict, Agent, Ask, Backend, Bottle, BottleName, Credential, HostRule, HostVerdict, Mount, Network, Origin,
    Placement, Policy, Resources, SecretSource, TlsMode, Unknown,
};
pub use render::Effective;
pub use validate::{
    CA_ENV, MAX_POLICY_BYTES, NO_PROXY_ENV, Overrides, PROXY_ENV, Source, from_bytes, from_flags, from_str,
    is_reserved_env, proxy_and_ca_env,
};

/// Reads and validates a policy file. The read is bounded: a file over `MAX_POLICY_BYTES` is refused unread.
pub fn load_file(path: &Path, overrides: &Overrides) -> Result<Policy, PolicyError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read = || -> std::io::Result<Vec<u8>> {
        // O_NONBLOCK: opening a FIFO (or a device) must not wait for a writer; such a file is refused below, and a
        // regular file ignores the flag.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let mut buf = Vec::new();
        file.take(MAX_POLICY_BYTES as u64 + 1).read_to_end(&mut buf)?;
        Ok(buf)
    };
    let bytes = read().map_err(|e| PolicyError::whole_file(Some(path), format!("cannot read policy: {e}")))?;
    from_bytes(&bytes, Some(path), overrides)
}
