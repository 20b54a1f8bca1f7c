//! The coordinator's own accept loop, in front of tonic: mutual TLS with a handshake deadline,
//! a cap on open connections, and refused client certificates logged in words (the TLS
//! configuration itself, with its reloading certificate and CRL, is in [`super::tls`]).
//!
//! tonic can terminate TLS itself, but then a connection that never finishes its handshake
//! is bounded only by an optional timeout, nothing caps how many connections are open, and a
//! refused certificate is logged at debug level as a bare rustls error. Here:
//! - every accepted TCP connection takes a slot of [`ConnectionLimits::max_connections`] for
//!   its whole life; past the cap a connection is closed at once (and counted in the log);
//! - the TLS handshake must finish within [`ConnectionLimits::handshake`], however slowly the
//!   peer trickles bytes;
//! - one certificate (a site, an admin) may hold at most [`ConnectionLimits::per_identity`] of
//!   those slots, so one party cannot take them all;
//! - a client certificate that fails verification is logged with who it names, why it failed
//!   (expired on which date, another CA, ...) and what to do.
//!
//! The streams handed to tonic are `tokio_rustls::server::TlsStream`s, so
//! `Request::peer_certs()` works as with tonic's own TLS.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::server::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::identity;

/// Bounds on connections, from `[limits]` in `coordinator.toml`.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Longest a TLS handshake may take, from the TCP accept.
    pub handshake: Duration,
    /// Most connections open at once, handshaking or established.
    pub max_connections: usize,
    /// Most established connections one client certificate may have open at once.
    pub per_identity: usize,
}

/// A TCP connection holding its slot under the connection cap until it is dropped.
#[derive(Debug)]
pub struct Held {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Taken once the handshake has named the client.
    _identity: Option<IdentitySlot>,
}

/// Established connections per identity (`role/name`).
type IdentityCounts = Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

/// One of an identity's connection slots, given back when dropped.
#[derive(Debug)]
struct IdentitySlot {
    key: String,
    counts: IdentityCounts,
}

impl IdentitySlot {
    /// Takes a slot for `key`, unless it already holds `max`.
    fn take(counts: &IdentityCounts, key: String, max: usize) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self { key, counts: counts.clone() })
    }
}

impl Drop for IdentitySlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl AsyncRead for Held {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Held {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

impl Connected for Held {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

/// Connections handed to tonic.
pub type Incoming = tokio_stream::wrappers::ReceiverStream<io::Result<TlsStream<Held>>>;

tokio::task_local! {
    /// The peer whose handshake is running, for the verifier's log line.
    pub(super) static PEER: SocketAddr;
}

/// Accepts on `listener` until the returned stream is dropped: caps open connections, runs
/// each handshake under its deadline, and yields the connections whose handshake succeeded.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    metrics: Arc<crate::metrics::ServerMetrics>,
    limits: ConnectionLimits,
) -> Incoming {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_identity = IdentityCounts::default();
    tokio::spawn(async move {
        let mut over_cap = 0u64;
        let mut last_cap_warning: Option<Instant> = None;
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Closing at once tells the client to retry; leaving it in the backlog would
                // let stalled peers hold legitimate ones out unseen.
                drop(tcp);
                over_cap += 1;
                metrics.handshake_refused("max_connections");
                if last_cap_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    last_cap_warning = Some(Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        refused_so_far = over_cap,
                        %peer,
                        "connection cap reached; closed a new connection. Raise \
                         limits.max_connections if this is legitimate load"
                    );
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let per_identity = per_identity.clone();
            let metrics = metrics.clone();
            tokio::spawn(PEER.scope(peer, async move {
                let held = Held { tcp, _slot: slot, _identity: None };
                match tokio::time::timeout(limits.handshake, acceptor.accept(held)).await {
                    Ok(Ok(mut tls)) => {
                        // The verifier required a certificate; its identity was checked by
                        // name when the calls arrive, here it is only counted.
                        let who = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| identity::from_der(c).ok())
                            .map(|id| id.key());
                        if let Some(who) = who {
                            match IdentitySlot::take(&per_identity, who.clone(), limits.per_identity)
                            {
                                Some(slot) => tls.get_mut().0._identity = Some(slot),
                                None => {
                                    metrics.handshake_refused("per_identity");
                                    tracing::warn!(
                                        %peer,
                                        identity = %who,
                                        max = limits.per_identity,
                                        "this certificate already has the most connections one \
                                         identity may hold (limits.max_connections_per_identity); \
                                         closed a new one"
                                    );
                                    return;
                                }
                            }
                        }
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        // A refused certificate was logged in words by the verifier.
                        tracing::info!(%peer, error = %e, "TLS handshake failed; connection closed");
                    }
                    Err(_) => {
                        metrics.handshake_refused("handshake_timeout");
                        tracing::info!(
                            %peer,
                            seconds = limits.handshake.as_secs_f64(),
                            "TLS handshake did not finish in time; connection closed"
                        )
                    }
                }
            }));
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_slots_are_capped_and_given_back() {
        let counts = IdentityCounts::default();
        let a1 = IdentitySlot::take(&counts, "site/a".into(), 2).expect("first");
        let a2 = IdentitySlot::take(&counts, "site/a".into(), 2).expect("second");
        assert!(IdentitySlot::take(&counts, "site/a".into(), 2).is_none(), "third refused");
        let b = IdentitySlot::take(&counts, "site/b".into(), 2).expect("another identity");
        drop(a1);
        let a3 = IdentitySlot::take(&counts, "site/a".into(), 2).expect("a slot given back");
        drop((a2, a3, b));
        assert!(counts.lock().unwrap().is_empty(), "nothing left counted");
    }
}
