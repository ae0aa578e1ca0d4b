//! fleet-listen: the one TLS listener of fleet's daemons (the engine's API and the agent's unit
//! API). Each connection's handshake uses the configuration in force (replaceable at run time:
//! a reload swaps certificates without dropping the listener), a handshake must finish within
//! [`HANDSHAKE_TIMEOUT`], TCP_NODELAY is set, and each request carries what the caller derives
//! from the connection (its address and the client certificate the handshake verified).
//!
//! It knows nothing of fleet's auth, etcd or units: no fleet crate is a dependency.

use axum::Router;
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// The TLS configuration in force; replaced on reload, read at every handshake.
pub type TlsConfig = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// A TLS handshake must finish in this time, so idle connections cannot pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A [`TlsConfig`] holding `config`.
pub fn tls_config(config: impl Into<Arc<rustls::ServerConfig>>) -> TlsConfig {
    Arc::new(RwLock::new(config.into()))
}

/// How long [`bind`] keeps trying an address something else holds.
///
/// A TCP connection this machine closed keeps its local port for 60 s (TIME_WAIT), and a
/// socket that did not ask for address reuse (an outgoing connection) blocks a listener on
/// that port for as long: a port in the ephemeral range can be taken by any outgoing
/// connection (`fleet-agent join`'s own request to an engine once held the agent's port). A
/// daemon that gave up at once would leave its machine out for a minute of restarts.
pub const BIND_PATIENCE: Duration = Duration::from_secs(75);

/// Listens on `addr` (`host:port`), trying again every `every` while the address is in use,
/// for at most `patience`; any other failure, or an address still in use then, is returned
/// at once with the address named.
pub async fn bind(addr: &str, patience: Duration, every: Duration) -> std::io::Result<tokio::net::TcpListener> {
    let started = tokio::time::Instant::now();
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && started.elapsed() + every <= patience => {
                tracing::warn!(%addr, error = %e, "address in use (a connection may still hold the port); trying again");
                tokio::time::sleep(every).await;
            }
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} (tried for {:?}): {e}", started.elapsed()),
                ))
            }
        }
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves `app` over TLS on `listener` until `stop` turns true. `peer` makes, from each
/// connection's address and verified client certificate (if any), the value put into every
/// request's extensions (the engine's auth reads it; the agent's API puts nothing useful).
pub fn serve_tls<P, F>(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: TlsConfig,
    stop: watch::Receiver<bool>,
    peer: F,
) -> tokio::task::JoinHandle<std::io::Result<()>>
where
    P: Clone + Send + Sync + 'static,
    F: Fn(SocketAddr, Option<&CertificateDer<'_>>) -> P + Send + Sync + 'static,
{
    let peer = Arc::new(peer);
    tokio::spawn(async move {
        let stop = stopped(stop);
        tokio::pin!(stop);
        loop {
            let (tcp, addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = &mut stop => return Ok(()),
            };
            let Some(config) = tls.read().ok().map(|c| c.clone()) else {
                return Err(std::io::Error::other("TLS configuration lock poisoned"));
            };
            // Small answers must not wait for the client's delayed ACK (Nagle): 40 ms a request.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%addr, error = %e, "cannot set TCP_NODELAY");
            }
            let (app, peer) = (app.clone(), peer.clone());
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%addr, "TLS handshake timed out");
                        return;
                    }
                };
                let p = peer(addr, stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()));
                let svc = tower::ServiceExt::map_request(app, move |mut req: axum::extract::Request<_>| {
                    req.extensions_mut().insert(p.clone());
                    req
                });
                let svc = hyper_util::service::TowerToHyperService::new(svc);
                let io = hyper_util::rt::TokioIo::new(stream);
                let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                if let Err(e) = builder.serve_connection_with_upgrades(io, svc).await {
                    tracing::debug!(%addr, error = %e, "connection ended with an error");
                }
            });
        }
    })
}

#[cfg(test)]
mod tests;
