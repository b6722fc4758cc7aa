//! Proves, without KVM, that a machine created from our plan can reach nothing but the bottle proxy's interceptor.
//! Everything on the host side is the unmodified smolvm 1.32.2 binary and its userspace network stack; only libkrun is
//! replaced (research/smolvm.md §3.3, research/smolvm-harness/): a stub `libkrun.so` keeps the guest end of the
//! virtio-net socketpair smolvm hands it and, from `krun_start_enter`, runs this test binary as a scripted "guest"
//! (`egress_guest`) that writes raw Ethernet frames — ARP, DNS, TCP handshakes — into that socket. The stub then
//! fails the start, so no VM ever runs. A control machine without our flags shows that the harness does see a leak.
//!
//! Needs root (smolvm's per-VM uid drop, private mount namespaces), a C compiler and the real engine; skips say why
//! and `BOTTLE_TEST_REQUIRE=smolmachines` turns them into failures.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bottle_policy::BottleName;
use bottle_sandbox::engine::{self, Engine, EngineSource};
use bottle_sandbox::preflight::{Host, RealHost};
use bottle_sandbox::smolmachines::{
    InterceptorToken, MachineName, MachinePlan, MachineSpec, Smolvm, StartError, Timeouts, plan, verify,
    verify_or_patch,
};
use serde::{Deserialize, Serialize};

mod common;
use common::{engine_without_kvm, os, skip};

/// Set (by the stub libkrun) only in the scripted guest: the directory holding `probes.json` and `result.json`.
const GUEST_DIR_ENV: &str = "BB_EGRESS_GUEST_DIR";
const GUEST_MAC_ENV: &str = "BB_EGRESS_GUEST_MAC";
/// The guest side of smolvm's default virtio-net link (research/smolvm.md §3.1).
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 2);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
/// The interceptor prelude (research/smolvm.md §3.4): magic, version, 32-byte token, family 4, port, IPv4.
const PRELUDE_MAGIC: &[u8; 8] = b"SMOLICPT";
const PRELUDE_LEN: usize = 48;
/// How long the guest waits for any one answer.
const GUEST_WAIT: Duration = Duration::from_secs(3);

/// The stub libkrun: every call succeeds; `krun_add_net_unixstream` keeps the guest end of the socketpair;
/// `krun_start_enter` runs the guest with that socket as its stdin and returns -1 so that the start fails fast.
/// Built per run with `-DGUEST_EXE=… -DGUEST_DIR=…` (the VMM's environment is smolvm's, not ours).
const STUB_LIBKRUN_C: &str = r#"
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
static int net_fd = -1;
static unsigned char mac[6];
#define STUB(name) int name(void) { return 0; }
STUB(krun_add_console_port_inout) STUB(krun_add_console_port_tty) STUB(krun_add_disk) STUB(krun_add_disk2)
STUB(krun_add_disk3) STUB(krun_add_disk4) STUB(krun_add_display) STUB(krun_add_input_device)
STUB(krun_add_input_device_fd) STUB(krun_add_net_tap) STUB(krun_add_net_unixgram) STUB(krun_add_serial_console_default)
STUB(krun_add_vhost_user_device) STUB(krun_add_virtio_console_default) STUB(krun_add_virtio_console_multiport)
STUB(krun_add_virtiofs) STUB(krun_add_virtiofs2) STUB(krun_add_virtiofs3) STUB(krun_add_virtiofs4) STUB(krun_add_vsock)
STUB(krun_add_vsock_port) STUB(krun_add_vsock_port2) STUB(krun_check_nested_virt) STUB(krun_create_ctx)
STUB(krun_create_disk_overlay) STUB(krun_disable_implicit_init) STUB(krun_free_ctx) STUB(krun_init_log)
STUB(krun_set_control_socket) STUB(krun_set_cpu_template) STUB(krun_set_display_backend) STUB(krun_set_egress_policy)
STUB(krun_set_env) STUB(krun_set_exec) STUB(krun_set_firmware) STUB(krun_set_gpu_options) STUB(krun_set_gpu_options2)
STUB(krun_set_kernel) STUB(krun_set_kernel_console) STUB(krun_set_live_resize) STUB(krun_set_log_level)
STUB(krun_set_nested_virt) STUB(krun_set_port_map) STUB(krun_set_rlimits) STUB(krun_set_root_disk_remount)
STUB(krun_set_smbios_oem_strings) STUB(krun_set_snapshot) STUB(krun_set_snapshot_memory_fd)
STUB(krun_set_snapshot_memory_fd2) STUB(krun_set_stream_intercept) STUB(krun_set_vm_config) STUB(krun_set_workdir)
STUB(krun_setgid) STUB(krun_setuid) STUB(krun_split_irqchip) STUB(krun_has_feature) STUB(krun_get_max_vcpus)
const char *krun_get_last_error(void) { return "stub libkrun (bot-bottle egress harness)"; }
int krun_add_net_unixstream(uint32_t ctx, const char *path, int fd, uint8_t *m, uint32_t features, uint32_t flags) {
  net_fd = fd;
  if (m) memcpy(mac, m, 6);
  return 0;
}
int krun_start_enter(uint32_t ctx) {
  if (net_fd < 0) return -1; /* TSI: no virtio-net socket, nothing to probe */
  char dir_env[600], mac_env[64];
  snprintf(dir_env, sizeof dir_env, "BB_EGRESS_GUEST_DIR=%s", GUEST_DIR);
  snprintf(mac_env, sizeof mac_env, "BB_EGRESS_GUEST_MAC=%02x:%02x:%02x:%02x:%02x:%02x",
           mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);
  char *envp[] = { dir_env, mac_env, NULL };
  pid_t pid = fork();
  if (pid == 0) {
    dup2(net_fd, 0);
    execle(GUEST_EXE, GUEST_EXE, "--exact", "egress_guest", "--nocapture", "--test-threads=1", (char *)0, envp);
    _exit(127);
  }
  int status;
  waitpid(pid, &status, 0);
  return -1;
}
"#;

/// smolvm dlopens libkrunfw before libkrun uses it; the stub libkrun never does.
const STUB_LIBKRUNFW_C: &str = "int bot_bottle_stub_libkrunfw;\n";

/// Engine files the stub engine directory links to: the CLI reads them as root.
const ENGINE_ASSETS: &[&str] = &[
    "agent-rootfs.tar.zst",
    "overlay-template.ext4.zst",
    "storage-template.ext4.zst",
];

/// What the guest is asked to try.
#[derive(Debug, Serialize, Deserialize)]
struct Probes {
    dns: Vec<String>,
    tcp: Vec<(String, Ipv4Addr, u16)>,
}

/// What the guest saw.
#[derive(Debug, Default, Serialize, Deserialize)]
struct GuestReport {
    gateway_mac: Option<String>,
    dns: BTreeMap<String, Dns>,
    tcp: BTreeMap<String, Tcp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Dns {
    Answer { rcode: u8, ips: Vec<Ipv4Addr> },
    NoAnswer,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Tcp {
    /// RST to the SYN: smolvm's policy refused the flow.
    Refused,
    NoAnswer,
    /// Handshake completed; what came back for our `PING`.
    Connected {
        reply: String,
    },
}

// -------------------------------------------------------------------------------------------------------------------
// Host side.

/// A host listener that logs who reached it; `intercept` makes it speak the interceptor protocol.
struct Listener {
    addr: SocketAddrV4,
    seen: mpsc::Receiver<String>,
}

impl Listener {
    fn spawn(ip: Ipv4Addr, intercept: Option<[u8; 32]>) -> Self {
        let socket = TcpListener::bind(SocketAddrV4::new(ip, 0)).unwrap();
        let addr = match socket.local_addr().unwrap() {
            std::net::SocketAddr::V4(addr) => addr,
            other => panic!("{other}"),
        };
        let (tx, seen) = mpsc::channel();
        thread::spawn(move || {
            for conn in socket.incoming() {
                let Ok(mut conn) = conn else { continue };
                let tx = tx.clone();
                thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(GUEST_WAIT));
                    let seen = match intercept {
                        Some(token) => intercepted(&mut conn, &token),
                        None => {
                            await_ping(&mut conn);
                            let _ = conn.write_all(b"decoy reached\n");
                            "direct connection".to_owned()
                        }
                    };
                    let _ = tx.send(seen);
                });
            }
        });
        Self { addr, seen }
    }

    /// Everything logged so far (the guest has finished by the time this is called).
    fn log(&self) -> Vec<String> {
        self.seen.try_iter().collect()
    }
}

/// Reads up to the guest's `PING\n` (or EOF, or the read timeout).
fn await_ping(conn: &mut TcpStream) {
    let mut byte = [0u8; 1];
    while matches!(conn.read(&mut byte), Ok(1)) && byte[0] != b'\n' {}
}

/// Reads and checks one prelude; accepts (0x00) only with our token, then answers with the original destination.
fn intercepted(conn: &mut TcpStream, token: &[u8; 32]) -> String {
    let mut prelude = [0u8; PRELUDE_LEN];
    if let Err(err) = conn.read_exact(&mut prelude) {
        return format!("short prelude: {err}");
    }
    let dst = SocketAddrV4::new(
        Ipv4Addr::new(prelude[44], prelude[45], prelude[46], prelude[47]),
        u16::from_be_bytes([prelude[42], prelude[43]]),
    );
    let well_formed = &prelude[..8] == PRELUDE_MAGIC && prelude[8] == 1 && prelude[41] == 4;
    if !well_formed || prelude[9..41] != token[..] {
        let _ = conn.write_all(&[1]);
        return format!("refused prelude for {dst}");
    }
    let _ = conn.write_all(&[0]);
    // Client first, like every flow a proxy serves: a reply sent before the guest's bytes arrive can be lost when
    // the guest's data then meets a closed socket and smolvm resets the flow.
    await_ping(conn);
    let _ = conn.write_all(format!("intercepted {dst}\n").as_bytes());
    format!("intercepted {dst}")
}

struct Harness {
    dir: tempfile::TempDir,
    real: Smolvm,
    nokvm: Smolvm,
    stubbed: Smolvm,
    db: PathBuf,
}

impl Harness {
    fn new() -> Option<Self> {
        if !rustix::process::geteuid().is_root() {
            skip("the egress harness needs root (smolvm's per-VM uid drop and private mount namespaces)");
            return None;
        }
        let real_engine = match engine::discover_verified(&RealHost) {
            Ok(engine) => engine,
            Err(err) => {
                skip(&format!("no verified smolvm engine is installed: {err}"));
                return None;
            }
        };
        let Some(cc) = RealHost.which("cc") else {
            skip("no C compiler (`cc`) to build the stub libkrun");
            return None;
        };
        if RealHost.which("unshare").is_none() {
            skip("`unshare` is not on PATH");
            return None;
        }
        let dir = tempfile::Builder::new().prefix("sve").tempdir_in("/tmp").unwrap();
        let root = dir.path();
        // The guest runs under smolvm's per-VM uid: it must reach its own directory and this test binary.
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
        let (bin, guest, state) = (root.join("bin"), root.join("guest"), root.join("s"));
        for d in [&bin, &guest, &state] {
            fs::create_dir(d).unwrap();
        }
        fs::set_permissions(&guest, fs::Permissions::from_mode(0o1777)).unwrap();
        let stubbed_engine = stub_engine(&real_engine, &cc, &bin, &guest);

        let real = Smolvm::new(&real_engine, Some(&state)).unwrap();
        let db = real.db_path().unwrap();
        let nokvm = Smolvm::new(&engine_without_kvm(&real_engine, root), Some(&state)).unwrap();
        let timeouts = Timeouts {
            start: Duration::from_secs(90),
            ..Timeouts::default()
        };
        let stubbed = Smolvm::new(&stubbed_engine, Some(&state))
            .unwrap()
            .with_timeouts(timeouts);
        Some(Self {
            dir,
            real,
            nokvm,
            stubbed,
            db,
        })
    }

    fn guest_dir(&self) -> PathBuf {
        self.dir.path().join("guest")
    }

    /// smolvm creates a machine's disks through libkrun at its first start, which the stub cannot: let the real
    /// engine do that much, stopped by its own KVM check in a namespace without /dev/kvm (as probe.sh does).
    fn prepare_disks(&self, plan: &MachinePlan) {
        match self.nokvm.start(plan) {
            Err(StartError::KvmNotAvailable { .. }) => {}
            other => panic!("expected the KVM check to stop the disk-preparing start: {other:?}"),
        }
    }

    /// Runs the scripted guest through `start` and returns what it saw.
    fn run_guest(&self, probes: &Probes, start: impl FnOnce() -> Result<(), String>) -> GuestReport {
        let dir = self.guest_dir();
        let result = dir.join("result.json");
        let _ = fs::remove_file(&result);
        fs::write(dir.join("probes.json"), serde_json::to_vec(probes).unwrap()).unwrap();
        let outcome = start();
        eprintln!("stubbed start: {outcome:?}");
        assert!(outcome.is_err(), "the stub libkrun always fails the start");
        let bytes = fs::read(&result).unwrap_or_else(|err| {
            panic!(
                "the scripted guest left no {} ({err}); start said {outcome:?}",
                result.display()
            )
        });
        serde_json::from_slice(&bytes).unwrap()
    }
}

/// `bin/` with a link to the real engine binary, the stub libraries and links to the engine's assets.
fn stub_engine(real: &Engine, cc: &Path, bin: &Path, guest_dir: &Path) -> Engine {
    let engine_dir = real.path.parent().unwrap();
    let engine = bin.join("smolvm");
    if fs::hard_link(&real.path, &engine).is_err() {
        fs::copy(&real.path, &engine).unwrap();
    }
    for asset in ENGINE_ASSETS {
        std::os::unix::fs::symlink(engine_dir.join(asset), bin.join(asset)).unwrap();
    }
    let guest_exe = std::env::current_exe().unwrap();
    let sources = [
        ("libkrun.c", STUB_LIBKRUN_C, "libkrun.so"),
        ("libkrunfw.c", STUB_LIBKRUNFW_C, "libkrunfw.so.5"),
    ];
    for (source, text, library) in sources {
        let source = bin.join(source);
        fs::write(&source, text).unwrap();
        let out = Command::new(cc)
            .args(["-shared", "-fPIC", "-o"])
            .arg(bin.join(library))
            .arg(format!("-DGUEST_EXE=\"{}\"", guest_exe.display()))
            .arg(format!("-DGUEST_DIR=\"{}\"", guest_dir.display()))
            .arg(&source)
            .output()
            .unwrap();
        assert!(out.status.success(), "cc: {}", String::from_utf8_lossy(&out.stderr));
    }
    Engine {
        path: engine,
        version: real.version.clone(),
        source: EngineSource::Env,
    }
}

#[test]
fn our_plan_lets_guest_tcp_reach_only_the_interceptor() {
    let Some(h) = Harness::new() else { return };
    let token = InterceptorToken::random().unwrap();
    let interceptor = Listener::spawn(Ipv4Addr::new(127, 0, 0, 9), Some(*token.as_bytes()));
    // Services the guest must never reach: one on the host's 127.0.0.1 (the gateway's mapping, §3.3), one next to
    // the interceptor on the bottle's own address.
    let decoy = Listener::spawn(Ipv4Addr::LOCALHOST, None);
    let neighbour = Listener::spawn(Ipv4Addr::new(127, 0, 0, 9), None);
    let (icpt, dcy, nbr) = (interceptor.addr.port(), decoy.addr.port(), neighbour.addr.port());

    let plan = plan(MachineSpec {
        bottle: BottleName::parse("eg").unwrap(),
        image: None,
        cpus: Some(1),
        memory_mib: Some(256),
        workspace: None,
        shares: Vec::new(),
        interceptor: interceptor.addr,
        token,
    })
    .unwrap();
    h.real.create(&plan).unwrap();
    verify_or_patch(&h.db, plan.expected()).unwrap();
    h.prepare_disks(&plan);
    verify(&h.db, plan.expected()).unwrap();

    let probes = Probes {
        dns: vec!["host.smolvm.internal".into(), "example.com".into(), "localhost".into()],
        tcp: vec![
            ("gateway, proxy port".into(), GATEWAY, icpt),
            ("gateway, host decoy port".into(), GATEWAY, dcy),
            ("host loopback, proxy".into(), *interceptor.addr.ip(), icpt),
            ("host loopback, neighbour".into(), *neighbour.addr.ip(), nbr),
            ("host loopback, decoy".into(), Ipv4Addr::LOCALHOST, dcy),
            ("internet".into(), Ipv4Addr::new(93, 184, 216, 34), 443),
            ("private network".into(), Ipv4Addr::new(10, 0, 0, 1), 80),
        ],
    };
    // The production start: scrubbed environment, token in SMOLVM_INTERCEPTOR_TOKEN, --egress-interceptor.
    let report = h.run_guest(&probes, || h.stubbed.start(&plan).map_err(|e| e.to_string()));
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());

    assert!(report.gateway_mac.is_some(), "the guest never got an ARP reply");
    let dns = |name: &str| report.dns.get(name).cloned();
    assert_eq!(
        dns("host.smolvm.internal"),
        Some(Dns::Answer {
            rcode: 0,
            ips: vec![GATEWAY]
        })
    );
    for name in ["example.com", "localhost"] {
        assert!(
            matches!(dns(name), Some(Dns::Answer { rcode, ref ips }) if rcode != 0 && ips.is_empty()),
            "the DNS filter let {name} resolve: {:?}",
            dns(name)
        );
    }
    let tcp = |label: &str| report.tcp.get(label).cloned();
    let via_interceptor = |port: u16| Tcp::Connected {
        reply: format!("intercepted {GATEWAY}:{port}"),
    };
    assert_eq!(tcp("gateway, proxy port"), Some(via_interceptor(icpt)));
    assert_eq!(tcp("gateway, host decoy port"), Some(via_interceptor(dcy)));
    for label in [
        "host loopback, proxy",
        "host loopback, neighbour",
        "host loopback, decoy",
        "internet",
        "private network",
    ] {
        assert_eq!(tcp(label), Some(Tcp::Refused), "{label}");
    }
    let mut seen = interceptor.log();
    seen.sort();
    let mut want = vec![
        format!("intercepted {GATEWAY}:{icpt}"),
        format!("intercepted {GATEWAY}:{dcy}"),
    ];
    want.sort();
    assert_eq!(seen, want, "every intercepted flow carries our token");
    assert_eq!(decoy.log(), Vec::<String>::new());
    assert_eq!(neighbour.log(), Vec::<String>::new());

    // Control: plain virtio-net networking, no allow list, no interceptor. The same probe reaches the host's
    // 127.0.0.1 decoy through the gateway, so the refusals above are the plan's doing, not the harness's.
    let control = MachineName::parse("bb-control").unwrap();
    let create = os(&[
        "machine",
        "create",
        "--name",
        control.as_str(),
        "--net",
        "--net-backend",
        "virtio-net",
    ]);
    h.real.invoke(&create, &[], Duration::from_secs(60)).unwrap();
    let plain_start = os(&["machine", "start", "--name", control.as_str()]);
    let err = h.nokvm.invoke(&plain_start, &[], Duration::from_secs(60)).unwrap_err();
    assert!(err.to_string().contains("kvm not available"), "{err}");
    let probes = Probes {
        dns: vec![],
        tcp: vec![("gateway, host decoy port".into(), GATEWAY, dcy)],
    };
    let report = h.run_guest(&probes, || {
        h.stubbed
            .invoke(&plain_start, &[], Duration::from_secs(90))
            .map(drop)
            .map_err(|e| e.to_string())
    });
    assert_eq!(
        report.tcp.get("gateway, host decoy port"),
        Some(&Tcp::Connected {
            reply: "decoy reached".into()
        })
    );
    assert_eq!(decoy.log(), ["direct connection"]);
}

// -------------------------------------------------------------------------------------------------------------------
// Guest side: runs in the process the stub libkrun starts, as smolvm's per-VM uid, with the virtio-net socket as
// stdin. A no-op in every other run of this test binary.

#[test]
fn egress_guest() {
    let Some(dir) = std::env::var_os(GUEST_DIR_ENV).map(PathBuf::from) else {
        return;
    };
    let mac = parse_mac(&std::env::var(GUEST_MAC_ENV).unwrap());
    let probes: Probes = serde_json::from_slice(&fs::read(dir.join("probes.json")).unwrap()).unwrap();
    // stdin is the guest end of smolvm's socketpair: `[u32 BE length][Ethernet frame]` both ways (§3.1).
    let sock = UnixStream::from(io::stdin().as_fd().try_clone_to_owned().unwrap());
    let mut link = Link::new(sock, mac);
    let mut report = GuestReport::default();
    if let Some(gateway_mac) = link.arp_gateway() {
        report.gateway_mac = Some(format_mac(&gateway_mac));
        for name in &probes.dns {
            report.dns.insert(name.clone(), link.dns_a(name));
        }
        for (label, ip, port) in &probes.tcp {
            report.tcp.insert(label.clone(), link.tcp_ping(*ip, *port));
        }
    }
    fs::write(dir.join("result.json"), serde_json::to_vec(&report).unwrap()).unwrap();
}

fn parse_mac(text: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// RFC 1071 Internet checksum.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One received IPv4 packet, decoded as far as the probes need.
struct Packet {
    proto: u8,
    src_port: u16,
    dst_port: u16,
    /// TCP only.
    seq: u32,
    flags: u8,
    payload: Vec<u8>,
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;

struct Link {
    sock: UnixStream,
    buf: Vec<u8>,
    mac: [u8; 6],
    gateway_mac: [u8; 6],
    next_port: u16,
}

impl Link {
    fn new(sock: UnixStream, mac: [u8; 6]) -> Self {
        Self {
            sock,
            buf: Vec::new(),
            mac,
            gateway_mac: [0xff; 6],
            next_port: 40000,
        }
    }

    fn send_frame(&mut self, dst: [u8; 6], ethertype: u16, payload: &[u8]) {
        let mut frame = Vec::with_capacity(14 + payload.len());
        frame.extend_from_slice(&dst);
        frame.extend_from_slice(&self.mac);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(payload);
        let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&frame);
        self.sock.write_all(&wire).unwrap();
    }

    /// The next frame before `deadline`; answers ARP requests for our address on the way.
    fn recv_frame(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if self.buf.len() >= 4 + len {
                    let frame = self.buf[4..4 + len].to_vec();
                    self.buf.drain(..4 + len);
                    if self.answer_arp(&frame) {
                        continue;
                    }
                    return Some(frame);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.sock.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return None,
                Err(err) => panic!("guest link: {err}"),
            }
        }
    }

    fn arp(&self, op: u16, target_mac: [u8; 6], target_ip: Ipv4Addr) -> Vec<u8> {
        let mut arp = vec![0, 1, 0x08, 0x00, 6, 4];
        arp.extend_from_slice(&op.to_be_bytes());
        arp.extend_from_slice(&self.mac);
        arp.extend_from_slice(&GUEST_IP.octets());
        arp.extend_from_slice(&target_mac);
        arp.extend_from_slice(&target_ip.octets());
        arp
    }

    fn answer_arp(&mut self, frame: &[u8]) -> bool {
        let is_request_for_us = frame.len() >= 42
            && frame[12..14] == [0x08, 0x06]
            && frame[20..22] == [0, 1]
            && frame[38..42] == GUEST_IP.octets();
        if is_request_for_us {
            let sender_mac: [u8; 6] = frame[22..28].try_into().unwrap();
            let sender_ip = Ipv4Addr::new(frame[28], frame[29], frame[30], frame[31]);
            let reply = self.arp(2, sender_mac, sender_ip);
            self.send_frame(sender_mac, 0x0806, &reply);
        }
        is_request_for_us
    }

    fn arp_gateway(&mut self) -> Option<[u8; 6]> {
        for _ in 0..5 {
            let request = self.arp(1, [0; 6], GATEWAY);
            self.send_frame([0xff; 6], 0x0806, &request);
            let deadline = Instant::now() + Duration::from_secs(1);
            while let Some(frame) = self.recv_frame(deadline) {
                if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] && frame[20..22] == [0, 2] {
                    self.gateway_mac = frame[22..28].try_into().unwrap();
                    return Some(self.gateway_mac);
                }
            }
        }
        None
    }

    fn send_ip(&mut self, dst: Ipv4Addr, proto: u8, payload: &[u8]) {
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
        ip.extend_from_slice(&GUEST_IP.octets());
        ip.extend_from_slice(&dst.octets());
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend_from_slice(payload);
        self.send_frame(self.gateway_mac, 0x0800, &ip);
    }

    /// The next IPv4 packet of `proto` addressed to our `port`, before `deadline`.
    fn recv_packet(&mut self, proto: u8, port: u16, deadline: Instant) -> Option<Packet> {
        while let Some(frame) = self.recv_frame(deadline) {
            if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[23] != proto {
                continue;
            }
            let ip = &frame[14..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
            let body = &ip[ihl..total];
            let packet = match proto {
                6 if body.len() >= 20 => {
                    let offset = usize::from(body[12] >> 4) * 4;
                    Packet {
                        proto,
                        src_port: u16::from_be_bytes([body[0], body[1]]),
                        dst_port: u16::from_be_bytes([body[2], body[3]]),
                        seq: u32::from_be_bytes(body[4..8].try_into().unwrap()),
                        flags: body[13],
                        payload: body[offset.min(body.len())..].to_vec(),
                    }
                }
                17 if body.len() >= 8 => Packet {
                    proto,
                    src_port: u16::from_be_bytes([body[0], body[1]]),
                    dst_port: u16::from_be_bytes([body[2], body[3]]),
                    seq: 0,
                    flags: 0,
                    payload: body[8..].to_vec(),
                },
                _ => continue,
            };
            if packet.proto == proto && packet.dst_port == port {
                return Some(packet);
            }
        }
        None
    }

    fn port(&mut self) -> u16 {
        self.next_port += 1;
        self.next_port
    }

    #[allow(clippy::too_many_arguments)]
    fn send_tcp(&mut self, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, data: &[u8]) {
        let mut tcp = Vec::with_capacity(20 + data.len());
        tcp.extend_from_slice(&sport.to_be_bytes());
        tcp.extend_from_slice(&dport.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&ack.to_be_bytes());
        tcp.extend_from_slice(&[5 << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
        tcp.extend_from_slice(data);
        let mut pseudo = GUEST_IP.octets().to_vec();
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(&tcp);
        let sum = checksum(&pseudo);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        self.send_ip(dst, 6, &tcp);
    }

    /// A TCP handshake to `ip:port`, then `PING\n`; returns what the far end answered up to a newline or FIN.
    fn tcp_ping(&mut self, ip: Ipv4Addr, port: u16) -> Tcp {
        let sport = self.port();
        let seq = 1000u32;
        self.send_tcp(ip, sport, port, seq, 0, TCP_SYN, &[]);
        let deadline = Instant::now() + GUEST_WAIT;
        let their_seq = loop {
            let Some(packet) = self.recv_packet(6, sport, deadline) else {
                return Tcp::NoAnswer;
            };
            if packet.src_port != port {
                continue;
            }
            if packet.flags & TCP_RST != 0 {
                return Tcp::Refused;
            }
            if packet.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
                break packet.seq;
            }
        };
        let mut ack = their_seq.wrapping_add(1);
        let ping = b"PING\n";
        self.send_tcp(ip, sport, port, seq + 1, ack, TCP_ACK, &[]);
        self.send_tcp(ip, sport, port, seq + 1, ack, TCP_PSH | TCP_ACK, ping);
        let our_seq = seq + 1 + ping.len() as u32;
        let mut reply = Vec::new();
        let deadline = Instant::now() + GUEST_WAIT;
        while let Some(packet) = self.recv_packet(6, sport, deadline) {
            if !packet.payload.is_empty() && packet.seq == ack {
                reply.extend_from_slice(&packet.payload);
                ack = ack.wrapping_add(packet.payload.len() as u32);
                self.send_tcp(ip, sport, port, our_seq, ack, TCP_ACK, &[]);
            }
            if reply.contains(&b'\n') || packet.flags & (TCP_FIN | TCP_RST) != 0 {
                break;
            }
        }
        self.send_tcp(ip, sport, port, our_seq, ack, TCP_RST | TCP_ACK, &[]);
        Tcp::Connected {
            reply: String::from_utf8_lossy(&reply).trim().to_owned(),
        }
    }

    /// An A query to the gateway's resolver.
    fn dns_a(&mut self, name: &str) -> Dns {
        let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        let sport = self.port();
        let mut udp = sport.to_be_bytes().to_vec();
        udp.extend_from_slice(&53u16.to_be_bytes());
        udp.extend_from_slice(&((8 + query.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&query);
        self.send_ip(GATEWAY, 17, &udp);
        let Some(packet) = self.recv_packet(17, sport, Instant::now() + GUEST_WAIT) else {
            return Dns::NoAnswer;
        };
        let answer = packet.payload;
        if answer.len() < 12 {
            return Dns::NoAnswer;
        }
        let rcode = answer[3] & 0x0f;
        let count = u16::from_be_bytes([answer[6], answer[7]]);
        let mut at = query.len(); // the question is echoed back unchanged
        let mut ips = Vec::new();
        for _ in 0..count {
            // The answer name: a compression pointer or a label sequence.
            if answer.get(at).is_some_and(|b| b & 0xc0 == 0xc0) {
                at += 2;
            } else {
                while let Some(&len) = answer.get(at).filter(|&&len| len != 0) {
                    at += usize::from(len) + 1;
                }
                at += 1;
            }
            let Some(fixed) = answer.get(at..at + 10) else { break };
            let (kind, rdlen) = (
                u16::from_be_bytes([fixed[0], fixed[1]]),
                usize::from(u16::from_be_bytes([fixed[8], fixed[9]])),
            );
            at += 10;
            if let (1, 4, Some(rdata)) = (kind, rdlen, answer.get(at..at + 4)) {
                ips.push(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]));
            }
            at += rdlen;
        }
        Dns::Answer { rcode, ips }
    }
}
