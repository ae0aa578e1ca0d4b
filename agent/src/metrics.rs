//! The agent's Prometheus metrics (docs/metrics.md): systemd calls by kind with their latency
//! and errors, units by active state, reconcile passes, lease renewals, and when etcd last
//! answered. Served at `/metrics` on the agent's API (engines' certificates) and, with
//! `metrics_listen`, on a plain listener on localhost for the machine's own Prometheus agent.
//!
//! Labels take values from fixed sets only (a call's kind, an active state systemd defines, an
//! outcome): never a unit's name. Systemd calls are counted by [`Measured`], a driver wrapping
//! the real one, so the agent's loop and the simulated driver are untouched.

use crate::driver::UnitDriver;
use crate::systemd::{ObservedUnit, SystemdError, UnitChange};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `start`, `stop`, `link`, `enable`, `disable`, `reload`, `reset_failed`, `observe`.
    pub call: String,
    /// `ok` or `error`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub call: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// systemd's ActiveState (`active`, `inactive`, `failed`, `activating`, ...).
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok` or `failed`.
    pub outcome: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// systemd's ActiveStates, so that an unknown one cannot make a new label value.
const ACTIVE_STATES: &[&str] =
    &["active", "reloading", "inactive", "failed", "activating", "deactivating", "maintenance", "refreshing"];

/// Every metric the agent records, and the registry they are served from.
pub struct AgentMetrics {
    registry: Registry,
    pub systemd_calls: Family<CallLabels, Counter>,
    pub systemd_call_duration: HistogramFamily<KindLabels>,
    pub units: Family<StateLabels, Gauge>,
    pub reconcile_passes: Counter,
    pub reconcile_duration: Histogram,
    pub lease_renewals: Family<OutcomeLabels, Counter>,
    pub last_etcd_contact: Gauge<f64, AtomicU64>,
}

impl AgentMetrics {
    pub fn new() -> Arc<AgentMetrics> {
        let mut registry = Registry::with_prefix("fleet_agent");
        let systemd_calls = Family::<CallLabels, Counter>::default();
        registry.register("systemd_calls", "Calls to systemd over D-Bus, by kind and outcome", systemd_calls.clone());
        let systemd_call_duration: HistogramFamily<KindLabels> = Family::new_with_constructor(latency);
        registry.register_with_unit(
            "systemd_call_duration",
            "Time of one call to systemd, by kind",
            Unit::Seconds,
            systemd_call_duration.clone(),
        );
        let units = Family::<StateLabels, Gauge>::default();
        registry.register("units", "fleet's units on this machine, by systemd's active state", units.clone());
        let reconcile_passes = Counter::default();
        registry.register(
            "reconcile_passes",
            "Passes bringing systemd in line with this machine's schedule",
            reconcile_passes.clone(),
        );
        let reconcile_duration = latency();
        registry.register_with_unit(
            "reconcile_duration",
            "Time of one reconcile pass",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let lease_renewals = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "lease_renewals",
            "Renewals of this machine's etcd lease (its presence), by outcome",
            lease_renewals.clone(),
        );
        let last_etcd_contact = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_etcd_contact_timestamp_seconds",
            "When etcd last renewed this machine's lease (Unix time); time() minus it is the silence",
            last_etcd_contact.clone(),
        );
        Arc::new(AgentMetrics {
            registry,
            systemd_calls,
            systemd_call_duration,
            units,
            reconcile_passes,
            reconcile_duration,
            lease_renewals,
            last_etcd_contact,
        })
    }

    fn call(&self, call: &str, ok: bool, took: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.systemd_calls.get_or_create(&CallLabels { call: call.into(), outcome: outcome.into() }).inc();
        self.systemd_call_duration.get_or_create(&KindLabels { call: call.into() }).observe(took.as_secs_f64());
    }

    /// A lease renewal's outcome; a success is etcd's latest word.
    pub fn renewal(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.lease_renewals.get_or_create(&OutcomeLabels { outcome: outcome.into() }).inc();
        if ok {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            self.last_etcd_contact.set(now.as_secs_f64());
        }
    }

    /// How many of fleet's units are in each active state (every known state is set, to 0 if
    /// none, so a series does not vanish when its last unit leaves it).
    pub fn set_units<'a>(&self, active_states: impl IntoIterator<Item = &'a str>) {
        let mut counts: HashMap<&str, i64> = ACTIVE_STATES.iter().map(|s| (*s, 0)).collect();
        for s in active_states {
            if let Some(n) = counts.get_mut(s) {
                *n += 1;
            }
        }
        for (state, n) in counts {
            self.units.get_or_create(&StateLabels { state: state.into() }).set(n);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// A service manager whose every call is counted and timed.
#[derive(Clone)]
pub struct Measured<D> {
    inner: D,
    metrics: Arc<AgentMetrics>,
}

impl<D> Measured<D> {
    pub fn new(inner: D, metrics: Arc<AgentMetrics>) -> Self {
        Measured { inner, metrics }
    }
}

impl<D: UnitDriver> Measured<D> {
    async fn timed<T>(
        &self,
        call: &str,
        fut: impl Future<Output = Result<T, SystemdError>>,
    ) -> Result<T, SystemdError> {
        let started = Instant::now();
        let r = fut.await;
        self.metrics.call(call, r.is_ok(), started.elapsed());
        r
    }
}

impl<D: UnitDriver> UnitDriver for Measured<D> {
    async fn reload(&self) -> Result<(), SystemdError> {
        self.timed("reload", self.inner.reload()).await
    }
    async fn link(&self, paths: &[String]) -> Result<(), SystemdError> {
        self.timed("link", self.inner.link(paths)).await
    }
    async fn enable(&self, paths: &[String]) -> Result<(), SystemdError> {
        self.timed("enable", self.inner.enable(paths)).await
    }
    async fn disable(&self, names: &[String]) -> Result<(), SystemdError> {
        self.timed("disable", self.inner.disable(names)).await
    }
    async fn start(&self, name: &str) -> Result<(), SystemdError> {
        self.timed("start", self.inner.start(name)).await
    }
    async fn stop(&self, name: &str) -> Result<(), SystemdError> {
        self.timed("stop", self.inner.stop(name)).await
    }
    async fn reset_failed(&self, name: &str) -> Result<(), SystemdError> {
        self.timed("reset_failed", self.inner.reset_failed(name)).await
    }
    async fn observe(&self, names: &[String]) -> Result<HashMap<String, ObservedUnit>, SystemdError> {
        self.timed("observe", self.inner.observe(names)).await
    }
    async fn watch_changes(&self, tx: mpsc::UnboundedSender<UnitChange>) -> Result<(), SystemdError> {
        self.inner.watch_changes(tx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::SimulatedSystemd;

    #[tokio::test]
    async fn calls_are_counted_by_kind_and_outcome_without_unit_names() {
        let m = AgentMetrics::new();
        let d = Measured::new(SimulatedSystemd::new(Duration::from_millis(1)), m.clone());
        let _ = d.start("never-linked-secret-name.service").await;
        let _ = d.reload().await;
        m.set_units(["active", "active", "failed", "made-up"]);
        m.renewal(true);
        m.renewal(false);
        let text = m.render();
        assert!(text.contains("fleet_agent_systemd_calls_total{call=\"reload\",outcome=\"ok\"} 1"), "{text}");
        assert!(text.contains("fleet_agent_systemd_calls_total{call=\"start\""), "{text}");
        assert!(text.contains("fleet_agent_systemd_call_duration_seconds_count{call=\"start\"} 1"), "{text}");
        assert!(text.contains("fleet_agent_units{state=\"active\"} 2"), "{text}");
        assert!(text.contains("fleet_agent_units{state=\"inactive\"} 0"), "{text}");
        assert!(!text.contains("made-up") && !text.contains("secret-name"), "unbounded label values: {text}");
        assert!(text.contains("fleet_agent_lease_renewals_total{outcome=\"failed\"} 1"), "{text}");
        assert!(!text.contains("fleet_agent_last_etcd_contact_timestamp_seconds 0\n"), "{text}");
    }
}
