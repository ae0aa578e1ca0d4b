//! fleet-engine: decides where units run and serves fleet's REST API.
//!
//! Boundaries: the engine never talks to systemd or to agents directly. It reads the cluster from
//! etcd through one watch ([`cluster`]), places units with a pure function ([`scheduler`]), and, only
//! while it leads ([`leader`]), writes schedule entries in fenced transactions. Every replica, leader
//! or not, serves the API ([`api`]).

pub mod api;
pub mod cluster;
pub mod config;
pub mod leader;
pub mod openapi;
pub mod scheduler;
pub mod tls;

use anyhow::Context;
use config::EngineConfig;
use fleet_model::etcd::{connect, EtcdConfig};
use fleet_model::retry::RetryPolicy;
use fleet_model::Keys;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// `unix:/run/fleet.sock` or `/run/fleet.sock` name a unix socket; anything else is host:port.
fn unix_path(addr: &str) -> Option<&str> {
    addr.strip_prefix("unix://")
        .or_else(|| addr.strip_prefix("unix:"))
        .or_else(|| addr.starts_with('/').then_some(addr))
}

/// Binds a unix socket with mode 0660, replacing a stale socket file but never a live one.
async fn bind_unix(path: &str) -> anyhow::Result<tokio::net::UnixListener> {
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
    Ok(listener)
}

/// Runs an engine until `shutdown` turns true. A new value on `config` (SIGHUP) reloads the TLS
/// certificate, key and client CA (certificate rotation without a restart); other changed settings
/// are logged as taking effect on restart.
pub async fn run(mut config: watch::Receiver<EngineConfig>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let cfg = config.borrow_and_update().clone();
    let etcd = EtcdConfig {
        endpoints: cfg.etcd_endpoints.clone(),
        request_timeout: Duration::from_millis(cfg.etcd_request_timeout_ms),
    };
    let client = connect(&etcd, RetryPolicy { attempts: 30, ..RetryPolicy::default() }).await?;
    let keys = Keys::new(&cfg.etcd_prefix);
    // The watch gets a connection of its own: HTTP/2 flow control is shared per connection, so
    // a burst of watch events not yet consumed would otherwise stall the API's and the leader's
    // writes behind it.
    let watch_client = connect(&etcd, RetryPolicy { attempts: 30, ..RetryPolicy::default() }).await?;
    let cluster = cluster::Cluster::follow(watch_client, keys.clone());
    let status = Arc::new(Mutex::new(leader::LeaderStatus { engine_id: cfg.engine_id.clone(), ..Default::default() }));
    let api = api::Api {
        client: client.clone(),
        keys: keys.clone(),
        cluster: cluster.clone(),
        status: status.clone(),
        token_limit: cfg.token_limit,
    };
    let mut servers = Vec::new();
    for addr in &cfg.listen {
        let app = api::router(api.clone());
        let mut stop = shutdown.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Some(path) = unix_path(addr) {
            let listener = bind_unix(path).await?;
            tracing::info!(socket = %path, "serving the fleet API");
            servers.push(tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stopped).await }));
        } else {
            let listener =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            tracing::info!(%addr, "serving the fleet API");
            servers.push(tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stopped).await }));
        }
    }
    let mut tls_reloadable = None;
    if !cfg.listen_tls.is_empty() {
        let client_ca = (!cfg.tls_client_ca_file.is_empty()).then(|| std::path::Path::new(&cfg.tls_client_ca_file));
        let tls = tls::server_config(cfg.tls_cert_file.as_ref(), cfg.tls_key_file.as_ref(), client_ca)?;
        let tls = axum_server::tls_rustls::RustlsConfig::from_config(tls);
        tls_reloadable = Some(tls.clone());
        for addr in &cfg.listen_tls {
            let sock: std::net::SocketAddr =
                addr.parse().with_context(|| format!("listen_tls {addr:?}: expected ip:port"))?;
            let handle = axum_server::Handle::new();
            let app = api::router(api.clone());
            let config = tls.clone();
            tracing::info!(%addr, mutual = client_ca.is_some(), "serving the fleet API over TLS");
            let mut stop = shutdown.clone();
            let h = handle.clone();
            tokio::spawn(async move {
                let _ = stop.wait_for(|s| *s).await;
                h.graceful_shutdown(Some(Duration::from_secs(5)));
            });
            servers.push(tokio::spawn(async move {
                axum_server::bind_rustls(sock, config).handle(handle).serve(app.into_make_service()).await
            }));
        }
    }
    let election = connect(
        &EtcdConfig { request_timeout: Duration::from_secs(365 * 24 * 3600), ..etcd.clone() },
        RetryPolicy { attempts: 30, ..RetryPolicy::default() },
    )
    .await?;
    let leader = leader::Leader {
        election,
        client,
        keys,
        cluster,
        engine_id: cfg.engine_id.clone(),
        ttl: cfg.election_ttl_secs,
        status,
        fences: Default::default(),
    };
    let leading = if cfg.lead {
        tokio::spawn(leader.run(shutdown.clone()))
    } else {
        tracing::info!("API only: not taking part in elections");
        tokio::spawn(async {})
    };
    tokio::spawn(async move {
        let mut running = cfg;
        while config.changed().await.is_ok() {
            let new = config.borrow_and_update().clone();
            apply_reload(&running, &new, tls_reloadable.as_ref());
            running = new;
        }
    });
    let _ = shutdown.wait_for(|s| *s).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), leading).await;
    for s in servers {
        match tokio::time::timeout(Duration::from_secs(5), s).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "API server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "API server task failed"),
            _ => {}
        }
    }
    Ok(())
}

fn apply_reload(running: &EngineConfig, new: &EngineConfig, tls: Option<&axum_server::tls_rustls::RustlsConfig>) {
    if let Some(tls) = tls {
        let client_ca = (!new.tls_client_ca_file.is_empty()).then(|| std::path::Path::new(&new.tls_client_ca_file));
        match tls::server_config(new.tls_cert_file.as_ref(), new.tls_key_file.as_ref(), client_ca) {
            Ok(c) => {
                tls.reload_from_config(c);
                tracing::info!(cert = %new.tls_cert_file, "TLS certificate reloaded");
            }
            Err(e) => tracing::error!(error = %e, "TLS certificate not reloaded; keeping the running one"),
        }
    }
    let changed = [
        ("etcd_endpoints", running.etcd_endpoints != new.etcd_endpoints),
        ("etcd_prefix", running.etcd_prefix != new.etcd_prefix),
        ("listen", running.listen != new.listen),
        ("listen_tls", running.listen_tls != new.listen_tls),
        ("engine_id", running.engine_id != new.engine_id),
        ("election_ttl_secs", running.election_ttl_secs != new.election_ttl_secs),
        ("token_limit", running.token_limit != new.token_limit),
        ("lead", running.lead != new.lead),
    ];
    for (field, _) in changed.iter().filter(|(_, c)| *c) {
        tracing::warn!(field, "changed setting takes effect when the engine restarts");
    }
}
