//! A request-smuggling guard under hyper's HTTP/1.1 server: it follows the message framing of the client's byte
//! stream on its own and fails the read (closing the connection before hyper sees the head) when a request carries
//! both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.1: "a server MAY reject such a request").
//!
//! hyper alone would process such a request as chunked and close afterwards; rejecting it outright means no byte
//! of it reaches an upstream. The guard only ever refuses: when it cannot follow the framing (an upgrade,
//! CONNECT, an encoding hyper will reject) it stops inspecting and leaves the decision to hyper.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// A head longer than this is hyper's to refuse (431); the guard stops following.
const MAX_TRACKED_HEAD: usize = 80 * 1024;
/// Longest chunk-size line followed (hyper accepts 16 KiB of chunk extensions in all); longer is refused.
const MAX_CHUNK_LINE: usize = 64 * 1024;

/// The error a guarded read fails with.
#[derive(Debug, thiserror::Error)]
#[error("request framing refused: {0}")]
pub struct FramingViolation(pub &'static str);

enum State {
    Head(Vec<u8>),
    Fixed(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers(Vec<u8>),
    Opaque,
}

pub struct Tracker {
    state: State,
}

impl Tracker {
    pub fn new() -> Self {
        Self {
            state: State::Head(Vec::new()),
        }
    }

    /// Feeds bytes the client sent, in order.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), FramingViolation> {
        while !data.is_empty() {
            let state = std::mem::replace(&mut self.state, State::Opaque);
            let (next, used) = match state {
                State::Opaque => return Ok(()),
                State::Head(mut buf) => {
                    let b = data[0];
                    if buf.is_empty() && (b == b'\r' || b == b'\n') {
                        (State::Head(buf), 1) // RFC 9112 §2.2: empty lines before a request line are ignored
                    } else {
                        buf.push(b);
                        if buf.ends_with(b"\r\n\r\n") || buf.ends_with(b"\n\n") {
                            (head_done(&buf)?, 1)
                        } else if buf.len() > MAX_TRACKED_HEAD {
                            (State::Opaque, 1)
                        } else {
                            (State::Head(buf), 1)
                        }
                    }
                }
                State::Fixed(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    let left = n - take as u64;
                    (
                        if left == 0 {
                            State::Head(Vec::new())
                        } else {
                            State::Fixed(left)
                        },
                        take,
                    )
                }
                State::ChunkSize(mut line) => {
                    line.push(data[0]);
                    if line.ends_with(b"\n") {
                        (chunk_size(&line), 1)
                    } else if line.len() > MAX_CHUNK_LINE {
                        // SECURITY: never stop following on input hyper still accepts (it allows 16 KiB of chunk
                        // extensions); a line longer than anything hyper takes is refused, not waved through.
                        return Err(FramingViolation("chunk-size line too long"));
                    } else {
                        (State::ChunkSize(line), 1)
                    }
                }
                State::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    let left = n - take as u64;
                    (
                        if left == 0 {
                            State::ChunkEnd(2)
                        } else {
                            State::ChunkData(left)
                        },
                        take,
                    )
                }
                State::ChunkEnd(n) => match (n, data[0]) {
                    (2, b'\r') => (State::ChunkEnd(1), 1),
                    (_, b'\n') => (State::ChunkSize(Vec::new()), 1),
                    _ => (State::Opaque, 1), // hyper rejects a missing CRLF
                },
                State::Trailers(mut buf) => {
                    buf.push(data[0]);
                    let end = buf == b"\r\n" || buf == b"\n" || buf.ends_with(b"\r\n\r\n") || buf.ends_with(b"\n\n");
                    if end {
                        (State::Head(Vec::new()), 1)
                    } else if buf.len() > MAX_TRACKED_HEAD {
                        (State::Opaque, 1)
                    } else {
                        (State::Trailers(buf), 1)
                    }
                }
            };
            self.state = next;
            data = &data[used..];
        }
        Ok(())
    }
}

/// Whether an HTTP/1.x request carries an `Upgrade` header: the guard stops following the stream at such a head
/// (after a 101 the bytes are no longer HTTP), so the connection must not carry another request unless it
/// really switched protocols.
pub fn stops_the_guard<B>(req: &hyper::Request<B>) -> bool {
    req.version() <= hyper::Version::HTTP_11 && req.headers().contains_key(hyper::header::UPGRADE)
}

/// SECURITY: after a request the guard stopped following, any answer but a 101 closes the connection, so no later
/// request (say, a pipelined CL+TE one) is read unguarded.
pub fn close_unless_switched<B>(guard_stopped: bool, resp: &mut hyper::Response<B>) {
    if guard_stopped && resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        resp.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
}

fn head_done(head: &[u8]) -> Result<State, FramingViolation> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let method = lines.next().and_then(|l| l.split(' ').next()).unwrap_or("");
    let (mut lengths, mut chunked, mut te, mut upgrade) = (Vec::new(), false, false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => lengths.push(value.to_string()),
            "transfer-encoding" => {
                te = true;
                chunked = value.to_ascii_lowercase().trim_end().ends_with("chunked");
            }
            "upgrade" => upgrade = true,
            _ => {}
        }
    }
    if te && !lengths.is_empty() {
        return Err(FramingViolation("both Content-Length and Transfer-Encoding"));
    }
    if method == "CONNECT" || upgrade {
        return Ok(State::Opaque);
    }
    if te {
        return Ok(if chunked {
            State::ChunkSize(Vec::new())
        } else {
            State::Opaque
        });
    }
    match lengths.first().map(|l| l.parse::<u64>()) {
        None | Some(Ok(0)) => Ok(State::Head(Vec::new())),
        Some(Ok(n)) => Ok(State::Fixed(n)),
        Some(Err(_)) => Ok(State::Opaque),
    }
}

fn chunk_size(line: &[u8]) -> State {
    let text = String::from_utf8_lossy(line);
    let digits = text.trim_end().split(';').next().unwrap_or("").trim();
    match u64::from_str_radix(digits, 16) {
        Ok(0) => State::Trailers(Vec::new()),
        Ok(n) if !digits.is_empty() && digits.len() <= 16 => State::ChunkData(n),
        _ => State::Opaque,
    }
}

/// Called once when the guard refuses a request (hyper sees only a closed stream, so the guard reports).
pub type OnViolation = Box<dyn FnOnce(&FramingViolation) + Send>;

/// The client stream, guarded.
pub struct Guarded<S> {
    inner: S,
    tracker: Tracker,
    on_violation: Option<OnViolation>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, on_violation: OnViolation) -> Self {
        Self {
            inner,
            tracker: Tracker::new(),
            on_violation: Some(on_violation),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let fresh = buf.filled()[before..].to_vec();
            if let Err(v) = self.tracker.feed(&fresh) {
                // Withhold the offending bytes from hyper: the head is never parsed, nothing is forwarded.
                buf.set_filled(before);
                if let Some(report) = self.on_violation.take() {
                    report(&v);
                }
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, v)));
            }
        }
        polled
    }
}

crate::write_through::write_through!(Guarded);

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(chunks: &[&[u8]]) -> Result<(), FramingViolation> {
        let mut t = Tracker::new();
        chunks.iter().try_for_each(|c| t.feed(c))
    }

    #[test]
    fn cl_and_te_together_are_refused_in_either_order() {
        let a = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(feed_all(&[a]).is_err());
        let b = b"POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n";
        assert!(feed_all(&[b]).is_err());
    }

    #[test]
    fn smuggling_in_a_second_pipelined_request_is_found_after_bodies() {
        let first = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let chunked =
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\nT: 1\r\n\r\n";
        let bad = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(feed_all(&[first, chunked]).is_ok());
        assert!(feed_all(&[first, chunked, bad]).is_err());
        // Byte by byte gives the same answer.
        let all: Vec<u8> = [&first[..], &chunked[..], &bad[..]].concat();
        let mut t = Tracker::new();
        assert!(all.iter().try_for_each(|b| t.feed(std::slice::from_ref(b))).is_err());
    }

    #[test]
    fn bodies_that_look_like_heads_are_not_inspected() {
        let body = b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let head = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
        assert!(feed_all(&[head.as_bytes(), body, b"GET / HTTP/1.1\r\n\r\n"]).is_ok());
    }

    #[test]
    fn connect_and_upgrades_stop_inspection() {
        let connect = b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n";
        let tls_junk = b"\x16\x03\x01\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(feed_all(&[connect, tls_junk]).is_ok());
    }
}
