//! The cluster's events as an engine keeps them: a bounded history, its readers' filters, and
//! the signal streams wait on.
//!
//! No event is ever written to etcd: each engine derives the same events from the same
//! revisions (`cluster::derive` compares each change with the view just before it), so the hot
//! path pays no extra write and an event's id (`<revision>.<n>`) means the same on every
//! replica. Each engine keeps the last `event_history` events in memory for
//! `GET /fleet/v1/events` and for streams resuming after a reconnect; older ones are gone, and a
//! client resuming from before them is told so by a `gap` event.
//!
//! Depends on the wire types and the model only (no view, no HTTP, no etcd).

use fleet_api::{Event, EventId, EventKind};
use fleet_model::UnitName;
use std::borrow::Cow;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use tokio::sync::watch;

/// Events kept by default.
pub const DEFAULT_HISTORY: usize = 10_000;

/// An event before it gets its id and time; also how it is kept (the wire form is made only
/// when someone reads it: a burst of placements derives 100,000 events that nobody may read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Happened {
    pub kind: EventKind,
    pub unit: String,
    pub machine: String,
    pub from: String,
    pub state: String,
    /// Most reasons are fixed words: those are not copied for every event.
    pub reason: Cow<'static, str>,
}

impl Happened {
    pub(crate) fn new(kind: EventKind) -> Self {
        Happened {
            kind,
            unit: String::new(),
            machine: String::new(),
            from: String::new(),
            state: String::new(),
            reason: Cow::Borrowed(""),
        }
    }
    pub(crate) fn unit(mut self, u: &UnitName) -> Self {
        self.unit = u.as_str().to_owned();
        self
    }
    pub(crate) fn machine(mut self, m: &str) -> Self {
        self.machine = m.to_string();
        self
    }
    pub(crate) fn state(mut self, s: impl Into<String>) -> Self {
        self.state = s.into();
        self
    }
    pub(crate) fn reason(mut self, r: impl Into<Cow<'static, str>>) -> Self {
        self.reason = r.into();
        self
    }
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
        let units = fleet_model::glob::UnitGlob::list(unit.unwrap_or_default()).map_err(|e| format!("unit {e}"))?;
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

    fn wants(&self, e: &Happened) -> bool {
        let kind = e.kind;
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
    /// When the engine saw it: shared by the events of one batch.
    time: Arc<str>,
    happened: Happened,
}

impl Kept {
    fn event(&self) -> Event {
        let h = &self.happened;
        Event {
            id: self.id.to_string(),
            time: self.time.to_string(),
            kind: h.kind.as_str().into(),
            unit: h.unit.clone(),
            machine: h.machine.clone(),
            from: h.from.clone(),
            state: h.state.clone(),
            reason: h.reason.to_string(),
        }
    }
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
    off: bool,
}

/// What a reader gets: events after its id, and whether some it asked for are lost.
pub struct Read {
    pub events: Vec<Event>,
    pub more: bool,
}

impl EventLog {
    /// A log keeping the last `capacity` events; 0 makes a log that is off (see
    /// [`EventLog::is_off`]): the engine then derives no events at all.
    pub fn new(capacity: usize) -> Self {
        let history =
            History { events: VecDeque::new(), capacity, complete_after: EventId::default(), last: EventId::default() };
        EventLog {
            history: Mutex::new(history),
            newest: watch::channel(EventId::default()).0,
            closed: Default::default(),
            off: capacity == 0,
        }
    }

    /// Ends every stream reading the log (the engine is stopping): a stream that stayed open
    /// would hold the server's graceful shutdown.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
        self.newest.send_modify(|_| {});
    }

    /// Events are switched off (`event_history = 0`): nothing is derived or kept, and the API
    /// says so instead of answering with an empty history.
    pub fn is_off(&self) -> bool {
        self.off
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
        let gap = Happened::new(EventKind::Gap).reason(
            "the engine relisted the cluster (etcd compacted the history its watch needed, or its \
             count of keys differed from etcd's); events in between are lost",
        );
        Self::push(&mut h, id, time.into(), gap);
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
        let time: Arc<str> = time.into();
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
            Self::push(&mut h, id, time.clone(), e);
            h.last = id;
        }
        let last = h.last;
        drop(h);
        self.newest.send_replace(last);
    }

    fn push(h: &mut History, id: EventId, time: Arc<str>, happened: Happened) {
        if h.capacity == 0 {
            return;
        }
        if h.events.len() >= h.capacity {
            if let Some(old) = h.events.pop_front() {
                h.complete_after = h.complete_after.max(old.id);
            }
        }
        h.events.push_back(Kept { id, time, happened });
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
        let matching = h.events.range(start..).filter(|k| filter.wants(&k.happened));
        let more = match tail {
            Some(t) => {
                let all: Vec<&Kept> = matching.collect();
                let from = all.len().saturating_sub(t);
                events.extend(all[from..].iter().map(|k| k.event()));
                false
            }
            None => {
                let mut it = matching;
                events.extend(it.by_ref().take(limit).map(|k| k.event()));
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
