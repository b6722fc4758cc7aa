//! The syscalls rustix does not wrap, each behind a safe function returning `io::Result`. The only module of the
//! probe with `unsafe`: every call passes either plain integers or pointers to locals that outlive the call.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(check(ret)?).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn null() -> *mut libc::c_void {
    std::ptr::null_mut()
}

pub fn ptrace_attach(pid: i32) -> io::Result<()> {
    // SAFETY: PTRACE_ATTACH takes a pid; addr and data are ignored (ptrace(2)).
    check(unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, null(), null()) }).map(drop)
}

pub fn ptrace_detach(pid: i32) -> io::Result<()> {
    // SAFETY: PTRACE_DETACH takes a pid; addr is ignored and data 0 means no signal (ptrace(2)).
    check(unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, null(), null()) }).map(drop)
}

pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes flags only. The probe is single-threaded and exits right after, so no other thread can
    // observe a changed namespace or descriptor table.
    check(libc::c_long::from(unsafe { libc::unshare(flags) })).map(drop)
}

/// `BPF_MAP_CREATE` of a one-entry array (`union bpf_attr`, linux/bpf.h; trailing fields zero).
pub fn bpf_map_create() -> io::Result<OwnedFd> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u32; 28],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        rest: [0; 28],
    };
    let size = std::mem::size_of::<MapCreate>() as libc::c_long;
    // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix of `size` bytes that outlives the call.
    owned(unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &attr as *const MapCreate, size) })
}

/// `KEYCTL_GET_KEYRING_ID` of the user keyring, which is shared by every process of the uid (keyrings(7)).
pub fn keyctl_user_keyring() -> io::Result<i64> {
    const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
    const KEY_SPEC_USER_KEYRING: libc::c_long = -4;
    // SAFETY: integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0) })
}

/// `add_key` into the process keyring (gone when the probe exits).
pub fn add_key_process() -> io::Result<i64> {
    const KEY_SPEC_PROCESS_KEYRING: libc::c_long = -2;
    let (kind, desc, payload): (&CStr, &CStr, &[u8]) = (c"user", c"bottle-probe", b"x");
    // SAFETY: both strings are NUL-terminated and the payload pointer/length pair is valid for the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_add_key,
            kind.as_ptr(),
            desc.as_ptr(),
            payload.as_ptr(),
            payload.len(),
            KEY_SPEC_PROCESS_KEYRING,
        )
    })
}

pub fn userfaultfd() -> io::Result<OwnedFd> {
    // UFFD_USER_MODE_ONLY (linux/userfaultfd.h): the flavour an unprivileged process may ask for.
    const UFFD_USER_MODE_ONLY: libc::c_long = 1;
    // SAFETY: integer flags only.
    owned(unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::c_long::from(libc::O_CLOEXEC) | UFFD_USER_MODE_ONLY,
        )
    })
}

/// `kexec_load` with no segments and an unknown flag: a caller with CAP_SYS_BOOT gets EINVAL (kernel/kexec.c checks
/// the capability first), anyone else EPERM. Nothing is ever loaded.
pub fn kexec_load_invalid() -> io::Result<()> {
    const UNKNOWN_FLAG: libc::c_long = 0x8000;
    // SAFETY: a NULL segment array with nr_segments = 0 is never dereferenced.
    check(unsafe { libc::syscall(libc::SYS_kexec_load, 0, 0, null(), UNKNOWN_FLAG) }).map(drop)
}

/// `finit_module(-1, "", 0)`: CAP_SYS_MODULE is checked before the descriptor, so EBADF means it passed.
pub fn finit_module_invalid() -> io::Result<()> {
    // SAFETY: an empty NUL-terminated parameter string and an invalid descriptor.
    check(unsafe { libc::syscall(libc::SYS_finit_module, -1, c"".as_ptr(), 0) }).map(drop)
}

pub fn io_uring_setup() -> io::Result<OwnedFd> {
    // struct io_uring_params is 120 bytes; zeroed is a valid request for default rings.
    let mut params = [0u64; 16];
    // SAFETY: `params` is larger than struct io_uring_params, zeroed, and outlives the call.
    owned(unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) })
}

/// A software CPU-clock counter on the calling process, user space only (perf_event_open(2)).
pub fn perf_event_open() -> io::Result<OwnedFd> {
    const PERF_TYPE_SOFTWARE: u32 = 1;
    const PERF_ATTR_SIZE_VER0: u32 = 64;
    const DISABLED_EXCLUDE_KERNEL_EXCLUDE_HV: u64 = 1 | 1 << 5 | 1 << 6;
    const PERF_FLAG_FD_CLOEXEC: libc::c_long = 8;
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&PERF_TYPE_SOFTWARE.to_ne_bytes());
    attr[4..8].copy_from_slice(&PERF_ATTR_SIZE_VER0.to_ne_bytes());
    attr[40..48].copy_from_slice(&DISABLED_EXCLUDE_KERNEL_EXCLUDE_HV.to_ne_bytes());
    // SAFETY: `attr` holds a valid VER0 perf_event_attr and outlives the call; the rest are integers.
    owned(unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            0,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    })
}

/// The "shocker" escape: open `/` by file handle. The handle comes from `name_to_handle_at` when allowed, else a
/// guessed one (inode 2, the root of most filesystems); either way CAP_DAC_READ_SEARCH is checked first.
pub fn open_by_handle(mount: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    const MAX_HANDLE_SZ: u32 = 128;
    const FILEID_INO32_GEN: i32 = 1;
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        f: [u8; MAX_HANDLE_SZ as usize],
    }
    let mut h = Handle {
        bytes: MAX_HANDLE_SZ,
        kind: 0,
        f: [0; MAX_HANDLE_SZ as usize],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `h` and `mount_id` are valid for writes and outlive the call; the path is NUL-terminated.
    let named = check(unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c"/".as_ptr(),
            &mut h as *mut Handle,
            &mut mount_id as *mut libc::c_int,
            0,
        )
    });
    if named.is_err() {
        h.bytes = 8;
        h.kind = FILEID_INO32_GEN;
        h.f[..4].copy_from_slice(&2u32.to_ne_bytes());
    }
    // SAFETY: `h` is a valid file_handle whose `bytes` fit its buffer; it outlives the call.
    owned(unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            &mut h as *mut Handle,
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    })
}

/// TIOCSTI: push one byte into the input queue of the terminal `fd`.
pub fn tiocsti(fd: BorrowedFd<'_>) -> io::Result<()> {
    let byte: libc::c_char = b'#' as libc::c_char;
    // SAFETY: TIOCSTI reads one char through the pointer, which is valid for the call.
    check(libc::c_long::from(unsafe {
        libc::ioctl(fd.as_raw_fd(), libc::TIOCSTI, &byte as *const libc::c_char)
    }))
    .map(drop)
}

/// Returns the previous persona.
pub fn personality(persona: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: integer argument only.
    let ret = unsafe { libc::personality(persona) };
    check(libc::c_long::from(ret)).map(|_| ret)
}

/// `SYSLOG_ACTION_SIZE_BUFFER`: only asks the kernel log buffer's size.
pub fn syslog_size() -> io::Result<libc::c_int> {
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: this action ignores the buffer and length.
    let ret = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    check(libc::c_long::from(ret)).map(|_| ret)
}

/// `IPT_SO_GET_INFO` for the filter table (linux/netfilter_ipv4/ip_tables.h), which needs CAP_NET_ADMIN.
pub fn iptables_get_info(fd: BorrowedFd<'_>) -> io::Result<()> {
    const IPT_SO_GET_INFO: libc::c_int = 64;
    // struct ipt_getinfo: name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size.
    let mut info = [0u8; 84];
    info[..6].copy_from_slice(b"filter");
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for reads and writes of `len` bytes and outlive the call.
    check(libc::c_long::from(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            IPT_SO_GET_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    }))
    .map(drop)
}
