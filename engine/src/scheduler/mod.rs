//! Placement as a pure function: a snapshot of the cluster in, decisions out.
//!
//! No I/O and no clock, so every rule is tested with tables and properties, and the leader only
//! writes what this returns. Placement is sticky: a unit whose placement still satisfies its
//! rules is never moved. A pass runs in four steps:
//!
//! 1. keep every existing placement that is still valid (machine alive, rules hold, no conflict
//!    with a unit kept before it in name order, capacity not exceeded, MachineOf peers present);
//! 2. place global units on every eligible machine;
//! 3. place the other units, peers before their followers, on the best eligible machine
//!    (`Replaces` takeover first, then fewest replicas in the `SpreadBy` domain, then least
//!    utilised, then fewest units, then machine id), displacing units a placed unit `Replaces`;
//! 4. explain every unit that wants a machine and got none.
//!
//! Between 2 and 3, users' move requests are carried out and units that keep failing are moved
//! (`rescheduling`). The time that takes is the snapshot's `now`: given, never read.
//!
//! That whole pass is O(units). When only new units arrived since the last one, [`place_new`]
//! runs steps 2 to 4 for them alone (and for the units that had no machine) on what the last pass
//! left ([`Carried`]), with the same result: at a million units, milliseconds instead of seconds.

mod eligibility;
mod placing;
mod rescheduling;
#[cfg(test)]
mod tests;

use crate::cluster::PlanChanges;
use fleet_model::reschedule::RescheduleRecord;
use fleet_model::rules::{Resources, Rules};
use fleet_model::schema::MoveRequest;
use fleet_model::{DesiredState, MachineRecord, ScheduleEntry, UnitName, UnitRecord, UnitStateRecord};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::Arc;

/// What the scheduler sees. `rules` holds each unit's parsed `[X-Fleet]` rules, or why they could
/// not be read (such a unit is never placed).
pub struct Snapshot<'a> {
    pub units: &'a BTreeMap<UnitName, UnitRecord>,
    pub rules: &'a HashMap<UnitName, Result<std::sync::Arc<Rules>, String>>,
    pub machines: &'a BTreeMap<String, MachineRecord>,
    pub schedule: &'a BTreeMap<UnitName, crate::cluster::PerMachine<ScheduleEntry>>,
    pub moves: &'a BTreeMap<UnitName, MoveRequest>,
    /// Machines being drained: they keep nothing and take nothing.
    pub drained: &'a BTreeSet<String>,
    /// Lost machines whose exclusive units may still be running: lost less than their lease TTL
    /// plus a margin ago, so their agent may not have stopped them yet.
    pub fencing: &'a BTreeSet<String>,
    /// What agents report: unit -> machine -> state. An agent keeps reporting a unit taken off
    /// its machine until systemd has stopped it, so an exclusive unit is not started elsewhere
    /// while it is still stopping (a slow `ExecStop` must not overlap the next instance).
    pub states: &'a BTreeMap<UnitName, crate::cluster::PerMachine<UnitStateRecord>>,
    /// What the leader recorded of failing units' failures and moves (`reschedule/<unit>`).
    pub reschedules: &'a BTreeMap<UnitName, RescheduleRecord>,
    /// The pass's time, in unix seconds: when failures were seen and moves are due.
    pub now: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write a schedule entry (new placement, or a changed hash or desired state).
    Put { unit: UnitName, machine: String, entry: ScheduleEntry },
    /// Delete a schedule entry.
    Remove { unit: UnitName, machine: String, reason: Reason },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    UnitGone,
    UnitInactive,
    MachineLost,
    Duplicate,
    Template,
    /// Its rules no longer hold on that machine.
    RulesBroken(String),
    /// A unit that `Replaces` it took its machine.
    Displaced(UnitName),
    /// A user asked to move it.
    Moved,
    /// Its machine is being drained.
    Drained,
    /// An exclusive unit on its way elsewhere has stopped there.
    Stopped,
    /// It failed there and asks to be moved when it does (`RescheduleAttempts`).
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveOutcome {
    /// Done or no longer relevant: the request can be deleted.
    Done,
    Refused(String),
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub decisions: Vec<Decision>,
    /// Units that want a machine but got none, and why.
    pub unplaceable: BTreeMap<UnitName, String>,
    /// What became of users' move requests.
    pub moves: BTreeMap<UnitName, MoveOutcome>,
    /// Failing units' records to write (`None`: delete).
    pub reschedules: BTreeMap<UnitName, Option<RescheduleRecord>>,
    /// When a pass is due although nothing changes (a failed unit's delay ends), unix seconds.
    pub wake_at: Option<u64>,
}

/// Why one machine cannot take one unit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Fail {
    MachineId(String),
    Metadata(String),
    Peer(String),
    Conflict(String),
    Capacity,
    MaxPerMachine(u32),
    Displaced(String),
    Draining,
    /// The unit failed there lately (`RescheduleAvoid`).
    Avoided,
}

/// A live machine's place in the least-loaded order: (utilisation in per mille, unit count, id).
///
/// The id is shared with `Placement::capacity`: a key is made twice for every unit placed.
type LoadKey = (u64, usize, Arc<str>);

/// A map the pass looks up a million times and never walks in order: hashed with foldhash,
/// not SipHash (an ordered map of unit names compared long, alike names at every level).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Units on machines as the pass goes.
#[derive(Default)]
struct Placement {
    /// The units on each machine, in name order (conflicts and replacements walk them).
    on: FastMap<String, BTreeSet<UnitName>>,
    used: FastMap<String, Resources>,
    at: FastMap<UnitName, crate::cluster::MachineSet>,
    /// Capacity of each live machine, and its id as load keys hold it.
    capacity: FastMap<String, (Resources, Arc<str>)>,
    /// Live machines in least-loaded order, kept up to date by `add`/`remove` once `index` has
    /// built it, so placing a unit without machine-wide preferences costs O(log machines)
    /// instead of a scan of every machine.
    by_load: BTreeSet<LoadKey>,
    /// Whether `by_load` is built. Keeping 100,000 existing placements does without it: it is
    /// built once afterwards rather than updated on every one of those adds.
    indexed: bool,
}

impl Placement {
    fn new(machines: &BTreeMap<String, MachineRecord>) -> Self {
        let mut p = Placement::default();
        for m in machines.values() {
            p.capacity.insert(m.id.clone(), (m.capacity, m.id.as_str().into()));
        }
        p
    }

    /// Builds the least-loaded order; from here on `add`/`remove` keep it up to date.
    fn index(&mut self) {
        self.by_load = self.capacity.keys().filter_map(|m| self.load_key(m)).collect();
        self.indexed = true;
    }

    fn load_key(&self, machine: &str) -> Option<LoadKey> {
        let (cap, id) = self.capacity.get(machine)?;
        let used = self.used.get(machine).copied().unwrap_or_default();
        let frac = |used: u64, cap: u64| used.saturating_mul(1000).checked_div(cap).unwrap_or(0);
        Some((frac(used.memory, cap.memory).max(frac(used.cpu, cap.cpu)), self.count(machine), id.clone()))
    }

    fn reindex(&mut self, before: Option<LoadKey>, machine: &str) {
        if let Some(k) = before {
            self.by_load.remove(&k);
        }
        if let Some(k) = self.load_key(machine) {
            self.by_load.insert(k);
        }
    }

    fn add(&mut self, unit: &UnitName, machine: &str, reserve: Resources) {
        let before = if self.indexed { self.load_key(machine) } else { None };
        // Look up before inserting: `entry` would allocate an owned key for every call.
        match self.on.get_mut(machine) {
            Some(units) => {
                units.insert(unit.clone());
            }
            None => {
                self.on.insert(machine.to_string(), BTreeSet::from([unit.clone()]));
            }
        }
        self.reserve_on(machine, reserve);
        self.note_at(unit, machine);
        if self.indexed {
            self.reindex(before, machine);
        }
    }

    /// What `unit` reserves, counted against `machine` (`add` without the unit lists).
    fn reserve_on(&mut self, machine: &str, reserve: Resources) {
        if reserve != Resources::default() {
            let u = self.used.entry(machine.to_string()).or_default();
            u.memory += reserve.memory;
            u.cpu += reserve.cpu;
        }
    }

    /// That `unit` is on `machine`, in the map of where each unit is.
    fn note_at(&mut self, unit: &UnitName, machine: &str) {
        match self.at.get_mut(unit) {
            Some(machines) => {
                machines.insert(machine);
            }
            None => {
                self.at.insert(unit.clone(), crate::cluster::MachineSet::of(machine));
            }
        }
    }

    fn remove(&mut self, unit: &UnitName, machine: &str, reserve: Resources) {
        let before = if self.indexed { self.load_key(machine) } else { None };
        if let Some(s) = self.on.get_mut(machine) {
            s.remove(unit);
        }
        if let Some(u) = self.used.get_mut(machine) {
            u.memory = u.memory.saturating_sub(reserve.memory);
            u.cpu = u.cpu.saturating_sub(reserve.cpu);
        }
        if let Some(s) = self.at.get_mut(unit) {
            s.remove(machine);
            if s.is_empty() {
                self.at.remove(unit);
            }
        }
        if self.indexed {
            self.reindex(before, machine);
        }
    }

    /// A machine that joined: it takes units from now on.
    fn gain(&mut self, machine: &MachineRecord) {
        let before = self.load_key(&machine.id);
        self.capacity.insert(machine.id.clone(), (machine.capacity, machine.id.as_str().into()));
        if self.indexed {
            self.reindex(before, &machine.id);
        }
    }

    /// A machine that is gone: forgets it, and returns the units that were on it.
    fn lose(&mut self, machine: &str) -> Vec<UnitName> {
        if let Some(k) = self.load_key(machine) {
            self.by_load.remove(&k);
        }
        self.capacity.remove(machine);
        self.used.remove(machine);
        let units: Vec<UnitName> = self.on.remove(machine).map(|s| s.into_iter().collect()).unwrap_or_default();
        for u in &units {
            if let Some(s) = self.at.get_mut(u) {
                s.remove(machine);
                if s.is_empty() {
                    self.at.remove(u);
                }
            }
        }
        units
    }

    fn count(&self, machine: &str) -> usize {
        self.on.get(machine).map(|s| s.len()).unwrap_or(0)
    }
}

/// Instances of one template form a group (for `MaxPerMachine` and `SpreadBy`).
fn group(unit: &UnitName) -> String {
    unit.template().map(|t| t.to_string()).unwrap_or_else(|| unit.to_string())
}

fn short(machine: &str) -> &str {
    &machine[..machine.len().min(8)]
}

struct Pass<'a> {
    snap: &'a Snapshot<'a>,
    p: Placement,
    out: Outcome,
    /// Exclusive units waiting for a lost machine's fence, and that machine.
    fenced: BTreeMap<UnitName, String>,
    /// Exclusive units this pass takes off a live machine, and that machine: placed elsewhere
    /// only once its agent reports them stopped.
    leaving: BTreeMap<UnitName, String>,
    /// Units whose rules declare `Conflicts`, by name: only they can clash with a unit that
    /// declares none, so a pass need not pair up every unit on a machine.
    conflicting: Vec<UnitName>,
    /// Units that ask to be moved when they fail.
    rescheduling: Vec<&'a UnitName>,
    /// Machines a unit failed on lately, which it is not placed on (units with none are absent).
    avoid: HashMap<UnitName, BTreeSet<String>>,
}

/// Wanted units as a whole pass takes them: the snapshot's, in name order.
type Wanted<'a> = std::iter::Filter<
    std::collections::btree_map::Iter<'a, UnitName, UnitRecord>,
    fn(&(&'a UnitName, &'a UnitRecord)) -> bool,
>;

/// How much a machine is preferred: smaller is better (takeover, spread, utilisation, units).
type Preference = (bool, usize, u64, usize);

fn pending_contains(list: &[(UnitName, Option<String>)], unit: &UnitName) -> bool {
    list.iter().any(|(u, _)| u == unit)
}

fn describe_one(f: &Fail) -> String {
    match f {
        Fail::MachineId(id) => format!("MachineID={id} does not match"),
        Fail::Metadata(req) => format!("metadata {req} not matched"),
        Fail::Peer(p) => format!("MachineOf {p} is not there"),
        Fail::Conflict(u) => format!("conflicts with {u}"),
        Fail::Capacity => "not enough capacity".into(),
        Fail::MaxPerMachine(n) => format!("MaxPerMachine={n} reached"),
        Fail::Displaced(_) => "displaced from this machine".into(),
        Fail::Draining => "draining".into(),
        Fail::Avoided => "failed lately".into(),
    }
}

/// One line saying why no machine could take a unit, grouping machines by cause:
/// "no machine has metadata region=us-west", "conflicts with web@1 on m1, m2, m3".
fn explain(fails: &[(String, Fail)], machines: usize) -> String {
    if machines == 0 {
        return "no machines are available".into();
    }
    let mut by: BTreeMap<&Fail, Vec<&str>> = BTreeMap::new();
    // Conflicts read best as one list: "conflicts with a on m1, b on m2".
    let mut conflicts: Vec<String> = Vec::new();
    for (m, f) in fails {
        match f {
            Fail::Conflict(u) => conflicts.push(format!("{u} on {}", short(m))),
            _ => by.entry(f).or_default().push(short(m)),
        }
    }
    let parts: Vec<String> = by
        .iter()
        .map(|(f, ms)| {
            let all = ms.len() == machines;
            match f {
                Fail::MachineId(id) if all => format!("no machine has id {id}"),
                Fail::Metadata(req) if all => format!("no machine has metadata {req}"),
                Fail::Peer(p) if all => format!("MachineOf {p}: {p} is not scheduled"),
                other => format!("{} on {}", describe_one(other), ms.join(", ")),
            }
        })
        .collect();
    let mut parts = parts;
    if !conflicts.is_empty() {
        parts.insert(0, format!("conflicts with {}", conflicts.join(", ")));
    }
    if parts.is_empty() {
        "no eligible machine".into()
    } else {
        parts.join("; ")
    }
}

/// What a whole pass leaves for the next one, when the next one only has new units to place:
/// where every unit is once its decisions are written, and the units it could not place.
///
/// At a million units a whole pass takes seconds, most of them spent finding again what the last
/// pass found (every kept placement, the machines' loads). While nothing but new units arrived
/// since, and the leader's own writes came back as written, [`place_new`] places the new units
/// (and tries again the ones that had no machine) on this instead.
pub struct Carried {
    p: Placement,
    /// Units the pass wanted to run but did not place, templates and invalid ones included.
    unplaceable: BTreeSet<UnitName>,
    conflicting: Vec<UnitName>,
    /// Global units, by name: a machine that joins or goes changes where they run.
    globals: Vec<UnitName>,
}

impl std::fmt::Debug for Carried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Carried")
            .field("placed", &self.p.at.len())
            .field("unplaceable", &self.unplaceable.len())
            .finish()
    }
}

impl Carried {
    /// Whether a schedule entry written (`Some`) at, or deleted from, `unit` on `machine` is as
    /// the pass left it: what its own writes look like when they come back.
    pub fn agrees(
        &self,
        units: &BTreeMap<UnitName, UnitRecord>,
        unit: &UnitName,
        machine: &str,
        entry: Option<&ScheduleEntry>,
    ) -> bool {
        let placed = self.p.at.get(unit).is_some_and(|ms| ms.contains(machine));
        match entry {
            Some(e) => {
                placed && units.get(unit).is_some_and(|r| r.hash == e.hash && r.desired_state == e.desired_state)
            }
            None => !placed,
        }
    }
}

impl Carried {
    /// What a pass would carry on from were the schedule as it stands right: every entry on a
    /// live machine where it is, none of them checked. An engine that does not lead keeps this
    /// up to date ([`Carried::follow`]) so that, once elected, it places new units at once
    /// ([`unscheduled`]); its whole pass comes right after.
    pub fn following(snap: &Snapshot<'_>) -> Carried {
        let mut p = Placement::new(snap.machines);
        // Built in bulk rather than by `add`: an engine that does not lead takes this whole
        // again after changes it cannot follow (1.6 s by `add` at a million units). Units come
        // in name order, so each machine's list is sorted as it is built.
        let mut on: FastMap<&str, Vec<UnitName>> = FastMap::default();
        p.at.reserve(snap.schedule.len());
        for (unit, entries) in snap.schedule {
            let reserve = reserve_of(snap, unit);
            for (m, e) in entries {
                // (Placement's own capacity map holds the live machines, hashed.)
                if e.desired_state == DesiredState::Inactive || !p.capacity.contains_key(m.as_str()) {
                    continue;
                }
                on.entry(m.as_str()).or_default().push(unit.clone());
                p.reserve_on(m, reserve);
                p.note_at(unit, m);
            }
        }
        p.on = on.into_iter().map(|(m, units)| (m.to_string(), units.into_iter().collect())).collect();
        p.index();
        Carried {
            p,
            unplaceable: BTreeSet::new(),
            conflicting: units_whose(snap, |r| !r.conflicts.is_empty()),
            globals: units_whose(snap, |r| r.global),
        }
    }

    /// Takes note of units whose rules make them global or declare `Conflicts`.
    fn learn<'u>(&mut self, snap: &Snapshot<'_>, units: impl Iterator<Item = &'u UnitName>) {
        for u in units {
            let Some(Ok(r)) = snap.rules.get(u) else { continue };
            for (list, yes) in [(&mut self.globals, r.global), (&mut self.conflicting, !r.conflicts.is_empty())] {
                if let (true, Err(at)) = (yes, list.binary_search(u)) {
                    list.insert(at, u.clone());
                }
            }
        }
    }

    /// Follows the schedule as it changed (`changes`, shown by `snap`), as [`Carried::following`]
    /// would find it.
    pub fn follow(&mut self, snap: &Snapshot<'_>, changes: &PlanChanges) {
        for m in &changes.machines_lost {
            self.p.lose(m);
        }
        for m in &changes.machines_new {
            if let Some(rec) = snap.machines.get(m) {
                self.p.gain(rec);
            }
        }
        for (unit, m, entry) in &changes.scheduled {
            let here = self.p.at.get(unit).is_some_and(|s| s.contains(m));
            let runs_here = entry.as_ref().is_some_and(|e| e.desired_state != DesiredState::Inactive)
                && snap.machines.contains_key(m.as_str());
            match (here, runs_here) {
                (false, true) => self.p.add(unit, m, reserve_of(snap, unit)),
                (true, false) => self.p.remove(unit, m, reserve_of(snap, unit)),
                _ => {}
            }
        }
        self.learn(snap, changes.new_units.iter());
    }
}

/// What `unit` reserves on its machine (nothing while its rules are not read).
fn reserve_of(snap: &Snapshot<'_>, unit: &UnitName) -> Resources {
    match snap.rules.get(unit) {
        Some(Ok(r)) => r.reserve,
        _ => Resources::default(),
    }
}

/// The units whose rules `keep`, by name.
fn units_whose(snap: &Snapshot<'_>, keep: fn(&Rules) -> bool) -> Vec<UnitName> {
    let mut v: Vec<UnitName> =
        snap.rules.iter().filter(|(_, r)| r.as_ref().is_ok_and(|r| keep(r))).map(|(u, _)| u.clone()).collect();
    v.sort();
    v
}

/// Units the user wants to run that have no schedule entry anywhere: what a new leader places
/// before its first whole pass (a unit with an entry, even on a lost machine, waits for it).
pub fn unscheduled(snap: &Snapshot<'_>) -> Vec<UnitName> {
    // Both maps are in name order: one walk, no lookup per unit.
    let mut entries = snap.schedule.keys().peekable();
    let mut out = Vec::new();
    for (unit, rec) in snap.units {
        while entries.next_if(|e| *e < unit).is_some() {}
        let has_entry = entries.peek().is_some_and(|e| *e == unit);
        if !has_entry && rec.desired_state != DesiredState::Inactive {
            out.push(unit.clone());
        }
    }
    out
}

/// A whole pass: every placement checked, every unit without a machine placed.
pub fn schedule(snap: &Snapshot<'_>) -> Outcome {
    schedule_carrying(snap).0
}

/// A whole pass, and what it leaves for a next pass that only places new units: `None` when it
/// leaves work that depends on more than new units (exclusive units waiting to stop or for a
/// fence, move requests, failing units' records, a pass due at a later time).
pub fn schedule_carrying(snap: &Snapshot<'_>) -> (Outcome, Option<Carried>) {
    let conflicting = units_whose(snap, |r| !r.conflicts.is_empty());
    let globals = units_whose(snap, |r| r.global);
    let rescheduling: Vec<&UnitName> =
        snap.rules.iter().filter(|(_, r)| r.as_ref().is_ok_and(|r| r.reschedule.is_on())).map(|(u, _)| u).collect();
    let mut pass = Pass {
        snap,
        p: Placement::new(snap.machines),
        out: Outcome::default(),
        fenced: BTreeMap::new(),
        leaving: BTreeMap::new(),
        conflicting,
        rescheduling,
        avoid: HashMap::new(),
    };
    pass.learn_avoided();
    pass.keep_existing();
    pass.p.index();
    // Kept placements whose desired state or hash changed are rewritten in place.
    let mut rewrite = Vec::new();
    for (unit, entries) in snap.schedule {
        let (Some(rec), Some(kept_on)) = (snap.units.get(unit), pass.p.at.get(unit)) else { continue };
        for (machine, current) in entries {
            if kept_on.contains(machine) && (current.hash != rec.hash || current.desired_state != rec.desired_state) {
                rewrite.push((unit, machine));
            }
        }
    }
    for (unit, machine) in rewrite {
        pass.put(unit, machine);
    }
    pass.place_globals(pass.wanted());
    pass.do_moves();
    pass.reschedule_failed();
    pass.place_others(pass.wanted());
    pass.explain_displaced();
    pass.finish(globals)
}

/// Takes in what changed since the pass `carried` comes from, when that is only units created,
/// machines joined and machines lost (`changes`): units on lost machines are taken off them, and
/// they, the new units, the units that had no machine and, when machines changed, the global
/// units are placed on what that pass left. The result is the whole pass's
/// (`tests::placing_new_units_on_what_a_pass_left_is_a_whole_pass`) provided nothing else that a
/// placement depends on changed, and the last pass's decisions were all written: the leader
/// checks both (`leader::pass`).
pub fn place_new(snap: &Snapshot<'_>, mut carried: Carried, changes: &PlanChanges) -> (Outcome, Option<Carried>) {
    // Units whose rules arrived since (with them or after them) may be global or conflict.
    let unplaceable = std::mem::take(&mut carried.unplaceable);
    carried.learn(snap, changes.new_units.iter().chain(&unplaceable));
    let Carried { mut p, conflicting, globals, .. } = carried;
    let mut lost: Vec<&String> = changes.machines_lost.iter().collect();
    lost.sort();
    lost.dedup();
    let mut taken_off: Vec<(UnitName, String)> = Vec::new();
    for m in lost {
        taken_off.extend(p.lose(m).into_iter().map(|u| (u, m.clone())));
    }
    // As a whole pass takes entries: by unit, then machine.
    taken_off.sort();
    for m in &changes.machines_new {
        if let Some(rec) = snap.machines.get(m) {
            p.gain(rec);
        }
    }
    let machines_changed = !changes.machines_new.is_empty() || !taken_off.is_empty();
    // Candidates as the snapshot holds them, in name order as a whole pass takes them.
    let mut candidates: Vec<(&UnitName, &UnitRecord)> = changes
        .new_units
        .iter()
        .chain(&unplaceable)
        .chain(taken_off.iter().map(|(u, _)| u))
        .chain(globals.iter().filter(|_| machines_changed))
        .filter_map(|u| snap.units.get_key_value(u))
        .filter(|(_, r)| r.desired_state != DesiredState::Inactive)
        .collect();
    candidates.sort_by(|a, b| a.0.cmp(b.0));
    candidates.dedup_by(|a, b| a.0 == b.0);
    let mut pass = Pass {
        snap,
        p,
        out: Outcome::default(),
        fenced: BTreeMap::new(),
        leaving: BTreeMap::new(),
        conflicting,
        rescheduling: Vec::new(),
        avoid: HashMap::new(),
    };
    // Machines units failed on lately (a new leader's first pass may place a unit whose move the
    // last leader recorded but did not write).
    pass.learn_avoided();
    for (unit, machine) in taken_off {
        // An exclusive unit may still run on a machine lost lately: it waits for the fence.
        if pass.exclusive(&unit) && snap.fencing.contains(&machine) {
            pass.fenced.insert(unit, machine);
        } else {
            pass.remove(unit, machine, Reason::MachineLost);
        }
    }
    pass.place_globals(candidates.iter().copied());
    pass.place_others(candidates.iter().copied());
    pass.explain_displaced();
    pass.finish(globals)
}

impl<'a> Pass<'a> {
    /// A displaced unit that found no new machine is not "unplaceable" silently: say who took it.
    fn explain_displaced(&mut self) {
        let displaced: Vec<(UnitName, UnitName)> = self
            .out
            .decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Remove { unit, reason: Reason::Displaced(by), .. } => Some((unit.clone(), by.clone())),
                _ => None,
            })
            .collect();
        for (unit, by) in displaced {
            if let Some(why) = self.out.unplaceable.get_mut(&unit) {
                *why = format!("displaced by {by}; {why}");
            }
        }
    }

    /// The outcome, and what a pass placing only new units can carry on from (see [`Carried`]).
    fn finish(self, globals: Vec<UnitName>) -> (Outcome, Option<Carried>) {
        let snap = self.snap;
        // A unit displaced by a `Replaces` frees room after the global units were placed, and
        // one of them may now fit where it did not: only a whole pass looks at them again.
        // (Other removals come before global units are placed.)
        let simple = self.fenced.is_empty()
            && !self.out.decisions.iter().any(|d| matches!(d, Decision::Remove { reason: Reason::Displaced(_), .. }))
            && self.leaving.is_empty()
            && self.out.wake_at.is_none()
            && self.out.moves.is_empty()
            && self.out.reschedules.is_empty()
            && snap.moves.is_empty()
            && snap.reschedules.is_empty();
        let carried = simple.then(|| Carried {
            unplaceable: self.out.unplaceable.keys().cloned().collect(),
            p: self.p,
            conflicting: self.conflicting,
            globals,
        });
        (self.out, carried)
    }
}
