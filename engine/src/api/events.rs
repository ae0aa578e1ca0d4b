//! `/events`: what happened in the cluster (not in the original API). A page of the kept history
//! as JSON, or a live stream of server-sent events that a client resumes after a reconnect with
//! `Last-Event-ID`, on this engine or another (ids are etcd revisions; see crate::events).

use super::*;
use crate::events::Filter;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use fleet_api::EventId;
use std::collections::VecDeque;

/// Events one page or one read of a stream holds at most.
const MAX_EVENTS_PER_READ: usize = 10_000;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct EventQuery {
    /// Events after this id (`REVISION.N`, or a revision); `0`: from the oldest kept.
    since: Option<String>,
    /// Unit names or globs, comma-separated (`web@*,db.service`).
    unit: Option<String>,
    /// A machine id or its prefix: events on it (a move concerns the machine it left too).
    machine: Option<String>,
    /// Kinds or globs over kinds, comma-separated (`unit-started,machine-*`).
    kind: Option<String>,
    /// Page size (default: the API's page size).
    limit: Option<usize>,
    /// Only the last `tail` matching events.
    tail: Option<usize>,
}

/// An engine with events switched off says so rather than answering with an empty history
/// (which would read as "nothing happened").
fn events_on(api: &Api) -> Result<(), ApiError> {
    if api.cluster.events().is_off() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "events are switched off on this engine (event_history = 0 in its configuration)",
        ));
    }
    Ok(())
}

fn parse_query(q: &EventQuery) -> Result<(Option<EventId>, Filter), ApiError> {
    let since = match q.since.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<EventId>().map_err(|e| ApiError::bad_request(format!("since: {e}")))?),
        None => None,
    };
    let filter =
        Filter::parse(q.unit.as_deref(), q.machine.as_deref(), q.kind.as_deref()).map_err(ApiError::bad_request)?;
    Ok((since, filter))
}

pub(crate) async fn list_events(State(api): State<Api>, Query(q): Query<EventQuery>) -> Result<Response, ApiError> {
    events_on(&api)?;
    fresh(&api).await?;
    let (since, filter) = parse_query(&q)?;
    let limit = q.limit.unwrap_or(api.token_limit as usize).clamp(1, MAX_EVENTS_PER_READ);
    let log = api.cluster.events();
    let read = log.read(since, &filter, limit, q.tail.map(|t| t.min(MAX_EVENTS_PER_READ)));
    // Where to go on from: after the last event shown; with none, from where the reader was, or
    // (a reader with no place yet) from now.
    let next = match (read.events.last(), since) {
        (Some(e), _) => e.id.clone(),
        (None, Some(s)) => s.to_string(),
        (None, None) => log.newest().to_string(),
    };
    Ok(Json(wire::EventPage { events: read.events, next, more: read.more }).into_response())
}

/// A stream's place, and events read but not sent yet.
struct Reader {
    api: Api,
    filter: Filter,
    last: EventId,
    newest: tokio::sync::watch::Receiver<EventId>,
    queued: VecDeque<wire::Event>,
}

pub(crate) async fn stream_events(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<EventQuery>,
) -> Result<Response, ApiError> {
    events_on(&api)?;
    ready(&api)?;
    let (since, filter) = parse_query(&q)?;
    // A browser's EventSource (and any client following the SSE spec) resumes with this header.
    let resume = match headers.get("last-event-id").map(|v| v.to_str().map(str::parse::<EventId>)) {
        Some(Ok(Ok(id))) => Some(id),
        Some(_) => return Err(ApiError::bad_request("Last-Event-ID: expected REVISION.N, as in an event's id")),
        None => None,
    };
    let log = api.cluster.events();
    let newest = log.subscribe();
    let last = resume.or(since).unwrap_or_else(|| log.newest());
    let reader = Reader { api: api.clone(), filter, last, newest, queued: VecDeque::new() };
    let stream = futures::stream::unfold(reader, |mut r| async move {
        loop {
            if let Some(e) = r.queued.pop_front() {
                if let Some(id) = e.event_id() {
                    r.last = id;
                }
                let sse = SseEvent::default().id(e.id.clone()).json_data(&e).unwrap_or_else(|_| SseEvent::default());
                return Some((Ok::<_, std::convert::Infallible>(sse), r));
            }
            if r.api.cluster.events().is_closed() {
                return None;
            }
            // Marked seen before reading, so an event kept after the read wakes the wait below.
            r.newest.borrow_and_update();
            let read = r.api.cluster.events().read(Some(r.last), &r.filter, MAX_EVENTS_PER_READ, None);
            if read.events.is_empty() {
                if r.newest.changed().await.is_err() {
                    return None;
                }
                continue;
            }
            r.queued.extend(read.events);
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}
