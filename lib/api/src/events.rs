//! The event stream's wire types: `GET /fleet/v1/events` (a page of the history) and
//! `GET /fleet/v1/events/stream` (server-sent events, each `data:` one [`Event`]).
//!
//! Events are derived by every engine from the changes etcd's watch delivers, so an event's id is
//! the etcd revision it happened at and its place among that revision's events: the same on
//! every engine replica, which lets a client resume on another engine after a fail-over.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where an event sits in the cluster's history: etcd revision, then order within it. Written
/// `<revision>.<n>` (`4711.0`); `0.0` is before everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub revision: i64,
    pub n: u32,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.revision, self.n)
    }
}

impl FromStr for EventId {
    type Err = String;
    /// `R.N`, or a bare revision `R` (everything after revision R).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("event id {s:?}: expected REVISION.N (as in an event's id) or REVISION");
        let (rev, n) = match s.split_once('.') {
            Some((r, n)) => (r, Some(n)),
            None => (s, None),
        };
        let revision: i64 = rev.parse().map_err(|_| bad())?;
        if revision < 0 {
            return Err(bad());
        }
        let n = match n {
            Some(n) => n.parse().map_err(|_| bad())?,
            None => u32::MAX,
        };
        Ok(EventId { revision, n })
    }
}

/// What happened. Travels as its kebab-case name (`unit-started`); clients read the name as a
/// string so that a kind added later does not make older clients fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A new unit was submitted (`state`: its desired state).
    UnitSubmitted,
    /// A unit's desired state changed (`state`).
    UnitDesiredState,
    /// A unit's file was replaced by a new version.
    UnitReplaced,
    /// The leader placed a unit on `machine` (`reason`: why there).
    UnitScheduled,
    /// The leader moved a unit `from` one machine to `machine` (`reason`: why).
    UnitMoved,
    /// A unit was taken off `machine` (stopped, unloaded or destroyed).
    UnitUnscheduled,
    /// systemd on `machine` reports the unit active.
    UnitStarted,
    /// systemd on `machine` reports the unit failed.
    UnitFailed,
    /// systemd on `machine` reports the unit stopped.
    UnitStopped,
    /// The unit's health on `machine` changed (`state`: `starting`, `healthy` or `unhealthy`;
    /// only units that declare their health).
    UnitHealth,
    /// What the leader does with a unit failing where it runs (`reason`: when it will move, where
    /// it moved, or why it stays; only units with `RescheduleAttempts`).
    UnitReschedule,
    /// A rollout of a service (`unit`: the template or unit) moved on (`state`: its phase,
    /// `reason`: what happened, in words).
    Rollout,
    /// The leader cannot place the unit (`reason`).
    UnitUnplaceable,
    /// The unit was destroyed.
    UnitDestroyed,
    /// A machine's agent registered.
    MachineJoined,
    /// A machine's registration ended (its lease expired or its agent stopped).
    MachineLost,
    /// A machine is being drained: its units move away.
    MachineDrained,
    /// A machine's drain ended.
    MachineUndrained,
    /// Another engine leads (`machine` carries nothing; `reason` names the engine).
    LeaderChanged,
    /// A machine took a reboot slot of a FleetLock group (`reason` names the group).
    RebootSlotTaken,
    /// A machine gave its reboot slot back.
    RebootSlotReleased,
    /// Events are missing here: the engine relisted after etcd compacted its history, or the
    /// events a client asked to resume from are no longer kept.
    Gap,
}

impl EventKind {
    pub const ALL: [EventKind; 22] = [
        EventKind::UnitSubmitted,
        EventKind::UnitDesiredState,
        EventKind::UnitReplaced,
        EventKind::UnitScheduled,
        EventKind::UnitMoved,
        EventKind::UnitUnscheduled,
        EventKind::UnitStarted,
        EventKind::UnitFailed,
        EventKind::UnitStopped,
        EventKind::UnitHealth,
        EventKind::UnitReschedule,
        EventKind::Rollout,
        EventKind::UnitUnplaceable,
        EventKind::UnitDestroyed,
        EventKind::MachineJoined,
        EventKind::MachineLost,
        EventKind::MachineDrained,
        EventKind::MachineUndrained,
        EventKind::LeaderChanged,
        EventKind::RebootSlotTaken,
        EventKind::RebootSlotReleased,
        EventKind::Gap,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::UnitSubmitted => "unit-submitted",
            EventKind::UnitDesiredState => "unit-desired-state",
            EventKind::UnitReplaced => "unit-replaced",
            EventKind::UnitScheduled => "unit-scheduled",
            EventKind::UnitMoved => "unit-moved",
            EventKind::UnitUnscheduled => "unit-unscheduled",
            EventKind::UnitStarted => "unit-started",
            EventKind::UnitFailed => "unit-failed",
            EventKind::UnitStopped => "unit-stopped",
            EventKind::UnitHealth => "unit-health",
            EventKind::UnitReschedule => "unit-reschedule",
            EventKind::Rollout => "rollout",
            EventKind::UnitUnplaceable => "unit-unplaceable",
            EventKind::UnitDestroyed => "unit-destroyed",
            EventKind::MachineJoined => "machine-joined",
            EventKind::MachineLost => "machine-lost",
            EventKind::MachineDrained => "machine-drained",
            EventKind::MachineUndrained => "machine-undrained",
            EventKind::LeaderChanged => "leader-changed",
            EventKind::RebootSlotTaken => "reboot-slot-taken",
            EventKind::RebootSlotReleased => "reboot-slot-released",
            EventKind::Gap => "gap",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing that happened in the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// `<revision>.<n>`: resume after it with `since` (or SSE's `Last-Event-ID`).
    #[cfg_attr(feature = "openapi", schema(example = "4711.0"))]
    pub id: String,
    /// When the answering engine saw it (RFC 3339, UTC); replicas may differ by their lag.
    pub time: String,
    /// What happened: `unit-submitted`, `unit-scheduled`, `unit-moved`, `unit-started`, ...
    #[cfg_attr(feature = "openapi", schema(example = "unit-started"))]
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub machine: String,
    /// For `unit-moved`: the machine it left.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from: String,
    /// A desired state (`unit-submitted`, `unit-desired-state`) or systemd's sub-state.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// Why: where a unit was placed or moved, why it cannot be placed, which engine leads.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl Event {
    pub fn event_id(&self) -> Option<EventId> {
        self.id.parse().ok()
    }
}

/// `GET /fleet/v1/events`: the kept history after `since`, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct EventPage {
    pub events: Vec<Event>,
    /// Pass as `since` to get what follows (the last event's id, or `since` when none matched).
    pub next: String,
    /// True when more kept events follow than `limit` allowed in this page.
    #[serde(default)]
    pub more: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_by_revision_then_place_and_read_back() {
        let a: EventId = "10.2".parse().expect("id");
        let b: EventId = "11.0".parse().expect("id");
        assert!(a < b);
        assert_eq!(a.to_string(), "10.2");
        // A bare revision means "after everything of that revision".
        let r: EventId = "10".parse().expect("revision");
        assert!(r > a && r < b);
        for bad in ["", "x", "1.x", "-1.0", "1.2.3"] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn kinds_travel_by_their_names() {
        for k in EventKind::ALL {
            let json = serde_json::to_string(&k).expect("encode");
            assert_eq!(json, format!("\"{}\"", k.as_str()));
        }
    }
}
