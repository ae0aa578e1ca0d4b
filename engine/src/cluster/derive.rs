//! How events are derived: each change the view's watch delivers, compared with the view just
//! before it (see crate::events for what is kept and served).

use super::{ClusterView, Seen};
use crate::events::Happened;
use fleet_api::EventKind;
use fleet_model::reschedule::RescheduleRecord;
use fleet_model::rollout::RolloutRecord;
use fleet_model::rules::Rules;
use fleet_model::schema::{decode, is_stopped, Key};
use fleet_model::Keys;
use fleet_model::{MachineRecord, UnitName, UnitRecord, UnitStateRecord};
use fleet_store::etcd::Change;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What the events need to remember that the view does not keep: election candidates and
/// reboot slot holders.
#[derive(Debug, Default)]
pub struct Deriver {
    /// Election key -> (revision it was created at, engine id). The oldest key leads.
    candidates: BTreeMap<String, (i64, String)>,
    leader: Option<String>,
    /// FleetLock group -> machines holding a slot.
    slots: BTreeMap<String, BTreeSet<String>>,
    /// Units taken off a machine they must leave (lost, drained, moved on request) and not
    /// placed again yet: the leader may place them in a later transaction, which is then told
    /// as the move it is. Bounded by the number of units.
    leaving: HashMap<UnitName, (String, String)>,
    /// Events of the revision being derived (a transaction's changes come in the order of its
    /// operations: a move may delete the old entry before it writes the new one).
    pending: Vec<(i64, Happened)>,
    scratch: Vec<Happened>,
    /// Pages of a listing came and its snapshot has not yet.
    listing: bool,
}

#[derive(serde::Deserialize, Default)]
struct Semaphore {
    #[serde(default)]
    holders: Vec<String>,
}

impl Deriver {
    /// Starts over from a whole listing: remembers leader and slots, reports nothing. After
    /// pages ([`Deriver::page`]), `puts` is the listing's end.
    pub fn snapshot(&mut self, keys: &Keys, puts: &[Change]) {
        if !std::mem::take(&mut self.listing) {
            self.forget();
        }
        self.take_in(keys, puts);
        self.leader = self.current_leader();
    }

    /// A page of a listing under way (the first starts it over).
    pub fn page(&mut self, keys: &Keys, puts: &[Change], first: bool) {
        if first || !self.listing {
            self.forget();
        }
        self.listing = true;
        self.take_in(keys, puts);
    }

    fn forget(&mut self) {
        self.candidates.clear();
        self.slots.clear();
        self.pending.clear();
        self.leaving.clear();
    }

    fn take_in(&mut self, keys: &Keys, puts: &[Change]) {
        for c in puts {
            if let Change::Put { key, value, mod_revision, .. } = c {
                match keys.decode(key) {
                    Some(Key::Leader(k)) => {
                        self.candidates.insert(k, (*mod_revision, String::from_utf8_lossy(value).into_owned()));
                    }
                    Some(Key::RebootLock(g)) => {
                        let sem: Semaphore = decode(value).unwrap_or_default();
                        self.slots.insert(g, sem.holders.into_iter().collect());
                    }
                    _ => {}
                }
            }
        }
    }

    fn current_leader(&self) -> Option<String> {
        self.candidates.values().min_by_key(|(rev, _)| *rev).map(|(_, id)| id.clone())
    }

    /// Derives what the view's apply shows: each change in order, then [`Deriver::finish`] once
    /// per batch.
    pub fn seen(&mut self, view: &ClusterView, seen: Seen<'_>) {
        match seen {
            Seen::Change(key, change) => self.change(view, key, change),
            Seen::Unit { name, record, revision } => self.unit(view, name, record, revision),
            Seen::State { machine, unit, record, revision } => self.state(view, machine, unit, record, revision),
            Seen::Scheduled { machine, unit, revision, was_there, elsewhere } => {
                self.scheduled(view, machine, unit, revision, was_there, elsewhere)
            }
        }
    }

    /// A schedule entry written for `unit` on `m` (the view is the one just after: a schedule
    /// write changes nothing else read here). This runs for every placement: no lookup of the
    /// unit's entries (the write found them) and one of its rules.
    fn scheduled(
        &mut self,
        view: &ClusterView,
        m: &str,
        unit: &UnitName,
        revision: i64,
        was_there: bool,
        elsewhere: Option<&str>,
    ) {
        if was_there {
            // A changed entry (a new desired state, or an exclusive unit told to stop where it
            // is leaving): the unit's own states say what systemd does.
            return;
        }
        let rules = view.rules.get(unit);
        let global = matches!(rules, Some(Ok(r)) if r.global);
        let from = elsewhere.filter(|_| !global);
        // Usually nothing is leaving: no hashing then.
        let left = if self.leaving.is_empty() { None } else { self.leaving.remove(unit) };
        let left = left.filter(|(from, _)| from != m && !global);
        let h = match (from, left) {
            (Some(from), _) => moved(view, unit, from, m),
            (None, Some((from, why))) => {
                let mut h = Happened::new(EventKind::UnitMoved).unit(unit).machine(m).reason(why);
                h.from = from;
                h
            }
            (None, None) => Happened::new(EventKind::UnitScheduled).unit(unit).machine(m).reason(why_there(rules)),
        };
        self.pending.push((revision, h));
    }

    /// A unit's record written, decoded once by the view (the view is the one just before).
    fn unit(&mut self, before: &ClusterView, name: &UnitName, rec: &UnitRecord, revision: i64) {
        match before.units.get(name) {
            None => self.pending.push((
                revision,
                Happened::new(EventKind::UnitSubmitted).unit(name).state(rec.desired_state.to_string()),
            )),
            Some(old) => {
                if old.hash != rec.hash {
                    self.pending.push((revision, Happened::new(EventKind::UnitReplaced).unit(name)));
                }
                if old.desired_state != rec.desired_state {
                    self.pending.push((
                        revision,
                        Happened::new(EventKind::UnitDesiredState).unit(name).state(rec.desired_state.to_string()),
                    ));
                }
            }
        }
    }

    /// A unit's state on `m` written, decoded once by the view (the view is the one just before).
    fn state(&mut self, before: &ClusterView, m: &str, unit: &UnitName, state: &UnitStateRecord, revision: i64) {
        let before_here = before.states.get(unit).and_then(|s| s.get(m));
        let prev = before_here.map(|s| s.active_state.as_str());
        if prev != Some(state.active_state.as_str()) {
            let kind = match state.active_state.as_str() {
                "active" => Some(EventKind::UnitStarted),
                "failed" => Some(EventKind::UnitFailed),
                s if is_stopped(s) && prev.is_some_and(|p| !is_stopped(p)) => Some(EventKind::UnitStopped),
                _ => None,
            };
            if let Some(kind) = kind {
                let h = Happened::new(kind).unit(unit).machine(m).state(state.sub_state.clone());
                self.pending.push((revision, h));
            }
        }
        // Health is told when it changes to a value (a unit that stops loses it silently: its
        // stop says so).
        if let Some(h) = state.health.filter(|h| before_here.and_then(|s| s.health) != Some(*h)) {
            let h = Happened::new(EventKind::UnitHealth).unit(unit).machine(m).state(h.as_str());
            self.pending.push((revision, h));
        }
    }

    /// Derives what `change` (whose key decodes to `key`) means, given the view as it was just
    /// before it.
    fn change(&mut self, before: &ClusterView, key: Option<&Key>, change: &Change) {
        let (value, revision) = match change {
            Change::Put { value, mod_revision, .. } => (Some(value.as_slice()), *mod_revision),
            Change::Delete { mod_revision, .. } => (None, *mod_revision),
        };
        let Some(decoded) = key else { return };
        // A buffer kept between changes (one allocation less per change); an early return
        // below only loses the (empty) buffer.
        let mut out = std::mem::take(&mut self.scratch);
        match (decoded, value) {
            // A readable record comes as `Seen::Unit` (see `Deriver::unit`); an unreadable one
            // tells nothing.
            (Key::Unit(_), Some(_)) => {}
            (Key::Unit(name), None) if before.units.contains_key(name) => {
                self.leaving.remove(name);
                out.push(Happened::new(EventKind::UnitDestroyed).unit(name));
            }
            // Placements come as `Seen::Scheduled` (see `Deriver::scheduled`).
            (Key::Schedule(_, _), Some(_)) => {}
            (Key::Schedule(m, unit), None) => {
                let Some(entries) = before.schedule.get(unit) else { return };
                if !entries.contains_key(m) {
                    return;
                }
                let global = matches!(before.rules.get(unit), Some(Ok(r)) if r.global);
                if !global && entries.len() > 1 {
                    // The old entry of a unit that already moved on.
                    return;
                }
                let why = left(before, unit, m);
                if !global && must_leave(before, unit, m) {
                    self.leaving.insert(unit.clone(), (m.clone(), why.clone()));
                }
                out.push(Happened::new(EventKind::UnitUnscheduled).unit(unit).machine(m).reason(why));
            }
            // A readable state comes as `Seen::State` (see `Deriver::state`).
            (Key::State(..), Some(_)) => {}
            // An agent removes a unit's state once systemd stopped it on a machine it was taken
            // off (a lost machine's states go with its lease: not a stop, see `finish`).
            (Key::State(m, unit), None) => {
                let prev = before.states.get(unit).and_then(|s| s.get(m));
                if prev.is_some_and(|p| !is_stopped(&p.active_state)) {
                    out.push(Happened::new(EventKind::UnitStopped).unit(unit).machine(m));
                }
            }
            (Key::Rollout(service), Some(v)) => {
                let Ok(rec) = decode::<RolloutRecord>(v) else { return };
                let old = before.rollouts.get(service);
                if old.is_none_or(|o| o.note != rec.note || o.phase != rec.phase) {
                    out.push(
                        Happened::new(EventKind::Rollout).unit(service).state(rec.phase.as_str()).reason(rec.note),
                    );
                }
            }
            (Key::Reschedule(unit), Some(v)) => {
                let Ok(rec) = decode::<RescheduleRecord>(v) else { return };
                let note_before = before.reschedules.get(unit).map(|r| r.note.as_str());
                if !rec.note.is_empty() && note_before != Some(rec.note.as_str()) {
                    out.push(Happened::new(EventKind::UnitReschedule).unit(unit).reason(rec.note));
                }
            }
            (Key::Why(unit), Some(v)) => {
                let reason = String::from_utf8_lossy(v);
                if before.why.get(unit).map(String::as_str) != Some(&*reason) {
                    out.push(Happened::new(EventKind::UnitUnplaceable).unit(unit).reason(reason.into_owned()));
                }
            }
            (Key::Machine(m), Some(v)) if !before.published_machines.contains_key(m) => {
                let rec: MachineRecord = decode(v).unwrap_or_default();
                out.push(Happened::new(EventKind::MachineJoined).machine(m).reason(rec.public_ip));
                // What its agent stopped while it could not tell anyone.
                for unit in rec.stopped_while_cut_off.iter().filter_map(|u| UnitName::parse(u).ok()) {
                    out.push(
                        Happened::new(EventKind::UnitStopped)
                            .unit(&unit)
                            .machine(m)
                            .reason("stopped by its machine's agent while the machine was cut off from etcd"),
                    );
                }
            }
            (Key::Machine(m), None) if before.published_machines.contains_key(m) => {
                out.push(Happened::new(EventKind::MachineLost).machine(m));
            }
            (Key::Drain(m), Some(_)) if !before.drained.contains(m) => {
                out.push(Happened::new(EventKind::MachineDrained).machine(m));
            }
            (Key::Drain(m), None) if before.drained.contains(m) => {
                out.push(Happened::new(EventKind::MachineUndrained).machine(m));
            }
            (Key::Leader(k), v) => {
                match v {
                    Some(v) => {
                        let id = String::from_utf8_lossy(v).into_owned();
                        self.candidates.entry(k.clone()).and_modify(|c| c.1 = id.clone()).or_insert((revision, id));
                    }
                    None => {
                        self.candidates.remove(k);
                    }
                }
                let now = self.current_leader();
                if now != self.leader {
                    if let Some(id) = &now {
                        out.push(Happened::new(EventKind::LeaderChanged).reason(id.clone()));
                    }
                    self.leader = now;
                }
            }
            (Key::RebootLock(group), v) => {
                let holders: BTreeSet<String> =
                    v.and_then(|v| decode::<Semaphore>(v).ok()).unwrap_or_default().holders.into_iter().collect();
                let old = self.slots.remove(group).unwrap_or_default();
                for m in holders.difference(&old) {
                    out.push(Happened::new(EventKind::RebootSlotTaken).machine(m).reason(group.clone()));
                }
                for m in old.difference(&holders) {
                    out.push(Happened::new(EventKind::RebootSlotReleased).machine(m).reason(group.clone()));
                }
                if !holders.is_empty() {
                    self.slots.insert(group.clone(), holders);
                }
            }
            _ => {}
        }
        self.pending.extend(out.drain(..).map(|h| (revision, h)));
        self.scratch = out;
    }

    /// The batch's events in order, with a move whose old entry went first (in the same
    /// revision) told as one move rather than an unscheduling and a new placement.
    pub fn finish(&mut self) -> Vec<(i64, Happened)> {
        let mut events = std::mem::take(&mut self.pending);
        // States that went with a machine's lease say nothing about its units' processes.
        let lost: BTreeSet<(i64, String)> = events
            .iter()
            .filter(|(_, h)| h.kind == EventKind::MachineLost)
            .map(|(r, h)| (*r, h.machine.clone()))
            .collect();
        if !lost.is_empty() {
            events.retain(|(r, h)| {
                !(h.kind == EventKind::UnitStopped && h.state.is_empty() && lost.contains(&(*r, h.machine.clone())))
            });
        }
        let mut i = 0;
        while i < events.len() {
            let (rev, h) = &events[i];
            if h.kind == EventKind::UnitUnscheduled {
                let (rev, unit, machine) = (*rev, h.unit.clone(), h.machine.clone());
                let placed = events.iter().skip(i + 1).position(|(r, o)| {
                    *r == rev
                        && o.unit == unit
                        && (o.kind == EventKind::UnitScheduled || (o.kind == EventKind::UnitMoved && o.from == machine))
                });
                if let Some(j) = placed.map(|p| p + i + 1) {
                    let (_, gone) = events.remove(i);
                    let placed = &mut events[j - 1].1;
                    placed.kind = EventKind::UnitMoved;
                    placed.from = gone.machine;
                    placed.reason = gone.reason;
                    continue;
                }
            }
            i += 1;
        }
        events
    }
}

/// A unit that had an entry on `from` placed on `to`.
fn moved(before: &ClusterView, unit: &UnitName, from: &str, to: &str) -> Happened {
    let mut h = Happened::new(EventKind::UnitMoved).unit(unit).machine(to).reason(left(before, unit, from));
    h.from = from.to_string();
    h
}

/// Whether a unit taken off `m` is to run elsewhere: its machine went away or must be left,
/// and the unit still wants to run.
fn must_leave(before: &ClusterView, unit: &UnitName, m: &str) -> bool {
    let wants = before.units.get(unit).is_some_and(|u| u.desired_state != fleet_model::DesiredState::Inactive);
    wants
        && (!before.published_machines.contains_key(m)
            || before.drained.contains(m)
            || before.moves.contains_key(unit)
            || before.reschedules.get(unit).and_then(|r| r.moves.last()).is_some_and(|mv| mv.from == m))
}

/// Why a unit's entry on machine `m` goes away (or it moves off `m`), as the view just before
/// tells.
fn left(before: &ClusterView, unit: &UnitName, m: &str) -> String {
    let desired = before.units.get(unit).map(|u| u.desired_state);
    if desired.is_none() {
        "the unit was destroyed".into()
    } else if !before.published_machines.contains_key(m) {
        format!("machine {m} was lost")
    } else if before.drained.contains(m) {
        format!("machine {m} is being drained")
    } else if before.moves.contains_key(unit) {
        "moved on request".into()
    } else if before.reschedules.get(unit).and_then(|r| r.moves.last()).is_some_and(|mv| mv.from == m) {
        // The leader records a move for failing before it takes the unit off (see scheduler).
        format!("it failed on machine {m} (RescheduleAttempts)")
    } else if desired == Some(fleet_model::DesiredState::Inactive) {
        "the unit was unloaded".into()
    } else {
        format!("its rules no longer allow machine {m}")
    }
}

/// Why the scheduler chose a machine, as far as the unit's rules tell (fixed words when they
/// suffice: this runs for every placement).
fn why_there(rules: Option<&Result<std::sync::Arc<Rules>, String>>) -> Cow<'static, str> {
    let Some(Ok(r)) = rules else { return "least loaded machine".into() };
    if r.global {
        return "global unit: runs on every eligible machine".into();
    }
    if r.machine_id.is_some() {
        return "MachineID names this machine".into();
    }
    if !r.machine_of.is_empty() {
        return format!("MachineOf={}", r.machine_of.join(" ")).into();
    }
    if r.metadata.is_empty() && r.conflicts.is_empty() && r.spread_by.is_none() {
        return "least loaded eligible machine".into();
    }
    let mut why = Vec::new();
    if !r.metadata.is_empty() {
        let keys: Vec<&str> = r.metadata.iter().map(|m| m.key()).collect();
        why.push(format!("matches MachineMetadata ({})", keys.join(", ")));
    }
    if !r.conflicts.is_empty() {
        why.push("no conflicting unit there".to_string());
    }
    if let Some(key) = &r.spread_by {
        why.push(format!("spread by {key}"));
    }
    why.push("least loaded eligible machine".into());
    why.join("; ").into()
}

#[cfg(test)]
mod tests;
