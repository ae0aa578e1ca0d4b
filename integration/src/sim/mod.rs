//! `fleet-sim`: thousands of machines in one process, for the scale benchmarks.
//!
//! Each simulated machine is the real agent code ([`fleet_agent::Agent`] and its
//! [`Presence`]) with its own etcd lease and its own schedule watch, exactly as a real agent uses
//! etcd; only the service manager is the in-memory [`SimulatedSystemd`], and the unit files it
//! reads are in memory ([`MemoryUnitFiles`]). The engine is the real
//! `fleet-engine` binary. Agents share a small pool of etcd connections (as many machines'
//! connections would share etcd's gRPC server), which keeps the host's socket count sane.

use anyhow::{bail, Context, Result};

use fleet_agent::config::AgentConfig;

use fleet_agent::driver::SimulatedSystemd;

use fleet_agent::files::MemoryUnitFiles;

use fleet_agent::presence::Presence;

use fleet_agent::Agent;

use fleet_model::{Keys, MachineRecord};

use fleet_store::etcd::{connect, Client, EtcdConfig};

use fleet_store::retry::RetryPolicy;

use futures::StreamExt;

use serde::Serialize;

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use tokio::sync::watch;

mod child;
pub mod dashboard;
mod engine_alone;
mod events;
pub(crate) mod observe;
pub use child::{in_child, Simulation};
pub use engine_alone::{engine_alone, EngineReport, Submission};
pub use events::Told;
pub use observe::Written;
use observe::*;

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub etcd_endpoints: Vec<String>,
    /// Identity for `https://` etcd endpoints. All simulated machines share it (one etcd user per
    /// simulated machine would be 10,000 users); real machines each have their own.
    pub etcd_tls: Option<fleet_store::tls::ClientTls>,
    pub prefix: String,
    pub machines: usize,
    pub units: usize,
    /// Lease TTL of every simulated machine.
    pub lease_ttl_secs: i64,
    pub election_ttl_secs: i64,
    /// Where `fleet-engine` and `fleetctl` are.
    pub bin_dir: PathBuf,
    pub api_port: u16,
    /// Also measure machine loss, leader loss and idle cost (slower).
    pub faults: bool,
    pub idle_secs: u64,
    /// The engines' `event_history` (`Some(0)`: events off, for comparing their cost); `None`:
    /// the default.
    pub event_history: Option<usize>,
    /// Whether the engines record metrics (`false`: `metrics = false`, for comparing their cost).
    pub metrics: bool,
    /// The API over TLS, as a default install serves it (`listen_tls`): the engines' certificate
    /// and key, and the CA their clients (fleetctl, the API client) check it with. Without it,
    /// plain HTTP on loopback. Either way with an admin token.
    pub api_tls: Option<fleet_store::tls::ClientTls>,
    /// How the whole cluster's units go in (the engine alone is told apart: see
    /// [`engine_alone`]).
    pub submission: Submission,
    /// The leader runs while the whole cluster's units are submitted, as in a user's cluster.
    /// Without: it starts once they are all stored, so placement throughput is its own.
    pub leader_first: bool,
}

impl SimConfig {
    /// The API of the engine serving on `port` on loopback.
    pub fn api_url(&self, port: u16) -> String {
        let scheme = if self.api_tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{port}")
    }

    /// What fleetctl needs to check the API's certificate, if it is served over TLS.
    pub fn fleetctl_tls_args(&self) -> Vec<String> {
        match &self.api_tls {
            Some(t) => vec!["--ca-file".into(), t.ca_file.display().to_string()],
            None => Vec::new(),
        }
    }
}

/// Simulated machines sharing one etcd connection (each has a watch and a keepalive on it).
/// Over TLS, etcd 3.4 serves gRPC through Go's HTTP/2 server, whose write scheduler walks and
/// sorts every open stream of a connection for each frame it sends: at 125 machines to a
/// connection that walk was 10-15% of etcd's CPU while a million units were placed (pprof), a
/// cost that real agents, each with a connection of its own, do not put on it.
const MACHINES_PER_CONNECTION: usize = 10;

/// What one run measured. Times in seconds unless named otherwise.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct SimReport {
    pub machines: usize,
    pub units: usize,
    pub machines_up_secs: f64,
    pub submit_secs: f64,
    /// From the first request of the submission until every unit reports active (units are all
    /// stored before the leader starts placing them).
    pub converge_secs: f64,
    /// Schedule entries written per second by the leader, first to last.
    pub placements_per_sec: f64,
    /// etcd revisions (write transactions) per unit, from submission to convergence.
    pub txns_per_unit: f64,
    /// Keys written (put events) per unit, from submission to convergence.
    pub keys_per_unit: f64,
    /// Of those, writes of a unit's own keys (its record, schedule entries, states) per unit:
    /// docs/performance-notes.md says three. The rest are shared (bodies, machines, the leader's).
    #[serde(default)]
    pub own_keys_per_unit: f64,
    /// Of those, the schedules' and the states' writes with their values' bytes, from
    /// submission to convergence: what the agents' reports cost etcd beside the placement.
    #[serde(default)]
    pub schedule_writes: Written,
    #[serde(default)]
    pub state_writes: Written,
    pub list_units_secs: f64,
    pub list_units_rows: usize,
    /// `fleetctl start` (waiting for them, as it does by default) of 1,000 more units into the
    /// converged cluster, until it returns with all of them active.
    #[serde(default)]
    pub start_more_secs: Option<f64>,
    pub machine_lost_secs: Option<f64>,
    pub leader_lost_secs: Option<f64>,
    /// Of `leader_lost_secs`, until the standby said it leads: most of it is the old leader's
    /// election lease running out, the rest the new leader's placement and the agent's start.
    #[serde(default)]
    pub leader_elected_secs: Option<f64>,
    pub idle_writes_per_min: Option<f64>,
    pub idle_engine_cpu_secs_per_min: Option<f64>,
    pub idle_sim_cpu_secs_per_min: Option<f64>,
    /// What `fleetctl events --follow` printed over the idle window, by kind (none expected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_events: Option<Told>,
    /// Units active on two machines at the end (must be 0), and units never active (must be 0).
    pub duplicates: usize,
    pub missing: usize,
    /// Whether etcd was reached over TLS with a client certificate (the default install).
    #[serde(default)]
    pub etcd_tls: bool,
    /// Whether the API was served over TLS.
    #[serde(default)]
    pub api_tls: bool,
    /// Whether the units went in by `fleetctl start --no-block --names-from` (else the API).
    #[serde(default)]
    pub submitted_by_fleetctl: bool,
    /// Whether the leader ran while the units were submitted (else it started once they were
    /// stored).
    #[serde(default)]
    pub leader_first: bool,
    /// The dashboard in a browser at this size (none without chromium).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dashboard: Option<dashboard::DashboardReport>,
    /// Why the run did not finish, if it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

struct SimMachine {
    id: String,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A child process killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A simulation's files (engine logs, configuration): removed when it ends well, kept when it
/// fails (or with `FLEET_SIM_KEEP`), since the engines' logs are what says why.
struct Scratch {
    dir: PathBuf,
    /// Set once the simulation has measured everything.
    done: bool,
}

impl Scratch {
    fn new(dir: PathBuf) -> Scratch {
        Scratch { dir, done: false }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.done || std::env::var_os("FLEET_SIM_KEEP").is_some() {
            eprintln!("sim: its files, engine logs included, are kept in {}", self.dir.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The simulated machines' directories (`units_dir`: each agent's lease file; their unit files
/// are in memory, see `start_machine`), on tmpfs as a real agent's are (`/run/fleet`). Removed
/// when dropped, kept logs or not.
struct MachineDirs(PathBuf);

impl MachineDirs {
    fn new() -> Result<MachineDirs> {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        Ok(MachineDirs(crate::process::scratch_dir(&base, "fl-sim-machines")?))
    }
}

impl Drop for MachineDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn machine_id(i: usize) -> String {
    format!("5eed{:028x}", i)
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the name: state is 0, utime 11, stime 12 (clock ticks, 100 per second here).
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident memory of a process in MiB (`VmHWM`: what it needed at its largest), 0 if unknown.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0.0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The simulation's engines' configuration: its etcd identity, and one admin token for the
/// harness (the API is served on loopback, where tokens are the way in).
fn engine_config(cfg: &SimConfig, dir: &Path) -> Result<(PathBuf, String)> {
    let token = fleet_engine::pki::new_token()?;
    let mut text = String::new();
    if let Some(t) = &cfg.etcd_tls {
        text += &format!(
            "etcd_ca_file = {:?}\netcd_cert_file = {:?}\netcd_key_file = {:?}\n",
            t.ca_file.display().to_string(),
            t.cert_file.display().to_string(),
            t.key_file.display().to_string()
        );
    }
    if let Some(t) = &cfg.api_tls {
        text += &format!(
            "tls_cert_file = {:?}\ntls_key_file = {:?}\n",
            t.cert_file.display().to_string(),
            t.key_file.display().to_string()
        );
    }
    text += &format!(
        "\n[[auth.tokens]]\nname = \"fleet-sim\"\nrole = \"admin\"\nsha256 = \"{}\"\n",
        fleet_engine::pki::token_hash(&token)
    );
    // Top-level keys before the first table.
    if let Some(n) = cfg.event_history {
        text = format!("event_history = {n}\n{text}");
    }
    if !cfg.metrics {
        text = format!("metrics = false\n{text}");
    }
    let path = dir.join("engine.toml");
    std::fs::write(&path, text)?;
    Ok((path, token))
}

async fn start_engine(cfg: &SimConfig, config: &Path, name: &str, port: u16, lead: bool) -> Result<Child> {
    // Beside its configuration, in the simulation's directory: kept with it when a run fails.
    let log_path = config.with_file_name(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let child = std::process::Command::new(cfg.bin_dir.join("fleet-engine"))
        .arg("--config")
        .arg(config)
        .args(["--etcd-endpoints", &cfg.etcd_endpoints.join(",")])
        .args(["--etcd-prefix", &cfg.prefix])
        .args(match &cfg.api_tls {
            // Its plain API on a socket of its own (the default socket is shared by both).
            Some(_) => vec![
                "--listen".to_string(),
                config.with_file_name(format!("{name}.sock")).display().to_string(),
                "--listen-tls".to_string(),
                format!("127.0.0.1:{port}"),
            ],
            None => vec!["--listen".to_string(), format!("127.0.0.1:{port}")],
        })
        .args(["--engine-id", name])
        .args(["--election-ttl-secs", &cfg.election_ttl_secs.to_string()])
        .args(if lead { &[][..] } else { &["--no-lead"][..] })
        .env("RUST_LOG", std::env::var("FLEET_SIM_ENGINE_LOG").unwrap_or_else(|_| "info".into()))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", cfg.bin_dir.join("fleet-engine").display()))?;
    Ok(Child(child))
}

/// Whether an engine's API answers from its view (it refuses with 503 until the view is listed).
async fn view_loaded(cfg: &SimConfig, http: &reqwest::Client, port: u16) -> bool {
    let url = format!("{}/fleet/v1/machines", cfg.api_url(port));
    http.get(url).send().await.is_ok_and(|r| r.status().is_success())
}

/// `/engine/status` of the engine serving on `port`, if it answers.
async fn engine_status(cfg: &SimConfig, http: &reqwest::Client, port: u16) -> Option<serde_json::Value> {
    http.get(format!("{}/engine/status", cfg.api_url(port))).send().await.ok()?.json().await.ok()
}

async fn leader_of(cfg: &SimConfig, http: &reqwest::Client, port: u16) -> Option<bool> {
    engine_status(cfg, http, port).await?["leader"].as_bool()
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + timeout;
    while !check().await {
        if Instant::now() > until {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn start_machine(cfg: &SimConfig, client: Client, i: usize, dir: &Path) -> Result<SimMachine> {
    let id = machine_id(i);
    let units_dir = dir.join(&id);
    std::fs::create_dir_all(&units_dir)?;
    let agent_cfg = AgentConfig {
        etcd_prefix: cfg.prefix.clone(),
        units_dir: units_dir.clone(),
        state_dir: units_dir.clone(),
        lease_ttl_secs: cfg.lease_ttl_secs,
        ..AgentConfig::default()
    };
    let record = MachineRecord {
        id: id.clone(),
        public_ip: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
        metadata: [("sim".to_string(), "yes".to_string())].into(),
        version: env!("CARGO_PKG_VERSION").into(),
        lease_ttl: cfg.lease_ttl_secs,
        schedule_pages: true,
        ..Default::default()
    };
    let (_record_tx, record_rx) = watch::channel(record);
    let (lease_tx, lease_rx) = watch::channel(None);
    let (cleaned_tx, cleaned_rx) = watch::channel(fleet_agent::presence::Cleaned::default());
    let presence = Presence {
        cleaned: cleaned_rx,
        client: client.clone(),
        keys: Keys::new(&cfg.prefix),
        record: record_rx,
        ttl: cfg.lease_ttl_secs,
        lease_file: units_dir.join(".lease"),
        registered_file: None,
        metrics: None,
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    // Unit files in memory, read from there by the simulated systemd: a million small files on
    // one host's tmpfs cost the simulation ~45 CPU-seconds in the kernel (`perf`), which real
    // agents spend on their own machines.
    let files = MemoryUnitFiles::new(units_dir.clone());
    let driver = SimulatedSystemd::new(Duration::from_millis(4)).with_files(files.clone());
    let store = fleet_store::kv::EtcdStore::new(client);
    let agent = Agent::with_files(&agent_cfg, store, id.clone(), driver, files).await?;
    let presence_task = tokio::spawn(async move {
        let _keep = _record_tx;
        presence.run(lease_tx).await
    });
    let agent_task = tokio::spawn(async move {
        if let Err(e) = agent.run(lease_rx, cleaned_tx, shutdown_rx).await {
            tracing::warn!(error = %e, "simulated agent stopped");
        }
    });
    Ok(SimMachine { id, shutdown, tasks: vec![presence_task, agent_task] })
}

impl SimMachine {
    /// Power loss: the tasks stop, the lease is left to expire.
    fn kill(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A scratch directory named `name`, the engines' configuration in it (with an admin token), and
/// an HTTP client carrying that token.
fn workspace(cfg: &SimConfig, name: &str) -> Result<(PathBuf, PathBuf, String, reqwest::Client)> {
    let dir = crate::process::scratch_dir(&std::env::temp_dir(), name)?;
    let (engine_config, token) = engine_config(cfg, &dir)?;
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse()?);
    let mut http = reqwest::Client::builder().timeout(Duration::from_secs(120)).default_headers(auth);
    if let Some(t) = &cfg.api_tls {
        let ca = std::fs::read(&t.ca_file).with_context(|| format!("cannot read {}", t.ca_file.display()))?;
        http = http.add_root_certificate(reqwest::Certificate::from_pem(&ca)?);
    }
    let http = http.build()?;
    Ok((dir, engine_config, token, http))
}

/// The admin's API client of the engine serving on `port` (a long timeout: 5,000 units a request).
fn api_client(cfg: &SimConfig, port: u16, token: &str) -> Result<fleet_client::Client> {
    let creds = fleet_client::Credentials {
        token: Some(token.to_string()),
        ca_file: cfg.api_tls.as_ref().map(|t| t.ca_file.clone()),
        ..Default::default()
    };
    Ok(fleet_client::Client::new(&cfg.api_url(port), Duration::from_secs(120), &creds)?)
}

/// Submits `names` in requests of 5,000 units, two at a time.
async fn submit_all(api: &fleet_client::Client, names: &[String]) -> Result<()> {
    let results: Vec<Result<()>> =
        futures::stream::iter(names.chunks(5_000)).map(|chunk| submit(api, chunk)).buffer_unordered(2).collect().await;
    results.into_iter().collect()
}

async fn submit(api: &fleet_client::Client, names: &[String]) -> Result<()> {
    let units: Vec<fleet_client::Unit> = names
        .iter()
        .map(|n| fleet_client::Unit {
            name: n.clone(),
            desired_state: "launched".into(),
            options: vec![fleet_model::UnitOption {
                section: "Service".into(),
                name: "ExecStart".into(),
                value: "/bin/sleep infinity".into(),
            }],
            ..Default::default()
        })
        .collect();
    // An engine that just started answers 503 until its view is loaded; the client asks a few
    // times, and this goes on for a minute. Creating is idempotent: units created by an earlier
    // attempt count as created.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match api.create(&units).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < until && matches!(e.status(), Some(503) | None) => {
                tracing::warn!(error = %e, "POST /fleet/v1/units; retrying")
            }
            Err(e) => return Err(e).context("POST /fleet/v1/units"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `fleetctl list-units` against `api` as the simulation's admin: (seconds, rows).
fn time_list_units(cfg: &SimConfig, api: &str, token: &str) -> Result<(f64, usize)> {
    let l = list_units_timed(cfg, api, token)?;
    Ok((l.secs, l.rows))
}

/// What one `fleetctl list-units` took, read as it printed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listing {
    /// From spawning fleetctl until its first row (after the legend) was printed.
    pub first_row_secs: f64,
    /// Until it exited.
    pub secs: f64,
    pub rows: usize,
}

/// Runs `fleetctl list-units` against `api` and reads its output as it comes.
pub fn list_units_timed(cfg: &SimConfig, api: &str, token: &str) -> Result<Listing> {
    use std::io::BufRead;
    let t = Instant::now();
    let mut child = std::process::Command::new(cfg.bin_dir.join("fleetctl"))
        .args(["--endpoint", api])
        .args(cfg.fleetctl_tls_args())
        .arg("list-units")
        .env("FLEETCTL_TOKEN", token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("fleetctl list-units")?;
    let stdout = child.stdout.take().context("fleetctl list-units: no stdout")?;
    let mut listing = Listing::default();
    let mut lines = std::io::BufReader::with_capacity(1 << 20, stdout).lines();
    // The legend comes first; the first row is the line after it.
    let _legend = lines.next();
    let mut previous = String::new();
    for line in lines {
        let line = line.context("reading fleetctl list-units")?;
        // Each row is a whole table row (UNIT MACHINE ACTIVE SUB), in unit order.
        let cells: Vec<&str> = line.split('\t').filter(|c| !c.is_empty()).collect();
        if cells.len() != 4 || cells[0] < previous.as_str() {
            bail!("fleetctl list-units printed a row out of place after {previous:?}: {line:?}");
        }
        // MACHINE is "id.../address": every simulated machine has a 10.x.y.z address.
        if !cells[1].split_once('/').is_some_and(|(_, ip)| ip.trim().starts_with("10.")) {
            bail!("fleetctl list-units printed a row without its machine's address: {line:?}");
        }
        previous = cells[0].to_string();
        if listing.rows == 0 {
            listing.first_row_secs = t.elapsed().as_secs_f64();
        }
        listing.rows += 1;
    }
    let out = child.wait_with_output().context("fleetctl list-units")?;
    listing.secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("fleetctl list-units: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(listing)
}

/// etcd's database size in bytes (the member's file, as `etcdctl endpoint status` shows it).
pub async fn etcd_db_bytes(client: &Client) -> Result<i64> {
    Ok(client.maintenance_client().status().await.context("etcd status")?.db_size())
}

/// The runtime a simulation runs in. Its 10,000 agents share one process where real agents
/// have one each: every agent's reconcile pass writes its unit files in one blocking task, and
/// with tokio's default (up to 512 blocking threads, each stopped after 10 s idle) the first
/// placements of a million units had it start and stop threads, and agents lagged placement
/// (10,000 of 107,000 placed units active at 30 s). A few long-lived ones keep up (123,000 of
/// 123,000).
pub fn runtime(worker_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        b.worker_threads(n);
    }
    b.max_blocking_threads(8).thread_keep_alive(Duration::from_secs(600)).enable_all().build()
}

/// Runs one simulation and cleans up its etcd prefix, processes and files.
pub async fn run(cfg: SimConfig) -> Result<SimReport> {
    let keys = Keys::new(&cfg.prefix);
    let etcd = EtcdConfig {
        endpoints: cfg.etcd_endpoints.clone(),
        request_timeout: Duration::from_secs(10),
        tls: cfg.etcd_tls.as_ref().map(|t| t.etcd_options()).transpose()?,
    };
    let mut pool = Vec::new();
    // A real agent has a connection of its own, with a watch and a keepalive on it; simulated
    // ones share (see MACHINES_PER_CONNECTION).
    for _ in 0..(cfg.machines / MACHINES_PER_CONNECTION).clamp(8, 1_000) {
        pool.push(connect(&etcd, RetryPolicy::default()).await.context("etcd")?);
    }
    let admin = pool[0].clone();
    admin.kv_client().delete(keys.prefix(), Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    let (dir, engine_config, token, http) = workspace(&cfg, "fleet-sim")?;
    let mut scratch = Scratch::new(dir.clone());
    let machine_dirs = MachineDirs::new()?;
    let mut report =
        SimReport { machines: cfg.machines, units: cfg.units, etcd_tls: cfg.etcd_tls.is_some(), ..Default::default() };

    // Units go in through an API-only replica and are placed by a leader started once they are
    // all stored, so placement throughput is the engine's own, not the submission rate.
    let api_engine = start_engine(&cfg, &engine_config, "sim-api", cfg.api_port, false).await?;
    let api = api_client(&cfg, cfg.api_port, &token)?;
    wait_until("the API replica to serve", Duration::from_secs(30), || async {
        leader_of(&cfg, &http, cfg.api_port).await == Some(false)
    })
    .await?;

    let started = Instant::now();
    let machines: Vec<SimMachine> = futures::stream::iter(0..cfg.machines)
        .map(|i| {
            let client = pool[i % pool.len()].clone();
            let cfg = &cfg;
            let dir = &machine_dirs.0;
            async move { start_machine(cfg, client, i, dir).await }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    wait_until("every machine registered", Duration::from_secs(300), || async {
        let mut kv = admin.kv_client();
        let opts = etcd_client::GetOptions::new().with_prefix().with_count_only();
        kv.get(keys.machines(), Some(opts)).await.map(|r| r.count() as usize >= cfg.machines).unwrap_or(false)
    })
    .await?;
    report.machines_up_secs = started.elapsed().as_secs_f64();
    tracing::info!(machines = cfg.machines, secs = report.machines_up_secs, "machines up");

    let from = revision(&admin, &keys).await? + 1;
    let mut observed = follow(admin.clone(), keys.clone(), from, Watched::Placement);
    let names: Vec<String> = match cfg.submission {
        Submission::Api => (0..cfg.units).map(|i| format!("sim-{i:06}.service")).collect(),
        Submission::Fleetctl => (0..cfg.units).map(|i| format!("sim@{i:06}.service")).collect(),
    };
    // The units are all stored before the leader starts, so that placement throughput is the
    // engine's own. (A leader placing them as fleetctl stores them was tried at a million
    // units: the submission, the leader's many small passes and the agents together pushed
    // etcd past its apply backlog, and it refused requests with "too many requests".)
    let leader_port = cfg.api_port + 1;
    let early_leader = match cfg.leader_first {
        true => {
            let e = start_engine(&cfg, &engine_config, "sim-e1", leader_port, true).await?;
            wait_until("the leader to lead", Duration::from_secs(30), || async {
                leader_of(&cfg, &http, leader_port).await == Some(true)
            })
            .await?;
            Some(e)
        }
        false => None,
    };
    report.leader_first = cfg.leader_first;
    let t0 = Instant::now();
    match cfg.submission {
        Submission::Api => submit_all(&api, &names).await?,
        Submission::Fleetctl => {
            engine_alone::start_with_fleetctl(&cfg, &dir, &token, "sim@.service", &names, false).await?
        }
    }
    report.submitted_by_fleetctl = cfg.submission == Submission::Fleetctl;
    report.api_tls = cfg.api_tls.is_some();
    report.submit_secs = t0.elapsed().as_secs_f64();
    let mut engine = match early_leader {
        Some(e) => e,
        None => start_engine(&cfg, &engine_config, "sim-e1", leader_port, true).await?,
    };
    if !observe_until(&mut observed, t0 + Duration::from_secs(600), |o| o.all_active(cfg.units)).await? {
        let o = observed.borrow().clone();
        let o = o.lock().unwrap_or_else(|e| e.into_inner());
        bail!(
            "units did not all become active within 600 s: {} of {} active, {} schedule entries seen",
            o.active_units,
            cfg.units,
            o.placed
        );
    }
    report.converge_secs = t0.elapsed().as_secs_f64();
    let to = revision(&admin, &keys).await?;
    // Listed before the observer's lock is taken: the lock is not held across a request.
    let (others, records) = puts_outside(&admin, &keys, from).await?;
    {
        let o = observed.borrow().clone();
        let o = o.lock().unwrap_or_else(|e| e.into_inner());
        report.placements_per_sec = o.placement_rate();
        report.keys_per_unit = (o.puts + others) as f64 / cfg.units as f64;
        report.own_keys_per_unit = (o.own_puts + records) as f64 / cfg.units as f64;
        report.schedule_writes = o.schedule_writes;
        report.state_writes = o.state_writes;
    }
    report.txns_per_unit = (to - from + 1) as f64 / cfg.units as f64;
    tracing::info!(secs = report.converge_secs, "converged");

    // The observer reads etcd; the API replica's view follows its own watch and may still be
    // taking in the last states: list again until it shows them all (a minute at most).
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        (report.list_units_secs, report.list_units_rows) = time_list_units(&cfg, &cfg.api_url(cfg.api_port), &token)?;
        if report.list_units_rows >= cfg.units || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if cfg.faults {
        // What a user of a cluster this size does: start 1,000 more units with fleetctl, which
        // returns once they are all active.
        let more: Vec<String> = (0..1_000).map(|i| format!("sim-more@{i}.service")).collect();
        let t = Instant::now();
        engine_alone::start_with_fleetctl(&cfg, &dir, &token, "sim-more@.service", &more, true).await?;
        let took = t.elapsed().as_secs_f64();
        let all_active = |o: &Observed| more.iter().all(|u| o.active.get(u).is_some_and(|m| !m.is_empty()));
        if !observe_until(&mut observed, Instant::now() + Duration::from_secs(30), all_active).await? {
            bail!("fleetctl start returned, but its 1,000 units are not all active");
        }
        report.start_more_secs = Some(took);
        tracing::info!(secs = took, "fleetctl start of 1,000 more units");

        // Idle: nothing changes; count etcd writes and CPU over a window.
        // Writes are counted under this simulation's prefix (etcd's revision is shared with
        // whatever else uses the same etcd), all of it: the placement's observer watches
        // schedules and states only.
        let everything = follow(admin.clone(), keys.clone(), revision(&admin, &keys).await? + 1, Watched::All);
        let writes = || {
            let o = everything.borrow().clone();
            let n = o.lock().unwrap_or_else(|e| e.into_inner()).writes;
            n
        };
        let engines_cpu = || cpu_secs(engine.0.id()) + cpu_secs(api_engine.0.id());
        let apis = [cfg.api_url(cfg.api_port), cfg.api_url(leader_port)];
        let since = revision(&admin, &keys).await?;
        let window = async {
            let before = (writes(), engines_cpu(), cpu_secs(std::process::id()));
            tokio::time::sleep(Duration::from_secs(cfg.idle_secs)).await;
            (before, (writes(), engines_cpu(), cpu_secs(std::process::id())))
        };
        let (((rev0, e0, s0), (rev1, e1, s1)), told) = events::told_over(&cfg, &apis, &token, since, window).await;
        report.idle_events = told;
        let per_min = 60.0 / cfg.idle_secs as f64;
        report.idle_writes_per_min = Some((rev1 - rev0) as f64 * per_min);
        report.idle_engine_cpu_secs_per_min = Some((e1 - e0) * per_min);
        report.idle_sim_cpu_secs_per_min = Some((s1 - s0) * per_min);

        // The dashboard in a browser, after the idle window (its probe unit is a change) and
        // before a machine is lost (it counts every machine).
        let page = cfg.api_url(cfg.api_port);
        match dashboard::measure(&page, &http, &token, cfg.machines, cfg.units + more.len()).await {
            Ok(d) => report.dashboard = d,
            Err(e) => tracing::warn!(error = %e, "the dashboard could not be measured"),
        }

        // A machine lost: its units active elsewhere.
        let victim = &machines[0];
        let theirs: Vec<String> = {
            let o = observed.borrow().clone();
            let o = o.lock().unwrap_or_else(|e| e.into_inner());
            o.active.iter().filter(|(_, ms)| ms.contains(&victim.id)).map(|(u, _)| u.clone()).collect()
        };
        let t = Instant::now();
        victim.kill();
        let vid = victim.id.clone();
        let moved =
            |o: &Observed| theirs.iter().all(|u| o.active.get(u).is_some_and(|ms| ms.iter().any(|m| *m != vid)));
        // A wait that timed out is a failure, not a measurement of 120 s.
        if !observe_until(&mut observed, t + Duration::from_secs(120), moved).await? {
            bail!("the lost machine's {} units were not active elsewhere within 120 s", theirs.len());
        }
        report.machine_lost_secs = Some(t.elapsed().as_secs_f64());

        // The leader lost: a standby engine takes over and places a new unit.
        let standby_port = cfg.api_port + 2;
        let _standby = start_engine(&cfg, &engine_config, "sim-e2", standby_port, true).await?;
        // A standby in a real cluster has long had its view; one started a moment ago may still
        // be listing 100,000 units, which is not what this measures.
        wait_until("the standby engine to serve from a loaded view", Duration::from_secs(120), || async {
            leader_of(&cfg, &http, standby_port).await == Some(false) && view_loaded(&cfg, &http, standby_port).await
        })
        .await?;
        let t = Instant::now();
        let _ = engine.0.kill();
        let _ = engine.0.wait();
        submit(&api, &["sim-after-failover.service".to_string()]).await?;
        let elected: std::cell::Cell<Option<f64>> = Default::default();
        wait_until("a unit placed by the new leader", Duration::from_secs(60), || {
            let (elected, observed, http, cfg) = (&elected, &observed, &http, &cfg);
            async move {
                if elected.get().is_none() && leader_of(cfg, http, standby_port).await == Some(true) {
                    elected.set(Some(t.elapsed().as_secs_f64()));
                }
                let o = observed.borrow().clone();
                let o = o.lock().unwrap_or_else(|e| e.into_inner());
                o.active.get("sim-after-failover.service").is_some_and(|m| !m.is_empty())
            }
        })
        .await?;
        report.leader_lost_secs = Some(t.elapsed().as_secs_f64());
        report.leader_elected_secs = elected.get();
    }

    {
        let o = observed.borrow().clone();
        let o = o.lock().unwrap_or_else(|e| e.into_inner());
        report.duplicates = o.active.values().filter(|m| m.len() > 1).count();
        report.missing = names.iter().filter(|n| o.active.get(*n).is_none_or(|m| m.is_empty())).count();
    }

    for m in &machines {
        let _ = m.shutdown.send(true);
        m.kill();
    }
    drop(engine);
    drop(api_engine);
    let _ = admin.kv_client().delete(keys.prefix(), Some(etcd_client::DeleteOptions::new().with_prefix())).await;
    scratch.done = true;
    Ok(report)
}
