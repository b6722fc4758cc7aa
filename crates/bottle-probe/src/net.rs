//! Direct network attempts: TCP, UDP, QUIC, ICMP, raw and packet sockets, DNS (resolver, UDP, TCP, TLS), SSH, port
//! scans, unix and abstract sockets. Inside a bottle's network namespace only `lo` exists and nothing listens on it
//! but the proxy, so every one of these must fail; run unconfined, each must see its target.
//!
//! A datagram to a non-loopback address that the kernel accepted counts as an escape even without an answer: with
//! no route, `sendto` fails before anything is sent, so an accepted datagram was handed to a real route.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, ipproto};
use serde_json::json;

use crate::exact;
use crate::verdict::{Failure, Outcome, Verdict, cannot_run, usage};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
const SCAN_TIMEOUT: Duration = Duration::from_millis(300);
/// A QUIC client's first datagram is padded to at least 1200 bytes (RFC 9000 §14.1).
const QUIC_INITIAL_BYTES: usize = 1200;
/// How deep and how wide `unix-scan` walks.
const SCAN_MAX_DEPTH: usize = 5;
const SCAN_MAX_ENTRIES: usize = 20_000;

fn sock_addr(raw: &str) -> Result<SocketAddr, Failure> {
    raw.parse()
        .map_err(|e| usage(format!("`{raw}` is not ADDR:PORT ([v6]:PORT for IPv6): {e}")))
}

fn ip_addr(raw: &str) -> Result<IpAddr, Failure> {
    raw.parse()
        .map_err(|e| usage(format!("`{raw}` is not an IP address: {e}")))
}

pub fn tcp_connect(args: &[String]) -> Outcome {
    let [addr] = exact(args)?;
    let addr = sock_addr(addr)?;
    Ok(match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(_) => Verdict::escaped("tcp-connect", format!("connected to {addr}")),
        Err(e) => Verdict::held("tcp-connect", format!("connect {addr}: {e}")),
    })
}

pub fn udp_send(args: &[String]) -> Outcome {
    let [addr] = exact(args)?;
    datagram("udp-send", sock_addr(addr)?, b"bottle-probe udp")
}

pub fn quic(args: &[String]) -> Outcome {
    let [addr] = exact(args)?;
    // Long header, Initial, version 1, an 8-byte destination connection id, no source id, no token (RFC 9000 §17.2.2).
    let mut packet = vec![
        0xc3, 0, 0, 0, 1, 8, 0xb0, 0x77, 0x1e, 0x50, 0x0d, 0xec, 0xaf, 0x01, 0, 0,
    ];
    packet.resize(QUIC_INITIAL_BYTES, 0);
    datagram("quic", sock_addr(addr)?, &packet)
}

/// Sends one datagram; escaped if it was routed off loopback or anything answered.
fn datagram(case: &'static str, addr: SocketAddr, payload: &[u8]) -> Outcome {
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
        SocketAddr::V6(_) => ([0u16; 8], 0).into(),
    };
    let sock = match UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => return Ok(Verdict::held(case, format!("no UDP socket: {e}"))),
    };
    if let Err(e) = sock.send_to(payload, addr) {
        return Ok(Verdict::held(case, format!("sendto {addr}: {e}")));
    }
    sock.set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| cannot_run(format!("SO_RCVTIMEO: {e}")))?;
    let mut buf = [0u8; 2048];
    // Waited for with poll(2) as well: gVisor's host network stack blocks a UDP read past its SO_RCVTIMEO.
    let mut ready = [rustix::event::PollFd::new(&sock, rustix::event::PollFlags::IN)];
    let within = rustix::event::Timespec::try_from(REPLY_TIMEOUT).map_err(|e| cannot_run(e.to_string()))?;
    let answered = match rustix::event::poll(&mut ready, Some(&within)) {
        Ok(n) => n > 0,
        Err(e) => return Err(cannot_run(format!("poll: {e}"))),
    };
    let got = if answered {
        sock.recv_from(&mut buf)
    } else {
        Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
    };
    match got {
        Ok((n, from)) => Ok(Verdict::escaped(case, format!("{n} bytes back from {from}"))),
        Err(e) if !addr.ip().is_loopback() => Ok(Verdict::escaped(
            case,
            format!("the kernel routed a datagram to {addr} (no answer: {e})"),
        )),
        Err(e) => Ok(Verdict::held(case, format!("sent on loopback, nothing answered: {e}"))),
    }
}

pub fn ping_raw(args: &[String]) -> Outcome {
    ping("ping-raw", args, SocketType::RAW)
}

pub fn ping_dgram(args: &[String]) -> Outcome {
    ping("ping-dgram", args, SocketType::DGRAM)
}

/// ICMP echo request. Loopback targets are refused: the bottle's own `lo` would answer.
fn ping(case: &'static str, args: &[String], kind: SocketType) -> Outcome {
    let [ip] = exact(args)?;
    let ip = ip_addr(ip)?;
    if ip.is_loopback() {
        return Err(usage(
            "a loopback target proves nothing: the bottle's own lo answers it",
        ));
    }
    let (family, proto, echo_type) = match ip {
        IpAddr::V4(_) => (AddressFamily::INET, ipproto::ICMP, 8u8),
        IpAddr::V6(_) => (AddressFamily::INET6, ipproto::ICMPV6, 128u8),
    };
    let fd = match rustix::net::socket(family, kind, Some(proto)) {
        Ok(fd) => fd,
        Err(e) => return Ok(Verdict::held(case, format!("socket: {e}"))),
    };
    let mut packet = vec![echo_type, 0, 0, 0, 0x0b, 0x0b, 0, 1];
    packet.extend_from_slice(b"bottle-probe ping");
    let sum = inet_checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    if let Err(e) = rustix::net::sendto(&fd, &packet, SendFlags::empty(), &SocketAddr::new(ip, 0)) {
        return Ok(Verdict::held(case, format!("socket created, sendto {ip}: {e}")));
    }
    let reply = recv_timeout(&fd, REPLY_TIMEOUT);
    Ok(Verdict::escaped(
        case,
        format!("an ICMP echo request to {ip} was routed ({reply})"),
    ))
}

fn recv_timeout(fd: &OwnedFd, timeout: Duration) -> String {
    if let Err(e) = rustix::net::sockopt::set_socket_timeout(fd, rustix::net::sockopt::Timeout::Recv, Some(timeout)) {
        return format!("SO_RCVTIMEO: {e}");
    }
    let mut buf = [0u8; 2048];
    match rustix::net::recv(fd, &mut buf[..], RecvFlags::empty()) {
        Ok((n, _)) => format!("{n} bytes came back"),
        Err(e) => format!("no reply: {e}"),
    }
}

/// RFC 1071 one's-complement sum (the kernel fills it in for datagram and ICMPv6 sockets anyway).
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn raw_socket(args: &[String]) -> Outcome {
    let [kind] = exact(args)?;
    let (family, ty, proto) = match kind {
        "inet" => (AddressFamily::INET, SocketType::RAW, Some(ipproto::ICMP)),
        "inet6" => (AddressFamily::INET6, SocketType::RAW, Some(ipproto::ICMPV6)),
        "ip-raw" => (AddressFamily::INET, SocketType::RAW, Some(ipproto::RAW)),
        "packet" => (AddressFamily::PACKET, SocketType::RAW, Some(rustix::net::eth::ALL)),
        "packet-dgram" => (AddressFamily::PACKET, SocketType::DGRAM, Some(rustix::net::eth::ALL)),
        other => return Err(usage(format!("unknown raw socket kind `{other}`"))),
    };
    Ok(match rustix::net::socket(family, ty, proto) {
        Ok(_) => Verdict::escaped("raw-socket", format!("created a {kind} raw socket")),
        Err(e) => Verdict::held("raw-socket", format!("{kind}: {e}")),
    })
}

// Resolving a name from inside is the attempt itself: the bottle has no resolver, so this must fail.
#[allow(clippy::disallowed_methods)]
pub fn ssh(args: &[String]) -> Outcome {
    let [target] = exact(args)?;
    let addrs: Vec<SocketAddr> = match target.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return Ok(Verdict::held("ssh", format!("cannot resolve {target}: {e}"))),
    };
    let mut tried = Vec::new();
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(REPLY_TIMEOUT));
                let mut banner = [0u8; 64];
                let n = s.read(&mut banner).unwrap_or(0);
                let banner = String::from_utf8_lossy(&banner[..n]).trim().to_string();
                return Ok(Verdict::escaped(
                    "ssh",
                    format!("connected to {addr}, banner {banner:?}"),
                ));
            }
            Err(e) => tried.push(format!("{addr}: {e}")),
        }
    }
    Ok(Verdict::held("ssh", format!("no connection: {}", tried.join("; "))))
}

/// `LO-HI` or `N`.
fn ports(spec: &str) -> Result<std::ops::RangeInclusive<u16>, Failure> {
    let bad = || usage(format!("`{spec}` is not a port or LO-HI range"));
    match spec.split_once('-') {
        Some((lo, hi)) => {
            let (lo, hi): (u16, u16) = (lo.parse().map_err(|_| bad())?, hi.parse().map_err(|_| bad())?);
            if lo == 0 || lo > hi {
                return Err(bad());
            }
            Ok(lo..=hi)
        }
        None => {
            let p: u16 = spec.parse().map_err(|_| bad())?;
            if p == 0 {
                return Err(bad());
            }
            Ok(p..=p)
        }
    }
}

pub fn port_scan(args: &[String]) -> Outcome {
    let [ip, proxy, specs @ ..] = args else {
        return Err(usage("expected ADDR PROXY-PORT and at least one PORT or LO-HI"));
    };
    if specs.is_empty() {
        return Err(usage("expected at least one PORT or LO-HI"));
    }
    let ip = ip_addr(ip)?;
    let proxy: u16 = proxy.parse().map_err(|_| usage(format!("`{proxy}` is not a port")))?;
    let mut open = Vec::new();
    let mut scanned = 0u32;
    let start = Instant::now();
    for spec in specs {
        for port in ports(spec)? {
            scanned += 1;
            if TcpStream::connect_timeout(&SocketAddr::new(ip, port), SCAN_TIMEOUT).is_ok() {
                open.push(port);
            }
        }
    }
    let others: Vec<u16> = open.iter().copied().filter(|p| *p != proxy).collect();
    let detail = json!({ "open": open, "scanned": scanned, "elapsed_ms": start.elapsed().as_millis() as u64 });
    let v = if others.is_empty() {
        Verdict::held(
            "port-scan",
            format!("{scanned} ports of {ip} scanned; open: {open:?} (proxy port {proxy})"),
        )
    } else {
        Verdict::escaped("port-scan", format!("{ip} answers on {others:?} besides the proxy"))
    };
    Ok(v.with(detail))
}

// getaddrinfo through whatever the bottle's libc finds is the attempt itself (escape cases 14, 17).
#[allow(clippy::disallowed_methods)]
pub fn resolve(args: &[String]) -> Outcome {
    let [name] = exact(args)?;
    Ok(match (name, 0u16).to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
            if addrs.is_empty() {
                Verdict::held("resolve", format!("{name}: no addresses"))
            } else {
                Verdict::escaped("resolve", format!("{name} resolved to {}", addrs.join(", ")))
            }
        }
        Err(e) => Verdict::held("resolve", format!("{name}: {e}")),
    })
}

/// A DNS query for an A record (RFC 1035 §4.1), recursion desired.
fn dns_query(name: &str) -> Result<Vec<u8>, Failure> {
    let mut q = vec![0xb0, 0x77, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| (1..=63).contains(l))
            .ok_or_else(|| usage(format!("`{name}` has an empty or over-long label")))?;
        q.push(len);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    Ok(q)
}

pub fn dns_udp(args: &[String]) -> Outcome {
    let [server, name] = exact(args)?;
    datagram("dns-udp", sock_addr(server)?, &dns_query(name)?)
}

pub fn dns_tcp(args: &[String]) -> Outcome {
    let [server, name] = exact(args)?;
    let server = sock_addr(server)?;
    let query = dns_query(name)?;
    let mut s = match TcpStream::connect_timeout(&server, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return Ok(Verdict::held("dns-tcp", format!("connect {server}: {e}"))),
    };
    let len = u16::try_from(query.len()).map_err(|_| usage("query too long"))?;
    let sent = s
        .write_all(&len.to_be_bytes())
        .and_then(|()| s.write_all(&query))
        .map_or_else(|e| format!("write failed: {e}"), |()| "query sent".into());
    Ok(Verdict::escaped("dns-tcp", format!("connected to {server}; {sent}")))
}

pub fn dot(args: &[String]) -> Outcome {
    let [server] = exact(args)?;
    let server = sock_addr(server)?;
    let mut s = match TcpStream::connect_timeout(&server, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return Ok(Verdict::held("dot", format!("connect {server}: {e}"))),
    };
    let _ = s.set_read_timeout(Some(REPLY_TIMEOUT));
    let hello = crate::tls::client_hello("dns.google");
    let answer = match s.write_all(&hello).and_then(|()| s.read(&mut [0u8; 5])) {
        Ok(n) => format!("{n} bytes answered the ClientHello"),
        Err(e) => format!("no answer: {e}"),
    };
    Ok(Verdict::escaped("dot", format!("connected to {server}; {answer}")))
}

pub fn unix_connect(args: &[String]) -> Outcome {
    if args.is_empty() {
        return Err(usage("expected at least one PATH"));
    }
    let results: Vec<(String, Result<(), String>)> = args
        .iter()
        .map(|p| (p.clone(), UnixStream::connect(p).map(drop).map_err(|e| e.to_string())))
        .collect();
    Ok(unix_verdict("unix-connect", &results))
}

/// A control: a socket the bottle makes itself (at PATH) answers it, by that path and from another thread (the
/// socket warden judges every connect; it must let these through).
pub fn unix_own(args: &[String]) -> Outcome {
    let [path] = args else {
        return Err(usage("expected PATH"));
    };
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| crate::verdict::Failure::CannotRun(format!("bind {path}: {e}")))?;
    let mut results = vec![(
        path.clone(),
        UnixStream::connect(path).map(drop).map_err(|e| e.to_string()),
    )];
    let p = path.clone();
    let threaded = std::thread::spawn(move || UnixStream::connect(&p).map(drop).map_err(|e| e.to_string()))
        .join()
        .unwrap_or_else(|_| Err("the thread panicked".into()));
    results.push((format!("{path} (another thread)"), threaded));
    drop(listener);
    let _ = std::fs::remove_file(path);
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(p, r)| r.as_ref().err().map(|e| format!("{p}: {e}")))
        .collect();
    if failed.is_empty() {
        Ok(Verdict::escaped(
            "unix-own",
            format!("connected to {path}, from two threads"),
        ))
    } else {
        Ok(Verdict::held(
            "unix-own",
            format!("its own socket did not answer: {}", failed.join("; ")),
        ))
    }
}

/// A datagram to a Unix socket by path, from a socket and from a socketpair (a datagram socket reaches any socket
/// by path with each `sendto`).
pub fn unix_dgram(args: &[String]) -> Outcome {
    use std::os::unix::net::UnixDatagram;
    let [path] = args else {
        return Err(usage("expected PATH"));
    };
    let attempts = [
        ("socket", UnixDatagram::unbound().and_then(|s| s.send_to(b"x", path))),
        (
            "socketpair",
            UnixDatagram::pair().and_then(|(a, _b)| a.send_to(b"x", path)),
        ),
    ];
    let sent: Vec<&str> = attempts
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(how, _)| *how)
        .collect();
    let all: Vec<String> = attempts
        .iter()
        .map(|(how, r)| {
            format!(
                "{how}: {}",
                r.as_ref()
                    .map_or_else(ToString::to_string, |n| format!("sent {n} bytes"))
            )
        })
        .collect();
    Ok(if sent.is_empty() {
        Verdict::held("unix-dgram", all.join("; "))
    } else {
        Verdict::escaped("unix-dgram", format!("a datagram reached {path} ({})", all.join("; ")))
    })
}

/// A socket the host makes after the bottle started: touch MARKER, wait (up to 10 s) for PATH, connect.
pub fn unix_connect_late(args: &[String]) -> Outcome {
    let [marker, path] = args else {
        return Err(usage("expected MARKER PATH"));
    };
    std::fs::write(marker, b"").map_err(|e| crate::verdict::Failure::CannotRun(format!("{marker}: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => break,
            // There, but not to be looked at (gVisor refuses even a stat of a host socket): try it as it is.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => break,
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(crate::verdict::Failure::CannotRun(format!("{path} never appeared")));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let result = UnixStream::connect(path).map(drop).map_err(|e| e.to_string());
    Ok(unix_verdict("unix-connect-late", &[(path.clone(), result)]))
}

fn unix_verdict(case: &'static str, results: &[(String, Result<(), String>)]) -> Verdict {
    let reached: Vec<&str> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(p, _)| p.as_str())
        .collect();
    let detail = json!(
        results
            .iter()
            .map(|(p, r)| (p.clone(), json!(r.as_ref().err().map_or("connected", |e| e.as_str()))))
            .collect::<serde_json::Map<_, _>>()
    );
    let v = if reached.is_empty() {
        let all: Vec<String> = results
            .iter()
            .map(|(p, r)| format!("{p}: {}", r.as_ref().err().map_or("connected", |e| e)))
            .collect();
        Verdict::held(case, format!("nothing reachable ({})", all.join("; ")))
    } else {
        Verdict::escaped(case, format!("connected to {}", reached.join(", ")))
    };
    v.with(detail)
}

pub fn unix_scan(args: &[String]) -> Outcome {
    if args.is_empty() {
        return Err(usage("expected at least one DIR"));
    }
    let mut sockets = Vec::new();
    let mut seen = 0usize;
    for dir in args {
        walk_sockets(Path::new(dir), 0, &mut seen, &mut sockets);
    }
    let results: Vec<(String, Result<(), String>)> = sockets
        .iter()
        .map(|p| {
            let r = UnixStream::connect(p).map(drop).map_err(|e| e.to_string());
            (p.display().to_string(), r)
        })
        .collect();
    if results.is_empty() {
        return Ok(Verdict::held(
            "unix-scan",
            format!("no unix socket under {} ({seen} entries)", args.join(", ")),
        ));
    }
    Ok(unix_verdict("unix-scan", &results))
}

fn walk_sockets(dir: &Path, depth: usize, seen: &mut usize, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        *seen += 1;
        if *seen > SCAN_MAX_ENTRIES {
            return;
        }
        let Ok(ty) = entry.file_type() else { continue };
        if ty.is_socket() {
            out.push(entry.path());
        } else if ty.is_dir() && depth < SCAN_MAX_DEPTH {
            walk_sockets(&entry.path(), depth + 1, seen, out);
        }
    }
}

pub fn abstract_connect(args: &[String]) -> Outcome {
    use std::os::linux::net::SocketAddrExt;
    let [name] = exact(args)?;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| usage(format!("abstract name `{name}`: {e}")))?;
    Ok(match UnixStream::connect_addr(&addr) {
        Ok(_) => Verdict::escaped("abstract-connect", format!("connected to @{name}")),
        Err(e) => Verdict::held("abstract-connect", format!("@{name}: {e}")),
    })
}

pub fn ssh_agent(args: &[String]) -> Outcome {
    let from_env = std::env::var("SSH_AUTH_SOCK").ok().filter(|s| !s.is_empty());
    let mut paths: Vec<String> = from_env.iter().cloned().collect();
    paths.extend(args.iter().cloned());
    if paths.is_empty() {
        return Ok(
            Verdict::held("ssh-agent", "SSH_AUTH_SOCK is not set and no path was given")
                .with(json!({ "SSH_AUTH_SOCK": null })),
        );
    }
    let results: Vec<(String, Result<(), String>)> = paths
        .iter()
        .map(|p| (p.clone(), UnixStream::connect(p).map(drop).map_err(|e| e.to_string())))
        .collect();
    let v = unix_verdict("ssh-agent", &results);
    if let Some(sock) = from_env {
        // The variable alone tells the agent where a host agent lives; it must not be set at all.
        return Ok(Verdict::escaped(
            "ssh-agent",
            format!("SSH_AUTH_SOCK={sock} is set in the bottle"),
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_query_encodes_labels() {
        let q = dns_query("a.bc").unwrap();
        assert_eq!(&q[12..], &[1, b'a', 2, b'b', b'c', 0, 0, 1, 0, 1]);
        assert!(dns_query("a..b").is_err());
    }

    #[test]
    fn port_specs() {
        assert_eq!(ports("22").unwrap(), 22..=22);
        assert_eq!(ports("1-1024").unwrap(), 1..=1024);
        assert!(ports("0").is_err());
        assert!(ports("9-3").is_err());
        assert!(ports("x").is_err());
    }

    #[test]
    fn checksum_of_an_echo_request() {
        // 08 00 0000 0001 0001 → ~(0x0800 + 0x0001 + 0x0001) = 0xf7fd
        assert_eq!(inet_checksum(&[8, 0, 0, 0, 0, 1, 0, 1]), 0xf7fd);
    }
}
