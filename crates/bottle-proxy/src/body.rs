//! Bodies the proxy relays: one boxed type for every response and upstream request, and a wrapper that counts the
//! bytes it passes and keeps the exchange's audit record alive until both bodies are done.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

use crate::audit::Pending;

pub use crate::secrets::BodyError;

/// Errors of a relayed body: hyper's, or a scanner that stopped a real credential value (`secrets`).
pub type ProxyBody = UnsyncBoxBody<Bytes, BodyError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Up,
    Down,
}

/// Counts data bytes into the pending audit record.
pub struct Metered<B> {
    inner: B,
    pending: Arc<Pending>,
    direction: Direction,
}

impl<B> Metered<B> {
    pub fn new(inner: B, pending: Arc<Pending>, direction: Direction) -> Self {
        Self {
            inner,
            pending,
            direction,
        }
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let counter = match self.direction {
                Direction::Up => &self.pending.up,
                Direction::Down => &self.pending.down,
            };
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub fn metered<B>(inner: B, pending: &Arc<Pending>, direction: Direction) -> ProxyBody
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin + Send + 'static,
{
    Metered::new(inner, Arc::clone(pending), direction)
        .map_err(BodyError::Hyper)
        .boxed_unsync()
}

/// The client side of an upgraded or passthrough stream, counted into the pending audit record: bytes read from
/// the client go up, bytes written to it come down. Counts survive an abrupt end (unlike `copy_bidirectional`'s).
pub struct MeteredIo<S> {
    inner: S,
    pending: Arc<Pending>,
}

impl<S> MeteredIo<S> {
    pub fn new(inner: S, pending: Arc<Pending>) -> Self {
        Self { inner, pending }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for MeteredIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.pending.up.fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for MeteredIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            self.pending.down.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
