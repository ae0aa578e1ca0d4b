//! FleetLock, the reboot-coordination protocol Fedora CoreOS's zincati speaks, served by every
//! engine so machines reboot a few at a time: `POST /v1/pre-reboot` takes a slot of the machine's
//! group (a counting semaphore in etcd, recursive and owned: taking it twice is one slot, only the
//! holder releases it) and `POST /v1/steady-state` gives it back.
//!
//! Taking a slot also drains the machine (its units move elsewhere, as `fleetctl drain` does), in
//! the same etcd transaction; `pre-reboot` answers 200 only once no unit is scheduled there any
//! more, so the machine reboots empty. Until then it answers `409 draining`, and FleetLock clients
//! retry. `steady-state` releases the slot and lifts the drain it made (a drain an operator made
//! stays).
//!
//! A machine's certificate may lock and unlock for that machine only; `operate` may do it for any.

use crate::api::{Api, ApiError};
use crate::auth::{Caller, Role};
pub use crate::config::FleetLockConfig;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleet_store::kv::{CmpOp, Compare, Op, Txn};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Deserialize)]
struct Request {
    client_params: ClientParams,
}

#[derive(Debug, Deserialize)]
struct ClientParams {
    id: String,
    #[serde(default)]
    group: String,
}

/// One group's semaphore, as stored at `<prefix>reboot-lock/<group>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Semaphore {
    pub holders: Vec<Holder>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub id: String,
    /// The lock drained the machine (and lifts the drain when released).
    pub drained: bool,
}

/// What taking a slot does to a semaphore: the new holders, or why not.
#[derive(Debug, PartialEq, Eq)]
pub enum LockStep {
    /// Already held by this id: nothing to write.
    Held,
    /// Write these holders (this id added).
    Take(Semaphore),
    /// Every slot is held by others.
    Full(Vec<String>),
}

/// The semaphore's rule, without etcd: recursive, owned, `slots` holders at most.
pub fn lock_step(sem: &Semaphore, id: &str, slots: u32, drains: bool) -> LockStep {
    if sem.holders.iter().any(|h| h.id == id) {
        return LockStep::Held;
    }
    if sem.holders.len() >= slots as usize {
        return LockStep::Full(sem.holders.iter().map(|h| h.id.clone()).collect());
    }
    let mut next = sem.clone();
    next.holders.push(Holder { id: id.to_string(), drained: drains });
    LockStep::Take(next)
}

/// Releasing: the holders without `id`, and whether its drain is to be lifted; `None` if it held
/// no slot (unlocking is idempotent).
pub fn unlock_step(sem: &Semaphore, id: &str) -> Option<(Semaphore, bool)> {
    let held = sem.holders.iter().find(|h| h.id == id)?;
    let lift = held.drained;
    let holders = sem.holders.iter().filter(|h| h.id != id).cloned().collect();
    Some((Semaphore { holders }, lift))
}

/// FleetLock's error shape: `{"kind": ..., "value": ...}`.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    kind: &'static str,
    value: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({"kind": self.kind, "value": self.value}))).into_response()
    }
}

fn refuse(status: StatusCode, kind: &'static str, value: impl Into<String>) -> Refusal {
    Refusal { status, kind, value: value.into() }
}

fn from_api(e: ApiError) -> Refusal {
    refuse(e.status(), "error", e.message())
}

/// Checks the protocol header, decodes the body, and checks the caller may act for the id.
fn request(headers: &HeaderMap, body: &[u8], caller: Option<&Caller>) -> Result<(String, String), Refusal> {
    let flagged = headers.get("fleet-lock-protocol").and_then(|v| v.to_str().ok()).is_some_and(|v| v == "true");
    if !flagged {
        return Err(refuse(StatusCode::BAD_REQUEST, "missing_header", "header fleet-lock-protocol: true is required"));
    }
    let req: Request = serde_json::from_slice(body)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, "bad_request", format!("unable to decode body: {e}")))?;
    let id = req.client_params.id.trim().to_ascii_lowercase();
    fleet_model::machine::parse_machine_id(&id)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, "bad_request", format!("client_params.id: {e}")))?;
    let group = match req.client_params.group.as_str() {
        "" => "default".to_string(),
        g if g.len() <= 64 && g.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) => {
            g.to_string()
        }
        g => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("client_params.group {g:?}: 1 to 64 of [A-Za-z0-9_.-]"),
            ))
        }
    };
    let caller = caller.ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "unauthorized", "no caller"))?;
    let own = caller.machine.as_deref() == Some(id.as_str());
    if !own && caller.role < Role::Operate {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} may not take or release reboot slots for machine {id}", caller.who),
        ));
    }
    Ok((id, group))
}

/// Reads a group's semaphore and the machine's drain key, with their revisions for the guard.
async fn read(api: &Api, group: &str, id: &str) -> Result<(Semaphore, i64, i64), Refusal> {
    let (sem_key, drain_key) = (api.keys.reboot_lock(group), api.keys.drain(id));
    let then = vec![Op::Get(sem_key.into_bytes()), Op::Get(drain_key.into_bytes())];
    let done = api.txn("read reboot lock", Txn { then, ..Txn::default() }, false).await.map_err(from_api)?;
    let mut found = crate::api::got(&done);
    let (stored_sem, drain) = (found.next().flatten(), found.next().flatten());
    let mut sem = (Semaphore::default(), 0);
    if let Some(e) = stored_sem {
        let s = serde_json::from_slice(&e.value)
            .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, "error", format!("stored reboot lock: {e}")))?;
        sem = (s, e.mod_revision);
    }
    let drain_rev = drain.map(|e| e.mod_revision).unwrap_or(0);
    Ok((sem.0, sem.1, drain_rev))
}

fn guard(key: String, rev: i64) -> Compare {
    match rev {
        0 => Compare::create_revision(key, CmpOp::Equal, 0),
        r => Compare::mod_revision(key, CmpOp::Equal, r),
    }
}

/// Writes a group's semaphore (and the drain change that goes with it) if neither the semaphore
/// nor the machine's drain key changed since they were read (`revs`); false if one did (read
/// again and retry).
async fn commit(
    api: &Api,
    group: &str,
    id: &str,
    sem: &Semaphore,
    revs: (i64, i64),
    drain: Option<Op>,
    what: &str,
) -> Result<bool, Refusal> {
    let value = serde_json::to_vec(sem)
        .map_err(|_| refuse(StatusCode::INTERNAL_SERVER_ERROR, "error", "cannot encode the reboot lock"))?;
    let then = std::iter::once(Op::put(api.keys.reboot_lock(group), value, 0)).chain(drain).collect();
    let when = vec![guard(api.keys.reboot_lock(group), revs.0), guard(api.keys.drain(id), revs.1)];
    let done = api.txn(what, Txn { when, then, ..Txn::default() }, false).await.map_err(from_api)?;
    if done.succeeded {
        // Groups a machine names but the configuration does not are counted together: a label
        // never takes values a client makes up.
        let known = group == "default" || api.fleetlock.groups.contains_key(group);
        api.metrics.slots_held(if known { group } else { "other" }, sem.holders.len());
        crate::api::settle(api, done.revision).await;
    }
    Ok(done.succeeded)
}

/// Units still scheduled to machine `id`, in this engine's view.
/// Units still on machine `id`: scheduled there, or reported there by its agent as not stopped
/// yet (an agent reports a unit taken off its machine until systemd has stopped it). A machine
/// is empty, and may reboot, only once both are none.
fn units_on(api: &Api, id: &str) -> usize {
    api.cluster.read(|v| {
        let scheduled = v.schedule.values().filter(|m| m.contains_key(id)).count();
        let running = v.states.values().filter(|m| m.get(id).is_some_and(|s| !s.stopped())).count();
        scheduled.max(running)
    })
}

pub async fn pre_reboot(
    State(api): State<Api>,
    caller: Option<axum::Extension<Caller>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Refusal> {
    let (id, group) = request(&headers, &body, caller.as_ref().map(|c| &c.0))?;
    let slots = api.fleetlock.slots(&group);
    for _ in 0..5 {
        let (sem, sem_rev, drain_rev) = read(&api, &group, &id).await?;
        // An operator's drain is left alone: the lock neither makes nor lifts it.
        let drains = api.fleetlock.drain && drain_rev == 0;
        let next = match lock_step(&sem, &id, slots, drains) {
            LockStep::Held => return drained_or_wait(&api, &id, &sem).await,
            LockStep::Full(holders) => {
                return Err(refuse(
                    StatusCode::CONFLICT,
                    "failed_lock",
                    format!("all {slots} reboot slots of group {group} are held (by {})", holders.join(", ")),
                ))
            }
            LockStep::Take(next) => next,
        };
        let drain = drains.then(|| Op::put(api.keys.drain(&id), "", 0));
        if commit(&api, &group, &id, &next, (sem_rev, drain_rev), drain, "take a reboot slot").await? {
            tracing::info!(machine = %id, %group, drains, "reboot slot taken");
            return drained_or_wait(&api, &id, &next).await;
        }
    }
    Err(refuse(StatusCode::CONFLICT, "failed_lock", "the reboot lock changed concurrently; try again"))
}

/// 200 once the machine's units are gone (or it was not drained by the lock), else 409.
async fn drained_or_wait(api: &Api, id: &str, sem: &Semaphore) -> Result<Response, Refusal> {
    let drained = sem.holders.iter().any(|h| h.id == id && h.drained);
    if drained {
        // Give the leader a moment to move what it can before answering.
        for _ in 0..20 {
            if units_on(api, id) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let left = units_on(api, id);
        if left > 0 {
            return Err(refuse(
                StatusCode::CONFLICT,
                "draining",
                format!("slot held; {left} units still scheduled or running on machine {id}: try again"),
            ));
        }
    }
    Ok((StatusCode::OK, Json(serde_json::json!({}))).into_response())
}

pub async fn steady_state(
    State(api): State<Api>,
    caller: Option<axum::Extension<Caller>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Refusal> {
    let (id, group) = request(&headers, &body, caller.as_ref().map(|c| &c.0))?;
    for _ in 0..5 {
        let (sem, sem_rev, drain_rev) = read(&api, &group, &id).await?;
        let Some((next, lift)) = unlock_step(&sem, &id) else {
            return Ok((StatusCode::OK, Json(serde_json::json!({}))).into_response());
        };
        let undrain = (lift && drain_rev != 0).then(|| Op::delete(api.keys.drain(&id)));
        if commit(&api, &group, &id, &next, (sem_rev, drain_rev), undrain, "release a reboot slot").await? {
            tracing::info!(machine = %id, %group, lift, "reboot slot released");
            return Ok((StatusCode::OK, Json(serde_json::json!({}))).into_response());
        }
    }
    Err(refuse(StatusCode::CONFLICT, "failed_unlock", "the reboot lock changed concurrently; try again"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holders(sem: &Semaphore) -> Vec<&str> {
        sem.holders.iter().map(|h| h.id.as_str()).collect()
    }

    #[test]
    fn slots_are_counted_owned_and_recursive() {
        let empty = Semaphore::default();
        let LockStep::Take(one) = lock_step(&empty, "a", 2, true) else { panic!("a takes a slot") };
        assert_eq!(lock_step(&one, "a", 2, true), LockStep::Held, "recursive");
        let LockStep::Take(two) = lock_step(&one, "b", 2, false) else { panic!("b takes the second slot") };
        assert_eq!(holders(&two), ["a", "b"]);
        assert_eq!(lock_step(&two, "c", 2, true), LockStep::Full(vec!["a".into(), "b".into()]));
        // Only a holder releases; releasing twice is harmless; the drain goes with the holder.
        assert_eq!(unlock_step(&two, "c"), None);
        let (after, lift) = unlock_step(&two, "a").expect("a held");
        assert!(lift);
        assert_eq!(holders(&after), ["b"]);
        assert_eq!(unlock_step(&after, "a"), None);
        assert!(!unlock_step(&after, "b").expect("b held").1, "b's lock made no drain");
        assert!(matches!(lock_step(&after, "c", 2, true), LockStep::Take(_)));
    }

    #[test]
    fn groups_have_their_own_slot_counts() {
        let cfg = FleetLockConfig { default_slots: 1, groups: [("workers".to_string(), 3)].into(), drain: true };
        assert_eq!((cfg.slots("workers"), cfg.slots("default"), cfg.slots("etcd")), (3, 1, 1));
    }
}
