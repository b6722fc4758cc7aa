//! Per-connection state: who the client is, what scope its requests have (explicit proxy, transparent, or one
//! intercepted tunnel), and the upstream connections it may reuse. Every reuse re-checks the upstream address
//! against the current policy, so a reload that withdraws a CIDR also closes the door on kept-alive connections.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bottle_policy::{HostRule, Network};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use crate::decide::Target;
use crate::idle::{Activity, Tracked};
use crate::proxy::Proxy;
use crate::upstream::{self, Checked, DialError, Sender};

/// Upstream connections kept per client connection.
const MAX_POOLED: usize = 8;

/// The accepted client socket: audit label, idle clock, and the connection slot it holds.
#[derive(Clone)]
pub struct Peer {
    pub label: Arc<str>,
    pub activity: Activity,
    _slot: Arc<OwnedSemaphorePermit>,
}

impl Peer {
    pub fn new(label: impl Into<Arc<str>>, slot: OwnedSemaphorePermit) -> Self {
        Self {
            label: label.into(),
            activity: Activity::new(),
            _slot: Arc::new(slot),
        }
    }
}

/// Where a connection's requests may go.
#[derive(Debug, Clone)]
pub enum Scope {
    /// Explicit proxy: each request names its target in absolute form.
    Explicit,
    /// Transparent plain HTTP: the target is the `Host` header, the port the original destination's.
    Transparent { port: u16 },
    /// Inside an intercepted TLS tunnel: one fixed target, fixed by CONNECT (or the transparent SNI).
    Tunnel { target: Target, port: u16 },
}

struct Pooled {
    target: Target,
    port: u16,
    sender: Sender,
    addr: SocketAddr,
}

/// Upstream I/O counts as activity on the client connection: a long download keeps the tunnel alive.
type UpstreamIo = Tracked<TcpStream>;

pub struct Session {
    pub proxy: Proxy,
    pub peer: Peer,
    pub scope: Scope,
    /// The bottle negotiated HTTP/2 with us (only inside interception).
    pub client_h2: bool,
    pool: Mutex<Vec<Pooled>>,
    predialed: Mutex<Option<(TcpStream, SocketAddr)>>,
    /// The tunnel's one resolution (resolve once per CONNECT).
    checked: Option<Checked>,
    /// Ask mode: a tunnel the reviewer let through to a host the policy does not cover.
    pub grant: Option<Arc<HostRule>>,
}

impl Session {
    pub fn new(proxy: Proxy, peer: Peer, scope: Scope) -> Self {
        Self {
            proxy,
            peer,
            scope,
            client_h2: false,
            pool: Mutex::new(Vec::new()),
            predialed: Mutex::new(None),
            checked: None,
            grant: None,
        }
    }

    pub fn tunnel(
        proxy: Proxy,
        peer: Peer,
        scope: Scope,
        client_h2: bool,
        checked: Checked,
        predialed: Option<(TcpStream, SocketAddr)>,
        grant: Option<Arc<HostRule>>,
    ) -> Self {
        Self {
            client_h2,
            grant,
            predialed: Mutex::new(predialed),
            checked: Some(checked),
            ..Self::new(proxy, peer, scope)
        }
    }

    fn tls(&self) -> bool {
        matches!(self.scope, Scope::Tunnel { .. })
    }

    /// A connection to `target:port`: a pooled one that is idle and still passes the address check, or a new one.
    /// `fresh` skips the pool (upgrades take a connection for themselves).
    pub async fn upstream(
        &self,
        net: &Network,
        target: &Target,
        port: u16,
        fresh: bool,
    ) -> Result<(Sender, SocketAddr), DialError> {
        if !fresh && let Some(found) = self.take_pooled(net, target, port)? {
            return Ok(found);
        }
        if self.tls() {
            // Roots load alongside the resolve and connect below; a failure to start the thread only means the
            // handshake loads them itself.
            let _ = self.proxy.inner.tls.warm();
        }
        let predialed = self.predialed.lock().ok().and_then(|mut p| p.take());
        let (tcp, addr) = match predialed {
            Some((tcp, addr)) => {
                upstream::recheck(net, target, addr)?;
                (tcp, addr)
            }
            None => {
                let limits = &self.proxy.inner.limits;
                let checked = match &self.checked {
                    Some(c) => {
                        c.recheck_all(net, target)?;
                        c.clone()
                    }
                    None => upstream::resolve(net, target, port, limits.connect_timeout).await?,
                };
                upstream::dial(&checked, limits.connect_timeout).await?
            }
        };
        let io: UpstreamIo = Tracked::new(tcp, self.peer.activity.clone());
        let sender = if self.tls() {
            let offer_h2 = self.client_h2 && !fresh;
            let timeout = self.proxy.inner.limits.handshake_timeout;
            let (tls, h2) = self.proxy.inner.tls.connect(io, target, offer_h2, timeout).await?;
            upstream::handshake(tls, h2).await?
        } else {
            upstream::handshake(io, false).await?
        };
        if let Some(shared) = sender.try_clone() {
            self.give_back(target, port, shared, addr);
        }
        Ok((sender, addr))
    }

    fn take_pooled(
        &self,
        net: &Network,
        target: &Target,
        port: u16,
    ) -> Result<Option<(Sender, SocketAddr)>, DialError> {
        let Ok(mut pool) = self.pool.lock() else {
            return Ok(None);
        };
        pool.retain(|p| !p.sender.is_closed());
        let Some(i) = pool
            .iter()
            .position(|p| &p.target == target && p.port == port && p.sender.is_ready())
        else {
            return Ok(None);
        };
        if let Err(e) = upstream::recheck(net, target, pool[i].addr) {
            pool.retain(|p| &p.target != target || p.port != port);
            return Err(e);
        }
        if let Some(shared) = pool[i].sender.try_clone() {
            return Ok(Some((shared, pool[i].addr)));
        }
        let p = pool.swap_remove(i);
        Ok(Some((p.sender, p.addr)))
    }

    /// Returns an HTTP/1.1 sender after its request was sent; it is reused once its response is done.
    pub fn give_back(&self, target: &Target, port: u16, sender: Sender, addr: SocketAddr) {
        if let Ok(mut pool) = self.pool.lock()
            && pool.len() < MAX_POOLED
        {
            pool.push(Pooled {
                target: target.clone(),
                port,
                sender,
                addr,
            });
        }
    }
}
