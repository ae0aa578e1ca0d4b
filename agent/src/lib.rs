//! fleet-agent: makes one machine run exactly the units the engine scheduled to it.
//!
//! Boundaries: the agent reads only its own schedule prefix and the unit bodies it needs, writes
//! only its machine record and its unit states (all on its one lease), and talks to nothing but
//! etcd and the local systemd. It never decides placement. It depends on the shared libraries
//! only, never on the engine (what it answers the engine's relay with is a `fleet-api` type).
//!
//! Concerns, each a small piece: [`presence`] (lease and machine record), [`reconcile`] (the pure
//! diff of schedule against disk), [`systemd`] (D-Bus), [`driver`] (the service manager as a
//! trait, with an in-memory stand-in for benchmarks only), `publish` (unit states on the lease), and
//! [`Agent`] joining them.

pub mod config;
pub mod driver;
pub mod files;
pub mod guard;
pub mod health;
pub mod image;
pub mod join;
pub mod metrics;
pub mod presence;
mod publish;
pub mod reconcile;
pub mod systemd;
pub mod unit_api;

use crate::config::AgentConfig;
use crate::driver::{for_each, UnitDriver};
use crate::files::{DiskUnitFiles, UnitFiles};
use crate::systemd::{Systemd, UnitChange};
use fleet_model::schema::{decode, Key};
use fleet_model::unit_file::content_hash;
use fleet_model::{DesiredState, Keys, ScheduleEntry, SchedulePage, StatePages, UnitName, UnitStateRecord};
use fleet_store::etcd::{Change, PrefixUpdate};
use fleet_store::kv::{follow, snapshot_of, EtcdStore, Store, StoreError};
use fleet_store::retry::RetryPolicy;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// How long a unit may stay `activating`/`deactivating` before that is published.
const TRANSIENT_GRACE: Duration = Duration::from_secs(1);

/// In the units directory: the exclusive units the agent stopped for a lease in doubt and has
/// not started again, one name a line (not a unit name, so never read as a unit).
const STOPPED_FOR_LEASE: &str = ".stopped-for-lease";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("unit directory {path}: {source}")]
    UnitsDir { path: PathBuf, source: std::io::Error },
    #[error("etcd: {0}")]
    Etcd(String),
    #[error(transparent)]
    Systemd(#[from] systemd::SystemdError),
}

/// The agent, over a service manager (the real [`Systemd`] unless a benchmark or a unit test says
/// otherwise), a store (etcd, or the in-memory one in unit tests) and its unit files (a directory,
/// or memory in benchmarks).
pub struct Agent<D: UnitDriver = Systemd, S: Store = EtcdStore, F: UnitFiles = DiskUnitFiles> {
    store: S,
    keys: Keys,
    machine: String,
    systemd: D,
    /// Where the agent's own small files are (its lease, the units stopped for a lease).
    units_dir: PathBuf,
    unit_files: F,
    /// This machine's schedule, as last seen in etcd: its pages' entries and its per-unit keys'.
    schedule: BTreeMap<String, ScheduleEntry>,
    /// The schedule's pages (`schedule/<machine>/<page>`), as the leader writes them for an
    /// agent that says it reads them (`MachineRecord::schedule_pages`).
    schedule_pages: BTreeMap<u32, SchedulePage>,
    /// Entries written one key per unit (by a leader before pages, or before this agent said
    /// it reads them); a leader moves them into pages.
    schedule_keys: BTreeMap<String, ScheduleEntry>,
    /// Unit files on disk: name -> content hash.
    files: BTreeMap<String, String>,
    /// Bodies read from etcd, by hash, while units scheduled here use them.
    bodies: HashMap<String, String>,
    applied: BTreeMap<String, DesiredState>,
    /// What is in etcd under `states/<machine>/`, page by page.
    published: StatePages,
    /// States an earlier version of the agent published one key per unit: republished into
    /// pages, and their keys deleted, by the first publication.
    legacy: HashMap<String, UnitStateRecord>,
    /// Units whose state must be (re)published once a lease is available.
    unpublished: BTreeSet<String>,
    /// The mod revision of each state page as this agent last wrote or read it: every write of
    /// a page is guarded by it, so a write that arrives late (sent before a newer one, its
    /// answer lost to a timeout) cannot overwrite the newer state.
    page_revisions: HashMap<u32, i64>,
    /// A write failed, timed out or found a page changed: read the pages back before the next.
    reread_pages: bool,
    /// A systemd call failed in the last pass: run another one shortly.
    reconcile_again: bool,
    /// The next pass reloads systemd (unit files changed, or a start failed).
    reload_needed: bool,
    /// Units seen starting or stopping, and since when (their state is published once settled).
    transient_since: HashMap<String, Instant>,
    lease: Option<i64>,
    path_to_unit: HashMap<String, String>,
    schedule_seen: bool,
    /// Pages of a schedule listing came and its snapshot has not yet.
    schedule_listing: bool,
    /// Units whose `[X-Fleet]` says `Exclusive=true`: stopped while the lease is in doubt.
    exclusive: BTreeSet<String>,
    /// The lease was lost or is in doubt: relist the schedule and stop what is no longer ours
    /// before the machine registers again.
    cleanup_needed: bool,
    stop_units_on_exit: bool,
    /// Units refused because they would replace one of the machine's own (name -> content hash).
    refused: BTreeMap<String, String>,
    /// Exclusive units stopped while the lease was in doubt, told at the next registration.
    stopped_while_cut_off: Vec<String>,
    /// Exclusive units this agent stopped for a lease in doubt and has not started again. Kept
    /// on disk too ([`STOPPED_FOR_LEASE`]): what it published about them (launched) may not have
    /// reached etcd, and an agent restarted in between must start them again, not trust it.
    stopped_for_lease: BTreeSet<String>,
    /// The daemon's metrics; none in benchmarks and unit tests.
    metrics: Option<std::sync::Arc<metrics::AgentMetrics>>,
    /// Units whose `[X-Fleet]` declares their health, and where each stands.
    health: HashMap<String, fleet_model::health::HealthTracker>,
    /// Their checks, while the agent runs.
    checks: Option<health::Checks>,
    /// The trackers' clock (milliseconds since the agent started).
    clock: Instant,
}

/// Counts a reconcile pass and its time when dropped (a pass has several ways out).
struct PassTimer(std::sync::Arc<metrics::AgentMetrics>, Instant);

impl Drop for PassTimer {
    fn drop(&mut self) {
        self.0.reconcile_passes.inc();
        self.0.reconcile_duration.observe(self.1.elapsed().as_secs_f64());
    }
}

/// A unit file's `[X-Fleet]` section (the engine refused any it could not read).
fn rules_of(name: &str, text: &str) -> Option<fleet_model::rules::Rules> {
    let (Ok(unit), Ok(file)) = (UnitName::parse(name), fleet_model::UnitFile::parse(text)) else { return None };
    fleet_model::rules::Rules::parse(&unit, &file).ok()
}

impl<D: UnitDriver, S: Store> Agent<D, S, DiskUnitFiles> {
    /// An agent whose unit files are in `cfg.units_dir`.
    pub async fn new(cfg: &AgentConfig, store: S, machine: String, systemd: D) -> Result<Self, AgentError> {
        Self::with_files(cfg, store, machine, systemd, DiskUnitFiles::new(cfg.units_dir.clone())).await
    }
}

impl<D: UnitDriver, S: Store, F: UnitFiles> Agent<D, S, F> {
    pub async fn with_files(
        cfg: &AgentConfig,
        store: S,
        machine: String,
        systemd: D,
        unit_files: F,
    ) -> Result<Self, AgentError> {
        let units_dir = cfg.units_dir.clone();
        tokio::fs::create_dir_all(&units_dir)
            .await
            .map_err(|source| AgentError::UnitsDir { path: units_dir.clone(), source })?;
        let mut agent = Agent {
            store,
            keys: Keys::new(&cfg.etcd_prefix),
            machine,
            systemd,
            units_dir,
            unit_files,
            schedule: BTreeMap::new(),
            schedule_pages: BTreeMap::new(),
            schedule_keys: BTreeMap::new(),
            files: BTreeMap::new(),
            bodies: HashMap::new(),
            applied: BTreeMap::new(),
            published: StatePages::default(),
            legacy: HashMap::new(),
            unpublished: BTreeSet::new(),
            page_revisions: HashMap::new(),
            reread_pages: false,
            transient_since: HashMap::new(),
            reconcile_again: false,
            reload_needed: false,
            lease: None,
            path_to_unit: HashMap::new(),
            schedule_seen: false,
            schedule_listing: false,
            exclusive: BTreeSet::new(),
            cleanup_needed: false,
            stop_units_on_exit: cfg.stop_units_on_exit,
            refused: BTreeMap::new(),
            stopped_while_cut_off: Vec::new(),
            stopped_for_lease: BTreeSet::new(),
            metrics: None,
            health: HashMap::new(),
            checks: None,
            clock: Instant::now(),
        };
        agent.read_files().await?;
        agent.read_published().await?;
        agent.read_stopped_for_lease().await;
        Ok(agent)
    }

    /// Records reconcile passes and units by state in `metrics` (wrap the driver in
    /// [`metrics::Measured`] for its calls).
    pub fn with_metrics(mut self, metrics: std::sync::Arc<metrics::AgentMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    async fn read_files(&mut self) -> Result<(), AgentError> {
        let found = self
            .unit_files
            .read_all()
            .await
            .map_err(|source| AgentError::UnitsDir { path: self.units_dir.clone(), source })?;
        for (name, text) in found {
            match text {
                Ok(text) => {
                    self.learn_rules(&name, &text, false);
                    self.path_to_unit.insert(systemd::unit_path(&name), name.clone());
                    self.files.insert(name, content_hash(&text));
                }
                Err(e) => {
                    tracing::warn!(unit = %name, error = %e, "unreadable unit file; it will be rewritten")
                }
            }
        }
        Ok(())
    }

    /// Runs until `shutdown` fires. Units keep running when the agent stops: a restarted agent
    /// adopts them.
    pub async fn run(
        mut self,
        mut lease_rx: watch::Receiver<Option<i64>>,
        cleaned: watch::Sender<presence::Cleaned>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), AgentError> {
        let (sched_tx, mut sched_rx) = mpsc::channel(64);
        tokio::spawn(follow(self.store.clone(), self.keys.schedule_of(&self.machine), sched_tx));
        let (change_tx, mut change_rx) = mpsc::unbounded_channel();
        self.systemd.watch_changes(change_tx).await?;
        self.lease = *lease_rx.borrow_and_update();
        let (health_tx, mut health_rx) = mpsc::unbounded_channel();
        self.checks = Some(health::Checks::new(health_tx));
        // Only armed while something failed to publish: an idle agent has no timers.
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let retry = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => futures::future::pending().await,
                }
            };
            // Armed only while a unit waits out its `MinHealthyTime`.
            let health_at = self.next_health_change();
            let health_due = async {
                match health_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                result = health_rx.recv() => {
                    if let Some((unit, run, passed)) = result {
                        self.note_check(&unit, run, passed);
                        while let Ok((unit, run, passed)) = health_rx.try_recv() {
                            self.note_check(&unit, run, passed);
                        }
                    }
                }
                _ = health_due => self.note_health_time(),
                update = sched_rx.recv() => {
                    let Some(update) = update else { break };
                    self.apply_schedule_update(update);
                    while let Ok(more) = sched_rx.try_recv() {
                        self.apply_schedule_update(more);
                    }
                    if self.schedule_seen {
                        self.reconcile().await;
                    }
                }
                change = change_rx.recv() => {
                    let Some(change) = change else {
                        return Err(AgentError::Etcd("lost the systemd bus connection".into()));
                    };
                    // Let a burst of signals settle into one batch.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    self.note_change(change);
                    while let Ok(more) = change_rx.try_recv() {
                        self.note_change(more);
                    }
                }
                changed = lease_rx.changed() => {
                    if changed.is_err() { break; }
                    let lease = *lease_rx.borrow_and_update();
                    if lease.is_some() && lease != self.lease {
                        // A new lease starts empty: everything must be published again.
                        self.published.clear();
                        // Gone with the lease that held them, most likely (if not, the first
                        // write finds them and reads them back).
                        self.page_revisions.clear();
                        self.legacy.clear();
                        self.unpublished.extend(self.files.keys().cloned());
                    }
                    let was = self.lease;
                    self.lease = lease;
                    match (was, lease) {
                        (Some(_), None) => {
                            self.stop_exclusive().await;
                            self.cleanup_needed = true;
                        }
                        // Back with a lease: exclusive units still scheduled here start again.
                        (None, Some(_)) if self.schedule_seen => self.reconcile().await,
                        _ => {}
                    }
                }
                _ = retry => {
                    retry_at = None;
                    if std::mem::take(&mut self.reconcile_again) && self.schedule_seen {
                        self.reconcile().await;
                    }
                }
                _ = shutdown.changed() => break,
            }
            if self.reconcile_again && retry_at.is_none() {
                retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
            if self.cleanup_needed {
                if self.clean_up().await {
                    self.cleanup_needed = false;
                    let stopped = std::mem::take(&mut self.stopped_while_cut_off);
                    cleaned.send_modify(|c| {
                        c.generation += 1;
                        c.stopped = stopped;
                    });
                } else if retry_at.is_none() {
                    retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
            }
            if !self.unpublished.is_empty() {
                // Failed, or states deferred while units start: look again in a moment.
                let failed = self.publish().await.is_err();
                if (failed || !self.unpublished.is_empty()) && retry_at.is_none() {
                    retry_at = Some(tokio::time::Instant::now() + TRANSIENT_GRACE);
                }
            }
            if let Some(m) = &self.metrics {
                m.set_units(self.published.values().map(|s| s.active_state.as_str()));
            }
        }
        if self.stop_units_on_exit {
            tracing::info!("agent stopping: stopping and unloading every unit, giving up the lease");
            self.schedule.clear();
            self.reconcile().await;
            let _ = self.publish().await;
            if let Some(lease) = self.lease {
                let _ = tokio::time::timeout(Duration::from_secs(3), self.store.revoke(lease)).await;
            }
        } else {
            tracing::info!("agent stopping; units keep running");
        }
        Ok(())
    }

    /// What the agent itself acts on in a unit's `[X-Fleet]`: exclusivity and health.
    fn learn_rules(&mut self, name: &str, text: &str, rewritten: bool) {
        let rules = rules_of(name, text);
        if rules.as_ref().is_some_and(|r| r.exclusive) {
            self.exclusive.insert(name.to_string());
        } else {
            self.exclusive.remove(name);
        }
        let spec = rules.map(|r| r.health).unwrap_or_default();
        if spec == fleet_model::health::HealthSpec::default() {
            if self.health.remove(name).is_some() {
                self.unpublished.insert(name.to_string());
            }
            if let Some(c) = self.checks.as_mut() {
                c.set(name, None, false);
            }
        } else if rewritten || self.health.get(name).is_none_or(|t| *t.spec() != spec) {
            // A new or changed declaration starts over, and so does a unit given a new file (it
            // restarts, perhaps without its agent ever seeing it inactive): its activity is seen
            // again at the next publication, and its check runs anew.
            if let Some(c) = self.checks.as_mut() {
                c.set(name, None, false);
            }
            self.health.insert(name.to_string(), fleet_model::health::HealthTracker::new(spec));
            self.unpublished.insert(name.to_string());
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// A check's result: the unit is published again if its health changed.
    fn note_check(&mut self, unit: &str, run: u64, passed: bool) {
        // A result of a check stopped since (the unit restarted, or its check changed) says
        // nothing of the unit as it runs now.
        if !self.checks.as_ref().is_some_and(|c| c.current(unit, run)) {
            return;
        }
        let now = self.now_ms();
        let Some(t) = self.health.get_mut(unit) else { return };
        t.checked(passed);
        let health = t.health(now);
        if self.published.get(unit).and_then(|r| r.health) != health {
            if let Some(h) = health {
                tracing::info!(unit, health = h.as_str(), "health changed");
            }
            self.unpublished.insert(unit.to_string());
        }
    }

    /// Health that changed by time alone (`MinHealthyTime` passed) is published.
    fn note_health_time(&mut self) {
        let now = self.now_ms();
        for (unit, t) in &self.health {
            if self.published.get(unit).and_then(|r| r.health) != t.health(now) {
                self.unpublished.insert(unit.clone());
            }
        }
    }

    /// When some unit's health changes by time alone next.
    fn next_health_change(&self) -> Option<tokio::time::Instant> {
        let now = self.now_ms();
        let at = self.health.values().filter_map(|t| t.changes_at()).filter(|at| *at > now).min()?;
        Some(tokio::time::Instant::from_std(self.clock + Duration::from_millis(at)))
    }

    fn note_change(&mut self, change: UnitChange) {
        let name = match change {
            UnitChange::Name(n) => Some(n),
            UnitChange::Path(p) => self.path_to_unit.get(&p).cloned(),
        };
        if let Some(n) = name {
            if self.files.contains_key(&n) || self.published.contains_key(&n) || self.legacy.contains_key(&n) {
                self.unpublished.insert(n);
            }
        }
    }

    fn apply_schedule_update(&mut self, update: PrefixUpdate) {
        let changes = match update {
            // The agent's follower is not paged; pages are taken as meant all the same: the
            // snapshot after them ends their listing rather than replacing it.
            PrefixUpdate::Page { first, puts } => {
                if first || !self.schedule_listing {
                    self.schedule_pages.clear();
                    self.schedule_keys.clear();
                }
                self.schedule_listing = true;
                puts
            }
            PrefixUpdate::Snapshot { puts, .. } => {
                if !std::mem::take(&mut self.schedule_listing) {
                    self.schedule_pages.clear();
                    self.schedule_keys.clear();
                }
                self.schedule_seen = true;
                puts
            }
            PrefixUpdate::Changes { changes, .. } => changes,
        };
        for c in changes {
            match c {
                Change::Put { key, value, .. } => match self.keys.decode(&key) {
                    Some(Key::SchedulePage(_, n)) => match decode::<SchedulePage>(&value) {
                        Ok(page) => {
                            self.schedule_pages.insert(n, page);
                        }
                        Err(e) => tracing::error!(page = n, error = %e, "unreadable schedule page; ignoring"),
                    },
                    Some(Key::Schedule(_, unit)) => match decode::<ScheduleEntry>(&value) {
                        Ok(e) => {
                            self.schedule_keys.insert(unit.to_string(), e);
                        }
                        Err(e) => {
                            tracing::error!(unit = %unit, error = %e, "unreadable schedule entry; ignoring")
                        }
                    },
                    _ => {}
                },
                Change::Delete { key, .. } => match self.keys.decode(&key) {
                    Some(Key::SchedulePage(_, n)) => {
                        self.schedule_pages.remove(&n);
                    }
                    Some(Key::Schedule(_, unit)) => {
                        self.schedule_keys.remove(unit.as_str());
                    }
                    _ => {}
                },
            }
        }
        // A unit moved from its own key into a page is in both for a moment: the same entry.
        let mut schedule = self.schedule_keys.clone();
        for page in self.schedule_pages.values() {
            schedule.extend(page.iter().map(|(u, e)| (u.clone(), e.clone())));
        }
        self.schedule = schedule;
    }

    /// An earlier run stopped these exclusive units for a lease in doubt: whatever it published
    /// about them, they are not launched now (they start again once this agent holds a lease).
    async fn read_stopped_for_lease(&mut self) {
        let Ok(text) = tokio::fs::read_to_string(self.units_dir.join(STOPPED_FOR_LEASE)).await else { return };
        for name in text.lines().map(str::trim).filter(|n| self.files.contains_key(*n)) {
            self.applied.insert(name.to_string(), DesiredState::Loaded);
            self.stopped_for_lease.insert(name.to_string());
        }
    }

    /// Writes [`STOPPED_FOR_LEASE`] (atomically), or removes it when empty.
    async fn save_stopped_for_lease(&self) {
        let path = self.units_dir.join(STOPPED_FOR_LEASE);
        let result = if self.stopped_for_lease.is_empty() {
            match tokio::fs::remove_file(&path).await {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        } else {
            let tmp = self.units_dir.join(format!("{STOPPED_FOR_LEASE}.tmp"));
            let text: String = self.stopped_for_lease.iter().map(|n| format!("{n}\n")).collect();
            match tokio::fs::write(&tmp, text).await {
                Ok(()) => tokio::fs::rename(&tmp, &path).await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = result {
            tracing::error!(path = %path.display(), error = %e, "cannot record the exclusive units stopped for the lease");
        }
    }

    /// Stops exclusive units: the lease is in doubt, so the engine may soon place them elsewhere.
    async fn stop_exclusive(&mut self) {
        let running: Vec<String> =
            self.exclusive.iter().filter(|n| self.applied.get(*n) == Some(&DesiredState::Launched)).cloned().collect();
        if running.is_empty() {
            return;
        }
        // Recorded before they stop: an agent killed after the stop but before it could publish
        // it (etcd is what is in doubt) must not take the old "launched" for the truth.
        self.stopped_for_lease.extend(running.iter().cloned());
        self.save_stopped_for_lease().await;
        tracing::warn!(units = ?running, "lease in doubt: stopping exclusive units");
        for (unit, e) in for_each(&self.systemd, &running, |s, n| async move { s.stop(&n).await }).await {
            tracing::error!(%unit, error = %e, "cannot stop exclusive unit");
        }
        for n in running {
            self.applied.insert(n.clone(), DesiredState::Loaded);
            self.unpublished.insert(n.clone());
            if !self.stopped_while_cut_off.contains(&n) {
                self.stopped_while_cut_off.push(n);
            }
        }
    }

    /// Reads this machine's schedule afresh and applies it, stopping whatever is no longer
    /// scheduled here. False if etcd could not be read (try again later).
    async fn clean_up(&mut self) -> bool {
        let prefix = self.keys.schedule_of(&self.machine);
        let got = tokio::time::timeout(Duration::from_secs(10), self.store.range(prefix.as_bytes())).await;
        let Ok(Ok((entries, revision))) = got else { return false };
        let snapshot = snapshot_of(entries, revision);
        self.apply_schedule_update(snapshot);
        self.reconcile().await;
        tracing::info!(units = self.schedule.len(), "schedule relisted; units no longer scheduled here are stopped");
        true
    }

    async fn fetch_body(&self, hash: &str) -> Option<String> {
        let key = self.keys.body(hash);
        let got = RetryPolicy::default()
            // Bodies are immutable and named by their hash: a local (serializable) read is as
            // good as a linearizable one and skips a raft round trip, which matters when a
            // thousand agents fetch the same new body at once. Not there yet: try again.
            .run("read unit body", StoreError::is_transient, || self.store.get_local(key.as_bytes()))
            .await;
        match got {
            Ok(r) => r.and_then(|e| String::from_utf8(e.value).ok()),
            Err(e) => {
                tracing::warn!(hash, error = %e, "cannot read unit body");
                None
            }
        }
    }

    /// One pass: stops, removals, writes, one `Reload`, starts.
    async fn reconcile(&mut self) {
        let schedule = &self.schedule;
        let unscheduled: Vec<String> = self.refused.keys().filter(|n| !schedule.contains_key(*n)).cloned().collect();
        for n in unscheduled {
            self.refused.remove(&n);
            self.unpublished.insert(n);
        }
        let plan = reconcile::plan(&self.schedule, &self.files, &self.applied);
        if plan.is_empty() {
            return;
        }
        let started = Instant::now();
        let _timed = self.metrics.clone().map(|m| PassTimer(m, started));
        tracing::debug!(?plan, "reconciling");
        self.unpublished.extend(plan.touched().cloned());
        let mut failed = BTreeSet::new();
        for (unit, e) in for_each(&self.systemd, &plan.stop, |s, n| async move { s.stop(&n).await }).await {
            tracing::warn!(%unit, error = %e, "stop failed; will try again");
            failed.insert(unit);
        }
        for n in plan.stop.iter().filter(|n| !failed.contains(*n)) {
            self.applied.insert(n.clone(), DesiredState::Loaded);
        }
        // A unit whose stop failed keeps its file, so the next pass stops it again (forgotten,
        // it would run on unscheduled and unreported).
        let removed: Vec<String> = plan.remove.iter().filter(|n| !failed.contains(*n)).cloned().collect();
        if let Err(e) = self.systemd.disable(&removed).await {
            tracing::warn!(error = %e, "unlinking unit files failed");
        }
        for (unit, e) in self.unit_files.remove(&removed).await {
            tracing::warn!(%unit, error = %e, "cannot remove unit file");
        }
        for n in &removed {
            self.files.remove(n);
            self.applied.remove(n);
            self.exclusive.remove(n);
            self.health.remove(n);
            if let Some(c) = self.checks.as_mut() {
                c.set(n, None, false);
            }
        }
        let mut linked = Vec::new();
        let mut installable = Vec::new();
        // Many units share a body (instances of one template): read each distinct body once,
        // a few at a time.
        let missing: BTreeSet<String> =
            plan.write.iter().map(|(_, h)| h).filter(|h| !self.bodies.contains_key(*h)).cloned().collect();
        let this = &*self;
        let fetched: Vec<(String, Option<String>)> = futures::stream::iter(missing)
            .map(|h| async move {
                let body = this.fetch_body(&h).await;
                (h, body)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        self.bodies.extend(fetched.into_iter().filter_map(|(h, b)| b.map(|b| (h, b))));
        let mut to_write = Vec::new();
        for (name, hash) in &plan.write {
            let Some(body) = self.bodies.get(hash) else {
                self.reconcile_again = true;
                continue;
            };
            if content_hash(body) != *hash {
                tracing::error!(unit = %name, hash, "unit body does not match its hash; not running it");
                continue;
            }
            let check_shadowing = !self.files.contains_key(name);
            to_write.push(files::ToWrite {
                name: name.clone(),
                hash: hash.clone(),
                body: body.clone(),
                check_shadowing,
            });
        }
        // A write the blocking task never reported (it panicked) is made again.
        let wanted = to_write.len();
        let written = self.unit_files.write(to_write).await;
        if written.len() != wanted {
            self.reconcile_again = true;
        }
        for (f, result) in written {
            let files::ToWrite { name, hash, body, .. } = f;
            match result {
                files::Written::Shadows(own) => {
                    tracing::error!(unit = %name, shadows = %own.display(), "refused: the machine has a unit of this name");
                    self.refused.insert(name.clone(), hash);
                    self.unpublished.insert(name);
                }
                files::Written::Ok => {
                    let path = self.unit_files.path(&name);
                    if self.files.insert(name.clone(), hash).is_some() {
                        // New contents of a unit systemd has loaded: only a reload shows them.
                        self.reload_needed = true;
                    }
                    self.path_to_unit.insert(systemd::unit_path(&name), name.clone());
                    self.applied.insert(name.clone(), DesiredState::Loaded);
                    self.learn_rules(&name, &body, true);
                    if fleet_model::UnitFile::parse(&body)
                        .is_ok_and(|f| f.options.iter().any(|o| o.section == "Install"))
                    {
                        installable.push(path.to_string_lossy().to_string());
                    }
                    linked.push(path.to_string_lossy().to_string());
                }
                files::Written::Failed(e) => tracing::error!(unit = %name, error = %e, "cannot write unit file"),
            }
        }
        if let Err(e) = self.systemd.link(&linked).await {
            tracing::error!(error = %e, "linking unit files failed");
        }
        if let Err(e) = self.systemd.enable(&installable).await {
            tracing::error!(error = %e, "enabling unit files failed");
        }
        // systemd (since v247) loads a unit it has not seen, or saw missing, from a newly linked
        // file by itself, so a batch of new units starts without a daemon reload (90-250 ms);
        // changed or removed units need one, and so does a start that failed.
        if !removed.is_empty() || !installable.is_empty() || std::mem::take(&mut self.reload_needed) {
            if let Err(e) = self.systemd.reload().await {
                tracing::error!(error = %e, "systemd reload failed");
                self.reload_needed = true;
            }
        }
        for n in &removed {
            let _ = self.systemd.reset_failed(n).await;
        }
        // While the lease is in doubt an exclusive unit may already run elsewhere: do not start it.
        let startable: Vec<String> = plan
            .start
            .iter()
            .filter(|n| self.files.contains_key(*n) && (self.lease.is_some() || !self.exclusive.contains(*n)))
            .cloned()
            .collect();
        for (unit, e) in for_each(&self.systemd, &startable, |s, n| async move { s.start(&n).await }).await {
            tracing::warn!(%unit, error = %e, "start failed; will try again");
            failed.insert(unit);
        }
        // A call that failed (systemd busy, its bus connection reset during a reload) is not
        // recorded as applied, so the next pass makes it again.
        if !failed.is_empty() {
            self.reconcile_again = true;
            self.reload_needed = true;
        }
        let mut restarted = false;
        for n in startable.into_iter().filter(|n| !failed.contains(n)) {
            restarted |= self.stopped_for_lease.remove(&n);
            self.applied.insert(n, DesiredState::Launched);
        }
        // Units no longer here need no restart either.
        let before = self.stopped_for_lease.len();
        let files = &self.files;
        self.stopped_for_lease.retain(|n| files.contains_key(n));
        if restarted || self.stopped_for_lease.len() != before {
            self.save_stopped_for_lease().await;
        }
        let wanted: BTreeSet<&str> = self.schedule.values().map(|e| e.hash.as_str()).collect();
        self.bodies.retain(|h, _| wanted.contains(h.as_str()));
    }
}
