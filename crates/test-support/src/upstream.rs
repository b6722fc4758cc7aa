//! Recorded local upstreams on std threads: a tiny HTTP/1.1 keep-alive server on 127.0.0.1:0, plain or over TLS,
//! that answers every request with `hello from <label> upstream: <method> <target>` (and `x-upstream: <label>`),
//! reads and drops a `Content-Length` body, and counts the connections it accepted and the requests it answered. For tests that drive the real binary; the proxy's own tests, which need HTTP/2,
//! h2c and WebSocket upstreams, keep theirs in `bottle-proxy/tests/fixture`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A running upstream: its port and its counts.
pub struct Upstream {
    pub port: u16,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    connections: AtomicUsize,
    requests: AtomicUsize,
}

impl Upstream {
    /// TCP connections accepted so far, whether or not a request followed: proves nothing else connected.
    pub fn connections(&self) -> usize {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.counts.requests.load(Ordering::SeqCst)
    }
}

/// A plain HTTP upstream, labelled `plain`.
pub fn http() -> Upstream {
    spawn(|stream, counts| serve_http(&mut { stream }, "plain", &counts))
}

/// A TLS upstream, labelled `tls`, presenting `config` (see `ca::server_config`).
pub fn https(config: Arc<rustls::ServerConfig>) -> Upstream {
    spawn(move |stream, counts| {
        let Ok(conn) = rustls::ServerConnection::new(Arc::clone(&config)) else {
            return;
        };
        serve_http(&mut rustls::StreamOwned::new(conn, stream), "tls", &counts);
    })
}

/// A port nothing listens on right now (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn<F>(serve: F) -> Upstream
where
    F: Fn(std::net::TcpStream, Arc<Counts>) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let counts = Arc::new(Counts::default());
    let counter = Arc::clone(&counts);
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            counter.connections.fetch_add(1, Ordering::SeqCst);
            let (serve, counter) = (Arc::clone(&serve), Arc::clone(&counter));
            std::thread::spawn(move || serve(stream, counter));
        }
    });
    Upstream { port, counts }
}

/// Answers every request until the client closes. A body is framed by `Content-Length` only (chunked requests are
/// not expected).
fn serve_http<S: Read + Write>(stream: &mut S, label: &str, counts: &Counts) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let mut body_left = content_length(&head);
        while body_left > 0 {
            if buf.is_empty() {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let take = body_left.min(buf.len());
            buf.drain(..take);
            body_left -= take;
        }
        counts.requests.fetch_add(1, Ordering::SeqCst);
        let mut words = head.lines().next().unwrap_or("").split(' ');
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let body = format!("hello from {label} upstream: {method} {target}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-upstream: {label}\r\n\r\n{body}",
            body.len()
        );
        if stream
            .write_all(response.as_bytes())
            .and_then(|()| stream.flush())
            .is_err()
        {
            return;
        }
    }
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    #[test]
    fn a_body_is_read_past_and_the_next_request_on_the_connection_is_answered() {
        let up = super::http();
        let mut s = TcpStream::connect(("127.0.0.1", up.port)).unwrap();
        s.write_all(
            b"POST /leak HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nsecretGET /next HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .unwrap();
        let want = "hello from plain upstream: GET /next\n";
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        while !String::from_utf8_lossy(&got).ends_with(want) {
            let n = s.read(&mut chunk).unwrap();
            assert_ne!(n, 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(String::from_utf8_lossy(&got).contains("hello from plain upstream: POST /leak\n"));
        assert_eq!((up.connections(), up.requests()), (1, 2));
    }
}
