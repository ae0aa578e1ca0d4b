//! The engine's in-memory view of the cluster, fed by one watch on the whole key prefix.
//!
//! Every engine replica keeps one, so API reads never touch etcd and the leader plans from it.
//! A read through the API waits until the view has caught up with the writes that replica
//! answered, so a client always reads its own writes.

use crate::events::EventLog;
use derive::Deriver;
use fleet_model::pages::{PageChange, PageFollower};
use fleet_model::reschedule::RescheduleRecord;
use fleet_model::rollout::RolloutRecord;
use fleet_model::rules::Rules;
use fleet_model::schema::{decode, Key, MoveRequest};
use fleet_model::{
    Interner, Keys, MachineRecord, ScheduleEntry, Text, UnitFile, UnitName, UnitRecord, UnitStateRecord,
};
use fleet_store::etcd::{Change, PrefixUpdate};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

mod derive;
mod per_machine;
pub use per_machine::{MachineSet, PerMachine};

/// How often the view's keys are counted against etcd's at the revision it reached, in case a
/// watch event was ever missed (a difference relists it). The view was relisted outright every
/// 30 minutes: at a million units each time cost the engines ~21 CPU-seconds and the leader
/// 1.7 GiB more memory for a while, and etcd a gigabyte read. etcd counting those two million
/// keys takes 0.3-0.7 s of its CPU, and the engine nothing to speak of (measured by hand,
/// `fleet-sim --engine-alone`, docs/performance.md).
pub const VERIFY: Duration = Duration::from_secs(600);

#[derive(Debug, Default, Clone)]
pub struct ClusterView {
    /// etcd revision this view reflects; 0 until the first snapshot arrived.
    pub revision: i64,
    /// Bumped by every change that can alter a placement (everything but unit states and the
    /// leader's own notes, save the state of an exclusive unit stopping where it is leaving),
    /// so the leader does not re-plan for each state an agent reports.
    pub plan_generation: u64,
    pub units: BTreeMap<UnitName, UnitRecord>,
    /// Unit bodies by hash, with the revision each was last written at.
    pub bodies: HashMap<String, (String, i64)>,
    /// Live machines, with metadata set through the API merged over what their agents publish.
    pub machines: BTreeMap<String, MachineRecord>,
    /// Machine records exactly as their agents published them.
    pub published_machines: BTreeMap<String, MachineRecord>,
    /// Metadata set through the API: machine -> key -> value (empty value: key removed).
    pub dynamic_metadata: BTreeMap<String, BTreeMap<String, String>>,
    /// unit -> machine -> entry.
    pub schedule: BTreeMap<UnitName, PerMachine<ScheduleEntry>>,
    /// machine -> how many schedule entries it has (kept with `schedule`: listing machines with
    /// their load must not walk every unit per page).
    pub scheduled_on: HashMap<String, usize>,
    /// unit -> machine -> state.
    pub states: BTreeMap<UnitName, PerMachine<UnitStateRecord>>,
    /// How many states there are and the longest value of each of their fields, kept as they
    /// come, so a stream of every state can announce them without a walk over a million.
    pub state_stats: StateStats,
    /// Parsed `[X-Fleet]` rules of each unit whose body is known (or why they are invalid).
    pub rules: HashMap<UnitName, Result<std::sync::Arc<Rules>, String>>,
    /// Why the leader could not place a unit, as it last recorded.
    pub why: BTreeMap<UnitName, String>,
    /// Machines being drained.
    pub drained: BTreeSet<String>,
    /// Users' pending (or refused) move requests.
    pub moves: BTreeMap<UnitName, MoveRequest>,
    /// Failing units' failures and the moves they caused, as the leader recorded them.
    pub reschedules: BTreeMap<UnitName, RescheduleRecord>,
    /// Rollouts by service (over or not: the last one of each service is kept).
    pub rollouts: BTreeMap<UnitName, RolloutRecord>,
    /// What changed for placing since the leader last took it: kept on the leader's planning
    /// copy only (`None` in the shared view).
    plan_changes: Option<PlanChanges>,
    /// The view a listing under way builds from its pages (`PrefixUpdate::Page`); it replaces
    /// this one when the listing ends.
    listing: Option<Box<Listing>>,
    /// Units whose rules are not parsed yet (their body may not have arrived).
    rules_missing: BTreeSet<UnitName>,
    /// Rules by body hash, for bodies whose rules do not depend on the unit's name.
    shared_rules: HashMap<Text, Arc<Rules>>,
    /// One copy of each body hash and systemd state string the view holds: a million units'
    /// records, entries and states otherwise hold three copies of their hash and three state
    /// words each (see [`fleet_model::text`]). Unit names are shared the same way, through the
    /// key of `units`.
    texts: Interner,
    /// Which units each machine's state pages hold, so a page rewritten for one unit is applied
    /// as that one unit's change (`fleet_model::pages`).
    state_pages: PageFollower,
    /// Which units each machine's schedule pages hold (the same, for the schedule); the leader
    /// also reads from it which page each unit is in and when each page was written.
    schedule_pages: PageFollower,
}

/// What changed since the leader last planned, as far as placing goes: whether a pass that
/// only places new units can do (the scheduler's `place_new`), or a whole pass is needed.
#[derive(Debug, Default, Clone)]
pub struct PlanChanges {
    /// Units created since: they had neither a record nor a schedule entry before.
    pub new_units: Vec<UnitName>,
    /// Schedule entries written (`Some`) or deleted since: the leader's own writes, mostly.
    pub scheduled: Vec<(UnitName, Text, Option<ScheduleEntry>)>,
    /// Machines that joined since (a record where there was none).
    pub machines_new: Vec<String>,
    /// Live machines lost since (their record deleted: their lease ended).
    pub machines_lost: Vec<String>,
    /// Anything else a placement depends on (a unit changed or destroyed, a machine's record
    /// changed, a drain, a move, a rollout, a state the pass reads, a new listing).
    pub other: bool,
}

/// A listing under way: the view its pages built so far.
#[derive(Debug, Default, Clone)]
struct Listing {
    view: ClusterView,
    /// Keys taken in, and the time spent taking them in (logged when the listing ends).
    keys: usize,
    applying: Duration,
}

impl ClusterView {
    fn plan_changed(&mut self) {
        if let Some(c) = self.plan_changes.as_mut() {
            c.other = true;
        }
    }

    /// Applies one delivery of the watch: a whole new snapshot, or changes.
    fn apply_update(&mut self, keys: &Keys, update: PrefixUpdate) {
        self.apply_update_observed(keys, update, &mut |_, _| {});
    }

    /// As [`ClusterView::apply_update`], showing each change (and its decoded key) to `observe`
    /// together with the view just before it: how events are derived.
    fn apply_update_observed(&mut self, keys: &Keys, update: PrefixUpdate, observe: &mut Observer<'_>) {
        match update {
            // A page of a listing: taken into the view it builds (this one stays as it is, for
            // readers, until the listing ends), while etcd reads the next page.
            PrefixUpdate::Page { first, puts } => {
                let applying = std::time::Instant::now();
                let listing = match self.listing.as_mut() {
                    Some(l) if !first => l,
                    _ => self.listing.insert(Box::default()),
                };
                listing.keys += puts.len();
                for c in puts {
                    listing.view.apply(keys, c, &mut |_, _| {});
                }
                listing.applying += applying.elapsed();
            }
            PrefixUpdate::Snapshot { revision, puts } => {
                let applying = std::time::Instant::now();
                let Listing { view: mut fresh, keys: mut keys_listed, applying: before } =
                    self.listing.take().map(|l| *l).unwrap_or_default();
                keys_listed += puts.len();
                for c in puts {
                    fresh.apply(keys, c, &mut |_, _| {});
                }
                fresh.revision = revision;
                fresh.plan_generation = self.plan_generation + 1;
                fresh.parse_missing_rules();
                // A new listing may hide any change: the next pass is a whole one.
                fresh.plan_changes = self.plan_changes.take().map(|c| PlanChanges { other: true, ..c });
                *self = fresh;
                tracing::info!(
                    keys = keys_listed,
                    units = self.units.len(),
                    ms = (before + applying.elapsed()).as_millis() as u64,
                    "listing applied"
                );
            }
            PrefixUpdate::Changes { revision, changes } => {
                for c in changes {
                    self.apply(keys, c, observe);
                }
                self.parse_missing_rules();
                self.revision = self.revision.max(revision);
            }
        }
    }

    fn apply(&mut self, keys: &Keys, change: Change, observe: &mut Observer<'_>) {
        // Decoded once: this runs for every event of the whole cluster.
        let decoded = match &change {
            Change::Put { key, .. } | Change::Delete { key, .. } => keys.decode(key),
        };
        match (decoded, change) {
            // A page of a machine's states or schedule: applied as the changes of the units it
            // changed.
            (Some(Key::StatePage(m, page)), change) => {
                self.apply_page(m, page, change, false, observe);
            }
            (Some(Key::SchedulePage(m, page)), change) => {
                self.apply_page(m, page, change, true, observe);
            }
            // An agent moving its states into pages deletes the key it wrote per unit before (and
            // a leader moving a machine's schedule into pages its per-unit entries): not the
            // unit's state or entry going.
            (Some(Key::State(m, unit)), Change::Delete { .. }) if self.state_pages.holds(&m, unit.as_str()) => {}
            (Some(Key::Schedule(m, unit)), Change::Delete { .. }) if self.schedule_pages.holds(&m, unit.as_str()) => {}
            (decoded, change) => self.apply_decoded(decoded, change, observe),
        }
    }

    /// One page of `m`'s states (or schedule), as the changes of the units it changed.
    fn apply_page(&mut self, m: String, page: u32, change: Change, schedule: bool, observe: &mut Observer<'_>) {
        let follower = if schedule { &mut self.schedule_pages } else { &mut self.state_pages };
        let (changes, lease, revision) = match &change {
            Change::Put { value, lease, mod_revision, .. } => {
                let units = &self.units;
                let share = |u: UnitName| units.get_key_value(&u).map(|(k, _)| k.clone()).unwrap_or(u);
                match follower.put(&m, page, *mod_revision, value, share) {
                    Ok(c) => (c, *lease, *mod_revision),
                    Err(e) => {
                        tracing::error!(machine = %m, page, schedule, error = %e, "unreadable page; ignoring");
                        return;
                    }
                }
            }
            Change::Delete { mod_revision, .. } => (follower.delete(&m, page), 0, *mod_revision),
        };
        // Passed on already decoded: nothing after this reads a change's key bytes, so none are
        // formatted (a million units' states and entries pass here).
        for c in changes {
            let (unit, change) = match c {
                PageChange::Put(unit, raw) => {
                    (unit, Change::Put { key: Vec::new(), value: raw.to_vec(), lease, mod_revision: revision })
                }
                PageChange::Removed(unit) => (unit, Change::Delete { key: Vec::new(), mod_revision: revision }),
            };
            let key = if schedule { Key::Schedule(m.clone(), unit) } else { Key::State(m.clone(), unit) };
            self.apply_decoded(Some(key), change, observe);
        }
    }

    /// Schedule entries whose machine has not reported the unit's state yet (about: a unit
    /// reported elsewhere counts as reported): starts the agents still have to make.
    pub fn pending_starts(&self) -> usize {
        self.scheduled_on.values().sum::<usize>().saturating_sub(self.state_stats.rows)
    }

    /// Which page of `machine`'s schedule each unit is in, and when each page was written.
    pub fn schedule_pages_of(
        &self,
        machine: &str,
    ) -> impl Iterator<Item = (u32, i64, impl Iterator<Item = &UnitName>)> {
        self.schedule_pages.pages_of(machine)
    }

    /// Whether `unit`'s entry on `machine` is in one of the machine's schedule pages (rather
    /// than a key of its own).
    pub fn in_schedule_page(&self, machine: &str, unit: &str) -> bool {
        self.schedule_pages.holds(machine, unit)
    }

    /// How many of `machine`'s entries are keys of their own (written before its agent read pages).
    pub fn schedule_keys_on(&self, machine: &str) -> usize {
        self.scheduled_on.get(machine).copied().unwrap_or(0).saturating_sub(self.schedule_pages.units_on(machine))
    }

    fn apply_decoded(&mut self, decoded: Option<Key>, change: Change, observe: &mut Observer<'_>) {
        // A placement is shown to the observer once written, with what the write found (one
        // lookup of the unit's entries serves both: placements come by the hundred thousand).
        let placement = matches!((&decoded, &change), (Some(Key::Schedule(..)), Change::Put { .. }));
        // A unit's record or state written is shown below, once the view decoded it (they come
        // by the hundred thousand; the deriver decoding records again was a fifth of what events
        // cost).
        let decoded_below = matches!((&decoded, &change), (Some(Key::Unit(_) | Key::State(..)), Change::Put { .. }));
        if !placement && !decoded_below {
            observe(self, Seen::Change(decoded.as_ref(), &change));
        }
        if !matches!(
            decoded,
            Some(Key::State(..))
                | Some(Key::StatePage(..))
                | Some(Key::SchedulePage(..))
                | Some(Key::Why(_))
                | Some(Key::Leader(_))
                | Some(Key::RebootLock(_))
        ) {
            self.plan_generation += 1;
            // Units created, bodies, schedule entries and machines' records are sorted out
            // below; everything else calls for a whole pass.
            if !matches!(decoded, Some(Key::Unit(_) | Key::Body(_) | Key::Schedule(..) | Key::Machine(_)) | None) {
                self.plan_changed();
            }
        }
        // Except the state of an exclusive unit on a machine it is leaving (its entry there
        // rewritten inactive) or has left: the leader places it elsewhere once that says stopped.
        // And the state of a unit that asks to be moved when it fails (`RescheduleAttempts`).
        if let Some(Key::State(m, unit)) = &decoded {
            if matches!(self.rules.get(unit), Some(Ok(r)) if r.reschedule.is_on()) || self.rolling(unit) {
                self.plan_generation += 1;
                self.plan_changed();
            }
            let exclusive = matches!(self.rules.get(unit), Some(Ok(r)) if r.exclusive);
            let running_there = self
                .schedule
                .get(unit)
                .and_then(|e| e.get(m))
                .is_some_and(|e| e.desired_state != fleet_model::DesiredState::Inactive);
            if exclusive && !running_there {
                self.plan_generation += 1;
                self.plan_changed();
            }
        }
        match change {
            Change::Put { value, mod_revision, .. } => match decoded {
                Some(Key::Unit(name)) => match decode::<UnitRecord>(&value) {
                    Ok(mut rec) => {
                        observe(self, Seen::Unit { name: &name, record: &rec, revision: mod_revision });
                        let name = self.unit_name(name);
                        rec.name = name.clone();
                        self.texts.intern(&mut rec.hash);
                        // Rules depend only on the name and the body: a new desired state keeps them.
                        if self.units.get(&name).is_none_or(|old| old.hash != rec.hash) {
                            self.rules.remove(&name);
                            self.rules_missing.insert(name.clone());
                        }
                        if self.plan_changes.is_some() {
                            let created = !self.units.contains_key(&name) && !self.schedule.contains_key(&name);
                            match self.plan_changes.as_mut() {
                                Some(c) if created => c.new_units.push(name.clone()),
                                _ => self.plan_changed(),
                            }
                        }
                        self.units.insert(name, rec);
                    }
                    Err(e) => {
                        tracing::error!(unit = %name, error = %e, "unreadable unit record; ignoring")
                    }
                },
                Some(Key::Body(hash)) => {
                    self.bodies.insert(hash, (String::from_utf8_lossy(&value).into_owned(), mod_revision));
                }
                Some(Key::Why(unit)) => {
                    self.why.insert(unit, String::from_utf8_lossy(&value).into_owned());
                }
                Some(Key::Drain(m)) => {
                    self.drained.insert(m);
                }
                Some(Key::Metadata(m, k)) => {
                    self.dynamic_metadata
                        .entry(m.clone())
                        .or_default()
                        .insert(k, String::from_utf8_lossy(&value).into_owned());
                    self.merge_machine(&m);
                }
                Some(Key::Rollout(service)) => match decode::<RolloutRecord>(&value) {
                    Ok(r) => {
                        self.rollouts.insert(service, r);
                    }
                    Err(e) => tracing::error!(service = %service, error = %e, "unreadable rollout; ignoring"),
                },
                Some(Key::Reschedule(unit)) => match decode::<RescheduleRecord>(&value) {
                    Ok(r) => {
                        self.reschedules.insert(unit, r);
                    }
                    Err(e) => tracing::error!(unit = %unit, error = %e, "unreadable reschedule record; ignoring"),
                },
                Some(Key::Move(unit)) => match decode::<MoveRequest>(&value) {
                    Ok(m) => {
                        self.moves.insert(unit, m);
                    }
                    Err(e) => tracing::error!(unit = %unit, error = %e, "unreadable move request; ignoring"),
                },
                Some(Key::Machine(id)) => match decode::<MachineRecord>(&value) {
                    Ok(rec) => {
                        let before = self.plan_changes.as_ref().and_then(|_| self.machines.get(&id).cloned());
                        self.published_machines.insert(id.clone(), rec);
                        self.merge_machine(&id);
                        // A machine that writes its record again unchanged changes nothing.
                        if self.plan_changes.is_some() && self.machines.get(&id) != before.as_ref() {
                            match (before, self.plan_changes.as_mut()) {
                                (None, Some(c)) => c.machines_new.push(id.clone()),
                                _ => self.plan_changed(),
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(machine = %id, error = %e, "unreadable machine record; ignoring")
                    }
                },
                Some(Key::Schedule(m, unit)) => match decode::<ScheduleEntry>(&value) {
                    Ok(mut e) => {
                        let unit = self.unit_name(unit);
                        self.texts.intern(&mut e.hash);
                        let entries = self.schedule.entry(unit.clone()).or_default();
                        let elsewhere = entries.keys().find(|other| **other != m).cloned();
                        let machine = self.texts.text(&m);
                        if let Some(c) = self.plan_changes.as_mut() {
                            c.scheduled.push((unit.clone(), machine.clone(), Some(e.clone())));
                        }
                        let was_there = entries.insert(machine, e).is_some();
                        if !was_there {
                            *self.scheduled_on.entry(m.clone()).or_default() += 1;
                        }
                        let seen = Seen::Scheduled {
                            machine: &m,
                            unit: &unit,
                            revision: mod_revision,
                            was_there,
                            elsewhere: elsewhere.as_deref(),
                        };
                        observe(self, seen);
                    }
                    Err(e) => {
                        tracing::error!(unit = %unit, error = %e, "unreadable schedule entry; ignoring")
                    }
                },
                Some(Key::State(m, unit)) => match decode::<UnitStateRecord>(&value) {
                    Ok(mut s) => {
                        observe(self, Seen::State { machine: &m, unit: &unit, record: &s, revision: mod_revision });
                        let unit = self.unit_name(unit);
                        for t in [&mut s.hash, &mut s.load_state, &mut s.active_state, &mut s.sub_state] {
                            self.texts.intern(t);
                        }
                        self.state_stats.saw(&unit, &m, &s);
                        let m = self.texts.text(&m);
                        if self.states.entry(unit).or_default().insert(m, s).is_none() {
                            self.state_stats.rows += 1;
                        }
                    }
                    Err(e) => {
                        tracing::error!(unit = %unit, error = %e, "unreadable unit state; ignoring")
                    }
                },
                // Only events need these (crate::events); pages come as their units' states.
                Some(Key::Leader(_))
                | Some(Key::RebootLock(_))
                | Some(Key::StatePage(..))
                | Some(Key::SchedulePage(..))
                | None => {}
            },
            Change::Delete { .. } => match decoded {
                Some(Key::Unit(name)) => {
                    self.plan_changed();
                    self.units.remove(&name);
                    self.rules.remove(&name);
                    self.rules_missing.remove(&name);
                }
                Some(Key::Why(unit)) => {
                    self.why.remove(&unit);
                }
                Some(Key::Move(unit)) => {
                    self.moves.remove(&unit);
                }
                Some(Key::Reschedule(unit)) => {
                    self.reschedules.remove(&unit);
                }
                Some(Key::Rollout(service)) => {
                    self.rollouts.remove(&service);
                }
                Some(Key::Drain(m)) => {
                    self.drained.remove(&m);
                }
                Some(Key::Metadata(m, k)) => {
                    if let Some(md) = self.dynamic_metadata.get_mut(&m) {
                        md.remove(&k);
                    }
                    self.merge_machine(&m);
                }
                Some(Key::Body(hash)) => {
                    self.shared_rules.remove(hash.as_str());
                    self.bodies.remove(&hash);
                }
                Some(Key::Machine(id)) => {
                    if self.machines.contains_key(&id) {
                        if let Some(c) = self.plan_changes.as_mut() {
                            c.machines_lost.push(id.clone());
                        }
                    }
                    self.published_machines.remove(&id);
                    self.machines.remove(&id);
                }
                Some(Key::Schedule(m, unit)) => {
                    if let Some(c) = self.plan_changes.as_mut() {
                        c.scheduled.push((unit.clone(), Text::from(m.as_str()), None));
                    }
                    if remove_nested(&mut self.schedule, &unit, &m) {
                        if let Some(n) = self.scheduled_on.get_mut(&m) {
                            *n = n.saturating_sub(1);
                            if *n == 0 {
                                self.scheduled_on.remove(&m);
                            }
                        }
                    }
                }
                Some(Key::State(m, unit)) => {
                    if remove_nested(&mut self.states, &unit, &m) {
                        self.state_stats.rows = self.state_stats.rows.saturating_sub(1);
                    }
                }
                Some(Key::Leader(_))
                | Some(Key::RebootLock(_))
                | Some(Key::StatePage(..))
                | Some(Key::SchedulePage(..))
                | None => {}
            },
        }
    }

    /// `name` as the view already holds it (the key of `units`, or of `schedule` or `states` for
    /// a unit whose record is gone), so every map keyed by one unit shares one allocation.
    fn unit_name(&self, name: UnitName) -> UnitName {
        let held = self.units.get_key_value(&name).map(|(k, _)| k);
        let held = held.or_else(|| self.schedule.get_key_value(&name).map(|(k, _)| k));
        let held = held.or_else(|| self.states.get_key_value(&name).map(|(k, _)| k));
        held.cloned().unwrap_or(name)
    }

    /// Recomputes a live machine's effective metadata: the agent's, overridden by the API's.
    fn merge_machine(&mut self, id: &str) {
        let Some(rec) = self.published_machines.get(id) else { return };
        let mut rec = rec.clone();
        for (k, v) in self.dynamic_metadata.get(id).into_iter().flatten() {
            if v.is_empty() {
                rec.metadata.remove(k);
            } else {
                rec.metadata.insert(k.clone(), v.clone());
            }
        }
        self.machines.insert(id.to_string(), rec);
    }

    /// Parses the rules of units that have a body but no parsed rules yet. Run after each batch
    /// of changes, since a unit and its body arrive in one transaction in either order.
    fn parse_missing_rules(&mut self) {
        // Only units written since the last batch: a scan of every unit here would make a
        // stream of small batches quadratic in the number of units.
        let missing: Vec<UnitName> = self.rules_missing.iter().cloned().collect();
        for name in missing {
            let Some(rec) = self.units.get(&name) else {
                self.rules_missing.remove(&name);
                continue;
            };
            let Some((text, _)) = self.bodies.get(rec.hash.as_str()) else { continue };
            self.rules_missing.remove(&name);
            // Units with the same body share their rules (a million instances of one template
            // would otherwise hold a million equal copies), unless a rule names the unit through
            // a specifier (`%i`): those are the unit's own.
            let shared = self.shared_rules.get(rec.hash.as_str()).cloned();
            let rules = match shared {
                Some(r) => Ok(r),
                None => {
                    let parsed = UnitFile::parse(text)
                        .map_err(|e| format!("invalid unit file: {e}"))
                        .and_then(|f| Rules::parse(&name, &f).map(|r| (f, r)).map_err(|e| e.to_string()));
                    parsed.map(|(f, r)| {
                        let r = Arc::new(r);
                        let by_name =
                            f.options.iter().any(|o| o.section == fleet_model::rules::SECTION && o.value.contains('%'));
                        if !by_name {
                            self.shared_rules.insert(rec.hash.clone(), r.clone());
                        }
                        r
                    })
                }
            };
            self.rules.insert(name, rules);
        }
    }

    /// Bodies no unit refers to, with the revision they were last written at.
    /// Whether `unit` is an instance of a service being rolled out (its states drive the rollout).
    pub fn rolling(&self, unit: &UnitName) -> bool {
        if self.rollouts.is_empty() {
            return false;
        }
        let service = unit.template().unwrap_or_else(|| unit.clone());
        self.rollouts.get(&service).is_some_and(|r| !r.phase.is_over())
    }

    pub fn orphan_bodies(&self) -> Vec<(String, i64)> {
        // A service's last rollout keeps both its versions (the new one before any instance has
        // it, the previous one to go back to, even by an `undo` after it succeeded).
        let used: BTreeSet<&str> = self
            .units
            .values()
            .map(|u| u.hash.as_str())
            .chain(self.rollouts.values().flat_map(|r| [r.version.as_str(), r.previous.as_str()]))
            .collect();
        self.bodies.iter().filter(|(h, _)| !used.contains(h.as_str())).map(|(h, (_, rev))| (h.clone(), *rev)).collect()
    }
}

/// The states' count and, for each field a listing shows, the longest value any state has had
/// (as long as any present, at least: a long value that went stays counted).
#[derive(Debug, Default, Clone)]
pub struct StateStats {
    pub rows: usize,
    /// Name, hash, machine id, load, active and sub state, health.
    pub longest: [usize; 7],
}

impl StateStats {
    fn saw(&mut self, unit: &UnitName, machine: &str, s: &UnitStateRecord) {
        let health = s.health.map_or(0, |h| h.as_str().len());
        let lens = [
            unit.as_str().len(),
            s.hash.len(),
            machine.len(),
            s.load_state.len(),
            s.active_state.len(),
            s.sub_state.len(),
            health,
        ];
        for (l, n) in self.longest.iter_mut().zip(lens) {
            *l = (*l).max(n);
        }
    }
}

/// Removes `unit`'s entry for `machine`; whether there was one.
fn remove_nested<V>(map: &mut BTreeMap<UnitName, PerMachine<V>>, unit: &UnitName, machine: &str) -> bool {
    let Some(inner) = map.get_mut(unit) else { return false };
    let removed = inner.remove(machine).is_some();
    if inner.is_empty() {
        map.remove(unit);
    }
    removed
}

/// What the view's apply shows its observer (the events' deriver).
pub(crate) enum Seen<'a> {
    /// A change (its key decoded), with the view just before it.
    Change(Option<&'a Key>, &'a Change),
    /// A unit's record written (and readable), with the view just before it.
    Unit { name: &'a UnitName, record: &'a UnitRecord, revision: i64 },
    /// A unit's state on a machine written (and readable), with the view just before it.
    State { machine: &'a str, unit: &'a UnitName, record: &'a UnitStateRecord, revision: i64 },
    /// A schedule entry written, with the view just after it (the write changes nothing else
    /// the deriver reads) and what the write found: whether `machine` had an entry for the unit
    /// already, and another machine that has one.
    Scheduled { machine: &'a str, unit: &'a UnitName, revision: i64, was_there: bool, elsewhere: Option<&'a str> },
}

/// Sees each change (see [`Seen`] and [`ClusterView::apply_update_observed`]).
type Observer<'a> = dyn FnMut(&ClusterView, Seen<'_>) + 'a;

/// Updates the leader's planning copy has not applied yet; `None` while nobody plans.
type PlanFeed = Arc<Mutex<Option<Vec<PrefixUpdate>>>>;

/// A shared, watch-fed [`ClusterView`].
#[derive(Clone)]
pub struct Cluster {
    view: Arc<RwLock<ClusterView>>,
    revision: watch::Receiver<i64>,
    plan: watch::Receiver<u64>,
    kick: Arc<tokio::sync::Notify>,
    plan_feed: PlanFeed,
    keys: Keys,
    events: Arc<EventLog>,
}

/// The leader's own copy of the view (see [`Cluster::plan_view`]).
pub struct PlanView {
    view: ClusterView,
    feed: PlanFeed,
    keys: Keys,
}

impl PlanView {
    /// Applies what the shared view received since the last refresh.
    pub fn refresh(&mut self) {
        let updates = match self.feed.lock() {
            Ok(mut q) => q.as_mut().map(std::mem::take).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        for update in updates {
            self.view.apply_update(&self.keys, update);
        }
    }

    pub fn view(&self) -> &ClusterView {
        &self.view
    }

    /// What changed for placing since the last call (or since the copy was taken).
    pub fn take_changes(&mut self) -> PlanChanges {
        self.view.plan_changes.replace(PlanChanges::default()).unwrap_or_default()
    }
}

impl Drop for PlanView {
    fn drop(&mut self) {
        if let Ok(mut q) = self.feed.lock() {
            *q = None;
        }
    }
}

impl Cluster {
    /// Starts following `keys.prefix()` with `client`, keeping the last `history` events.
    pub fn follow(client: fleet_store::etcd::Client, keys: Keys, history: usize) -> Self {
        let (tx, rx) = mpsc::channel(256);
        let kick = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(fleet_store::etcd::follow_prefix_paged(
            client,
            keys.prefix().to_string(),
            tx,
            Some(VERIFY),
            Some(kick.clone()),
        ));
        Self::fed_by(rx, keys, kick, history)
    }

    /// Follows `keys.prefix()` on any store with [`fleet_store::kv::follow`]: a snapshot, then
    /// each revision's changes, resumed after a lost watch. The API's unit tests feed their view
    /// this way from the in-memory store. Engines follow etcd with [`Cluster::follow`], which
    /// also restarts a watch stuck on a dead member when kicked and checks its count of keys now
    /// and then.
    pub fn follow_store<S: fleet_store::kv::Store>(store: S, keys: Keys) -> Self {
        Self::follow_store_keeping(store, keys, crate::events::DEFAULT_HISTORY)
    }

    /// As [`Cluster::follow_store`], keeping the last `history` events (0: events off).
    pub fn follow_store_keeping<S: fleet_store::kv::Store>(store: S, keys: Keys, history: usize) -> Self {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(fleet_store::kv::follow(store, keys.prefix().to_string(), tx));
        Self::fed_by(rx, keys, Arc::new(tokio::sync::Notify::new()), history)
    }

    /// A view fed by `updates` (from etcd's watch in [`Cluster::follow`]; from a test directly).
    fn fed_by(
        mut rx: mpsc::Receiver<PrefixUpdate>,
        keys: Keys,
        kick: Arc<tokio::sync::Notify>,
        history: usize,
    ) -> Self {
        let view = Arc::new(RwLock::new(ClusterView::default()));
        let (rev_tx, rev_rx) = watch::channel(0);
        let (plan_tx, plan_rx) = watch::channel(0u64);
        let shared = view.clone();
        let plan_feed: PlanFeed = Arc::new(Mutex::new(None));
        let feed = plan_feed.clone();
        let keys_for_plans = keys.clone();
        let events = Arc::new(EventLog::new(history));
        let log = events.clone();
        let mut deriver = (!events.is_off()).then(Deriver::default);
        tokio::spawn(async move {
            while let Some(update) = rx.recv().await {
                // Waiting for the lock (a leader pass may hold it for a while at scale) and
                // applying a large batch are blocking work: keep them off the async workers.
                let applied = tokio::task::block_in_place(|| {
                    let Ok(mut v) = shared.write() else { return None };
                    // The leader's planning copy gets the same update, in the same order (it is
                    // queued under this lock, which its copy was taken under).
                    if let Ok(mut queue) = feed.lock() {
                        if let Some(q) = queue.as_mut() {
                            q.push(update.clone());
                        }
                    }
                    // Events are derived here, on the shared view only, comparing each change with
                    // the view just before it.
                    let Some(deriver) = deriver.as_mut() else {
                        // Events off (`event_history = 0`): the view alone.
                        v.apply_update(&keys, update);
                        return Some((v.revision, v.plan_generation, None, Vec::new()));
                    };
                    let listed = match &update {
                        PrefixUpdate::Page { first, puts } => {
                            deriver.page(&keys, puts, *first);
                            None
                        }
                        PrefixUpdate::Snapshot { revision, puts } => {
                            deriver.snapshot(&keys, puts);
                            Some(*revision)
                        }
                        PrefixUpdate::Changes { .. } => None,
                    };
                    v.apply_update_observed(&keys, update, &mut |view, seen| deriver.seen(view, seen));
                    Some((v.revision, v.plan_generation, listed, deriver.finish()))
                });
                let Some((rev, generation, listed, happened)) = applied else { return };
                let time = crate::events::now();
                if let Some(revision) = listed {
                    log.listed(revision, &time);
                }
                log.record(happened, &time);
                // The revision first: a leader woken by a new plan generation must find the view's
                // revision already there (it plans only from a listed view, revision > 0; woken
                // by the first listing with the revision not yet sent, it waited for good).
                if rev_tx.send(rev).is_err() {
                    return;
                }
                plan_tx.send_if_modified(|g| std::mem::replace(g, generation) != generation);
            }
        });
        Cluster { view, revision: rev_rx, plan: plan_rx, kick, plan_feed, keys: keys_for_plans, events }
    }

    /// A copy of the view for the leader to plan on, kept up to date by [`PlanView::refresh`].
    ///
    /// A planning pass over a large cluster takes a while; were it to read the shared view, it
    /// would hold the view's lock all that time, the watch could not apply what etcd sends, and
    /// API reads that wait for a write of theirs to show (and, behind the waiting writer, every
    /// API read) would wait for the pass. The copy costs memory (a second view, on the leader
    /// only) and one clone when leadership starts; updates reach it as a queue it drains between
    /// passes. One at a time: a new copy replaces the previous one's queue.
    pub fn plan_view(&self) -> PlanView {
        let view = match self.view.read() {
            Ok(v) => {
                // Under the read lock the watch cannot apply (nor queue) an update, so the copy
                // and the queue started here meet exactly.
                if let Ok(mut q) = self.plan_feed.lock() {
                    *q = Some(Vec::new());
                }
                v.clone()
            }
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let mut view = view;
        view.plan_changes = Some(PlanChanges::default());
        PlanView { view, feed: self.plan_feed.clone(), keys: self.keys.clone() }
    }

    /// Runs `f` on the current view.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterView) -> T) -> T {
        match self.view.read() {
            Ok(v) => f(&v),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// The events this engine derived and keeps.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    pub fn revision(&self) -> i64 {
        *self.revision.borrow()
    }

    /// Changes when something that can alter a placement changed (see
    /// [`ClusterView::plan_generation`]).
    pub fn subscribe_plan(&self) -> watch::Receiver<u64> {
        self.plan.clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.revision.clone()
    }

    /// Restarts the watch from the last revision seen: used when the view lags a write, which
    /// means the watch stream sits on an etcd member that went away.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Waits until the view reflects at least `revision`; false on timeout.
    pub async fn caught_up(&self, revision: i64, timeout: Duration) -> bool {
        let mut rx = self.revision.clone();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision)).await.map(|r| r.is_ok()).unwrap_or(false)
    }

    /// Waits until the view shows `revision`, for as long as it keeps moving towards it: true
    /// once it does, false if it stood still for `stuck` (a watch stuck on a dead member) or
    /// `limit` passed. A view merely busy taking in a large write is waited for, not relisted
    /// (a relisting at a million units costs etcd and the engine far more than the wait).
    pub async fn follows_to(&self, revision: i64, stuck: Duration, limit: Duration) -> bool {
        let until = tokio::time::Instant::now() + limit;
        let mut last = self.revision();
        loop {
            if self.caught_up(revision, stuck).await {
                return true;
            }
            let now = self.revision();
            if now == last || tokio::time::Instant::now() >= until {
                return false;
            }
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_model::schema::encode;
    use fleet_model::DesiredState;

    fn unit_put(keys: &Keys, name: &str, rev: i64) -> Change {
        let name = UnitName::parse(name).expect("name");
        let rec = UnitRecord { name: name.clone(), hash: "h".into(), desired_state: DesiredState::Launched };
        Change::Put {
            key: keys.unit(&name).into_bytes(),
            value: encode(&rec).expect("encode"),
            lease: 0,
            mod_revision: rev,
        }
    }

    fn put<T: serde::Serialize>(key: String, value: &T, rev: i64) -> Change {
        Change::Put { key: key.into_bytes(), value: encode(value).expect("encode"), lease: 0, mod_revision: rev }
    }

    /// What a million units repeat (their body's hash, their machine's id, their state words,
    /// their own name in every map) the view holds once: equal values decoded from different
    /// keys end up as one allocation.
    #[test]
    fn the_view_holds_repeated_values_once() {
        let keys = Keys::new("/t/");
        let mut v = ClusterView::default();
        let (a, b) = (UnitName::parse("a.service").expect("name"), UnitName::parse("b.service").expect("name"));
        let state = UnitStateRecord {
            hash: "h".into(),
            load_state: "loaded".into(),
            active_state: "active".into(),
            sub_state: "running".into(),
            applied: DesiredState::Launched,
            health: None,
        };
        let entry = ScheduleEntry { hash: "h".into(), desired_state: DesiredState::Launched };
        let mut changes = vec![unit_put(&keys, "a.service", 2), unit_put(&keys, "b.service", 2)];
        for u in [&a, &b] {
            changes.push(put(keys.schedule("m1", u), &entry, 3));
            changes.push(put(keys.state("m1", u), &state, 4));
        }
        v.apply_update(&keys, PrefixUpdate::Changes { revision: 4, changes });

        let (ka, ra) = v.units.get_key_value(&a).expect("a");
        let (sa, ea) = v.schedule.get_key_value(&a).expect("a scheduled");
        let (ta, pa) = v.states.get_key_value(&a).expect("a's state");
        let (sea, seb) = (ea.get("m1").expect("entry"), v.schedule[&b].get("m1").expect("entry"));
        let (sta, stb) = (pa.get("m1").expect("state"), v.states[&b].get("m1").expect("state"));
        assert!(ka.shares(&ra.name) && ka.shares(sa) && ka.shares(ta), "one name for every map");
        let hash = &ra.hash;
        for other in [&v.units[&b].hash, &sea.hash, &seb.hash, &sta.hash, &stb.hash] {
            assert!(hash.shares(other), "one copy of the body's hash");
        }
        assert!(sta.active_state.shares(&stb.active_state) && sta.sub_state.shares(&stb.sub_state));
        let m = ea.keys().next().expect("machine");
        let others = [pa.keys().next(), v.schedule[&b].keys().next(), v.states[&b].keys().next()];
        assert!(others.iter().all(|o| o.is_some_and(|o| m.shares(o))), "one copy of the machine id");
        // A copy of the view (the leader's planning copy) shares them too.
        let copy = v.clone();
        assert!(copy.units[&a].hash.shares(hash));
    }

    fn names(v: &ClusterView) -> Vec<String> {
        v.units.keys().map(|u| u.to_string()).collect()
    }

    /// A listing taken in page by page (while etcd reads the next) builds the view one snapshot
    /// would; readers see the view as it was until the listing ends; and a listing started
    /// again (its first attempt failed after a page) forgets the failed attempt's pages.
    #[test]
    fn a_listing_in_pages_replaces_the_view_at_its_end_as_one_snapshot_would() {
        let keys = Keys::new("/t/");
        let units = |names: &[&str]| names.iter().map(|n| unit_put(&keys, n, 5)).collect::<Vec<_>>();
        let mut whole = ClusterView::default();
        whole.apply_update(
            &keys,
            PrefixUpdate::Snapshot { revision: 9, puts: units(&["x.service", "y.service", "z.service"]) },
        );

        let mut v = ClusterView::default();
        v.apply_update(&keys, PrefixUpdate::Snapshot { revision: 1, puts: units(&["a.service"]) });
        let generation = v.plan_generation;
        v.apply_update(&keys, PrefixUpdate::Page { first: true, puts: units(&["stale.service"]) });
        v.apply_update(&keys, PrefixUpdate::Page { first: true, puts: units(&["x.service"]) });
        v.apply_update(&keys, PrefixUpdate::Page { first: false, puts: units(&["y.service"]) });
        assert_eq!(names(&v), vec!["a.service"], "the view changed before its listing ended");
        assert_eq!((v.revision, v.plan_generation), (1, generation));
        v.apply_update(&keys, PrefixUpdate::Snapshot { revision: 9, puts: units(&["z.service"]) });
        assert_eq!(names(&v), names(&whole));
        assert_eq!(v.revision, 9);
        assert!(v.plan_generation > generation, "a new listing is a new plan generation");
        assert!(v.listing.is_none());
    }

    /// The leader's planning copy sees exactly what the shared view sees, in order, once it
    /// refreshes; and while the copy is held (a pass under way) the shared view keeps applying
    /// the watch, so a read waiting for a revision is not held up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_planning_copy_follows_the_view_without_holding_it() {
        let keys = Keys::new("/t/");
        let (tx, rx) = mpsc::channel(16);
        let cluster = Cluster::fed_by(rx, keys.clone(), Arc::new(tokio::sync::Notify::new()), 100);
        let update =
            |rev: i64, name: &str| PrefixUpdate::Changes { revision: rev, changes: vec![unit_put(&keys, name, rev)] };
        tx.send(PrefixUpdate::Snapshot { revision: 1, puts: vec![unit_put(&keys, "a.service", 1)] })
            .await
            .expect("send");
        assert!(cluster.caught_up(1, Duration::from_secs(5)).await);

        let mut plan = cluster.plan_view();
        assert_eq!(names(plan.view()), vec!["a.service"]);
        // A pass is under way: the copy is borrowed while the watch delivers two changes.
        let during = plan.view();
        tx.send(update(2, "b.service")).await.expect("send");
        tx.send(update(3, "c.service")).await.expect("send");
        assert!(cluster.caught_up(3, Duration::from_secs(5)).await, "the shared view waited for the pass");
        assert_eq!(cluster.read(names), vec!["a.service", "b.service", "c.service"]);
        assert_eq!(names(during), vec!["a.service"], "the copy changed under the pass");
        // Between passes the copy takes what it missed, and matches the view.
        plan.refresh();
        assert_eq!(names(plan.view()), vec!["a.service", "b.service", "c.service"]);
        assert_eq!(plan.view().revision, 3);
        // A listing (after a compaction) replaces both alike, in pages as etcd's follower sends
        // it: a first attempt that failed after one page, then the whole listing again.
        for page in [
            PrefixUpdate::Page { first: true, puts: vec![unit_put(&keys, "w.service", 8)] },
            PrefixUpdate::Page { first: true, puts: vec![unit_put(&keys, "z.service", 9)] },
            PrefixUpdate::Snapshot { revision: 9, puts: Vec::new() },
        ] {
            tx.send(page).await.expect("send");
        }
        assert!(cluster.caught_up(9, Duration::from_secs(5)).await);
        plan.refresh();
        assert_eq!(names(plan.view()), cluster.read(names));
        assert_eq!(names(plan.view()), vec!["z.service"]);
        // Once the leader lets go of its copy, nothing queues for it any more.
        drop(plan);
        tx.send(update(10, "y.service")).await.expect("send");
        assert!(cluster.caught_up(10, Duration::from_secs(5)).await);
        assert!(cluster.plan_feed.lock().map(|q| q.is_none()).unwrap_or(false));
    }
}
