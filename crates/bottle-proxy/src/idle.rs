//! Idle timeouts: an I/O wrapper stamps the last time bytes moved, and `watch` ends a connection's future when no
//! byte moved for the idle limit (slowloris on a kept-alive or upgraded connection, a stalled tunnel).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
// tokio's clock: the same as std's in production, and pausable in tests.
use tokio::time::Instant;

/// When bytes last moved on one client connection (and everything spliced onto it).
#[derive(Clone)]
pub struct Activity {
    inner: Arc<(Instant, AtomicU64)>,
}

impl Activity {
    pub fn new() -> Self {
        Self {
            inner: Arc::new((Instant::now(), AtomicU64::new(0))),
        }
    }

    pub fn touch(&self) {
        let ms = u64::try_from(self.inner.0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.inner.1.store(ms, Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.inner.1.load(Ordering::Relaxed));
        self.inner.0.elapsed().saturating_sub(last)
    }
}

/// Runs `fut` until it ends or the connection has been idle for `idle`; `None` means it was cut off.
pub async fn watch<F: Future>(fut: F, activity: &Activity, idle: Duration) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        let remaining = idle.saturating_sub(activity.idle_for());
        if remaining.is_zero() {
            return None;
        }
        tokio::select! {
            out = &mut fut => return Some(out),
            () = tokio::time::sleep(remaining) => {}
        }
    }
}

/// Stamps `activity` whenever bytes are read or written.
pub struct Tracked<S> {
    inner: S,
    activity: Activity,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, activity: Activity) -> Self {
        activity.touch();
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_cut_and_active_ones_are_not() {
        let activity = Activity::new();
        let cut = watch(std::future::pending::<()>(), &activity, Duration::from_secs(5)).await;
        assert!(cut.is_none());
        let activity = Activity::new();
        let done = watch(async { 7 }, &activity, Duration::from_secs(5)).await;
        assert_eq!(done, Some(7));
    }
}
