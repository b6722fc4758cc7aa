//! The one module that resolves names and dials upstreams. Resolve once (the policy's `[resolve]` table first,
//! then the system resolver), check every address, dial exactly a checked address; then TLS (verified against
//! system roots plus the extra CA files) and the HTTP/1.1 or HTTP/2 client handshake.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bottle_policy::address::{PrivateKind, private_kind};
use bottle_policy::{AddressVerdict, Network};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use crate::body::ProxyBody;
use crate::ca::{ALPN_H2, ALPN_HTTP1};
use crate::decide::{DenyReason, Target};

#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("cannot start the system-roots loader")]
    Thread(#[source] std::io::Error),
    #[error("cannot read the upstream CA file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the upstream CA file {path} holds no certificate")]
    Empty { path: PathBuf },
    #[error("no usable root certificates (system store empty and no upstream_ca given)")]
    NoRoots,
    #[error("cannot build the upstream TLS configuration")]
    Tls(#[source] rustls::Error),
}

/// Why an allowed destination could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{host} resolves to {ip}, {}", kind.describe())]
    Private {
        host: String,
        ip: std::net::IpAddr,
        kind: PrivateKind,
    },
    #[error("cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host} has no address")]
    NoAddress { host: String },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("no trusted roots for upstream TLS: {0}")]
    Roots(String),
    #[error("TLS with the upstream failed")]
    Tls(#[source] std::io::Error),
    #[error("HTTP handshake with the upstream failed")]
    Http(#[source] hyper::Error),
}

impl DialError {
    /// A private answer is a policy denial (403); the rest are upstream errors (502).
    pub fn as_denial(&self) -> Option<DenyReason> {
        match self {
            Self::Private { ip, kind, .. } => Some(DenyReason::PrivateAddress { ip: *ip, kind: *kind }),
            _ => None,
        }
    }
}

/// The error and its causes on one line (`cannot connect to 1.2.3.4:443: connection refused`).
pub fn describe(e: &DialError) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Addresses that passed the policy's address check. Only `resolve` makes one.
#[derive(Debug, Clone)]
pub struct Checked {
    addrs: Vec<SocketAddr>,
}

impl Checked {
    /// The address that would be dialled first (never empty: `resolve` refuses a name without one).
    pub fn first(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Re-runs the address check on every address (the policy may have been reloaded since the resolution).
    pub fn recheck_all(&self, net: &Network, target: &Target) -> Result<(), DialError> {
        self.addrs.iter().try_for_each(|a| recheck(net, target, *a))
    }
}

/// SECURITY: resolves `target` once and checks every answer; only answers that pass are ever dialled (a private
/// answer without a covering CIDR is dropped, and a name with no passing answer is refused). The same checked
/// list serves every later dial of the tunnel: the name is never resolved again.
pub async fn resolve(net: &Network, target: &Target, port: u16, timeout: Duration) -> Result<Checked, DialError> {
    let name = match target {
        // IP literals were judged by `decide_ip_literal` (an entry names them with their port); check again.
        Target::Ip(ip) => {
            recheck(net, target, SocketAddr::new(*ip, port))?;
            return Ok(Checked {
                addrs: vec![SocketAddr::new(*ip, port)],
            });
        }
        Target::Name(name) => name,
    };
    let addrs: Vec<SocketAddr> = match net.resolve.get(name) {
        Some(ips) => ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
        None => {
            // The one place the proxy asks the system resolver; the answer is checked below before any dial.
            #[allow(clippy::disallowed_methods)]
            let lookup = tokio::net::lookup_host((name.as_str(), port));
            tokio::time::timeout(timeout, lookup)
                .await
                .map_err(|_| DialError::Timeout("resolving"))?
                .map_err(|source| DialError::Resolve {
                    host: name.to_string(),
                    source,
                })?
                .collect()
        }
    };
    if addrs.is_empty() {
        return Err(DialError::NoAddress { host: name.to_string() });
    }
    let mut refused = None;
    let mut passed = Vec::with_capacity(addrs.len());
    for addr in addrs {
        match recheck(net, target, addr) {
            Ok(()) => passed.push(addr),
            Err(e) => {
                tracing::debug!(host = %name, %addr, "dropping a resolved address the policy refuses");
                refused.get_or_insert(e);
            }
        }
    }
    match refused {
        Some(e) if passed.is_empty() => Err(e),
        _ => Ok(Checked { addrs: passed }),
    }
}

/// The address check alone, for a connection kept across a policy reload. An IP literal was admitted by an entry
/// naming that address and port; a name's answer must be public, pinned for that name, or inside an allow_cidr.
pub fn recheck(net: &Network, target: &Target, addr: SocketAddr) -> Result<(), DialError> {
    let private = |kind| DialError::Private {
        host: target.to_string(),
        ip: addr.ip(),
        kind,
    };
    match target {
        Target::Ip(ip) => match net.decide_ip_literal(*ip, addr.port()) {
            AddressVerdict::Allow(_) if *ip == addr.ip() => Ok(()),
            _ => Err(private(private_kind(addr.ip()).unwrap_or(PrivateKind::Reserved))),
        },
        Target::Name(_) => net.check_resolved(addr.ip()).map_err(private),
    }
}

/// Dials the checked addresses in order; the first that answers wins.
pub async fn dial(checked: &Checked, timeout: Duration) -> Result<(TcpStream, SocketAddr), DialError> {
    let mut last = None;
    for addr in &checked.addrs {
        match tokio::time::timeout(timeout, connect_addr(*addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, *addr));
            }
            Ok(Err(source)) => last = Some(DialError::Connect { addr: *addr, source }),
            Err(_) => last = Some(DialError::Timeout("connecting")),
        }
    }
    Err(last.unwrap_or(DialError::Timeout("connecting")))
}

/// Connects to exactly this address (a `TcpSocket` takes a `SocketAddr`, so no name can sneak in).
fn build_connectors(
    extra: Vec<CertificateDer<'static>>,
    provider: &Arc<CryptoProvider>,
) -> Result<Connectors, RootsError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "skipping part of the system certificate store");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "system roots loaded");
    roots.add_parsable_certificates(extra);
    if roots.is_empty() {
        return Err(RootsError::NoRoots);
    }
    let roots = Arc::new(roots);
    let config = |alpn: Vec<Vec<u8>>| -> Result<TlsConnector, RootsError> {
        let mut cfg = ClientConfig::builder_with_provider(Arc::clone(provider))
            .with_safe_default_protocol_versions()
            .map_err(RootsError::Tls)?
            .with_root_certificates(Arc::clone(&roots))
            .with_no_client_auth();
        cfg.alpn_protocols = alpn;
        Ok(TlsConnector::from(Arc::new(cfg)))
    };
    Ok(Connectors {
        h2: config(vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()])?,
        h1: config(vec![ALPN_HTTP1.to_vec()])?,
    })
}

async fn connect_addr(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.connect(addr).await
}

/// Reads extra upstream CA files (`--upstream-ca`): each must hold at least one PEM certificate.
pub fn read_extra_ca(paths: &[PathBuf]) -> Result<Vec<CertificateDer<'static>>, RootsError> {
    let mut extra = Vec::new();
    for path in paths {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|source| RootsError::Read {
                path: path.clone(),
                source,
            })?;
        if certs.is_empty() {
            return Err(RootsError::Empty { path: path.clone() });
        }
        extra.extend(certs);
    }
    Ok(extra)
}

/// TLS client configurations for upstreams: one offering `h2`+`http/1.1`, one offering only `http/1.1` (used
/// when the bottle's side speaks HTTP/1.1, so upgrades such as WebSocket keep working end to end).
///
/// Reading the system store takes tens of milliseconds (hundreds of files), so it is never on the launch path:
/// it starts on a background thread at the first dial that will need it (`warm`, idempotent) and runs alongside
/// the name resolution and TCP connect; the handshake then waits for it off the async workers. A long-lived proxy
/// may warm at start. Extra CA files are read eagerly, so a bad `--upstream-ca` still fails at start.
pub struct UpstreamTls {
    connectors: Arc<std::sync::OnceLock<Result<Connectors, RootsError>>>,
    warming: std::sync::Once,
    extra: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

struct Connectors {
    h2: TlsConnector,
    h1: TlsConnector,
}

impl UpstreamTls {
    pub fn new(extra_ca: &[PathBuf], provider: Arc<CryptoProvider>) -> Result<Self, RootsError> {
        let extra = read_extra_ca(extra_ca)?;
        Ok(Self {
            connectors: Arc::new(std::sync::OnceLock::new()),
            warming: std::sync::Once::new(),
            extra,
            provider,
        })
    }

    /// Starts loading the system roots on a background thread, once; later calls do nothing. If the thread
    /// cannot be started, the first handshake loads the roots itself.
    pub fn warm(&self) -> Result<(), RootsError> {
        let mut result = Ok(());
        self.warming.call_once(|| {
            let cell = Arc::clone(&self.connectors);
            let (extra, provider) = (self.extra.clone(), Arc::clone(&self.provider));
            result = std::thread::Builder::new()
                .name("bottle-roots".into())
                .spawn(move || {
                    cell.get_or_init(|| build_connectors(extra, &provider));
                })
                .map(drop)
                .map_err(RootsError::Thread);
        });
        result
    }

    /// The connectors; waits (on a blocking thread, never on an async worker) for the roots to be loaded.
    async fn connectors(&self) -> Result<&Connectors, DialError> {
        if self.connectors.get().is_none() {
            let cell = Arc::clone(&self.connectors);
            let (extra, provider) = (self.extra.clone(), Arc::clone(&self.provider));
            tokio::task::spawn_blocking(move || {
                cell.get_or_init(|| build_connectors(extra, &provider));
            })
            .await
            .map_err(|e| DialError::Roots(e.to_string()))?;
        }
        match self.connectors.get() {
            Some(Ok(c)) => Ok(c),
            Some(Err(e)) => Err(DialError::Roots(e.to_string())),
            None => Err(DialError::Roots("the system trust store was not loaded".into())),
        }
    }

    /// TLS to the upstream, verified for `target`. Returns the stream and whether `h2` was negotiated.
    pub async fn connect<S>(
        &self,
        tcp: S,
        target: &Target,
        offer_h2: bool,
        timeout: Duration,
    ) -> Result<(tokio_rustls::client::TlsStream<S>, bool), DialError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = match target {
            Target::Name(n) => {
                ServerName::try_from(n.as_str().to_string()).map_err(|e| DialError::Tls(std::io::Error::other(e)))?
            }
            Target::Ip(ip) => ServerName::IpAddress((*ip).into()),
        };
        let connectors = self.connectors().await?;
        let connector = if offer_h2 { &connectors.h2 } else { &connectors.h1 };
        let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| DialError::Timeout("in the upstream TLS handshake"))?
            .map_err(DialError::Tls)?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
        Ok((tls, h2))
    }
}

/// A client connection to one upstream.
pub enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

impl Sender {
    pub fn is_h2(&self) -> bool {
        matches!(self, Self::H2(_))
    }

    /// Ready for another request now (an HTTP/1.1 connection is busy until its response body is done).
    pub fn is_ready(&self) -> bool {
        match self {
            Self::H1(s) => s.is_ready(),
            Self::H2(s) => s.is_ready(),
        }
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Self::H1(s) => s.is_closed(),
            Self::H2(s) => s.is_closed(),
        }
    }

    /// Sends without holding `self` across the wait, so the sender can go back to the pool at once.
    pub fn send(
        &mut self,
        req: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, hyper::Error>> + Send + 'static + use<> {
        let fut: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match self {
            Self::H1(s) => Box::pin(s.send_request(req)),
            Self::H2(s) => Box::pin(s.send_request(req)),
        };
        fut
    }

    pub fn try_clone(&self) -> Option<Self> {
        match self {
            Self::H1(_) => None,
            Self::H2(s) => Some(Self::H2(s.clone())),
        }
    }
}

/// The HTTP client handshake over an established stream; the connection is driven by a spawned task.
pub async fn handshake<S>(io: S, h2: bool) -> Result<Sender, DialError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(DialError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2 connection ended");
            }
        });
        return Ok(Sender::H2(sender));
    }
    let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(DialError::Http)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream h1 connection ended");
        }
    });
    Ok(Sender::H1(sender))
}
