//! Units: one at a time (get, move, status, journal) and in batches (get, create, change,
//! destroy, wait), so what a client pays does not grow with the number of units it names.

use crate::{segment, Client, Error, Result, BATCH, BATCHES_IN_FLIGHT};
use fleet_api::{
    AgentStatus, Changed, Created, Destroyed, Found, MoveRequest, Unit, UnitChange, UnitChanges, UnitStatuses, Until,
    WaitEvent, WaitRequest,
};
use fleet_model::UnitOption;
use futures::{StreamExt, TryStreamExt};
use reqwest::StatusCode;
use serde::Serialize;
use std::collections::HashSet;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// What one `units:wait` request ended with.
enum Waited {
    /// The names not yet done with.
    Left(HashSet<String>),
    /// The caller stopped the wait.
    Stopped,
}

/// How long one `units:wait` request waits at most before the client asks again.
const WAIT_WINDOW: Duration = Duration::from_secs(30);

/// A unit to create, borrowing its parts, sent as a [`Unit`] is: `fleetctl start` of a million
/// instances of one template sends the template's options a million times without holding a
/// copy of them per instance.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewUnit<'a> {
    pub name: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub options: &'a [UnitOption],
    #[serde(skip_serializing_if = "str::is_empty")]
    pub desired_state: &'a str,
}

impl<'a> From<&'a Unit> for NewUnit<'a> {
    fn from(u: &'a Unit) -> Self {
        NewUnit { name: &u.name, options: &u.options, desired_state: &u.desired_state }
    }
}

/// [`fleet_api::CreateUnits`] as sent: one batch of the caller's units, borrowed rather than
/// copied.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CreateUnitsOf<'a, U> {
    pub(crate) units: &'a [U],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) keep_existing: bool,
}

/// [`fleet_api::Names`] as sent: one batch of the caller's names, borrowed.
#[derive(Serialize)]
pub(crate) struct NamesOf<'a> {
    pub(crate) names: &'a [String],
}

impl Client {
    /// One unit, or `None` if it does not exist.
    pub async fn unit(&self, name: &str) -> Result<Option<Unit>> {
        let what = format!("GET unit {name}");
        let path = format!("units/{}", segment(name));
        let resp = self.send(&what, |http, base| http.get(format!("{base}/{path}"))).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Self::answer(&what, resp).await.map(Some)
    }

    /// `PUT /units/NAME`, the original API's one-unit write: creates the unit (with options), or
    /// sets its desired state. Returns whether it was created.
    pub async fn put_unit(&self, unit: &Unit) -> Result<bool> {
        let path = format!("units/{}", segment(&unit.name));
        let resp = self
            .send(&format!("PUT unit {}", unit.name), |http, base| http.put(format!("{base}/{path}")).json(unit))
            .await?;
        let created = resp.status() == StatusCode::CREATED;
        Self::done(resp).await.map(|()| created)
    }

    /// `DELETE /units/NAME`: returns whether the unit existed.
    pub async fn delete_unit(&self, name: &str) -> Result<bool> {
        let path = format!("units/{}", segment(name));
        let resp =
            self.send(&format!("DELETE unit {name}"), |http, base| http.delete(format!("{base}/{path}"))).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        Self::done(resp).await.map(|()| true)
    }

    /// Asks the engine to move a unit (to `machine`, a full id or unique prefix, if given).
    pub async fn request_move(&self, name: &str, machine: Option<&str>) -> Result<()> {
        let body = MoveRequest { machine_id: machine.unwrap_or("").to_string() };
        let path = format!("units/{}/move", segment(name));
        let resp = self
            .send(&format!("move unit {name}"), |http, base| http.post(format!("{base}/{path}")).json(&body))
            .await?;
        Self::done(resp).await
    }

    /// Forgets a (refused) move request.
    pub async fn forget_move(&self, name: &str) -> Result<()> {
        let path = format!("units/{}/move", segment(name));
        let resp =
            self.send(&format!("forget move of {name}"), |http, base| http.delete(format!("{base}/{path}"))).await?;
        Self::done(resp).await
    }

    /// `systemctl status` of a unit from the agents of its machines.
    pub async fn unit_status(&self, name: &str) -> Result<Vec<AgentStatus>> {
        let what = format!("status of {name}");
        let path = format!("units/{}/status", segment(name));
        let resp = self.send(&what, |http, base| http.get(format!("{base}/{path}"))).await?;
        Ok(Self::answer::<UnitStatuses>(&what, resp).await?.statuses)
    }

    /// Copies a unit's journal to `out` as it arrives (forever with `follow`).
    pub async fn journal(
        &self,
        name: &str,
        lines: u32,
        follow: bool,
        output: &str,
        machine: Option<&str>,
        out: &mut impl std::io::Write,
    ) -> Result<()> {
        let what = format!("journal of {name}");
        let path = format!("units/{}/journal", segment(name));
        let mut q = vec![("lines", lines.to_string()), ("follow", follow.to_string()), ("output", output.to_string())];
        if let Some(m) = machine {
            q.push(("machineID", m.to_string()));
        }
        let mut resp = self
            .send(&what, |http, base| {
                let req = http.get(format!("{base}/{path}")).query(&q);
                // Following has no end; only the connection set-up is bounded.
                if follow {
                    req.timeout(Duration::from_secs(365 * 24 * 3600))
                } else {
                    req
                }
            })
            .await?;
        if !resp.status().is_success() {
            return Err(Self::refusal(resp).await);
        }
        let io = |source| Error::Io { what: what.clone(), source };
        while let Some(chunk) = resp.chunk().await.map_err(|source| Error::Http { what: what.clone(), source })? {
            out.write_all(&chunk).map_err(io)?;
            out.flush().map_err(io)?;
        }
        Ok(())
    }

    /// POSTs `body` to a batch method (`units:batchGet`, ...) and decodes its answer.
    async fn batch<T: serde::de::DeserializeOwned>(&self, method: &str, body: impl serde::Serialize) -> Result<T> {
        let what = format!("POST {method}");
        let resp = self.send(&what, |http, base| http.post(format!("{base}/{method}")).json(&body)).await?;
        Self::answer(&what, resp).await
    }

    /// The named units, what their machines report, and which do not exist: one request per
    /// [`BATCH`] names, [`BATCHES_IN_FLIGHT`] at once.
    pub async fn batch_get(&self, names: &[String]) -> Result<Found> {
        let asks = names.chunks(BATCH).map(|names| self.batch::<Found>("units:batchGet", NamesOf { names }));
        let found: Vec<Found> = futures::stream::iter(asks).buffered(BATCHES_IN_FLIGHT).try_collect().await?;
        let mut all = Found::default();
        for f in found {
            all.units.extend(f.units);
            all.states.extend(f.states);
            all.missing.extend(f.missing);
        }
        Ok(all)
    }

    /// Creates new units (refused if one exists with other contents; one that exists with the
    /// same contents counts as created, so a request may be sent again); returns the etcd
    /// revision of the last write (0 if there was nothing to create).
    /// [`BATCHES_IN_FLIGHT`] requests at once.
    pub async fn create<U: Serialize + Sync>(&self, units: &[U]) -> Result<i64> {
        Ok(self.create_units(units, false).await?.revision)
    }

    /// Creates the units that do not exist and answers those that do (as `GET /units/{name}`
    /// shows them, with their states), leaving them as they are: one request per [`BATCH`]
    /// units, rather than looking every name up first. `revision` is that of the last write.
    /// Units are [`Unit`]s or [`NewUnit`]s; each batch is encoded as its request goes out.
    pub async fn create_or_find<U: Serialize + Sync>(&self, units: &[U]) -> Result<Created> {
        self.create_units(units, true).await
    }

    async fn create_units<U: Serialize + Sync>(&self, units: &[U], keep_existing: bool) -> Result<Created> {
        let asks =
            units.chunks(BATCH).map(|units| self.batch::<Created>("units", CreateUnitsOf { units, keep_existing }));
        let answers: Vec<Created> = futures::stream::iter(asks).buffered(BATCHES_IN_FLIGHT).try_collect().await?;
        let mut all = Created::default();
        for a in answers {
            all.created += a.created;
            all.revision = all.revision.max(a.revision);
            all.existing.extend(a.existing);
            all.states.extend(a.states);
        }
        Ok(all)
    }

    /// Sets the desired state (and, where given, new options) of existing units; returns the
    /// etcd revision of the last write (0 if nothing changed).
    pub async fn update(&self, changes: &[Unit]) -> Result<i64> {
        let mut revision = 0;
        for chunk in changes.chunks(BATCH) {
            let units = chunk
                .iter()
                .map(|u| UnitChange {
                    name: u.name.clone(),
                    desired_state: u.desired_state.clone(),
                    options: u.options.clone(),
                })
                .collect();
            let c: Changed = self.batch("units:batchUpdate", UnitChanges { units }).await?;
            revision = revision.max(c.revision);
        }
        Ok(revision)
    }

    /// Destroys units; returns those that existed and the revision of the last write.
    pub async fn destroy_many(&self, names: &[String]) -> Result<(Vec<String>, i64)> {
        let (mut gone, mut revision) = (Vec::new(), 0);
        for chunk in names.chunks(BATCH) {
            let d: Destroyed = self.batch("units:batchDelete", NamesOf { names: chunk }).await?;
            gone.extend(d.destroyed);
            revision = revision.max(d.revision);
        }
        Ok((gone, revision))
    }

    /// Waits (one streaming request per [`WAIT_WINDOW`], whatever the number of units) until
    /// each unit gets to `until`, handing every event to `seen`; stops early when `seen` says
    /// so. `revision` is that of the write waited on (the engine first catches up with it).
    /// Returns the units still pending when `deadline` passed.
    pub async fn wait(
        &self,
        names: &[String],
        until: Until,
        revision: i64,
        deadline: Option<Instant>,
        mut seen: impl FnMut(&WaitEvent) -> ControlFlow<()>,
    ) -> Result<Vec<String>> {
        let mut pending: Vec<String> = names.to_vec();
        while !pending.is_empty() {
            let window = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(WAIT_WINDOW),
                None => WAIT_WINDOW,
            };
            let mut left = HashSet::new();
            for chunk in pending.chunks(BATCH) {
                match self.wait_once(chunk, until, revision, window, &mut seen).await? {
                    Waited::Left(l) => left.extend(l),
                    // The caller has seen enough (a unit failed, say): no more asking.
                    Waited::Stopped => return Ok(pending),
                }
            }
            pending.retain(|n| left.contains(n));
            if left.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        Ok(pending)
    }

    /// One `units:wait` request: the names not yet done with, or that `seen` stopped the wait.
    async fn wait_once(
        &self,
        names: &[String],
        until: Until,
        revision: i64,
        window: Duration,
        seen: &mut impl FnMut(&WaitEvent) -> ControlFlow<()>,
    ) -> Result<Waited> {
        let what = "waiting for units".to_string();
        let body = WaitRequest { names: names.to_vec(), until, revision, timeout_ms: Some(window.as_millis() as u64) };
        // The answer takes up to the window; the usual request timeout bounds the rest, and the
        // server's heartbeats show it is alive meanwhile.
        let timeout = window + self.timeout;
        let mut resp = self
            .send("POST units:wait", |http, base| http.post(format!("{base}/units:wait")).json(&body).timeout(timeout))
            .await?;
        if !resp.status().is_success() {
            return Err(Self::refusal(resp).await);
        }
        let mut left: HashSet<String> = names.iter().cloned().collect();
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|source| Error::Http { what: what.clone(), source })? {
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let event: WaitEvent = serde_json::from_slice(&line)
                    .map_err(|e| Error::Decode { what: what.clone(), reason: e.to_string() })?;
                if event.done {
                    return Ok(Waited::Left(left));
                }
                if event.name.is_empty() {
                    continue;
                }
                left.remove(&event.name);
                if seen(&event).is_break() {
                    return Ok(Waited::Stopped);
                }
            }
        }
        Err(Error::Decode { what, reason: "the engine ended the answer early".into() })
    }
}
