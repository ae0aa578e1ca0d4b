//! The dashboard at the simulation's size, in a real browser (headless Chromium): how long until
//! the first rows show, until every machine and unit is loaded, and until a unit created through
//! the API shows up by itself (the event stream, no reload).

use crate::browser::{self, Browser};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DashboardReport {
    /// From signing in until the first unit rows show.
    pub first_rows_secs: f64,
    /// From signing in until every machine and every unit is listed.
    pub all_loaded_secs: f64,
    /// From a new unit's creation answered by the API until its row shows.
    pub live_update_ms: f64,
}

async fn until(b: &mut Browser, what: &str, expr: &str, limit: Duration) -> Result<f64> {
    let t = Instant::now();
    b.wait_for(what, expr, limit).await?;
    Ok(t.elapsed().as_secs_f64())
}

/// Measures the dashboard of the engine at `api` (on loopback; `http` trusts its certificate) signed in with `token`;
/// `None` when chromium is not installed.
pub async fn measure(
    api: &str,
    http: &reqwest::Client,
    token: &str,
    machines: usize,
    units: usize,
) -> Result<Option<DashboardReport>> {
    if browser::chromium().is_none() {
        tracing::warn!("chromium is not installed: the dashboard is not measured");
        return Ok(None);
    }
    let mut b = Browser::start(1400, 900).await?;
    b.navigate(&format!("{api}/")).await?;
    b.wait_for("the sign-in prompt", "!document.getElementById('login').hidden", Duration::from_secs(30)).await?;
    let js_token = serde_json::to_string(token)?;
    b.eval(&format!(
        "document.getElementById('token').value = {js_token}; document.getElementById('login-form').requestSubmit(); true"
    ))
    .await?;
    let t0 = Instant::now();
    let first =
        until(&mut b, "first rows", "document.querySelectorAll('#units .row').length > 0", Duration::from_secs(60))
            .await?;
    let all = format!(
        "document.getElementById('machine-count').textContent === '({machines})' && \
         document.getElementById('unit-count').textContent === '({units})'"
    );
    b.wait_for("every machine and unit listed", &all, Duration::from_secs(300)).await?;
    let all_loaded = t0.elapsed().as_secs_f64();
    // A unit submitted (not started: the simulation's counts stay as they are) shows by itself.
    let url = format!("{api}/fleet/v1/units/0-dashboard-probe.service");
    let body = serde_json::json!({
        "desiredState": "inactive",
        "options": [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}],
    });
    let resp = http.put(&url).bearer_auth(token).json(&body).send().await.context("create the probe unit")?;
    anyhow::ensure!(resp.status().is_success(), "the probe unit was refused: {}", resp.status());
    let live = until(
        &mut b,
        "the new unit's row",
        "document.querySelector('#units [data-unit=\"0-dashboard-probe.service\"]') !== null",
        Duration::from_secs(30),
    )
    .await?;
    let _ = http.delete(&url).bearer_auth(token).send().await;
    Ok(Some(DashboardReport { first_rows_secs: first, all_loaded_secs: all_loaded, live_update_ms: live * 1000.0 }))
}
