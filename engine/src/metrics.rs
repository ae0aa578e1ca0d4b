//! The engine's Prometheus metrics (docs/metrics.md), served at `/metrics` in Prometheus' text
//! format. Names follow Prometheus' conventions (`fleet_` prefix, units in names, `_total`
//! counters), and no label takes unbounded values: a request is labelled with its route's
//! template (`/fleet/v1/units/{name}`), never with a unit or machine name.
//!
//! Recording is a few atomic operations per event; gauges of the cluster's size are read from
//! the view only when scraped. Imports nothing of the engine but the bottom layer's types.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route's template, or `unmatched`.
    pub route: String,
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// What the call was for, from a fixed set (`write unit`, `read reboot lock`, ...).
    pub call: String,
    /// `ok`, `unavailable` (retried or answered 503) or `error`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, `refused` (the fence or a guard did not hold) or `failed`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    /// A FleetLock group: bounded by the engine's `[fleetlock]` configuration and its clients.
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `placed` (a schedule entry written) or `removed`.
    pub kind: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Request latencies from 1 ms to ~16 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every metric the engine records, and the registry they are served from.
pub struct Metrics {
    registry: Registry,
    pub api_requests: Family<RequestLabels, Counter>,
    pub api_request_duration: HistogramFamily<RouteLabels>,
    pub leader: Gauge,
    pub leadership_changes: Counter,
    /// Times the leader held a placement back for machines to report what it gave them.
    pub waits_for_agents: Counter,
    /// Times the leader waited for a bulk submission to end before placing its units.
    pub bulk_holds: Counter,
    pub plan_duration: Histogram,
    pub decisions: Family<DecisionLabels, Counter>,
    pub unplaceable: Gauge,
    pub schedule_writes: Family<OutcomeLabels, Counter>,
    pub store_requests: Family<StoreLabels, Counter>,
    pub store_duration: Histogram,
    pub reboot_slots_held: Family<GroupLabels, Gauge>,
    pub view_revision: Gauge,
    pub view_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Writes this engine made that its view did not show yet, oldest first: (revision, when).
    unseen_writes: std::sync::Mutex<std::collections::VecDeque<(i64, std::time::Instant)>>,
    pub units: Gauge,
    pub machines: Gauge,
    /// False with `metrics = false`: nothing is recorded (and `/metrics` answers 404).
    on: bool,
}

impl Metrics {
    /// Metrics that record.
    pub fn new() -> Arc<Metrics> {
        Self::with(true)
    }

    /// Metrics that record (`on`), or that record nothing: the engine's `metrics = false`, for
    /// an operator who does not want them and for measuring what they cost.
    pub fn with(on: bool) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("fleet");
        let api_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "API requests answered, by route, method and status code",
            api_requests.clone(),
        );
        let api_request_duration: HistogramFamily<RouteLabels> = Family::new_with_constructor(latency);
        registry.register_with_unit(
            "api_request_duration",
            "Time from a request's arrival to its answer, by route and method",
            Unit::Seconds,
            api_request_duration.clone(),
        );
        let leader = Gauge::default();
        registry.register("engine_leader", "1 while this engine leads the cluster, else 0", leader.clone());
        let leadership_changes = Counter::default();
        registry.register(
            "engine_leadership_changes",
            "Times this engine started or stopped leading",
            leadership_changes.clone(),
        );
        let waits_for_agents = Counter::default();
        registry.register(
            "schedule_waits_for_agents",
            "Times the leader held the rest of a placement back until machines reported the units it gave them",
            waits_for_agents.clone(),
        );
        let bulk_holds = Counter::default();
        registry.register(
            "schedule_bulk_holds",
            "Times the leader waited for units arriving in bulk to stop arriving before placing them",
            bulk_holds.clone(),
        );
        let plan_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register_with_unit(
            "schedule_plan_duration",
            "Time of one planning pass (the scheduler over the leader's copy of the view)",
            Unit::Seconds,
            plan_duration.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "schedule_decisions",
            "Schedule entries written (placed) or removed by the leader",
            decisions.clone(),
        );
        let unplaceable = Gauge::default();
        registry.register("units_unplaceable", "Units the last planning pass could not place", unplaceable.clone());
        let schedule_writes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "schedule_write_transactions",
            "The leader's fenced write transactions, by outcome (refused: the fence or a guard did not hold)",
            schedule_writes.clone(),
        );
        let store_requests = Family::<StoreLabels, Counter>::default();
        registry.register(
            "etcd_requests",
            "etcd calls made for API requests, by call and outcome",
            store_requests.clone(),
        );
        let store_duration = latency();
        registry.register_with_unit(
            "etcd_request_duration",
            "Time of one etcd call made for an API request (each attempt)",
            Unit::Seconds,
            store_duration.clone(),
        );
        let reboot_slots_held = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "fleetlock_slots_held",
            "Reboot slots held in a FleetLock group, as last written through this engine",
            reboot_slots_held.clone(),
        );
        let view_revision = Gauge::default();
        registry.register(
            "view_revision",
            "The etcd revision this engine's view of the cluster reflects",
            view_revision.clone(),
        );
        let view_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "view_lag",
            "How long the oldest write this engine made has not shown in its view (0: it shows them all)",
            Unit::Seconds,
            view_lag.clone(),
        );
        let units = Gauge::default();
        registry.register("units", "Units stored, as this engine's view shows them", units.clone());
        let machines = Gauge::default();
        registry.register("machines", "Machines registered, as this engine's view shows them", machines.clone());
        Arc::new(Metrics {
            registry,
            api_requests,
            api_request_duration,
            leader,
            leadership_changes,
            waits_for_agents,
            bulk_holds,
            plan_duration,
            decisions,
            unplaceable,
            schedule_writes,
            store_requests,
            store_duration,
            reboot_slots_held,
            view_revision,
            view_lag,
            unseen_writes: Default::default(),
            units,
            machines,
            on,
        })
    }

    /// Whether metrics are recorded.
    pub fn on(&self) -> bool {
        self.on
    }

    /// A write committed at `revision` while the view was at `view`.
    pub fn wrote(&self, revision: i64, view: i64) {
        if !self.on {
            return;
        }
        let Ok(mut q) = self.unseen_writes.lock() else { return };
        while q.front().is_some_and(|(r, _)| *r <= view) {
            q.pop_front();
        }
        // Bounded; when full the newest are left out: the oldest decides the lag.
        if revision > view && q.len() < 10_000 {
            q.push_back((revision, std::time::Instant::now()));
        }
    }

    /// Sets `view_lag` for a view at revision `view`.
    pub fn set_view(&self, view: i64) {
        self.view_revision.set(view);
        let Ok(mut q) = self.unseen_writes.lock() else { return };
        while q.front().is_some_and(|(r, _)| *r <= view) {
            q.pop_front();
        }
        self.view_lag.set(q.front().map(|(_, t)| t.elapsed().as_secs_f64()).unwrap_or(0.0));
    }

    /// Records one answered API request.
    pub fn request(&self, route: &str, method: &str, code: u16, took: Duration) {
        if !self.on {
            return;
        }
        let (route, method) = (route.to_string(), method.to_string());
        self.api_requests
            .get_or_create(&RequestLabels { route: route.clone(), method: method.clone(), code: code.to_string() })
            .inc();
        self.api_request_duration.get_or_create(&RouteLabels { route, method }).observe(took.as_secs_f64());
    }

    /// Records one etcd call made for an API request.
    pub fn store_call(&self, call: &str, outcome: &str, took: Duration) {
        if !self.on {
            return;
        }
        self.store_requests.get_or_create(&StoreLabels { call: call.to_string(), outcome: outcome.to_string() }).inc();
        self.store_duration.observe(took.as_secs_f64());
    }

    /// Records one planning pass: its time and the units it could not place.
    pub fn planned(&self, took: Duration, unplaceable: usize) {
        if !self.on {
            return;
        }
        self.plan_duration.observe(took.as_secs_f64());
        self.unplaceable.set(unplaceable as i64);
    }

    /// Records the schedule entries a pass wrote (placed) and removed.
    pub fn decided(&self, placed: usize, removed: usize) {
        if !self.on {
            return;
        }
        for (kind, n) in [("placed", placed), ("removed", removed)] {
            self.decisions.get_or_create(&DecisionLabels { kind: kind.into() }).inc_by(n as u64);
        }
    }

    /// Records one fenced schedule write by its outcome (`ok`, `refused`, `failed`).
    pub fn schedule_write(&self, outcome: &str) {
        if self.on {
            self.schedule_writes.get_or_create(&OutcomeLabels { outcome: outcome.into() }).inc();
        }
    }

    /// Records the reboot slots held in a FleetLock group.
    pub fn slots_held(&self, group: &str, held: usize) {
        if self.on {
            self.reboot_slots_held.get_or_create(&GroupLabels { group: group.into() }).set(held as i64);
        }
    }

    /// Records whether this engine leads now.
    pub fn set_leader(&self, leading: bool) {
        if !self.on {
            return;
        }
        let now = i64::from(leading);
        if self.leader.set(now) != now {
            self.leadership_changes.inc();
        }
    }

    /// The registry in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an error here would be a bug of the encoder.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode the metrics");
        }
        out
    }
}

/// Middleware recording every answered request by its route's template (axum's matched path).
pub async fn observe(
    axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !metrics.on {
        return next.run(req).await;
    }
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    metrics.request(&route, &method, resp.status().as_u16(), started.elapsed());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.request("/fleet/v1/units/{name}", "PUT", 201, Duration::from_millis(3));
        m.store_call("write unit", "ok", Duration::from_millis(2));
        m.set_leader(true);
        m.set_leader(true);
        m.set_leader(false);
        let text = m.render();
        assert!(
            text.contains(r#"fleet_api_requests_total{route="/fleet/v1/units/{name}",method="PUT",code="201"} 1"#),
            "{text}"
        );
        assert!(text.contains("# TYPE fleet_api_request_duration_seconds histogram"), "{text}");
        assert!(text.contains(r#"fleet_etcd_requests_total{call="write unit",outcome="ok"} 1"#), "{text}");
        assert!(text.contains("fleet_engine_leader 0"), "{text}");
        assert!(text.contains("fleet_engine_leadership_changes_total 2"), "{text}");
        // Every family is a fleet_ one with help text.
        for line in text.lines().filter(|l| l.starts_with("# HELP ")) {
            assert!(line.starts_with("# HELP fleet_"), "{line}");
        }
    }

    /// Switched off, nothing is recorded.
    #[test]
    fn metrics_that_are_off_record_nothing() {
        let m = Metrics::with(false);
        m.request("/fleet/v1/units", "GET", 200, Duration::from_millis(3));
        m.store_call("write unit", "ok", Duration::from_millis(2));
        m.set_leader(true);
        m.wrote(10, 9);
        m.planned(Duration::from_millis(5), 2);
        m.decided(3, 1);
        m.schedule_write("ok");
        m.slots_held("default", 1);
        let text = m.render();
        assert!(!text.contains("fleet_schedule_decisions_total{"), "{text}");
        assert!(!text.contains("fleet_schedule_write_transactions_total{"), "{text}");
        assert!(!text.contains("fleet_fleetlock_slots_held{"), "{text}");
        assert!(text.contains("fleet_units_unplaceable 0"), "{text}");
        assert!(!text.contains("fleet_api_requests_total{"), "{text}");
        assert!(!text.contains("fleet_etcd_requests_total{"), "{text}");
        assert!(text.contains("fleet_engine_leader 0"), "{text}");
        assert!(m.unseen_writes.lock().is_ok_and(|q| q.is_empty()));
    }

    /// The lag is the age of the oldest write the view does not show, and 0 once it shows all.
    #[test]
    fn the_view_lags_by_its_oldest_unseen_write() {
        let m = Metrics::new();
        m.wrote(10, 9);
        std::thread::sleep(Duration::from_millis(30));
        m.wrote(11, 9);
        m.set_view(9);
        let lag = m.view_lag.get();
        assert!((0.03..1.0).contains(&lag), "{lag}");
        m.set_view(10);
        assert!(m.view_lag.get() < lag, "the oldest unseen write is now 11");
        m.set_view(11);
        assert_eq!(m.view_lag.get(), 0.0);
        // A write the view already shows is never a lag.
        m.wrote(11, 12);
        m.set_view(12);
        assert_eq!(m.view_lag.get(), 0.0);
        assert!(m.render().contains("fleet_view_lag_seconds 0"), "{}", m.render());
    }
}
