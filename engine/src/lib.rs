//! fleet-engine: decides where units run and serves fleet's REST API.
//!
//! Boundaries: the engine never talks to systemd, and to agents only to relay what only a machine
//! knows (a unit's status and journal, [`api`]). It reads the cluster from etcd through one watch
//! ([`cluster`]), places units with a pure function ([`scheduler`]), and, only while it leads
//! ([`leader`]), writes schedule entries in fenced transactions. Every replica, leader or not,
//! serves the API, layered bottom-up: [`http`] → [`auth`] → [`api`] → [`batch`], [`fleetlock`] →
//! [`routes`] (no two modules import each other: `tests/module_layers.rs`).
//!
//! Depends on the shared libraries (`fleet-model`, `fleet-api`, `fleet-store`, `fleet-config`),
//! never on the agent, fleetctl or the lab; its wire types are `fleet-api`'s, not its own.

pub mod api;
#[cfg(test)]
mod api_tests;
pub mod auth;
pub mod batch;
pub mod cluster;
pub mod config;
pub mod events;
pub mod fleetlock;
pub mod fuzz_checks;
pub mod http;
pub mod join;
pub mod leader;
pub mod listen;
pub mod metrics;
pub mod openapi;
pub mod pki;
pub mod provisioning;
pub mod routes;
pub mod scheduler;
pub mod ui;

use anyhow::Context;
use config::EngineConfig;
use fleet_model::Keys;
use fleet_store::etcd::{connect, EtcdConfig};
use fleet_store::retry::RetryPolicy;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// What this engine needs to admit machines by join token, if its configuration has `[join]`:
/// the CA, and an etcd client with the `root` identity (for machines' etcd users).
async fn admitting(cfg: &EngineConfig, etcd: &EtcdConfig) -> anyhow::Result<Option<Arc<join::Joining>>> {
    if cfg.join.pki_dir.is_empty() {
        return Ok(None);
    }
    let dir = std::path::Path::new(&cfg.join.pki_dir);
    let etcd_ca =
        if cfg.etcd_ca_file.is_empty() { dir.join("ca.pem").display().to_string() } else { cfg.etcd_ca_file.clone() };
    let root = fleet_store::tls::ClientTls::from_files(
        &etcd_ca,
        &dir.join("root.pem").display().to_string(),
        &dir.join("root.key").display().to_string(),
    )
    .context("[join] pki_dir: etcd's root identity (root.pem, root.key)")?;
    let root_etcd = EtcdConfig { tls: root.map(|t| t.etcd_options()).transpose()?, ..etcd.clone() };
    let client = connect(&root_etcd, RetryPolicy { attempts: 30, ..RetryPolicy::default() }).await?;
    let endpoints =
        if cfg.join.etcd_endpoints.is_empty() { cfg.etcd_endpoints.clone() } else { cfg.join.etcd_endpoints.clone() };
    let accounts = Arc::new(join::EtcdAccounts::new(client, &cfg.etcd_prefix));
    let joining = join::Joining::new(dir, &etcd_ca, endpoints, &cfg.etcd_prefix, accounts)
        .context("[join] pki_dir: the cluster CA")?;
    tracing::info!(ca_hash = %joining.ca_hash, "admitting machines by join token");
    Ok(Some(Arc::new(joining)))
}

/// Runs an engine until `shutdown` turns true. A new value on `config` (SIGHUP) reloads the TLS
/// certificate, key and client CA (certificate rotation without a restart); other changed settings
/// are logged as taking effect on restart.
pub async fn run(mut config: watch::Receiver<EngineConfig>, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let cfg = config.borrow_and_update().clone();
    let etcd_tls = cfg.etcd_tls()?;
    let etcd = EtcdConfig {
        endpoints: cfg.etcd_endpoints.clone(),
        request_timeout: Duration::from_millis(cfg.etcd_request_timeout_ms),
        tls: etcd_tls.as_ref().map(|t| t.etcd_options()).transpose()?,
    };
    let client = connect(&etcd, RetryPolicy { attempts: 30, ..RetryPolicy::default() }).await?;
    let keys = Keys::new(&cfg.etcd_prefix);
    // The watch gets a connection of its own: HTTP/2 flow control is shared per connection, so
    // a burst of watch events not yet consumed would otherwise stall the API's and the leader's
    // writes behind it.
    let watch_client = connect(&etcd, RetryPolicy { attempts: 30, ..RetryPolicy::default() }).await?;
    let cluster = cluster::Cluster::follow(watch_client, keys.clone(), cfg.event_history);
    let status = Arc::new(Mutex::new(leader::LeaderStatus { engine_id: cfg.engine_id.clone(), ..Default::default() }));
    let metrics = metrics::Metrics::with(cfg.metrics);
    let api = api::Api {
        store: fleet_store::kv::EtcdStore::new(client.clone()).into(),
        keys: keys.clone(),
        cluster: cluster.clone(),
        status: status.clone(),
        token_limit: cfg.token_limit,
        agents: api::agent_client(etcd_tls.as_ref())?,
        fleetlock: cfg.fleetlock.clone(),
        written: Default::default(),
        requests: Default::default(),
        metrics: metrics.clone(),
        join: admitting(&cfg, &etcd).await?,
    };
    let auth = Arc::new(auth::Auth::new(&cfg.auth)?);
    let app = routes::router(api.clone(), auth);
    let mut servers = Vec::new();
    for addr in &cfg.listen {
        if let Some(path) = listen::unix_path(addr) {
            let listener = listen::bind_unix(path, &cfg.auth.socket_group).await?;
            tracing::info!(socket = %path, "serving the fleet API");
            servers.push(listen::serve_unix(listener, app.clone(), shutdown.clone()));
        } else {
            let listener = fleet_listen::bind(addr, fleet_listen::BIND_PATIENCE, Duration::from_secs(1)).await?;
            tracing::info!(%addr, "serving the fleet API");
            servers.push(listen::serve_tcp(listener, app.clone(), shutdown.clone()));
        }
    }
    if !cfg.metrics_listen.is_empty() {
        let addr = &cfg.metrics_listen;
        let listener = fleet_listen::bind(addr, fleet_listen::BIND_PATIENCE, Duration::from_secs(1)).await?;
        tracing::info!(%addr, "serving metrics on loopback");
        servers.push(listen::serve_tcp(listener, routes::metrics_router(api.clone()), shutdown.clone()));
    }
    let mut tls_reloadable = None;
    if !cfg.listen_tls.is_empty() {
        let tls: listen::TlsConfig = Arc::new(std::sync::RwLock::new(api_tls(&cfg)?));
        tls_reloadable = Some(tls.clone());
        for addr in &cfg.listen_tls {
            let listener = fleet_listen::bind(addr, fleet_listen::BIND_PATIENCE, Duration::from_secs(1)).await?;
            tracing::info!(%addr, client_certificates = !cfg.tls_client_ca_file.is_empty(), "serving the fleet API over TLS");
            servers.push(listen::serve_tls(listener, app.clone(), tls.clone(), shutdown.clone()));
        }
    }
    // Under systemd (Type=notify), `systemctl start fleet-engine` returns once the API is
    // served: a script or a person can use it on the next line. Without NOTIFY_SOCKET, nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot tell systemd the engine is ready");
    }
    let election = connect(
        &EtcdConfig { request_timeout: Duration::from_secs(365 * 24 * 3600), ..etcd.clone() },
        RetryPolicy { attempts: 30, ..RetryPolicy::default() },
    )
    .await?;
    let leader = leader::Leader {
        election,
        client: client.clone(),
        engine_id: cfg.engine_id.clone(),
        planner: leader::Planner {
            store: fleet_store::kv::EtcdStore::new(client),
            keys,
            cluster,
            ttl: cfg.election_ttl_secs,
            status,
            fences: Default::default(),
            wake: Default::default(),
            metrics,
            ready: Default::default(),
            max_pending_starts: leader::PENDING_STARTS,
            bulk_arrival: leader::BULK_ARRIVAL,
        },
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
    api.cluster.events().close();
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

/// The API's TLS configuration: client certificates are optional (token callers have none) but
/// must be signed by the cluster CA when presented.
fn api_tls(cfg: &EngineConfig) -> Result<Arc<rustls::ServerConfig>, fleet_store::tls::TlsError> {
    let clients = match cfg.tls_client_ca_file.as_str() {
        "" => fleet_store::tls::ClientAuth::None,
        ca => fleet_store::tls::ClientAuth::Optional(ca.into()),
    };
    fleet_store::tls::server_config(cfg.tls_cert_file.as_ref(), cfg.tls_key_file.as_ref(), &clients)
}

/// Settings a running engine applies on reload: the API's TLS certificate, key and client CA.
pub const HOT_SETTINGS: &[&str] = &["tls_cert_file", "tls_key_file", "tls_client_ca_file"];

/// The settings changed between `running` and `new` that wait for a restart.
pub fn restart_only_changes(running: &EngineConfig, new: &EngineConfig) -> Vec<String> {
    fleet_config::restart_only_changes(running, new, HOT_SETTINGS)
}

fn apply_reload(running: &EngineConfig, new: &EngineConfig, tls: Option<&listen::TlsConfig>) {
    if let Some(tls) = tls {
        match api_tls(new) {
            Ok(c) => {
                if let Ok(mut current) = tls.write() {
                    *current = c;
                }
                tracing::info!(cert = %new.tls_cert_file, "TLS certificate reloaded");
            }
            Err(e) => tracing::error!(error = %e, "TLS certificate not reloaded; keeping the running one"),
        }
    }
    for field in restart_only_changes(running, new) {
        tracing::warn!(field, "changed setting takes effect when the engine restarts");
    }
}
