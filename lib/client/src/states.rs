//! What machines report for their units, streamed (`GET /state:stream`).

use super::*;
use fleet_api::StateStreamHead;

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

impl Client {
    /// Every state (or `unit`'s), handed to `each` as it arrives: the head first, then the rows
    /// in unit, then machine order. An engine without the stream (404: the original fleet, or an
    /// older engine) is read page by page instead and the same lines are made from the pages.
    /// `each` may stop the stream (a reader that went away).
    pub async fn stream_states(
        &self,
        unit: Option<&str>,
        mut each: impl FnMut(StateLine) -> std::ops::ControlFlow<()>,
    ) -> Result<()> {
        let what = "GET state:stream".to_string();
        let query: Vec<(&str, &str)> = unit.map(|u| ("unitName", u)).into_iter().collect();
        let timeout = self.timeout + STREAM_EXTRA;
        let mut resp = self
            .send(&what, |http, base| http.get(format!("{base}/state:stream")).query(&query).timeout(timeout))
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            let mut states = self.states(unit).await?;
            states.sort_by(|a, b| (&a.name, &a.machine_id).cmp(&(&b.name, &b.machine_id)));
            if each(StateLine::Head(head_of(&states))).is_continue() {
                let _ = states.into_iter().try_for_each(|s| each(StateLine::Row(s)));
            }
            return Ok(());
        }
        if !resp.status().is_success() {
            return Err(Self::refusal(resp).await);
        }
        let decode = |e: serde_json::Error| Error::Decode { what: what.clone(), reason: e.to_string() };
        let mut buf = Vec::new();
        let mut head = true;
        while let Some(chunk) = resp.chunk().await.map_err(|source| Error::Http { what: what.clone(), source })? {
            buf.extend_from_slice(&chunk);
            // Lines are parsed where they lie; the unfinished tail waits for the next chunk.
            let mut start = 0;
            while let Some(n) = buf[start..].iter().position(|b| *b == b'\n') {
                let line = &buf[start..start + n];
                start += n + 1;
                let flow = if head {
                    head = false;
                    each(StateLine::Head(serde_json::from_slice(line).map_err(decode)?))
                } else {
                    each(StateLine::Row(serde_json::from_slice(line).map_err(decode)?))
                };
                if flow.is_break() {
                    return Ok(());
                }
            }
            buf.drain(..start);
        }
        if head || !buf.is_empty() {
            return Err(Error::Decode { what, reason: "the engine ended the answer early".into() });
        }
        Ok(())
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
    StateStreamHead { rows: states.len() as u64, longest }
}
