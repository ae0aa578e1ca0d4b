//! `fleetctl events`: the cluster's events, one line each, and the last ones of a unit for
//! `status`.

use crate::*;
use fleet_client::{Event, EventQuery};
use std::io::Write;
use std::ops::ControlFlow;

/// One event as a line: time, kind, unit, machine, and what else it says.
pub(crate) fn line(e: &Event, full: bool) -> String {
    let short = |m: &str| if full || m.len() <= 8 { m.to_string() } else { format!("{}...", &m[..8]) };
    let mut detail = Vec::new();
    if !e.from.is_empty() {
        detail.push(format!("from {}", short(&e.from)));
    }
    if !e.state.is_empty() {
        detail.push(e.state.clone());
    }
    if !e.reason.is_empty() {
        detail.push(format!("({})", e.reason));
    }
    let or_dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
    format!(
        "{:<24} {:<20} {:<24} {:<11} {}",
        or_dash(e.time.clone()),
        e.kind,
        or_dash(e.unit.clone()),
        or_dash(short(&e.machine)),
        detail.join(" ")
    )
    .trim_end()
    .to_string()
}

impl Ctl {
    fn print_event(&self, e: &Event, full: bool) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        if self.json {
            writeln!(out, "{}", serde_json::to_string(e).unwrap_or_default())?;
        } else {
            writeln!(out, "{}", line(e, full))?;
        }
        out.flush()
    }

    pub(crate) async fn events(
        &self,
        mut query: EventQuery,
        lines: usize,
        follow: bool,
        full: bool,
    ) -> Result<ExitCode> {
        let mut next = query.since.clone();
        if query.since.is_none() {
            // The last `lines` events first.
            let page = self.api.events(&EventQuery { tail: Some(lines), ..query.clone() }).await?;
            for e in &page.events {
                self.print_event(e, full)?;
            }
            next = Some(page.next);
        } else if !follow {
            // Everything after --since, page by page.
            loop {
                let page = self.api.events(&query).await?;
                for e in &page.events {
                    self.print_event(e, full)?;
                }
                if !page.more {
                    break;
                }
                query.since = Some(page.next);
            }
        }
        if follow {
            query.since = next;
            let mut failed = None;
            self.api
                .follow_events(&query, |e| match self.print_event(&e, full) {
                    Ok(()) => ControlFlow::Continue(()),
                    // stdout closed (`| head`): stop quietly.
                    Err(err) => {
                        failed = Some(err);
                        ControlFlow::Break(())
                    }
                })
                .await?;
            if let Some(err) = failed.filter(|e| e.kind() != std::io::ErrorKind::BrokenPipe) {
                return Err(err.into());
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_reads_as_one_line() {
        let e = Event {
            id: "12.0".into(),
            time: "2026-12-01T10:00:00.123Z".into(),
            kind: "unit-moved".into(),
            unit: "web@1.service".into(),
            machine: "0123456789abcdef0123456789abcdef".into(),
            from: "fedcba9876543210fedcba9876543210".into(),
            state: String::new(),
            reason: "machine fedcba9876543210fedcba9876543210 was lost".into(),
        };
        assert_eq!(
            line(&e, false),
            "2026-12-01T10:00:00.123Z unit-moved           web@1.service            01234567... \
             from fedcba98... (machine fedcba9876543210fedcba9876543210 was lost)"
        );
        assert!(line(&e, true).contains(" 0123456789abcdef0123456789abcdef "));
        let joined = Event { kind: "leader-changed".into(), reason: "engine-1".into(), ..Event::default() };
        assert_eq!(
            line(&joined, false),
            "-                        leader-changed       -                        -           (engine-1)"
        );
    }
}
