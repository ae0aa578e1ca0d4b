//! `/state`: what each machine's systemd reports for its units.

use super::*;

pub(crate) async fn list_states(State(api): State<Api>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let limit = q.limit(&api)?;
    let start = page_of(q.next_page_token.as_deref(), limit)?;
    // A state's key in the listing is its unit and machine; unit names cannot hold a NUL.
    let cursor = start.after.as_deref().map(|a| a.split_once('\0').unwrap_or((a, "")));
    let (states, next) = api.cluster.read(|v| {
        let from = cursor.map_or(Bound::Unbounded, |(u, _)| Bound::Included(u));
        let matching = v
            .states
            .range::<str, _>((from, Bound::Unbounded))
            .filter(|(u, _)| q.unit_name.as_deref().is_none_or(|n| n == u.as_str()))
            .flat_map(|(u, per)| {
                per.iter()
                    .filter(|(m, _)| q.machine_id.as_deref().is_none_or(|id| id == m.as_str()))
                    .map(move |(m, s)| (u, m, s))
            })
            .skip_while(|(u, m, _)| cursor.is_some_and(|c| (u.as_str(), m.as_str()) <= c));
        let (page, next) = paginate(matching, &start, limit, |(u, m, _)| format!("{u}\0{m}"));
        let states: Vec<wire::UnitState> = page.into_iter().map(|(u, m, s)| api_state(u, m, s)).collect();
        (states, next)
    });
    Ok(Json(wire::UnitStatePage { states, next_page_token: next }).into_response())
}

pub(crate) async fn get_state(State(api): State<Api>, Path(name): Path<String>) -> Result<Response, ApiError> {
    fresh(&api).await?;
    let name = parse_name(&name)?;
    api.cluster
        .read(|v| v.states.get(&name).and_then(|per| per.iter().next()).map(|(m, s)| api_state(&name, m, s)))
        .map(|s| Json(s).into_response())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unit state does not exist"))
}
