//! Batch operations on units, not in the original API: read, change, destroy and wait for many
//! units with one request each, so what a client pays does not grow with the number of units it
//! names (fleetctl's bulk commands are built on them). They are named after Google's custom
//! methods (`units:batchGet`), since fleet's API follows Google's discovery format.
//!
//! Every request is validated as a whole before anything is written; writes go to etcd in
//! transactions of at most [`UNITS_PER_TXN`] units, each all-or-nothing, and answer once
//! committed. Per-unit refusals are listed in the error body's `units`.

use crate::api::{
    check_json, check_put, check_replace_cycles, find, fresh, got, placement_of, settle, Api, ApiError, PutUnit,
    MAX_UNITS_PER_REQUEST, UNITS_PER_TXN,
};
use crate::auth::{AuditDetail, Caller, Role};
use crate::cluster::ClusterView;
use crate::http::refuse_batch as refuse;
pub use crate::http::BatchError;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
pub use fleet_api::{
    Changed, Destroyed, Found, Names, UnitChange, UnitChanges, UnitError, Until, WaitEvent, WaitRequest,
};
use fleet_model::schema::{decode, encode, is_stopped};
use fleet_model::{DesiredState, UnitName, UnitRecord};
use fleet_store::kv::{CmpOp, Compare, Op, OpResult, Txn, TXN_OPS};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

mod wait;
pub use wait::{check, wait, Check, MAX_WAIT};

fn decode_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("unable to decode body: {e}")))
}

/// Unit names, each valid and named once, at most [`MAX_UNITS_PER_REQUEST`].
pub fn parse_names(names: &[String]) -> Result<Vec<UnitName>, BatchError> {
    if names.is_empty() {
        return Err(ApiError::bad_request("names is empty").into());
    }
    if names.len() > MAX_UNITS_PER_REQUEST {
        return Err(ApiError::bad_request(format!(
            "{} units in one request; at most {MAX_UNITS_PER_REQUEST}",
            names.len()
        ))
        .into());
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(names.len());
    let mut bad = Vec::new();
    for n in names {
        match UnitName::parse(n) {
            Ok(name) if seen.insert(name.clone()) => out.push(name),
            Ok(_) => bad.push(UnitError { name: n.clone(), error: "named twice in this request".into() }),
            Err(e) => bad.push(UnitError { name: n.clone(), error: e.to_string() }),
        }
    }
    refuse(StatusCode::BAD_REQUEST, "invalid unit names", bad)?;
    Ok(out)
}

/// The newest revision at which any of `names` was written, as etcd has it now (0 when none of
/// them exists). A view that has caught up with it shows every one of them that exists, however
/// it was created; unlike etcd's current revision, which counts writes outside fleet's prefix
/// that this replica's watch never sees, it is always reached (waiting for etcd's revision made
/// a `fleetctl start` of new units wait 6 s whenever anything else had written to etcd).
async fn newest_of(api: &Api, names: &[&UnitName]) -> Result<i64, ApiError> {
    let mut newest = 0;
    for chunk in names.chunks(TXN_OPS) {
        let then = chunk.iter().map(|n| Op::Get(api.keys.unit(n).into_bytes())).collect();
        let done = api.txn("look units up", Txn { then, ..Txn::default() }, false).await?;
        newest = got(&done).flatten().map(|e| e.mod_revision).fold(newest, i64::max);
    }
    Ok(newest)
}

/// The units a `{"names": [...]}` request names, once this replica's view shows its own writes.
async fn named_units(api: &Api, headers: &HeaderMap, body: &[u8]) -> Result<Vec<UnitName>, BatchError> {
    check_json(headers)?;
    let req: Names = decode_body(body)?;
    let names = parse_names(&req.names)?;
    fresh(api).await?;
    Ok(names)
}

/// `POST /units:batchGet`: many units in one read.
pub async fn batch_get(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, BatchError> {
    let names = named_units(&api, &headers, &body).await?;
    let mut found = api.cluster.read(|v| find(v, &names));
    if !found.missing.is_empty() {
        // The view may lag a write made through another replica: before saying a unit does
        // not exist, catch up with what etcd has of it.
        let missing: Vec<&UnitName> = names.iter().filter(|n| found.missing.iter().any(|m| m == n.as_str())).collect();
        let rev = newest_of(&api, &missing).await?;
        if api.cluster.revision() < rev {
            settle(&api, rev).await;
        }
        // Read again even when the view needed no waiting: it may have taken the unit in
        // between the first read and etcd's answer (seen in CI: "missing" for a unit the view
        // already held).
        if rev > 0 {
            found = api.cluster.read(|v| find(v, &names));
        }
    }
    Ok(Json(found).into_response())
}

/// Decodes and validates a `POST /units:batchUpdate` body without looking at the cluster.
pub fn parse_changes(body: &[u8]) -> Result<Vec<PutUnit>, BatchError> {
    let req: UnitChanges = decode_body(body)?;
    let names: Vec<String> = req.units.iter().map(|u| u.name.clone()).collect();
    parse_names(&names)?;
    let mut out = Vec::with_capacity(req.units.len());
    let mut bad = Vec::new();
    for u in req.units {
        if u.desired_state.is_empty() && u.options.is_empty() {
            bad.push(UnitError { name: u.name, error: "neither desiredState nor options given".into() });
            continue;
        }
        match check_put(&u.name, &u.desired_state, u.options) {
            Ok(p) => out.push(p),
            Err(e) => bad.push(UnitError { name: u.name, error: e.message().to_string() }),
        }
    }
    refuse(StatusCode::BAD_REQUEST, "invalid units", bad)?;
    Ok(out)
}

/// `POST /units:batchUpdate`: changes the desired state (and, for `admin`, the unit file) of
/// existing units. Units already as asked are left alone.
pub async fn batch_update(
    State(api): State<Api>,
    caller: Option<axum::Extension<Caller>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, BatchError> {
    check_json(&headers)?;
    let changes = parse_changes(&body)?;
    if changes.iter().any(|c| c.file.is_some()) {
        let caller = caller.map(|c| c.0).unwrap_or(Caller { who: "?".into(), role: Role::Read, machine: None });
        caller.require(Role::Admin, "changing unit files")?;
    }
    let mut bad = Vec::new();
    for c in &changes {
        if let Some((_, rules)) = &c.file {
            if let Err(e) = check_replace_cycles(&api, &c.name, rules) {
                bad.push(UnitError { name: c.name.to_string(), error: e.message().to_string() });
            }
        }
    }
    refuse(StatusCode::BAD_REQUEST, "invalid units", bad)?;
    fresh(&api).await?;
    let missing = |v: &ClusterView| -> Vec<UnitError> {
        changes
            .iter()
            .filter(|c| !v.units.contains_key(&c.name))
            .map(|c| UnitError { name: c.name.to_string(), error: "unit does not exist".into() })
            .collect()
    };
    let absent: Vec<&UnitName> =
        api.cluster.read(|v| changes.iter().filter(|c| !v.units.contains_key(&c.name)).map(|c| &c.name).collect());
    if !absent.is_empty() {
        let rev = newest_of(&api, &absent).await?;
        if api.cluster.revision() < rev {
            settle(&api, rev).await;
        }
    }
    refuse(StatusCode::NOT_FOUND, "units do not exist", api.cluster.read(|v| missing(v)))?;

    let mut done = Changed { changed: Vec::new(), revision: 0 };
    for chunk in changes.chunks(UNITS_PER_TXN) {
        let (changed, rev) = update_chunk(&api, chunk).await?;
        done.changed.extend(changed);
        done.revision = done.revision.max(rev);
    }
    if done.revision > 0 {
        api.wrote(done.revision);
    }
    let detail = AuditDetail(format!("{} of {} units changed", done.changed.len(), changes.len()));
    Ok((StatusCode::OK, axum::Extension(detail), Json(done)).into_response())
}

/// One transaction: reads the chunk's units, writes what changes, guarded by what was read;
/// read again if another writer came in between.
async fn update_chunk(api: &Api, chunk: &[PutUnit]) -> Result<(Vec<String>, i64), BatchError> {
    for _ in 0..5 {
        let reads = chunk.iter().map(|c| Op::Get(api.keys.unit(&c.name).into_bytes())).collect();
        let read = api.txn("read units", Txn { then: reads, ..Txn::default() }, true).await?;
        let mut guards = Vec::new();
        let mut ops = Vec::new();
        let mut changed = Vec::new();
        let mut gone = Vec::new();
        let mut bodies = HashSet::new();
        for (c, stored) in chunk.iter().zip(got(&read)) {
            let key = api.keys.unit(&c.name);
            let stored = stored.map(|e| (decode::<UnitRecord>(&e.value), e.mod_revision));
            let Some((old, rev)) = stored else {
                gone.push(UnitError { name: c.name.to_string(), error: "unit does not exist".into() });
                continue;
            };
            let old = old.map_err(|e| ApiError::internal(format!("stored unit {} is unreadable: {e}", c.name)))?;
            let mut new = old.clone();
            if let Some((f, _)) = &c.file {
                new.hash = f.hash().into();
                if new.hash != old.hash && bodies.insert(new.hash.to_string()) {
                    ops.push(Op::put(api.keys.body(&new.hash), f.canonical(), 0));
                }
            }
            if let Some(d) = c.desired {
                new.desired_state = d;
            }
            if new == old {
                continue;
            }
            guards.push(Compare::mod_revision(key.clone(), CmpOp::Equal, rev));
            ops.push(Op::put(key, encode(&new).map_err(|e| ApiError::internal(e.to_string()))?, 0));
            changed.push(c.name.to_string());
        }
        refuse(StatusCode::CONFLICT, "units were destroyed meanwhile", gone)?;
        if ops.is_empty() {
            return Ok((changed, 0));
        }
        let done = api.txn("write units", Txn { when: guards, then: ops, ..Txn::default() }, true).await?;
        if done.succeeded {
            return Ok((changed, done.revision));
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, "units changed concurrently; try again").into())
}

/// Deletions per transaction (etcd allows 128 operations in one).
const DELETES_PER_TXN: usize = 100;

/// `POST /units:batchDelete`: destroys units; agents stop and remove them.
pub async fn batch_delete(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, BatchError> {
    let names = named_units(&api, &headers, &body).await?;
    let mut done = Destroyed { destroyed: Vec::new(), missing: Vec::new(), revision: 0 };
    for chunk in names.chunks(DELETES_PER_TXN) {
        let then = chunk.iter().map(|n| Op::delete(api.keys.unit(n))).collect();
        let deleted = api.txn("delete units", Txn { then, ..Txn::default() }, true).await?;
        let mut any = false;
        for (n, r) in chunk.iter().zip(&deleted.results) {
            match r {
                OpResult::Delete { deleted } if *deleted > 0 => {
                    any = true;
                    done.destroyed.push(n.to_string())
                }
                _ => done.missing.push(n.to_string()),
            }
        }
        // A transaction that deleted nothing answers etcd's current revision, which may count
        // writes outside fleet's prefix: recorded, it would make the next read wait for a
        // revision this replica's view never reaches.
        if any {
            done.revision = done.revision.max(deleted.revision);
        }
    }
    if done.revision > 0 {
        api.wrote(done.revision);
    }
    let detail = AuditDetail(format!("{} units destroyed", done.destroyed.len()));
    Ok((StatusCode::OK, axum::Extension(detail), Json(done)).into_response())
}
