use anyhow::Context;
use clap::Parser;
use fleet_engine::config::EngineConfig;
use std::path::PathBuf;
use tokio::sync::watch;

/// Schedules fleet units and serves the fleet REST API.
#[derive(Parser, Debug)]
#[command(name = "fleet-engine", version)]
struct Args {
    /// TOML configuration file (see docs/configuration.md).
    #[arg(long, env = "FLEET_ENGINE_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "FLEET_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Option<Vec<String>>,
    #[arg(long, env = "FLEET_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    /// API listen addresses (host:port), comma-separated.
    #[arg(long, env = "FLEET_LISTEN", value_delimiter = ',')]
    listen: Option<Vec<String>>,
    #[arg(long, env = "FLEET_ENGINE_ID")]
    engine_id: Option<String>,
    #[arg(long, env = "FLEET_ELECTION_TTL_SECS")]
    election_ttl_secs: Option<i64>,
    /// API page size.
    #[arg(long, env = "FLEET_TOKEN_LIMIT")]
    token_limit: Option<u16>,
    /// TLS API listen addresses (host:port), comma-separated.
    #[arg(long, env = "FLEET_LISTEN_TLS", value_delimiter = ',')]
    listen_tls: Option<Vec<String>>,
    #[arg(long, env = "FLEET_TLS_CERT_FILE")]
    tls_cert_file: Option<String>,
    #[arg(long, env = "FLEET_TLS_KEY_FILE")]
    tls_key_file: Option<String>,
    #[arg(long, env = "FLEET_TLS_CLIENT_CA_FILE")]
    tls_client_ca_file: Option<String>,
    /// CA for `https://` etcd endpoints.
    #[arg(long, env = "FLEET_ETCD_CA_FILE")]
    etcd_ca_file: Option<String>,
    /// Client certificate presented to etcd (and to agents).
    #[arg(long, env = "FLEET_ETCD_CERT_FILE")]
    etcd_cert_file: Option<String>,
    #[arg(long, env = "FLEET_ETCD_KEY_FILE")]
    etcd_key_file: Option<String>,
    /// Audit log file (one JSON object per change).
    #[arg(long, env = "FLEET_AUDIT_LOG")]
    audit_log: Option<String>,
    /// Serve the API only; never campaign to lead.
    #[arg(long)]
    no_lead: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = load_config(&args)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(async move {
            let (tx, rx) = watch::channel(false);
            tokio::spawn(async move {
                use tokio::signal::unix::{signal, SignalKind};
                if let (Ok(mut t), Ok(mut i)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                    tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                    tracing::info!("stopping");
                    let _ = tx.send(true);
                }
            });
            let (config_tx, config_rx) = watch::channel(cfg);
            tokio::spawn(reload_on_hangup(args, config_tx));
            fleet_engine::run(config_rx, rx).await
        })
}

/// SIGHUP (`systemctl reload fleet-engine`): reads the configuration again; the engine applies
/// what it can while running (see `fleet_engine::run`).
async fn reload_on_hangup(args: Args, config_tx: watch::Sender<EngineConfig>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; configuration reload disabled");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("Reloading configuration");
        match load_config(&args) {
            Ok(cfg) => {
                config_tx.send_replace(cfg);
            }
            Err(e) => tracing::error!(error = format!("{e:#}"), "configuration not reloaded; keeping the running one"),
        }
    }
}

/// The file, then flags and environment over it; read again on SIGHUP.
fn load_config(args: &Args) -> anyhow::Result<EngineConfig> {
    let mut cfg = EngineConfig::load(args.config.as_deref())?;
    if let Some(v) = &args.etcd_endpoints {
        cfg.etcd_endpoints = v.clone();
    }
    if let Some(v) = &args.etcd_prefix {
        cfg.etcd_prefix = v.clone();
    }
    if let Some(v) = &args.listen {
        cfg.listen = v.clone();
    }
    if let Some(v) = &args.engine_id {
        cfg.engine_id = v.clone();
    }
    if let Some(v) = &args.listen_tls {
        cfg.listen_tls = v.clone();
    }
    if let Some(v) = &args.tls_cert_file {
        cfg.tls_cert_file = v.clone();
    }
    if let Some(v) = &args.tls_key_file {
        cfg.tls_key_file = v.clone();
    }
    if let Some(v) = &args.tls_client_ca_file {
        cfg.tls_client_ca_file = v.clone();
    }
    for (flag, field) in [
        (&args.etcd_ca_file, &mut cfg.etcd_ca_file),
        (&args.etcd_cert_file, &mut cfg.etcd_cert_file),
        (&args.etcd_key_file, &mut cfg.etcd_key_file),
        (&args.audit_log, &mut cfg.auth.audit_log),
    ] {
        if let Some(v) = flag {
            *field = v.clone();
        }
    }
    if let Some(v) = args.token_limit {
        cfg.token_limit = v;
    }
    if let Some(v) = args.election_ttl_secs {
        cfg.election_ttl_secs = v;
    }
    if args.no_lead {
        cfg.lead = false;
    }
    if cfg.engine_id.is_empty() {
        cfg.engine_id = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "engine".into());
    }
    cfg.validate()?;
    Ok(cfg)
}
