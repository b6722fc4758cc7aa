//! Hardening of the bottle's init right before it execs the agent: no_new_privs, Landlock, capabilities, seccomp.
//! Trusts the kernel and the `landlock`/`seccompiler` crates. Every step is irreversible and applies to the calling
//! thread only (the init is single-threaded); the agent inherits all of it across `execve`.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, LandlockStatus, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, path_beneath_rules,
};
use rustix::io::Errno;
use rustix::thread::{self, CapabilitiesSecureBits, CapabilitySet, CapabilitySets};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch, sock_filter,
};

/// The newest Landlock ABI this build knows. Its access rights are all handled; on an older kernel the `landlock`
/// crate's best-effort compatibility drops the ones the kernel lacks.
const LANDLOCK_ABI: ABI = ABI::V9;

/// Capabilities are bits of a `u64` (`_LINUX_CAPABILITY_VERSION_3`); a kernel knowing more could not be emptied.
const MAX_CAPABILITIES: u32 = u64::BITS;

/// SECURITY: `SECBIT_NOROOT` stops uid 0 from regaining capabilities on `execve` even if a bounding-set drop were
/// ever incomplete; each `_LOCKED` bit stops the agent from flipping its bit back (capabilities(7)).
const LOCKED_SECUREBITS: CapabilitiesSecureBits = CapabilitiesSecureBits::NO_ROOT
    .union(CapabilitiesSecureBits::NO_ROOT_LOCKED)
    .union(CapabilitiesSecureBits::NO_SETUID_FIXUP_LOCKED)
    .union(CapabilitiesSecureBits::KEEP_CAPS_LOCKED)
    .union(CapabilitiesSecureBits::NO_CAP_AMBIENT_RAISE)
    .union(CapabilitiesSecureBits::NO_CAP_AMBIENT_RAISE_LOCKED);

/// `BPF_MAXINSNS` (linux/bpf_common.h): the kernel rejects longer classic BPF programs.
const BPF_MAX_INSNS: usize = 4096;
/// `SOCK_PACKET` (linux/net.h): obsolete link-layer sockets; libc does not export it for Linux.
const SOCK_PACKET: u64 = 10;
/// `SOCK_TYPE_MASK` (linux/net.h): the socket type; the bits above are SOCK_NONBLOCK and SOCK_CLOEXEC.
const SOCK_TYPE_MASK: u64 = 0xf;
/// `personality(0xffffffff)` only queries the current persona (personality(2)).
const PERSONALITY_QUERY: u64 = 0xffff_ffff;
/// `__X32_SYSCALL_BIT` (arch/x86/include/uapi/asm/unistd.h): x32 syscalls share `AUDIT_ARCH_X86_64`.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// Offset of `nr` in `struct seccomp_data` (linux/seccomp.h).
const SECCOMP_DATA_NR_OFFSET: u32 = 0;

// Classic BPF opcodes (linux/bpf_common.h); `sock_filter::code` is 16 bits wide.
const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JMP_JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const BPF_JMP_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// What the init may touch after hardening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardening {
    /// Readable and executable beneath each path (absolute, inside the bottle's root).
    pub read_only: Vec<PathBuf>,
    /// Every filesystem access right beneath each path (absolute, inside the bottle's root).
    pub read_write: Vec<PathBuf>,
    pub landlock: LandlockMode,
}

/// What to do when the kernel has no Landlock at all. Landlock that exists but cannot be set up is always an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockMode {
    Required,
    BestEffort,
}

/// What `apply` enforced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HardenReport {
    /// The running kernel's Landlock ABI, `None` when the kernel has no Landlock.
    pub landlock_abi: Option<u32>,
    pub landlock_status: String,
    /// Syscalls denied outright plus argument rules, over all errno groups.
    pub seccomp_rules: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum HardenError {
    #[error("cannot set no_new_privs")]
    NoNewPrivs {
        #[source]
        source: io::Error,
    },
    #[error("cannot drop capabilities: {step} failed")]
    Capabilities {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "capabilities remain after dropping them (effective {effective:#x}, permitted {permitted:#x}, \
         inheritable {inheritable:#x})"
    )]
    CapabilitiesRemain {
        effective: u64,
        permitted: u64,
        inheritable: u64,
    },
    #[error("the kernel knows more than {max} capabilities, so they cannot all be dropped")]
    TooManyCapabilities { max: u32 },
    #[error("landlock path {path} is not absolute")]
    RelativePath { path: PathBuf },
    #[error("cannot set up landlock")]
    Landlock {
        #[source]
        source: landlock::RulesetError,
    },
    #[error("cannot add the landlock rule for {path}")]
    LandlockRule {
        path: PathBuf,
        #[source]
        source: landlock::RulesetError,
    },
    #[error("landlock is required but {reason}")]
    LandlockUnavailable { reason: &'static str },
    #[error("landlock ABI {abi} is available but the ruleset was not enforced")]
    LandlockNotEnforced { abi: u32 },
    #[error("no seccomp filter for architecture {arch}")]
    SeccompArch { arch: &'static str },
    #[error("cannot build the seccomp filter")]
    SeccompBuild {
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("the seccomp filter has {len} instructions, more than the kernel's limit of {max}")]
    SeccompTooLong { len: usize, max: usize },
    #[error("cannot hand the bottle's connections to its socket warden")]
    Warden {
        #[source]
        source: io::Error,
    },
    #[error("cannot install the seccomp filter")]
    Seccomp {
        #[source]
        source: seccompiler::Error,
    },
}

/// Hardens the calling thread: no_new_privs, Landlock, no capabilities, the socket warden's connect filter (its
/// listener sent on `warden`), seccomp, in that order. Irreversible.
pub fn apply(h: &Hardening, warden: Option<std::os::fd::BorrowedFd<'_>>) -> Result<HardenReport, HardenError> {
    // Built first so that a bad filter fails before anything irreversible happens.
    let (program, seccomp_rules) = build_seccomp()?;
    // SECURITY: without no_new_privs a setuid binary or file capabilities would hand the agent privileges back,
    // and the kernel refuses seccomp filters from a thread without CAP_SYS_ADMIN.
    thread::set_no_new_privs(true).map_err(|e| HardenError::NoNewPrivs { source: e.into() })?;
    let (landlock_abi, landlock_status) = restrict_filesystem(h)?;
    drop_capabilities()?;
    if let Some(channel) = warden {
        super::warden::hand_over(channel).map_err(|source| HardenError::Warden { source })?;
    }
    seccompiler::apply_filter(&program).map_err(|source| HardenError::Seccomp { source })?;
    tracing::debug!(?landlock_abi, %landlock_status, seccomp_rules, "bottle init hardened");
    Ok(HardenReport {
        landlock_abi,
        landlock_status,
        seccomp_rules,
    })
}

/// The seccomp program `apply` installs, built but not installed.
pub fn seccomp_program() -> Result<BpfProgram, HardenError> {
    build_seccomp().map(|(program, _)| program)
}

fn restrict_filesystem(h: &Hardening) -> Result<(Option<u32>, String), HardenError> {
    let read = AccessFs::from_read(LANDLOCK_ABI);
    let all = AccessFs::from_all(LANDLOCK_ABI);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .and_then(Ruleset::create)
        .map_err(|source| HardenError::Landlock { source })?;
    let rules = h
        .read_only
        .iter()
        .map(|p| (p, read))
        .chain(h.read_write.iter().map(|p| (p, all)));
    for (path, access) in rules {
        if !path.is_absolute() {
            return Err(HardenError::RelativePath { path: path.clone() });
        }
        // SECURITY: a path that cannot be opened is an error, not a rule silently left out.
        ruleset = ruleset
            .add_rules(path_beneath_rules([path], access))
            .map_err(|source| HardenError::LandlockRule {
                path: path.clone(),
                source,
            })?;
    }
    let status = ruleset
        .restrict_self()
        .map_err(|source| HardenError::Landlock { source })?;
    let reason = match status.landlock {
        LandlockStatus::Available {
            effective_abi,
            kernel_abi,
        } => {
            let abi = kernel_abi.map_or_else(|| abi_number(effective_abi), |v| u32::try_from(v).unwrap_or(0));
            return match status.ruleset {
                RulesetStatus::FullyEnforced => Ok((Some(abi), format!("enforced (kernel ABI {abi})"))),
                RulesetStatus::PartiallyEnforced => Ok((
                    Some(abi),
                    format!("enforced for the access rights of kernel ABI {abi}; newer rights unavailable"),
                )),
                // SECURITY: Landlock exists, so an unenforced ruleset is a setup failure: fail closed.
                RulesetStatus::NotEnforced => Err(HardenError::LandlockNotEnforced { abi }),
            };
        }
        LandlockStatus::NotEnabled => "the kernel has it disabled (add landlock to the lsm= boot parameter)",
        LandlockStatus::NotImplemented => "the kernel is built without it (CONFIG_SECURITY_LANDLOCK)",
    };
    match h.landlock {
        LandlockMode::Required => Err(HardenError::LandlockUnavailable { reason }),
        LandlockMode::BestEffort => Ok((None, format!("not enforced: {reason}"))),
    }
}

fn abi_number(abi: ABI) -> u32 {
    // `ABI` is non-exhaustive and only offers `Display` ("unsupported" or the number).
    abi.to_string().parse().unwrap_or(0)
}

fn drop_capabilities() -> Result<(), HardenError> {
    let fail = |step| move |e: Errno| HardenError::Capabilities { step, source: e.into() };
    thread::clear_ambient_capability_set().map_err(fail("clearing the ambient set"))?;
    // SECURITY: the bounding set caps what any later execve can grant, including to uid 0; it must be empty
    // before the effective set loses CAP_SETPCAP, which dropping it requires.
    for cap in 0..=last_capability()? {
        thread::remove_capability_from_bounding_set(CapabilitySet::from_bits_retain(1 << cap))
            .map_err(fail("PR_CAPBSET_DROP"))?;
    }
    thread::set_capabilities_secure_bits(LOCKED_SECUREBITS).map_err(fail("PR_SET_SECUREBITS"))?;
    let empty = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    thread::set_capabilities(None, empty).map_err(fail("capset"))?;
    // SECURITY: verify rather than trust: a partial capset would leave the agent privileged in its namespace.
    let now = thread::capabilities(None).map_err(fail("capget"))?;
    if now != empty {
        return Err(HardenError::CapabilitiesRemain {
            effective: now.effective.bits(),
            permitted: now.permitted.bits(),
            inheritable: now.inheritable.bits(),
        });
    }
    Ok(())
}

/// The kernel's `cap_last_cap`, found with `PR_CAPBSET_READ` (EINVAL past the last capability, prctl(2)) rather
/// than `/proc/sys/kernel/cap_last_cap`, which may be absent or unreadable after pivot_root.
fn last_capability() -> Result<u32, HardenError> {
    for cap in 0..MAX_CAPABILITIES {
        match thread::capability_is_in_bounding_set(CapabilitySet::from_bits_retain(1 << cap)) {
            Ok(_) => continue,
            Err(Errno::INVAL) if cap > 0 => return Ok(cap - 1),
            Err(e) => {
                return Err(HardenError::Capabilities {
                    step: "PR_CAPBSET_READ",
                    source: e.into(),
                });
            }
        }
    }
    Err(HardenError::TooManyCapabilities { max: MAX_CAPABILITIES })
}

/// One errno and the syscalls (with argument rules; none = always) that return it.
struct Group {
    errno: u32,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
}

/// SECURITY: creating or joining namespaces (a new user namespace hands back every capability inside it) and
/// mounting, by the old and the new (fsopen) mount API, would let the agent reshape or leave the bottle's
/// filesystem view (escape cases 38, 41, 44).
const NAMESPACE_AND_MOUNT: &[i64] = &[
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
];

/// SECURITY: reading or writing another process's memory (escape case 38).
const OTHER_PROCESSES: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
];

/// SECURITY: kernel attack surface reachable without privilege. io_uring runs its operations outside seccomp, so
/// it would bypass this very filter; bpf and perf_event_open expose verifier and tracing bugs; userfaultfd widens
/// kernel race windows for exploits; keyrings are shared per uid beyond the bottle.
const KERNEL_SURFACE: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
];

/// SECURITY: host-wide state: kernel modules, kexec, reboot, swap, clocks, process accounting, quotas, the kernel
/// log and the terminal hangup. Capabilities already guard most; this keeps them closed if one is left.
const HOST_STATE: &[i64] = &[
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_adjtimex,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_vhangup,
];

/// SECURITY: open_by_handle_at opens any inode of a mounted filesystem by handle, skipping the path walk that
/// confines the bottle (the "shocker" container escape); name_to_handle_at mints the handles.
const FILE_HANDLES: &[i64] = &[libc::SYS_open_by_handle_at, libc::SYS_name_to_handle_at];

/// SECURITY: raw I/O port access.
#[cfg(target_arch = "x86_64")]
const IO_PORTS: &[i64] = &[libc::SYS_iopl, libc::SYS_ioperm];
#[cfg(not(target_arch = "x86_64"))]
const IO_PORTS: &[i64] = &[];

/// `openat2(2)` (Linux 5.6; the same number on every architecture).
const SYS_OPENAT2: i64 = 437;
/// `fchmodat2(2)` (Linux 6.6; the same number on every architecture).
const SYS_FCHMODAT2: i64 = 452;
/// `setxattrat(2)` (Linux 6.13; the same number on every architecture).
const SYS_SETXATTRAT: i64 = 463;

/// Syscalls that set a file's mode: (number, index of the mode argument, index of the open flags when the mode
/// only counts with `O_CREAT`).
#[cfg(target_arch = "x86_64")]
const SETID_MODE_ARGS: [(i64, u8, Option<u8>); 9] = [
    (libc::SYS_chmod, 1, None),
    (libc::SYS_fchmod, 1, None),
    (libc::SYS_fchmodat, 2, None),
    (SYS_FCHMODAT2, 2, None),
    (libc::SYS_creat, 1, None),
    (libc::SYS_open, 2, Some(1)),
    (libc::SYS_openat, 3, Some(2)),
    (libc::SYS_mknod, 1, None),
    (libc::SYS_mknodat, 2, None),
];
#[cfg(not(target_arch = "x86_64"))]
const SETID_MODE_ARGS: [(i64, u8, Option<u8>); 5] = [
    (libc::SYS_fchmod, 1, None),
    (libc::SYS_fchmodat, 2, None),
    (SYS_FCHMODAT2, 2, None),
    (libc::SYS_openat, 3, Some(2)),
    (libc::SYS_mknodat, 2, None),
];

/// Every way to write an extended attribute.
const XATTR_WRITES: [i64; 4] = [
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    SYS_SETXATTRAT,
];

/// Every `CLONE_NEW*` flag `clone` accepts (`CLONE_NEWTIME` shares its bit with the exit signal there).
const CLONE_NEW_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

fn target_arch() -> Result<TargetArch, HardenError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(TargetArch::x86_64),
        "aarch64" => Ok(TargetArch::aarch64),
        arch => Err(HardenError::SeccompArch { arch }),
    }
}

/// A condition on the low 32 bits of an argument. SECURITY: every argument checked here is an `int` or `unsigned
/// int` to the kernel (or, for clone's flags, truncated to 32 bits), so the kernel ignores the upper half; comparing
/// 64 bits would let garbage there slip past the rule.
fn arg32(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, HardenError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
        .map_err(|source| HardenError::SeccompBuild { source })
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, HardenError> {
    SeccompRule::new(conditions).map_err(|source| HardenError::SeccompBuild { source })
}

fn groups() -> Result<Vec<Group>, HardenError> {
    use SeccompCmpOp::{Eq, Ge, Le, MaskedEq, Ne};

    // SECURITY: only AF_UNIX, AF_INET and AF_INET6. AF_NETLINK would reach the routing, firewall and audit
    // interfaces, AF_PACKET sniffs and forges frames, and the long tail (AF_VSOCK, AF_ALG, AF_XDP, ...) is
    // rarely audited kernel code (escape cases 39, 40). Rules are ORed and conditions ANDed, so the complement of
    // {1, 2, 10} is three ranges; EAFNOSUPPORT makes programs treat the family as absent.
    let (inet, inet6) = (libc::AF_INET as u64, libc::AF_INET6 as u64);
    let families = vec![
        rule(vec![arg32(0, Eq, libc::AF_UNSPEC as u64)?])?,
        rule(vec![arg32(0, Ge, inet + 1)?, arg32(0, Le, inet6 - 1)?])?,
        rule(vec![arg32(0, Ge, inet6 + 1)?])?,
    ];
    let afnosupport = Group {
        errno: libc::EAFNOSUPPORT as u32,
        rules: BTreeMap::from([(libc::SYS_socket, families)]),
    };

    // SECURITY: clone3 passes its flags behind a pointer seccomp cannot read. ENOSYS makes libc fall back to
    // clone, whose flags are checked below.
    let nosys = Group {
        errno: libc::ENOSYS as u32,
        rules: BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
    };

    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = [NAMESPACE_AND_MOUNT, OTHER_PROCESSES, KERNEL_SURFACE]
        .into_iter()
        .chain([HOST_STATE, FILE_HANDLES, IO_PORTS])
        .flatten()
        .map(|&nr| (nr, Vec::new()))
        .collect();
    // SECURITY: clone with any CLONE_NEW* flag is unshare by another name.
    let clone_new = CLONE_NEW_FLAGS.iter().map(|&flag| {
        let flag = u64::from(flag as u32);
        rule(vec![arg32(0, MaskedEq(flag), flag)?])
    });
    denied.insert(libc::SYS_clone, clone_new.collect::<Result<_, _>>()?);
    // SECURITY: raw and packet sockets forge or sniff traffic of any protocol (escape case 39). The type's low
    // four bits are the type; SOCK_NONBLOCK and SOCK_CLOEXEC sit above them.
    let raw_types = [libc::SOCK_RAW as u64, SOCK_PACKET].map(|ty| rule(vec![arg32(1, MaskedEq(SOCK_TYPE_MASK), ty)?]));
    let mut socket_rules = raw_types.into_iter().collect::<Result<Vec<_>, _>>()?;
    // SECURITY (#12): a Unix datagram socket reaches a host process's socket by path with every `sendto`/`sendmsg`
    // (even one from `socketpair`), behind a pointer seccomp cannot read; stream and seqpacket sockets can only
    // `connect`, which the socket warden judges. So there are no Unix datagram sockets in a bottle.
    let unix_dgram = || -> Result<SeccompRule, HardenError> {
        rule(vec![
            arg32(0, Eq, libc::AF_UNIX as u64)?,
            arg32(1, MaskedEq(SOCK_TYPE_MASK), libc::SOCK_DGRAM as u64)?,
        ])
    };
    socket_rules.push(unix_dgram()?);
    denied.insert(libc::SYS_socket, socket_rules);
    denied.insert(libc::SYS_socketpair, vec![unix_dgram()?]);
    // SECURITY: TIOCSTI pushes bytes into a terminal's input queue and TIOCLINUX can paste the console selection:
    // either would type commands into the user's shell once the agent exits.
    let tty_inject = [libc::TIOCSTI, libc::TIOCLINUX].map(|req| rule(vec![arg32(1, Eq, u64::from(req as u32))?]));
    denied.insert(libc::SYS_ioctl, tty_inject.into_iter().collect::<Result<_, _>>()?);
    // SECURITY: personality flags such as ADDR_NO_RANDOMIZE or READ_IMPLIES_EXEC weaken exploit mitigations for
    // whatever the agent execs; only PER_LINUX and the query pass.
    denied.insert(
        libc::SYS_personality,
        vec![rule(vec![arg32(0, Ne, 0)?, arg32(0, Ne, PERSONALITY_QUERY)?])?],
    );
    // SECURITY: a file the bottle writes must never grant anyone on the host more than the launcher has (#12): a
    // root launcher's bottle could otherwise leave a setuid-root binary in the workspace. Every way to put a set-id
    // bit on a file is refused: the chmod family, and creating a file (open, openat, creat, mknod) with one.
    for (nr, mode_arg, create_flag_arg) in SETID_MODE_ARGS {
        let mut rules = denied.remove(&nr).unwrap_or_default();
        for bit in [u64::from(libc::S_ISUID), u64::from(libc::S_ISGID)] {
            let mut conditions = vec![arg32(mode_arg, MaskedEq(bit), bit)?];
            if let Some(flags) = create_flag_arg {
                let creat = libc::O_CREAT as u64;
                conditions.push(arg32(flags, MaskedEq(creat), creat)?);
            }
            rules.push(rule(conditions)?);
        }
        denied.insert(nr, rules);
    }
    let eperm = Group {
        errno: libc::EPERM as u32,
        rules: denied,
    };
    // SECURITY: `security.capability` written by a namespace root that maps to host root is a file capability the
    // host honours; the xattr name is behind a pointer seccomp cannot read, so no xattr is written (EOPNOTSUPP, as
    // on a filesystem without them; tools carry on). openat2 hides its mode behind a pointer: ENOSYS, libc falls back
    // to openat, checked above.
    let opnotsupp = Group {
        errno: libc::EOPNOTSUPP as u32,
        rules: XATTR_WRITES.iter().map(|&nr| (nr, Vec::new())).collect(),
    };
    let mut nosys = nosys;
    nosys.rules.insert(SYS_OPENAT2, Vec::new());

    Ok(vec![afnosupport, nosys, eperm, opnotsupp])
}

/// Compiles each errno group with seccompiler (one match action per filter) and chains them into one program.
fn build_seccomp() -> Result<(BpfProgram, usize), HardenError> {
    let arch = target_arch()?;
    let groups = groups()?;
    let rules = groups
        .iter()
        .flat_map(|g| g.rules.values())
        .map(|chain| chain.len().max(1))
        .sum();
    let mut programs = Vec::with_capacity(groups.len() + 1);
    for group in groups {
        let filter = SeccompFilter::new(
            group.rules,
            SeccompAction::Allow,
            SeccompAction::Errno(group.errno),
            arch,
        )
        .map_err(|source| HardenError::SeccompBuild { source })?;
        programs.push(BpfProgram::try_from(filter).map_err(|source| HardenError::SeccompBuild { source })?);
    }
    if arch == TargetArch::x86_64 {
        programs.push(x32_guard());
    }
    let program = chain(programs);
    if program.len() > BPF_MAX_INSNS {
        return Err(HardenError::SeccompTooLong {
            len: program.len(),
            max: BPF_MAX_INSNS,
        });
    }
    Ok((program, rules))
}

/// SECURITY: x32 syscalls pass the AUDIT_ARCH_X86_64 check with `__X32_SYSCALL_BIT` set in their number, so they
/// match none of the numbers above; on a kernel with CONFIG_X86_X32_ABI they would bypass every rule. Placed last,
/// after the arch check of the first group. ENOSYS is what a kernel without x32 answers.
fn x32_guard() -> BpfProgram {
    let insn = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        insn(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR_OFFSET),
        insn(BPF_JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        insn(BPF_RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Chains programs into one: each `ret ALLOW` of every program but the last becomes a jump to the next program's
/// first instruction, so a syscall reaches program i+1 only if program i would allow it. The same semantics as
/// stacking the filters, in one install. SECURITY: a rewritten instruction keeps its position, so every other jump
/// offset stays valid, and seccompiler's programs end in ALLOW or ERRNO returns only (no `ret A`).
fn chain(programs: Vec<BpfProgram>) -> BpfProgram {
    let last = programs.len().saturating_sub(1);
    let mut out = BpfProgram::new();
    for (i, mut program) in programs.into_iter().enumerate() {
        if i < last {
            let len = program.len();
            for (at, insn) in program.iter_mut().enumerate() {
                if insn.code == BPF_RET_K && insn.k == libc::SECCOMP_RET_ALLOW {
                    let k = u32::try_from(len - at - 1).unwrap_or(u32::MAX);
                    *insn = sock_filter {
                        code: BPF_JMP_JA,
                        jt: 0,
                        jf: 0,
                        k,
                    };
                }
            }
        }
        out.extend(program);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `AUDIT_ARCH_*` (linux/audit.h): the arch the filter was built for and one it was not.
    const AUDIT_ARCH_NATIVE: u32 = if cfg!(target_arch = "x86_64") {
        0xc000_003e
    } else {
        0xc000_00b7
    };
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

    fn errno(e: i32) -> u32 {
        libc::SECCOMP_RET_ERRNO | e as u32
    }

    /// A classic BPF interpreter for the opcodes seccompiler and `chain` emit, over a `struct seccomp_data`
    /// (linux/seccomp.h). Panics on anything else, so a change in code generation shows up here.
    fn run(program: &[sock_filter], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&(nr as u32).to_ne_bytes());
        data.extend_from_slice(&arch.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        args.iter().for_each(|a| data.extend_from_slice(&a.to_ne_bytes()));
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let insn = &program[pc];
            let (k, jt, jf) = (insn.k, usize::from(insn.jt), usize::from(insn.jf));
            pc += 1;
            match u32::from(insn.code) {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    let at = k as usize;
                    acc = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
                }
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => acc &= k,
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += k as usize,
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => pc += if acc == k { jt } else { jf },
                c if c == libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K => pc += if acc > k { jt } else { jf },
                c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => pc += if acc >= k { jt } else { jf },
                c if c == libc::BPF_RET | libc::BPF_K => return k,
                c => panic!("unexpected BPF opcode {c:#x} at {}", pc - 1),
            }
        }
    }

    fn verdict(nr: i64, args: [u64; 6]) -> u32 {
        run(&seccomp_program().unwrap(), AUDIT_ARCH_NATIVE, nr, args)
    }

    fn a(first: u64, second: u64) -> [u64; 6] {
        [first, second, 0, 0, 0, 0]
    }

    #[test]
    fn every_listed_syscall_is_denied_with_eperm() {
        let lists = [
            NAMESPACE_AND_MOUNT,
            OTHER_PROCESSES,
            KERNEL_SURFACE,
            HOST_STATE,
            FILE_HANDLES,
            IO_PORTS,
        ];
        for &nr in lists.iter().flat_map(|l| l.iter()) {
            assert_eq!(verdict(nr, a(0, 0)), errno(libc::EPERM), "syscall {nr}");
        }
    }

    #[test]
    fn ordinary_syscalls_pass() {
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_exit_group,
        ] {
            assert_eq!(verdict(nr, a(0, 0)), ALLOW, "syscall {nr}");
        }
    }

    #[test]
    fn clone_without_namespace_flags_passes() {
        let thread = libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID;
        assert_eq!(verdict(libc::SYS_clone, a(thread as u64, 0)), ALLOW);
        assert_eq!(verdict(libc::SYS_clone, a(libc::SIGCHLD as u64, 0)), ALLOW);
    }

    #[test]
    fn clone_with_any_namespace_flag_is_denied() {
        for flag in CLONE_NEW_FLAGS {
            let flags = flag as u32 as u64 | libc::SIGCHLD as u64;
            assert_eq!(
                verdict(libc::SYS_clone, a(flags, 0)),
                errno(libc::EPERM),
                "flag {flag:#x}"
            );
            // The kernel reads the low 32 bits only; garbage above must not hide the flag.
            assert_eq!(
                verdict(libc::SYS_clone, a(flags | 1 << 40, 0)),
                errno(libc::EPERM),
                "flag {flag:#x}"
            );
        }
    }

    #[test]
    fn clone3_is_enosys_so_libc_falls_back_to_clone() {
        assert_eq!(verdict(libc::SYS_clone3, a(0, 0)), errno(libc::ENOSYS));
    }

    #[test]
    fn only_unix_inet_and_inet6_sockets_exist() {
        let stream = libc::SOCK_STREAM as u64;
        for family in (0..=64).chain([u32::MAX.into()]) {
            let allowed = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
                .map(|f| f as u64)
                .contains(&family);
            let want = if allowed { ALLOW } else { errno(libc::EAFNOSUPPORT) };
            assert_eq!(verdict(libc::SYS_socket, a(family, stream)), want, "family {family}");
        }
        // AF_NETLINK with an AF_INET-looking upper half is still AF_NETLINK to the kernel.
        let netlink = (libc::AF_INET as u64) << 32 | libc::AF_NETLINK as u64;
        assert_eq!(verdict(libc::SYS_socket, a(netlink, stream)), errno(libc::EAFNOSUPPORT));
    }

    #[test]
    fn raw_and_packet_sockets_are_denied_whatever_the_flags() {
        let inet = libc::AF_INET as u64;
        let flags = (libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64;
        for ty in [libc::SOCK_RAW as u64, SOCK_PACKET] {
            assert_eq!(verdict(libc::SYS_socket, a(inet, ty)), errno(libc::EPERM), "type {ty}");
            assert_eq!(
                verdict(libc::SYS_socket, a(inet, ty | flags)),
                errno(libc::EPERM),
                "type {ty}"
            );
        }
        for ty in [libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET] {
            assert_eq!(
                verdict(libc::SYS_socket, a(inet, ty as u64 | flags)),
                ALLOW,
                "type {ty}"
            );
        }
    }

    #[test]
    fn unix_datagram_sockets_are_denied_and_every_other_unix_or_inet_type_passes() {
        let (unix, inet) = (libc::AF_UNIX as u64, libc::AF_INET as u64);
        let flags = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
        let (dgram, stream, seqpacket) = (
            libc::SOCK_DGRAM as u64,
            libc::SOCK_STREAM as u64,
            libc::SOCK_SEQPACKET as u64,
        );
        for f in [0, flags] {
            for nr in [libc::SYS_socket, libc::SYS_socketpair] {
                assert_eq!(verdict(nr, a(unix, dgram | f)), errno(libc::EPERM), "{nr} {f:#x}");
                assert_eq!(verdict(nr, a(unix, stream | f)), ALLOW, "{nr} {f:#x}");
                assert_eq!(verdict(nr, a(unix, seqpacket | f)), ALLOW, "{nr} {f:#x}");
            }
            assert_eq!(verdict(libc::SYS_socket, a(inet, dgram | f)), ALLOW);
        }
    }

    #[test]
    fn the_warden_filter_hands_over_native_connects_and_refuses_unix_datagrams() {
        let program: Vec<sock_filter> = crate::namespace::warden::program()
            .iter()
            .map(|i| sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect();
        let run_nr = |arch, nr| run(&program, arch, nr, [3, 0, 110, 0, 0, 0]);
        assert_eq!(
            run_nr(AUDIT_ARCH_NATIVE, libc::SYS_connect),
            libc::SECCOMP_RET_USER_NOTIF
        );
        for nr in [
            libc::SYS_sendto,
            libc::SYS_sendmsg,
            libc::SYS_bind,
            libc::SYS_socket,
            libc::SYS_read,
        ] {
            assert_eq!(run_nr(AUDIT_ARCH_NATIVE, nr), ALLOW, "{nr}");
        }
        // Another arch's syscalls are the main filter's (it kills them).
        assert_eq!(run_nr(AUDIT_ARCH_I386, libc::SYS_connect), ALLOW);
        // Unix datagram sockets are refused by this filter too (a container's engine profile admits them).
        let (unix, inet) = (libc::AF_UNIX as u64, libc::AF_INET as u64);
        let cloexec = libc::SOCK_CLOEXEC as u64;
        for nr in [libc::SYS_socket, libc::SYS_socketpair] {
            let socket = |family, ty| run(&program, AUDIT_ARCH_NATIVE, nr, [family, ty, 0, 0, 0, 0]);
            assert_eq!(
                socket(unix, libc::SOCK_DGRAM as u64 | cloexec),
                errno(libc::EPERM),
                "{nr}"
            );
            assert_eq!(socket(unix, libc::SOCK_STREAM as u64), ALLOW, "{nr}");
            assert_eq!(socket(unix, libc::SOCK_SEQPACKET as u64 | cloexec), ALLOW, "{nr}");
            assert_eq!(socket(inet, libc::SOCK_DGRAM as u64), ALLOW, "{nr}");
        }
    }

    #[test]
    fn terminal_injection_ioctls_are_denied() {
        for req in [libc::TIOCSTI, libc::TIOCLINUX] {
            let req = u64::from(req as u32);
            assert_eq!(
                verdict(libc::SYS_ioctl, a(0, req)),
                errno(libc::EPERM),
                "request {req:#x}"
            );
            assert_eq!(
                verdict(libc::SYS_ioctl, a(0, req | 1 << 32)),
                errno(libc::EPERM),
                "request {req:#x}"
            );
        }
        assert_eq!(verdict(libc::SYS_ioctl, a(0, u64::from(libc::TCGETS as u32))), ALLOW);
        assert_eq!(
            verdict(libc::SYS_ioctl, a(0, u64::from(libc::TIOCGWINSZ as u32))),
            ALLOW
        );
    }

    #[test]
    fn personality_may_only_be_queried_or_reset() {
        assert_eq!(verdict(libc::SYS_personality, a(0, 0)), ALLOW);
        assert_eq!(verdict(libc::SYS_personality, a(PERSONALITY_QUERY, 0)), ALLOW);
        let no_aslr = 0x0040000; // ADDR_NO_RANDOMIZE (linux/personality.h)
        assert_eq!(verdict(libc::SYS_personality, a(no_aslr, 0)), errno(libc::EPERM));
    }

    #[test]
    fn set_id_bits_are_refused_on_every_way_to_set_a_mode_and_plain_modes_pass() {
        let eperm = errno(libc::EPERM);
        for (nr, mode_arg, flags_arg) in SETID_MODE_ARGS {
            for mode in [0o4755, 0o2755, 0o6777, 0o104755] {
                let mut args = [0u64; 6];
                args[usize::from(mode_arg)] = mode;
                if let Some(f) = flags_arg {
                    args[usize::from(f)] = (libc::O_CREAT | libc::O_WRONLY) as u64;
                }
                assert_eq!(verdict(nr, args), eperm, "syscall {nr} mode {mode:o}");
            }
            let mut args = [0u64; 6];
            args[usize::from(mode_arg)] = 0o755;
            assert_eq!(verdict(nr, args), libc::SECCOMP_RET_ALLOW, "syscall {nr} plain mode");
            if let Some(f) = flags_arg {
                // Without O_CREAT the mode is not used: an open of an existing file passes whatever it holds.
                let mut args = [0u64; 6];
                args[usize::from(mode_arg)] = 0o4755;
                args[usize::from(f)] = libc::O_RDONLY as u64;
                assert_eq!(
                    verdict(nr, args),
                    libc::SECCOMP_RET_ALLOW,
                    "syscall {nr} without O_CREAT"
                );
            }
        }
    }

    #[test]
    fn no_extended_attribute_is_written_and_openat2_falls_back() {
        for nr in XATTR_WRITES {
            assert_eq!(verdict(nr, a(0, 0)), errno(libc::EOPNOTSUPP), "syscall {nr}");
        }
        assert_eq!(verdict(SYS_OPENAT2, a(0, 0)), errno(libc::ENOSYS));
        assert_eq!(
            verdict(libc::SYS_getxattr, a(0, 0)),
            libc::SECCOMP_RET_ALLOW,
            "reading xattrs passes"
        );
    }

    #[test]
    fn a_foreign_architecture_is_killed() {
        let program = seccomp_program().unwrap();
        assert_eq!(
            run(&program, AUDIT_ARCH_I386, libc::SYS_read, a(0, 0)),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_syscall_numbers_are_enosys() {
        let unshare = i64::from(X32_SYSCALL_BIT) | libc::SYS_unshare;
        assert_eq!(verdict(unshare, a(libc::CLONE_NEWUSER as u64, 0)), errno(libc::ENOSYS));
    }

    #[test]
    fn the_program_fits_the_kernel_limit_and_counts_its_rules() {
        let (program, rules) = build_seccomp().unwrap();
        assert!(program.len() <= BPF_MAX_INSNS, "{} instructions", program.len());
        // 3 family ranges + clone3 + 7 clone flags + 2 socket types + 2 ioctls + 2 Unix datagram rules
        // (socket, socketpair) + personality + the plain list,
        // + 2 set-id rules per mode-setting syscall + the xattr writes + openat2.
        let plain = [
            NAMESPACE_AND_MOUNT,
            OTHER_PROCESSES,
            KERNEL_SURFACE,
            HOST_STATE,
            FILE_HANDLES,
            IO_PORTS,
        ]
        .iter()
        .map(|l| l.len())
        .sum::<usize>();
        assert_eq!(
            rules,
            3 + 1 + 7 + 2 + 2 + 2 + 1 + plain + 2 * SETID_MODE_ARGS.len() + XATTR_WRITES.len() + 1
        );
    }

    #[test]
    fn chain_turns_allow_into_a_jump_to_the_next_program() {
        let ret = |k| sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k,
        };
        let chained = chain(vec![vec![ret(ALLOW), ret(ALLOW)], vec![ret(errno(libc::EPERM))]]);
        assert_eq!(run(&chained, AUDIT_ARCH_NATIVE, 0, a(0, 0)), errno(libc::EPERM));
        assert_eq!(
            chained[0],
            sock_filter {
                code: BPF_JMP_JA,
                jt: 0,
                jf: 0,
                k: 1
            }
        );
        assert_eq!(
            chained[1],
            sock_filter {
                code: BPF_JMP_JA,
                jt: 0,
                jf: 0,
                k: 0
            }
        );
    }

    #[test]
    fn relative_landlock_paths_are_refused_before_anything_is_applied() {
        // Only the path check runs: Hardening with a relative path must fail in restrict_filesystem before
        // restrict_self, so calling it here leaves this test thread unrestricted.
        let h = Hardening {
            read_only: vec![PathBuf::from("usr")],
            read_write: Vec::new(),
            landlock: LandlockMode::BestEffort,
        };
        assert!(matches!(restrict_filesystem(&h), Err(HardenError::RelativePath { .. })));
    }
}
