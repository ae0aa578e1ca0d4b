use anyhow::Context;
use clap::Parser;
use fleet_agent::config::{parse_metadata, AgentConfig};
use fleet_agent::presence::Presence;
use fleet_agent::systemd::Systemd;
use fleet_agent::Agent;
use fleet_model::machine::parse_machine_id;
use fleet_model::{Keys, MachineRecord};
use fleet_store::etcd::{connect, EtcdConfig};
use fleet_store::retry::RetryPolicy;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::watch;

/// Runs the units the fleet engine schedules to this machine under the local systemd.
///
/// Each flag (or its environment variable) overrides the configuration file's setting of the
/// same name (serde's name here); see `fleet_config::layered`.
#[derive(Parser, Debug, serde::Serialize)]
#[command(name = "fleet-agent", version)]
struct Args {
    /// TOML configuration file (see docs/configuration.md).
    #[arg(long, env = "FLEET_AGENT_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Log format: auto (journald's native fields under systemd, else text), text, json (one
    /// object per line) or journald. `RUST_LOG` chooses what is logged.
    #[arg(long, env = "FLEET_LOG_FORMAT", value_enum, default_value = "auto")]
    #[serde(skip)]
    log_format: fleet_logging::LogFormat,
    /// etcd endpoints, comma-separated; overrides the file.
    #[arg(long, env = "FLEET_ETCD_ENDPOINTS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_endpoints: Option<Vec<String>>,
    #[arg(long, env = "FLEET_ETCD_PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_prefix: Option<String>,
    #[arg(long, env = "FLEET_PUBLIC_IP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    public_ip: Option<String>,
    /// Machine metadata `k=v,k=v`; replaces the file's.
    #[arg(long, env = "FLEET_METADATA", value_parser = metadata_arg)]
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<BTreeMap<String, String>>,
    #[arg(long, env = "FLEET_LEASE_TTL_SECS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_ttl_secs: Option<i64>,
    /// The cluster CA, for `https://` etcd endpoints.
    #[arg(long, env = "FLEET_ETCD_CA_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_ca_file: Option<String>,
    /// This machine's certificate and key.
    #[arg(long, env = "FLEET_ETCD_CERT_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_cert_file: Option<String>,
    #[arg(long, env = "FLEET_ETCD_KEY_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd_key_file: Option<String>,
    #[command(subcommand)]
    #[serde(skip)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Join the cluster with a join token (`fleetctl join-token create` prints this command):
    /// check the engine's CA against --ca-hash, make this machine's key, have the engine sign its
    /// certificate and make its etcd user, write /etc/fleet/pki and /etc/fleet/agent.d/50-join.toml,
    /// and start fleet-agent.
    Join {
        /// Engine API URLs (https://), comma-separated; tried in turn.
        #[arg(long = "engine", required = true, value_delimiter = ',')]
        engines: Vec<String>,
        /// The join token, ID.SECRET (or FLEET_JOIN_TOKEN, which keeps it out of `ps`).
        #[arg(long, env = "FLEET_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// The cluster CA's pin, sha256:<hex>.
        #[arg(long)]
        ca_hash: String,
        /// The address engines reach this machine's agent at; default: the one that reaches the engine.
        #[arg(long = "address")]
        address: Option<String>,
        #[arg(long, default_value = "/etc/fleet")]
        config_dir: PathBuf,
        #[arg(long, default_value = "/etc/machine-id")]
        machine_id_file: PathBuf,
        /// Write the configuration only; do not start fleet-agent.service.
        #[arg(long)]
        no_start: bool,
    },
}

/// `--metadata k=v,k=v`, checked as the flag is read.
fn metadata_arg(text: &str) -> Result<BTreeMap<String, String>, String> {
    parse_metadata(text).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(Command::Join { engines, token, ca_hash, address, config_dir, machine_id_file, no_start }) =
        args.command.take()
    {
        let opts =
            fleet_agent::join::JoinOptions { engines, token, ca_hash, config_dir, machine_id_file, public_ip: address };
        return join(opts, no_start);
    }
    fleet_logging::init(args.log_format);
    let cfg = load_config(&args)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(cfg, args))
}

/// `fleet-agent join`: prints what it did, or why it did nothing.
fn join(opts: fleet_agent::join::JoinOptions, no_start: bool) -> anyhow::Result<()> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    let done = rt.block_on(fleet_agent::join::join(&opts)).context("cannot join")?;
    println!("Machine {} joined the cluster.", done.machine_id);
    for f in &done.files {
        println!("  wrote {}", f.display());
    }
    if no_start {
        println!("Start the agent with: systemctl enable --now fleet-agent");
        return Ok(());
    }
    let mut child = std::process::Command::new("systemctl")
        .args(["enable", "--now", "fleet-agent.service"])
        .spawn()
        .context("cannot run systemctl")?;
    // systemd answers in seconds; one that does not is reported rather than waited for forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().context("systemctl")? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("systemctl enable --now fleet-agent did not finish in 90 s; the configuration is written");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        anyhow::bail!("systemctl enable --now fleet-agent failed ({status}); the configuration is written, see journalctl -u fleet-agent");
    }
    println!("fleet-agent started.");
    Ok(())
}

/// The defaults, the file over them, then flags and environment over those; read again on
/// SIGHUP.
fn load_config(args: &Args) -> anyhow::Result<AgentConfig> {
    let file = AgentConfig::load(args.config.as_deref())?;
    let cfg: AgentConfig = fleet_config::layered(&file, args)?;
    cfg.validate()?;
    Ok(cfg)
}

async fn run(cfg: AgentConfig, args: Args) -> anyhow::Result<()> {
    let id_text = std::fs::read_to_string(&cfg.machine_id_file).with_context(|| {
        format!("unable to determine local machine ID: cannot read {}", cfg.machine_id_file.display())
    })?;
    let machine = parse_machine_id(&id_text).with_context(|| format!("in {}", cfg.machine_id_file.display()))?;
    tokio::fs::create_dir_all(&cfg.state_dir)
        .await
        .with_context(|| format!("cannot create {}", cfg.state_dir.display()))?;
    let tls = cfg.tls()?;
    let etcd = EtcdConfig {
        endpoints: cfg.etcd_endpoints.clone(),
        request_timeout: Duration::from_millis(cfg.etcd_request_timeout_ms),
        tls: tls.as_ref().map(|t| t.etcd_options()).transpose()?,
    };
    let client = connect(&etcd, RetryPolicy { attempts: 30, ..RetryPolicy::default() }).await?;
    let systemd = Systemd::connect((!cfg.systemd_bus.is_empty()).then_some(cfg.systemd_bus.as_str())).await?;
    let metrics = fleet_agent::metrics::AgentMetrics::new();
    let unit_api = fleet_agent::unit_api::UnitApi { units_dir: cfg.units_dir.clone(), metrics: metrics.clone() };
    if !cfg.metrics_listen.is_empty() {
        let addr = cfg.metrics_listen.clone();
        let listener = fleet_listen::bind(&addr, fleet_listen::BIND_PATIENCE, Duration::from_secs(1)).await?;
        tracing::info!(%addr, "serving metrics on loopback");
        let app = fleet_agent::unit_api::metrics_router(unit_api.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "metrics listener stopped");
            }
        });
    }
    let record = MachineRecord {
        id: machine.clone(),
        public_ip: cfg.public_ip.clone(),
        metadata: cfg.metadata.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        capacity: cfg.capacity()?,
        agent_url: String::new(),
        lease_ttl: cfg.lease_ttl_secs,
        stopped_while_cut_off: Vec::new(),
        schedule_pages: true,
    };
    let mut record = record;
    if let Some(addr) = cfg.api_address() {
        let listener = fleet_listen::bind(&addr, fleet_listen::BIND_PATIENCE, Duration::from_secs(1)).await?;
        let local = listener.local_addr().context("agent API address")?;
        let host = if local.ip().is_unspecified() && !cfg.public_ip.is_empty() {
            cfg.public_ip.clone()
        } else {
            local.ip().to_string()
        };
        let app = fleet_agent::unit_api::router(unit_api.clone());
        match &tls {
            Some(tls) => {
                // The machine's certificate serves the API; only engines' certificates get in.
                let clients = fleet_store::tls::ClientAuth::Required {
                    ca: tls.ca_file.clone(),
                    allowed: cfg.api_allowed_clients.clone(),
                };
                let server = fleet_store::tls::server_config(&tls.cert_file, &tls.key_file, &clients)?;
                record.agent_url = format!("https://{host}:{}", local.port());
                tracing::info!(%addr, "serving unit status and journals over TLS to engines");
                // The engines' listener (fleet-listen); it runs for as long as the agent does.
                let (_keep, never) = tokio::sync::watch::channel(false);
                let served = fleet_listen::serve_tls(listener, app, fleet_listen::tls_config(server), never, |_, _| ());
                tokio::spawn(async move {
                    let _keep = _keep;
                    match served.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "agent API stopped"),
                        Err(e) => tracing::error!(error = %e, "agent API stopped"),
                    }
                });
            }
            None => {
                record.agent_url = format!("http://{host}:{}", local.port());
                tracing::warn!(%addr, "serving unit status and journals without TLS: anyone can read them");
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!(error = %e, "agent API stopped");
                    }
                });
            }
        }
    }
    tracing::info!(%machine, ip = %cfg.public_ip, "fleet-agent starting");
    let (lease_tx, lease_rx) = watch::channel(None);
    let (cleaned_tx, cleaned_rx) = watch::channel(fleet_agent::presence::Cleaned::default());
    let (record_tx, record_rx) = watch::channel(record);
    let presence = Presence {
        cleaned: cleaned_rx,
        client: client.clone(),
        keys: Keys::new(&cfg.etcd_prefix),
        record: record_rx,
        ttl: cfg.lease_ttl_secs,
        lease_file: cfg.state_dir.join("agent.lease"),
        registered_file: Some(cfg.state_dir.join(REGISTERED_FILE)),
        metrics: Some(metrics.clone()),
    };
    tokio::spawn(reload_on_hangup(args, cfg.clone(), record_tx, lease_rx.clone(), client.clone()));
    let presence_task = tokio::spawn(presence.run(lease_tx));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = shutdown_tx.send(true);
    });
    let measured = fleet_agent::metrics::Measured::new(systemd.clone(), metrics.clone());
    let agent = Agent::new(&cfg, fleet_store::kv::EtcdStore::new(client.clone()), machine, measured)
        .await?
        .with_metrics(metrics);
    let last_lease = lease_rx.clone();
    let result = agent.run(lease_rx, cleaned_tx, shutdown_rx).await;
    presence_task.abort();
    let _ = std::fs::remove_file(cfg.state_dir.join(REGISTERED_FILE));
    // An agent that is only restarted leaves its lease to expire: units keep running, and the
    // new agent takes the lease over within the TTL without anyone noticing. A machine that is
    // shutting down gives it back: its units are being stopped, so the engine should place them
    // elsewhere now rather than after the TTL, and after a reboot the machine registers again at
    // once instead of waiting for its old registration to expire.
    let lease = *last_lease.borrow();
    if let (Some(lease), Ok(state)) = (lease, systemd.system_state().await) {
        if state == "stopping" {
            let mut leases = client.lease_client();
            match tokio::time::timeout(Duration::from_secs(3), leases.revoke(lease)).await {
                Ok(Ok(_)) => {
                    tracing::info!("the machine is shutting down: lease given back, its units go elsewhere now")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "the machine is shutting down; cannot give the lease back"),
                Err(_) => tracing::warn!("the machine is shutting down; giving the lease back timed out"),
            }
            let _ = std::fs::remove_file(cfg.state_dir.join("agent.lease"));
        }
    }
    result.context("agent failed")
}

/// Present while this machine is registered with the cluster (see `Presence::registered_file`).
const REGISTERED_FILE: &str = "registered";

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => futures::future::pending::<()>().await,
    }
}

/// SIGHUP (`systemctl reload fleet-agent`): reads the configuration again and publishes the
/// machine's new metadata, address and capacity at once, without touching any unit. Settings that
/// shape the agent itself (etcd, directories, lease TTL, API address) take effect on restart.
async fn reload_on_hangup(
    args: Args,
    mut current: AgentConfig,
    record_tx: watch::Sender<MachineRecord>,
    lease_rx: watch::Receiver<Option<i64>>,
    client: fleet_store::etcd::Client,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; configuration reload disabled");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("Reloading configuration");
        let new = match load_config(&args) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "configuration not reloaded; keeping the running one");
                continue;
            }
        };
        let capacity = match new.capacity() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "configuration not reloaded; keeping the running one");
                continue;
            }
        };
        for field in fleet_agent::config::restart_only_changes(&current, &new) {
            tracing::warn!(field, "changed setting takes effect when the agent restarts");
        }
        record_tx.send_modify(|r| {
            r.metadata = new.metadata.clone();
            r.public_ip = new.public_ip.clone();
            r.capacity = capacity;
        });
        let record = record_tx.borrow().clone();
        let lease = *lease_rx.borrow();
        match lease {
            Some(lease) => match republish(&client, &Keys::new(&current.etcd_prefix), &record, lease).await {
                Ok(()) => tracing::info!(metadata = ?record.metadata, "machine record updated"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish the reloaded machine record now; it is published when the machine registers again")
                }
            },
            None => tracing::info!("no lease at the moment; the reloaded record is published on registration"),
        }
        current.metadata = new.metadata;
        current.public_ip = new.public_ip;
        current.capacity = new.capacity;
    }
}

/// Rewrites the machine record, only while it is still held under this agent's lease.
async fn republish(
    client: &fleet_store::etcd::Client,
    keys: &Keys,
    record: &MachineRecord,
    lease: i64,
) -> anyhow::Result<()> {
    use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
    let key = keys.machine(&record.id);
    let value = fleet_model::schema::encode(record)?;
    let txn = Txn::new().when([Compare::lease(key.clone(), CompareOp::Equal, lease)]).and_then([TxnOp::put(
        key,
        value,
        Some(PutOptions::new().with_lease(lease)),
    )]);
    let resp =
        tokio::time::timeout(Duration::from_secs(5), client.kv_client().txn(txn)).await.context("etcd timed out")??;
    anyhow::ensure!(resp.succeeded(), "the machine record is no longer held by this agent's lease");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag reaches the setting it is named after.
    #[test]
    fn every_flag_overrides_its_setting() {
        let args = Args::try_parse_from([
            "fleet-agent",
            "--etcd-endpoints=https://e1:2379",
            "--etcd-prefix=/p/",
            "--public-ip=10.0.0.9",
            "--metadata=region=east, disk=ssd",
            "--lease-ttl-secs=6",
            "--etcd-ca-file=ca.pem",
            "--etcd-cert-file=m.pem",
            "--etcd-key-file=m.key",
        ])
        .expect("flags parse");
        let cfg: AgentConfig = fleet_config::layered(&AgentConfig::default(), &args).expect("layers");
        assert_eq!(
            (cfg.etcd_endpoints.as_slice(), cfg.etcd_prefix.as_str()),
            (&["https://e1:2379".to_string()][..], "/p/")
        );
        assert_eq!((cfg.public_ip.as_str(), cfg.lease_ttl_secs), ("10.0.0.9", 6));
        assert_eq!(cfg.metadata.get("disk").map(String::as_str), Some("ssd"));
        assert_eq!([&cfg.etcd_ca_file, &cfg.etcd_cert_file, &cfg.etcd_key_file], ["ca.pem", "m.pem", "m.key"]);
        assert!(Args::try_parse_from(["fleet-agent", "--metadata=novalue"]).is_err(), "bad metadata is refused");
    }
}
