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
                    .map(move |(m, s)| (u, m.as_str(), s))
            })
            .skip_while(|(u, m, _)| cursor.is_some_and(|c| (u.as_str(), *m) <= c));
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

/// States per look at the view while streaming: the view's lock is held for one chunk at a time,
/// so a stream of a million rows never holds the watch back for long.
const STREAM_CHUNK: usize = 2_000;
/// The first chunk is small: what a client waits for before it prints its first row.
const FIRST_CHUNK: usize = 100;
/// Chunks buffered ahead of a slow client.
const STREAM_AHEAD: usize = 4;

/// `GET /state:stream` (not in the original API): every state (or one unit's, or one machine's)
/// in one streaming answer, one JSON object a line, in the order `list-units` prints them (unit,
/// then machine). The first line is a [`wire::StateStreamHead`]. The rows are read from the view
/// a chunk at a time, each chunk a range lookup after the last row sent: the answer starts at
/// once and costs the engine O(chunk) per step, however many units there are.
pub(crate) async fn stream_states(State(api): State<Api>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    if q.next_page_token.is_some() || q.page_size.is_some() {
        return Err(ApiError::bad_request("state:stream is not paged: it takes no nextPageToken or pageSize"));
    }
    fresh(&api).await?;
    let unit = q.unit_name.as_deref().map(parse_name).transpose()?;
    let filter = StateFilter { unit, machine: q.machine_id };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(STREAM_AHEAD);
    tokio::spawn(async move {
        let mut after: Option<(UnitName, String)> = None;
        let mut head = true;
        loop {
            let (bytes, last) = api.cluster.read(|v| {
                let mut out = Vec::new();
                if head {
                    // Serialising plain data cannot fail; a line that did would only be missing.
                    let _ = serde_json::to_writer(&mut out, &filter.head(v));
                    out.push(b'\n');
                }
                let max = if head { FIRST_CHUNK } else { STREAM_CHUNK };
                let last = filter.chunk(v, after.as_ref(), max, &mut out);
                (out, last)
            });
            head = false;
            if !bytes.is_empty() && tx.send(axum::body::Bytes::from(bytes)).await.is_err() {
                return; // The client went away.
            }
            match last {
                Some(l) => after = Some(l),
                None => return,
            }
        }
    });
    let stream =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|chunk| chunk.map(Ok::<_, std::convert::Infallible>)));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(stream)).into_response())
}

/// Which states a stream carries.
struct StateFilter {
    unit: Option<UnitName>,
    machine: Option<String>,
}

impl StateFilter {
    /// The states it carries in `v`, from just after `after`, in (unit, machine) order.
    fn states<'v>(
        &'v self,
        v: &'v ClusterView,
        after: Option<&'v (UnitName, String)>,
    ) -> impl Iterator<Item = (&'v UnitName, &'v str, &'v fleet_model::UnitStateRecord)> + 'v {
        let from = match (&self.unit, after) {
            (_, Some((u, _))) => Bound::Included(u.as_str()),
            (Some(u), None) => Bound::Included(u.as_str()),
            (None, None) => Bound::Unbounded,
        };
        let to = self.unit.as_ref().map_or(Bound::Unbounded, |u| Bound::Included(u.as_str()));
        v.states
            .range::<str, _>((from, to))
            .flat_map(move |(u, per)| {
                per.iter()
                    .filter(move |(m, _)| self.machine.as_deref().is_none_or(|id| id == m.as_str()))
                    .map(move |(m, s)| (u, m.as_str(), s))
            })
            .skip_while(move |(u, m, _)| after.is_some_and(|(au, am)| (*u, *m) <= (au, am.as_str())))
    }

    /// How many rows, and the longest value of each column: kept by the view for a stream of
    /// every state (no walk over a million), counted for a filtered one.
    fn head(&self, v: &ClusterView) -> wire::StateStreamHead {
        let (rows, longest) = match (&self.unit, &self.machine) {
            (None, None) => (v.state_stats.rows as u64, v.state_stats.longest),
            _ => {
                let mut longest = [0usize; 7];
                let mut rows = 0u64;
                for (u, m, s) in self.states(v, None) {
                    rows += 1;
                    // Unit names, machine ids and systemd's states are ASCII: bytes are characters.
                    let health = s.health.map_or(0, |h| h.as_str().len());
                    let lens = [u.as_str().len(), s.hash.len(), m.len(), s.load_state.len(), s.active_state.len()];
                    for (l, n) in longest.iter_mut().zip(lens.into_iter().chain([s.sub_state.len(), health])) {
                        *l = (*l).max(n);
                    }
                }
                (rows, longest)
            }
        };
        let names =
            ["name", "hash", "machineID", "systemdLoadState", "systemdActiveState", "systemdSubState", "health"];
        let mut longest: std::collections::BTreeMap<String, u64> =
            names.iter().map(|n| n.to_string()).zip(longest.map(|l| l as u64)).collect();
        // Rows carry their machine's address: its longest over the live machines (O(machines),
        // not O(states)), which bounds every row's.
        let ip = v.machines.values().map(|m| m.public_ip.chars().count()).max().unwrap_or(0);
        longest.insert("machineIP".into(), ip as u64);
        wire::StateStreamHead { rows, longest, machine_ips: true }
    }

    /// Writes up to `max` rows after `after` as lines into `out`; the last row written if there
    /// may be more.
    fn chunk(
        &self,
        v: &ClusterView,
        after: Option<&(UnitName, String)>,
        max: usize,
        out: &mut Vec<u8>,
    ) -> Option<(UnitName, String)> {
        let mut n = 0;
        let mut last = None;
        for (u, m, s) in self.states(v, after) {
            let mut row = api_state(u, m, s);
            row.machine_ip = v.machines.get(m).map(|r| r.public_ip.clone()).unwrap_or_default();
            let _ = serde_json::to_writer(&mut *out, &row);
            out.push(b'\n');
            n += 1;
            if n == max {
                last = Some((u.clone(), m.to_string()));
                break;
            }
        }
        last
    }
}
