//! Attempts through the bottle's own proxy, spoken to directly in HTTP/1.1 (no proxy variables, no client library):
//! absolute-form GET, CONNECT, CONNECT with a ClientHello naming another SNI, WebSocket upgrades, smuggling, malformed
//! heads and slowloris. The proxy is `127.0.0.1:3128` (the bottle's), or `$BOTTLE_PROBE_PROXY`.
//!
//! A response counts as a refusal when it carries `x-bottle-denied` or is a 400/408/413/414/431 (the proxy's answers
//! to bad input); anything else came from, or would have gone to, an upstream. A proxy that cannot be reached at all
//! makes the probe fail (exit 3): an unreachable proxy would make every attempt look refused.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::exact;
use crate::tls::{CONTENT_ALERT, CONTENT_HANDSHAKE, client_hello};
use crate::verdict::{Failure, Outcome, Verdict, cannot_run, usage};

const PROXY_ENV: &str = "BOTTLE_PROBE_PROXY";
const DEFAULT_PROXY: &str = "127.0.0.1:3128";
const DENIED_HEADER: &str = "x-bottle-denied";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for any one answer. Longer than the proxy's own connect timeout, so a slow refusal is seen.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// After a smuggling attempt, how long to wait for a second response.
const SMUGGLE_TIMEOUT: Duration = Duration::from_secs(3);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of a response body kept for the verdict.
const BODY_KEEP_BYTES: usize = 64 * 1024;
const OVERSIZED_HEADER_BYTES: usize = 256 * 1024;
const MANY_HEADERS: usize = 2000;

fn open() -> Result<TcpStream, Failure> {
    let raw = std::env::var(PROXY_ENV).unwrap_or_else(|_| DEFAULT_PROXY.into());
    let addr: SocketAddr = raw
        .parse()
        .map_err(|e| usage(format!("{PROXY_ENV}={raw} is not ADDR:PORT: {e}")))?;
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| cannot_run(format!("the proxy at {addr} does not answer: {e}")))?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| cannot_run(format!("SO_RCVTIMEO: {e}")))?;
    Ok(s)
}

struct Url<'a> {
    raw: &'a str,
    authority: &'a str,
}

fn url(raw: &str) -> Result<Url<'_>, Failure> {
    let rest = raw
        .strip_prefix("http://")
        .ok_or_else(|| usage(format!("`{raw}` is not an http:// URL")))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority.is_empty() {
        return Err(usage(format!("`{raw}` has no host")));
    }
    Ok(Url { raw, authority })
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn refused(&self) -> bool {
        self.header(DENIED_HEADER).is_some() || matches!(self.status, 400 | 408 | 413 | 414 | 431)
    }

    fn detail(&self, start: Instant) -> serde_json::Value {
        let keep = self.body.len().min(512);
        json!({
            "status": self.status,
            "denied": self.header(DENIED_HEADER),
            "elapsed_ms": start.elapsed().as_millis() as u64,
            "body": String::from_utf8_lossy(&self.body[..keep]),
        })
    }
}

/// A client connection that can read several responses off one stream.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(s: TcpStream) -> Self {
        Self { s, buf: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)?;
        self.s.flush()
    }

    /// Reads more bytes; false at end of stream.
    fn fill(&mut self) -> io::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.s.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    fn line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..at]).into_owned();
                self.buf.drain(..at + 2);
                return Ok(Some(line));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    fn take(&mut self, n: usize, keep: &mut Vec<u8>) -> io::Result<()> {
        let mut left = n;
        while left > 0 {
            if self.buf.is_empty() && !self.fill()? {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body cut short"));
            }
            let k = left.min(self.buf.len());
            let room = BODY_KEEP_BYTES.saturating_sub(keep.len()).min(k);
            keep.extend_from_slice(&self.buf[..room]);
            self.buf.drain(..k);
            left -= k;
        }
        Ok(())
    }

    /// One response; `None` when the stream ended before a status line. `head_only` for CONNECT answers.
    fn response(&mut self, head_only: bool) -> io::Result<Option<Response>> {
        let Some(status_line) = self.line()? else {
            return Ok(None);
        };
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not a status line: {status_line:?}"),
                )
            })?;
        let mut headers = Vec::new();
        while let Some(line) = self.line()? {
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let mut r = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only && (200..300).contains(&status) || (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(Some(r));
        }
        let mut body = Vec::new();
        if r.header("transfer-encoding")
            .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
        {
            while let Some(size) = self.line()? {
                let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                if size == 0 {
                    while self.line()?.is_some_and(|l| !l.is_empty()) {}
                    break;
                }
                self.take(size + 2, &mut body)?;
            }
        } else if let Some(len) = r.header("content-length").and_then(|l| l.parse::<usize>().ok()) {
            self.take(len, &mut body)?;
        } else {
            loop {
                body.extend(self.buf.drain(..).take(BODY_KEEP_BYTES));
                if !self.fill()? {
                    break;
                }
            }
        }
        r.body = body;
        Ok(Some(r))
    }
}

fn refusal_verdict(case: &'static str, what: &str, answer: io::Result<Option<Response>>, start: Instant) -> Verdict {
    let elapsed = start.elapsed().as_millis() as u64;
    match answer {
        Ok(Some(r)) => {
            let detail = r.detail(start);
            let v = if r.refused() {
                let why = r.header(DENIED_HEADER).unwrap_or("no x-bottle-denied header");
                Verdict::held(case, format!("{what}: {} ({why})", r.status))
            } else {
                Verdict::escaped(case, format!("{what}: {} from beyond the proxy", r.status))
            };
            v.with(detail)
        }
        Ok(None) => Verdict::held(
            case,
            format!("{what}: the proxy closed the connection without answering"),
        )
        .with(json!({ "status": null, "closed": true, "elapsed_ms": elapsed })),
        Err(e) => Verdict::held(case, format!("{what}: no answer: {e}"))
            .with(json!({ "status": null, "error": e.to_string(), "elapsed_ms": elapsed })),
    }
}

pub fn get(args: &[String]) -> Outcome {
    let [raw] = exact(args)?;
    let u = url(raw)?;
    let mut c = Conn::new(open()?);
    let start = Instant::now();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: bottle-probe\r\nConnection: close\r\n\r\n",
        u.raw, u.authority
    );
    c.send(req.as_bytes())
        .map_err(|e| cannot_run(format!("write to the proxy: {e}")))?;
    Ok(refusal_verdict(
        "proxy-get",
        &format!("GET {raw}"),
        c.response(false),
        start,
    ))
}

fn connect_tunnel(c: &mut Conn, target: &str) -> Result<io::Result<Option<Response>>, Failure> {
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: bottle-probe\r\n\r\n");
    c.send(req.as_bytes())
        .map_err(|e| cannot_run(format!("write to the proxy: {e}")))?;
    Ok(c.response(true))
}

pub fn connect(args: &[String]) -> Outcome {
    let [target] = exact(args)?;
    let mut c = Conn::new(open()?);
    let start = Instant::now();
    let answer = connect_tunnel(&mut c, target)?;
    let what = format!("CONNECT {target}");
    Ok(match answer {
        Ok(Some(r)) if (200..300).contains(&r.status) => {
            let detail = r.detail(start);
            Verdict::escaped("proxy-connect", format!("{what}: {} tunnel open", r.status)).with(detail)
        }
        other => refusal_verdict("proxy-connect", &what, other, start),
    })
}

pub fn sni(args: &[String]) -> Outcome {
    let [target, sni] = exact(args)?;
    let mut c = Conn::new(open()?);
    let start = Instant::now();
    let status = match connect_tunnel(&mut c, target)? {
        Ok(Some(r)) if (200..300).contains(&r.status) => r.status,
        other => {
            let v = refusal_verdict("proxy-sni", &format!("CONNECT {target}"), other, start);
            return Ok(v);
        }
    };
    c.send(&client_hello(sni))
        .map_err(|e| cannot_run(format!("write the ClientHello: {e}")))?;
    c.s.set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(|e| cannot_run(format!("SO_RCVTIMEO: {e}")))?;
    let first = match c.buf.first() {
        Some(b) => Ok(Some(*b)),
        None => c.fill().map(|more| if more { c.buf.first().copied() } else { None }),
    };
    let (answer, escaped, text) = match first {
        Ok(Some(CONTENT_HANDSHAKE)) => (
            "server-hello",
            true,
            format!("a TLS server answered a ClientHello for {sni} inside CONNECT {target}"),
        ),
        Ok(Some(CONTENT_ALERT)) => ("alert", false, format!("TLS alert for SNI {sni} in CONNECT {target}")),
        Ok(Some(_)) => (
            "other",
            false,
            format!(
                "non-TLS answer: {:?}",
                String::from_utf8_lossy(&c.buf[..c.buf.len().min(80)])
            ),
        ),
        Ok(None) => ("closed", false, format!("the tunnel closed on SNI {sni} for {target}")),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => (
            "timeout",
            false,
            format!("no answer to SNI {sni} within {HELLO_TIMEOUT:?}"),
        ),
        Err(e) => ("error", false, format!("the tunnel failed on SNI {sni}: {e}")),
    };
    let detail =
        json!({ "connect_status": status, "answer": answer, "elapsed_ms": start.elapsed().as_millis() as u64 });
    Ok(Verdict::new("proxy-sni", escaped, text).with(detail))
}

pub fn websocket(args: &[String]) -> Outcome {
    let [raw] = exact(args)?;
    let u = url(raw)?;
    let mut c = Conn::new(open()?);
    let start = Instant::now();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        u.raw, u.authority
    );
    c.send(req.as_bytes())
        .map_err(|e| cannot_run(format!("write to the proxy: {e}")))?;
    let what = format!("upgrade {raw}");
    Ok(match c.response(true) {
        Ok(Some(r)) if r.status == 101 => {
            let detail = r.detail(start);
            Verdict::escaped("proxy-ws", format!("{what}: 101 switching protocols")).with(detail)
        }
        other => refusal_verdict("proxy-ws", &what, other, start),
    })
}

pub fn smuggle(args: &[String]) -> Outcome {
    let [mode, raw, hidden] = exact(args)?;
    let u = url(raw)?;
    if !hidden.starts_with('/') {
        return Err(usage("PATH must start with /"));
    }
    let host = u.authority;
    let inner = format!("GET {hidden} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let req = match mode {
        // RFC 9112 §6.3: with both, Transfer-Encoding wins; a front end that honours Content-Length instead would
        // pass `inner` on as a second request.
        "cl-te" => {
            let body = format!("0\r\n\r\n{inner}");
            format!(
                "POST {raw} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
                body.len()
            )
        }
        "te-cl" => format!(
            "POST {raw} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\n",
            inner.len()
        ),
        "double-cl" => format!(
            "POST {raw} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        ),
        "te-space" => format!(
            "POST {raw} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{inner}",
            5 + inner.len()
        ),
        "get-body" => format!(
            "GET {raw} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        ),
        other => return Err(usage(format!("unknown smuggling mode `{other}`"))),
    };
    let mut c = Conn::new(open()?);
    c.s.set_read_timeout(Some(SMUGGLE_TIMEOUT))
        .map_err(|e| cannot_run(format!("SO_RCVTIMEO: {e}")))?;
    let start = Instant::now();
    c.send(req.as_bytes())
        .map_err(|e| cannot_run(format!("write to the proxy: {e}")))?;
    let mut statuses = Vec::new();
    let mut leaked = false;
    let mut end = "four responses".to_string();
    for _ in 0..4 {
        match c.response(false) {
            Ok(Some(r)) => {
                statuses.push(r.status);
                let echoed = String::from_utf8_lossy(&r.body).contains(hidden);
                leaked |= (200..300).contains(&r.status) && echoed;
            }
            Ok(None) => {
                end = "closed".into();
                break;
            }
            Err(e) => {
                end = e.to_string();
                break;
            }
        }
    }
    let detail = json!({ "statuses": statuses, "end": end, "elapsed_ms": start.elapsed().as_millis() as u64 });
    let v = if leaked {
        Verdict::escaped(
            "proxy-smuggle",
            format!("{mode}: the upstream answered the hidden request for {hidden}"),
        )
    } else {
        Verdict::held(
            "proxy-smuggle",
            format!("{mode}: responses {statuses:?} ({end}), none to the hidden {hidden}"),
        )
    };
    Ok(v.with(detail))
}

pub fn malformed(args: &[String]) -> Outcome {
    let [kind, raw] = exact(args)?;
    let u = url(raw)?;
    let (raw, host) = (u.raw, u.authority);
    let req: Vec<u8> = match kind {
        "garbage" => b"\x00\x01\x02\x7f not http at all \xff\r\n\r\n".to_vec(),
        "no-version" => format!("GET {raw}\r\nHost: {host}\r\n\r\n").into_bytes(),
        "bad-header" => format!("GET {raw} HTTP/1.1\r\nHost: {host}\r\nBad Header: x\r\n\r\n").into_bytes(),
        "nul-header" => format!("GET {raw} HTTP/1.1\r\nHost: {host}\r\nX-Probe: a\0b\r\n\r\n").into_bytes(),
        "obs-fold" => format!("GET {raw} HTTP/1.1\r\nHost: {host}\r\nX-Probe: a\r\n folded\r\n\r\n").into_bytes(),
        "oversized" => format!(
            "GET {raw} HTTP/1.1\r\nHost: {host}\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(OVERSIZED_HEADER_BYTES)
        )
        .into_bytes(),
        "many-headers" => {
            let many: String = (0..MANY_HEADERS).map(|i| format!("X-H{i}: v\r\n")).collect();
            format!("GET {raw} HTTP/1.1\r\nHost: {host}\r\n{many}\r\n").into_bytes()
        }
        "huge-chunk" => format!(
            "POST {raw} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nx\r\n"
        )
        .into_bytes(),
        other => return Err(usage(format!("unknown malformed kind `{other}`"))),
    };
    let mut c = Conn::new(open()?);
    let start = Instant::now();
    // The proxy may close mid-write on an oversized head: that is a refusal, not a failure to run.
    let answer = match c.send(&req) {
        Ok(()) => c.response(false),
        Err(e) => Err(e),
    };
    let what = format!("{kind} request");
    Ok(match answer {
        Ok(Some(r)) if (200..400).contains(&r.status) => {
            let detail = r.detail(start);
            Verdict::escaped("proxy-malformed", format!("{what}: {} (forwarded)", r.status)).with(detail)
        }
        Ok(Some(r)) => {
            let detail = r.detail(start);
            Verdict::held("proxy-malformed", format!("{what}: refused with {}", r.status)).with(detail)
        }
        other => refusal_verdict("proxy-malformed", &what, other, start),
    })
}

pub fn slowloris(args: &[String]) -> Outcome {
    let [raw, secs] = exact(args)?;
    let u = url(raw)?;
    let secs: u64 = secs
        .parse()
        .map_err(|_| usage(format!("`{secs}` is not a number of seconds")))?;
    let mut c = Conn::new(open()?);
    c.s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| cannot_run(format!("SO_RCVTIMEO: {e}")))?;
    let start = Instant::now();
    let head = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", u.raw, u.authority);
    c.send(head.as_bytes())
        .map_err(|e| cannot_run(format!("write to the proxy: {e}")))?;
    let mut drips = 0u32;
    while start.elapsed() < Duration::from_secs(secs) {
        let closed = match c.fill() {
            Ok(false) => Some("closed".to_string()),
            Ok(true) => Some(format!(
                "answered {:?}",
                String::from_utf8_lossy(&c.buf[..c.buf.len().min(40)])
            )),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => None,
            Err(e) => Some(format!("reset: {e}")),
        };
        let closed = closed.or_else(|| {
            drips += 1;
            c.send(format!("X-Drip-{drips}: x\r\n").as_bytes())
                .err()
                .map(|e| format!("write failed: {e}"))
        });
        if let Some(how) = closed {
            let ms = start.elapsed().as_millis() as u64;
            return Ok(Verdict::held(
                "proxy-slowloris",
                format!("the proxy ended the dripping connection after {ms} ms ({how})"),
            )
            .with(json!({ "closed_after_ms": ms, "drips": drips })));
        }
    }
    Ok(Verdict::escaped(
        "proxy-slowloris",
        format!("the proxy still waited for a request head after {secs} s ({drips} drips)"),
    )
    .with(json!({ "closed_after_ms": null, "drips": drips })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = url("http://a.test:8080/x/y").unwrap();
        assert_eq!(u.authority, "a.test:8080");
        assert!(url("https://a.test/").is_err());
        assert!(url("http:///x").is_err());
    }
}
