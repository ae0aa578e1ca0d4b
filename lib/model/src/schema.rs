//! The etcd key layout and the records stored under it. See `docs/registry.md` for the why.
//!
//! ```text
//! <P>units/<name>                UnitRecord        API; no lease
//! <P>bodies/<hash>               canonical text    API; shared by every unit with that hash
//! <P>machines/<id>               MachineRecord     agent; on the agent's lease
//! <P>schedule/<id>/<page>        SchedulePage      engine leader; fenced; machines whose agent reads pages
//! <P>schedule/<id>/<name>        ScheduleEntry     engine leader; fenced; machines whose agent does not
//! <P>states/<id>/<page>          StatePage         agent; on the agent's lease (units' states, see pages)
//! <P>states/<id>/<name>          UnitStateRecord   agents before state pages; still read, never written
//! <P>why/<name>                  text              engine leader; why a unit is not placed
//! <P>moves/<name>                MoveRequest       API (a user's move); leader deletes or refuses it
//! <P>reschedule/<name>           RescheduleRecord  engine leader; a failing unit's failures and moves
//! <P>rollouts/<service>          RolloutRecord     API (asked, pause/resume/promote/undo); leader as it goes
//! <P>metadata/<id>/<key>         text              API (PATCH machines); overrides the agent's metadata
//! <P>drain/<id>                  empty             API (fleetctl drain); the machine takes no units
//! <P>leader/...                  election keys     engines; each on its own lease
//! ```

use crate::{DesiredState, MachineId, Text, UnitName};
use serde::{Deserialize, Serialize};

pub const DEFAULT_PREFIX: &str = "/fleet/";

/// Where a key lives, decoded from its bytes. Keys outside the layout decode to `None` and are
/// ignored, so a newer writer can add key kinds without breaking older readers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Unit(UnitName),
    Body(String),
    Machine(MachineId),
    /// One unit's schedule entry, as leaders write it for agents that do not read pages.
    Schedule(MachineId, UnitName),
    /// A page of a machine's schedule (`crate::pages`).
    SchedulePage(MachineId, u32),
    /// One unit's state, as agents before state pages wrote it (engines still read it, so
    /// agents can be upgraded after the engines).
    State(MachineId, UnitName),
    /// A page of a machine's unit states (`crate::pages`).
    StatePage(MachineId, u32),
    /// Why the leader could not place a unit.
    Why(UnitName),
    /// A user's request to move a unit.
    Move(UnitName),
    /// What the leader remembers of a unit's failures and the moves they caused.
    Reschedule(UnitName),
    /// A rollout of a new version over a service (a template or one unit).
    Rollout(UnitName),
    /// Metadata set through the API for a machine (overrides its config; empty = removed).
    Metadata(MachineId, String),
    /// A machine being drained: nothing may run there.
    Drain(MachineId),
    /// An engine's election key (the key's last part is its lease); the value is the engine's id.
    Leader(String),
    /// A FleetLock group's reboot semaphore.
    RebootLock(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn units(&self) -> String {
        format!("{}units/", self.prefix)
    }
    pub fn unit(&self, name: &UnitName) -> String {
        format!("{}units/{name}", self.prefix)
    }
    pub fn bodies(&self) -> String {
        format!("{}bodies/", self.prefix)
    }
    pub fn body(&self, hash: &str) -> String {
        format!("{}bodies/{hash}", self.prefix)
    }
    pub fn machines(&self) -> String {
        format!("{}machines/", self.prefix)
    }
    pub fn machine(&self, id: &str) -> String {
        format!("{}machines/{id}", self.prefix)
    }
    pub fn schedules(&self) -> String {
        format!("{}schedule/", self.prefix)
    }
    /// Everything one agent has to do: the only prefix an agent watches.
    pub fn schedule_of(&self, machine: &str) -> String {
        format!("{}schedule/{machine}/", self.prefix)
    }
    pub fn schedule(&self, machine: &str, unit: &UnitName) -> String {
        format!("{}schedule/{machine}/{unit}", self.prefix)
    }
    /// A page of one machine's schedule (digits, like [`Keys::state_page`]).
    pub fn schedule_page(&self, machine: &str, page: u32) -> String {
        format!("{}schedule/{}/{}", self.prefix, machine, page)
    }
    pub fn states(&self) -> String {
        format!("{}states/", self.prefix)
    }
    pub fn states_of(&self, machine: &str) -> String {
        format!("{}states/{machine}/", self.prefix)
    }
    /// A page of one machine's unit states; page numbers are digits, never a unit's name (which
    /// has a type suffix), so both kinds of key share the machine's prefix.
    pub fn state_page(&self, machine: &str, page: u32) -> String {
        format!("{}states/{}/{}", self.prefix, machine, page)
    }
    pub fn state(&self, machine: &str, unit: &UnitName) -> String {
        format!("{}states/{machine}/{unit}", self.prefix)
    }
    pub fn drain(&self, machine: &str) -> String {
        format!("{}drain/{machine}", self.prefix)
    }
    /// Metadata set through the API, kept without a lease so it survives the machine rejoining.
    pub fn metadata(&self, machine: &str, key: &str) -> String {
        format!("{}metadata/{machine}/{key}", self.prefix)
    }
    pub fn moves(&self, unit: &UnitName) -> String {
        format!("{}moves/{unit}", self.prefix)
    }
    pub fn reschedule(&self, unit: &UnitName) -> String {
        format!("{}reschedule/{unit}", self.prefix)
    }
    pub fn rollouts(&self) -> String {
        format!("{}rollouts/", self.prefix)
    }
    pub fn rollout(&self, service: &UnitName) -> String {
        format!("{}rollouts/{service}", self.prefix)
    }
    pub fn why(&self, unit: &UnitName) -> String {
        format!("{}why/{unit}", self.prefix)
    }
    /// A FleetLock group's reboot semaphore (the engine's; see `fleet_engine::fleetlock`).
    pub fn reboot_lock(&self, group: &str) -> String {
        format!("{}reboot-lock/{group}", self.prefix)
    }
    /// Join tokens' records (`fleet_model::join`): read and written by the engines only.
    pub fn join_tokens(&self) -> String {
        format!("{}join-tokens/", self.prefix)
    }
    pub fn join_token(&self, id: &str) -> String {
        format!("{}join-tokens/{id}", self.prefix)
    }
    /// Election name used with etcd's election API (candidates' keys are `<name>/<lease>`).
    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }

    pub fn decode(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(self.prefix.as_str())?;
        let (kind, rest) = key.split_once('/')?;
        match kind {
            "units" => UnitName::parse(rest).ok().map(Key::Unit),
            "why" => UnitName::parse(rest).ok().map(Key::Why),
            "moves" => UnitName::parse(rest).ok().map(Key::Move),
            "reschedule" => UnitName::parse(rest).ok().map(Key::Reschedule),
            "rollouts" => UnitName::parse(rest).ok().map(Key::Rollout),
            "drain" if !rest.contains('/') => Some(Key::Drain(rest.to_string())),
            "metadata" => {
                let (m, k) = rest.split_once('/')?;
                Some(Key::Metadata(m.to_string(), k.to_string()))
            }
            "bodies" => Some(Key::Body(rest.to_string())),
            "leader" if !rest.is_empty() => Some(Key::Leader(rest.to_string())),
            "reboot-lock" if !rest.contains('/') => Some(Key::RebootLock(rest.to_string())),
            "machines" if !rest.contains('/') => Some(Key::Machine(rest.to_string())),
            "schedule" | "states" => {
                let (m, u) = rest.split_once('/')?;
                if !u.is_empty() && u.bytes().all(|b| b.is_ascii_digit()) {
                    let page = u.parse().ok()?;
                    return Some(if kind == "states" {
                        Key::StatePage(m.to_string(), page)
                    } else {
                        Key::SchedulePage(m.to_string(), page)
                    });
                }
                let u = UnitName::parse(u).ok()?;
                Some(if kind == "schedule" { Key::Schedule(m.to_string(), u) } else { Key::State(m.to_string(), u) })
            }
            _ => None,
        }
    }
}

/// A unit as the user submitted it. The body lives under `bodies/<hash>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitRecord {
    pub name: UnitName,
    pub hash: Text,
    pub desired_state: DesiredState,
}

/// What one machine must do with one unit. Written only by the engine leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleEntry {
    pub hash: Text,
    pub desired_state: DesiredState,
}

/// A user's request to move a unit off `from` (to `to`, or anywhere else when empty). The leader
/// deletes it once done, or fills in `refused` when the move is impossible.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MoveRequest {
    pub from: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub to: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub refused: String,
}

/// systemd's view of a unit on one machine, as its agent last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitStateRecord {
    pub hash: Text,
    pub load_state: Text,
    pub active_state: Text,
    pub sub_state: Text,
    /// What the agent has applied: `loaded` (file linked) or `launched` (start requested).
    pub applied: DesiredState,
    /// The unit's health, for a unit whose `[X-Fleet]` declares it (`HealthCheck=`,
    /// `MinHealthyTime=`) and that is active; absent otherwise (see [`crate::health`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::health::Health>,
}

impl UnitStateRecord {
    pub fn stopped(&self) -> bool {
        is_stopped(&self.active_state)
    }
}

/// Whether a systemd `ActiveState` means nothing of the unit runs any more.
pub fn is_stopped(active_state: &str) -> bool {
    matches!(active_state, "inactive" | "failed")
}

/// Serialises a record for etcd. Records are plain data; failure would be a programming error,
/// but it is reported rather than panicking.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(value)
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/registry.md is the contract between engine, agents and API: every kind of key `Keys`
    /// formats (read from this file's source, so a new one cannot be forgotten) has its row.
    #[test]
    fn every_key_kind_is_in_the_registry() {
        let source = include_str!("schema.rs");
        let registry = include_str!("../../../docs/registry.md");
        let impl_keys = source.split("impl Keys {").nth(1).and_then(|s| s.split("\n}\n").next()).unwrap_or_default();
        let kinds: std::collections::BTreeSet<&str> = impl_keys
            .split("format!(\"{}")
            .skip(1)
            .filter_map(|rest| rest.split(['/', '"']).next())
            .filter(|kind| !kind.is_empty())
            .collect();
        assert!(kinds.len() >= 11, "found only {kinds:?} in impl Keys");
        let missing: Vec<&&str> =
            kinds.iter().filter(|k| !registry.lines().any(|l| l.starts_with(&format!("| `{k}")))).collect();
        assert!(missing.is_empty(), "docs/registry.md has no row for {missing:?}");
    }

    fn n(s: &str) -> UnitName {
        UnitName::parse(s).expect("valid")
    }

    #[test]
    fn keys_round_trip() {
        let k = Keys::new("/t1");
        let m = "0f1ee701000040008000000000000001";
        assert_eq!(k.decode(k.unit(&n("a@1.service")).as_bytes()), Some(Key::Unit(n("a@1.service"))));
        assert_eq!(k.decode(k.body("abc").as_bytes()), Some(Key::Body("abc".into())));
        assert_eq!(k.decode(k.machine(m).as_bytes()), Some(Key::Machine(m.into())));
        assert_eq!(k.decode(k.schedule(m, &n("x.service")).as_bytes()), Some(Key::Schedule(m.into(), n("x.service"))));
        assert_eq!(k.decode(k.state(m, &n("x.service")).as_bytes()), Some(Key::State(m.into(), n("x.service"))));
        assert!(k.schedule(m, &n("x.service")).starts_with(&k.schedule_of(m)));
        assert_eq!(k.decode(k.state_page(m, 12).as_bytes()), Some(Key::StatePage(m.into(), 12)));
        assert!(k.state_page(m, 0).starts_with(&k.states_of(m)));
        assert_eq!(k.decode(k.schedule_page(m, 3).as_bytes()), Some(Key::SchedulePage(m.into(), 3)));
        assert!(k.schedule_page(m, 0).starts_with(&k.schedule_of(m)));
        assert_eq!(k.decode(format!("{}99999999999", k.schedule_of(m)).as_bytes()), None);
        assert_eq!(k.decode(format!("{}99999999999", k.states_of(m)).as_bytes()), None);
        assert_eq!(k.decode(k.why(&n("x.service")).as_bytes()), Some(Key::Why(n("x.service"))));
        assert_eq!(k.decode(k.moves(&n("x.service")).as_bytes()), Some(Key::Move(n("x.service"))));
        assert_eq!(k.decode(k.metadata(m, "rack").as_bytes()), Some(Key::Metadata(m.into(), "rack".into())));
        assert_eq!(k.decode(k.drain(m).as_bytes()), Some(Key::Drain(m.into())));
        assert_eq!(k.decode(format!("{}/694d8e2b", k.leader()).as_bytes()), Some(Key::Leader("694d8e2b".into())));
        assert_eq!(k.decode(k.reboot_lock("default").as_bytes()), Some(Key::RebootLock("default".into())));
        assert_eq!(k.decode(b"/t1/leader"), None);
        assert_eq!(k.decode(b"/other/units/x.service"), None);
    }

    #[test]
    fn records_round_trip() {
        let u = UnitRecord { name: n("a.service"), hash: "h".into(), desired_state: DesiredState::Launched };
        let bytes = encode(&u).expect("encodes");
        assert_eq!(
            std::str::from_utf8(&bytes).ok(),
            Some(r#"{"name":"a.service","hash":"h","desiredState":"launched"}"#)
        );
        assert_eq!(decode::<UnitRecord>(&bytes).ok(), Some(u));
        let s = UnitStateRecord {
            hash: "h".into(),
            load_state: "loaded".into(),
            active_state: "active".into(),
            sub_state: "running".into(),
            applied: DesiredState::Launched,
            health: None,
        };
        let bytes = encode(&s).expect("encodes");
        assert!(!String::from_utf8_lossy(&bytes).contains("health"), "no health key for a unit without one");
        assert_eq!(decode::<UnitStateRecord>(&bytes).ok(), Some(s.clone()));
        let healthy = UnitStateRecord { health: Some(crate::health::Health::Healthy), ..s };
        let bytes = encode(&healthy).expect("encodes");
        assert!(String::from_utf8_lossy(&bytes).contains(r#""health":"healthy""#));
        assert_eq!(decode::<UnitStateRecord>(&bytes).ok(), Some(healthy));
        assert!(decode::<UnitRecord>(br#"{"name":"bad","hash":"h","desiredState":"launched"}"#).is_err());
    }
}
