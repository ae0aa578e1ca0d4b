//! The engine on its own, at a size simulated agents cannot reach on one host.

use super::*;
use anyhow::{bail, Context, Result};
use fleet_model::schema::Key;
use fleet_model::{Keys, MachineRecord, UnitStateRecord};
use fleet_store::etcd::{connect, Client, EtcdConfig};
use fleet_store::retry::RetryPolicy;
use futures::StreamExt;
use serde::Serialize;
use std::time::{Duration, Instant};

/// What the engine-alone run measured.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct EngineReport {
    pub machines: usize,
    pub units: usize,
    pub submit_secs: f64,
    /// From the leader's start until the last unit has its schedule entry.
    pub place_secs: f64,
    /// Schedule entries written per second, first to last.
    pub placements_per_sec: f64,
    /// etcd write transactions per placed unit during placement.
    pub txns_per_unit: f64,
    pub list_units_secs: f64,
    pub list_units_rows: usize,
    /// Whether etcd was reached over TLS with a client certificate (the default install).
    #[serde(default)]
    pub etcd_tls: bool,
    /// Whether the API was served over TLS.
    #[serde(default)]
    pub api_tls: bool,
    /// CPU seconds both engines (the API replica and the leader) used from the leader's start
    /// until every unit was placed: what events cost shows here with less noise than in rates.
    #[serde(default)]
    pub engine_cpu_secs: f64,
    /// Whether the engines derived events (`event_history = 0` switches them off, to measure
    /// what they cost).
    #[serde(default = "events_default")]
    pub events: bool,
    /// Whether the engines recorded metrics (`metrics = false` switches them off, to measure
    /// what they cost).
    #[serde(default = "events_default")]
    pub metrics: bool,
    /// Peak resident memory (MiB) of the leader (its view and its planning copy) and of the API
    /// replica (its view, and what serving `list-units` took), read after the listing.
    #[serde(default)]
    pub leader_peak_rss_mib: f64,
    #[serde(default)]
    pub api_peak_rss_mib: f64,
    /// `fleetctl list-units`: spawned -> its first row printed.
    #[serde(default)]
    pub list_units_first_row_secs: f64,
    /// etcd's database size once every unit is placed and reports a state.
    #[serde(default)]
    pub etcd_db_bytes: i64,
    /// Idle (when measured): etcd writes under the cluster's prefix and both engines' CPU, per
    /// minute, with nothing changing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_writes_per_min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_engine_cpu_secs_per_min: Option<f64>,
    /// What `fleetctl events --follow` printed over the idle window, by kind (none expected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_events: Option<Told>,
    /// Whether the units were submitted by `fleetctl start --no-block --names-from` (instances
    /// of a template file) rather than through the API directly.
    #[serde(default)]
    pub submitted_by_fleetctl: bool,
    /// The round of the bench's turns this run was taken in: runs of different kinds in one
    /// round ran minutes apart at most, so their CPU is compared round by round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<usize>,
}

/// How the engine-alone run submits its units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submission {
    /// `POST /units`, 5,000 units a request, two at a time.
    Api,
    /// As a user would: `fleetctl start --no-block --names-from FILE`, instances of a template
    /// file in the directory fleetctl runs in.
    Fleetctl,
}

fn events_default() -> bool {
    true
}

/// The engine on its own, at a size the simulated agents cannot reach on one host:
/// `cfg.machines` machines registered (their presence records, under one lease, as agents write
/// them) but no agents running, so nothing else competes for etcd or the CPU; `cfg.units` units
/// stored through an API replica first; then a leader is started and its schedule entries are
/// counted from etcd until every unit is placed. Then `fleetctl list-units` at that size.
pub async fn engine_alone(cfg: SimConfig, submission: Submission) -> Result<EngineReport> {
    let keys = Keys::new(&cfg.prefix);
    let etcd = EtcdConfig {
        endpoints: cfg.etcd_endpoints.clone(),
        request_timeout: Duration::from_secs(30),
        tls: cfg.etcd_tls.as_ref().map(|t| t.etcd_options()).transpose()?,
    };
    let admin = connect(&etcd, RetryPolicy::default()).await.context("etcd")?;
    admin.kv_client().delete(keys.prefix(), Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    let (dir, engine_config, token, http) = workspace(&cfg, "fleet-engine-alone")?;
    let mut scratch = Scratch::new(dir.clone());
    let mut report = EngineReport {
        machines: cfg.machines,
        units: cfg.units,
        etcd_tls: cfg.etcd_tls.is_some(),
        api_tls: cfg.api_tls.is_some(),
        events: cfg.event_history != Some(0),
        metrics: cfg.metrics,
        submitted_by_fleetctl: submission == Submission::Fleetctl,
        ..Default::default()
    };

    let lease = admin.lease_client().grant(3600, None).await?.id();
    let records: Vec<(String, Vec<u8>)> = (0..cfg.machines)
        .map(|i| {
            let record = MachineRecord {
                id: machine_id(i),
                public_ip: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
                metadata: [("sim".to_string(), "yes".to_string())].into(),
                version: env!("CARGO_PKG_VERSION").into(),
                lease_ttl: 3600,
                schedule_pages: true,
                ..Default::default()
            };
            Ok((keys.machine(&record.id), fleet_model::schema::encode(&record)?))
        })
        .collect::<Result<_>>()?;
    for chunk in records.chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|(k, v)| {
                etcd_client::TxnOp::put(k.clone(), v.clone(), Some(etcd_client::PutOptions::new().with_lease(lease)))
            })
            .collect();
        admin.kv_client().txn(etcd_client::Txn::new().and_then(ops)).await?;
    }

    let api_engine = start_engine(&cfg, &engine_config, "alone-api", cfg.api_port, false).await?;
    let api = api_client(&cfg, cfg.api_port, &token)?;
    wait_until("the API replica to serve", Duration::from_secs(30), || async {
        leader_of(&cfg, &http, cfg.api_port).await == Some(false)
    })
    .await?;
    let t0 = Instant::now();
    match submission {
        Submission::Api => {
            let names: Vec<String> = (0..cfg.units).map(|i| format!("alone-{i:06}.service")).collect();
            submit_all(&api, &names).await?;
        }
        Submission::Fleetctl => {
            let names: Vec<String> = (0..cfg.units).map(|i| format!("alone@{i:06}.service")).collect();
            start_with_fleetctl(&cfg, &dir, &token, "alone@.service", &names, false).await?;
        }
    }
    report.submit_secs = t0.elapsed().as_secs_f64();

    let from = revision(&admin, &keys).await? + 1;
    let mut observed = follow(admin.clone(), keys.clone(), from, Watched::All);
    let t = Instant::now();
    let api_cpu_before = cpu_secs(api_engine.0.id());
    let engine = start_engine(&cfg, &engine_config, "alone-e1", cfg.api_port + 1, true).await?;
    if !observe_until(&mut observed, t + Duration::from_secs(600), |o| o.placed >= cfg.units).await? {
        let placed = observed.borrow().lock().unwrap_or_else(|e| e.into_inner()).placed;
        bail!("{placed} of {} units placed within 600 s", cfg.units);
    }
    report.place_secs = t.elapsed().as_secs_f64();
    report.engine_cpu_secs = cpu_secs(engine.0.id()) + cpu_secs(api_engine.0.id()) - api_cpu_before;
    let to = revision(&admin, &keys).await?;
    {
        let o = observed.borrow().clone();
        let o = o.lock().unwrap_or_else(|e| e.into_inner());
        report.placements_per_sec = o.placement_rate();
    }
    report.txns_per_unit = (to - from + 1) as f64 / cfg.units as f64;
    // `list-units` lists what machines report: write each placed unit's state as its agent would.
    report_states(&admin, &keys).await?;
    // Listed once the API replica has taken in those states: a listing while it is still
    // applying a million of them measures that, not the listing.
    let written = revision(&admin, &keys).await?;
    // etcd's revision may move on outside the prefix (a shared etcd), which the replica's view
    // never sees: after a while the listing goes ahead (and is repeated below until complete).
    let caught_up = wait_until("the API replica to show every state", Duration::from_secs(30), || async {
        let status = engine_status(&cfg, &http, cfg.api_port).await;
        status.and_then(|s| s["revision"].as_i64()).is_some_and(|r| r >= written)
    })
    .await;
    if let Err(e) = caught_up {
        tracing::warn!(error = %e, "listing before the replica showed etcd's revision");
    }
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let l = list_units_timed(&cfg, &cfg.api_url(cfg.api_port), &token)?;
        (report.list_units_secs, report.list_units_rows, report.list_units_first_row_secs) =
            (l.secs, l.rows, l.first_row_secs);
        if report.list_units_rows >= cfg.units || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report.etcd_db_bytes = etcd_db_bytes(&admin).await?;
    if cfg.idle_secs > 0 {
        // Idle once the leader has taken in the states and finished the passes they (and its
        // election) started: its view may still be applying them after the replica's listing,
        // the whole pass that follows an election's first placement runs over a million units
        // (4-16 s), and its planning copy takes in the states written meanwhile after it (~4 s)
        // — their cost, not the idle cluster's. Settled: the view and the planning copy at the
        // revision written, no pass under way, and neither a pass ended nor a write seen for
        // `QUIET`.
        const QUIET: Duration = Duration::from_secs(3);
        let leader_port = cfg.api_port + 1;
        // (passes ended, the view's revision) when first seen so, and since when.
        let last_passes: std::cell::Cell<Option<((u64, i64), Instant)>> = Default::default();
        let settled = wait_until("the leader to settle", Duration::from_secs(120), || {
            let status = async {
                let status = engine_status(&cfg, &http, leader_port).await?;
                let view = status["revision"].as_i64()?;
                let revision = view.min(status["planRevision"].as_i64()?);
                Some((revision, status["planning"].as_bool()?, (status["passes"].as_u64()?, view)))
            };
            let last_passes = &last_passes;
            async move {
                let Some((revision, planning, seen_now)) = status.await else { return false };
                if revision < written || planning {
                    last_passes.set(None);
                    return false;
                }
                // A pass counts as ended once it has planned; its writes come after, and move
                // the view's revision: both must stay put.
                match last_passes.get() {
                    Some((seen, since)) if seen == seen_now => since.elapsed() >= QUIET,
                    _ => {
                        last_passes.set(Some((seen_now, Instant::now())));
                        false
                    }
                }
            }
        })
        .await;
        if let Err(e) = settled {
            tracing::warn!(error = %e, "idle window measured before the leader settled");
        }
        // Nothing changes: count writes under the prefix and the engines' CPU over a window.
        let writes = || observed.borrow().lock().map(|o| o.writes).unwrap_or(0);
        let cpu = || cpu_secs(engine.0.id()) + cpu_secs(api_engine.0.id());
        let apis = [cfg.api_url(cfg.api_port), cfg.api_url(leader_port)];
        let since = revision(&admin, &keys).await?;
        let window = async {
            let before = (writes(), cpu());
            tokio::time::sleep(Duration::from_secs(cfg.idle_secs)).await;
            (before, (writes(), cpu()))
        };
        let (((w0, c0), (w1, c1)), told) = super::events::told_over(&cfg, &apis, &token, since, window).await;
        report.idle_events = told;
        let per_min = 60.0 / cfg.idle_secs as f64;
        report.idle_writes_per_min = Some((w1 - w0) as f64 * per_min);
        report.idle_engine_cpu_secs_per_min = Some((c1 - c0) * per_min);
    }
    report.leader_peak_rss_mib = peak_rss_mib(engine.0.id());
    report.api_peak_rss_mib = peak_rss_mib(api_engine.0.id());
    tracing::info!(?report, "engine alone");

    drop(engine);
    drop(api_engine);
    let _ = admin.kv_client().delete(keys.prefix(), Some(etcd_client::DeleteOptions::new().with_prefix())).await;
    let _ = admin.lease_client().revoke(lease).await;
    scratch.done = true;
    Ok(report)
}

/// `fleetctl start --names-from names.txt` of `names`, instances of `template` (both written to
/// `dir`, and their time counted), as a user starts more units than a command line holds:
/// waiting until they are active (`block`) or not (`--no-block`); what it prints is not read.
/// Awaited as a child process, so the simulated agents sharing the async threads keep running.
pub(super) async fn start_with_fleetctl(
    cfg: &SimConfig,
    dir: &Path,
    token: &str,
    template: &str,
    names: &[String],
    block: bool,
) -> Result<()> {
    tokio::fs::write(dir.join(template), "[Service]\nExecStart=/bin/sleep infinity\n").await?;
    let mut list = names.join("\n");
    list.push('\n');
    tokio::fs::write(dir.join("names.txt"), list).await?;
    let out = tokio::process::Command::new(cfg.bin_dir.join("fleetctl"))
        .args(["--endpoint", &cfg.api_url(cfg.api_port), "--request-timeout", "120"])
        .args(cfg.fleetctl_tls_args())
        .args(["start", "--names-from", "names.txt"])
        .args(if block { &[][..] } else { &["--no-block"][..] })
        .current_dir(dir)
        .env("FLEETCTL_TOKEN", token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await
        .context("fleetctl start")?;
    if !out.status.success() {
        bail!("fleetctl start --names-from: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// An `active` state for every schedule entry, written as agents would (each machine's in pages).
pub(super) async fn report_states(admin: &Client, keys: &Keys) -> Result<()> {
    let mut placed = Vec::new();
    let mut from = keys.schedules();
    // The prefix's range end: its last byte ('/') plus one.
    let end = etcd_client::GetOptions::new().with_range(format!("{}0", keys.schedules().trim_end_matches('/')));
    loop {
        // Pages of a hundred entries are ~15 KiB: a response of 500 keys stays a few MiB.
        let opts = end.clone().with_limit(500);
        let resp = admin.kv_client().get(from.clone(), Some(opts)).await?;
        for kv in resp.kvs() {
            match keys.decode(kv.key()) {
                Some(Key::Schedule(m, u)) => placed.push((m, u.to_string())),
                Some(Key::SchedulePage(m, _)) => {
                    let page: fleet_model::SchedulePage = fleet_model::schema::decode(kv.value())?;
                    placed.extend(page.into_keys().map(|u| (m.clone(), u)));
                }
                _ => {}
            }
        }
        match resp.kvs().last() {
            Some(kv) if resp.more() => from = format!("{}\0", String::from_utf8_lossy(kv.key())),
            _ => break,
        }
    }
    let state = UnitStateRecord {
        hash: Default::default(),
        load_state: "loaded".into(),
        active_state: "active".into(),
        sub_state: "running".into(),
        applied: fleet_model::DesiredState::Launched,
        health: None,
    };
    let mut by_machine: std::collections::BTreeMap<String, Vec<(String, Option<UnitStateRecord>)>> = Default::default();
    for (m, u) in placed {
        by_machine.entry(m).or_default().push((u, Some(state.clone())));
    }
    let mut pages = Vec::new();
    for (m, units) in by_machine {
        for (n, page) in fleet_model::StatePages::default().plan(&units) {
            if let Some(page) = page {
                pages.push(etcd_client::TxnOp::put(keys.state_page(&m, n), fleet_model::schema::encode(&page)?, None));
            }
        }
    }
    // Pages are up to ~40 KiB: 20 stay well under etcd's request size limit.
    let txns: Vec<etcd_client::Txn> = pages.chunks(20).map(|c| etcd_client::Txn::new().and_then(c.to_vec())).collect();
    let results: Vec<Result<etcd_client::TxnResponse, etcd_client::Error>> = futures::stream::iter(txns)
        .map(|t| {
            let admin = admin.clone();
            async move { admin.kv_client().txn(t).await }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}
