//! Helpers for the scenario tests: find the lab, wait for conditions, look inside machines.
//!
//! Tests that need the lab skip when it is not up, except under `CI=true`, where a missing lab
//! is a failure: CI must never pass by skipping.

use crate::{LabState, MachineProc};
use anyhow::{bail, Context, Result};
use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The running lab, or `None` (test skipped) outside CI.
pub fn lab() -> Option<LabState> {
    match LabState::load() {
        Ok(Some(s)) if !s.etcd.is_empty() => Some(s),
        other => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI=true but the lab is not up ({other:?}); run the suite with ./lab test");
            }
            eprintln!("skipped: the lab is not up (run ./lab test)");
            None
        }
    }
}

/// Polls `check` until it returns `Some`, failing with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > until {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks `check` again and again for `window` (at least every 100 ms, and once at its end):
/// "nothing changed for 2 s" sampled across the window, not looked at once after a sleep.
/// The first deviation is the error.
pub async fn holds_for<F, Fut>(window: Duration, mut check: F) -> std::result::Result<usize, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), String>>,
{
    let until = std::time::Instant::now() + window;
    let mut samples = 0;
    loop {
        check().await?;
        samples += 1;
        if std::time::Instant::now() >= until {
            return Ok(samples);
        }
        tokio::time::sleep(Duration::from_millis(100).min(until.saturating_duration_since(std::time::Instant::now())))
            .await;
    }
}

/// etcd as its administrator (`root`).
pub async fn etcd(state: &LabState) -> Result<etcd_client::Client> {
    crate::etcd_admin(&state.etcd_endpoints()).await
}

/// An HTTP client for the lab's API as its administrator (client certificate `admin`).
pub fn http() -> reqwest::Client {
    match crate::pki::http_as("admin") {
        Ok(c) => c,
        Err(e) => panic!("the lab's admin identity: {e:#}"),
    }
}

/// What fleetctl needs to reach the lab's API as its administrator.
pub fn fleetctl_env() -> Vec<(&'static str, String)> {
    let admin = crate::pki::identity("admin");
    vec![
        ("FLEETCTL_CA_FILE", admin.ca_file.display().to_string()),
        ("FLEETCTL_CERT_FILE", admin.cert_file.display().to_string()),
        ("FLEETCTL_KEY_FILE", admin.key_file.display().to_string()),
    ]
}

/// A key prefix no other test uses.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("/fleet-test/{test}-{nanos:x}/")
}

/// All keys under `prefix`, as strings.
pub async fn keys_under(client: &mut etcd_client::Client, prefix: &str) -> Result<Vec<String>> {
    let resp = client.get(prefix, Some(etcd_client::GetOptions::new().with_prefix().with_keys_only())).await?;
    Ok(resp.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect())
}

/// Runs the lab's fleetctl against `endpoint`.
pub fn fleetctl(state: &LabState, endpoint: &str, args: &[&str]) -> Result<Output> {
    Command::new(state.bin_dir.join("fleetctl"))
        .args(args)
        .env("FLEETCTL_ENDPOINT", endpoint)
        .envs(fleetctl_env())
        .output()
        .context("cannot run fleetctl")
}

pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A scratch directory for unit files.
pub fn scratch(test: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("fleet-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// A connection to one machine's systemd, from the host.
pub struct MachineBus {
    conn: zbus::Connection,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitProps {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub main_pid: u32,
}

impl MachineBus {
    pub async fn connect(m: &MachineProc) -> Result<Self> {
        let conn = zbus::connection::Builder::address(m.bus_address().as_str())?
            .build()
            .await
            .with_context(|| format!("bus of {}", m.name))?;
        Ok(MachineBus { conn })
    }

    async fn manager(&self) -> Result<zbus::Proxy<'_>> {
        Ok(zbus::Proxy::new(
            &self.conn,
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
        )
        .await?)
    }

    /// systemd's view of `unit` (loading it if needed: a unit without a file is `not-found`).
    pub async fn unit(&self, unit: &str) -> Result<UnitProps> {
        let path: zbus::zvariant::OwnedObjectPath = self.manager().await?.call("LoadUnit", &(unit,)).await?;
        let u = zbus::Proxy::new(&self.conn, "org.freedesktop.systemd1", path.clone(), "org.freedesktop.systemd1.Unit")
            .await?;
        let s =
            zbus::Proxy::new(&self.conn, "org.freedesktop.systemd1", path, "org.freedesktop.systemd1.Service").await?;
        Ok(UnitProps {
            load_state: u.get_property("LoadState").await?,
            active_state: u.get_property("ActiveState").await?,
            sub_state: u.get_property("SubState").await?,
            main_pid: s.get_property("MainPID").await.unwrap_or(0),
        })
    }

    /// When systemd last saw `unit` become active (µs since the epoch, systemd's own clock
    /// reading); 0 if it never was.
    pub async fn active_since_usec(&self, unit: &str) -> Result<u64> {
        let path: zbus::zvariant::OwnedObjectPath = self.manager().await?.call("LoadUnit", &(unit,)).await?;
        let u = zbus::Proxy::new(&self.conn, "org.freedesktop.systemd1", path, "org.freedesktop.systemd1.Unit").await?;
        Ok(u.get_property("ActiveEnterTimestamp").await?)
    }

    /// The file systemd loaded `unit` from.
    pub async fn fragment_path(&self, unit: &str) -> Result<String> {
        let path: zbus::zvariant::OwnedObjectPath = self.manager().await?.call("LoadUnit", &(unit,)).await?;
        let u = zbus::Proxy::new(&self.conn, "org.freedesktop.systemd1", path, "org.freedesktop.systemd1.Unit").await?;
        Ok(u.get_property("FragmentPath").await?)
    }

    /// ActiveState of many units in one call (units systemd does not know are left out).
    pub async fn active_states(&self, units: &[String]) -> Result<std::collections::HashMap<String, String>> {
        let names: Vec<&str> = units.iter().map(String::as_str).collect();
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            zbus::zvariant::OwnedObjectPath,
            u32,
            String,
            zbus::zvariant::OwnedObjectPath,
        );
        let rows: Vec<Row> = self.manager().await?.call("ListUnitsByNames", &(names,)).await?;
        Ok(rows.into_iter().filter(|r| r.2 != "not-found").map(|r| (r.0, r.3)).collect())
    }

    pub async fn restart(&self, unit: &str) -> Result<()> {
        let _: zbus::zvariant::OwnedObjectPath = self.manager().await?.call("RestartUnit", &(unit, "replace")).await?;
        Ok(())
    }
}
