//! Raw syscalls for hardening the bottle's init, if rustix has no safe wrapper. Empty on purpose:
//! `namespace::harden` needs none, because rustix wraps no_new_privs, capget/capset, PR_CAPBSET_* and securebits,
//! the `landlock` crate wraps Landlock and `seccompiler` installs the filter.
