//! `/rollouts`: ask for a rollout of a new version over a service, watch it, and pause, resume,
//! promote or undo it (docs/services.md). The API writes what the user asked; the leader does
//! the rest (`crate::leader::rolling`).

use super::*;
use fleet_model::rollout::{self, Action, RolloutRecord, RolloutSpec};

/// A replaced instance's time to become healthy, unless the request says.
const DEFAULT_DEADLINE_SECS: u64 = 300;

/// A rollout as the API shows it, its instances as the view has them.
fn show(v: &ClusterView, service: &UnitName, r: &RolloutRecord) -> wire::Rollout {
    let instances = crate::leader::rolling::instances_of(v, service)
        .into_iter()
        .map(|(name, i)| {
            let machine = UnitName::parse(&name)
                .ok()
                .and_then(|n| v.schedule.get(&n).and_then(|e| e.keys().next().map(|m| m.to_string())))
                .unwrap_or_default();
            let version = if i.version == r.version {
                "new".to_string()
            } else if i.version == r.previous {
                "previous".to_string()
            } else {
                i.version.clone()
            };
            wire::RolloutInstance {
                done: r.instances.get(&name).is_some_and(|p| p.done),
                name,
                version,
                machine,
                active_state: i.active_state,
                health: i.health.map(|h| h.as_str().to_string()).unwrap_or_default(),
            }
        })
        .collect();
    wire::Rollout {
        service: r.service.clone(),
        phase: r.phase.as_str().to_string(),
        reverting: r.reverting,
        why_back: r.why_back.clone(),
        version: r.version.clone(),
        previous: r.previous.clone(),
        max_parallel: r.spec.max_parallel,
        canaries: r.spec.canaries,
        promoted: r.promoted,
        min_healthy_secs: r.spec.min_healthy_secs,
        deadline_secs: r.spec.deadline_secs,
        note: r.note.clone(),
        created: rfc3339(r.created as i64),
        instances,
    }
}

pub(crate) async fn list_rollouts(State(api): State<Api>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let rollouts = api.cluster.read(|v| v.rollouts.iter().map(|(s, r)| show(v, s, r)).collect());
    Ok(Json(wire::RolloutList { rollouts }).into_response())
}

pub(crate) async fn get_rollout(State(api): State<Api>, Path(service): Path<String>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let service = parse_name(&service)?;
    api.cluster
        .read(|v| v.rollouts.get(&service).map(|r| show(v, &service, r)))
        .map(|r| Json(r).into_response())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no rollout of {service}")))
}

/// Checks a rollout request without the cluster: the service's name, the unit file (its rules
/// for a template as far as they go without an instance) and the settings.
pub(crate) fn parse_rollout(body: &[u8]) -> Result<(UnitName, UnitFile, RolloutSpec), ApiError> {
    let req: wire::RolloutRequest =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("unable to decode body: {e}")))?;
    let service = parse_name(&req.service)?;
    if service.is_instance() {
        return Err(ApiError::bad_request(format!(
            "{service} is an instance: roll out its template ({}) or a unit",
            service.template().map(|t| t.to_string()).unwrap_or_default()
        )));
    }
    if req.options.is_empty() {
        return Err(ApiError::bad_request("options field empty: the new version's unit file"));
    }
    let file = UnitFile::from_options(req.options);
    validate_options(&file)?;
    match service.is_template() {
        true => Rules::parse_template(&service, &file),
        false => Rules::parse(&service, &file),
    }
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let max_parallel = req.max_parallel.unwrap_or(1);
    if max_parallel == 0 || max_parallel as usize > rollout::MAX_STEP {
        return Err(ApiError::bad_request(format!("maxParallel must be from 1 to {}", rollout::MAX_STEP)));
    }
    let deadline_secs = req.deadline_secs.unwrap_or(DEFAULT_DEADLINE_SECS);
    if deadline_secs == 0 {
        return Err(ApiError::bad_request("deadlineSecs must be at least 1"));
    }
    let spec = RolloutSpec {
        max_parallel,
        canaries: req.canaries.unwrap_or(0),
        min_healthy_secs: req.min_healthy_secs.unwrap_or(0),
        deadline_secs,
    };
    Ok((service, file, spec))
}

pub(crate) async fn create_rollout(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_json(&headers)?;
    let (service, file, spec) = parse_rollout(&body)?;
    fresh(&api).await?;
    let version = file.hash();
    let key = api.keys.rollout(&service);
    // What runs now, as the view has it: one version over the launched instances.
    let previous = api.cluster.read(|v| {
        let instances = crate::leader::rolling::instances_of(v, &service);
        if instances.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("{service} has no launched instances to roll over (start some first)"),
            ));
        }
        // Each instance's own rules with the new version (`%i` in them is per instance).
        for name in instances.keys() {
            let Ok(n) = UnitName::parse(name) else { continue };
            Rules::parse(&n, &file).map_err(|e| ApiError::bad_request(format!("{name}: {e}")))?;
        }
        let versions: std::collections::BTreeSet<&str> = instances.values().map(|i| i.version.as_str()).collect();
        let previous = match versions.into_iter().collect::<Vec<_>>().as_slice() {
            [one] => one.to_string(),
            many => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("{service}'s instances run {} different versions: finish or undo first", many.len()),
                ))
            }
        };
        if previous == version {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("{service} already runs this version")));
        }
        Ok(previous)
    })?;
    let existing = api.read_key("read rollout", &key, false).await?;
    let guard = match &existing {
        None => Compare::create_revision(key.clone(), CmpOp::Equal, 0),
        Some(e) => {
            let old = decode::<RolloutRecord>(&e.value).map_err(|e| ApiError::internal(e.to_string()))?;
            if !old.phase.is_over() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("a rollout of {service} is {} (fleetctl rollout status {service})", old.phase.as_str()),
                ));
            }
            Compare::mod_revision(key.clone(), CmpOp::Equal, e.mod_revision)
        }
    };
    let mut record = RolloutRecord::new(service.as_str(), &version, &previous, spec, crate::leader::unix_now());
    record.note = "asked for".into();
    let value = encode(&record).map_err(|e| ApiError::internal(e.to_string()))?;
    let txn = StoreTxn {
        when: vec![guard],
        then: vec![Op::put(api.keys.body(&version), file.canonical(), 0), Op::put(key, value, 0)],
        ..StoreTxn::default()
    };
    let done = api.txn("write rollout", txn, false).await?;
    if !done.succeeded {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("a rollout of {service} was asked for meanwhile")));
    }
    api.wrote(done.revision);
    let shown = api.cluster.read(|v| show(v, &service, &record));
    let detail = AuditDetail(format!("rollout of {service} to {version}"));
    Ok((StatusCode::CREATED, axum::Extension(detail), Json(shown)).into_response())
}

/// `POST /rollouts/{service}/{action}`: pause, resume, promote or undo.
pub(crate) async fn rollout_action(
    State(api): State<Api>,
    Path((service, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let service = parse_name(&service)?;
    let action: Action = action.parse().map_err(|e: String| ApiError::new(StatusCode::NOT_FOUND, e))?;
    fresh(&api).await?;
    let key = api.keys.rollout(&service);
    // Optimistic: the leader writes the record as the rollout goes.
    for _ in 0..5 {
        let Some(e) = api.read_key("read rollout", &key, false).await? else {
            return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no rollout of {service}")));
        };
        let old = decode::<RolloutRecord>(&e.value).map_err(|e| ApiError::internal(e.to_string()))?;
        let new = rollout::act(&old, action).map_err(|why| ApiError::new(StatusCode::CONFLICT, why))?;
        let value = encode(&new).map_err(|e| ApiError::internal(e.to_string()))?;
        let txn = StoreTxn {
            when: vec![Compare::mod_revision(key.clone(), CmpOp::Equal, e.mod_revision)],
            then: vec![Op::put(key.clone(), value, 0)],
            ..StoreTxn::default()
        };
        let done = api.txn("write rollout", txn, false).await?;
        if done.succeeded {
            api.wrote(done.revision);
            let shown = api.cluster.read(|v| show(v, &service, &new));
            return Ok(Json(shown).into_response());
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, format!("the rollout of {service} changed concurrently; try again")))
}
