//! The cluster's events: a page of an engine's kept history, or the live stream, followed across
//! reconnects and engine fail-overs without losing or repeating an event (ids are etcd
//! revisions, the same on every engine, so any engine can resume a stream another one served).

use crate::{Client, Error, Result};
use eventsource_stream::Eventsource;
use fleet_api::{Event, EventPage};
use futures::StreamExt;
use std::ops::ControlFlow;
use std::time::Duration;

/// The engine sends a keep-alive comment every 15 s: a stream silent for longer is dead (its
/// engine gone without closing it), and is opened again.
const SILENCE: Duration = Duration::from_secs(45);

/// Which events, and from where.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// After this event id (`REVISION.N`); `Some("0")`: from the oldest kept; `None`: for a page,
    /// the oldest kept, for a stream, from now.
    pub since: Option<String>,
    /// Unit names or globs; empty: all.
    pub units: Vec<String>,
    pub machine: Option<String>,
    /// Kinds or globs over kinds (`unit-*`); empty: all.
    pub kinds: Vec<String>,
    /// A page's size; `None`: the engine's page size.
    pub limit: Option<usize>,
    /// Only the last `tail` matching events (a page only).
    pub tail: Option<usize>,
}

impl EventQuery {
    fn params(&self, since: Option<&str>) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(s) = since {
            q.push(("since", s.to_string()));
        }
        if !self.units.is_empty() {
            q.push(("unit", self.units.join(",")));
        }
        if let Some(m) = &self.machine {
            q.push(("machine", m.clone()));
        }
        if !self.kinds.is_empty() {
            q.push(("kind", self.kinds.join(",")));
        }
        if let Some(l) = self.limit {
            q.push(("limit", l.to_string()));
        }
        if let Some(t) = self.tail {
            q.push(("tail", t.to_string()));
        }
        q
    }
}

impl Client {
    /// One page of the kept history (`GET /events`).
    pub async fn events(&self, query: &EventQuery) -> Result<EventPage> {
        let what = "GET events";
        let q = query.params(query.since.as_deref());
        let resp = self.send(what, |http, base| http.get(format!("{base}/events")).query(&q)).await?;
        Self::answer(what, resp).await
    }

    /// Follows the live stream (`GET /events/stream`), giving each event to `each` until it
    /// says to stop. A stream that ends or falls silent is opened again where it left off (on
    /// this engine or, through the client's fail-over, another); an error is returned only when
    /// no engine can be reached or one refuses the query.
    pub async fn follow_events(
        &self,
        query: &EventQuery,
        mut each: impl FnMut(Event) -> ControlFlow<()>,
    ) -> Result<()> {
        let what = "follow events";
        let mut last = query.since.clone();
        if last.is_none() {
            // "From now" is pinned to an id first, so that a reconnect before the first event
            // still resumes from here rather than from a later now.
            let now = EventQuery { tail: Some(0), ..EventQuery::default() };
            last = Some(self.events(&now).await?.next);
        }
        loop {
            let q = query.params(None);
            let resp = self
                .send(what, |http, base| {
                    let req = http
                        .get(format!("{base}/events/stream"))
                        .query(&q)
                        .header(reqwest::header::ACCEPT, "text/event-stream")
                        // A stream has no end; the silence check below bounds a dead one.
                        .timeout(Duration::from_secs(365 * 24 * 3600));
                    match &last {
                        Some(id) => req.header("last-event-id", id.as_str()),
                        None => req,
                    }
                })
                .await?;
            if !resp.status().is_success() {
                return Err(Self::refusal(resp).await);
            }
            let mut stream = resp.bytes_stream().eventsource();
            loop {
                let next = match tokio::time::timeout(SILENCE, stream.next()).await {
                    Ok(Some(Ok(sse))) => sse,
                    // Ended, broken or silent: open it again from the last event seen.
                    Ok(None) | Ok(Some(Err(_))) | Err(_) => break,
                };
                let event: Event = serde_json::from_str(&next.data)
                    .map_err(|e| Error::Decode { what: what.to_string(), reason: e.to_string() })?;
                if !next.id.is_empty() {
                    last = Some(next.id.clone());
                }
                if each(event).is_break() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
