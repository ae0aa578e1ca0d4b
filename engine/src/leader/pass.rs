//! The leader's work once elected: plan from its copy of the view whenever something changed,
//! and write the decisions in transactions fenced by its election key. On any [`Store`]: etcd in
//! an engine, the in-memory store in the unit tests below. Campaigning is in the parent module.

use super::fence::fenced_write;
use super::schedule_write::{self, ScheduleWrites};
use super::{LeadError, SharedStatus};
use crate::cluster::{Cluster, PlanChanges, PlanView};
use crate::scheduler::{self, Decision, MoveOutcome, Snapshot};
use fleet_model::schema::{encode, MoveRequest};
use fleet_model::Keys;
use fleet_store::kv::{CmpOp, Compare, Op, OpResult, Store, Txn, TXN_OPS};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

/// Schedule transactions in flight at most while placing many units.
const PUTS_IN_FLIGHT: usize = 8;
/// A schedule transaction answered slower than this halves the transactions in flight; one
/// answered in a quarter of it adds one back (see [`Pacing`]).
const SLOW_WRITE: Duration = Duration::from_millis(500);

/// How many schedule transactions a pass keeps in flight: as many as etcd answers promptly.
///
/// A million entries written 8 transactions at a time beside 10,000 agents' states put etcd's
/// apply seconds behind its log; etcd renews a lease only once it has applied what it committed,
/// so leases expired, the leader's own election lease among them, half-way through its writes
/// (docs/performance.md). Slow answers halve the window, prompt ones widen it again by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pacing {
    window: usize,
}

impl Pacing {
    fn new() -> Self {
        Pacing { window: PUTS_IN_FLIGHT }
    }

    fn answered(&mut self, took: Duration) {
        if took > SLOW_WRITE {
            self.window = (self.window / 2).max(1);
        } else if took < SLOW_WRITE / 4 {
            self.window = (self.window + 1).min(PUTS_IN_FLIGHT);
        }
    }
}
/// How far (in etcd revisions) the leader's own view may trail its last schedule write before
/// it waits for the view to catch up: a burst etcd commits at once still has to reach every
/// watcher, and at a million units a burst faster than that delivery left etcd's watchers, and
/// then its lease renewals, minutes behind (docs/performance.md).
const VIEW_LAG: i64 = 32;

/// Units placed and not yet reported by their machines beyond which the leader holds the rest
/// of a large placement back (while the agents make progress): ten thousand agents handed a
/// million units in ten seconds all start and report them at once, and on a small etcd that
/// burst of state writes cost their leases (docs/performance.md). Far above what a user's
/// placement of thousands of units reaches.
pub const PENDING_STARTS: usize = 50_000;

/// Units arrived within [`BULK_WINDOW`] beyond which the leader waits for a submission to end
/// before placing (see [`Planner::hold_for_submission`]): the largest single request (fleetctl
/// sends 10,000 units per request), so a user's start in one request is placed at once.
pub const BULK_ARRIVAL: usize = 10_000;
/// Arrivals are counted over this long, however many passes it saw: fleetctl's requests of
/// 10,000 units each came one per pass, and a count since the last pass never held them.
const BULK_WINDOW: Duration = Duration::from_secs(5);
/// A bulk submission is taken as ended once no unit arrived for this long...
const BULK_QUIET: Duration = Duration::from_secs(1);
/// ...or, should units keep arriving, placing starts after this long all the same.
const BULK_HOLD_AT_MOST: Duration = Duration::from_secs(60);

/// Committed entries etcd may have yet to apply when the leader sends another schedule write.
const APPLY_BACKLOG: u64 = 8;

/// A planning pass longer than this is logged as a warning: it delays placements.
const SLOW_PLAN: Duration = Duration::from_secs(1);

/// The leader's planning copy of the view, and what its last pass left for the next one.
pub struct Planning {
    pub view: PlanView,
    /// Set once a whole pass's decisions are all written, taken by the next pass: see
    /// [`scheduler::Carried`].
    carried: Option<scheduler::Carried>,
    /// `carried` follows the schedule as others wrote it (kept while this engine did not lead):
    /// the first pass places the units without an entry on it, and a whole pass follows.
    followed: bool,
}

impl Planning {
    pub fn new(view: PlanView) -> Self {
        Planning { view, carried: None, followed: false }
    }
}

/// What an engine that does not lead keeps ready for when it is elected: its planning copy and
/// the schedule as it stands ([`scheduler::Carried::following`]), so that a new leader places
/// new units without first copying the view and making a whole pass (seconds at a million
/// units). `leading` keeps the two apart: a copy taken while leading would take the leader's
/// copy's feed.
#[derive(Default)]
pub struct Ready {
    leading: bool,
    plan: Option<Planning>,
    /// When the schedule as it stands was last taken whole (see [`Planner::get_ready`]).
    taken: Option<std::time::Instant>,
}

/// How often, at most, an engine that does not lead takes the schedule as it stands whole again
/// after changes it cannot follow (a unit changed or destroyed, a new listing...): O(units) each.
const RETAKE_AT_MOST_EVERY: Duration = Duration::from_secs(10);

fn snapshot_of<'a>(
    v: &'a crate::cluster::ClusterView,
    fencing: &'a std::collections::BTreeSet<String>,
    now: u64,
) -> Snapshot<'a> {
    Snapshot {
        drained: &v.drained,
        fencing,
        units: &v.units,
        rules: &v.rules,
        machines: &v.machines,
        schedule: &v.schedule,
        moves: &v.moves,
        states: &v.states,
        reschedules: &v.reschedules,
        now,
    }
}

/// What a leader plans from and writes to.
pub struct Planner<S: Store> {
    pub store: S,
    pub keys: Keys,
    pub cluster: Cluster,
    /// The election lease's TTL: how long a fenced write may keep trying.
    pub ttl: i64,
    pub status: SharedStatus,
    pub fences: Mutex<Fences>,
    /// When a pass is due although nothing changed: a failed unit's reschedule delay ends.
    pub wake: Mutex<Option<tokio::time::Instant>>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    pub ready: Mutex<Ready>,
    /// [`PENDING_STARTS`], but for tests, which place thousands of units, not a million.
    pub max_pending_starts: usize,
    /// [`BULK_ARRIVAL`], but for tests.
    pub bulk_arrival: usize,
}

/// Extra wait, beyond a lost machine's lease TTL, before its exclusive units are placed elsewhere:
/// covers the agent's own clock and the time its units take to stop.
pub const FENCE_MARGIN: Duration = Duration::from_secs(3);
/// Lease TTL assumed for a machine this engine never saw (lost before it started leading).
const UNKNOWN_TTL: i64 = 30;

/// When machines were lost, as this engine saw it: the clock for exclusive units' fences.
#[derive(Debug, Default)]
pub struct Fences {
    known: std::collections::HashMap<String, i64>,
    lost_at: std::collections::HashMap<String, (tokio::time::Instant, i64)>,
    started: bool,
    /// When the next fence expires, so the leader plans again then.
    pub next_expiry: Option<tokio::time::Instant>,
}

impl Fences {
    /// Updates with the live machines (id -> lease TTL) and machines still referenced by the
    /// schedule; returns the machines whose fence has not expired.
    fn update(
        &mut self,
        live: &std::collections::BTreeMap<String, fleet_model::MachineRecord>,
        scheduled: impl Iterator<Item = String>,
    ) -> std::collections::BTreeSet<String> {
        let now = tokio::time::Instant::now();
        if !self.started {
            // A new leader cannot know when machines it never saw were lost: assume just now.
            self.started = true;
            for m in scheduled.filter(|m| !live.contains_key(m)) {
                self.lost_at.entry(m).or_insert((now, UNKNOWN_TTL));
            }
        }
        for (m, ttl) in &self.known {
            if !live.contains_key(m) {
                self.lost_at.entry(m.clone()).or_insert((now, *ttl));
            }
        }
        self.known =
            live.iter().map(|(id, r)| (id.clone(), if r.lease_ttl > 0 { r.lease_ttl } else { UNKNOWN_TTL })).collect();
        self.lost_at.retain(|m, _| !live.contains_key(m));
        let expiry = |(t, ttl): &(tokio::time::Instant, i64)| *t + Duration::from_secs(*ttl as u64) + FENCE_MARGIN;
        self.lost_at.retain(|_, v| expiry(v) > now);
        self.next_expiry = self.lost_at.values().map(expiry).min();
        self.lost_at.keys().cloned().collect()
    }
}

/// Units in the view when recent passes started, to count what arrived within [`BULK_WINDOW`].
#[derive(Debug, Default)]
struct Arrivals {
    samples: std::collections::VecDeque<(tokio::time::Instant, usize)>,
}

impl Arrivals {
    fn record(&mut self, at: tokio::time::Instant, units: usize) {
        self.samples.push_back((at, units));
        self.forget(at);
    }

    /// Keeps one sample taken at least a window before `now` (the baseline), and those since.
    fn forget(&mut self, now: tokio::time::Instant) {
        while self.samples.get(1).is_some_and(|(t, _)| now.duration_since(*t) >= BULK_WINDOW) {
            self.samples.pop_front();
        }
    }

    /// The count to measure arrivals from: at the start of the window before `now`, or of the
    /// earliest pass within it.
    fn baseline(&mut self, now: tokio::time::Instant) -> usize {
        self.forget(now);
        self.samples.front().map_or(0, |(_, n)| *n)
    }
}

/// Frees `value` on a blocking thread rather than here. What a pass sets aside at a million
/// units (its placement of every unit) takes 0.4 s to free: a new leader's first placement, and
/// any pass, would wait for it (docs/performance.md).
fn free_later<T: Send + 'static>(value: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn_blocking(move || drop(value));
        }
        Err(_) => drop(value),
    }
}

/// The wall clock in unix seconds: failures, moves and rollouts are recorded in etcd for whichever
/// engine leads next (or serves the API), so they need a clock all engines share.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl<S: Store> Planner<S> {
    pub(super) async fn lead(&self, fence: Compare, lost: &mut watch::Receiver<bool>) -> Result<(), LeadError> {
        let mut revisions = self.cluster.subscribe_plan();
        // An engine may lead before its view has listed the cluster. The copy is taken once it
        // has: a copy taken before would receive the whole listing again through its queue (at
        // a million units, a second copy of every key in the leader's memory at once).
        let mut listing = self.cluster.subscribe();
        while self.cluster.revision() == 0 {
            tokio::select! {
                r = listing.changed() => {
                    if r.is_err() {
                        return Err(LeadError::Deposed("cluster view closed".into()));
                    }
                }
                _ = lost.changed() => return Err(LeadError::Deposed("leader lease expired".into())),
            }
        }
        // Planned on a copy of its own: the shared view keeps following etcd, and the API keeps
        // answering, however long a pass takes. Taken while this engine waited to lead, if it was.
        let copied = std::time::Instant::now();
        let prepared = tokio::task::block_in_place(|| match self.ready.lock() {
            Ok(mut r) => {
                r.leading = true;
                r.plan.take()
            }
            Err(_) => None,
        });
        let prepared_before = prepared.is_some();
        let plan = match prepared {
            Some(plan) => plan,
            None => Planning::new(tokio::task::block_in_place(|| self.cluster.plan_view())),
        };
        // However leading ends, the copy stays ready for the next election (see `ReadyAgain`).
        let mut ready_again = ReadyAgain { ready: &self.ready, plan: Some(plan) };
        let Some(plan) = ready_again.plan.as_mut() else {
            return Err(LeadError::Deposed("no planning copy".into()));
        };
        tracing::info!(
            units = plan.view.view().units.len(),
            prepared_before,
            copy_ms = copied.elapsed().as_millis() as u64,
            "planning on a copy of the view"
        );
        // Units in the view when recent passes started: how many arrived lately tells a bulk
        // submission streaming in (see `hold_for_submission`).
        let mut arrivals = Arrivals::default();
        arrivals.record(tokio::time::Instant::now(), self.units_in_view());
        loop {
            revisions.borrow_and_update();
            // Only a listed view is planned from (revision > 0). Until then any news wakes the
            // loop: an engine may lead before its view has listed the cluster.
            let listed = self.cluster.revision() > 0;
            if listed {
                let followed = plan.followed;
                if !followed {
                    self.hold_for_submission(plan, &mut arrivals, lost).await?;
                }
                arrivals.record(tokio::time::Instant::now(), self.units_in_view());
                self.pass(&fence, plan).await?;
                if followed {
                    // The units without an entry are placed: now the whole pass.
                    continue;
                }
            }
            let next_fence = self.fences.lock().ok().and_then(|f| f.next_expiry);
            let wake = self.wake.lock().ok().and_then(|w| *w);
            let next_fence = match (next_fence, wake) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let fence_expired = async {
                match next_fence {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(fence_expired);
            // Between passes the copy takes in whatever else the view receives (unit states
            // mostly, which alone are no reason to plan): its queue stays short however long
            // the cluster goes without a reason to plan.
            let mut received = self.cluster.subscribe();
            loop {
                tokio::select! {
                    r = revisions.changed() => {
                        if r.is_err() {
                            return Err(LeadError::Deposed("cluster view closed".into()));
                        }
                        break;
                    }
                    _ = lost.changed() => return Err(LeadError::Deposed("leader lease expired".into())),
                    _ = &mut fence_expired => break,
                    r = received.changed() => {
                        if r.is_err() {
                            return Err(LeadError::Deposed("cluster view closed".into()));
                        }
                        tokio::task::block_in_place(|| plan.view.refresh());
                        self.planned_up_to(plan.view.view().revision);
                        if !listed {
                            break;
                        }
                    }
                }
            }
        }
    }

    fn units_in_view(&self) -> usize {
        self.cluster.read(|v| v.units.len())
    }

    /// Waits while units arrive in bulk (more than [`BULK_ARRIVAL`] within [`BULK_WINDOW`]), until
    /// none arrived for [`BULK_QUIET`] or [`BULK_HOLD_AT_MOST`] passed: a million units placed
    /// as they are stored had the submission, the leader's writes and the agents' starts compete
    /// for etcd's apply, which fell minutes behind and refused requests by the hundred thousand
    /// (docs/performance.md). Held, the submission ends first and the placement follows, paced.
    /// A user's `fleetctl start` of thousands of units is one request and is not held.
    async fn hold_for_submission(
        &self,
        plan: &mut Planning,
        arrivals: &mut Arrivals,
        lost: &mut watch::Receiver<bool>,
    ) -> Result<(), LeadError> {
        let mut seen = self.units_in_view();
        let since = arrivals.baseline(tokio::time::Instant::now());
        if seen.saturating_sub(since) <= self.bulk_arrival {
            return Ok(());
        }
        self.metrics.bulk_holds.inc();
        let held = tokio::time::Instant::now();
        let mut last_arrival = held;
        tracing::info!(arrived = seen.saturating_sub(since), "units arriving in bulk: placing them once they stop");
        while last_arrival.elapsed() < BULK_QUIET && held.elapsed() < BULK_HOLD_AT_MOST {
            tokio::select! {
                _ = tokio::time::sleep(BULK_QUIET / 10) => {}
                _ = lost.changed() => return Err(LeadError::Deposed("leader lease expired".into())),
            }
            // The copy takes in what arrives meanwhile: its queue stays short.
            tokio::task::block_in_place(|| plan.view.refresh());
            let now = self.units_in_view();
            if now != seen {
                (seen, last_arrival) = (now, tokio::time::Instant::now());
            }
        }
        tracing::info!(
            units = seen.saturating_sub(since),
            held_ms = held.elapsed().as_millis() as u64,
            "placing the units that arrived in bulk"
        );
        // What was held is placed now: arrivals count afresh from here.
        arrivals.samples.clear();
        Ok(())
    }

    /// One planning pass over the current view, then waits until the view shows its writes.
    pub(super) async fn pass(&self, fence: &Compare, plan: &mut Planning) -> Result<(), LeadError> {
        let started = std::time::Instant::now();
        if let Ok(mut s) = self.status.lock() {
            s.planning = true;
        }
        // A pass over a large cluster is CPU work: off the async workers.
        let (outcome, carried, whole, why_ops, rollout_writes, orphans, view_rev, view_units, writes) =
            tokio::task::block_in_place(|| {
                plan.view.refresh();
                let changes = plan.view.take_changes();
                let v = plan.view.view();
                {
                    let fencing = match self.fences.lock() {
                        Ok(mut f) => f.update(&v.machines, v.scheduled_on.keys().cloned()),
                        Err(_) => Default::default(),
                    };
                    let now = unix_now();
                    // Only new units, machines come or gone since the last pass, and schedule
                    // entries as it left them (its own writes come back): it need not look at
                    // every unit. (A machine lost and back in between: a whole pass.)
                    let back = |m: &String| changes.machines_new.contains(m);
                    let followed = std::mem::take(&mut plan.followed);
                    let carried = plan.carried.take().and_then(|c| {
                        let holds = followed
                            || !changes.other
                                && !changes.machines_lost.iter().any(back)
                                && changes.scheduled.iter().all(|(u, m, e)| c.agrees(&v.units, u, m, e.as_ref()));
                        if holds {
                            Some(c)
                        } else {
                            free_later(c);
                            None
                        }
                    });
                    let snap = snapshot_of(v, &fencing, now);
                    let whole = carried.is_none();
                    let (out, carried) = match carried {
                        Some(mut c) if followed => {
                            // Elected: the schedule as followed, and the units without an entry
                            // placed on it; nothing carried (the whole pass comes next).
                            c.follow(&snap, &changes);
                            let first = PlanChanges { new_units: scheduler::unscheduled(&snap), ..Default::default() };
                            let (out, left) = scheduler::place_new(&snap, c, &first);
                            free_later(left);
                            (out, None)
                        }
                        Some(c) => scheduler::place_new(&snap, c, &changes),
                        None => scheduler::schedule_carrying(&snap),
                    };
                    // Rollouts' steps first (their unit records are scheduled by the next pass), then
                    // failing units' records: a move's event reads why from them.
                    let (rollout_writes, rollout_wake) = super::rolling::steps(v, &self.keys, now);
                    let mut why_ops = Vec::new();
                    for (u, rec) in &out.reschedules {
                        match rec {
                            Some(rec) => {
                                if let Ok(value) = encode(rec) {
                                    tracing::info!(unit = %u, note = %rec.note, "rescheduling a failing unit");
                                    why_ops.push(Op::put(self.keys.reschedule(u), value, 0));
                                }
                            }
                            None => why_ops.push(Op::delete(self.keys.reschedule(u))),
                        }
                    }
                    // Record why units are not placed, and forget the reason once they are.
                    for (u, result) in &out.moves {
                        match result {
                            MoveOutcome::Done => why_ops.push(Op::delete(self.keys.moves(u))),
                            MoveOutcome::Refused(why) => {
                                let Some(req) = v.moves.get(u) else { continue };
                                if req.refused != *why {
                                    let refused = MoveRequest { refused: why.clone(), ..req.clone() };
                                    if let Ok(value) = encode(&refused) {
                                        why_ops.push(Op::put(self.keys.moves(u), value, 0));
                                    }
                                }
                            }
                        }
                    }
                    for (u, why) in &out.unplaceable {
                        if v.why.get(u) != Some(why) {
                            why_ops.push(Op::put(self.keys.why(u), why.as_str(), 0));
                        }
                    }
                    // (The first pass of a new leader looks at the units without an entry only: the whole
                    // pass after it says which reasons are no longer true.)
                    for u in v.why.keys().filter(|u| !followed && !out.unplaceable.contains_key(*u)) {
                        why_ops.push(Op::delete(self.keys.why(u)));
                    }
                    let mut out = out;
                    if let Some(at) = rollout_wake {
                        out.wake_at = Some(out.wake_at.map_or(at, |w| w.min(at)));
                    }
                    // Bodies are orphaned by units destroyed or changed, which a whole pass follows.
                    let orphans = if whole { v.orphan_bodies() } else { Vec::new() };
                    let writes = ScheduleWrites::plan(&self.keys, v, &out.decisions);
                    (out, carried, whole, why_ops, rollout_writes, orphans, v.revision, v.units.len(), writes)
                }
            });
        let writes = writes.map_err(|e| LeadError::Deposed(format!("cannot encode the schedule: {e}")))?;
        if let Ok(mut w) = self.wake.lock() {
            *w = outcome.wake_at.map(|at| {
                let wait = Duration::from_secs(at.saturating_sub(unix_now()));
                tokio::time::Instant::now() + wait
            });
        }
        if let Ok(mut s) = self.status.lock() {
            if s.unplaceable.len() != outcome.unplaceable.len()
                || s.unplaceable.iter().zip(&outcome.unplaceable).any(|(a, b)| a.0 != b.0.as_str() || a.1 != b.1)
            {
                for (u, why) in &outcome.unplaceable {
                    tracing::info!(unit = %u, reason = %why, "cannot place unit");
                }
            }
            s.unplaceable = outcome.unplaceable.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        }
        let planned = started.elapsed();
        self.metrics.planned(planned, outcome.unplaceable.len());
        if let Ok(mut s) = self.status.lock() {
            s.plan_revision = view_rev;
            s.last_plan_ms = planned.as_millis() as u64;
            s.planning = false;
            s.passes += 1;
            if whole {
                s.whole_passes += 1;
                s.last_whole_plan_ms = planned.as_millis() as u64;
            }
        }
        if planned > SLOW_PLAN {
            tracing::warn!(
                plan_ms = planned.as_millis() as u64,
                units = view_units,
                "a planning pass overran: placements waited for it"
            );
        }
        tracing::debug!(
            revision = view_rev,
            whole,
            decisions = outcome.decisions.len(),
            unplaceable = outcome.unplaceable.len(),
            plan_ms = planned.as_millis() as u64,
            "planned"
        );
        // Rollouts' steps, each in one transaction guarded by what it read: one refused (a user
        // acted meanwhile) is taken again from the view that shows it.
        let mut last_rev = 0;
        for w in rollout_writes {
            match self.fenced(fence, w.guards, w.ops).await {
                Ok(rev) => last_rev = last_rev.max(rev),
                Err(LeadError::GuardFailed) => {
                    tracing::debug!(service = %w.service, "rollout changed meanwhile; stepping again");
                }
                Err(e) => return Err(e),
            }
        }
        // Why units are not placed, then the schedule: removals first, in order, so a unit leaves
        // its old machine's schedule before it appears on a new one (an exclusive unit must never
        // be scheduled twice); then the new entries, several transactions in flight, since a
        // large placement is otherwise bound by one etcd round trip per transaction
        // (`schedule_write`: pages for agents that read them, keys for the others).
        for chunk in why_ops.chunks(TXN_OPS) {
            last_rev = last_rev.max(self.fenced(fence, vec![], chunk.to_vec()).await?);
        }
        let ScheduleWrites { removals, puts, moved, .. } = writes;
        // Each page written whole was guarded by the revision the view had it at: one refused
        // means the view was behind; the pass ends and the next one plans from a view that shows
        // what it missed (its whole pass, as nothing is carried).
        let mut written: HashMap<Vec<u8>, i64> = HashMap::new();
        for chunk in schedule_write::chunks(removals) {
            let guards = chunk.iter().filter_map(|w| w.guard(&written)).collect();
            let keys: Vec<(Vec<u8>, bool)> =
                chunk.iter().map(|w| (w.key().to_vec(), matches!(w.op, Op::Delete(_)))).collect();
            let ops: Vec<Op> = chunk.into_iter().map(|w| w.op).collect();
            let rev = match self.fenced(fence, guards, ops.clone()).await {
                Err(LeadError::GuardFailed) => match self.already_written(&ops).await {
                    Some(rev) => rev,
                    None => return self.stale_view(last_rev).await,
                },
                r => r?,
            };
            last_rev = last_rev.max(rev);
            // What a later write of the same page must find: this revision, or no page at all.
            for (k, deleted) in keys {
                written.insert(k, if deleted { 0 } else { rev });
            }
        }
        // The first failure ends the pass (the writes still in flight are dropped; they are
        // fenced and guarded): a leader that cannot write must not spend a TTL per batch.
        let mut chunks = schedule_write::chunks(puts).into_iter();
        let mut in_flight = futures::stream::FuturesUnordered::new();
        let mut pacing = Pacing::new();
        // Set (to the count of placed units not yet reported) when agents reported nothing
        // through a whole wait.
        let mut agents_silent: Option<usize> = None;
        let written = &written;
        loop {
            // Written no faster than etcd delivers: while this engine's own watch is more than
            // VIEW_LAG revisions behind the last write, what was written is still on its way to
            // every watcher (agents and engines alike), and more would only lengthen the queue.
            if last_rev > 0 && last_rev - self.cluster.revision() > VIEW_LAG && in_flight.is_empty() {
                let behind = last_rev - VIEW_LAG;
                if !self.cluster.follows_to(behind, Duration::from_secs(2), Duration::from_secs(30)).await {
                    tracing::debug!(revision = last_rev, view = self.cluster.revision(), "view far behind; writing on");
                }
            }
            // Nor faster than the agents start what they were given (see PENDING_STARTS), as long
            // as they report anything: once a wait saw none, no agent holds the rest of the pass
            // back until the count goes down again (machines registered with no agent running,
            // as in the engine-alone bench, waited 2 s per transaction).
            if in_flight.is_empty() && agents_silent.is_none_or(|at| self.pending_starts() < at) {
                agents_silent = self.agents_catch_up().await;
            }
            while in_flight.len() < pacing.window
                && !(last_rev > 0 && last_rev - self.cluster.revision() > VIEW_LAG && !in_flight.is_empty())
            {
                // Nor faster than etcd applies: a backlog of committed, unapplied entries makes
                // etcd refuse every lease renewal meanwhile (agents' and this engine's own).
                let waiting_for_agents = agents_silent.is_none() && self.pending_starts() > self.max_pending_starts;
                if !in_flight.is_empty() && (waiting_for_agents || self.apply_backlog_high().await) {
                    break;
                }
                let Some(chunk) = chunks.next() else { break };
                in_flight.push(async move {
                    let sent = std::time::Instant::now();
                    let guards = chunk.iter().filter_map(|w| w.guard(written)).collect();
                    let ops: Vec<Op> = chunk.into_iter().map(|w| w.op).collect();
                    let result = match self.fenced(fence, guards, ops.clone()).await {
                        Err(LeadError::GuardFailed) => self.already_written(&ops).await.ok_or(LeadError::GuardFailed),
                        r => r,
                    };
                    (result, sent.elapsed())
                });
            }
            let Some((result, took)) = in_flight.next().await else { break };
            let rev = match result {
                Err(LeadError::GuardFailed) => {
                    // What is still in flight may be written all the same: the next pass must
                    // plan from a view that shows it (or it could place a unit a second time).
                    while let Some((result, _)) = in_flight.next().await {
                        if let Ok(rev) = result {
                            last_rev = last_rev.max(rev);
                        }
                    }
                    return self.stale_view(last_rev).await;
                }
                r => r?,
            };
            last_rev = last_rev.max(rev);
            let before = pacing.window;
            pacing.answered(took);
            if pacing.window < before {
                tracing::debug!(
                    took_ms = took.as_millis() as u64,
                    window = pacing.window,
                    "etcd slow: fewer writes in flight"
                );
            }
        }
        // Entries moved into pages: their own keys go once the pages are written.
        for chunk in schedule_write::chunks(moved) {
            last_rev = last_rev.max(self.fenced(fence, vec![], chunk.into_iter().map(|w| w.op).collect()).await?);
        }
        let removed = outcome.decisions.iter().filter(|d| matches!(d, Decision::Remove { .. })).count();
        self.metrics.decided(outcome.decisions.len() - removed, removed);
        if !outcome.decisions.is_empty() {
            tracing::info!(
                decisions = outcome.decisions.len(),
                whole,
                plan_ms = planned.as_millis() as u64,
                write_ms = (started.elapsed() - planned).as_millis() as u64,
                "schedule written"
            );
        }
        // A body is dropped only if it was last written before the view we planned from: a body
        // written since may belong to a unit this view does not show yet.
        for (hash, _) in orphans {
            let guard = Compare::mod_revision(self.keys.body(&hash), CmpOp::Less, view_rev + 1);
            match self.fenced(fence, vec![guard], vec![Op::delete(self.keys.body(&hash))]).await {
                Ok(rev) => last_rev = last_rev.max(rev),
                Err(LeadError::GuardFailed) => {}
                Err(e) => return Err(e),
            }
        }
        // Every decision is written: the next pass may carry on from this one.
        plan.carried = carried;
        if last_rev > 0 && !self.cluster.follows_to(last_rev, Duration::from_secs(2), Duration::from_secs(60)).await {
            tracing::warn!(revision = last_rev, "cluster view is slow to catch up; rewatching");
            self.cluster.kick();
            self.cluster.caught_up(last_rev, Duration::from_secs(10)).await;
        }
        Ok(())
    }

    /// The planning copy shows `revision` (see [`super::LeaderStatus::plan_revision`]).
    fn planned_up_to(&self, revision: i64) {
        if let Ok(mut s) = self.status.lock() {
            s.plan_revision = revision;
        }
    }

    /// While this engine does not lead: keeps its planning copy and the schedule as it stands
    /// ready for when it is elected ([`Ready`]). Runs as long as the view does.
    pub async fn keep_ready(&self) {
        let mut received = self.cluster.subscribe();
        loop {
            // Ready as soon as the view is listed, then kept up to date with every change.
            if self.cluster.revision() > 0 {
                tokio::task::block_in_place(|| self.get_ready());
            }
            if received.changed().await.is_err() {
                return;
            }
        }
    }

    /// One step of [`Planner::keep_ready`]: the copy and the schedule taken, or brought up to date.
    fn get_ready(&self) {
        let Ok(mut ready) = self.ready.lock() else { return };
        if ready.leading {
            return;
        }
        let fencing = std::collections::BTreeSet::new();
        let retake = ready.taken.is_none_or(|t| t.elapsed() >= RETAKE_AT_MOST_EVERY);
        let mut taken = None;
        match ready.plan.as_mut() {
            Some(plan) => {
                plan.view.refresh();
                let changes = plan.view.take_changes();
                let v = plan.view.view();
                // Following takes in units created, machines joined or lost and schedule entries.
                // Anything else (a unit's rules changed, a machine back before its entries went,
                // a new listing) is taken whole again, at most every few seconds; until then an
                // election makes a whole pass first, as without readiness.
                let rejoined = changes.machines_new.iter().any(|m| {
                    changes.machines_lost.contains(m) || v.scheduled_on.get(m.as_str()).is_some_and(|n| *n > 0)
                });
                if changes.other || rejoined {
                    free_later(plan.carried.take());
                }
                match plan.carried.as_mut() {
                    Some(c) => c.follow(&snapshot_of(v, &fencing, 0), &changes),
                    None if retake => {
                        plan.carried = Some(scheduler::Carried::following(&snapshot_of(v, &fencing, 0)));
                        taken = Some(std::time::Instant::now());
                    }
                    None => {}
                }
            }
            None => {
                let started = std::time::Instant::now();
                let mut plan = Planning::new(self.cluster.plan_view());
                plan.view.take_changes();
                let carried = scheduler::Carried::following(&snapshot_of(plan.view.view(), &fencing, 0));
                plan.carried = Some(carried);
                plan.followed = true;
                taken = Some(std::time::Instant::now());
                tracing::info!(
                    units = plan.view.view().units.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "ready to lead: a planning copy and the schedule as it stands"
                );
                ready.plan = Some(plan);
            }
        }
        if taken.is_some() {
            ready.taken = taken;
        }
    }

    /// Runs `ops` only while we still lead (and `extra` holds); returns the write's revision.
    fn pending_starts(&self) -> usize {
        self.cluster.read(|v| v.pending_starts())
    }

    /// Waits while more than [`PENDING_STARTS`] (`max_pending_starts`) units are placed and not yet reported by their
    /// machines, for as long as that number keeps going down (agents that report nothing, say
    /// cut off from etcd, must not stop placement: it goes on once they make no progress for
    /// two seconds).
    /// Returns the count still pending if no agent reported anything while it waited.
    async fn agents_catch_up(&self) -> Option<usize> {
        let mut pending = self.pending_starts();
        if pending <= self.max_pending_starts {
            return None;
        }
        self.metrics.waits_for_agents.inc();
        let started = tokio::time::Instant::now();
        let mut progress = started;
        let mut any = false;
        let mut changes = self.cluster.subscribe();
        // At most 10 s per wait: meanwhile nothing else is decided (a lost machine's units).
        while pending > self.max_pending_starts
            && progress.elapsed() < Duration::from_secs(2)
            && started.elapsed() < Duration::from_secs(10)
        {
            let _ = tokio::time::timeout(Duration::from_millis(200), changes.changed()).await;
            let now = self.pending_starts();
            if now < pending {
                progress = tokio::time::Instant::now();
                any = true;
            }
            pending = now;
        }
        tracing::debug!(pending, waited_ms = started.elapsed().as_millis() as u64, "waited for agents to start units");
        (!any && pending > self.max_pending_starts).then_some(pending)
    }

    /// Whether etcd's apply trails its commits by more than [`APPLY_BACKLOG`] entries; waits
    /// (up to a second) for it to come down first. A store that cannot tell is taken as keeping up.
    async fn apply_backlog_high(&self) -> bool {
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let backlog = match tokio::time::timeout(Duration::from_secs(1), self.store.apply_backlog()).await {
                Ok(Ok(b)) => b,
                _ => return false,
            };
            if backlog <= APPLY_BACKLOG {
                return false;
            }
            if tokio::time::Instant::now() >= until {
                tracing::debug!(backlog, "etcd's apply trails its commits: fewer writes in flight");
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether a refused write of pages is in fact in etcd already: an attempt whose answer was
    /// lost (timed out under load) and that the retry then found written, by itself. Its
    /// revision if every page is as the write has it.
    async fn already_written(&self, ops: &[Op]) -> Option<i64> {
        let keys: Vec<&[u8]> = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, .. } | Op::Delete(key) | Op::Get(key) => key.as_slice(),
                Op::Txn(_) => &[],
            })
            .collect();
        let read = Txn { then: keys.iter().map(|k| Op::Get(k.to_vec())).collect(), ..Txn::default() };
        let got = tokio::time::timeout(Duration::from_secs(5), self.store.txn(read)).await.ok()?.ok()?;
        let mut revision = 0;
        for (op, result) in ops.iter().zip(&got.results) {
            match (op, result) {
                (Op::Put { value, .. }, OpResult::Get(Some(e))) if e.value == *value => {
                    revision = revision.max(e.mod_revision)
                }
                (Op::Delete(_), OpResult::Get(None)) => {}
                _ => return None,
            }
        }
        tracing::info!(revision, "a schedule write retried after its answer was lost had gone through");
        Some(revision.max(1))
    }

    /// A page written whole found etcd ahead of the view it was planned from: nothing of that
    /// transaction was written. The view catches up, and a pass soon after plans again from it.
    async fn stale_view(&self, last_rev: i64) -> Result<(), LeadError> {
        tracing::warn!(revision = last_rev, "a schedule page changed since the view showed it; planning again");
        if let Ok(mut w) = self.wake.lock() {
            *w = Some(tokio::time::Instant::now() + Duration::from_millis(100));
        }
        if last_rev > 0 {
            self.cluster.follows_to(last_rev, Duration::from_secs(2), Duration::from_secs(30)).await;
        }
        Ok(())
    }

    async fn fenced(&self, fence: &Compare, extra: Vec<Compare>, ops: Vec<Op>) -> Result<i64, LeadError> {
        let result = fenced_write(&self.store, self.ttl, fence, extra, ops).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(LeadError::GuardFailed) | Err(LeadError::Deposed(_)) => "refused",
            Err(_) => "failed",
        };
        self.metrics.schedule_write(outcome);
        result
    }
}

#[cfg(test)]
mod tests;

/// Marks the end of a leadership (however `lead` returns): the engine gets ready again.
///
/// The copy it planned on stays ready, rather than a new one taken (a second of CPU at a million
/// units, when etcd is slow enough to cost a leadership, is what a busy host can least spare). Its
/// carried placement holds the last pass's decisions, written or not: the next leadership's first
/// pass places only units without an entry on it, and its whole pass follows at once.
struct ReadyAgain<'a> {
    ready: &'a Mutex<Ready>,
    plan: Option<Planning>,
}

impl Drop for ReadyAgain<'_> {
    fn drop(&mut self) {
        if let Ok(mut r) = self.ready.lock() {
            r.leading = false;
            r.plan = self.plan.take().map(|mut plan| {
                plan.followed = true;
                plan
            });
        }
    }
}
