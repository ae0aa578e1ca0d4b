//! Join tokens (`/fleet/v1/join-tokens`, admin role) and joining (`/fleet/v1/join`, the token
//! is the credential; `/fleet/v1/join/ca`, public). See `crate::join` and docs/install.md.

use super::*;
use crate::auth::Auth;
use crate::join::AccountError;
use fleet_model::join::{admit, JoinToken, JoinTokenRecord, Refusal};
use std::net::IpAddr;
use std::sync::Arc;

/// Tokens last a day unless asked otherwise; at most a year.
const DEFAULT_TTL_SECS: u64 = 24 * 3600;
const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

fn joining(api: &Api) -> Result<&Arc<crate::join::Joining>, ApiError> {
    api.join.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "this engine admits no machines: its configuration has no [join] pki_dir (docs/install.md)",
        )
    })
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub(crate) fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

fn info(r: &JoinTokenRecord, now: i64) -> wire::JoinTokenInfo {
    wire::JoinTokenInfo {
        id: r.id.clone(),
        created: rfc3339(r.created),
        expires: rfc3339(r.expires),
        expired: now >= r.expires,
        uses_left: r.uses_left,
        joined: r.joined.clone(),
        metadata: r.metadata.clone(),
        description: r.description.clone(),
        created_by: r.created_by.clone(),
        machines: r.for_machines.clone(),
    }
}

pub(crate) async fn create_join_token(
    State(api): State<Api>,
    caller: Option<axum::Extension<Caller>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_json(&headers)?;
    let join = joining(&api)?;
    let req: wire::JoinTokenRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("join token request: {e}")))?;
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if ttl == 0 || ttl > MAX_TTL_SECS {
        return Err(ApiError::bad_request(format!("ttlSecs = {ttl}: a token lasts 1 second to 365 days")));
    }
    let uses = req.uses.unwrap_or(1);
    if uses == 0 {
        return Err(ApiError::bad_request("uses = 0: a token admits at least one machine"));
    }
    for (k, v) in &req.metadata {
        fleet_agent_metadata_ok(k, v)?;
    }
    let mut for_machines = Vec::new();
    for m in &req.machines {
        let id =
            fleet_model::machine::parse_machine_id(m).map_err(|e| ApiError::bad_request(format!("machines: {e}")))?;
        for_machines.push(id.to_string());
    }
    let token = crate::pki::new_join_token().map_err(|e| ApiError::internal(e.to_string()))?;
    let now = now_unix();
    let record = JoinTokenRecord {
        id: token.id.clone(),
        secret_sha256: fleet_store::tls::sha256_hex(token.secret.as_bytes()),
        created: now,
        expires: now.saturating_add(ttl as i64),
        uses_left: uses,
        joined: Vec::new(),
        for_machines,
        metadata: req.metadata,
        description: req.description,
        created_by: caller.map(|c| c.0.who.clone()).unwrap_or_default(),
    };
    let key = api.keys.join_token(&token.id);
    let value = encode(&record).map_err(|e| ApiError::internal(e.to_string()))?;
    // A new id only (never overwrite a token, however unlikely the clash).
    let txn = StoreTxn {
        when: vec![Compare::create_revision(key.clone(), CmpOp::Equal, 0)],
        then: vec![Op::put(key, value, 0)],
        ..StoreTxn::default()
    };
    let done = api.txn("create join token", txn, false).await?;
    if !done.succeeded {
        return Err(ApiError::new(StatusCode::CONFLICT, "a join token with this id exists; ask again"));
    }
    let created =
        wire::JoinTokenCreated { token: token.to_string(), info: info(&record, now), ca_hash: join.ca_hash.clone() };
    let detail = AuditDetail(format!("join token {} for {uses} machine(s), {ttl} s", token.id));
    Ok((StatusCode::CREATED, axum::Extension(detail), Json(created)).into_response())
}

/// Metadata as an agent would accept it (`k=v` pairs: no `=` or `,` in keys, no `,` in values).
fn fleet_agent_metadata_ok(k: &str, v: &str) -> Result<(), ApiError> {
    if k.is_empty() || k.contains(['=', ',']) || v.contains(',') || k.chars().chain(v.chars()).any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "metadata {k:?}={v:?}: keys are non-empty without '=' or ',', values without ','"
        )));
    }
    Ok(())
}

pub(crate) async fn list_join_tokens(State(api): State<Api>) -> Result<Response, ApiError> {
    let prefix = api.keys.join_tokens();
    let (entries, _) = stored(&api.metrics, "list join tokens", false, || api.store.range(prefix.as_bytes())).await?;
    let now = now_unix();
    let tokens =
        entries.iter().filter_map(|e| decode::<JoinTokenRecord>(&e.value).ok()).map(|r| info(&r, now)).collect();
    Ok(Json(wire::JoinTokenPage { tokens }).into_response())
}

pub(crate) async fn revoke_join_token(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if !fleet_model::join::JoinToken::valid_id(&id) {
        return Err(ApiError::bad_request(format!("{id:?} is not a join token id (6 characters of a-z and 0-9)")));
    }
    if !api.delete_key("revoke join token", api.keys.join_token(&id)).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("join token {id} does not exist")));
    }
    Ok((StatusCode::NO_CONTENT, axum::Extension(AuditDetail(format!("join token {id} revoked")))).into_response())
}

/// The cluster CA, to anyone: a joining machine checks it against the pin it was given before
/// it trusts anything else this engine says.
pub(crate) async fn join_ca(State(api): State<Api>) -> Result<Response, ApiError> {
    let join = joining(&api)?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], join.ca_pem.clone()).into_response())
}

/// `POST /fleet/v1/join`: outside the auth layer (the token is the credential), so it writes its
/// own audit record, whatever the outcome.
pub(crate) async fn join(State((api, auth)): State<(Api, Arc<Auth>)>, req: axum::extract::Request) -> Response {
    use axum::extract::ConnectInfo;
    let from = if let Some(p) = req.extensions().get::<crate::auth::Peer>() {
        p.to_string()
    } else if let Some(ConnectInfo(a)) = req.extensions().get::<ConnectInfo<std::net::SocketAddr>>() {
        a.to_string()
    } else {
        "unknown".into()
    };
    let headers = req.headers().clone();
    let body = match axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("join request: body too large or unreadable: {e}"),
            )
            .into_response()
        }
    };
    let parsed: Result<wire::JoinRequest, ApiError> = check_json(&headers)
        .and_then(|_| serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("join request: {e}"))));
    let (token_id, machine) = match &parsed {
        Ok(r) => (r.token.split('.').next().unwrap_or_default().to_string(), r.machine_id.clone()),
        Err(_) => (String::new(), String::new()),
    };
    // A task of its own: a client that gives up (or disconnects) mid-join must not cancel it
    // between taking the token's use and giving it back.
    let work = tokio::spawn(async move {
        let outcome = match parsed {
            Ok(req) => admit_machine(&api, req).await,
            Err(e) => Err(e),
        };
        let status = match &outcome {
            Ok(_) => StatusCode::OK,
            Err(e) => e.status(),
        };
        auth.audit(&serde_json::json!({
            "time": rfc3339(now_unix()), "who": format!("join-token:{token_id}"), "from": from,
            "method": "POST", "path": "/fleet/v1/join", "status": status.as_u16(),
            "detail": match &outcome { Ok(_) => format!("machine {machine} joined"), Err(e) => format!("machine {machine:?} refused: {}", e.message()) },
        }));
        outcome
    });
    match work.await {
        Ok(Ok(joined)) => Json(joined).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::internal(format!("the join failed: {e}")).into_response(),
    }
}

/// Gives a join token's use back after a join that failed past taking it: the machine leaves the
/// token's `joined` list and the use comes back. Read, changed and written guarded by what was
/// read, again if another machine used the token meanwhile (a token shared by many machines
/// joining at once, as a cluster's first boot does).
pub(crate) async fn give_back(api: &Api, key: &str, machine: &str) {
    for _ in 0..5 {
        let Ok(Some(entry)) = api.read_key("read join token", key, false).await else { return };
        let Ok(mut record) = decode::<JoinTokenRecord>(&entry.value) else { return };
        let before = record.joined.len();
        record.joined.retain(|m| m != machine);
        if record.joined.len() == before {
            return;
        }
        record.uses_left = record.uses_left.saturating_add(1);
        let Ok(value) = encode(&record) else { return };
        let txn = StoreTxn {
            when: vec![Compare::mod_revision(key.to_string(), CmpOp::Equal, entry.mod_revision)],
            then: vec![Op::put(key.to_string(), value, 0)],
            ..StoreTxn::default()
        };
        match api.txn("give a join token's use back", txn, false).await {
            Ok(done) if done.succeeded => return,
            Ok(_) => continue,
            Err(e) => tracing::warn!(error = %e.message(), %machine, "cannot give a join token's use back yet"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::error!(%machine, key, "gave up giving a join token's use back: the machine needs a new token");
}

async fn admit_machine(api: &Api, req: wire::JoinRequest) -> Result<wire::Joined, ApiError> {
    let join = joining(api)?.clone();
    let token = JoinToken::parse(&req.token).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let machine = fleet_model::machine::parse_machine_id(&req.machine_id)
        .map_err(|e| ApiError::bad_request(format!("machineID: {e}")))?
        .to_string();
    let ips: Vec<IpAddr> = req
        .ips
        .iter()
        .map(|ip| ip.parse().map_err(|_| ApiError::bad_request(format!("ips: {ip:?} is not an IP address"))))
        .collect::<Result<_, _>>()?;
    let key = api.keys.join_token(&token.id);
    let entry = api.read_key("read join token", &key, false).await?;
    let record = entry.as_ref().and_then(|e| decode::<JoinTokenRecord>(&e.value).ok());
    let offered = fleet_store::tls::sha256_hex(token.secret.as_bytes());
    // Hashes are compared, not secrets: how long the comparison takes tells nothing usable
    // about the secret (finding a prefix of its SHA-256 does not find the secret).
    let matches = record.as_ref().is_some_and(|r| r.secret_sha256 == offered);
    let after = admit(record.as_ref(), matches, &machine, now_unix()).map_err(|r| {
        let status = match r {
            Refusal::Unknown => StatusCode::UNAUTHORIZED,
            Refusal::AlreadyJoined(..) => StatusCode::CONFLICT,
            Refusal::Expired(_) | Refusal::UsedUp(_) | Refusal::NotForMachine(..) => StatusCode::FORBIDDEN,
        };
        ApiError::new(status, r.to_string())
    })?;
    // Signed before anything is stored: a bad request stops here with nothing to undo.
    let certificate = join
        .ca
        .sign_request(&req.csr, &crate::pki::machine_identity(&machine), &ips, crate::pki::Usage::Both)
        .map_err(|e| ApiError::bad_request(format!("csr: {e}")))?;
    // The use is taken in a transaction that holds only if nobody used the token meanwhile.
    let seen = entry.map(|e| e.mod_revision).unwrap_or(0);
    let take = StoreTxn {
        when: vec![Compare::mod_revision(key.clone(), CmpOp::Equal, seen)],
        then: vec![Op::put(key.clone(), encode(&after).map_err(|e| ApiError::internal(e.to_string()))?, 0)],
        ..StoreTxn::default()
    };
    let done = api.txn("take a join token's use", take, false).await?;
    if !done.succeeded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("join token {} was used or changed during this join; try again", token.id),
        ));
    }
    if let Err(e) = join.accounts.add(&machine).await {
        // Nothing of a failed join stays: an account it made part of is removed (not one that
        // existed before: that machine joined earlier), and the use is given back, so the
        // machine's next attempt can succeed.
        if let AccountError::Incomplete(_) = e {
            if let Err(undo) = join.accounts.remove(&machine).await {
                tracing::warn!(error = %undo, %machine, "cannot remove what a failed join made of the machine's etcd account");
            }
        }
        give_back(api, &key, &machine).await;
        return Err(match e {
            AccountError::Exists(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            AccountError::Etcd(_) | AccountError::Incomplete(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("creating the machine's etcd user: {e}"))
            }
        });
    }
    Ok(wire::Joined {
        certificate,
        ca: join.ca_pem.clone(),
        etcd_ca: join.etcd_ca_pem.clone(),
        etcd_endpoints: join.etcd_endpoints.clone(),
        etcd_prefix: join.etcd_prefix.clone(),
        metadata: after.metadata,
    })
}
