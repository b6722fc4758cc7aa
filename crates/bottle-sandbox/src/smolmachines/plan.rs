//! The smolmachines plan: pure data describing one bottle's machine — the `machine create` and `machine start` argv,
//! the interceptor token the start needs, and the `ExpectedEgress` its database row must show. No I/O beyond drawing
//! a random token; trusts the caller for a canonical workspace path (it is compared byte for byte with the row).
//!
//! How a guest is confined to the bottle proxy (research/smolvm.md §3.3–3.5, option A, and the egress harness):
//! - `--net --net-backend virtio-net`: smolvm's own userspace network stack terminates every guest flow on the host;
//!   TSI has no egress policy at all (§3.1).
//! - `--allow-cidr 100.96.0.1/32`: only flows addressed to the guest's gateway pass the allow list; everything else
//!   (the internet, the host's 127.0.0.N seen directly) is answered with RST and logged (§3.3).
//! - `--allow-host-pattern no-dns.invalid`: turns on the gateway's DNS filter with a name that can never resolve
//!   (RFC 6761 §6.4), so the host resolver answers nothing and DNS is no exfiltration channel (§3.3, "DNS").
//! - `machine start --egress-interceptor 127.0.0.N:PORT` with `SMOLVM_INTERCEPTOR_TOKEN`: every admitted TCP flow is
//!   handed to the bottle proxy with a `SMOLICPT` prelude carrying the token and the original destination (§3.4),
//!   instead of being dialled on the host's 127.0.0.1. Non-DNS UDP is denied.
//! - The row flag `external_interceptor_required: true` (patched in before the first start, see `db.rs`) makes smolvm
//!   itself refuse any later start that lacks the interceptor.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Component, Path, PathBuf};

use bottle_policy::BottleName;

/// Every machine bot-bottle creates is named `bb-<bottle>`.
pub const MACHINE_PREFIX: &str = "bb-";
/// The label key/value that marks a machine as ours (`machine ls --json` shows labels), for sweeps.
pub const OWNER_LABEL: (&str, &str) = ("owner", "bot-bottle");
/// The label key carrying the bottle name.
pub const BOTTLE_LABEL: &str = "bottle";
/// The guest's gateway on smolvm's default virtio-net link 100.96.0.0/30 (research/smolvm.md §3.1); the gateway DNS
/// answers `host.smolvm.internal` with it. Guest tools reach the bottle proxy at `http://100.96.0.1:<port>`.
pub const GUEST_GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
/// The only destination the allow list admits.
pub const GATEWAY_CIDR: &str = "100.96.0.1/32";
/// The DNS filter pattern: `.invalid` never resolves (RFC 6761 §6.4), so the filter admits no name at all.
/// smolvm stores an exact pattern with a leading `=` (research/smolvm.md §1.3).
pub const DNS_FILTER_PATTERN: &str = "no-dns.invalid";
/// The environment variable `machine start --egress-interceptor` reads the token from (research/smolvm.md §3.4).
pub const INTERCEPTOR_TOKEN_ENV: &str = "SMOLVM_INTERCEPTOR_TOKEN";
/// smolvm's networking backend value that enforces egress policy.
pub const VIRTIO_NET: &str = "virtio-net";
/// smolvm's limit on machine names (research/smolvm.md §2.1).
const MAX_MACHINE_NAME_LEN: usize = 128;
/// Bytes in an interceptor token (smolvm wants 64 hex digits).
const TOKEN_BYTES: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("`{name}` is not a valid smolvm machine name: {reason}")]
    MachineName { name: String, reason: &'static str },
    #[error("the egress interceptor must listen on a loopback address with a nonzero port, not {addr}")]
    InterceptorAddr { addr: SocketAddrV4 },
    #[error("an interceptor token must not be all zeros (smolvm refuses it)")]
    ZeroToken,
    #[error("workspace path {path} is not usable in a smolvm mount: {reason}")]
    MountPath { path: PathBuf, reason: &'static str },
    #[error("image `{image}` is not usable: {reason}")]
    Image { image: String, reason: &'static str },
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
}

/// A smolvm machine name: `[A-Za-z0-9][A-Za-z0-9_-]{0,127}` (research/smolvm.md §2.1).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachineName(String);

impl MachineName {
    /// `bb-<bottle>`: a bottle name (`[a-z0-9][a-z0-9_-]{0,62}`) always yields a valid machine name.
    pub fn for_bottle(bottle: &BottleName) -> Self {
        Self(format!("{MACHINE_PREFIX}{bottle}"))
    }

    pub fn parse(raw: &str) -> Result<Self, PlanError> {
        let bad = |reason| PlanError::MachineName {
            name: raw.to_owned(),
            reason,
        };
        if raw.is_empty() || raw.len() > MAX_MACHINE_NAME_LEN {
            return Err(bad("it must be 1 to 128 characters"));
        }
        if !raw.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric()) {
            return Err(bad("it must start with a letter or digit"));
        }
        if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(bad("only A-Z, a-z, 0-9, `-` and `_` are allowed"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MachineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The per-bottle secret smolvm sends in every interceptor prelude; the proxy refuses flows without it.
/// Never printed: `Debug` is redacted and the hex form goes only into the engine's environment.
#[derive(Clone, PartialEq, Eq)]
pub struct InterceptorToken([u8; TOKEN_BYTES]);

impl InterceptorToken {
    /// 32 bytes from `getrandom(2)`.
    pub fn random() -> io::Result<Self> {
        let mut bytes = [0u8; TOKEN_BYTES];
        let filled = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty())?;
        if filled != TOKEN_BYTES {
            return Err(io::Error::other("getrandom returned a short read"));
        }
        Self::from_bytes(bytes).map_err(io::Error::other)
    }

    pub fn from_bytes(bytes: [u8; TOKEN_BYTES]) -> Result<Self, PlanError> {
        if bytes.iter().all(|&b| b == 0) {
            return Err(PlanError::ZeroToken);
        }
        Ok(Self(bytes))
    }

    /// The raw bytes, as they appear in the prelude (research/smolvm.md §3.4).
    pub fn as_bytes(&self) -> &[u8; TOKEN_BYTES] {
        &self.0
    }

    /// The 64 lowercase hex digits `SMOLVM_INTERCEPTOR_TOKEN` takes.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for InterceptorToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InterceptorToken(<redacted>)")
    }
}

/// A host directory shared into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceMount {
    /// Absolute and canonical (`fs::canonicalize`): smolvm stores the canonical path and the row is compared with it.
    pub host: PathBuf,
    /// Absolute path inside the guest.
    pub guest: PathBuf,
    pub read_only: bool,
}

/// What the launcher knows about one bottle's machine.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    pub bottle: BottleName,
    /// `--image`: a registry reference or a local archive/rootfs; `None` boots the bare agent rootfs.
    pub image: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub workspace: Option<WorkspaceMount>,
    /// More host directories shared into the guest after the workspace: the kept home, the user's mounts.
    pub shares: Vec<WorkspaceMount>,
    /// The bottle proxy's interceptor listener, `127.0.0.N:PORT` from the lease.
    pub interceptor: SocketAddrV4,
    pub token: InterceptorToken,
}

/// One workspace mount as the row stores it: `[host, guest, read_only]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedMount {
    pub host: String,
    pub guest: String,
    pub read_only: bool,
}

/// What the machine's database row must show before it may start (checked by `db::verify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedEgress {
    pub machine: MachineName,
    pub labels: BTreeMap<String, String>,
    /// Exactly `[GATEWAY_CIDR]`.
    pub allowed_cidrs: Vec<String>,
    /// Exactly `["=" + DNS_FILTER_PATTERN]`.
    pub dns_filter_hosts: Vec<String>,
    pub mounts: Vec<ExpectedMount>,
}

/// Everything needed to create, verify and start one bottle's machine.
#[derive(Debug, Clone)]
pub struct MachinePlan {
    name: MachineName,
    create_args: Vec<OsString>,
    interceptor: SocketAddrV4,
    token: InterceptorToken,
    expected: ExpectedEgress,
}

impl MachinePlan {
    pub fn name(&self) -> &MachineName {
        &self.name
    }

    /// `machine create …` (the engine's global flags are added by `cli.rs`).
    pub fn create_args(&self) -> &[OsString] {
        &self.create_args
    }

    /// `machine start --name N --egress-interceptor 127.0.0.N:PORT`.
    pub fn start_args(&self) -> Vec<OsString> {
        let mut args = args(["machine", "start", "--name", self.name.as_str()]);
        args.push("--egress-interceptor".into());
        args.push(self.interceptor.to_string().into());
        args
    }

    /// The environment `machine start` needs on top of the scrubbed base: the token.
    pub fn start_env(&self) -> Vec<(OsString, OsString)> {
        vec![(INTERCEPTOR_TOKEN_ENV.into(), self.token.to_hex().into())]
    }

    pub fn interceptor(&self) -> SocketAddrV4 {
        self.interceptor
    }

    pub fn token(&self) -> &InterceptorToken {
        &self.token
    }

    pub fn expected(&self) -> &ExpectedEgress {
        &self.expected
    }

    /// The proxy URL the guest should be given: the gateway, on the interceptor's port (the interceptor receives
    /// the flow whatever the port; the same number keeps logs readable).
    pub fn guest_proxy_url(&self) -> String {
        format!("http://{GUEST_GATEWAY}:{}", self.interceptor.port())
    }
}

/// Turns a spec into the machine's argv and expected row. Pure: no engine, no filesystem.
pub fn plan(spec: MachineSpec) -> Result<MachinePlan, PlanError> {
    let name = MachineName::for_bottle(&spec.bottle);
    let interceptor = spec.interceptor;
    if !interceptor.ip().is_loopback() || interceptor.port() == 0 {
        return Err(PlanError::InterceptorAddr { addr: interceptor });
    }
    let labels = BTreeMap::from([
        (OWNER_LABEL.0.to_owned(), OWNER_LABEL.1.to_owned()),
        (BOTTLE_LABEL.to_owned(), spec.bottle.as_str().to_owned()),
    ]);

    let mut create = args(["machine", "create", "--name", name.as_str()]);
    for (key, value) in &labels {
        create.push("--label".into());
        create.push(format!("{key}={value}").into());
    }
    if let Some(image) = &spec.image {
        check_image(image)?;
        // `--flag=value`: a value can never be taken for another flag.
        create.push(format!("--image={image}").into());
    }
    if let Some(cpus) = spec.cpus {
        if cpus == 0 {
            return Err(PlanError::Zero { what: "cpus" });
        }
        create.push(format!("--cpus={cpus}").into());
    }
    if let Some(mem) = spec.memory_mib {
        if mem == 0 {
            return Err(PlanError::Zero { what: "memory" });
        }
        create.push(format!("--mem={mem}").into());
    }
    let mut mounts = Vec::new();
    for share in spec.workspace.iter().chain(&spec.shares) {
        let mount = expected_mount(share)?;
        let suffix = if mount.read_only { ":ro" } else { "" };
        create.push(format!("--volume={}:{}{suffix}", mount.host, mount.guest).into());
        mounts.push(mount);
    }
    // SECURITY: these four flags are the whole egress confinement (module docs). Dropping any of them widens what
    // the guest reaches: without virtio-net there is no policy, without the allow list every destination is
    // dialled, without the DNS filter the host resolver answers the guest.
    create.extend(args([
        "--net",
        "--net-backend",
        VIRTIO_NET,
        "--allow-cidr",
        GATEWAY_CIDR,
        "--allow-host-pattern",
        DNS_FILTER_PATTERN,
    ]));

    let expected = ExpectedEgress {
        machine: name.clone(),
        labels,
        allowed_cidrs: vec![GATEWAY_CIDR.to_owned()],
        dns_filter_hosts: vec![format!("={DNS_FILTER_PATTERN}")],
        mounts,
    };
    Ok(MachinePlan {
        name,
        create_args: create,
        interceptor,
        token: spec.token,
        expected,
    })
}

fn args<const N: usize>(items: [&str; N]) -> Vec<OsString> {
    items.into_iter().map(OsString::from).collect()
}

fn check_image(image: &str) -> Result<(), PlanError> {
    let bad = |reason| PlanError::Image {
        image: image.to_owned(),
        reason,
    };
    if image.is_empty() {
        return Err(bad("it is empty"));
    }
    // `-` means "read a docker-save archive from stdin", which the engine never gets.
    if image.starts_with('-') {
        return Err(bad("it starts with `-`"));
    }
    if image.chars().any(char::is_control) {
        return Err(bad("it contains control characters"));
    }
    Ok(())
}

fn expected_mount(workspace: &WorkspaceMount) -> Result<ExpectedMount, PlanError> {
    Ok(ExpectedMount {
        host: mount_path(&workspace.host)?,
        guest: mount_path(&workspace.guest)?,
        read_only: workspace.read_only,
    })
}

/// An absolute, lexically normal UTF-8 path without `:` (the `--volume` separator).
fn mount_path(path: &Path) -> Result<String, PlanError> {
    let bad = |reason| PlanError::MountPath {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_absolute() {
        return Err(bad("it is not absolute"));
    }
    if path
        .components()
        .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
    {
        return Err(bad("it contains `.` or `..`"));
    }
    let text = path.to_str().ok_or_else(|| bad("it is not UTF-8"))?;
    if text.contains(':') {
        return Err(bad("it contains `:`, which separates --volume fields"));
    }
    if text.chars().any(char::is_control) {
        return Err(bad("it contains control characters"));
    }
    if text.len() > 1 && text.ends_with('/') {
        return Err(bad("it ends with `/`"));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> InterceptorToken {
        InterceptorToken::from_bytes([0xab; 32]).unwrap()
    }

    fn spec() -> MachineSpec {
        MachineSpec {
            bottle: BottleName::parse("demo").unwrap(),
            image: None,
            cpus: None,
            memory_mib: None,
            workspace: None,
            shares: Vec::new(),
            interceptor: SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 7), 3128),
            token: token(),
        }
    }

    fn strings(args: &[OsString]) -> Vec<&str> {
        args.iter().map(|a| a.to_str().unwrap()).collect()
    }

    #[test]
    fn minimal_plan_confines_egress_to_the_gateway() {
        let plan = plan(spec()).unwrap();
        assert_eq!(
            strings(plan.create_args()),
            [
                "machine",
                "create",
                "--name",
                "bb-demo",
                "--label",
                "bottle=demo",
                "--label",
                "owner=bot-bottle",
                "--net",
                "--net-backend",
                "virtio-net",
                "--allow-cidr",
                "100.96.0.1/32",
                "--allow-host-pattern",
                "no-dns.invalid",
            ]
        );
        assert_eq!(
            strings(&plan.start_args()),
            [
                "machine",
                "start",
                "--name",
                "bb-demo",
                "--egress-interceptor",
                "127.0.0.7:3128"
            ]
        );
        assert_eq!(
            plan.start_env(),
            [(
                OsString::from("SMOLVM_INTERCEPTOR_TOKEN"),
                OsString::from("ab".repeat(32))
            )]
        );
        assert_eq!(plan.guest_proxy_url(), "http://100.96.0.1:3128");
        let expected = plan.expected();
        assert_eq!(expected.machine.as_str(), "bb-demo");
        assert_eq!(expected.allowed_cidrs, ["100.96.0.1/32"]);
        assert_eq!(expected.dns_filter_hosts, ["=no-dns.invalid"]);
        assert!(expected.mounts.is_empty());
        assert_eq!(
            expected.labels,
            BTreeMap::from([
                ("bottle".to_owned(), "demo".to_owned()),
                ("owner".to_owned(), "bot-bottle".to_owned())
            ])
        );
    }

    #[test]
    fn full_plan_passes_resources_image_and_workspace_as_single_arguments() {
        let mut spec = spec();
        spec.image = Some("alpine:3.20".into());
        spec.cpus = Some(2);
        spec.memory_mib = Some(1024);
        spec.workspace = Some(WorkspaceMount {
            host: "/home/me/project".into(),
            guest: "/workspace".into(),
            read_only: true,
        });
        let plan = plan(spec).unwrap();
        let args = strings(plan.create_args());
        assert_eq!(
            args[8..12],
            [
                "--image=alpine:3.20",
                "--cpus=2",
                "--mem=1024",
                "--volume=/home/me/project:/workspace:ro"
            ]
        );
        assert_eq!(
            plan.expected().mounts,
            [ExpectedMount {
                host: "/home/me/project".into(),
                guest: "/workspace".into(),
                read_only: true
            }]
        );
        assert_eq!(args.last(), Some(&"no-dns.invalid"));
    }

    #[test]
    fn read_write_workspace_has_no_suffix() {
        let mut spec = spec();
        spec.workspace = Some(WorkspaceMount {
            host: "/srv/ws".into(),
            guest: "/workspace".into(),
            read_only: false,
        });
        let plan = plan(spec).unwrap();
        assert!(strings(plan.create_args()).contains(&"--volume=/srv/ws:/workspace"));
    }

    #[test]
    fn the_interceptor_must_be_loopback_with_a_port() {
        for addr in [
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 3128),
            SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 7), 0),
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 3128),
        ] {
            let mut spec = spec();
            spec.interceptor = addr;
            assert_eq!(plan(spec).unwrap_err(), PlanError::InterceptorAddr { addr });
        }
    }

    #[test]
    fn bad_mount_paths_images_and_zero_resources_are_refused() {
        for (host, reason) in [
            ("relative/dir", "it is not absolute"),
            ("/a/../etc", "it contains `.` or `..`"),
            ("/a:b", "it contains `:`, which separates --volume fields"),
            ("/a/b/", "it ends with `/`"),
        ] {
            let mut spec = spec();
            spec.workspace = Some(WorkspaceMount {
                host: host.into(),
                guest: "/workspace".into(),
                read_only: false,
            });
            assert_eq!(
                plan(spec).unwrap_err(),
                PlanError::MountPath {
                    path: host.into(),
                    reason
                }
            );
        }
        for image in ["", "-", "--net", "a\nb"] {
            let mut spec = spec();
            spec.image = Some(image.into());
            assert!(matches!(plan(spec), Err(PlanError::Image { .. })), "{image:?}");
        }
        let mut zero = spec();
        zero.cpus = Some(0);
        assert_eq!(plan(zero).unwrap_err(), PlanError::Zero { what: "cpus" });
    }

    #[test]
    fn machine_names_follow_smolvm_rules() {
        let longest = BottleName::parse(&"a".repeat(BottleName::MAX_LEN)).unwrap();
        let name = MachineName::for_bottle(&longest);
        assert_eq!(MachineName::parse(name.as_str()).unwrap(), name);
        assert!(MachineName::parse("Bb_1-x").is_ok());
        for bad in ["", "-x", "_x", "a.b", "a/b", "a b", &"a".repeat(129)] {
            assert!(MachineName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_are_random_nonzero_and_never_printed() {
        assert_eq!(InterceptorToken::from_bytes([0; 32]), Err(PlanError::ZeroToken));
        let a = InterceptorToken::random().unwrap();
        let b = InterceptorToken::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_hex().len(), 64);
        assert!(
            a.to_hex()
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(format!("{a:?}"), "InterceptorToken(<redacted>)");
        let plan = plan(spec()).unwrap();
        assert!(!format!("{plan:?}").contains(&"ab".repeat(32)));
    }
}
