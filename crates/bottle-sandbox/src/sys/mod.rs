//! The crate's only `unsafe`: raw syscalls, each wrapped in a safe function that reports failure as `io::Error`.
//! Submodules split it by owner: `probe` (preflight probes), `harden` (seccomp, capabilities, no_new_privs),
//! `ns` (namespaces, mounts, the bottle's init). Nothing outside `sys` may use `unsafe`.
#![allow(unsafe_code)]

pub(crate) mod harden;
pub(crate) mod ns;
mod probe;

#[allow(unused_imports)]
pub(crate) use harden::*;
pub(crate) use probe::*;
