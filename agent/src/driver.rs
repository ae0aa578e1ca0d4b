//! What the agent needs from a service manager, as a trait: [`Systemd`](crate::systemd::Systemd)
//! is the real one (D-Bus); [`SimulatedSystemd`] is an in-memory stand-in for the large-scale
//! benchmarks (`fleet-sim`), which run thousands of agents in one process. The simulated driver
//! is never used by the `fleet-agent` binary.

use crate::systemd::{ObservedUnit, SystemdError, UnitChange, MAX_IN_FLIGHT};
use futures::StreamExt;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

pub trait UnitDriver: Clone + Send + Sync + 'static {
    /// One daemon reload after a batch of links or unlinks.
    fn reload(&self) -> impl Future<Output = Result<(), SystemdError>> + Send;
    /// Links unit files (absolute paths) at runtime.
    fn link(&self, paths: &[String]) -> impl Future<Output = Result<(), SystemdError>> + Send;
    /// Enables units with an `[Install]` section at runtime.
    fn enable(&self, paths: &[String]) -> impl Future<Output = Result<(), SystemdError>> + Send;
    fn disable(&self, names: &[String]) -> impl Future<Output = Result<(), SystemdError>> + Send;
    fn start(&self, name: &str) -> impl Future<Output = Result<(), SystemdError>> + Send;
    fn stop(&self, name: &str) -> impl Future<Output = Result<(), SystemdError>> + Send;
    fn reset_failed(&self, name: &str) -> impl Future<Output = Result<(), SystemdError>> + Send;
    /// Current states of `names`; units the manager does not know are left out.
    fn observe(
        &self,
        names: &[String],
    ) -> impl Future<Output = Result<HashMap<String, ObservedUnit>, SystemdError>> + Send;
    /// Sends a hint whenever a unit's state may have changed.
    fn watch_changes(
        &self,
        tx: mpsc::UnboundedSender<UnitChange>,
    ) -> impl Future<Output = Result<(), SystemdError>> + Send;
}

/// Runs `op` on every name with at most [`MAX_IN_FLIGHT`] calls pending; returns the failures.
pub async fn for_each<'a, D, F, Fut>(
    driver: &D,
    names: impl IntoIterator<Item = &'a String>,
    op: F,
) -> Vec<(String, SystemdError)>
where
    D: UnitDriver,
    F: Fn(D, String) -> Fut,
    Fut: Future<Output = Result<(), SystemdError>>,
{
    futures::stream::iter(names.into_iter().cloned())
        .map(|n| {
            let fut = op(driver.clone(), n.clone());
            async move { fut.await.err().map(|e| (n, e)) }
        })
        .buffer_unordered(MAX_IN_FLIGHT)
        .filter_map(|r| async move { r })
        .collect()
        .await
}

/// An in-memory service manager that behaves like systemd as far as the agent can tell: units
/// exist once linked and reloaded, a start goes through `activating` and reaches `active/running`
/// after `start_delay` (systemd takes ~4 ms for a simple service on these machines), a unit
/// whose `ExecStart=` is `/bin/false` ends `failed/failed`, and every change is signalled.
/// For benchmarks only.
#[derive(Clone)]
pub struct SimulatedSystemd {
    state: Arc<Mutex<SimState>>,
    start_delay: Duration,
    /// Where linked files are read: the agent's in-memory files, or (`None`) the filesystem.
    files: Option<crate::files::MemoryUnitFiles>,
}

#[derive(Default)]
struct SimState {
    /// Linked unit files: name -> whether it is made to fail.
    linked: HashMap<String, bool>,
    units: HashMap<String, ObservedUnit>,
    watchers: Vec<mpsc::UnboundedSender<UnitChange>>,
}

fn observed(load: &str, active: &str, sub: &str) -> ObservedUnit {
    ObservedUnit { load_state: load.into(), active_state: active.into(), sub_state: sub.into() }
}

impl SimulatedSystemd {
    pub fn new(start_delay: Duration) -> Self {
        SimulatedSystemd { state: Arc::default(), start_delay, files: None }
    }

    /// Reads the files it is told to link from `files` (an agent's [`MemoryUnitFiles`]) rather
    /// than from disk.
    ///
    /// [`MemoryUnitFiles`]: crate::files::MemoryUnitFiles
    pub fn with_files(mut self, files: crate::files::MemoryUnitFiles) -> Self {
        self.files = Some(files);
        self
    }

    fn with<T>(&self, f: impl FnOnce(&mut SimState) -> T) -> T {
        // A poisoned lock means a panic elsewhere in the simulation; carry on with its state.
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    fn set(&self, name: &str, unit: ObservedUnit) {
        self.with(|s| {
            s.units.insert(name.to_string(), unit);
            s.watchers.retain(|w| w.send(UnitChange::Name(name.to_string())).is_ok());
        });
    }

    /// Number of units active right now.
    pub fn active_count(&self) -> usize {
        self.with(|s| s.units.values().filter(|u| u.active_state == "active").count())
    }
}

fn unknown(call: &str, name: &str) -> SystemdError {
    SystemdError::Simulated(format!("{call} {name}: unit not loaded"))
}

impl UnitDriver for SimulatedSystemd {
    async fn reload(&self) -> Result<(), SystemdError> {
        self.with(|s| {
            let gone: Vec<String> = s.units.keys().filter(|n| !s.linked.contains_key(*n)).cloned().collect();
            for n in gone {
                if s.units.get(&n).is_some_and(|u| u.active_state == "inactive") {
                    s.units.remove(&n);
                }
            }
            let new: Vec<String> = s.linked.keys().filter(|n| !s.units.contains_key(*n)).cloned().collect();
            for n in new {
                s.units.insert(n, observed("loaded", "inactive", "dead"));
            }
        });
        Ok(())
    }

    async fn link(&self, paths: &[String]) -> Result<(), SystemdError> {
        for p in paths {
            let path = std::path::Path::new(p);
            let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            let text = match &self.files {
                Some(files) => files.text(path),
                None => std::fs::read_to_string(path).ok(),
            };
            let fails = text.is_some_and(|t| t.contains("ExecStart=/bin/false"));
            self.with(|s| s.linked.insert(name, fails));
        }
        Ok(())
    }

    async fn enable(&self, paths: &[String]) -> Result<(), SystemdError> {
        self.link(paths).await
    }

    async fn disable(&self, names: &[String]) -> Result<(), SystemdError> {
        self.with(|s| {
            for n in names {
                s.linked.remove(n);
            }
        });
        Ok(())
    }

    async fn start(&self, name: &str) -> Result<(), SystemdError> {
        // Like systemd since v247: a newly linked unit is loaded on first use, without a reload.
        let Some(fails) = self.with(|s| {
            let fails = s.linked.get(name).copied()?;
            s.units.entry(name.to_string()).or_insert_with(|| observed("loaded", "inactive", "dead"));
            Some(fails)
        }) else {
            return Err(unknown("StartUnit", name));
        };
        self.set(name, observed("loaded", "activating", "start"));
        let me = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(me.start_delay).await;
            // A stop that came first wins, as a systemd job would be cancelled.
            if me.with(|s| s.units.get(&name).is_some_and(|u| u.active_state == "activating")) {
                let end = if fails {
                    observed("loaded", "failed", "failed")
                } else {
                    observed("loaded", "active", "running")
                };
                me.set(&name, end);
            }
        });
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<(), SystemdError> {
        if self.with(|s| s.units.contains_key(name)) {
            self.set(name, observed("loaded", "inactive", "dead"));
        }
        Ok(())
    }

    async fn reset_failed(&self, name: &str) -> Result<(), SystemdError> {
        if self.with(|s| s.units.get(name).is_some_and(|u| u.active_state == "failed")) {
            self.set(name, observed("loaded", "inactive", "dead"));
        }
        Ok(())
    }

    async fn observe(&self, names: &[String]) -> Result<HashMap<String, ObservedUnit>, SystemdError> {
        Ok(self.with(|s| names.iter().filter_map(|n| s.units.get(n).map(|u| (n.clone(), u.clone()))).collect()))
    }

    async fn watch_changes(&self, tx: mpsc::UnboundedSender<UnitChange>) -> Result<(), SystemdError> {
        self.with(|s| s.watchers.push(tx));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn simulated_units_go_through_systemd_states() {
        let dir = std::env::temp_dir().join(format!("fleet-simdriver-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let ok = dir.join("ok.service");
        let bad = dir.join("bad.service");
        std::fs::write(&ok, "[Service]\nExecStart=/bin/sleep infinity\n").expect("write");
        std::fs::write(&bad, "[Service]\nExecStart=/bin/false\n").expect("write");
        let d = SimulatedSystemd::new(Duration::from_millis(1));
        let (tx, mut rx) = mpsc::unbounded_channel();
        d.watch_changes(tx).await.expect("watch");
        let names = vec!["ok.service".to_string(), "bad.service".to_string()];
        assert!(d.start("ok.service").await.is_err(), "a unit not linked cannot start");
        d.link(&[ok.display().to_string(), bad.display().to_string()]).await.expect("link");
        d.reload().await.expect("reload");
        assert_eq!(d.observe(&names).await.expect("observe")["ok.service"].active_state, "inactive");
        for n in &names {
            d.start(n).await.expect("start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = d.observe(&names).await.expect("observe");
        assert_eq!(s["ok.service"], observed("loaded", "active", "running"));
        assert_eq!(s["bad.service"], observed("loaded", "failed", "failed"));
        assert!(rx.try_recv().is_ok(), "changes are signalled");
        d.stop("ok.service").await.expect("stop");
        d.disable(&["ok.service".to_string()]).await.expect("disable");
        d.reload().await.expect("reload");
        assert!(!d.observe(&names).await.expect("observe").contains_key("ok.service"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
