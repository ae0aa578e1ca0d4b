//! The API's listeners: unix sockets, plain TCP (loopback only) and TLS. Each tells the auth
//! middleware how a request arrived ([`Peer`]): the TLS listener with the common name of the
//! client certificate the handshake verified, the unix socket with the client's uid.

use crate::auth::{Peer, UnixPeer};
use anyhow::Context;
use axum::Router;
use std::net::SocketAddr;
use tokio::sync::watch;

/// The TLS configuration in force; replaced on SIGHUP, read at every handshake.
pub use fleet_listen::TlsConfig;

/// `unix:/run/fleet.sock` or `/run/fleet.sock` name a unix socket; anything else is host:port.
pub fn unix_path(addr: &str) -> Option<&str> {
    addr.strip_prefix("unix://")
        .or_else(|| addr.strip_prefix("unix:"))
        .or_else(|| addr.starts_with('/').then_some(addr))
}

/// Binds a unix socket with mode 0660 and group `group` (if that group exists), replacing a
/// stale socket file but never a live one.
pub async fn bind_unix(path: &str, group: &str) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if std::path::Path::new(path).exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!("cannot listen on {path}: another server is serving it");
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {path}"))?;
    }
    if let Some(dir) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("cannot listen on {path}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {path}"))?;
    if !group.is_empty() {
        match nix::unistd::Group::from_name(group) {
            Ok(Some(g)) => nix::unistd::chown(path, None, Some(g.gid))
                .with_context(|| format!("cannot give {path} to group {group}"))?,
            _ => tracing::info!(socket = %path, group, "group does not exist; the socket stays root's only"),
        }
    }
    Ok(listener)
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

pub fn serve_unix(
    listener: tokio::net::UnixListener,
    app: Router,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let svc = app.into_make_service_with_connect_info::<UnixPeer>();
    tokio::spawn(async move { axum::serve(listener, svc).with_graceful_shutdown(stopped(stop)).await })
}

pub fn serve_tcp(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    use axum::serve::ListenerExt;
    let svc = app.into_make_service_with_connect_info::<SocketAddr>();
    // As for TLS: no Nagle delay on small answers.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    tokio::spawn(async move { axum::serve(listener, svc).with_graceful_shutdown(stopped(stop)).await })
}

/// Serves `app` over TLS (fleet-listen's listener): each request carries the connection's
/// [`Peer`], with the common name of the client certificate the handshake verified.
pub fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: TlsConfig,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    fleet_listen::serve_tls(listener, app, tls, stop, |addr, cert| Peer::Tls {
        addr,
        common_name: cert.and_then(|c| fleet_store::tls::common_name(c)),
    })
}
