//! Moving a unit that keeps failing on its machine: what its `[X-Fleet]` section asks
//! (`RescheduleAttempts=` and friends), what the leader remembers of its failures and moves
//! (the `reschedule/<unit>` record), and the pure verdict the scheduler acts on.
//!
//! By default nothing of this applies: systemd's `Restart=` acts on the machine and a unit that
//! ends up `failed` stays where it failed, as in the original fleet. A unit that asks for it is
//! moved once systemd has given up on it (its state is `failed`): after a delay that doubles
//! with each earlier move, to a machine it has not failed on lately, at most
//! `RescheduleAttempts` times within `RescheduleInterval` (then it stays failed, and says so).
//! Pure: time (unix seconds) is given, never read.

use crate::health::parse_span;
use crate::rules::RuleError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::Duration;

/// The `[X-Fleet]` keys of rescheduling.
pub const KEYS: &[&str] =
    &["RescheduleAttempts", "RescheduleInterval", "RescheduleDelay", "RescheduleMaxDelay", "RescheduleAvoid"];

/// What a unit asks: `attempts` moves within `interval`, the first `delay` after the failure,
/// each later one twice the previous up to `max_delay`; a machine it failed on is not chosen
/// again for `avoid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReschedulePolicy {
    /// 0: never moved for failing (the default).
    pub attempts: u32,
    pub interval: Duration,
    pub delay: Duration,
    pub max_delay: Duration,
    pub avoid: Duration,
}

impl Default for ReschedulePolicy {
    fn default() -> Self {
        ReschedulePolicy {
            attempts: 0,
            interval: Duration::from_secs(3600),
            delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(3600),
            avoid: Duration::from_secs(3600),
        }
    }
}

impl ReschedulePolicy {
    pub fn is_on(&self) -> bool {
        self.attempts > 0
    }

    /// Applies one `[X-Fleet]` key (one of [`KEYS`]); an empty value restores the default.
    pub fn set(&mut self, key: &str, raw: &str) -> Result<(), RuleError> {
        let bad = |why: &str| RuleError::BadValue { key: key.into(), value: raw.into(), why: why.into() };
        let value = raw.trim();
        let default = ReschedulePolicy::default();
        let span = |default: Duration| -> Result<Duration, RuleError> {
            if value.is_empty() {
                return Ok(default);
            }
            parse_span(value).ok_or_else(|| bad("expected a time span such as 30s, 10min or 1h"))
        };
        match key {
            "RescheduleAttempts" => {
                self.attempts = if value.is_empty() {
                    0
                } else {
                    value
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n <= 100)
                        .ok_or_else(|| bad("expected a count from 0 to 100"))?
                }
            }
            "RescheduleInterval" => {
                let interval = span(default.interval)?;
                if interval.is_zero() {
                    return Err(bad("must be longer than zero"));
                }
                self.interval = interval;
            }
            "RescheduleDelay" => self.delay = span(default.delay)?,
            "RescheduleMaxDelay" => self.max_delay = span(default.max_delay)?,
            "RescheduleAvoid" => self.avoid = span(default.avoid)?,
            other => return Err(RuleError::UnknownKey(other.to_string())),
        }
        Ok(())
    }

    /// How long after a failure the move after `earlier` recent moves waits.
    pub fn delay_after(&self, earlier: usize) -> Duration {
        let factor = 1u32.checked_shl(earlier.min(31) as u32).unwrap_or(u32::MAX);
        self.delay.saturating_mul(factor).min(self.max_delay.max(self.delay))
    }

    /// Moves of `record` within the interval ending `now`.
    pub fn recent_moves(&self, record: &RescheduleRecord, now: u64) -> usize {
        record.moves.iter().filter(|m| now.saturating_sub(m.at) < self.interval.as_secs()).count()
    }

    /// Machines the unit failed on within the avoid window ending `now`.
    pub fn avoided(&self, record: &RescheduleRecord, now: u64) -> BTreeSet<String> {
        record
            .failures
            .iter()
            .filter(|f| now.saturating_sub(f.at) < self.avoid.as_secs())
            .map(|f| f.machine.clone())
            .collect()
    }

    /// What to do with a unit `failed` on its machine since `record.failing`.
    pub fn verdict(&self, record: &RescheduleRecord, now: u64) -> Verdict {
        let Some(failing) = &record.failing else { return Verdict::Healthy };
        let recent = self.recent_moves(record, now);
        if recent >= self.attempts as usize {
            return Verdict::Exhausted { recent };
        }
        let due = failing.at.saturating_add(self.delay_after(recent).as_secs());
        if now < due {
            Verdict::Wait { until: due }
        } else {
            Verdict::Move { attempt: recent + 1 }
        }
    }

    /// Forgets what no longer counts at `now` (moves out of the interval, failures out of the
    /// avoid window): the record stays small however long a unit lives.
    pub fn prune(&self, record: &mut RescheduleRecord, now: u64) {
        let keep = self.interval.max(self.avoid).as_secs();
        record.moves.retain(|m| now.saturating_sub(m.at) < keep);
        record.failures.retain(|f| now.saturating_sub(f.at) < keep);
    }
}

/// What the scheduler does with a unit that has a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not failed where it runs.
    Healthy,
    /// Failed; the move is due at `until`.
    Wait { until: u64 },
    /// Failed, the delay is over: move it (this is move `attempt` within the interval).
    Move { attempt: usize },
    /// Failed, but it has already moved `recent` times within the interval: it stays.
    Exhausted { recent: usize },
}

/// A failure seen by the leader: the unit was `failed` on `machine` from `at` (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Failure {
    pub machine: String,
    pub at: u64,
}

/// A move made because the unit failed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Moved {
    pub from: String,
    pub to: String,
    pub at: u64,
}

/// `<P>reschedule/<unit>`: written by the leader (fenced), so a new leader goes on counting
/// where the last one stopped.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RescheduleRecord {
    /// The failure being handled (the unit is `failed` there now), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing: Option<Failure>,
    /// Failures within the avoid window (their machines are not chosen again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<Failure>,
    /// Moves within the interval.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<Moved>,
    /// What the leader last did or decided, in words (events and `fleetctl status` show it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl RescheduleRecord {
    /// Whether it holds nothing worth keeping.
    pub fn is_empty(&self) -> bool {
        self.failing.is_none() && self.failures.is_empty() && self.moves.is_empty()
    }

    /// Notes that the unit is `failed` on `machine` at `now` (a failure already being handled
    /// there keeps its time).
    pub fn failed_on(&mut self, machine: &str, now: u64) {
        if self.failing.as_ref().is_some_and(|f| f.machine == machine) {
            return;
        }
        let f = Failure { machine: machine.to_string(), at: now };
        self.failures.push(f.clone());
        self.failing = Some(f);
    }
}

/// "90s", "2min", "1h30min": spans as the keys take them.
pub fn span_words(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, sec) = (s / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}min"));
    }
    if sec > 0 || out.is_empty() {
        out.push_str(&format!("{sec}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32) -> ReschedulePolicy {
        ReschedulePolicy { attempts, delay: Duration::from_secs(10), ..Default::default() }
    }

    #[test]
    fn keys_parse_and_bad_values_name_the_key() {
        let mut p = ReschedulePolicy::default();
        p.set("RescheduleAttempts", "3").unwrap();
        p.set("RescheduleDelay", "5s").unwrap();
        p.set("RescheduleAvoid", "10min").unwrap();
        assert_eq!((p.attempts, p.delay, p.avoid), (3, Duration::from_secs(5), Duration::from_secs(600)));
        let e = p.set("RescheduleDelay", "soon").unwrap_err().to_string();
        assert!(e.contains("RescheduleDelay") && e.contains("soon"), "{e}");
        let e = p.set("RescheduleAttempts", "-1").unwrap_err().to_string();
        assert!(e.contains("RescheduleAttempts"), "{e}");
        assert!(p.set("RescheduleInterval", "0").is_err());
        p.set("RescheduleAttempts", "").unwrap();
        assert!(!p.is_on());
    }

    #[test]
    fn delay_doubles_per_recent_move_up_to_the_cap() {
        let p = ReschedulePolicy { max_delay: Duration::from_secs(35), ..policy(5) };
        let d: Vec<u64> = (0..4).map(|n| p.delay_after(n).as_secs()).collect();
        assert_eq!(d, vec![10, 20, 35, 35]);
    }

    #[test]
    fn a_failure_waits_its_delay_then_moves_until_attempts_are_spent() {
        let p = policy(2);
        let mut r = RescheduleRecord::default();
        assert_eq!(p.verdict(&r, 100), Verdict::Healthy);
        r.failed_on("m1", 100);
        r.failed_on("m1", 105); // the same failure seen again keeps its time
        assert_eq!(p.verdict(&r, 105), Verdict::Wait { until: 110 });
        assert_eq!(p.verdict(&r, 110), Verdict::Move { attempt: 1 });
        r.moves.push(Moved { from: "m1".into(), to: "m2".into(), at: 110 });
        r.failing = None;
        r.failed_on("m2", 200);
        // One recent move: twice the delay.
        assert_eq!(p.verdict(&r, 200), Verdict::Wait { until: 220 });
        r.moves.push(Moved { from: "m2".into(), to: "m3".into(), at: 220 });
        r.failing = None;
        r.failed_on("m3", 300);
        assert_eq!(p.verdict(&r, 400), Verdict::Exhausted { recent: 2 });
        // Once the first move is out of the interval, one attempt is free again.
        assert_eq!(p.verdict(&r, 110 + 3600), Verdict::Move { attempt: 2 });
        assert_eq!(p.avoided(&r, 300), BTreeSet::from(["m1".to_string(), "m2".into(), "m3".into()]));
        assert_eq!(p.avoided(&r, 100 + 3601), BTreeSet::from(["m2".to_string(), "m3".into()]));
    }

    #[test]
    fn pruning_forgets_what_no_longer_counts() {
        let p = policy(2);
        let mut r = RescheduleRecord::default();
        r.failed_on("m1", 0);
        r.moves.push(Moved { from: "m1".into(), to: "m2".into(), at: 10 });
        r.failing = None;
        p.prune(&mut r, 3000);
        assert!(!r.is_empty());
        p.prune(&mut r, 10 + 3600);
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn spans_read_as_written() {
        assert_eq!(span_words(Duration::from_secs(90)), "1min30s");
        assert_eq!(span_words(Duration::from_secs(3600)), "1h");
        assert_eq!(span_words(Duration::ZERO), "0s");
    }
}
