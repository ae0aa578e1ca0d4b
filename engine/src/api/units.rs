//! `/units` and `/units/{name}`: list, read, create (one or many), replace, change desired state,
//! destroy, and move requests. Every body is validated before anything is written.

use super::*;

pub(crate) async fn list_units(State(api): State<Api>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let limit = q.limit(&api)?;
    let start = page_of(q.next_page_token.as_deref(), limit)?;
    let globs = fleet_model::glob::UnitGlob::list(q.unit_name.as_deref().unwrap_or_default())
        .map_err(|e| ApiError::bad_request(format!("unitName {e}")))?;
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some("unplaced") => Some(None),
        Some(s) => Some(Some(
            s.parse::<DesiredState>()
                .map_err(|_| ApiError::bad_request(format!("state {s:?}: inactive, loaded, launched or unplaced")))?,
        )),
    };
    let basic = match q.view.as_deref() {
        None | Some("") | Some("full") => false,
        Some("basic") => true,
        Some(other) => return Err(ApiError::bad_request(format!("view {other:?}: basic or full"))),
    };
    let (units, next) = api.cluster.read(|v| {
        let wanted = |u: &&UnitRecord| {
            (globs.is_empty() || globs.iter().any(|g| g.matches(u.name.as_str())))
                && state.is_none_or(|s| match s {
                    // Wants a machine and has none: what a dashboard shows as waiting.
                    None => {
                        u.desired_state != DesiredState::Inactive && placement_of(v, u).1.is_some_and(|m| m.is_empty())
                    }
                    Some(s) => placement_of(v, u).0 == s,
                })
        };
        let from = v.units.range::<str, _>((after(&start), Bound::Unbounded)).map(|(_, u)| u).filter(wanted);
        let (page, next) = paginate(from, &start, limit, |u| u.name.to_string());
        let units = page
            .into_iter()
            .map(|u| match basic {
                true => api_unit_basic(v, u),
                false => api_unit(v, u),
            })
            .collect::<Vec<wire::Unit>>();
        (units, next)
    });
    Ok(Json(wire::UnitPage { units, next_page_token: next }).into_response())
}

pub(crate) async fn get_unit(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let name = parse_name(&name)?;
    if let Some(u) = api.cluster.read(|v| v.units.get(&name).map(|u| api_unit(v, u))) {
        return Ok(Json(u).into_response());
    }
    // Not in this replica's view. Before saying 404, ask etcd itself: the view may lag a write
    // just made through another path (its watch can sit on an etcd member that died).
    let stored_unit = api.read_key("read unit", &api.keys.unit(&name), false).await?;
    let Some(rec) = stored_unit.and_then(|e| decode::<UnitRecord>(&e.value).ok()) else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unit does not exist"));
    };
    api.cluster.kick();
    let body = api.read_key("read unit body", &api.keys.body(&rec.hash), false).await?;
    let options = body
        .and_then(|e| UnitFile::parse(&String::from_utf8_lossy(&e.value)).ok())
        .map(|f| f.options)
        .unwrap_or_default();
    Ok(Json(wire::Unit {
        name: rec.name.to_string(),
        options,
        desired_state: rec.desired_state.to_string(),
        current_state: DesiredState::Inactive.to_string(),
        ..Default::default()
    })
    .into_response())
}

/// A `PUT /units/{name}` request, checked without looking at the cluster.
#[derive(Debug)]
pub struct PutUnit {
    pub name: UnitName,
    pub desired: Option<DesiredState>,
    /// The unit file, when the request carries one, and its rules.
    pub file: Option<(UnitFile, Rules)>,
}

/// Decodes and validates a `PUT /units/{name}` body: everything that can be said about it
/// without the cluster (the fuzz target `api_put_unit` drives this with arbitrary input).
pub fn parse_put_unit(url_name: &str, body: &[u8]) -> Result<PutUnit, ApiError> {
    let req: wire::Unit =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("unable to decode body: {e}")))?;
    if !req.name.is_empty() && req.name != url_name {
        return Err(ApiError::bad_request(format!(
            "name in URL {url_name:?} differs from unit name in request body {:?}",
            req.name
        )));
    }
    check_put(url_name, &req.desired_state, req.options)
}

/// What a request to change one unit says, checked without looking at the cluster: its name, a
/// desired state (empty: unchanged) and unit file options (empty: unchanged).
pub(crate) fn check_put(name: &str, desired: &str, options: Vec<UnitOption>) -> Result<PutUnit, ApiError> {
    let name = parse_name(name)?;
    let desired = match desired {
        "" => None,
        s => Some(s.parse::<DesiredState>().map_err(|e| ApiError::bad_request(e.to_string()))?),
    };
    if name.is_template() && desired.is_some_and(|d| d != DesiredState::Inactive) {
        return Err(ApiError::bad_request(format!("cannot activate template {:?}", name.as_str())));
    }
    let file = match options.is_empty() {
        true => None,
        false => {
            let f = UnitFile::from_options(options);
            validate_options(&f)?;
            // What depends on the instance is checked when an instance is made.
            let rules = match name.is_template() {
                true => Rules::parse_template(&name, &f),
                false => Rules::parse(&name, &f),
            }
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
            Some((f, rules))
        }
    };
    Ok(PutUnit { name, desired, file })
}

pub(crate) async fn put_unit(
    State(api): State<Api>,
    caller: Option<axum::Extension<Caller>>,
    Path(url_name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_json(&headers)?;
    let PutUnit { name, desired, file } = parse_put_unit(&url_name, &body)?;
    if let Some((_, rules)) = &file {
        check_replace_cycles(&api, &name, rules)?;
    }
    fresh(&api).await?;
    let key = api.keys.unit(&name);
    // Optimistic concurrency: read, decide, write only if the unit did not change meanwhile.
    for _ in 0..5 {
        let existing =
            api.read_key("read unit", &key, false).await?.map(|e| (decode::<UnitRecord>(&e.value), e.mod_revision));
        let new_file = file.as_ref().map(|(f, _)| f.clone());
        // New unit, or new contents: the body's desired state or `inactive`, guarded by what was read.
        let fresh = |f: &UnitFile, guard: Compare| {
            let rec = UnitRecord {
                name: name.clone(),
                hash: f.hash().into(),
                desired_state: desired.unwrap_or(DesiredState::Inactive),
            };
            (StatusCode::CREATED, rec, Some(f.canonical()), guard)
        };
        let submits = match (&existing, &new_file) {
            (None, _) => true,
            (Some((Ok(old), _)), Some(f)) => f.hash() != old.hash,
            _ => false,
        };
        if submits {
            let caller = caller.as_ref().map(|c| c.0.clone()).unwrap_or(Caller {
                who: "?".into(),
                role: Role::Read,
                machine: None,
            });
            caller.require(Role::Admin, &format!("submitting the unit file of {name}"))?;
        }
        let (status, record, body_text, guard) = match (existing, new_file) {
            (None, None) => {
                return Err(ApiError::new(StatusCode::CONFLICT, "unit does not exist and options field empty"))
            }
            (None, Some(f)) => fresh(&f, Compare::create_revision(key.clone(), CmpOp::Equal, 0)),
            (Some((Err(e), _)), _) => return Err(ApiError::internal(format!("stored unit is unreadable: {e}"))),
            (Some((Ok(old), rev)), Some(f)) if f.hash() != old.hash => {
                fresh(&f, Compare::mod_revision(key.clone(), CmpOp::Equal, rev))
            }
            (Some((Ok(old), rev)), _) => {
                let Some(d) = desired else {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "must provide DesiredState to update existing unit",
                    ));
                };
                if d == old.desired_state {
                    return Ok(StatusCode::NO_CONTENT.into_response());
                }
                (
                    StatusCode::NO_CONTENT,
                    UnitRecord { desired_state: d, ..old },
                    None,
                    Compare::mod_revision(key.clone(), CmpOp::Equal, rev),
                )
            }
        };
        let mut ops = Vec::new();
        if let Some(text) = &body_text {
            ops.push(Op::put(api.keys.body(&record.hash), text.clone(), 0));
        }
        ops.push(Op::put(key.clone(), encode(&record).map_err(|e| ApiError::internal(e.to_string()))?, 0));
        let txn = StoreTxn { when: vec![guard], then: ops, ..StoreTxn::default() };
        let done = api.txn("write unit", txn, false).await?;
        if done.succeeded {
            api.wrote(done.revision);
            let what = if body_text.is_some() { "unit file submitted, " } else { "" };
            let detail = AuditDetail(format!("{what}desired state {}", record.desired_state));
            return Ok((status, axum::Extension(detail)).into_response());
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, format!("unit {name} changed concurrently; try again")))
}

/// Decodes and validates a `POST /units` body: every unit, before anything is written (the
/// fuzz target `api_create_units` drives this with arbitrary input).
pub fn parse_create_units(body: &[u8]) -> Result<NewUnits, ApiError> {
    let req: wire::CreateUnits =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("unable to decode body: {e}")))?;
    if req.units.is_empty() {
        return Err(ApiError::bad_request("units is empty"));
    }
    if req.units.len() > MAX_UNITS_PER_REQUEST {
        return Err(ApiError::bad_request(format!(
            "{} units in one request; at most {MAX_UNITS_PER_REQUEST}",
            req.units.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let mut records = Vec::with_capacity(req.units.len());
    for (i, u) in req.units.iter().enumerate() {
        let at = |e: String| ApiError::bad_request(format!("units[{i}] ({}): {e}", u.name));
        let name = UnitName::parse(&u.name).map_err(|e| at(e.to_string()))?;
        if !seen.insert(name.clone()) {
            return Err(at("named twice in this request".into()));
        }
        if u.options.is_empty() {
            return Err(at("options field empty".into()));
        }
        let desired = match u.desired_state.as_str() {
            "" => DesiredState::Inactive,
            s => s.parse::<DesiredState>().map_err(|e| at(e.to_string()))?,
        };
        if name.is_template() && desired != DesiredState::Inactive {
            return Err(at("cannot activate a template".into()));
        }
        let f = UnitFile::from_options(u.options.clone());
        validate_options(&f).map_err(|e| at(e.message().to_string()))?;
        let rules = match name.is_template() {
            true => {
                Rules::parse_template(&name, &f).map_err(|e| at(e.to_string()))?;
                None
            }
            false => Some(Rules::parse(&name, &f).map_err(|e| at(e.to_string()))?),
        };
        records.push((UnitRecord { name, hash: f.hash().into(), desired_state: desired }, f, rules));
    }
    Ok(NewUnits { units: records, keep_existing: req.keep_existing })
}

/// A validated `POST /units` body.
pub struct NewUnits {
    /// Each unit's record, unit file and rules (none for a template).
    pub units: Vec<(UnitRecord, UnitFile, Option<Rules>)>,
    /// Whether units that exist are answered rather than refused.
    pub keep_existing: bool,
}

/// Cuts new units into transactions of at most [`TXN_OPS`] writes: each unit's record and,
/// once a transaction, each distinct body. Instances of one template share their body, so a
/// transaction carries 119 of them (at most 60 with every body different); what a million
/// units cost etcd is mostly per transaction.
pub(crate) fn txn_chunks<T>(units: &[T], hash: impl Fn(&T) -> &str) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let (mut start, mut bodies) = (0, std::collections::HashSet::new());
    for (i, u) in units.iter().enumerate() {
        let new_body = !bodies.contains(hash(u));
        if i - start + bodies.len() + 1 + usize::from(new_body) > TXN_OPS {
            chunks.push(&units[start..i]);
            start = i;
            bodies.clear();
        }
        bodies.insert(hash(u));
    }
    if start < units.len() {
        chunks.push(&units[start..]);
    }
    chunks
}

/// Not in the original API: creates many new units in one request, as many small transactions
/// (each unit with its body, guarded so an existing unit is never overwritten). Everything is
/// validated before anything is written; a unit that already exists is refused with 409 and the
/// units of that transaction are not written (those of earlier transactions are), unless the
/// request says `keepExisting`: then existing units are left alone and answered.
pub(crate) async fn create_units(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, BatchError> {
    check_json(&headers)?;
    let NewUnits { units, keep_existing } = parse_create_units(&body)?;
    let mut records = Vec::with_capacity(units.len());
    for (i, (record, f, rules)) in units.into_iter().enumerate() {
        if let Some(rules) = &rules {
            check_replace_cycles(&api, &record.name, rules)
                .map_err(|e| ApiError::bad_request(format!("units[{i}] ({}): {}", record.name, e.message())))?;
        }
        records.push((record, f.canonical()));
    }
    fresh(&api).await?;
    tracing::debug!(units = records.len(), "creating units");
    let mut last_rev = 0;
    // With `keepExisting`: the units found to exist, and the newest revision they were written at.
    let (mut kept, mut kept_rev) = (Vec::new(), 0);
    for chunk in txn_chunks(&records, |(r, _)| r.hash.as_str()) {
        let mut chunk: Vec<&(UnitRecord, String)> = chunk.iter().collect();
        // A unit that exists with the same contents and desired state counts as created, so a
        // client may retry a request whose answer it did not get.
        for _ in 0..3 {
            match write_new_units(&api, &chunk).await? {
                Ok(rev) => {
                    last_rev = rev;
                    chunk.clear();
                    break;
                }
                Err(existing) if keep_existing => {
                    chunk.retain(|(r, _)| !existing.iter().any(|e| e.name == r.name));
                    for e in existing {
                        kept_rev = kept_rev.max(e.revision);
                        kept.push(e.name);
                    }
                    if chunk.is_empty() {
                        break;
                    }
                }
                Err(existing) => {
                    let differing: Vec<String> = existing
                        .iter()
                        .filter(|e| chunk.iter().any(|(r, _)| r.name == e.name && Some(r) != e.stored.as_ref()))
                        .map(|e| e.name.to_string())
                        .collect();
                    // Earlier transactions of the request stay written: say so, and which.
                    let what = match last_rev {
                        0 => "units already exist with other contents or state".to_string(),
                        _ => format!("units already exist with other contents or state (units before them in the request were created, up to revision {last_rev})"),
                    };
                    let refused = differing
                        .into_iter()
                        .map(|name| wire::UnitError { name, error: "exists with other contents or state".into() })
                        .collect();
                    refuse_batch(StatusCode::CONFLICT, &what, refused)?;
                    chunk.retain(|(r, _)| !existing.iter().any(|e| e.name == r.name));
                    if chunk.is_empty() {
                        break;
                    }
                }
            }
        }
        if !chunk.is_empty() {
            return Err(ApiError::new(StatusCode::CONFLICT, "units changed concurrently; try again").into());
        }
    }
    tracing::debug!(units = records.len(), kept = kept.len(), revision = last_rev, "units created; settling");
    api.wrote(last_rev);
    let mut answer = wire::Created { created: records.len() - kept.len(), revision: last_rev, ..Default::default() };
    if !kept.is_empty() {
        // The existing units as this replica's view holds them, once it has caught up with
        // their last writes (they may have been written through another replica).
        if api.cluster.revision() < kept_rev {
            settle(&api, kept_rev).await;
        }
        let found = api.cluster.read(|v| find(v, &kept));
        if !found.missing.is_empty() {
            // Destroyed between its transaction and this read: neither created nor there.
            let refused = found
                .missing
                .into_iter()
                .map(|name| wire::UnitError { name, error: "destroyed while being created; try again".into() })
                .collect();
            refuse_batch(StatusCode::CONFLICT, "units changed concurrently; try again", refused)?;
        }
        (answer.existing, answer.states) = (found.units, found.states);
    }
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// A unit found to exist by a guarded create: its name, what is stored for it (`None` if it
/// cannot be decoded) and the revision it was last written at.
pub(crate) struct Existing {
    pub(crate) name: UnitName,
    pub(crate) stored: Option<UnitRecord>,
    pub(crate) revision: i64,
}

/// Writes units that must not exist yet, in one transaction. `Ok(revision)`, or the units of
/// `chunk` that exist already with what is stored for them.
pub(crate) async fn write_new_units(
    api: &Api,
    chunk: &[&(UnitRecord, String)],
) -> Result<Result<i64, Vec<Existing>>, ApiError> {
    let mut guards = Vec::new();
    let mut ops = Vec::new();
    let mut bodies = std::collections::HashSet::new();
    for (rec, text) in chunk {
        let key = api.keys.unit(&rec.name);
        guards.push(Compare::create_revision(key.clone(), CmpOp::Equal, 0));
        if bodies.insert(rec.hash.clone()) {
            ops.push(Op::put(api.keys.body(&rec.hash), text.as_str(), 0));
        }
        ops.push(Op::put(key, encode(rec).map_err(|e| ApiError::internal(e.to_string()))?, 0));
    }
    // What exists already is read in the same transaction, for the refusal's per-unit answer.
    let reads = chunk.iter().map(|(rec, _)| Op::Get(api.keys.unit(&rec.name).into_bytes())).collect();
    let done = api.txn("write units", StoreTxn { when: guards, then: ops, otherwise: reads }, true).await?;
    if done.succeeded {
        return Ok(Ok(done.revision));
    }
    let existing = chunk
        .iter()
        .zip(got(&done))
        .filter_map(|((rec, _), e)| {
            e.map(|e| Existing {
                name: rec.name.clone(),
                stored: decode::<UnitRecord>(&e.value).ok(),
                revision: e.mod_revision,
            })
        })
        .collect();
    Ok(Err(existing))
}

/// Refuses a unit that would replace a unit which replaces it: neither could ever settle.
pub(crate) fn check_replace_cycles(api: &Api, name: &UnitName, rules: &Rules) -> Result<(), ApiError> {
    if rules.replaces.is_empty() {
        return Ok(());
    }
    api.cluster.read(|v| {
        for (other, r) in v.rules.iter().filter(|(o, _)| *o != name) {
            if let Ok(r) = r {
                if rules.replaces_unit(name.as_str(), other.as_str()) && r.replaces_unit(other.as_str(), name.as_str())
                {
                    return Err(ApiError::bad_request(format!(
                        "circular Replaces: {name} and {other} replace each other"
                    )));
                }
            }
        }
        Ok(())
    })
}

pub(crate) fn validate_options(f: &UnitFile) -> Result<(), ApiError> {
    if f.options.len() > MAX_UNIT_OPTIONS {
        return Err(ApiError::bad_request(format!(
            "unit file has {} options; at most {MAX_UNIT_OPTIONS}",
            f.options.len()
        )));
    }
    let size: usize = f.options.iter().map(|o| o.section.len() + o.name.len() + o.value.len() + 4).sum();
    if size > MAX_UNIT_FILE_BYTES {
        return Err(ApiError::bad_request(format!("unit file is {size} bytes; at most {MAX_UNIT_FILE_BYTES}")));
    }
    for o in &f.options {
        if o.section.is_empty() || o.name.is_empty() {
            return Err(ApiError::bad_request("unit option with empty section or name"));
        }
        if o.section.contains(['[', ']', '\n']) || o.name.contains(['=', '\n']) {
            return Err(ApiError::bad_request(format!("invalid unit option [{}] {}", o.section, o.name)));
        }
        if o.value.len() >= fleet_model::unit_file::MAX_LINE {
            return Err(ApiError::bad_request(format!(
                "option [{}] {}: line too long (max {} bytes)",
                o.section,
                o.name,
                fleet_model::unit_file::MAX_LINE
            )));
        }
    }
    Ok(())
}

/// Not in the original API: asks the leader to move a placed unit to `machineID` (full id or
/// unique prefix), or to the best other machine when none is given. 202: the request is stored;
/// the unit's `machineID` changes when it is done, or `moveRefused` says why it was not.
pub(crate) async fn move_unit(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let name = parse_name(&name)?;
    fresh(&api).await?;
    let req: wire::MoveRequest = if body.is_empty() {
        wire::MoveRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("unable to decode body: {e}")))?
    };
    let request = api.cluster.read(|v| {
        if !v.units.contains_key(&name) {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "unit does not exist"));
        }
        if matches!(v.rules.get(&name), Some(Ok(r)) if r.global) {
            return Err(ApiError::bad_request(format!("{name} is global: it runs on every eligible machine")));
        }
        let Some(from) = v.schedule.get(&name).and_then(|e| e.keys().next()).map(|m| m.to_string()) else {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("{name} is not scheduled to any machine")));
        };
        let to = if req.machine_id.is_empty() {
            String::new()
        } else {
            let matches: Vec<&String> = v.machines.keys().filter(|m| m.starts_with(&req.machine_id)).collect();
            match matches.as_slice() {
                [one] => (*one).clone(),
                [] => return Err(ApiError::bad_request(format!("no machine matches {:?}", req.machine_id))),
                _ => return Err(ApiError::bad_request(format!("machine id {:?} is ambiguous", req.machine_id))),
            }
        };
        if to == from {
            return Err(ApiError::bad_request(format!("{name} already runs on {to}")));
        }
        Ok(fleet_model::schema::MoveRequest { from, to, refused: String::new() })
    })?;
    let value = encode(&request).map_err(|e| ApiError::internal(e.to_string()))?;
    api.put_key("write move request", api.keys.moves(&name), value).await?;
    Ok((StatusCode::ACCEPTED, Json(wire::MoveAccepted { from: request.from, machine_id: request.to })).into_response())
}

/// Forgets a (refused) move request.
pub(crate) async fn forget_move(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let name = parse_name(&name)?;
    fresh(&api).await?;
    api.delete_key("delete move request", api.keys.moves(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn delete_unit(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let name = parse_name(&name)?;
    fresh(&api).await?;
    if !api.delete_key("delete unit", api.keys.unit(&name)).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unit does not exist"));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The named units in `v`, their states, and which it does not hold.
pub(crate) fn find(v: &ClusterView, names: &[UnitName]) -> wire::Found {
    let mut found = wire::Found { units: Vec::new(), states: Vec::new(), missing: Vec::new() };
    for name in names {
        let Some(rec) = v.units.get(name) else {
            found.missing.push(name.to_string());
            continue;
        };
        found.units.push(api_unit(v, rec));
        for (m, s) in v.states.get(name).into_iter().flatten() {
            found.states.push(api_state(name, m, s));
        }
    }
    found
}
