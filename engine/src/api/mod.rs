//! fleet's REST API (`/fleet/v1`), served by every engine replica from its cluster view.
//!
//! Field names, status codes and error bodies follow the original fleet so its clients keep
//! working. Writes go straight to etcd in transactions and answer once committed; the next read
//! through the same replica waits until its view shows them (see [`Api::written`]).

use crate::auth::{AuditDetail, Caller, Role};
use crate::cluster::{Cluster, ClusterView};
use crate::leader::SharedStatus;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use fleet_api as wire;
use fleet_model::rules::Rules;
use fleet_model::schema::{decode, encode};
use fleet_model::{DesiredState, Keys, UnitFile, UnitName, UnitOption, UnitRecord};
use fleet_store::kv::{
    AnyStore, CmpOp, Compare, Entry, Op, OpResult, Store, StoreError, Txn as StoreTxn, TxnResult, TXN_OPS,
};
use serde::Deserialize;
use std::ops::Bound;
use std::time::Duration;

mod agents;
mod events;
pub(crate) mod join;
mod machines;
mod rollouts;
mod states;
mod units;

pub use self::agents::*;
pub(crate) use self::events::*;
pub(crate) use self::join::*;
pub(crate) use self::machines::*;
pub(crate) use self::rollouts::*;
pub(crate) use self::states::*;
pub use self::units::*;
pub(crate) use crate::http::refuse_batch;
pub use crate::http::{ApiError, BatchError, MAX_BATCH_BODY_BYTES, MAX_BODY_BYTES};

#[derive(Clone)]
pub struct Api {
    /// etcd, or in unit tests the in-memory store: every write and every read the view cannot
    /// answer goes through it.
    pub store: AnyStore,
    pub keys: Keys,
    pub cluster: Cluster,
    pub status: SharedStatus,
    pub token_limit: u16,
    /// HTTP client for agents' APIs (status, journal).
    pub agents: reqwest::Client,
    pub fleetlock: crate::config::FleetLockConfig,
    /// The newest etcd revision this replica wrote. Writes answer once committed; a later read
    /// through this replica first waits until its view shows this revision, so a client still
    /// reads its own writes without every write paying for the view's catch-up.
    pub written: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// Requests this replica has served (shown by `/engine/status`).
    pub requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Set on an engine that admits machines by join token (`[join]`).
    pub join: Option<std::sync::Arc<crate::join::Joining>>,
}

impl Api {
    /// Records a committed write's revision (see [`Api::written`]).
    pub(crate) fn wrote(&self, revision: i64) {
        self.written.fetch_max(revision, std::sync::atomic::Ordering::Relaxed);
        self.metrics.wrote(revision, self.cluster.revision());
    }
}

/// How long one attempt of an API request's store call may take: a request can land on a dead
/// etcd member, and the next attempt picks another. Bulk writes may queue behind a busy
/// cluster's other writers, so they are given longer.
fn attempt_limit(patient: bool) -> Duration {
    match patient {
        true => Duration::from_secs(30),
        false => Duration::from_secs(3),
    }
}

/// A store call with retries: four attempts of at most [`attempt_limit`] each; a store that
/// cannot be reached is a 503. Each attempt is counted in `metrics`.
pub(crate) async fn stored<T, F, Fut>(
    metrics: &crate::metrics::Metrics,
    what: &str,
    patient: bool,
    mut op: F,
) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let op = || {
        let attempt = op();
        async move {
            let started = std::time::Instant::now();
            let result = attempt.await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) if e.is_transient() => "unavailable",
                Err(_) => "error",
            };
            metrics.store_call(what, outcome, started.elapsed());
            result
        }
    };
    let policy = fleet_store::retry::RetryPolicy {
        attempts: 4,
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        timeout: attempt_limit(patient),
    };
    policy.run(what, StoreError::is_transient, op).await.map_err(|e| {
        tracing::warn!(error = %e, "API request failed on etcd");
        match e {
            fleet_store::retry::RetryError::Failed { source, .. } => ApiError::from(source),
            fleet_store::retry::RetryError::TimedOut { .. } => ApiError::unavailable(),
        }
    })
}

impl Api {
    /// One key, read with [`stored`]'s retries.
    pub(crate) async fn read_key(&self, what: &str, key: &str, patient: bool) -> Result<Option<Entry>, ApiError> {
        stored(&self.metrics, what, patient, || self.store.get(key.as_bytes())).await
    }

    /// One transaction with [`stored`]'s retries.
    pub(crate) async fn txn(&self, what: &str, txn: StoreTxn, patient: bool) -> Result<TxnResult, ApiError> {
        stored(&self.metrics, what, patient, || self.store.txn(txn.clone())).await
    }

    /// Writes one key and records it as this replica's write (see [`Api::written`]).
    pub(crate) async fn put_key(&self, what: &str, key: String, value: Vec<u8>) -> Result<(), ApiError> {
        let txn = StoreTxn { then: vec![Op::put(key, value, 0)], ..StoreTxn::default() };
        let done = self.txn(what, txn, false).await?;
        self.wrote(done.revision);
        Ok(())
    }

    /// Deletes one key; whether there was one to delete. Only a delete that removed something
    /// is recorded as this replica's write: a delete of nothing answers the store's current
    /// revision, which this view may never reach.
    pub(crate) async fn delete_key(&self, what: &str, key: String) -> Result<bool, ApiError> {
        let txn = StoreTxn { then: vec![Op::delete(key)], ..StoreTxn::default() };
        let done = self.txn(what, txn, false).await?;
        let deleted = matches!(done.results.first(), Some(OpResult::Delete { deleted }) if *deleted > 0);
        if deleted {
            self.wrote(done.revision);
        }
        Ok(deleted)
    }
}

/// The entries a transaction's gets found, in the order of its operations.
pub(crate) fn got(done: &TxnResult) -> impl Iterator<Item = Option<&Entry>> {
    done.results.iter().filter_map(|r| match r {
        OpResult::Get(e) => Some(e.as_ref()),
        _ => None,
    })
}

/// Waits until this replica's view shows `revision`; if its watch seems stuck (a dead etcd
/// member), restarts the watch and waits once more.
pub(crate) async fn settle(api: &Api, revision: i64) {
    if !api.cluster.caught_up(revision, Duration::from_secs(1)).await {
        api.cluster.kick();
        api.cluster.caught_up(revision, Duration::from_secs(5)).await;
    }
}

/// Where a unit is scheduled and how far its machine got (`currentState`), as the API shows
/// them; both empty for a global unit (its per-machine states are in /state).
pub(crate) fn placement_of(v: &ClusterView, rec: &UnitRecord) -> (DesiredState, Option<String>) {
    if matches!(v.rules.get(&rec.name), Some(Ok(r)) if r.global) {
        return (DesiredState::Inactive, None);
    }
    match v.schedule.get(&rec.name).and_then(|e| e.iter().next()) {
        None => (DesiredState::Inactive, Some(String::new())),
        Some((m, _)) => {
            let state = v.states.get(&rec.name).and_then(|s| s.get(m)).filter(|s| s.hash == rec.hash);
            (state.map(|s| s.applied).unwrap_or(DesiredState::Inactive), Some(m.to_string()))
        }
    }
}

/// What `machine` reports for `unit`, as the API shows it.
pub(crate) fn api_state(unit: &UnitName, machine: &str, s: &fleet_model::UnitStateRecord) -> wire::UnitState {
    wire::UnitState {
        name: unit.to_string(),
        hash: s.hash.to_string(),
        machine_id: machine.to_string(),
        systemd_load_state: s.load_state.to_string(),
        systemd_active_state: s.active_state.to_string(),
        systemd_sub_state: s.sub_state.to_string(),
        health: s.health.map(|h| h.as_str().to_string()).unwrap_or_default(),
        machine_ip: String::new(),
    }
}

/// A unit as the API shows it: stored options and desired state, plus where it is scheduled
/// and how far its machine got (`currentState`).
pub(crate) fn api_unit(v: &ClusterView, rec: &UnitRecord) -> wire::Unit {
    let options = v
        .bodies
        .get(rec.hash.as_str())
        .and_then(|(text, _)| UnitFile::parse(text).ok())
        .map(|f| f.options)
        .unwrap_or_default();
    wire::Unit { options, ..api_unit_basic(v, rec) }
}

/// A unit without its options (`view=basic`).
pub(crate) fn api_unit_basic(v: &ClusterView, rec: &UnitRecord) -> wire::Unit {
    let options = Vec::new();
    let (current, machine) = match placement_of(v, rec) {
        (_, None) => (String::new(), String::new()),
        (state, Some(m)) => (state.to_string(), m),
    };
    wire::Unit {
        name: rec.name.to_string(),
        options,
        desired_state: rec.desired_state.to_string(),
        current_state: current,
        machine_id: machine,
        reason: v.why.get(&rec.name).cloned().unwrap_or_default(),
        move_refused: v.moves.get(&rec.name).map(|m| m.refused.clone()).unwrap_or_default(),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct PageQuery {
    #[serde(rename = "nextPageToken")]
    next_page_token: Option<String>,
    /// `/state`: one unit. `/units` (not in the original API): unit names or globs,
    /// comma-separated.
    #[serde(rename = "unitName")]
    unit_name: Option<String>,
    #[serde(rename = "machineID")]
    machine_id: Option<String>,
    /// Not in the original API: items per page (1 to 10,000; default the engine's
    /// `token_limit`). A page token is valid with the page size it was made for.
    #[serde(rename = "pageSize")]
    page_size: Option<u16>,
    /// Not in the original API, `/units` only: units in this current state (`inactive`,
    /// `loaded`, `launched`; `unplaced` for units wanting a machine they do not have).
    state: Option<String>,
    /// Not in the original API, `/units` only: `basic` leaves each unit's options out (a
    /// listing of many units for a table does not need their files).
    view: Option<String>,
}

impl PageQuery {
    /// The page size asked for, or the engine's.
    pub(crate) fn limit(&self, api: &Api) -> Result<u16, ApiError> {
        match self.page_size {
            None => Ok(api.token_limit),
            Some(n @ 1..=10_000) => Ok(n),
            Some(n) => Err(ApiError::bad_request(format!("pageSize {n}: 1 to 10000"))),
        }
    }
}

/// Where a page starts. fleet's page tokens are base64url of a little-endian u16 limit and u16
/// page number; ours append the last key of the page before, so the next page is a range lookup
/// in the view rather than a skip from its start (page numbers alone made a full listing of
/// 100,000 states quadratic). Clients treat tokens as opaque: fleet's clients follow ours, and
/// tokens made by fleet (no key) are still honoured by page number.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct PageStart {
    page: u16,
    after: Option<String>,
}

impl PageStart {
    /// How many items to skip in a listing that already starts after `after`.
    fn skip(&self, limit: u16) -> usize {
        match self.after {
            Some(_) => 0,
            None => (self.page as usize).saturating_sub(1) * limit as usize,
        }
    }
}

pub(crate) fn page_of(token: Option<&str>, limit: u16) -> Result<PageStart, ApiError> {
    let Some(token) = token else { return Ok(PageStart { page: 1, after: None }) };
    let bytes = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .map_err(|_| ApiError::bad_request("invalid page token"))?;
    if bytes.len() < 4 {
        return Err(ApiError::bad_request("invalid page token"));
    }
    let (l, p) = (u16::from_le_bytes([bytes[0], bytes[1]]), u16::from_le_bytes([bytes[2], bytes[3]]));
    if l != limit {
        return Err(ApiError::bad_request(format!("token limit must be {limit}")));
    }
    if p == 0 {
        return Err(ApiError::bad_request("token page must be greater than zero"));
    }
    let after = match &bytes[4..] {
        [] => None,
        key => Some(String::from_utf8(key.to_vec()).map_err(|_| ApiError::bad_request("invalid page token"))?),
    };
    Ok(PageStart { page: p, after })
}

pub(crate) fn token(limit: u16, page: u16, after: &str) -> String {
    let mut b = limit.to_le_bytes().to_vec();
    b.extend(page.to_le_bytes());
    b.extend(after.as_bytes());
    base64::engine::general_purpose::URL_SAFE.encode(b)
}

/// One page of `items`, which starts after `start.after` when the token carried a key. Callers
/// pass a lazy iterator and build the (costly) API objects after paging. `key` names an item
/// in the order of the listing, for the next token.
pub(crate) fn paginate<T>(
    items: impl IntoIterator<Item = T>,
    start: &PageStart,
    limit: u16,
    key: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let chunk: Vec<T> = items.into_iter().skip(start.skip(limit)).take(limit as usize).collect();
    let next = match chunk.last() {
        Some(last) if chunk.len() == limit as usize => Some(token(limit, start.page.saturating_add(1), &key(last))),
        _ => None,
    };
    (chunk, next)
}

/// The bound a range over the view starts from.
pub(crate) fn after(start: &PageStart) -> Bound<&str> {
    start.after.as_deref().map_or(Bound::Unbounded, Bound::Excluded)
}

pub(crate) fn ready(api: &Api) -> Result<(), ApiError> {
    if api.cluster.revision() == 0 {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "fleet server unable to communicate with etcd"));
    }
    Ok(())
}

/// [`ready`], and the view shows every write this replica answered (read your own writes).
pub(crate) async fn fresh(api: &Api) -> Result<(), ApiError> {
    ready(api)?;
    let written = api.written.load(std::sync::atomic::Ordering::Relaxed);
    if api.cluster.revision() < written {
        settle(api, written).await;
    }
    Ok(())
}

pub(crate) fn parse_name(name: &str) -> Result<UnitName, ApiError> {
    UnitName::parse(name).map_err(|e| ApiError::bad_request(e.to_string()))
}

pub(crate) fn check_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let types: Vec<_> = headers.get_all(header::CONTENT_TYPE).iter().collect();
    if types.len() != 1 {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("expected 1 Content-Type, got {}", types.len()),
        ));
    }
    let media = types[0].to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if media != "application/json" {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "only acceptable Content-Type is application/json",
        ));
    }
    Ok(())
}

/// Most units one `POST /fleet/v1/units` may create.
pub const MAX_UNITS_PER_REQUEST: usize = wire::MAX_UNITS_PER_REQUEST;
/// Units per etcd transaction (a unit and its body are two operations, under etcd's 128).
pub(crate) const UNITS_PER_TXN: usize = 60;

/// Rejects unit files fleet could not run.
/// Largest unit file accepted, as stored (sections, names and values).
pub const MAX_UNIT_FILE_BYTES: usize = 64 * 1024;
/// Most options in one unit file.
pub const MAX_UNIT_OPTIONS: usize = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_match_fleet() {
        assert_eq!(token(100, 2, ""), "ZAACAA==");
        assert_eq!(page_of(Some("ZAACAA=="), 100).ok(), Some(PageStart { page: 2, after: None }));
        assert_eq!(
            page_of(Some("EwBMLg=="), 100).map_err(|e| e.message().to_string()),
            Err("token limit must be 100".to_string())
        );
        assert!(page_of(Some("ZAAAAA=="), 100).is_err());
        assert!(page_of(Some("!!"), 100).is_err());
        // A fleet token (page number only) skips; ours carry the last key and the caller's
        // iterator already starts after it.
        let key = |i: &i32| i.to_string();
        let (first, next) = paginate(0..5, &PageStart { page: 1, after: None }, 2, key);
        assert_eq!(first, vec![0, 1]);
        let next = page_of(next.as_deref(), 2).ok();
        assert_eq!(next, Some(PageStart { page: 2, after: Some("1".into()) }));
        let (last, next) = paginate(0..5, &PageStart { page: 3, after: None }, 2, key);
        assert_eq!((last, next), (vec![4], None));
        let (resumed, _) = paginate(2..5, &PageStart { page: 2, after: Some("1".into()) }, 2, key);
        assert_eq!(resumed, vec![2, 3]);
        let not_utf8 = base64::engine::general_purpose::URL_SAFE.encode([2, 0, 2, 0, 0xff]);
        assert!(page_of(Some(&not_utf8), 2).is_err());
    }

    #[test]
    fn unit_json_uses_fleet_field_names() {
        let u = wire::Unit {
            name: "a.service".into(),
            options: vec![],
            desired_state: "launched".into(),
            current_state: "inactive".into(),
            machine_id: "m".into(),
            reason: String::new(),
            move_refused: String::new(),
        };
        assert_eq!(
            serde_json::to_string(&u).ok().as_deref(),
            Some(r#"{"name":"a.service","desiredState":"launched","currentState":"inactive","machineID":"m"}"#)
        );
    }
}
