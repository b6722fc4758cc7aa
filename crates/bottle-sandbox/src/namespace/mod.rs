//! The namespace backend: Linux user/mount/pid/net/ipc/uts(/cgroup) namespaces + seccomp + Landlock, no daemon.

pub mod backend;
pub mod control;
pub mod harden;
pub mod ids;
pub mod init;
pub mod join;
pub mod launch;
pub mod rootfs;
pub mod spec;
pub mod warden;
