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

mod eligibility;
mod placing;
mod rescheduling;
#[cfg(test)]
mod tests;

use fleet_model::reschedule::RescheduleRecord;
use fleet_model::rules::{Resources, Rules};
use fleet_model::schema::MoveRequest;
use fleet_model::{DesiredState, MachineRecord, ScheduleEntry, UnitName, UnitRecord, UnitStateRecord};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound::{Excluded, Unbounded};

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
type LoadKey = (u64, usize, String);

/// Units on machines as the pass goes.
#[derive(Default)]
struct Placement {
    on: BTreeMap<String, BTreeSet<UnitName>>,
    used: HashMap<String, Resources>,
    at: BTreeMap<UnitName, crate::cluster::MachineSet>,
    /// Capacity of each live machine.
    capacity: HashMap<String, Resources>,
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
            p.capacity.insert(m.id.clone(), m.capacity);
        }
        p
    }

    /// Builds the least-loaded order; from here on `add`/`remove` keep it up to date.
    fn index(&mut self) {
        self.by_load = self.capacity.keys().filter_map(|m| self.load_key(m)).collect();
        self.indexed = true;
    }

    fn load_key(&self, machine: &str) -> Option<LoadKey> {
        let cap = self.capacity.get(machine)?;
        let used = self.used.get(machine).copied().unwrap_or_default();
        let frac = |used: u64, cap: u64| used.saturating_mul(1000).checked_div(cap).unwrap_or(0);
        Some((frac(used.memory, cap.memory).max(frac(used.cpu, cap.cpu)), self.count(machine), machine.to_string()))
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
        if reserve != Resources::default() {
            let u = self.used.entry(machine.to_string()).or_default();
            u.memory += reserve.memory;
            u.cpu += reserve.cpu;
        }
        match self.at.get_mut(unit) {
            Some(machines) => {
                machines.insert(machine);
            }
            None => {
                self.at.insert(unit.clone(), crate::cluster::MachineSet::of(machine));
            }
        }
        if self.indexed {
            self.reindex(before, machine);
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
    conflicting: Vec<&'a UnitName>,
    /// Units that ask to be moved when they fail.
    rescheduling: Vec<&'a UnitName>,
    /// Machines a unit failed on lately, which it is not placed on (units with none are absent).
    avoid: HashMap<UnitName, BTreeSet<String>>,
}

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

pub fn schedule(snap: &Snapshot<'_>) -> Outcome {
    let mut conflicting: Vec<&UnitName> =
        snap.rules.iter().filter(|(_, r)| r.as_ref().is_ok_and(|r| !r.conflicts.is_empty())).map(|(u, _)| u).collect();
    conflicting.sort();
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
    pass.place_globals();
    pass.do_moves();
    pass.reschedule_failed();
    pass.place_others();
    // A displaced unit that found no new machine is not "unplaceable" silently: say who took it.
    let displaced: Vec<(UnitName, UnitName)> = pass
        .out
        .decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Remove { unit, reason: Reason::Displaced(by), .. } => Some((unit.clone(), by.clone())),
            _ => None,
        })
        .collect();
    for (unit, by) in displaced {
        if let Some(why) = pass.out.unplaceable.get_mut(&unit) {
            *why = format!("displaced by {by}; {why}");
        }
    }
    pass.out
}
