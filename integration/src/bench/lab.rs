//! Measures on the lab's real machines (real systemd): one unit's latency, 1,000 units, the agent's
//! memory and idle cost.

use super::*;
use crate::sim::cpu_secs;
use crate::{process, LabState, MachineProc};
use anyhow::{bail, Context, Result};
use fleet_model::Keys;
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

pub(super) fn bench_unit(name: &str, xfleet: &str) -> fleet_client::Unit {
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
pub(super) type Active = std::sync::Arc<std::sync::Mutex<HashMap<String, HashSet<String>>>>;

pub(super) async fn watch_active(
    client: etcd_client::Client,
    keys: Keys,
) -> Result<(Active, tokio::task::JoinHandle<()>)> {
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
        let mut pages = fleet_model::pages::PageFollower::default();
        while let Ok(Some(resp)) = stream.message().await {
            let mut a = shared.lock().unwrap_or_else(|e| e.into_inner());
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let put = ev.event_type() == etcd_client::EventType::Put;
                for (u, m, up) in crate::sim::observe::activity(&mut pages, keys.decode(kv.key()), put, kv.value()) {
                    let set = a.entry(u).or_default();
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

pub(super) async fn wait_active(active: &Active, names: &[String], want: bool, timeout: Duration) -> Result<()> {
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

pub(super) fn agent_pid(m: &MachineProc) -> Option<u32> {
    let mut queue = vec![m.pid];
    while let Some(p) = queue.pop() {
        if std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "fleet-agent") {
            return Some(p);
        }
        queue.extend(process::children(p));
    }
    None
}

pub(super) fn status_field(pid: u32, field: &str) -> f64 {
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
pub(super) fn wakeups(pid: u32) -> HashMap<u32, f64> {
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
pub(super) fn wakeups_between(a: &HashMap<u32, f64>, b: &HashMap<u32, f64>) -> f64 {
    b.iter().filter_map(|(tid, n)| a.get(tid).map(|m| n - m)).sum()
}

pub(super) async fn lab_measures(state: &LabState) -> Result<LabReport> {
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
pub(super) async fn delete_all(http: &fleet_client::Client, names: &[String]) -> Result<()> {
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
