//! The real credential values, searched for in the bytes that cross the proxy as a stream: response bodies from
//! credentialed hosts (an upstream that echoes the token it was given), upgraded streams (WebSocket messages) and
//! request bodies (a request that carries the real value, which the bottle must never hold).
//!
//! SECURITY: the search spans chunk boundaries. Only a tail that could still start a match is held back, so a
//! stream that never contains a value is delayed by nothing (an SSE event is relayed as soon as it arrives).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// One real value and what replaces it on the way to the bottle.
#[derive(Clone)]
pub struct Needle {
    pub env: String,
    pub value: Vec<u8>,
    pub placeholder: Vec<u8>,
}

/// A real value was found where it must not pass.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the stream carries the real value of credential `{env}`")]
pub struct Found {
    pub env: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Replace each real value by its placeholder (response bodies).
    Redact,
    /// Stop at the first real value, before any byte of it passes (request bodies, upgraded streams).
    Refuse,
}

pub struct Scanner {
    needles: Arc<[Needle]>,
    mode: Mode,
    held: Vec<u8>,
}

impl Scanner {
    pub fn new(needles: Arc<[Needle]>, mode: Mode) -> Self {
        Self {
            needles,
            mode,
            held: Vec::new(),
        }
    }

    /// Takes the next bytes of the stream; returns the bytes that may pass now.
    pub fn feed(&mut self, input: &[u8]) -> Result<Vec<u8>, Found> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(input);
        let mut out = Vec::with_capacity(buf.len());
        let mut rest: &[u8] = &buf;
        loop {
            let earliest = self
                .needles
                .iter()
                .filter_map(|n| memchr::memmem::find(rest, &n.value).map(|at| (at, n)))
                .min_by_key(|(at, _)| *at);
            let Some((at, needle)) = earliest else { break };
            if self.mode == Mode::Refuse {
                return Err(Found {
                    env: needle.env.clone(),
                });
            }
            out.extend_from_slice(&rest[..at]);
            out.extend_from_slice(&needle.placeholder);
            rest = &rest[at + needle.value.len()..];
        }
        let hold = self.partial_match_len(rest);
        out.extend_from_slice(&rest[..rest.len() - hold]);
        self.held = rest[rest.len() - hold..].to_vec();
        Ok(out)
    }

    /// True when `input` can pass exactly as it is (nothing held, no value in it, no value starting at its end):
    /// the common case, which then costs one search and no copy.
    pub fn passes_whole(&self, input: &[u8]) -> bool {
        self.held.is_empty()
            && self
                .needles
                .iter()
                .all(|n| memchr::memmem::find(input, &n.value).is_none())
            && self.partial_match_len(input) == 0
    }

    /// The end of the stream: whatever was held back cannot start a match any more.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    /// The longest tail of `data` that is a proper prefix of some value (it may complete in the next chunk).
    fn partial_match_len(&self, data: &[u8]) -> usize {
        let mut longest = 0;
        for n in self.needles.iter() {
            let max = (n.value.len() - 1).min(data.len());
            for len in (longest + 1..=max).rev() {
                if data.ends_with(&n.value[..len]) {
                    longest = len;
                    break;
                }
            }
        }
        longest
    }
}

/// Called once when a `Refuse` scanner stops a body (to audit it).
pub type OnFound = Box<dyn FnOnce(&Found) + Send>;

/// A body passed through a `Scanner`. In `Refuse` mode a match ends the body with an error, so the peer never
/// sees a complete message.
pub struct Scanned<B> {
    inner: B,
    scanner: Scanner,
    done: bool,
    trailers: Option<Frame<Bytes>>,
    on_found: Option<OnFound>,
}

impl<B> Scanned<B> {
    pub fn new(inner: B, scanner: Scanner, on_found: OnFound) -> Self {
        Self {
            inner,
            scanner,
            done: false,
            trailers: None,
            on_found: Some(on_found),
        }
    }
}

/// Why a relayed body stopped: the transport failed, or a scanner stopped a real value.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    Secret(#[from] Found),
}

impl<B> Body for Scanned<B>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            if let Some(trailers) = self.trailers.take() {
                self.done = true;
                return Poll::Ready(Some(Ok(trailers)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    self.done = true;
                    let tail = self.scanner.finish();
                    if tail.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(trailers) => {
                    // Trailers end the data: release what was held, then the trailers on the next poll.
                    let tail = self.scanner.finish();
                    self.trailers = Some(trailers);
                    if tail.is_empty() {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
                }
            };
            if self.scanner.passes_whole(&data) {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            match self.scanner.feed(&data) {
                Ok(out) if out.is_empty() => continue,
                Ok(out) => return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out))))),
                Err(found) => {
                    self.done = true;
                    if let Some(report) = self.on_found.take() {
                        report(&found);
                    }
                    return Poll::Ready(Some(Err(BodyError::Secret(found))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // The length can change (a value and its placeholder differ in length).
        SizeHint::default()
    }
}

/// The read side of an upgraded stream from the upstream, stopped before a real value reaches the bottle.
pub struct GuardedRead<S> {
    inner: S,
    scanner: Scanner,
    ready: Vec<u8>,
    at: usize,
    failed: Option<Found>,
}

impl<S> GuardedRead<S> {
    pub fn new(inner: S, scanner: Scanner) -> Self {
        Self {
            inner,
            scanner,
            ready: Vec::new(),
            at: 0,
            failed: None,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for GuardedRead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if let Some(found) = &self.failed {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    found.clone(),
                )));
            }
            if self.at < self.ready.len() {
                let n = (self.ready.len() - self.at).min(buf.remaining());
                let at = self.at;
                buf.put_slice(&self.ready[at..at + n]);
                self.at += n;
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut read = tokio::io::ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    let tail = self.scanner.finish();
                    if tail.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    self.ready = tail;
                    self.at = 0;
                }
                Poll::Ready(Ok(())) => {
                    let filled = read.filled().to_vec();
                    match self.scanner.feed(&filled) {
                        Ok(out) => {
                            self.ready = out;
                            self.at = 0;
                        }
                        Err(found) => self.failed = Some(found),
                    }
                }
            }
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for GuardedRead<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needles() -> Arc<[Needle]> {
        Arc::from(vec![Needle {
            env: "API_KEY".into(),
            value: b"s3cret-value".to_vec(),
            placeholder: b"bottle-placeholder-api-key-00".to_vec(),
        }])
    }

    fn redact_in_chunks(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut s = Scanner::new(needles(), Mode::Redact);
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            out.extend(s.feed(c).unwrap());
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn a_value_split_across_every_chunk_boundary_is_redacted() {
        let input = b"{\"echo\":\"Bearer s3cret-value\",\"again\":\"s3cret-value\",\"near\":\"s3cret-valu\"}";
        let want = String::from_utf8_lossy(input).replace("s3cret-value", "bottle-placeholder-api-key-00");
        for chunk in 1..input.len() {
            assert_eq!(
                String::from_utf8(redact_in_chunks(input, chunk)).unwrap(),
                want,
                "{chunk}"
            );
        }
    }

    #[test]
    fn bytes_that_cannot_start_a_match_are_not_held_back() {
        let mut s = Scanner::new(needles(), Mode::Redact);
        assert_eq!(s.feed(b"data: hello\n\n").unwrap(), b"data: hello\n\n");
        assert_eq!(s.feed(b"data: s3c").unwrap(), b"data: ");
        assert_eq!(s.feed(b"ond\n").unwrap(), b"s3cond\n");
    }

    #[test]
    fn clean_chunks_pass_whole_and_a_chunk_ending_in_a_prefix_does_not() {
        let s = Scanner::new(needles(), Mode::Redact);
        assert!(s.passes_whole(b"nothing to see"));
        assert!(!s.passes_whole(b"ends in s3cr"));
        assert!(!s.passes_whole(b"has s3cret-value inside"));
    }

    #[test]
    fn refuse_mode_stops_before_the_value_passes() {
        let mut s = Scanner::new(needles(), Mode::Refuse);
        let first = s.feed(b"abc s3cret-").unwrap();
        assert_eq!(first, b"abc ");
        assert_eq!(s.feed(b"value").unwrap_err().env, "API_KEY");
    }
}
