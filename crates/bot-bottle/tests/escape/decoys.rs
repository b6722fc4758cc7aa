//! Decoys and upstreams the scenarios stand up inside a lab: TCP and UDP listeners that count every contact, a DNS
//! server that logs every name asked and answers only the names it was given, unix and abstract sockets, and
//! HTTP/1.1 upstreams (plain and TLS with a CA minted here) that record every request, hash every body and speak
//! WebSocket. Every decoy lives until the test process exits.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const READ_TIMEOUT: Duration = Duration::from_secs(30);
const HEAD_MAX_BYTES: usize = 1024 * 1024;
/// RFC 6455 §1.3.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// One line per contact a decoy saw.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

pub struct Decoy {
    pub port: u16,
    pub log: Log,
}

/// A TCP listener that logs each connection (and what the client sent first), optionally greeting it.
pub fn tcp(addr: &str, banner: &'static [u8]) -> Decoy {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("decoy {addr}: {e}"));
    let port = listener.local_addr().unwrap().port();
    let log = Log::default();
    let l = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let l = l.clone();
            std::thread::spawn(move || {
                let _ = s.write_all(banner);
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut first = [0u8; 512];
                let n = s.read(&mut first).unwrap_or(0);
                let peer = s.peer_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
                let local = s.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
                l.push(format!(
                    "tcp {peer} -> {local}: {n} bytes {:?}",
                    String::from_utf8_lossy(&first[..n])
                ));
            });
        }
    });
    Decoy { port, log }
}

/// A UDP socket that logs each datagram and answers it.
pub fn udp(addr: &str) -> Decoy {
    let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("decoy {addr}: {e}"));
    let port = sock.local_addr().unwrap().port();
    let log = Log::default();
    let l = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let local = sock.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
            l.push(format!("udp {from} -> {local}: {n} bytes"));
            let _ = sock.send_to(b"decoy answers", from);
        }
    });
    Decoy { port, log }
}

/// The query name of a DNS message (RFC 1035 §4.1.2), lowercased, and its type.
fn question(msg: &[u8]) -> Option<(String, u16, usize)> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*msg.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]);
    Some((labels.join("."), qtype, at + 4))
}

/// Answers `msg` from `answers` (A and AAAA, TTL 0); a name it does not know gets REFUSED.
fn dns_answer(msg: &[u8], answers: &[(String, IpAddr)]) -> Option<Vec<u8>> {
    let (name, qtype, end) = question(msg)?;
    let known: Vec<&IpAddr> = answers.iter().filter(|(n, _)| *n == name).map(|(_, ip)| ip).collect();
    let mut out = msg.get(..end)?.to_vec();
    out[2] = 0x81; // QR, RD
    let records: Vec<Vec<u8>> = known
        .iter()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), 1) => Some((1u16, v4.octets().to_vec())),
            (IpAddr::V6(v6), 28) => Some((28u16, v6.octets().to_vec())),
            _ => None,
        })
        .map(|(ty, data)| {
            let mut r = vec![0xc0, 12];
            r.extend_from_slice(&ty.to_be_bytes());
            r.extend_from_slice(&[0, 1, 0, 0, 0, 0]);
            r.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
            r.extend_from_slice(&data);
            r
        })
        .collect();
    out[3] = if known.is_empty() { 0x85 } else { 0x80 }; // RA + REFUSED, or RA + NOERROR
    out[6..8].copy_from_slice(&u16::try_from(records.len()).unwrap().to_be_bytes());
    out[8..12].fill(0);
    records.iter().for_each(|r| out.extend_from_slice(r));
    Some(out)
}

/// A DNS server on UDP and TCP `addr` (port 53) that logs every question.
pub fn dns(addr: &str, answers: Vec<(String, IpAddr)>) -> Decoy {
    let answers = Arc::new(answers);
    let sock = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("dns decoy {addr}: {e}"));
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("dns decoy {addr}: {e}"));
    let port = sock.local_addr().unwrap().port();
    let log = Log::default();
    let (l, a) = (log.clone(), answers.clone());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let q = question(&buf[..n]).map_or_else(|| "?".into(), |(name, ty, _)| format!("{name} type {ty}"));
            l.push(format!("dns/udp {from}: {q}"));
            if let Some(reply) = dns_answer(&buf[..n], &a) {
                let _ = sock.send_to(&reply, from);
            }
        }
    });
    let l = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let q = buf
                .get(2..n)
                .and_then(question)
                .map_or_else(|| format!("{n} bytes"), |(name, ty, _)| format!("{name} type {ty}"));
            l.push(format!("dns/tcp {:?}: {q}", s.peer_addr().ok()));
            if let Some(reply) = buf.get(2..n).and_then(|m| dns_answer(m, &answers)) {
                let _ = s.write_all(&u16::try_from(reply.len()).unwrap().to_be_bytes());
                let _ = s.write_all(&reply);
            }
        }
    });
    Decoy { port, log }
}

fn unix_listener(listener: UnixListener, what: String) -> Decoy {
    let log = Log::default();
    let l = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stream.is_ok() {
                l.push(format!("connection to {what}"));
            }
        }
    });
    Decoy { port: 0, log }
}

/// A unix socket at `path` (an agent, a container daemon) that logs connections.
pub fn unix(path: &Path) -> Decoy {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let listener = UnixListener::bind(path).unwrap_or_else(|e| panic!("unix decoy {}: {e}", path.display()));
    unix_listener(listener, path.display().to_string())
}

/// A unix socket in a workspace, as a host process (git's fsmonitor daemon, a dev server) makes one: mode 0777, so
/// that only the bottle's socket warden, not file permissions, stands between it and an unprivileged bottle.
pub fn unix_open_to_all(path: &Path) -> Decoy {
    let decoy = unix(path);
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    decoy
}

/// A unix datagram socket at `path` (mode 0777) that logs every datagram.
pub fn unix_datagram(path: &Path) -> Decoy {
    let sock = std::os::unix::net::UnixDatagram::bind(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let log = Log::default();
    let l = log.clone();
    let what = path.display().to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok(n) = sock.recv(&mut buf) {
            l.push(format!("datagram to {what}: {n} bytes"));
        }
    });
    Decoy { port: 0, log }
}

/// A unix socket made at `path` once `marker` exists (a socket a host process makes after the bottle started).
pub fn unix_when(marker: std::path::PathBuf, path: std::path::PathBuf) -> std::thread::JoinHandle<Option<Decoy>> {
    std::thread::spawn(move || {
        for _ in 0..1200 {
            if marker.exists() {
                return Some(unix_open_to_all(&path));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        None
    })
}

/// An abstract unix socket `@name` (per network namespace: create it inside the lab).
pub fn abstract_unix(name: &str) -> Decoy {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = UnixListener::bind_addr(&addr).unwrap_or_else(|e| panic!("abstract decoy @{name}: {e}"));
    unix_listener(listener, format!("@{name}"))
}

// -------------------------------------------------------------------------------------------------------------
// Certificates

/// A CA minted for the test (the one test CA, in the test-support crate), its certificate written to
/// `<dir>/upstream-ca.pem` for `--upstream-ca`.
pub use bottle_test_support::ca::TestCa;

pub fn mint_ca(dir: &Path) -> TestCa {
    TestCa::mint(dir, "upstream-ca", "escape suite upstream CA")
}

// -------------------------------------------------------------------------------------------------------------
// HTTP/1.1 upstreams

/// One request an upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body_len: u64,
    pub body_sha256: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Everything the request carried, for "never saw X" checks.
    pub fn text(&self) -> String {
        let headers: Vec<String> = self.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!("{} {}\n{}", self.method, self.target, headers.join("\n"))
    }
}

#[derive(Clone)]
pub struct Upstream {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    pub connections: Log,
}

impl Upstream {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A plain HTTP/1.1 upstream on `addr`.
pub fn http(addr: &str, label: &'static str) -> Upstream {
    upstream(addr, label, None)
}

/// An HTTPS upstream on `addr` presenting a leaf for `names` signed by `ca` (ALPN http/1.1 only).
pub fn https(addr: &str, label: &'static str, ca: &TestCa, names: &[&str]) -> Upstream {
    let (chain, key) = ca.leaf(names);
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    upstream(addr, label, Some(Arc::new(config)))
}

fn upstream(addr: &str, label: &'static str, tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("upstream {addr}: {e}"));
    let up = Upstream {
        port: listener.local_addr().unwrap().port(),
        seen: Arc::default(),
        connections: Log::default(),
    };
    let u = up.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
            u.connections.push(format!("{:?}", stream.peer_addr().ok()));
            let (u, tls) = (u.clone(), tls.clone());
            std::thread::spawn(move || match tls {
                Some(config) => {
                    let Ok(conn) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut s = rustls::StreamOwned::new(conn, stream);
                    serve(&mut s, label, &u.seen);
                }
                None => {
                    let mut s = stream;
                    serve(&mut s, label, &u.seen);
                }
            });
        }
    });
    up
}

struct Wire<'a, S> {
    s: &'a mut S,
    buf: Vec<u8>,
}

impl<S: Read + Write> Wire<'_, S> {
    fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.s.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    fn until(&mut self, delim: &[u8], max: usize) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(at) = self.buf.windows(delim.len()).position(|w| w == delim) {
                let out = self.buf[..at].to_vec();
                self.buf.drain(..at + delim.len());
                return Ok(Some(out));
            }
            if self.buf.len() > max || !self.fill()? {
                return Ok(None);
            }
        }
    }

    fn body(&mut self, mut n: u64, sha: &mut ring::digest::Context) -> io::Result<()> {
        while n > 0 {
            if self.buf.is_empty() && !self.fill()? {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body cut short"));
            }
            let k = usize::try_from(n).unwrap_or(usize::MAX).min(self.buf.len());
            sha.update(&self.buf[..k]);
            self.buf.drain(..k);
            n -= k as u64;
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = u32::from(c[0]) << 16 | u32::from(*c.get(1).unwrap_or(&0)) << 8 | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Serves requests until the client closes: records each, answers `hello from <label> upstream: <method> <target>
/// bytes=<n> sha256=<hex>`, and turns a WebSocket upgrade into an echo.
fn serve<S: Read + Write>(s: &mut S, label: &str, seen: &Mutex<Vec<Seen>>) {
    let mut w = Wire { s, buf: Vec::new() };
    loop {
        let Ok(Some(head)) = w.until(b"\r\n\r\n", HEAD_MAX_BYTES) else {
            return;
        };
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.split("\r\n");
        let mut words = lines.next().unwrap_or("").split(' ');
        let (method, target) = (
            words.next().unwrap_or("").to_string(),
            words.next().unwrap_or("").to_string(),
        );
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let mut req = Seen {
            method,
            target,
            headers,
            body_len: 0,
            body_sha256: String::new(),
        };
        if req
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        {
            let _ = w.s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let mut sha = ring::digest::Context::new(&ring::digest::SHA256);
        let chunked = req
            .header("transfer-encoding")
            .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
        let read = if chunked {
            read_chunked(&mut w, &mut sha, &mut req.body_len)
        } else {
            let len = req.header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
            req.body_len = len;
            w.body(len, &mut sha)
        };
        req.body_sha256 = hex(sha.finish().as_ref());
        let upgrade = req
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
        let close = req
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let key = req.header("sec-websocket-key").unwrap_or("").to_string();
        let body = format!(
            "hello from {label} upstream: {} {} bytes={} sha256={}\n",
            req.method, req.target, req.body_len, req.body_sha256
        );
        seen.lock().unwrap().push(req);
        if read.is_err() {
            return;
        }
        if upgrade {
            let digest = ring::digest::digest(
                &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                format!("{key}{WS_GUID}").as_bytes(),
            );
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                base64(digest.as_ref())
            );
            if w.s.write_all(resp.as_bytes()).and_then(|()| w.s.flush()).is_err() {
                return;
            }
            let pending = std::mem::take(&mut w.buf);
            let _ = w.s.write_all(&pending);
            let mut chunk = [0u8; 4096];
            while let Ok(n) = w.s.read(&mut chunk) {
                if n == 0 || w.s.write_all(&chunk[..n]).and_then(|()| w.s.flush()).is_err() {
                    return;
                }
            }
            return;
        }
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-upstream: {label}\r\n\r\n{body}",
            body.len()
        );
        if w.s.write_all(resp.as_bytes()).and_then(|()| w.s.flush()).is_err() || close {
            return;
        }
    }
}

fn read_chunked<S: Read + Write>(
    w: &mut Wire<'_, S>,
    sha: &mut ring::digest::Context,
    total: &mut u64,
) -> io::Result<()> {
    loop {
        let line = w
            .until(b"\r\n", 1024)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no chunk size"))?;
        let line = String::from_utf8_lossy(&line).into_owned();
        let size = u64::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            while w.until(b"\r\n", 8192)?.is_some_and(|l| !l.is_empty()) {}
            return Ok(());
        }
        w.body(size, sha)?;
        *total += size;
        w.until(b"\r\n", 2)?;
    }
}

/// Connects out of a lab thread (the self-check's "is the decoy really there" control).
pub fn reachable(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(b"fooba"), "Zm9vYmE=");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }
}
