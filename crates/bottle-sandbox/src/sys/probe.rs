//! The crate's only `unsafe`: raw syscalls the preflight probes need (fork + unshare, KVM ioctls, Landlock, seccomp).
//! Trusts the kernel's documented ABI; every function is safe to call and reports failure as `io::Error`.

#[cfg(target_os = "linux")]
pub(crate) use linux::*;
#[cfg(not(target_os = "linux"))]
pub(crate) use other::*;

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

    use crate::preflight::{KernelCall, NamespaceProbe};

    /// `KVM_GET_API_VERSION` = `_IO(KVMIO, 0x00)` (linux/kvm.h).
    const KVM_GET_API_VERSION: u32 = 0xAE00;
    /// `KVM_CREATE_VM` = `_IO(KVMIO, 0x01)` (linux/kvm.h).
    const KVM_CREATE_VM: u32 = 0xAE01;
    /// `LANDLOCK_CREATE_RULESET_VERSION` (linux/landlock.h): ask for the ABI version instead of creating a ruleset.
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    /// Child exit code when unshare failed but errno was unreadable or out of range.
    const UNKNOWN_ERRNO_EXIT: libc::c_int = 255;

    fn clone_flags(probe: NamespaceProbe) -> libc::c_int {
        match probe {
            NamespaceProbe::User => libc::CLONE_NEWUSER,
            NamespaceProbe::Isolation => {
                libc::CLONE_NEWUSER
                    | libc::CLONE_NEWNS
                    | libc::CLONE_NEWPID
                    | libc::CLONE_NEWNET
                    | libc::CLONE_NEWIPC
                    | libc::CLONE_NEWUTS
            }
            // A new user namespace grants the CAP_SYS_ADMIN that CLONE_NEWCGROUP needs, so the probe also works
            // for a non-root caller.
            NamespaceProbe::Cgroup => libc::CLONE_NEWUSER | libc::CLONE_NEWCGROUP,
        }
    }

    /// Forks a child that calls `unshare(2)` with the probe's flags and `_exit`s with 0 or the errno.
    ///
    /// A child is needed because `CLONE_NEWUSER` fails with EINVAL in a multithreaded process (unshare(2)), and
    /// because the caller must stay in its own namespaces. Outer `Err`: fork or wait failed; inner `Err`: the kernel
    /// refused the unshare.
    pub(crate) fn unshare_in_child(probe: NamespaceProbe) -> io::Result<Result<(), io::Error>> {
        let flags = clone_flags(probe);
        // SAFETY: fork() duplicates only the calling thread. The child below runs nothing but unshare(2), a read of
        // errno and _exit(2), which are async-signal-safe, so it never touches a lock another thread held at fork
        // time, and _exit skips atexit handlers and std's cleanup.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: unshare only reads its integer argument.
            let rc = unsafe { libc::unshare(flags) };
            let code = if rc == 0 {
                0
            } else {
                // last_os_error reads errno and does not allocate.
                match io::Error::last_os_error().raw_os_error() {
                    Some(errno) if (1..UNKNOWN_ERRNO_EXIT).contains(&errno) => errno,
                    _ => UNKNOWN_ERRNO_EXIT,
                }
            };
            // SAFETY: _exit never returns and runs no user-space cleanup.
            unsafe { libc::_exit(code) }
        }
        let status = wait_for(pid)?;
        if libc::WIFEXITED(status) {
            return Ok(match libc::WEXITSTATUS(status) {
                0 => Ok(()),
                UNKNOWN_ERRNO_EXIT => Err(io::Error::other("unshare failed with an unknown errno")),
                errno => Err(io::Error::from_raw_os_error(errno)),
            });
        }
        Err(io::Error::other(format!(
            "unshare probe child ended abnormally (wait status {status:#x})"
        )))
    }

    /// Whether this process (root) can show `path` through an idmapped mount, as a root launcher's bottle needs: a
    /// forked child makes a user namespace and waits; this process maps it (`0 id 1`), idmaps a detached copy of
    /// `path` through it, and lets the child go.
    pub(crate) fn idmapped_mount_in_child(path: &std::path::Path, id: u32) -> io::Result<()> {
        // Close-on-exec: a process another thread starts meanwhile must not hold an end open.
        let (ready_r, ready_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let (go_r, go_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        // SAFETY: as in `unshare_in_child`: the child runs only unshare(2), write(2), read(2) and _exit(2).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: unshare reads its integer argument; write/read use descriptors this child owns and a byte on
            // its stack; _exit never returns.
            unsafe {
                // The parent's ends: with them open here, the read below would never see the parent let go.
                libc::close(ready_r.as_raw_fd());
                libc::close(go_w.as_raw_fd());
                let code = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                    0u8
                } else {
                    1u8
                };
                libc::write(ready_w.as_raw_fd(), (&code as *const u8).cast(), 1);
                let mut byte = 0u8;
                libc::read(go_r.as_raw_fd(), (&mut byte as *mut u8).cast(), 1);
                libc::_exit(0)
            }
        }
        drop((ready_w, go_r));
        let mut code = [1u8];
        let outcome = match rustix::io::read(&ready_r, &mut code) {
            Ok(1) if code[0] == 0 => std::fs::write(format!("/proc/{pid}/uid_map"), format!("0 {id} 1\n"))
                .and_then(|()| std::fs::write(format!("/proc/{pid}/gid_map"), format!("0 {id} 1\n")))
                .and_then(|()| std::fs::File::open(format!("/proc/{pid}/ns/user")))
                .and_then(|userns| {
                    use std::os::fd::AsFd;
                    crate::sys::ns::idmapped_tree(path, userns.as_fd()).map(drop)
                }),
            Ok(_) => Err(io::Error::other("the probe could not make a user namespace")),
            Err(e) => Err(e.into()),
        };
        drop(go_w);
        wait_for(pid)?;
        outcome
    }

    fn wait_for(pid: libc::pid_t) -> io::Result<libc::c_int> {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: pid is our own child; status points to a live c_int for the duration of the call.
            let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
            if rc == pid {
                return Ok(status);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// `ioctl(fd, KVM_GET_API_VERSION, 0)`; the kernel returns 12 since Linux 2.6.22.
    pub(crate) fn kvm_api_version(kvm: BorrowedFd<'_>) -> io::Result<i32> {
        // SAFETY: KVM_GET_API_VERSION takes no argument and returns an int; `kvm` is an open descriptor borrowed for
        // the duration of the call. On a non-KVM fd the kernel answers ENOTTY.
        let rc = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc)
    }

    /// `ioctl(fd, KVM_CREATE_VM, 0)` then closes the VM descriptor: proves the kernel can create a VM at all.
    pub(crate) fn kvm_create_vm(kvm: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: KVM_CREATE_VM takes the machine type by value (0 = default) and returns a new descriptor or -1.
        let rc = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: rc is a descriptor the kernel just created for us and nothing else owns it; dropping closes it.
        drop(unsafe { OwnedFd::from_raw_fd(rc) });
        Ok(())
    }

    /// `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`: the Landlock ABI version. ENOSYS means the
    /// kernel lacks CONFIG_SECURITY_LANDLOCK; EOPNOTSUPP means it is built in but not enabled at boot.
    pub(crate) fn landlock_abi_version() -> io::Result<u32> {
        // SAFETY: with a NULL attr and size 0 and the VERSION flag the kernel reads and writes no memory
        // (landlock_create_ruleset(2)).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<libc::c_void>(),
                0 as libc::size_t,
                LANDLOCK_CREATE_RULESET_VERSION,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        u32::try_from(rc).map_err(|_| io::Error::other(format!("landlock returned an out-of-range ABI {rc}")))
    }

    /// Calls `call` with arguments every kernel that has it refuses without acting (close_range with first > last,
    /// mount_setattr with a zero-sized attr): Ok for any answer but ENOSYS and EPERM.
    pub(crate) fn kernel_call_present(call: KernelCall) -> io::Result<()> {
        let rc = match call {
            // SAFETY: first > last is refused with EINVAL before any descriptor is looked at (close_range(2)).
            KernelCall::CloseRange => unsafe { libc::syscall(libc::SYS_close_range, u32::MAX, 0u32, 0u32) },
            // SAFETY: a NULL attr with size 0 is refused with EINVAL before any path or memory is used
            // (mount_setattr(2): size below MOUNT_ATTR_SIZE_VER0).
            KernelCall::MountSetattr => unsafe {
                libc::syscall(
                    libc::SYS_mount_setattr,
                    -1 as libc::c_int,
                    std::ptr::null::<libc::c_char>(),
                    0 as libc::c_uint,
                    std::ptr::null::<libc::c_void>(),
                    0 as libc::size_t,
                )
            },
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOSYS | libc::EPERM) => Err(err),
            _ => Ok(()),
        }
    }

    /// `prctl(PR_GET_SECCOMP)`: the calling thread's seccomp mode; EINVAL when the kernel lacks CONFIG_SECCOMP.
    pub(crate) fn seccomp_mode() -> io::Result<i32> {
        // SAFETY: PR_GET_SECCOMP reads no pointer arguments.
        let rc = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc)
    }

    /// `prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, NULL)`, which can never install anything: the kernel copies the
    /// filter from user space first, so EFAULT means filter mode exists and EINVAL means it does not (the same probe
    /// as systemd's `is_seccomp_available`). Returns the errno the kernel gave.
    pub(crate) fn seccomp_filter_probe() -> io::Error {
        // SAFETY: a NULL filter pointer makes the kernel fail with EFAULT before it changes any state.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                std::ptr::null::<libc::c_void>(),
                0,
                0,
            )
        };
        if rc == 0 {
            return io::Error::other("PR_SET_SECCOMP with a NULL filter unexpectedly succeeded");
        }
        io::Error::last_os_error()
    }
}

#[cfg(not(target_os = "linux"))]
mod other {
    use std::io;
    use std::os::fd::BorrowedFd;

    use crate::preflight::NamespaceProbe;

    fn unsupported() -> io::Error {
        io::Error::new(io::ErrorKind::Unsupported, "this probe exists on Linux only")
    }
    pub(crate) fn unshare_in_child(_: NamespaceProbe) -> io::Result<Result<(), io::Error>> {
        Err(unsupported())
    }
    pub(crate) fn idmapped_mount_in_child(_: &std::path::Path, _: u32) -> io::Result<()> {
        Err(unsupported())
    }
    pub(crate) fn kvm_api_version(_: BorrowedFd<'_>) -> io::Result<i32> {
        Err(unsupported())
    }
    pub(crate) fn kvm_create_vm(_: BorrowedFd<'_>) -> io::Result<()> {
        Err(unsupported())
    }
    pub(crate) fn landlock_abi_version() -> io::Result<u32> {
        Err(unsupported())
    }
    pub(crate) fn seccomp_mode() -> io::Result<i32> {
        Err(unsupported())
    }
    pub(crate) fn kernel_call_present(_: crate::preflight::KernelCall) -> io::Result<()> {
        Err(unsupported())
    }
    pub(crate) fn seccomp_filter_probe() -> io::Error {
        unsupported()
    }
}
