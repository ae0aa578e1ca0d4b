//! Measures through fleetctl, as users run it: one unit, and many units in one command.

use super::*;
use crate::LabState;
use anyhow::{bail, Context, Result};
use std::time::Instant;

/// Requests the engine has served (its own count).
pub(super) async fn requests_served(http: &reqwest::Client, api: &str) -> Result<u64> {
    let v: serde_json::Value = http.get(format!("{api}/engine/status")).send().await?.json().await?;
    v["requests"].as_u64().context("engine status without a request count")
}

pub(super) fn now_usec() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Runs the lab's fleetctl as its administrator; fails unless it exits 0.
pub(super) fn fleetctl_ok(state: &LabState, api: &str, args: &[String]) -> Result<()> {
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
pub(super) async fn last_active_usec(buses: &[crate::testkit::MachineBus], units: &[String]) -> Result<u64> {
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
