//! The self-test's host side: a temporary directory (workspace, state home, host-only files) removed afterwards,
//! decoys on the host's loopback that count every contact, planted secrets and symlinks, a marked host process, and
//! the one bottle run, killed when it hangs. Trusts only its own counters and files.

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bottle_probe::catalogue::Values;

/// How long the whole bottle run may take; a hang is an error, not a pass.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// The one allowed host, which the decoy credential is bound to (`.test`, RFC 2606), pinned by the policy to an
/// unusual loopback address where a silent decoy upstream listens: no lookup and no dial leaves the host.
pub const CREDENTIAL_HOST: &str = "selftest.bot-bottle.test";
pub const UPSTREAM_IP: &str = "127.1.2.3";
/// The launcher-side variable of the decoy credential; inside the bottle it holds only a placeholder.
pub const TOKEN_VAR: &str = "BOT_BOTTLE_SELFTEST_TOKEN";
/// A launcher-side variable that is not a credential: it must not reach the bottle at all.
pub const HOST_ENV_VAR: &str = "BOT_BOTTLE_SELFTEST_HOST_ONLY";

/// A temporary directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Scratch {
    /// A fresh 0700 directory under the temp dir with `work/`, `state/` and `host/` in it.
    pub fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("bot-bottle-selftest-{}-{}", std::process::id(), random_hex()?));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let scratch = Scratch(dir);
        for d in [scratch.work(), scratch.state(), scratch.host()] {
            std::fs::create_dir(&d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        Ok(scratch)
    }

    pub fn work(&self) -> PathBuf {
        self.0.join("work")
    }

    pub fn state(&self) -> PathBuf {
        self.0.join("state")
    }

    pub fn host(&self) -> PathBuf {
        self.0.join("host")
    }
}

pub fn random_hex() -> anyhow::Result<String> {
    let mut bytes = [0u8; 8];
    rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()).context("no randomness")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Counts contacts with one decoy.
#[derive(Clone, Default)]
pub struct Hits(Arc<AtomicUsize>);

impl Hits {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

fn spawn_counter<T: Send + 'static>(hits: &Hits, next: impl Fn() -> std::io::Result<T> + Send + 'static) {
    let hits = hits.clone();
    std::thread::spawn(move || {
        while next().is_ok() {
            hits.0.fetch_add(1, Ordering::SeqCst);
        }
    });
}

/// A child process killed and reaped on drop.
pub struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything planted on the host: the catalogue's values, the decoys behind them, and what must stay unwritten.
pub struct Planted {
    pub values: Values,
    /// Why a value the catalogue may ask for is missing on this host.
    pub missing: Vec<(&'static str, String)>,
    /// The decoy behind each value: a case that names the value escaped if its decoy was contacted.
    pub decoys: Vec<(&'static str, Hits)>,
    pub upstream_port: u16,
    pub secret: String,
    pub host_env: String,
    pub agent_path: PathBuf,
    /// Host paths the bottle's write attempts name; none may exist afterwards.
    pub unwritten: Vec<PathBuf>,
    /// The marked host process, killed when this is dropped.
    pub _marked: Reaped,
}

/// Plants the decoys, secrets and workspace symlinks the catalogue's cases aim at.
pub fn plant(s: &Scratch, home: &str) -> anyhow::Result<Planted> {
    use std::os::linux::net::SocketAddrExt;
    let (work, host) = (s.work(), s.host());
    let mut values = Values::default();
    let mut missing = Vec::new();
    let mut decoys = Vec::new();

    let upstream = TcpListener::bind((UPSTREAM_IP, 0)).context("decoy upstream")?;
    let upstream_port = upstream.local_addr()?.port();
    // The allowed upstream: the proxy may dial it; it never answers, so no TLS handshake can complete.
    spawn_counter(&Hits::default(), move || upstream.accept());
    let tcp = TcpListener::bind("127.0.0.1:0").context("decoy TCP listener")?;
    values.set("lo_http", tcp.local_addr()?.port());
    decoys.push(("lo_http", counted(move || tcp.accept())));
    let udp = UdpSocket::bind("127.0.0.1:0").context("decoy UDP socket")?;
    values.set("lo_udp", udp.local_addr()?.port());
    decoys.push(("lo_udp", counted(move || udp.recv_from(&mut [0u8; 512]))));
    match TcpListener::bind("[::1]:0") {
        Ok(v6) => {
            values.set("lo_v6", v6.local_addr()?.port());
            decoys.push(("lo_v6", counted(move || v6.accept())));
        }
        Err(e) => missing.push((
            "lo_v6",
            format!("this host has no IPv6 loopback to put a decoy on ({e})"),
        )),
    }
    let agent_path = host.join("agent.sock");
    let agent = UnixListener::bind(&agent_path).context("decoy agent socket")?;
    values.set("agent_path", agent_path.display());
    decoys.push(("agent_path", counted(move || agent.accept())));
    let gpg_path = host.join("S.gpg-agent");
    let gpg = UnixListener::bind(&gpg_path).context("decoy gpg-agent socket")?;
    values.set("gpg_path", gpg_path.display());
    decoys.push(("gpg_path", counted(move || gpg.accept())));
    let abstract_name = format!("bot-bottle-selftest-{}", random_hex()?);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())?;
    let abstract_sock = UnixListener::bind_addr(&addr).context("decoy abstract socket")?;
    values.set("abstract_name", &abstract_name);
    decoys.push(("abstract_name", counted(move || abstract_sock.accept())));

    // #12: a host process's sockets in the workspace, one there at launch and one made once the bottle asks for it
    // (it touches the marker), and a datagram socket. Open to everyone, as a careless daemon leaves them.
    let open_to_all = |p: &Path| std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777));
    let ws_sock = work.join(".selftest-host.sock");
    let ws = UnixListener::bind(&ws_sock).context("decoy workspace socket")?;
    open_to_all(&ws_sock)?;
    values
        .set("workspace_sock", ws_sock.display())
        .set("workspace_sock_rel", ".selftest-host.sock");
    decoys.push(("workspace_sock", counted(move || ws.accept())));
    let dgram_sock = work.join(".selftest-host-dgram.sock");
    let dgram = std::os::unix::net::UnixDatagram::bind(&dgram_sock).context("decoy workspace datagram socket")?;
    open_to_all(&dgram_sock)?;
    values.set("dgram_sock", dgram_sock.display());
    decoys.push(("dgram_sock", counted(move || dgram.recv(&mut [0u8; 64]))));
    let (late_marker, late_sock) = (work.join(".selftest-late-ready"), work.join(".selftest-late.sock"));
    values
        .set("late_marker", late_marker.display())
        .set("late_sock", late_sock.display());
    let late = std::sync::Mutex::new(None::<UnixListener>);
    decoys.push((
        "late_sock",
        counted(move || {
            let mut late = late.lock().map_err(|_| std::io::Error::other("poisoned"))?;
            if late.is_none() {
                while !late_marker.exists() {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                let l = UnixListener::bind(&late_sock)?;
                open_to_all(&late_sock)?;
                *late = Some(l);
            }
            late.as_ref()
                .map_or_else(|| Err(std::io::Error::other("no listener")), UnixListener::accept)
        }),
    ));

    // `sleep` takes fractions: a duration nothing else uses marks the host process.
    let tag = format!("86399.{}", u32::from_str_radix(&random_hex()?[..6], 16)?);
    let marked = Command::new("sleep")
        .arg(&tag)
        .stdin(Stdio::null())
        .spawn()
        .context("cannot start the marked host process (sleep)")?;
    values
        .set("marker", format!("sleep {tag}"))
        .set("marker_pid", marked.id());
    let marked = Reaped(marked);

    let secret = format!("selftest-secret-{}", random_hex()?);
    let host_env = format!("selftest-host-env-{}", random_hex()?);
    let host_file = format!("selftest-file-{}", random_hex()?);
    std::fs::write(host.join("secret.txt"), &host_file)?;
    values
        .set("token_var", TOKEN_VAR)
        .set("secret", &secret)
        .set("host_env", &host_env)
        .set("host_file", &host_file)
        .set("home", home)
        .set("parent", s.0.display())
        .set("exfil_name", format!("{}.attacker.example", random_hex()?))
        .set("host_resolver", host_resolver())
        .set("tls_authority", format!("{CREDENTIAL_HOST}:{upstream_port}"));
    match std::fs::read_to_string("/etc/machine-id") {
        Ok(id) if !id.trim().is_empty() => {
            values.set("machine_id", id.trim());
        }
        _ => missing.push(("machine_id", "this host has no /etc/machine-id to link to".into())),
    }

    // Workspace symlinks to host paths (escape case 45).
    std::fs::write(host.join("target.txt"), format!("host-target-{}\n", random_hex()?))?;
    std::os::unix::fs::symlink(host.join("target.txt"), work.join("escape-link"))?;
    std::os::unix::fs::symlink("../host/target.txt", work.join("escape-link-rel"))?;
    std::os::unix::fs::symlink(&host, work.join("escape-dir"))?;
    std::os::unix::fs::symlink("/etc/machine-id", work.join("escape-link-machine-id"))?;

    let w = format!(".bot-bottle-selftest-{}", random_hex()?);
    let unwritten = ["/usr", "/usr/bin", "/etc", "/etc/ssl/certs", "/", "/tmp"]
        .iter()
        .map(|d| Path::new(d).join(&w))
        .chain([s.0.join(&w)])
        .collect();
    values.set("write_token", &w);
    Ok(Planted {
        values,
        missing,
        decoys,
        upstream_port,
        secret,
        host_env,
        agent_path,
        unwritten,
        _marked: marked,
    })
}

fn counted<T: Send + 'static>(next: impl Fn() -> std::io::Result<T> + Send + 'static) -> Hits {
    let hits = Hits::default();
    spawn_counter(&hits, next);
    hits
}

/// The host's first resolver as `ADDR:53` (an address no resolver has when there is none).
fn host_resolver() -> String {
    let first = std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|a| a.trim().parse::<std::net::IpAddr>().ok());
    match first {
        Some(std::net::IpAddr::V6(ip)) => format!("[{ip}]:53"),
        Some(ip) => format!("{ip}:53"),
        None => "10.255.255.53:53".into(),
    }
}

/// Whether `tool` is an executable in one of the host's system directories (the bottle sees the host's `/usr`).
pub fn has_tool(tool: &str) -> bool {
    ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .any(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// Runs `cmd` to completion, killing it after `RUN_TIMEOUT`.
pub fn run_bottle(mut cmd: Command) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start bot-bottle run")?;
    let read_all = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read_all(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = read_all(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the self-test bottle did not finish within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let join = |h: std::thread::JoinHandle<String>| h.join().unwrap_or_default();
    Ok((status, join(out), join(err)))
}
