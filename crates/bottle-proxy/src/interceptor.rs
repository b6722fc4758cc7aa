//! smolvm's egress interceptor (research/smolvm.md §3.4): with `machine start --egress-interceptor 127.0.0.N:PORT`,
//! smolvm connects to the bottle's listener once per guest TCP flow and writes a prelude carrying the bottle's token and
//! the flow's original destination; after our one-byte answer the socket carries the guest's bytes. Trusts nothing that
//! connects: a flow without the exact prelude and token is answered with a refusal, closed and audited, never tunnelled.
//!
//! The prelude (reverse-engineered from smolvm 1.32.2; IPv4 observed, IPv6 inferred):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `SMOLICPT` |
//! | 1 | version `0x01` |
//! | 32 | token: the raw bytes of the 64 hex digits in `SMOLVM_INTERCEPTOR_TOKEN` |
//! | 1 | address family: `0x04` (IPv4) or `0x06` (IPv6, not observed) |
//! | 2 | destination port, big-endian |
//! | 4 or 16 | destination address |
//!
//! Answer: one byte, `0x00` = accept, anything else = refuse (the guest sees its flow closed).
//!
//! Routing: a flow to the guest's gateway on the proxy port is the guest using its configured proxy URL
//! (`http://100.96.0.1:PORT`): it is served as an explicit proxy connection (absolute-form HTTP, CONNECT). A flow to
//! the gateway on any other port would reach the host's own loopback services and is refused. Every other flow is
//! served in transparent mode (SNI or `Host`, same policy and audit as everything else).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::audit::{self, Event, Verdict};
use crate::listener::{accept_failed, serve_explicit};
use crate::proxy::{Proxy, ProxyError};
use crate::session::Peer;

/// First bytes of every prelude.
pub const PRELUDE_MAGIC: [u8; 8] = *b"SMOLICPT";
/// The only prelude version smolvm 1.32.2 sends.
pub const PRELUDE_VERSION: u8 = 0x01;
pub const FAMILY_IPV4: u8 = 0x04;
pub const FAMILY_IPV6: u8 = 0x06;
/// Our answer after a valid prelude: the flow is ours.
pub const ACCEPT: u8 = 0x00;
/// Our answer to anything else (smolvm treats every byte but `ACCEPT` as a refusal).
pub const REFUSE: u8 = 0x01;
/// Bytes in the token (smolvm takes 64 hex digits).
pub const TOKEN_BYTES: usize = 32;
/// Magic, version, token and family: what is read before the address length is known.
const HEAD_BYTES: usize = PRELUDE_MAGIC.len() + 1 + TOKEN_BYTES + 1;
/// How long a connection may take to deliver its whole prelude (smolvm writes it at once).
pub const PRELUDE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on writing the refusal byte to a peer that does not read.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// The audit event of every refused flow.
pub const REFUSED_EVENT: &str = "interceptor-refused";

/// One bottle's interceptor: the token smolvm must present, and the guest-visible address of the explicit proxy.
#[derive(Clone)]
pub struct Interceptor {
    token: [u8; TOKEN_BYTES],
    gateway: SocketAddrV4,
    prelude_timeout: Duration,
}

impl Interceptor {
    /// `gateway` is what the guest's proxy URL names, e.g. `100.96.0.1:PORT`.
    pub fn new(token: [u8; TOKEN_BYTES], gateway: SocketAddrV4) -> Self {
        Self {
            token,
            gateway,
            prelude_timeout: PRELUDE_TIMEOUT,
        }
    }

    pub fn with_prelude_timeout(mut self, timeout: Duration) -> Self {
        self.prelude_timeout = timeout;
        self
    }

    pub fn gateway(&self) -> SocketAddrV4 {
        self.gateway
    }
}

impl fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interceptor")
            .field("token", &"<redacted>")
            .field("gateway", &self.gateway)
            .field("prelude_timeout", &self.prelude_timeout)
            .finish()
    }
}

/// Why a flow was refused; `code()` is the audit rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer closed before the whole prelude arrived.
    Truncated,
    /// The prelude did not arrive within the timeout.
    Timeout,
    Magic,
    Version(u8),
    Token,
    Family(u8),
    /// Port 0 or an unspecified address: no real flow has it.
    Destination,
    /// The gateway on a port other than the proxy's: the host's own loopback services.
    GatewayPort(u16),
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Truncated => "prelude-truncated",
            Self::Timeout => "prelude-timeout",
            Self::Magic => "prelude-magic",
            Self::Version(_) => "prelude-version",
            Self::Token => "bad-token",
            Self::Family(_) => "prelude-family",
            Self::Destination => "bad-destination",
            Self::GatewayPort(_) => "gateway-port",
        }
    }
}

/// Where an accepted flow goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The guest's proxy URL: absolute-form HTTP and CONNECT.
    Explicit,
    /// Any other destination: policed by SNI or `Host`.
    Transparent,
}

/// Decides where a flow to `dst` goes, or refuses it.
pub fn route(gateway: SocketAddrV4, dst: SocketAddr) -> Result<Route, Refusal> {
    if dst.port() == 0 || dst.ip().is_unspecified() {
        return Err(Refusal::Destination);
    }
    if dst.ip() != IpAddr::V4(*gateway.ip()) {
        return Ok(Route::Transparent);
    }
    // SECURITY: the gateway is the host's 127.0.0.1 (research/smolvm.md §3.3); only the proxy port is ours to serve.
    if dst.port() != gateway.port() {
        return Err(Refusal::GatewayPort(dst.port()));
    }
    Ok(Route::Explicit)
}

/// Reads and checks one prelude, consuming exactly its bytes; returns the flow's original destination.
pub async fn read_prelude<S: AsyncRead + Unpin>(io: &mut S, token: &[u8; TOKEN_BYTES]) -> Result<SocketAddr, Refusal> {
    let mut head = [0u8; HEAD_BYTES];
    // The magic is no secret: refuse a stranger (an HTTP client, a port scanner) without waiting for 42 bytes.
    read_exact(io, &mut head[..PRELUDE_MAGIC.len()]).await?;
    if head[..PRELUDE_MAGIC.len()] != PRELUDE_MAGIC {
        return Err(Refusal::Magic);
    }
    read_exact(io, &mut head[PRELUDE_MAGIC.len()..]).await?;
    let version = head[PRELUDE_MAGIC.len()];
    let presented = &head[PRELUDE_MAGIC.len() + 1..PRELUDE_MAGIC.len() + 1 + TOKEN_BYTES];
    let family = head[HEAD_BYTES - 1];
    // SECURITY: the token is the only thing that tells smolvm's relay from any other local process that can reach
    // 127.0.0.N; it is compared in constant time so response timing does not leak a prefix.
    if !constant_time_eq(presented, token) {
        return Err(Refusal::Token);
    }
    if version != PRELUDE_VERSION {
        return Err(Refusal::Version(version));
    }
    let mut port = [0u8; 2];
    let ip = match family {
        FAMILY_IPV4 => {
            let mut addr = [0u8; 4];
            read_exact(io, &mut port).await?;
            read_exact(io, &mut addr).await?;
            IpAddr::V4(Ipv4Addr::from(addr))
        }
        FAMILY_IPV6 => {
            let mut addr = [0u8; 16];
            read_exact(io, &mut port).await?;
            read_exact(io, &mut addr).await?;
            IpAddr::V6(Ipv6Addr::from(addr))
        }
        other => return Err(Refusal::Family(other)),
    };
    Ok(SocketAddr::new(ip, u16::from_be_bytes(port)))
}

async fn read_exact<S: AsyncRead + Unpin>(io: &mut S, buf: &mut [u8]) -> Result<(), Refusal> {
    io.read_exact(buf).await.map(drop).map_err(|_| Refusal::Truncated)
}

/// Equal length and equal bytes, looking at every byte whatever the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl Proxy {
    /// Serves smolvm's interceptor connections on `listener` (the bottle's `127.0.0.N:PORT`) until it fails.
    pub async fn serve_interceptor(
        &self,
        listener: std::net::TcpListener,
        interceptor: Interceptor,
    ) -> Result<(), ProxyError> {
        listener.set_nonblocking(true).map_err(ProxyError::Accept)?;
        let listener = TcpListener::from_std(listener).map_err(ProxyError::Accept)?;
        let interceptor = Arc::new(interceptor);
        loop {
            let slot = self.slot().await?;
            let (stream, from) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(e).await?;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let span = tracing::debug_span!("conn", client = %from, mode = "interceptor");
            let flow = intercept(self.clone(), stream, from, Arc::clone(&interceptor), slot);
            tokio::spawn(flow.instrument(span));
        }
    }
}

async fn intercept(
    proxy: Proxy,
    mut stream: TcpStream,
    from: SocketAddr,
    interceptor: Arc<Interceptor>,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let start = Instant::now();
    let prelude = tokio::time::timeout(
        interceptor.prelude_timeout,
        read_prelude(&mut stream, &interceptor.token),
    );
    let dst = match prelude.await {
        Ok(Ok(dst)) => dst,
        Ok(Err(refusal)) => return refuse(&proxy, stream, from, None, refusal, start).await,
        Err(_) => return refuse(&proxy, stream, from, None, Refusal::Timeout, start).await,
    };
    let route = match route(interceptor.gateway, dst) {
        Ok(r) => r,
        Err(refusal) => return refuse(&proxy, stream, from, Some(dst), refusal, start).await,
    };
    if stream.write_all(&[ACCEPT]).await.is_err() {
        return;
    }
    tracing::debug!(original_dst = %dst, ?route, "interceptor flow accepted");
    match route {
        Route::Explicit => serve_explicit(proxy, stream, Peer::new(format!("interceptor:{dst}"), slot)).await,
        Route::Transparent => {
            // `serve_transparent` takes its own connection slot.
            drop(slot);
            proxy.serve_transparent(stream, dst).await;
        }
    }
}

async fn refuse(
    proxy: &Proxy,
    mut stream: TcpStream,
    from: SocketAddr,
    dst: Option<SocketAddr>,
    refusal: Refusal,
    start: Instant,
) {
    tracing::info!(client = %from, ?dst, rule = refusal.code(), "interceptor flow refused");
    let _ = proxy.inner.audit.write(&Event {
        event: REFUSED_EVENT,
        client: Arc::from(format!("interceptor:{from}")),
        host: dst.map(|d| d.ip().to_string()).unwrap_or_default(),
        port: dst.map_or(0, |d| d.port()),
        decision: Verdict::Deny,
        rule: refusal.code().into(),
        duration_ms: audit::elapsed_ms(start),
        ..Event::default()
    });
    // Best effort: the refusal byte tells smolvm at once; the close says the same to anything else.
    let _ = tokio::time::timeout(REFUSE_WRITE_TIMEOUT, stream.write_all(&[REFUSE])).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: [u8; TOKEN_BYTES] = [0x5a; TOKEN_BYTES];
    const GATEWAY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(100, 96, 0, 1), 3128);

    fn prelude(magic: &[u8], version: u8, token: &[u8], family: u8, rest: &[u8]) -> Vec<u8> {
        [magic, &[version], token, &[family], rest].concat()
    }

    async fn parse(bytes: &[u8]) -> Result<SocketAddr, Refusal> {
        let mut io = bytes;
        read_prelude(&mut io, &TOKEN).await
    }

    #[tokio::test]
    async fn the_observed_ipv4_prelude_parses_and_leaves_the_flow_unread() {
        // research/smolvm.md §3.4: `…04 0c38 64600001` = 100.96.0.1:3128.
        let mut bytes = prelude(b"SMOLICPT", 1, &TOKEN, 4, &[0x0c, 0x38, 100, 96, 0, 1]);
        assert_eq!(bytes.len(), 48);
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let mut io = &bytes[..];
        let dst = read_prelude(&mut io, &TOKEN).await.unwrap();
        assert_eq!(dst, "100.96.0.1:3128".parse().unwrap());
        assert_eq!(io, b"GET / HTTP/1.1\r\n");
        let v6 = prelude(
            b"SMOLICPT",
            1,
            &TOKEN,
            6,
            &[[0x01, 0xbb].as_slice(), &[0; 15], &[1]].concat(),
        );
        assert_eq!(parse(&v6).await.unwrap(), "[::1]:443".parse().unwrap());
    }

    #[tokio::test]
    async fn every_malformed_prelude_is_refused_with_its_reason() {
        let dst = [0x01, 0xbb, 93, 184, 216, 34];
        let cases: [(Vec<u8>, Refusal); 7] = [
            (prelude(b"SMOLICPX", 1, &TOKEN, 4, &dst), Refusal::Magic),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), Refusal::Magic),
            (prelude(b"SMOLICPT", 2, &TOKEN, 4, &dst), Refusal::Version(2)),
            (prelude(b"SMOLICPT", 1, &[0x5b; 32], 4, &dst), Refusal::Token),
            (prelude(b"SMOLICPT", 1, &TOKEN, 5, &dst), Refusal::Family(5)),
            (prelude(b"SMOLICPT", 1, &TOKEN, 4, &dst[..5]), Refusal::Truncated),
            (b"SMOLI".to_vec(), Refusal::Truncated),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse(&bytes).await, Err(want), "{bytes:?}");
        }
        // A wrong token is refused before the version or family are looked at.
        assert_eq!(
            parse(&prelude(b"SMOLICPT", 9, &[0; 32], 9, &dst)).await,
            Err(Refusal::Token)
        );
    }

    #[test]
    fn the_gateway_on_the_proxy_port_is_the_explicit_proxy_and_no_other_gateway_port_is_served() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(route(GATEWAY, at("100.96.0.1:3128")), Ok(Route::Explicit));
        assert_eq!(route(GATEWAY, at("100.96.0.1:22")), Err(Refusal::GatewayPort(22)));
        assert_eq!(route(GATEWAY, at("93.184.216.34:443")), Ok(Route::Transparent));
        assert_eq!(route(GATEWAY, at("0.0.0.0:443")), Err(Refusal::Destination));
        assert_eq!(route(GATEWAY, at("93.184.216.34:0")), Err(Refusal::Destination));
    }

    #[test]
    fn tokens_compare_by_value_only() {
        assert!(constant_time_eq(&TOKEN, &TOKEN));
        assert!(!constant_time_eq(&TOKEN, &[0x5a; 31]));
        let mut last = TOKEN;
        last[31] ^= 1;
        assert!(!constant_time_eq(&TOKEN, &last));
        assert!(!format!("{:?}", Interceptor::new(TOKEN, GATEWAY)).contains("5a"));
    }
}
