//! `./lab bench`: the scale benchmark. Simulated clusters of growing size (`fleet-sim`, against a
//! dedicated single-member etcd) and measures on the lab's real machines (real systemd), written
//! as a table to `docs/performance.md`.

mod cli;
mod lab;
mod million;
mod render;
pub use million::{million, render_from_log as million_from_log, MILLION_FROM};

use crate::sim::{run as run_sim, EngineReport, SimConfig, SimReport};
use crate::LabState;
use anyhow::{bail, Context, Result};
pub use cli::cli_measures;
use lab::*;
use render::*;
pub use render::{now_utc, render, render_from_log};
use std::path::{Path, PathBuf};
use std::time::Duration;

const BENCH_ETCD_PORT: u16 = 12600;

/// What the real-systemd part measured.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct LabReport {
    pub machines: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub thousand_units_secs: f64,
    pub destroy_thousand_secs: f64,
    pub agent_rss_mib_with_1000_units: f64,
    pub agent_idle_cpu_secs_per_min: f64,
    pub agent_idle_wakeups_per_min: f64,
}

/// What `fleetctl` itself achieved on the lab, run as a user runs it (the release binary, a new
/// process per command, TLS with the admin's client certificate).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct CliReport {
    pub cli_machines: usize,
    /// `fleetctl start FILE` spawned -> systemd's ActiveEnterTimestamp of the unit.
    pub one_unit_p50_ms: Option<f64>,
    pub one_unit_p99_ms: Option<f64>,
    /// Units started in one `fleetctl start` of template instances.
    pub units: usize,
    /// `fleetctl start` spawned -> it returned, every unit active in systemd.
    pub start_secs: f64,
    /// The latest ActiveEnterTimestamp of those units, after the spawn.
    pub last_active_secs: f64,
    /// Requests the engine served for that `fleetctl start`.
    pub start_requests: u64,
    /// `fleetctl destroy` spawned -> it returned, no machine reporting any of them.
    pub destroy_secs: f64,
    pub destroy_requests: u64,
}

/// etcd 3.4 (Debian 12's) copies its whole uncommitted write buffer to fill in the revision of
/// every response, lease keepalives included (etcd-io/etcd#20184, fixed upstream in 2025). With
/// 10,000 machines renewing leases during a large placement that copy was 58% of etcd's CPU
/// (profiled); apply fell seconds behind, renewals were refused and leases expired. Committing
/// the backend every 10 ms or 500 writes keeps that buffer small. docs/configuration.md recommends
/// the same for large clusters.
pub const LARGE_CLUSTER_ETCD_FLAGS: [&str; 4] = ["--backend-batch-interval", "10ms", "--backend-batch-limit", "500"];

/// A dedicated etcd for the simulations, on tmpfs, killed (by PID) when dropped.
struct BenchEtcd {
    child: std::process::Child,
    dir: PathBuf,
    /// With [`BenchEtcd::start_secure`]: its own CA and the administrator's identity.
    tls: Option<fleet_store::tls::ClientTls>,
}

impl BenchEtcd {
    fn start() -> Result<Self> {
        Self::spawn(None)
    }

    /// As a default install's etcd: TLS, and only clients with a certificate of its CA (a CA of
    /// its own, made here; the simulated cluster uses its administrator's identity).
    fn start_secure() -> Result<Self> {
        let pki = PathBuf::from("/dev/shm/fl-bench-etcd-pki");
        let _ = std::fs::remove_dir_all(&pki);
        let ca = fleet_engine::pki::Ca::load_or_create(&pki).context("bench etcd's CA")?;
        let local = [std::net::IpAddr::from([127, 0, 0, 1])];
        let localhost = ["localhost".to_string()];
        use fleet_engine::pki::{Usage, ENGINE_IDENTITY, ROOT_IDENTITY};
        ca.issue_to(&pki, "etcd", "etcd", &local, &localhost, Usage::Both).context("bench etcd's certificate")?;
        ca.issue_to(&pki, "root", ROOT_IDENTITY, &[], &[], Usage::Client).context("bench etcd's client identity")?;
        // The simulated engines' API certificate (see `BenchEtcd::api_tls`).
        ca.issue_to(&pki, "engine", ENGINE_IDENTITY, &local, &localhost, Usage::Both)
            .context("the engines' certificate")?;
        Self::spawn(Some(crate::pki::identity_in(&pki, "root")))
    }

    fn spawn(tls: Option<fleet_store::tls::ClientTls>) -> Result<Self> {
        let dir = PathBuf::from("/dev/shm/fl-bench-etcd");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.with_extension("log"))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{BENCH_ETCD_PORT}");
        let peer = format!("http://127.0.0.1:{}", BENCH_ETCD_PORT + 1);
        let mut cmd = std::process::Command::new("etcd");
        cmd.args(["--name", "flbench", "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("flbench={peer}")])
            .args(["--quota-backend-bytes", "8589934592", "--auto-compaction-retention", "1"])
            .args(LARGE_CLUSTER_ETCD_FLAGS);
        if let Some(t) = &tls {
            let pki = t.ca_file.parent().context("bench etcd's CA directory")?;
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&t.ca_file)
                .arg("--cert-file")
                .arg(pki.join("etcd.pem"))
                .arg("--key-file")
                .arg(pki.join("etcd.key"));
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start etcd for the benchmark")?;
        Ok(BenchEtcd { child, dir, tls })
    }

    /// With [`BenchEtcd::start_secure`]: the engines' certificate for serving the API over TLS,
    /// from the same CA.
    fn api_tls(&self) -> Option<fleet_store::tls::ClientTls> {
        Some(crate::pki::identity_in(self.tls.as_ref()?.ca_file.parent()?, "engine"))
    }

    fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{BENCH_ETCD_PORT}")
    }

    /// A client, with its administrator's identity when secure.
    async fn client(&self) -> Result<etcd_client::Client> {
        let cfg = fleet_store::etcd::EtcdConfig {
            endpoints: vec![self.endpoint()],
            request_timeout: Duration::from_secs(60),
            tls: self.tls.as_ref().map(|t| t.etcd_options()).transpose()?,
        };
        Ok(fleet_store::etcd::connect(&cfg, fleet_store::retry::RetryPolicy { attempts: 1, ..Default::default() })
            .await?)
    }

    /// Waits until it answers a read.
    async fn ready(&self) -> Result<()> {
        let until = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async { anyhow::Ok(self.client().await?.get("/", None).await?) };
            match tokio::time::timeout(Duration::from_secs(3), attempt).await {
                Ok(Ok(_)) => return Ok(()),
                _ if std::time::Instant::now() > until => {
                    bail!("the bench's etcd at {} did not become ready in 30 s", self.endpoint())
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

impl Drop for BenchEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(pki) = self.tls.as_ref().and_then(|t| t.ca_file.parent()) {
            let _ = std::fs::remove_dir_all(pki);
        }
    }
}

/// Runs the simulated sizes, then the lab measures if `lab` is given, and writes `out`.
/// Runs the simulated `sizes`, the engine alone at `engine_size`, then (with a lab) the
/// real-systemd measures, and writes `out`.
/// Brings up a lab of this many machines (replacing any running one).
pub type LabUp<'a> = &'a dyn Fn(usize) -> futures::future::BoxFuture<'static, Result<LabState>>;

pub async fn bench(
    sizes: &[(usize, usize)],
    engine_size: (usize, usize),
    bin_dir: &Path,
    lab_up: Option<LabUp<'_>>,
    out: &Path,
) -> Result<()> {
    let date = now_utc();
    eprintln!("{}", serde_json::to_string(&Measured { measured_at: date.clone() })?);
    let etcd = BenchEtcd::start()?;
    etcd.ready().await?;
    let mut sims = Vec::new();
    for (i, (machines, units)) in sizes.iter().enumerate() {
        eprintln!("bench: {machines} simulated machines, {units} units");
        let report = run_sim(SimConfig {
            etcd_tls: None,
            etcd_endpoints: vec![etcd.endpoint()],
            prefix: format!("/fleet-bench-{i}/"),
            machines: *machines,
            units: *units,
            // Keepalives grow with machines (one per TTL/3 each): 10,000 machines on 10 s
            // leases would be 3,000 renewals a second on the same two cores as everything else.
            lease_ttl_secs: if *machines > 2_000 { 30 } else { 10 },
            election_ttl_secs: 5,
            bin_dir: bin_dir.to_path_buf(),
            api_port: 12570,
            faults: true,
            idle_secs: 30,
            event_history: None,
            metrics: true,
            submission: crate::sim::Submission::Api,
            leader_first: false,
            api_tls: None,
        })
        .await
        .unwrap_or_else(|e| SimReport {
            machines: *machines,
            units: *units,
            error: Some(format!("{e:#}")),
            ..Default::default()
        });
        eprintln!("{}", serde_json::to_string(&report)?);
        sims.push(report);
    }
    // The engine alone (no agents competing for the host), at the target size: as installed,
    // without events, and without metrics, in turns, so what each costs shows against the
    // run-to-run noise of this host. One run first that is not counted (the first of a series
    // ran slower), and the order within a round rotates, so no kind always goes first: in a
    // run with a fixed order, the kind that went first used 15% more CPU than the others in the
    // median although it differed from one of them only in metrics, which cost no work per unit.
    let (machines, units) = engine_size;
    let mut engines = Vec::new();
    const KINDS: [(bool, bool); 3] = [(true, true), (false, true), (true, false)];
    for turn in 0..=3 * ENGINE_ALONE_ROUNDS {
        let warm_up = turn == 0;
        let counted = turn.saturating_sub(1);
        let (round, place) = (counted / 3, counted % 3);
        let (events, metrics) = if warm_up { KINDS[0] } else { KINDS[(place + round) % 3] };
        let on = |b: bool| if b { "on" } else { "off" };
        eprintln!(
            "bench: the engine alone: {machines} machines registered, {units} units, events {}, metrics {}",
            on(events),
            on(metrics)
        );
        let cfg = SimConfig {
            etcd_tls: None,
            etcd_endpoints: vec![etcd.endpoint()],
            prefix: "/fleet-bench-engine/".into(),
            machines,
            units,
            lease_ttl_secs: 3600,
            election_ttl_secs: 5,
            bin_dir: bin_dir.to_path_buf(),
            api_port: 12570,
            faults: false,
            idle_secs: 0,
            event_history: if events { None } else { Some(0) },
            metrics,
            submission: crate::sim::Submission::Api,
            leader_first: false,
            api_tls: None,
        };
        match crate::sim::engine_alone(cfg, crate::sim::Submission::Api).await {
            // Not printed as a report: `--render-from` counts every report it finds.
            Ok(r) if warm_up => eprintln!("bench: warm-up run, not counted: {:.2} s CPU", r.engine_cpu_secs),
            Ok(mut r) => {
                r.round = Some(round);
                eprintln!("{}", serde_json::to_string(&r)?);
                engines.push(r);
            }
            Err(e) => eprintln!("bench: the engine alone did not finish: {e:#}"),
        }
    }
    drop(etcd);
    let (mut lab_report, mut cli) = (None, Vec::new());
    if let Some(lab_up) = lab_up {
        let r = lab_and_cli(lab_up).await?;
        (lab_report, cli) = (Some(r.lab), r.cli);
        sims.push(r.secure_sim);
        engines.extend(r.secure_engine);
    }
    // The million-unit section is written by its own runs; a full bench keeps it.
    let kept = std::fs::read_to_string(out).ok().and_then(|p| million::kept_section(&p));
    let mut page = render(&date, &sims, &engines, lab_report.as_ref(), &cli);
    if let Some(k) = kept {
        page = format!("{}\n\n{k}\n", page.trim_end());
    }
    std::fs::write(out, page)?;
    eprintln!("bench: wrote {}", out.display());
    Ok(())
}

/// The real-systemd part: fleetctl on 3 machines (one unit, 1,000 units), then on 5 machines
/// the API-level measures and fleetctl with 1,000 and 10,000 units. Each report is printed as a
/// JSON line, so `--render-from` can rebuild the page.
pub async fn lab_and_cli(lab_up: LabUp<'_>) -> Result<LabResults> {
    let mut cli = Vec::new();
    let three = lab_up(3).await?;
    eprintln!("bench: fleetctl on 3 lab machines");
    let r = cli_measures(&three, 1_000, 50).await?;
    eprintln!("{}", serde_json::to_string(&r)?);
    cli.push(r);
    let five = lab_up(5).await?;
    eprintln!("bench: real systemd on {} lab machines", five.machines.len());
    let lab = lab_measures(&five).await?;
    eprintln!("{}", serde_json::to_string(&lab)?);
    for units in [1_000, 10_000] {
        eprintln!("bench: fleetctl with {units} units on 5 lab machines");
        let r = cli_measures(&five, units, 0).await?;
        eprintln!("{}", serde_json::to_string(&r)?);
        cli.push(r);
    }
    let (secure_sim, secure_engine) = secure_sims(&five, SECURE_SIZE).await?;
    Ok(LabResults { lab, cli, secure_sim, secure_engine })
}

/// Runs of the engine alone of each kind (as installed, without events, without metrics), taken
/// in turns: six rounds, so each kind goes first, second and third in two of them.
const ENGINE_ALONE_ROUNDS: usize = 6;

/// The size of the simulated rows taken on the default, secure configuration.
const SECURE_SIZE: (usize, usize) = (10_000, 100_000);

/// What the lab part of the bench measured.
pub struct LabResults {
    pub lab: LabReport,
    pub cli: Vec<CliReport>,
    /// A simulated cluster and the engine alone against the lab's etcd (TLS, client certificates,
    /// auth on), at the largest size.
    pub secure_sim: SimReport,
    pub secure_engine: Option<EngineReport>,
}

/// The simulated cluster and the engine alone at `size`, against the lab's etcd: TLS with client
/// certificates and auth, as installed by default (the plain rows use a bare local etcd).
async fn secure_sims(lab: &LabState, (machines, units): (usize, usize)) -> Result<(SimReport, Option<EngineReport>)> {
    let cfg = |prefix: &str, faults: bool| SimConfig {
        etcd_tls: Some(crate::pki::identity("root")),
        etcd_endpoints: lab.etcd_endpoints(),
        prefix: prefix.into(),
        machines,
        units,
        lease_ttl_secs: if faults {
            if machines > 2_000 {
                30
            } else {
                10
            }
        } else {
            3600
        },
        election_ttl_secs: 5,
        bin_dir: lab.bin_dir.clone(),
        api_port: 12570,
        faults,
        idle_secs: if faults { 30 } else { 0 },
        event_history: None,
        metrics: true,
        submission: crate::sim::Submission::Api,
        leader_first: false,
        // The lab's engines' certificate (127.0.0.1 among its addresses).
        api_tls: Some(crate::pki::identity("engine")),
    };
    eprintln!("bench: {machines} simulated machines, {units} units, etcd and the API with TLS");
    let sim = run_sim(cfg("/fleet-bench-tls/", true)).await.unwrap_or_else(|e| SimReport {
        machines,
        units,
        etcd_tls: true,
        error: Some(format!("{e:#}")),
        ..Default::default()
    });
    eprintln!("{}", serde_json::to_string(&sim)?);
    // The lab's etcd is the lab's: what the run stored goes again.
    if let Ok(mut etcd) = crate::etcd_admin(&lab.etcd_endpoints()).await {
        let _ = etcd.delete("/fleet-bench-tls/", Some(etcd_client::DeleteOptions::new().with_prefix())).await;
    }
    eprintln!("bench: the engine alone: {machines} machines registered, {units} units, etcd with TLS");
    let engine =
        match crate::sim::engine_alone(cfg("/fleet-bench-tls-engine/", false), crate::sim::Submission::Api).await {
            Ok(r) => {
                eprintln!("{}", serde_json::to_string(&r)?);
                Some(r)
            }
            Err(e) => {
                eprintln!("bench: the engine alone with TLS did not finish: {e:#}");
                None
            }
        };
    if let Ok(mut etcd) = crate::etcd_admin(&lab.etcd_endpoints()).await {
        let _ = etcd.delete("/fleet-bench-tls-engine/", Some(etcd_client::DeleteOptions::new().with_prefix())).await;
    }
    Ok((sim, engine))
}
