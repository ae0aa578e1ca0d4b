//! The cluster's events: what happened, derived from the changes the view's watch delivers.
//!
//! No event is ever written to etcd: each engine derives the same events from the same
//! revisions (comparing each change with its view just before it), so the hot path pays no
//! extra write and an event's id (`<revision>.<n>`) means the same on every replica. Each engine
//! keeps the last `event_history` events in memory for `GET /fleet/v1/events` and for streams
//! resuming after a reconnect; older ones are gone, and a client resuming from before them is
//! told so by a `gap` event.
//!
//! Depends on the view's types and the wire types only (no HTTP, no etcd).

use crate::cluster::ClusterView;
use fleet_api::{Event, EventId, EventKind};
use fleet_model::rules::Rules;
use fleet_model::schema::is_stopped;
use fleet_model::schema::{decode, Key};
use fleet_model::{Keys, MachineRecord, ScheduleEntry, UnitName, UnitRecord, UnitStateRecord};
use fleet_store::etcd::Change;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use tokio::sync::watch;

/// Events kept by default.
pub const DEFAULT_HISTORY: usize = 10_000;

/// An event before it gets its id and time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Happened {
    pub kind: EventKind,
    pub unit: String,
    pub machine: String,
    pub from: String,
    pub state: String,
    pub reason: String,
}

impl Happened {
    fn new(kind: EventKind) -> Self {
        Happened {
            kind,
            unit: String::new(),
            machine: String::new(),
            from: String::new(),
            state: String::new(),
            reason: String::new(),
        }
    }
    fn unit(mut self, u: &UnitName) -> Self {
        self.unit = u.to_string();
        self
    }
    fn machine(mut self, m: &str) -> Self {
        self.machine = m.to_string();
        self
    }
    fn state(mut self, s: impl Into<String>) -> Self {
        self.state = s.into();
        self
    }
    fn reason(mut self, r: impl Into<String>) -> Self {
        self.reason = r.into();
        self
    }
}

/// What the events need to remember that the view does not keep: election candidates and
/// reboot slot holders.
#[derive(Debug, Default)]
pub struct Deriver {
    /// Election key -> (revision it was created at, engine id). The oldest key leads.
    candidates: BTreeMap<String, (i64, String)>,
    leader: Option<String>,
    /// FleetLock group -> machines holding a slot.
    slots: BTreeMap<String, BTreeSet<String>>,
    /// Events of the revision being derived (a transaction's changes come in the order of its
    /// operations: a move may delete the old entry before it writes the new one).
    pending: Vec<(i64, Happened)>,
}

#[derive(serde::Deserialize, Default)]
struct Semaphore {
    #[serde(default)]
    holders: Vec<String>,
}

impl Deriver {
    /// Starts over from a whole listing: remembers leader and slots, reports nothing.
    pub fn snapshot(&mut self, keys: &Keys, puts: &[Change]) {
        self.candidates.clear();
        self.slots.clear();
        self.pending.clear();
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
        self.leader = self.current_leader();
    }

    fn current_leader(&self) -> Option<String> {
        self.candidates.values().min_by_key(|(rev, _)| *rev).map(|(_, id)| id.clone())
    }

    /// Derives what `change` (whose key decodes to `key`) means, given the view as it was just
    /// before it. Called for each change in order, then [`Deriver::finish`] once per batch.
    pub fn change(&mut self, before: &ClusterView, key: Option<&Key>, change: &Change) {
        let (value, revision) = match change {
            Change::Put { value, mod_revision, .. } => (Some(value.as_slice()), *mod_revision),
            Change::Delete { mod_revision, .. } => (None, *mod_revision),
        };
        let Some(decoded) = key else { return };
        let mut out = Vec::new();
        match (decoded, value) {
            (Key::Unit(name), Some(v)) => {
                let Ok(rec) = decode::<UnitRecord>(v) else { return };
                match before.units.get(name) {
                    None => out
                        .push(Happened::new(EventKind::UnitSubmitted).unit(name).state(rec.desired_state.to_string())),
                    Some(old) => {
                        if old.hash != rec.hash {
                            out.push(Happened::new(EventKind::UnitReplaced).unit(name));
                        }
                        if old.desired_state != rec.desired_state {
                            out.push(
                                Happened::new(EventKind::UnitDesiredState)
                                    .unit(name)
                                    .state(rec.desired_state.to_string()),
                            );
                        }
                    }
                }
            }
            (Key::Unit(name), None) if before.units.contains_key(name) => {
                out.push(Happened::new(EventKind::UnitDestroyed).unit(name));
            }
            (Key::Schedule(m, unit), Some(v)) => {
                let Ok(_entry) = decode::<ScheduleEntry>(v) else { return };
                let entries = before.schedule.get(unit);
                if entries.is_some_and(|e| e.contains_key(m)) {
                    // A changed entry (a new desired state, or an exclusive unit told to stop
                    // where it is leaving): the unit's own states say what systemd does.
                    return;
                }
                let global = matches!(before.rules.get(unit), Some(Ok(r)) if r.global);
                let from = entries.and_then(|e| e.keys().find(|other| *other != m)).filter(|_| !global);
                out.push(match from {
                    Some(from) => moved(before, unit, from, m),
                    None => Happened::new(EventKind::UnitScheduled)
                        .unit(unit)
                        .machine(m)
                        .reason(why_there(before.rules.get(unit))),
                });
            }
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
                out.push(Happened::new(EventKind::UnitUnscheduled).unit(unit).machine(m).reason(left(before, unit, m)));
            }
            (Key::State(m, unit), Some(v)) => {
                let Ok(state) = decode::<UnitStateRecord>(v) else { return };
                let prev = before.states.get(unit).and_then(|s| s.get(m)).map(|s| s.active_state.as_str());
                if prev == Some(state.active_state.as_str()) {
                    return;
                }
                let kind = match state.active_state.as_str() {
                    "active" => EventKind::UnitStarted,
                    "failed" => EventKind::UnitFailed,
                    s if is_stopped(s) && prev.is_some_and(|p| !is_stopped(p)) => EventKind::UnitStopped,
                    _ => return,
                };
                out.push(Happened::new(kind).unit(unit).machine(m).state(state.sub_state));
            }
            // An agent removes a unit's state once systemd stopped it on a machine it was taken
            // off (a lost machine's states go with its lease: not a stop, see `finish`).
            (Key::State(m, unit), None) => {
                let prev = before.states.get(unit).and_then(|s| s.get(m));
                if prev.is_some_and(|p| !is_stopped(&p.active_state)) {
                    out.push(Happened::new(EventKind::UnitStopped).unit(unit).machine(m));
                }
            }
            (Key::Why(unit), Some(v)) => {
                let reason = String::from_utf8_lossy(v);
                if before.why.get(unit).map(String::as_str) != Some(&*reason) {
                    out.push(Happened::new(EventKind::UnitUnplaceable).unit(unit).reason(reason));
                }
            }
            (Key::Machine(m), Some(v)) if !before.published_machines.contains_key(m) => {
                let rec: MachineRecord = decode(v).unwrap_or_default();
                out.push(Happened::new(EventKind::MachineJoined).machine(m).reason(rec.public_ip));
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
        self.pending.extend(out.into_iter().map(|h| (revision, h)));
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
                let (rev, unit) = (*rev, h.unit.clone());
                let placed = events
                    .iter()
                    .skip(i + 1)
                    .position(|(r, o)| *r == rev && o.unit == unit && o.kind == EventKind::UnitScheduled);
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
    } else if desired == Some(fleet_model::DesiredState::Inactive) {
        "the unit was unloaded".into()
    } else {
        format!("its rules no longer allow machine {m}")
    }
}

/// Why the scheduler chose a machine, as far as the unit's rules tell.
fn why_there(rules: Option<&Result<Rules, String>>) -> String {
    let Some(Ok(r)) = rules else { return "least loaded machine".into() };
    if r.global {
        return "global unit: runs on every eligible machine".into();
    }
    if r.machine_id.is_some() {
        return "MachineID names this machine".into();
    }
    if !r.machine_of.is_empty() {
        return format!("MachineOf={}", r.machine_of.join(" "));
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
    why.join("; ")
}

/// Which events a reader wants.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Empty: every unit (and events of no unit).
    pub units: Vec<fleet_model::glob::UnitGlob>,
    /// A machine id or its prefix (as fleetctl shows them).
    pub machine: Option<String>,
    /// Empty: every kind.
    pub kinds: BTreeSet<EventKind>,
}

impl Filter {
    /// A filter from the API's query: `unit` names or globs and `kind` kinds or globs over kind
    /// names (`unit-*`), each comma-separated (no unit name holds a comma); `machine` an id.
    pub fn parse(unit: Option<&str>, machine: Option<&str>, kind: Option<&str>) -> Result<Filter, String> {
        let units = unit
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| fleet_model::glob::UnitGlob::new(u).map_err(|e| format!("unit {u:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let mut kinds = BTreeSet::new();
        for pattern in kind.unwrap_or_default().split(',').map(str::trim).filter(|k| !k.is_empty()) {
            let matched: Vec<EventKind> =
                EventKind::ALL.into_iter().filter(|k| fleet_model::glob::glob_match(pattern, k.as_str())).collect();
            if matched.is_empty() {
                let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                return Err(format!("kind {pattern:?} names no event kind (known: {})", known.join(", ")));
            }
            kinds.extend(matched);
        }
        Ok(Filter { units, machine: machine.filter(|m| !m.is_empty()).map(str::to_string), kinds })
    }

    fn wants(&self, kind: EventKind, e: &Event) -> bool {
        // A gap concerns every reader: what they filter for may be in it.
        if kind == EventKind::Gap {
            return true;
        }
        (self.kinds.is_empty() || self.kinds.contains(&kind))
            && (self.units.is_empty() || self.units.iter().any(|g| g.matches(&e.unit)))
            && self.machine.as_ref().is_none_or(|m| e.machine.starts_with(m.as_str()) || e.from.starts_with(m.as_str()))
    }
}

struct Kept {
    id: EventId,
    kind: EventKind,
    event: Event,
}

struct History {
    events: VecDeque<Kept>,
    capacity: usize,
    /// Every event after this id is kept (or told by a gap event); earlier ones may be lost.
    complete_after: EventId,
    last: EventId,
}

/// The events one engine keeps, and a signal for streams waiting on new ones.
pub struct EventLog {
    history: Mutex<History>,
    newest: watch::Sender<EventId>,
    closed: std::sync::atomic::AtomicBool,
}

/// What a reader gets: events after its id, and whether some it asked for are lost.
pub struct Read {
    pub events: Vec<Event>,
    pub more: bool,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        let history = History {
            events: VecDeque::new(),
            capacity: capacity.max(1),
            complete_after: EventId::default(),
            last: EventId::default(),
        };
        EventLog {
            history: Mutex::new(history),
            newest: watch::channel(EventId::default()).0,
            closed: Default::default(),
        }
    }

    /// Ends every stream reading the log (the engine is stopping): a stream that stayed open
    /// would hold the server's graceful shutdown.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
        self.newest.send_modify(|_| {});
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The view listed everything at `revision`: events from then on are complete. After the
    /// first listing (a watch that fell behind etcd's compaction), what happened in between is
    /// lost, and a gap event says so.
    pub fn listed(&self, revision: i64, time: &str) {
        let Ok(mut h) = self.history.lock() else { return };
        let id = EventId { revision, n: 0 };
        if h.last == EventId::default() && h.events.is_empty() {
            h.complete_after = EventId { revision, n: u32::MAX };
            h.last = h.complete_after;
            return;
        }
        let id = id.max(EventId { revision: h.last.revision + 1, n: 0 });
        let gap = Event {
            id: id.to_string(),
            time: time.to_string(),
            kind: EventKind::Gap.as_str().into(),
            reason: "the engine relisted the cluster after etcd compacted the history its watch needed; \
                     events in between are lost"
                .into(),
            ..Event::default()
        };
        Self::push(&mut h, id, EventKind::Gap, gap);
        h.last = EventId { revision: id.revision, n: u32::MAX };
        let last = h.last;
        drop(h);
        self.newest.send_replace(last);
    }

    /// Keeps a batch's events, numbering them within their revisions.
    pub fn record(&self, happened: Vec<(i64, Happened)>, time: &str) {
        if happened.is_empty() {
            return;
        }
        let Ok(mut h) = self.history.lock() else { return };
        for (revision, e) in happened {
            // Numbered within their revision; a revision delivered twice (never expected) still
            // gets ids after the last one, so ids only grow.
            let id = if revision > h.last.revision {
                EventId { revision, n: 0 }
            } else if h.last.n < u32::MAX - 1 {
                EventId { revision: h.last.revision, n: h.last.n + 1 }
            } else {
                EventId { revision: h.last.revision + 1, n: 0 }
            };
            let event = Event {
                id: id.to_string(),
                time: time.to_string(),
                kind: e.kind.as_str().into(),
                unit: e.unit,
                machine: e.machine,
                from: e.from,
                state: e.state,
                reason: e.reason,
            };
            Self::push(&mut h, id, e.kind, event);
            h.last = id;
        }
        let last = h.last;
        drop(h);
        self.newest.send_replace(last);
    }

    fn push(h: &mut History, id: EventId, kind: EventKind, event: Event) {
        if h.events.len() >= h.capacity {
            if let Some(old) = h.events.pop_front() {
                h.complete_after = h.complete_after.max(old.id);
            }
        }
        h.events.push_back(Kept { id, kind, event });
    }

    /// Events after `since` that `filter` wants, oldest first, at most `limit`; with `tail`,
    /// the last `tail` of them instead. A `since` before what is kept (other than `0`, "from
    /// the oldest kept") gets a gap event first.
    pub fn read(&self, since: Option<EventId>, filter: &Filter, limit: usize, tail: Option<usize>) -> Read {
        let Ok(h) = self.history.lock() else { return Read { events: Vec::new(), more: false } };
        let since = since.unwrap_or_default();
        let mut events = Vec::new();
        if since.revision > 0 && since < h.complete_after {
            events.push(Event {
                id: h.complete_after.to_string(),
                time: String::new(),
                kind: EventKind::Gap.as_str().into(),
                reason: format!(
                    "events after {since} up to {} are no longer kept by this engine (it keeps the last {})",
                    h.complete_after, h.capacity
                ),
                ..Event::default()
            });
        }
        let start = h.events.partition_point(|k| k.id <= since);
        let matching = h.events.range(start..).filter(|k| filter.wants(k.kind, &k.event));
        let more = match tail {
            Some(t) => {
                let all: Vec<&Kept> = matching.collect();
                let from = all.len().saturating_sub(t);
                events.extend(all[from..].iter().map(|k| k.event.clone()));
                false
            }
            None => {
                let mut it = matching;
                events.extend(it.by_ref().take(limit).map(|k| k.event.clone()));
                it.next().is_some()
            }
        };
        Read { events, more }
    }

    /// The id of the newest event (or listing) this engine has.
    pub fn newest(&self) -> EventId {
        *self.newest.borrow()
    }

    /// Changes whenever events are kept.
    pub fn subscribe(&self) -> watch::Receiver<EventId> {
        self.newest.subscribe()
    }
}

/// The time an engine saw a batch, as events show it: RFC 3339 in UTC, to the millisecond (one
/// width, so that lines of events align).
pub fn now() -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    time::OffsetDateTime::now_utc().format(FORMAT).unwrap_or_default()
}

#[cfg(test)]
mod tests;
