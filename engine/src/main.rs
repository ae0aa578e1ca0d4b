use anyhow::Context;

/// mimalloc rather than glibc's allocator: a leader makes and frees large transient structures
/// (a listing, a pass's decisions, its write batches) across threads, and glibc's per-thread
/// arenas kept what they freed resident: at a million units the leader's peak was 2.8 GiB with
/// glibc and 2.1 GiB with mimalloc, the API replica's 1.1 GiB with either (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::Parser;
use fleet_engine::config::EngineConfig;
use std::path::PathBuf;
use tokio::sync::watch;

/// Schedules fleet units and serves the fleet REST API.
///
/// Each flag (or its environment variable) overrides the configuration file's setting of the
/// same name (serde's name here); see `fleet_config::layered`.
#[derive(Parser, Debug, serde::Serialize)]
#[command(name = "fleet-engine", version)]
struct Args {
    /// TOML configuration file (see docs/configuration.md).
    #[arg(long, env = "FLEET_ENGINE_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Log format: auto (journald's native fields under systemd, else text), text, json (one
    /// object per line) or journald. `RUST_LOG` chooses what is logged.
    #[arg(long, env = "FLEET_LOG_FORMAT", value_enum, default_value = "auto")]
    #[serde(skip)]
    log_format: fleet_logging::LogFormat,
    #[arg(long, env = "FLEET_ETCD_ENDPOINTS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_endpoints: Option<Vec<String>>,
    #[arg(long, env = "FLEET_ETCD_PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_prefix: Option<String>,
    /// API listen addresses (host:port), comma-separated.
    #[arg(long, env = "FLEET_LISTEN", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<Vec<String>>,
    #[arg(long, env = "FLEET_ENGINE_ID")]
    #[serde(skip_serializing_if = "Option::is_none")]
    engine_id: Option<String>,
    #[arg(long, env = "FLEET_ELECTION_TTL_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    election_ttl_secs: Option<i64>,
    /// API page size.
    #[arg(long, env = "FLEET_TOKEN_LIMIT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    token_limit: Option<u16>,
    /// TLS API listen addresses (host:port), comma-separated.
    #[arg(long, env = "FLEET_LISTEN_TLS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen_tls: Option<Vec<String>>,
    #[arg(long, env = "FLEET_TLS_CERT_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert_file: Option<String>,
    #[arg(long, env = "FLEET_TLS_KEY_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key_file: Option<String>,
    #[arg(long, env = "FLEET_TLS_CLIENT_CA_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_client_ca_file: Option<String>,
    /// CA for `https://` etcd endpoints.
    #[arg(long, env = "FLEET_ETCD_CA_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_ca_file: Option<String>,
    /// Client certificate presented to etcd (and to agents).
    #[arg(long, env = "FLEET_ETCD_CERT_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_cert_file: Option<String>,
    #[arg(long, env = "FLEET_ETCD_KEY_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_key_file: Option<String>,
    /// Audit log file (one JSON object per change).
    #[arg(long, env = "FLEET_AUDIT_LOG")]
    #[serde(rename = "auth.audit_log", skip_serializing_if = "Option::is_none")]
    audit_log: Option<String>,
    /// Serve the API only; never campaign to lead.
    #[arg(long)]
    #[serde(rename = "lead", skip_serializing_if = "std::ops::Not::not", serialize_with = "inverted")]
    no_lead: bool,
}

/// `--no-lead` sets `lead = false`.
fn inverted<S: serde::Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bool(!*v)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fleet_logging::init(args.log_format);
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

/// The defaults, the file over them, then flags and environment over those; read again on
/// SIGHUP.
fn load_config(args: &Args) -> anyhow::Result<EngineConfig> {
    let file = EngineConfig::load(args.config.as_deref())?;
    let mut cfg: EngineConfig = fleet_config::layered(&file, args)?;
    if cfg.engine_id.is_empty() {
        cfg.engine_id = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "engine".into());
    }
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag reaches the setting it is named after (a flag wired to a setting that does not
    /// exist would be refused; one wired to the wrong setting would show here).
    #[test]
    fn every_flag_overrides_its_setting() {
        let args = Args::try_parse_from([
            "fleet-engine",
            "--etcd-endpoints=https://e1:2379,https://e2:2379",
            "--etcd-prefix=/p/",
            "--listen=127.0.0.1:1",
            "--engine-id=e9",
            "--election-ttl-secs=7",
            "--token-limit=42",
            "--listen-tls=0.0.0.0:2",
            "--tls-cert-file=c.pem",
            "--tls-key-file=c.key",
            "--tls-client-ca-file=ca.pem",
            "--etcd-ca-file=eca.pem",
            "--etcd-cert-file=e.pem",
            "--etcd-key-file=e.key",
            "--audit-log=/a.log",
            "--no-lead",
        ])
        .expect("flags parse");
        let cfg: EngineConfig = fleet_config::layered(&EngineConfig::default(), &args).expect("layers");
        assert_eq!(cfg.etcd_endpoints, ["https://e1:2379", "https://e2:2379"]);
        assert_eq!((cfg.etcd_prefix.as_str(), cfg.engine_id.as_str()), ("/p/", "e9"));
        assert_eq!(
            (cfg.listen.as_slice(), cfg.listen_tls.as_slice()),
            (&["127.0.0.1:1".to_string()][..], &["0.0.0.0:2".to_string()][..])
        );
        assert_eq!((cfg.election_ttl_secs, cfg.token_limit), (7, 42));
        assert_eq!([&cfg.tls_cert_file, &cfg.tls_key_file, &cfg.tls_client_ca_file], ["c.pem", "c.key", "ca.pem"]);
        assert_eq!([&cfg.etcd_ca_file, &cfg.etcd_cert_file, &cfg.etcd_key_file], ["eca.pem", "e.pem", "e.key"]);
        assert_eq!((cfg.auth.audit_log.as_str(), cfg.lead), ("/a.log", false));
    }

    #[test]
    fn no_flag_leaves_the_file() {
        let args = Args::try_parse_from(["fleet-engine"]).expect("flags parse");
        let file = EngineConfig { token_limit: 9, lead: true, ..EngineConfig::default() };
        let cfg: EngineConfig = fleet_config::layered(&file, &args).expect("layers");
        assert_eq!((cfg.token_limit, cfg.lead), (9, true));
    }
}
