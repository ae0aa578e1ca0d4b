//! fleet's `/fleet/v1` wire types: every request, response, page and error body, defined once.
//!
//! The engine serializes them, fleetctl and the tests deserialize them, and the engine's OpenAPI
//! document is derived from them (feature `openapi`), so the three cannot drift apart.
//!
//! Compatibility with the original fleet decides their shape: fields are camelCase (with its
//! `machineID`/`primaryIP` spellings), empty values are left out of answers as fleet's Go server
//! left them out, and every field may be missing from what a client receives. States travel as
//! strings (an unknown one must not make a whole listing unreadable); the typed accessors
//! ([`Unit::desired`], [`Unit::current`]) give the model's enum. Fields the engine always sends
//! are marked required in the OpenAPI document though clients read them leniently.
//!
//! Pure data: depends on fleet-model and serde only (no tokio, no HTTP, no etcd).

use fleet_model::{DesiredState, MachineRecord, UnitFile, UnitName};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use fleet_model::UnitOption;

mod events;
pub use events::{Event, EventId, EventKind, EventPage};
mod rollouts;
pub use rollouts::{Rollout, RolloutInstance, RolloutList, RolloutRequest};
mod join;
pub use join::{JoinRequest, JoinTokenCreated, JoinTokenInfo, JoinTokenPage, JoinTokenRequest, Joined};

/// Units one batch request may name (the engine refuses more).
pub const MAX_UNITS_PER_REQUEST: usize = 10_000;

/// A unit as `GET /units/{name}` shows it, and the body of `PUT /units/{name}`.
/// `currentState` and `machineID` are derived from the schedule; `reason` and `moveRefused` are
/// fleet-rs additions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Unit {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<UnitOption>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[cfg_attr(feature = "openapi", schema(example = "launched"))]
    pub desired_state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub current_state: String,
    #[serde(rename = "machineID", default, skip_serializing_if = "String::is_empty")]
    pub machine_id: String,
    /// Not in the original API: why the engine could not place the unit.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Not in the original API: why the engine refused the last move request.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub move_refused: String,
}

impl Unit {
    /// The desired state, if it is one fleet knows.
    pub fn desired(&self) -> Option<DesiredState> {
        self.desired_state.parse().ok()
    }

    /// How far its machine got, if it is scheduled and reported a state fleet knows.
    pub fn current(&self) -> Option<DesiredState> {
        self.current_state.parse().ok()
    }

    /// A `Global=true` unit runs on every eligible machine and is never waited for.
    pub fn is_global(&self) -> bool {
        is_global(&self.name, &self.options)
    }
}

/// Whether the unit `name` with `options` is `Global=true`. The rules are read only when its
/// `[X-Fleet]` section names `Global`: `fleetctl start` of a million units asks this of each.
pub fn is_global(name: &str, options: &[UnitOption]) -> bool {
    if !options.iter().any(|o| o.section == fleet_model::rules::SECTION && o.name == "Global") {
        return false;
    }
    let Ok(name) = UnitName::parse(name) else { return false };
    fleet_model::rules::Rules::parse(&name, &UnitFile::from_options(options.to_vec())).is_ok_and(|r| r.global)
}

/// What one machine's systemd reports for a unit (`GET /state`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct UnitState {
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub name: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub hash: String,
    #[serde(rename = "machineID", default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub machine_id: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub systemd_load_state: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub systemd_active_state: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub systemd_sub_state: String,
    /// `starting`, `healthy` or `unhealthy`, for an active unit whose `[X-Fleet]` declares its
    /// health (`HealthCheck=`, `MinHealthyTime=`); absent otherwise. Not in the original fleet:
    /// its clients ignore it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub health: String,
    /// The machine's address, in the rows of `GET /state:stream` only (so a listing needs no
    /// second request for the machines); absent from `GET /state`, as in the original fleet.
    #[serde(rename = "machineIP", default, skip_serializing_if = "String::is_empty")]
    pub machine_ip: String,
}

/// A machine as `GET /machines` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    pub id: String,
    #[serde(rename = "primaryIP", default, skip_serializing_if = "String::is_empty")]
    pub primary_ip: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Not in the original API: the machine is being drained.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drained: bool,
    /// Not in the original API: units scheduled to the machine.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub units: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Machine {
    /// How fleetctl names the machine: `id.../ip` (or the full id).
    pub fn legend(&self, full: bool) -> String {
        MachineRecord { id: self.id.clone(), public_ip: self.primary_ip.clone(), ..Default::default() }.legend(full)
    }
}

/// One page of `GET /units`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct UnitPage {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<Unit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// One page of `GET /state`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct UnitStatePage {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<UnitState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// The first line of `GET /state:stream` (not in the original API): how many states the stream
/// will carry and the longest value of each column among them, taken together with the first
/// rows, so a client can align a table and print its first row before the last has arrived.
/// States that change while the stream runs may make later rows differ from these figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StateStreamHead {
    pub rows: u64,
    /// Longest value (in characters) of each field of [`UnitState`], by its JSON name.
    #[serde(default)]
    pub longest: BTreeMap<String, u64>,
    /// Whether each row carries its machine's address (`machineIP`, its longest in `longest`):
    /// then a client shows the MACHINE column without listing the machines.
    #[serde(rename = "machineIPs", default, skip_serializing_if = "std::ops::Not::not")]
    pub machine_ips: bool,
}

/// One page of `GET /machines`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct MachinePage {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<Machine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// A page of a listing: its items and where the next page starts (none on the last page).
pub trait Page: serde::de::DeserializeOwned {
    type Item;
    fn into_parts(self) -> (Vec<Self::Item>, Option<String>);
}

impl Page for UnitPage {
    type Item = Unit;
    fn into_parts(self) -> (Vec<Unit>, Option<String>) {
        (self.units, self.next_page_token)
    }
}

impl Page for UnitStatePage {
    type Item = UnitState;
    fn into_parts(self) -> (Vec<UnitState>, Option<String>) {
        (self.states, self.next_page_token)
    }
}

impl Page for MachinePage {
    type Item = Machine;
    fn into_parts(self) -> (Vec<Machine>, Option<String>) {
        (self.machines, self.next_page_token)
    }
}

/// Every refusal's body: `{"error": {"code", "message"}}` as fleet answered, plus (for batch
/// requests) what was wrong with each unit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Error))]
pub struct ErrorBody {
    pub error: ErrorDetail,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<UnitError>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub code: u16,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub message: String,
}

/// One unit a batch request was refused for, and why.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UnitError {
    pub name: String,
    pub error: String,
}

/// One operation of `PATCH /machines`, in the shape the original accepted: `path` is
/// `/<machine id>/metadata/<key>`; `value` is `{"value": "x"}` (the field may be spelled
/// `Value`) or a plain string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetadataOp {
    #[cfg_attr(feature = "openapi", schema(example = "add"))]
    pub op: String,
    pub path: String,
    #[serde(default, alias = "Value", skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
}

/// The body of `POST /units/{name}/move` (fleet-rs addition): a machine id or unique prefix;
/// empty for the best other machine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MoveRequest {
    #[serde(rename = "machineID", default, skip_serializing_if = "String::is_empty")]
    pub machine_id: String,
}

/// The answer to an accepted move: from where, and to which machine (empty: the leader picks).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MoveAccepted {
    #[serde(default)]
    pub from: String,
    #[serde(rename = "machineID", default)]
    pub machine_id: String,
}

/// The answer to an accepted drain: the machine's full id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DrainAccepted {
    pub id: String,
}

/// What one machine's agent says of a unit (`systemctl status`), fleet-rs addition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Set by the engine: the agents do not name themselves.
    #[serde(rename = "machineID", default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub machine_id: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub exit_code: i32,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub output: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UnitStatuses {
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub statuses: Vec<AgentStatus>,
}

/// The body of `POST /units` (fleet-rs addition): new units, each with `name`, `options` and
/// optionally `desiredState`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct CreateUnits {
    pub units: Vec<Unit>,
    /// Units that exist already are left as they are and answered in `existing` (with what
    /// their machines report in `states`), rather than refused: one request both creates what
    /// is new and says what is not, as `fleetctl start` needs (without, a unit that exists with
    /// other contents or desired state is a 409).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_existing: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Created {
    /// Units written by this request (with `keepExisting`, those not in `existing`).
    pub created: usize,
    /// etcd revision of the last write; `units:wait` may be asked to start from it.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub revision: i64,
    /// With `keepExisting`: the units that existed, as `GET /units/{name}` shows them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub existing: Vec<Unit>,
    /// With `keepExisting`: what the machines of the units in `existing` report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<UnitState>,
}

/// Names of units to read, destroy or wait for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Names {
    pub names: Vec<String>,
}

/// What `units:batchGet` answers: the named units as `GET /units/{name}` shows them, what
/// their machines report, and which do not exist.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Found {
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub units: Vec<Unit>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub states: Vec<UnitState>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub missing: Vec<String>,
}

/// One unit to change in `units:batchUpdate`: a desired state, new unit file options, or both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct UnitChange {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[cfg_attr(feature = "openapi", schema(example = "launched"))]
    pub desired_state: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<UnitOption>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UnitChanges {
    pub units: Vec<UnitChange>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Changed {
    /// The units whose record changed (the others already were as asked).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub changed: Vec<String>,
    /// etcd revision of the last write; `units:wait` may be asked to start from it.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub revision: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Destroyed {
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub destroyed: Vec<String>,
    /// Named units that did not exist.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub missing: Vec<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub revision: i64,
}

/// What `units:wait` waits for, per unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Until {
    /// Its machine's agent has asked systemd to start it.
    Launched,
    /// Launched, and systemd on its machine reports it active.
    Active,
    /// Loaded on its machine (not started).
    Loaded,
    /// Loaded, and no machine's systemd runs it any more.
    Stopped,
    /// Not scheduled anywhere.
    Inactive,
    /// Destroyed, and no machine reports it any more.
    Gone,
}

/// The body of `units:wait`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WaitRequest {
    pub names: Vec<String>,
    pub until: Until,
    /// Wait until this replica's view shows this etcd revision (a write's) before looking.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub revision: i64,
    /// How long to wait at most, in milliseconds (default 5000, at most 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 60000))]
    pub timeout_ms: Option<u64>,
}

/// One line of a `units:wait` stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WaitEvent {
    /// The unit this line is about; absent on heartbeats and the last line.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Where the unit got to what was awaited.
    #[serde(rename = "machineID", default, skip_serializing_if = "String::is_empty")]
    pub machine_id: String,
    #[serde(rename = "primaryIP", default, skip_serializing_if = "String::is_empty")]
    pub primary_ip: String,
    /// Why the unit will not get there: `unplaceable`, `failed` or `destroyed`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The leader's reason for an unplaceable unit.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Units still pending (heartbeats and the last line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<usize>,
    /// The last line: the wait is over (`pending` units did not get there in time).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub done: bool,
}

impl WaitEvent {
    /// The machine the unit got there on, as fleetctl names it.
    pub fn legend(&self) -> String {
        Machine { id: self.machine_id.clone(), primary_ip: self.primary_ip.clone(), ..Default::default() }.legend(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Answers leave empty values out, as fleet's Go server did; clients read what fleet sent.
    #[test]
    fn a_unit_leaves_empty_fields_out_and_reads_fleets_answers() {
        let u = Unit { name: "a.service".into(), desired_state: "launched".into(), ..Default::default() };
        assert_eq!(serde_json::to_value(&u).ok(), Some(json!({"name": "a.service", "desiredState": "launched"})));
        let fleet = json!({"name": "b.service", "options": [{"section": "Service", "name": "ExecStart", "value": "/bin/true"}],
            "desiredState": "loaded", "currentState": "launched", "machineID": "m1"});
        let read: Unit = serde_json::from_value(fleet).unwrap_or_default();
        assert_eq!((read.desired(), read.current()), (Some(DesiredState::Loaded), Some(DesiredState::Launched)));
        assert_eq!(read.machine_id, "m1");
    }

    #[test]
    fn an_empty_page_is_an_empty_object() {
        assert_eq!(serde_json::to_string(&UnitPage::default()).ok().as_deref(), Some("{}"));
        let page: MachinePage = serde_json::from_str(r#"{"nextPageToken":"x"}"#).unwrap_or_default();
        assert_eq!(page.next_page_token.as_deref(), Some("x"));
    }

    #[test]
    fn metadata_values_may_be_spelled_as_fleet_did() {
        let op: Result<MetadataOp, _> =
            serde_json::from_value(json!({"op": "add", "path": "/m/metadata/k", "Value": {"value": "v"}}));
        assert_eq!(op.ok().and_then(|o| o.value), Some(json!({"value": "v"})));
    }

    #[test]
    fn errors_list_refused_units_only_when_there_are_some() {
        let e = ErrorBody { error: ErrorDetail { code: 404, message: "unit does not exist".into() }, units: vec![] };
        assert_eq!(
            serde_json::to_value(&e).ok(),
            Some(json!({"error": {"code": 404, "message": "unit does not exist"}}))
        );
    }

    /// Only `Global=` in `[X-Fleet]` makes a unit global, as its rules read it.
    #[test]
    fn a_unit_is_global_only_by_its_x_fleet_global_rule() {
        let opt = |section: &str, name: &str, value: &str| UnitOption {
            section: section.into(),
            name: name.into(),
            value: value.into(),
        };
        let exec = opt("Service", "ExecStart", "/bin/true");
        let unit = |options: Vec<UnitOption>| Unit { name: "a.service".into(), options, ..Default::default() };
        assert!(unit(vec![exec.clone(), opt("X-Fleet", "Global", "true")]).is_global());
        assert!(!unit(vec![exec.clone(), opt("X-Fleet", "Global", "false")]).is_global());
        assert!(!unit(vec![exec.clone(), opt("Service", "Global", "true")]).is_global());
        // Rules that cannot be read make no unit global.
        assert!(!unit(vec![opt("X-Fleet", "Global", "true"), opt("X-Fleet", "MachineID", "abc")]).is_global());
        assert!(!unit(vec![exec]).is_global());
    }
}
