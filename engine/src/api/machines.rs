//! `/machines`: listing, metadata changes, drain and undrain.

use super::*;

/// `PATCH /machines`: add/replace/remove metadata keys. Every operation is validated first and
/// all are applied in one etcd transaction, so a bad operation changes nothing.
pub(crate) async fn patch_machines(State(api): State<Api>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let ops: Vec<wire::MetadataOp> =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("unable to decode body: {e}")))?;
    if ops.len() > fleet_model::machine::MAX_METADATA_KEYS {
        return Err(ApiError::bad_request(format!(
            "{} operations in one request; at most {}",
            ops.len(),
            fleet_model::machine::MAX_METADATA_KEYS
        )));
    }
    let mut writes = Vec::new();
    for op in &ops {
        let parts: Vec<&str> = op.path.split('/').collect();
        let (machine, key) = match parts.as_slice() {
            ["", m, "metadata", k] if fleet_model::machine::parse_machine_id(m).is_ok() => (*m, *k),
            // The original's message, word for word: clients match on it.
            _ => return Err(ApiError::bad_request("machine metadata path invalid")),
        };
        let value = match op.value.as_ref() {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Object(o)) => o.get("value").and_then(|v| v.as_str()).unwrap_or("").to_string(),
            _ => String::new(),
        };
        fleet_model::machine::check_metadata(key, &value)
            .map_err(|e| ApiError::bad_request(format!("machine metadata: {e}")))?;
        match op.op.as_str() {
            "add" | "replace" if value.is_empty() => {
                return Err(ApiError::bad_request("invalid value: add and replace require a value"))
            }
            "add" | "replace" => writes.push(Op::put(api.keys.metadata(machine, key), value, 0)),
            // An empty value is a tombstone: it also hides a key from the machine's own config.
            "remove" => writes.push(Op::put(api.keys.metadata(machine, key), "", 0)),
            _ => return Err(ApiError::bad_request("invalid op: expect add, remove, or replace")),
        }
    }
    fresh(&api).await?;
    if !writes.is_empty() {
        let txn = StoreTxn { then: writes, ..StoreTxn::default() };
        let done = api.txn("write metadata", txn, false).await?;
        api.wrote(done.revision);
    }
    Ok((StatusCode::NO_CONTENT, [(header::CONTENT_TYPE, "application/json")]).into_response())
}

/// The one live machine whose id starts with `prefix`.
pub(crate) fn machine_by_prefix(api: &Api, prefix: &str) -> Result<String, ApiError> {
    api.cluster.read(|v| {
        let found: Vec<&String> = v.machines.keys().chain(v.drained.iter()).filter(|m| m.starts_with(prefix)).collect();
        let mut found: Vec<&String> =
            found.into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        match found.len() {
            1 => Ok(found.remove(0).clone()),
            0 => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no machine matches {prefix:?}"))),
            _ => Err(ApiError::bad_request(format!("machine id {prefix:?} is ambiguous"))),
        }
    })
}

/// Not in the original API: drain a machine. Its units are moved elsewhere and it takes no
/// new ones until undrained (DELETE).
pub(crate) async fn drain_machine(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let id = machine_by_prefix(&api, &id)?;
    api.put_key("write drain", api.keys.drain(&id), Vec::new()).await?;
    Ok((StatusCode::ACCEPTED, Json(wire::DrainAccepted { id })).into_response())
}

pub(crate) async fn undrain_machine(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let id = machine_by_prefix(&api, &id)?;
    api.delete_key("delete drain", api.keys.drain(&id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn list_machines(State(api): State<Api>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let limit = q.limit(&api)?;
    let start = page_of(q.next_page_token.as_deref(), limit)?;
    let (machines, next) = api.cluster.read(|v| {
        let from = v.machines.range::<str, _>((after(&start), Bound::Unbounded)).map(|(_, m)| m);
        let (page, next) = paginate(from, &start, limit, |m| m.id.clone());

        let machines: Vec<wire::Machine> = page
            .into_iter()
            .map(|m| wire::Machine {
                id: m.id.clone(),
                primary_ip: m.public_ip.clone(),
                metadata: m.metadata.clone(),
                drained: v.drained.contains(&m.id),
                units: v.scheduled_on.get(&m.id).copied().unwrap_or(0) as u64,
            })
            .collect();
        (machines, next)
    });
    Ok(Json(wire::MachinePage { machines, next_page_token: next }).into_response())
}
