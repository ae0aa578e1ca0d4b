//! What machines report for their units, streamed (`GET /state:stream`).

use super::*;
use fleet_api::StateStreamHead;
use std::collections::VecDeque;

/// Longest a whole stream of states may take beyond the client's request timeout: a million rows
/// take seconds; a stream cut off by this is reported, never shown as complete.
const STREAM_EXTRA: Duration = Duration::from_secs(300);

/// One line of a state stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StateLine {
    /// First: how many rows and the longest value of each field.
    Head(StateStreamHead),
    Row(UnitState),
}

/// An open stream of states: [`StateStream::next`] gives the head, then each row as it arrives.
pub struct StateStream {
    source: Source,
    what: String,
}

enum Source {
    Streaming {
        resp: reqwest::Response,
        buf: Vec<u8>,
        start: usize,
        head: bool,
        ended: bool,
    },
    /// From pages (an engine without the stream), already read.
    Read(VecDeque<StateLine>),
}

impl Client {
    /// Opens a stream of every state (or `unit`'s): the head first, then the rows in unit, then
    /// machine order. Against an engine without the stream (404: the original fleet, or an older
    /// engine) the pages are read instead and the same lines made from them.
    pub async fn open_states(&self, unit: Option<&str>) -> Result<StateStream> {
        let what = "GET state:stream".to_string();
        let query: Vec<(&str, &str)> = unit.map(|u| ("unitName", u)).into_iter().collect();
        let timeout = self.timeout + STREAM_EXTRA;
        let resp = self
            .send(&what, |http, base| http.get(format!("{base}/state:stream")).query(&query).timeout(timeout))
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            let mut states = self.states(unit).await?;
            states.sort_by(|a, b| (&a.name, &a.machine_id).cmp(&(&b.name, &b.machine_id)));
            let mut lines = VecDeque::with_capacity(states.len() + 1);
            lines.push_back(StateLine::Head(head_of(&states)));
            lines.extend(states.into_iter().map(StateLine::Row));
            return Ok(StateStream { source: Source::Read(lines), what });
        }
        if !resp.status().is_success() {
            return Err(Self::refusal(resp).await);
        }
        Ok(StateStream {
            source: Source::Streaming { resp, buf: Vec::new(), start: 0, head: true, ended: false },
            what,
        })
    }
}

impl StateStream {
    /// The next line; `None` once the engine has sent the last. A stream cut off before its end
    /// is an error, never a short listing.
    pub async fn next(&mut self) -> Result<Option<StateLine>> {
        let what = &self.what;
        let (resp, buf, start, head, ended) = match &mut self.source {
            Source::Read(lines) => return Ok(lines.pop_front()),
            Source::Streaming { resp, buf, start, head, ended } => (resp, buf, start, head, ended),
        };
        loop {
            if let Some(n) = buf[*start..].iter().position(|b| *b == b'\n') {
                let line = &buf[*start..*start + n];
                *start += n + 1;
                let decode = |e: serde_json::Error| Error::Decode { what: what.clone(), reason: e.to_string() };
                let parsed = if *head {
                    *head = false;
                    StateLine::Head(serde_json::from_slice(line).map_err(decode)?)
                } else {
                    StateLine::Row(serde_json::from_slice(line).map_err(decode)?)
                };
                return Ok(Some(parsed));
            }
            if *ended {
                if *head || *start < buf.len() {
                    return Err(Error::Decode {
                        what: what.clone(),
                        reason: "the engine ended the answer early".into(),
                    });
                }
                return Ok(None);
            }
            // What was read is dropped before reading more; an unfinished line stays.
            buf.drain(..*start);
            *start = 0;
            match resp.chunk().await.map_err(|source| Error::Http { what: what.clone(), source })? {
                Some(chunk) => buf.extend_from_slice(&chunk),
                None => *ended = true,
            }
        }
    }
}

/// The head a stream of `states` would have begun with.
pub fn head_of(states: &[UnitState]) -> StateStreamHead {
    let mut longest = std::collections::BTreeMap::new();
    for s in states {
        let fields = [
            ("name", &s.name),
            ("hash", &s.hash),
            ("machineID", &s.machine_id),
            ("systemdLoadState", &s.systemd_load_state),
            ("systemdActiveState", &s.systemd_active_state),
            ("systemdSubState", &s.systemd_sub_state),
            ("health", &s.health),
        ];
        for (f, v) in fields {
            let l = longest.entry(f.to_string()).or_insert(0u64);
            *l = (*l).max(v.chars().count() as u64);
        }
    }
    StateStreamHead { rows: states.len() as u64, longest, machine_ips: false }
}
