//! `./lab bench`: the scale benchmark. Simulated clusters of growing size (`fleet-sim`, against a
//! dedicated single-member etcd) and measures on the lab's real machines (real systemd), written
//! as a table to `docs/performance.md`.

use crate::sim::{cpu_secs, run as run_sim, EngineReport, SimConfig, SimReport};
use crate::{process, LabState, MachineProc};
use anyhow::{bail, Context, Result};
use fleet_model::schema::{decode, Key};
use fleet_model::{Keys, UnitStateRecord};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
}

impl BenchEtcd {
    fn start() -> Result<Self> {
        let dir = PathBuf::from("/dev/shm/fl-bench-etcd");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.with_extension("log"))?;
        let client = format!("http://127.0.0.1:{BENCH_ETCD_PORT}");
        let peer = format!("http://127.0.0.1:{}", BENCH_ETCD_PORT + 1);
        let child = std::process::Command::new("etcd")
            .args(["--name", "flbench", "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("flbench={peer}")])
            .args(["--quota-backend-bytes", "8589934592", "--auto-compaction-retention", "1"])
            .args(LARGE_CLUSTER_ETCD_FLAGS)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start etcd for the benchmark")?;
        Ok(BenchEtcd { child, dir })
    }
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{BENCH_ETCD_PORT}")
    }
}

impl Drop for BenchEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
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
    crate::wait_etcd(&[etcd.endpoint()], Duration::from_secs(30)).await?;
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
    // The engine alone (no agents competing for the host), at the target size.
    let (machines, units) = engine_size;
    eprintln!("bench: the engine alone: {machines} machines registered, {units} units");
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
    };
    let mut engines = Vec::new();
    match crate::sim::engine_alone(cfg).await {
        Ok(r) => {
            eprintln!("{}", serde_json::to_string(&r)?);
            engines.push(r);
        }
        Err(e) => eprintln!("bench: the engine alone did not finish: {e:#}"),
    }
    drop(etcd);
    let (mut lab_report, mut cli) = (None, Vec::new());
    if let Some(lab_up) = lab_up {
        let r = lab_and_cli(lab_up).await?;
        (lab_report, cli) = (Some(r.lab), r.cli);
        sims.push(r.secure_sim);
        engines.extend(r.secure_engine);
    }
    std::fs::write(out, render(&date, &sims, &engines, lab_report.as_ref(), &cli))?;
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
    };
    eprintln!("bench: {machines} simulated machines, {units} units, etcd with TLS");
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
    let engine = match crate::sim::engine_alone(cfg("/fleet-bench-tls-engine/", false)).await {
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

/// Renders `out` again from the JSON lines a bench run printed (`./lab bench 2> log`), e.g. after
/// the notes changed, without measuring again.
pub fn render_from_log(log: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    let mut sims = Vec::new();
    let mut lab = None;
    let mut engines = Vec::new();
    let mut cli = Vec::new();
    let mut date = String::new();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        if line.contains("\"measured_at\"") {
            date = serde_json::from_str::<Measured>(line)?.measured_at;
        } else if line.contains("\"cli_machines\"") {
            cli.push(serde_json::from_str::<CliReport>(line)?);
        } else if line.contains("\"latency_p50_ms\"") {
            lab = Some(serde_json::from_str::<LabReport>(line)?);
        } else if line.contains("\"place_secs\"") {
            engines.push(serde_json::from_str::<EngineReport>(line)?);
        } else if line.contains("\"converge_secs\"") {
            sims.push(serde_json::from_str::<SimReport>(line)?);
        }
    }
    if sims.is_empty() {
        bail!("no simulation results in {}", log.display());
    }
    if date.is_empty() {
        bail!("{} has no measured_at line: from an older run", log.display());
    }
    std::fs::write(out, render(&date, &sims, &engines, lab.as_ref(), &cli))?;
    Ok(())
}

fn bench_unit(name: &str, xfleet: &str) -> fleet_client::Unit {
    let option = |section: &str, name: &str, value: &str| fleet_model::UnitOption {
        section: section.into(),
        name: name.into(),
        value: value.into(),
    };
    let mut options = vec![option("Service", "ExecStart", "/bin/sleep infinity")];
    if !xfleet.is_empty() {
        let (k, v) = xfleet.split_once('=').unwrap_or((xfleet, ""));
        options.push(option("X-Fleet", k, v));
    }
    fleet_client::Unit { name: name.into(), desired_state: "launched".into(), options, ..Default::default() }
}

/// Unit name -> active somewhere, from a watch on the lab's states.
type Active = std::sync::Arc<std::sync::Mutex<HashMap<String, HashSet<String>>>>;

async fn watch_active(client: etcd_client::Client, keys: Keys) -> Result<(Active, tokio::task::JoinHandle<()>)> {
    let active: Active = Default::default();
    let mut kv = client.kv_client();
    let rev = kv.get(keys.prefix(), Some(etcd_client::GetOptions::new().with_count_only())).await?;
    let from = rev.header().map(|h| h.revision()).unwrap_or(0) + 1;
    let mut wc = fleet_store::etcd::watch_client(&client);
    let opts = etcd_client::WatchOptions::new().with_prefix().with_start_revision(from);
    let mut stream = wc.watch(keys.states(), Some(opts)).await?;
    let shared = active.clone();
    let task = tokio::spawn(async move {
        let _keep = wc;
        while let Ok(Some(resp)) = stream.message().await {
            let mut a = shared.lock().unwrap_or_else(|e| e.into_inner());
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                if let Some(Key::State(m, u)) = keys.decode(kv.key()) {
                    let up = ev.event_type() == etcd_client::EventType::Put
                        && decode::<UnitStateRecord>(kv.value()).is_ok_and(|s| s.active_state == "active");
                    let set = a.entry(u.to_string()).or_default();
                    if up {
                        set.insert(m);
                    } else {
                        set.remove(&m);
                    }
                }
            }
        }
    });
    Ok((active, task))
}

async fn wait_active(active: &Active, names: &[String], want: bool, timeout: Duration) -> Result<()> {
    let until = Instant::now() + timeout;
    loop {
        let done = {
            let a = active.lock().unwrap_or_else(|e| e.into_inner());
            names.iter().all(|n| a.get(n).is_some_and(|m| !m.is_empty()) == want)
        };
        if done {
            return Ok(());
        }
        if Instant::now() > until {
            let a = active.lock().unwrap_or_else(|e| e.into_inner());
            let pending: Vec<&String> =
                names.iter().filter(|n| a.get(*n).is_some_and(|m| !m.is_empty()) != want).collect();
            bail!(
                "timed out waiting for {} units to become {}; {} did not, e.g. {:?}",
                names.len(),
                if want { "active" } else { "gone" },
                pending.len(),
                pending.first()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn agent_pid(m: &MachineProc) -> Option<u32> {
    let mut queue = vec![m.pid];
    while let Some(p) = queue.pop() {
        if std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "fleet-agent") {
            return Some(p);
        }
        queue.extend(process::children(p));
    }
    None
}

fn status_field(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0.0)
}

/// Context switches of each thread of `pid` (each is a wakeup), by thread id.
fn wakeups(pid: u32) -> HashMap<u32, f64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return HashMap::new() };
    tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .map(|tid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
            let n = s
                .lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
                .sum::<f64>();
            (tid, n)
        })
        .collect()
}

/// Wakeups between two samples, over threads alive in both (idle blocking-pool threads exit).
fn wakeups_between(a: &HashMap<u32, f64>, b: &HashMap<u32, f64>) -> f64 {
    b.iter().filter_map(|(tid, n)| a.get(tid).map(|m| n - m)).sum()
}

async fn lab_measures(state: &LabState) -> Result<LabReport> {
    let api = state.api_url().context("the lab has no engine")?.to_string();
    // The lab is TLS-only with auth on, as a default install: its admin identity, over TLS.
    let http = crate::pki::client_as("admin", &api)?;
    let client = crate::etcd_admin(&state.etcd_endpoints()).await?;
    let keys = Keys::new(crate::ETCD_PREFIX);
    let (active, watcher) = watch_active(client, keys).await?;
    let mut report = LabReport { machines: state.machines.len(), ..Default::default() };
    let mut created: Vec<String> = Vec::new();

    // Latency of one unit: PUT (as `fleetctl start` does) until its agent reports it active.
    let mut samples = Vec::new();
    for i in 0..100 {
        let name = format!("bench-lat-{i:03}.service");
        let t = Instant::now();
        http.put_unit(&bench_unit(&name, "")).await?;
        created.push(name.clone());
        wait_active(&active, std::slice::from_ref(&name), true, Duration::from_secs(30)).await?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    report.latency_p50_ms = samples[samples.len() / 2];
    report.latency_p99_ms = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];

    eprintln!("bench: latency p50 {:.0} ms, p99 {:.0} ms", report.latency_p50_ms, report.latency_p99_ms);
    // 1,000 units across the machines, submitted in one request, until all are active.
    let names: Vec<String> = (0..1000).map(|i| format!("bench-k-{i:04}.service")).collect();
    let t = Instant::now();
    http.create(&names.iter().map(|n| bench_unit(n, "")).collect::<Vec<_>>()).await.context("POST 1,000 units")?;
    wait_active(&active, &names, true, Duration::from_secs(300)).await?;
    report.thousand_units_secs = t.elapsed().as_secs_f64();

    eprintln!("bench: 1,000 units active in {:.1} s", report.thousand_units_secs);
    // Destroy them all (the original took ~170 s for 100) until systemd stopped every one.
    let t = Instant::now();
    delete_all(&http, &names).await?;
    wait_active(&active, &names, false, Duration::from_secs(300)).await?;
    report.destroy_thousand_secs = t.elapsed().as_secs_f64();

    eprintln!("bench: 1,000 units destroyed in {:.1} s", report.destroy_thousand_secs);
    // 1,000 units on one machine: the agent's memory, then its cost while nothing changes.
    let m = state.machines.first().context("the lab has no machine")?;
    let pinned: Vec<String> = (0..1000).map(|i| format!("bench-r-{i:04}.service")).collect();
    let hostname = format!("MachineMetadata=hostname={}", m.name);
    let units: Vec<_> = pinned.iter().map(|n| bench_unit(n, &hostname)).collect();
    http.create(&units).await.context("POST 1,000 pinned units")?;
    wait_active(&active, &pinned, true, Duration::from_secs(300)).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = agent_pid(m).context("cannot find the agent of the first machine")?;
    report.agent_rss_mib_with_1000_units = status_field(pid, "VmRSS:") / 1024.0;
    let (c0, w0) = (cpu_secs(pid), wakeups(pid));
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (c1, w1) = (cpu_secs(pid), wakeups(pid));
    report.agent_idle_cpu_secs_per_min = c1 - c0;
    report.agent_idle_wakeups_per_min = wakeups_between(&w0, &w1);
    delete_all(&http, &pinned).await?;
    delete_all(&http, &created).await?;
    wait_active(&active, &pinned, false, Duration::from_secs(300)).await?;
    watcher.abort();
    Ok(report)
}

/// One `DELETE` per unit (as the original's clients destroy), 16 at a time.
async fn delete_all(http: &fleet_client::Client, names: &[String]) -> Result<()> {
    let failures: Vec<String> = futures::stream::iter(names)
        .map(|n| async move { http.delete_unit(n).await.err().map(|e| format!("{n}: {e}")) })
        .buffer_unordered(16)
        .filter_map(|r| async move { r })
        .collect()
        .await;
    if let Some(f) = failures.first() {
        bail!("DELETE failed for {} units, e.g. {f}", failures.len());
    }
    Ok(())
}

fn host() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok())))
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let etcd = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem:.0} GiB RAM; {etcd}")
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

/// The results as markdown: one table per part, each measure next to its target.
/// The lab's agents renew their 5 s lease every TTL/3.
const LAB_KEEPALIVES_PER_MIN: f64 = 60.0 / (5.0 / 3.0);
/// A keepalive wakes the agent's runtime a few times (timer, request, response on the HTTP/2
/// connection, the lease stream): more than this per keepalive means something else wakes it.
const WAKEUPS_PER_KEEPALIVE: f64 = 8.0;

/// Now, as the page's header shows it.
pub fn now_utc() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// When a run started, as its first JSON line says (`--render-from` keeps the measurement's date).
#[derive(serde::Serialize, serde::Deserialize)]
struct Measured {
    measured_at: String,
}

/// One line of the targets table: measure, target, result, met.
type Verdict = (String, String, String, bool);

/// The targets a whole simulated cluster is judged on, for `r` described as `size`.
fn cluster_verdicts(r: &SimReport, size: &str) -> Vec<Verdict> {
    let ttl = if r.machines > 2_000 { 30 } else { 10 };
    vec![
        (
            format!("convergence, {size}"),
            "<= 60 s".into(),
            format!("{:.1} s", r.converge_secs),
            r.converge_secs <= 60.0,
        ),
        (
            format!("placement throughput, {size}, simulated agents on the same cores"),
            ">= 5,000/s".into(),
            format!("{:.0}/s", r.placements_per_sec),
            r.placements_per_sec >= 5000.0,
        ),
        (
            format!("machine lost -> units active elsewhere ({size})"),
            format!("<= lease TTL ({ttl} s) + 1 s"),
            opt(r.machine_lost_secs, 1) + " s",
            r.machine_lost_secs.is_some_and(|s| s <= ttl as f64 + 1.0),
        ),
        (
            format!("engine leader lost -> new leader placing ({size})"),
            "<= election TTL (5 s) + 1 s".into(),
            opt(r.leader_lost_secs, 1) + " s",
            r.leader_lost_secs.is_some_and(|s| s <= 6.0),
        ),
    ]
}

pub fn render(
    date: &str,
    sims: &[SimReport],
    engines: &[EngineReport],
    lab: Option<&LabReport>,
    cli: &[CliReport],
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Performance\n");
    let _ = writeln!(
        md,
        "Measured by `./lab bench` on {date}, on {}. Release build. Everything (etcd, the engine, \
         the simulated machines or the lab's machines) shares this one host; the machine is shared \
         with other work and noisy, so numbers move by tens of percent between runs.\n",
        host()
    );
    let _ = writeln!(
        md,
        "Security settings: the simulated clusters and the engine alone run etcd **without TLS** (one \
         local member on tmpfs), except the rows marked *TLS*: those were taken at the largest size \
         against the lab's etcd (one member on tmpfs, TLS with client certificates, auth on, as \
         installed by default), after the lab's measures; that etcd also runs with etcd's default \
         backend batching, not the large-cluster settings of the plain rows' etcd \
         (docs/configuration.md), so the difference is TLS and those settings together. The \
         simulated clusters reach their API over plain HTTP on loopback with an admin token (auth on). The lab's measures (real \
         systemd) and every `fleetctl` figure run the default, secure install: etcd with TLS and \
         client certificates, the API over TLS with client certificates and auth on. The targets \
         are judged on both kinds of rows. The smoke \
         test of the simulation (`integration/tests/scale.rs`, 1,000 machines, 10,000 units) runs \
         against the lab's TLS etcd in every CI run.\n"
    );
    let _ = writeln!(md, "## Simulated clusters (fleet-sim)\n");
    let _ = writeln!(
        md,
        "Each machine is the real agent code with its own etcd lease and schedule watch; only systemd \
         is replaced by the in-memory `SimulatedSystemd` (a start takes 4 ms). Real etcd (one member, \
         data on tmpfs), real `fleet-engine`s. Units are submitted with `POST /fleet/v1/units`, 5,000 \
         per request, through an API-only engine replica; the leader starts once all are stored, so \
         placements/s is the engine's own rate and convergence is submission plus placement plus \
         starts. Lease TTL 10 s (30 s above 2,000 machines), election TTL 5 s.\n"
    );
    let _ = writeln!(
        md,
        "| machines | units | etcd | submit (s) | submitted -> all active (s) | placements/s | etcd txns per unit | keys written per unit | `fleetctl list-units` (s) | machine lost -> units active elsewhere (s) | leader killed -> new leader placed a unit (s) | idle etcd writes/min | idle engine CPU s/min | idle CPU of all simulated agents s/min |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let etcd_kind = |tls: bool| if tls { "TLS" } else { "plain" };
    for r in sims {
        if let Some(e) = &r.error {
            let _ = writeln!(
                md,
                "| {} | {} | {} | did not finish: {} |||||||||||",
                r.machines,
                r.units,
                etcd_kind(r.etcd_tls),
                e.replace('|', "/")
            );
            continue;
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            r.machines,
            r.units,
            etcd_kind(r.etcd_tls),
            r.submit_secs,
            r.converge_secs,
            r.placements_per_sec,
            r.txns_per_unit,
            r.keys_per_unit,
            r.list_units_secs,
            opt(r.machine_lost_secs, 1),
            opt(r.leader_lost_secs, 1),
            opt(r.idle_writes_per_min, 0),
            opt(r.idle_engine_cpu_secs_per_min, 2),
            opt(r.idle_sim_cpu_secs_per_min, 2),
        );
    }
    if !engines.is_empty() {
        let _ = writeln!(md, "\n## The engine alone\n");
        let _ = writeln!(
            md,
            "The target size with no agents running: the machines are registered (their \
             presence records, as agents write them, under one lease) and nothing else competes with \
             the engine and etcd for the two cores. The units are stored first through an API replica, \
             then a leader is started; placements/s counts its schedule entries as etcd's watch \
             delivers them.\n"
        );
        let _ = writeln!(
            md,
            "| machines | units | etcd | submit (s) | leader start -> all placed (s) | placements/s | etcd txns per placed unit | `fleetctl list-units` (s) | rows listed |\n|---|---|---|---|---|---|---|---|---|"
        );
        for e in engines {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.3} | {:.2} | {} |",
                e.machines,
                e.units,
                etcd_kind(e.etcd_tls),
                e.submit_secs,
                e.place_secs,
                e.placements_per_sec,
                e.txns_per_unit,
                e.list_units_secs,
                e.list_units_rows
            );
        }
    }
    // Verdicts on the plain rows (the TLS rows are there to compare).
    let engine = engines.iter().find(|e| !e.etcd_tls);
    let plain: Vec<&SimReport> = sims.iter().filter(|r| !r.etcd_tls).collect();
    let _ = writeln!(md, "\n## Against the targets\n");
    let _ = writeln!(md, "| measure | target | result | |\n|---|---|---|---|");
    if let Some(failed) = plain.iter().filter(|r| r.error.is_some()).max_by_key(|r| r.units) {
        let _ = writeln!(
            md,
            "| cluster size | 10,000 machines, 100,000 units, one etcd | {} machines, {} units did not finish (see above) | **missed** |",
            failed.machines, failed.units
        );
    }
    if let Some(big) = plain.iter().filter(|r| r.error.is_none()).max_by_key(|r| r.units) {
        let size = format!("{} machines, {} units", big.machines, big.units);
        let mut rows: Vec<Verdict> = vec![(
            "cluster size".into(),
            "10,000 machines, 100,000 units, one etcd".into(),
            size.clone(),
            big.machines >= 10_000 && big.units >= 100_000,
        )];
        rows.extend(cluster_verdicts(big, &size));
        rows.extend([
            (
                "etcd writes per placed unit".into(),
                "<= 3".into(),
                format!(
                    "{:.2} write transactions ({:.2} keys: record, schedule entry, state)",
                    big.txns_per_unit, big.keys_per_unit
                ),
                big.txns_per_unit <= 3.0,
            ),
            (
                format!("`fleetctl list-units`, {} units", big.units),
                "<= 2 s".into(),
                format!("{:.2} s", big.list_units_secs),
                big.list_units_secs <= 2.0,
            ),
            (
                "idle cluster: etcd writes".into(),
                "next to nothing (original: ~9,000/min at 1,000 units)".into(),
                opt(big.idle_writes_per_min, 0) + "/min",
                big.idle_writes_per_min == Some(0.0),
            ),
        ]);
        for (m, t, r, ok) in rows {
            let _ = writeln!(md, "| {m} | {t} | {r} | {} |", verdict(ok));
        }
    }
    if let Some(e) = engine {
        let size = format!("{} machines, {} units", e.machines, e.units);
        let rows: Vec<(String, String, String, bool)> = vec![
            (
                format!("placement throughput, the engine alone, {size}"),
                ">= 5,000/s".into(),
                format!("{:.0}/s", e.placements_per_sec),
                e.placements_per_sec >= 5000.0,
            ),
            (
                format!("`fleetctl list-units`, {} units", e.units),
                "<= 2 s".into(),
                format!("{:.2} s ({} rows)", e.list_units_secs, e.list_units_rows),
                e.list_units_secs <= 2.0 && e.list_units_rows >= e.units,
            ),
        ];
        for (m, t, r, ok) in rows {
            let _ = writeln!(md, "| {m} | {t} | {r} | {} |", verdict(ok));
        }
    }
    // The same targets on the default, secure configuration (the TLS rows).
    if let Some(t) = sims.iter().filter(|r| r.etcd_tls && r.error.is_none()).max_by_key(|r| r.units) {
        let size = format!("{} machines, {} units, etcd with TLS", t.machines, t.units);
        let rows = cluster_verdicts(t, &size);
        for (m, t, r, ok) in rows {
            let _ = writeln!(md, "| {m} | {t} | {r} | {} |", verdict(ok));
        }
    }
    if let Some(e) = engines.iter().find(|e| e.etcd_tls) {
        let ok = e.placements_per_sec >= 5000.0;
        let _ = writeln!(
            md,
            "| placement throughput, the engine alone, {} machines, {} units, etcd with TLS | >= 5,000/s | {:.0}/s | {} |",
            e.machines,
            e.units,
            e.placements_per_sec,
            verdict(ok)
        );
    }
    if let Some(l) = lab {
        let rows: Vec<(String, String, String, bool)> = vec![
            (
                "real systemd: submit -> active, one unit, p50 / p99".into(),
                "<= 50 ms / <= 250 ms".into(),
                format!("{:.0} ms / {:.0} ms", l.latency_p50_ms, l.latency_p99_ms),
                l.latency_p50_ms <= 50.0 && l.latency_p99_ms <= 250.0,
            ),
            (
                format!("real systemd: 1,000 units across {} machines until all active", l.machines),
                "<= 10 s".into(),
                format!("{:.1} s", l.thousand_units_secs),
                l.thousand_units_secs <= 10.0,
            ),
            (
                "real systemd: destroy 1,000 units until all stopped".into(),
                "<= 10 s (original: ~170 s for 100)".into(),
                format!("{:.1} s", l.destroy_thousand_secs),
                l.destroy_thousand_secs <= 10.0,
            ),
            (
                "agent resident memory with 1,000 units on its machine".into(),
                "<= 20 MiB".into(),
                format!("{:.1} MiB", l.agent_rss_mib_with_1000_units),
                l.agent_rss_mib_with_1000_units <= 20.0,
            ),
            (
                "agent when idle (1,000 units)".into(),
                format!(
                    "no periodic wakeups beyond lease keepalive: <= {WAKEUPS_PER_KEEPALIVE} thread wakeups per keepalive \
                     ({LAB_KEEPALIVES_PER_MIN:.0}/min at the lab's 5 s lease TTL), CPU < 0.5 s/min"
                ),
                format!(
                    "{:.2} CPU s/min, {:.0} thread wakeups/min ({:.1} per keepalive)",
                    l.agent_idle_cpu_secs_per_min,
                    l.agent_idle_wakeups_per_min,
                    l.agent_idle_wakeups_per_min / LAB_KEEPALIVES_PER_MIN
                ),
                l.agent_idle_cpu_secs_per_min < 0.5
                    && l.agent_idle_wakeups_per_min <= WAKEUPS_PER_KEEPALIVE * LAB_KEEPALIVES_PER_MIN,
            ),
        ];
        for (m, t, r, ok) in rows {
            let _ = writeln!(md, "| {m} | {t} | {r} | {} |", verdict(ok));
        }
    }
    render_cli(&mut md, cli);
    md.push_str(include_str!("../../docs/performance-notes.md"));
    md
}

/// Requests the engine has served (its own count).
async fn requests_served(http: &reqwest::Client, api: &str) -> Result<u64> {
    let v: serde_json::Value = http.get(format!("{api}/engine/status")).send().await?.json().await?;
    v["requests"].as_u64().context("engine status without a request count")
}

fn now_usec() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Runs the lab's fleetctl as its administrator; fails unless it exits 0.
fn fleetctl_ok(state: &LabState, api: &str, args: &[String]) -> Result<()> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = crate::testkit::fleetctl(state, api, &refs)?;
    if !out.status.success() {
        let (o, e) = crate::testkit::text(&out);
        let tail = |s: &str| s.lines().rev().take(5).collect::<Vec<_>>().join(" / ");
        bail!("fleetctl {} failed: {} {}", args.first().map(String::as_str).unwrap_or(""), tail(&o), tail(&e));
    }
    Ok(())
}

/// The latest ActiveEnterTimestamp among `units`, over every machine (µs since the epoch).
async fn last_active_usec(buses: &[crate::testkit::MachineBus], units: &[String]) -> Result<u64> {
    let mut last = 0;
    for u in units {
        for b in buses {
            last = last.max(b.active_since_usec(u).await?);
        }
    }
    Ok(last)
}

/// `fleetctl` as a user types it: one unit started at a time (its latency to active, as systemd
/// timestamps it), then `units` template instances in one `fleetctl start` and one
/// `fleetctl destroy`, each timed until it returns (start returns once all are active in
/// systemd, destroy once no machine reports any).
pub async fn cli_measures(state: &LabState, units: usize, one_unit_samples: usize) -> Result<CliReport> {
    let api = state.api_url().context("the lab has no engine")?.to_string();
    let http = crate::pki::http_as("admin")?;
    let dir = crate::testkit::scratch("bench-cli")?;
    let mut buses = Vec::new();
    for m in &state.machines {
        buses.push(crate::testkit::MachineBus::connect(m).await?);
    }
    let mut report = CliReport { cli_machines: state.machines.len(), units, ..Default::default() };
    let unit_file = "[Service]\nExecStart=/bin/sleep infinity\n";

    if one_unit_samples > 0 {
        let mut samples = Vec::new();
        let mut names = Vec::new();
        for i in 0..one_unit_samples {
            let name = format!("bench-cli-one-{i:03}.service");
            let path = dir.join(&name);
            std::fs::write(&path, unit_file)?;
            let t0 = now_usec();
            fleetctl_ok(state, &api, &["start".into(), path.display().to_string()])?;
            let active = last_active_usec(&buses, std::slice::from_ref(&name)).await?;
            if active < t0 {
                bail!("{name}: systemd's ActiveEnterTimestamp {active} is before fleetctl started ({t0})");
            }
            samples.push((active - t0) as f64 / 1000.0);
            names.push(name);
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        report.one_unit_p50_ms = Some(samples[samples.len() / 2]);
        report.one_unit_p99_ms = Some(samples[(samples.len() * 99 / 100).min(samples.len() - 1)]);
        eprintln!(
            "bench: fleetctl start of one unit -> active: p50 {:.0} ms, p99 {:.0} ms",
            samples[samples.len() / 2],
            samples[samples.len() - 1]
        );
        let mut destroy = vec!["destroy".to_string()];
        destroy.extend(names);
        fleetctl_ok(state, &api, &destroy)?;
    }

    std::fs::write(dir.join("bench-cli@.service"), unit_file)?;
    let names: Vec<String> = (1..=units).map(|i| format!("bench-cli@{i}.service")).collect();
    let mut start = vec!["start".to_string()];
    start.extend(names.iter().map(|n| dir.join(n).display().to_string()));
    let before = requests_served(&http, &api).await?;
    let (t0, t) = (now_usec(), Instant::now());
    fleetctl_ok(state, &api, &start)?;
    report.start_secs = t.elapsed().as_secs_f64();
    report.start_requests = requests_served(&http, &api).await? - before - 1;
    report.last_active_secs = last_active_usec(&buses, &names).await?.saturating_sub(t0) as f64 / 1e6;
    eprintln!(
        "bench: fleetctl start of {units} units on {} machines: {:.2} s ({} requests; last active after {:.2} s)",
        state.machines.len(),
        report.start_secs,
        report.start_requests,
        report.last_active_secs
    );
    let mut destroy = vec!["destroy".to_string()];
    destroy.extend(names);
    let before = requests_served(&http, &api).await?;
    let t = Instant::now();
    fleetctl_ok(state, &api, &destroy)?;
    report.destroy_secs = t.elapsed().as_secs_f64();
    report.destroy_requests = requests_served(&http, &api).await? - before - 1;
    eprintln!(
        "bench: fleetctl destroy of {units} units: {:.2} s ({} requests)",
        report.destroy_secs, report.destroy_requests
    );
    Ok(report)
}

/// What a user meets: `fleetctl` on the lab's machines, beside the original fleet v1.0.0 run side
/// by side on this host (issue 20: its fleetctl writing to etcd directly, 3 machines).
fn render_cli(md: &mut String, cli: &[CliReport]) {
    if cli.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## fleetctl, as users run it\n");
    let _ = writeln!(
        md,
        "The release `fleetctl` binary started once per command, as a user types it, against the lab \
         (real systemd 252 in nspawn machines, TLS with the admin's client certificate, auth on, etcd \
         with TLS and client certificates). Units are template instances from a local template file \
         (`ExecStart=/bin/sleep infinity`). `fleetctl start` returns once every unit is active in \
         systemd; `fleetctl destroy` once no machine reports any. One unit is timed from spawning \
         `fleetctl start` to systemd's own `ActiveEnterTimestamp`. Requests are counted by the engine.\n"
    );
    let _ = writeln!(
        md,
        "| machines | units | `fleetctl start` -> returned, all active (s) | last unit active in systemd (s) | requests | `fleetctl destroy` -> returned, all gone (s) | requests | one unit start -> active p50 / p99 (ms) |\n|---|---|---|---|---|---|---|---|"
    );
    for c in cli {
        let one = match (c.one_unit_p50_ms, c.one_unit_p99_ms) {
            (Some(p50), Some(p99)) => format!("{p50:.0} / {p99:.0}"),
            _ => "-".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.2} | {} | {:.2} | {} | {one} |",
            c.cli_machines,
            c.units,
            c.start_secs,
            c.last_active_secs,
            c.start_requests,
            c.destroy_secs,
            c.destroy_requests
        );
    }
    let _ = writeln!(
        md,
        "\nWhat bounds each figure: the notes below (\"fleetctl: what bounds each figure\"). In short, one \
         unit is request round trips and the agent's start; a thousand units and more are systemd and \
         the D-Bus daemon of each machine sharing this host's two cores (fleet's own processes use \
         about a tenth of the CPU of a 1,000-unit start).\n"
    );
    let _ = writeln!(md, "| measure | target | result | original fleet v1.0.0 | |\n|---|---|---|---|---|");
    let find = |machines: usize, units: usize| cli.iter().find(|c| c.cli_machines == machines && c.units == units);
    let mut row = |measure: String, target: &str, result: String, original: &str, ok: bool| {
        let _ = writeln!(md, "| {measure} | {target} | {result} | {original} | {} |", verdict(ok));
    };
    if let Some(c) = cli.iter().find(|c| c.one_unit_p50_ms.is_some()) {
        let p50 = c.one_unit_p50_ms.unwrap_or(f64::MAX);
        row(
            format!("`fleetctl start` of one unit -> active in systemd, p50 / p99 ({} machines)", c.cli_machines),
            "p50 <= 50 ms",
            format!("{p50:.0} ms / {} ms", opt(c.one_unit_p99_ms, 0)),
            "~3.5 s",
            p50 <= 50.0,
        );
    }
    let timed = |secs: f64, requests: u64| format!("{secs:.2} s ({requests} requests)");
    if let Some(c) = find(3, 1_000) {
        row(
            "`fleetctl start` of 1,000 units -> all active (3 machines)".into(),
            "<= 1.5 s",
            timed(c.start_secs, c.start_requests),
            "31-35 s to all active; its start call returned in 10 s",
            c.start_secs <= 1.5,
        );
        row(
            "`fleetctl destroy` of 1,000 units -> all gone (3 machines)".into(),
            "<= 1 s",
            timed(c.destroy_secs, c.destroy_requests),
            "178-200 s for 100 units",
            c.destroy_secs <= 1.0,
        );
    }
    if let Some(c) = find(5, 10_000) {
        row(
            "`fleetctl start` of 10,000 units -> all active (5 machines)".into(),
            "<= 10 s",
            timed(c.start_secs, c.start_requests),
            "not measured",
            c.start_secs <= 10.0,
        );
    }
}
