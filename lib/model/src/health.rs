//! A unit's health: what its `[X-Fleet]` section asks to be checked, and the state machine that
//! turns the unit's activity and its checks' results into `starting`, `healthy` or `unhealthy`.
//!
//! A unit is healthy once systemd has reported it active for `MinHealthyTime` and, when it
//! declares a `HealthCheck`, that check has passed `HealthyThreshold` times in a row; it is
//! unhealthy after `UnhealthyThreshold` failures in a row (it may be active all the while: a
//! process that runs but does not answer). The agent runs the checks and reports the state with
//! the unit's; rollouts wait on it. Pure: time is given, never read.

use crate::rules::RuleError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The `[X-Fleet]` keys of a unit's health.
pub const KEYS: &[&str] = &[
    "HealthCheck",
    "HealthCheckInterval",
    "HealthCheckTimeout",
    "HealthyThreshold",
    "UnhealthyThreshold",
    "HealthCheckGrace",
    "MinHealthyTime",
];

/// How a check asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A command run on the unit's machine (an absolute path and its arguments): healthy when
    /// it exits 0.
    Exec(Vec<String>),
    /// An `http://` URL fetched from the unit's machine: healthy on a 2xx answer.
    Http(String),
}

/// One unit's check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// After a start, failures make the unit unhealthy only once it has been healthy or this
    /// long has passed: a service still starting is `starting`, not `unhealthy`.
    pub grace: Duration,
}

/// What a unit's `[X-Fleet]` says about its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    pub check: Option<HealthCheck>,
    /// Active this long before the unit counts as healthy.
    pub min_healthy: Duration,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec { check: None, min_healthy: Duration::ZERO }
    }
}

const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// A systemd-style time span: `500ms`, `10s`, `2min`, `1h`, or a bare number of seconds.
pub fn parse_span(v: &str) -> Option<Duration> {
    let v = v.trim();
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "second" | "seconds" => n,
        "ms" | "msec" => n / 1000.0,
        "m" | "min" | "minute" | "minutes" => n * 60.0,
        "h" | "hr" | "hour" | "hours" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && (0.0..1e9).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

impl HealthSpec {
    /// Applies one `[X-Fleet]` health key (one of [`KEYS`]); an empty value restores the default.
    pub fn set(&mut self, key: &str, raw: &str) -> Result<(), RuleError> {
        let bad = |why: &str| RuleError::BadValue { key: key.into(), value: raw.into(), why: why.into() };
        let value = raw.trim();
        let span = |default: Duration| -> Result<Duration, RuleError> {
            if value.is_empty() {
                return Ok(default);
            }
            parse_span(value).ok_or_else(|| bad("expected a time span such as 500ms, 10s or 2min"))
        };
        let count = || -> Result<u32, RuleError> {
            if value.is_empty() {
                return Ok(0);
            }
            value
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| bad("expected a count from 1 to 100"))
        };
        if key != "HealthCheck" && key != "MinHealthyTime" && self.check.is_none() && !value.is_empty() {
            // Settings of a check come after the check they set (as systemd reads keys in order).
            return Err(bad("set HealthCheck= first (settings of a check follow the check)"));
        }
        match key {
            "HealthCheck" => {
                self.check = if value.is_empty() {
                    None
                } else {
                    Some(HealthCheck {
                        probe: probe(value).map_err(|why| bad(&why))?,
                        interval: DEFAULT_INTERVAL,
                        timeout: DEFAULT_TIMEOUT,
                        healthy_threshold: 1,
                        unhealthy_threshold: 3,
                        grace: DEFAULT_GRACE,
                    })
                }
            }
            "MinHealthyTime" => self.min_healthy = span(Duration::ZERO)?,
            other => {
                let Some(c) = self.check.as_mut() else { return Ok(()) };
                match other {
                    "HealthCheckInterval" => {
                        c.interval = span(DEFAULT_INTERVAL)?;
                        if c.interval < Duration::from_millis(100) {
                            return Err(bad("at least 100ms"));
                        }
                    }
                    "HealthCheckTimeout" => {
                        c.timeout = span(DEFAULT_TIMEOUT)?;
                        if c.timeout.is_zero() {
                            return Err(bad("more than 0"));
                        }
                    }
                    "HealthyThreshold" => c.healthy_threshold = Some(count()?).filter(|n| *n > 0).unwrap_or(1),
                    "UnhealthyThreshold" => c.unhealthy_threshold = Some(count()?).filter(|n| *n > 0).unwrap_or(3),
                    "HealthCheckGrace" => c.grace = span(DEFAULT_GRACE)?,
                    _ => return Err(RuleError::UnknownKey(other.to_string())),
                }
            }
        }
        Ok(())
    }
}

fn probe(value: &str) -> Result<Probe, String> {
    if let Some(rest) = value.strip_prefix("http://") {
        if rest.is_empty() || rest.starts_with('/') || value.contains(char::is_whitespace) {
            return Err("expected http://HOST[:PORT]/PATH".into());
        }
        return Ok(Probe::Http(value.to_string()));
    }
    if value.starts_with("https://") {
        return Err("https checks are not supported: check the plain port on the machine, or run a command".into());
    }
    let words: Vec<String> = value.split_whitespace().map(str::to_string).collect();
    match words.first() {
        Some(cmd) if cmd.starts_with('/') => Ok(Probe::Exec(words)),
        _ => Err("expected an http:// URL or a command with an absolute path".into()),
    }
}

/// A unit's health as its agent reports it (nothing while the unit is not active).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Active, but not yet for `MinHealthyTime` or not yet passing its check enough times.
    Starting,
    Healthy,
    /// Its check failed `UnhealthyThreshold` times in a row.
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// One unit's health over time: fed the unit's activity and its checks' results, in
/// milliseconds of a monotonic clock the caller keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthTracker {
    spec: HealthSpec,
    active_since: Option<u64>,
    passes: u32,
    fails: u32,
    /// The last verdict of the check (Healthy or Unhealthy), kept between thresholds.
    verdict: Option<Health>,
    /// Whether the check has passed enough since the unit became active (the grace is over).
    been_healthy: bool,
}

impl HealthTracker {
    pub fn new(spec: HealthSpec) -> Self {
        HealthTracker { spec, active_since: None, passes: 0, fails: 0, verdict: None, been_healthy: false }
    }

    pub fn spec(&self) -> &HealthSpec {
        &self.spec
    }

    /// systemd reports the unit active (`true`) or not, at `now`. A unit that stops forgets its
    /// checks: after a restart it starts over.
    pub fn active(&mut self, active: bool, now: u64) {
        match (active, self.active_since) {
            (true, None) => self.active_since = Some(now),
            (false, Some(_)) => *self = HealthTracker::new(self.spec.clone()),
            _ => {}
        }
    }

    /// Whether a check should run now: the unit is active and it has one.
    pub fn wants_checks(&self) -> bool {
        self.active_since.is_some() && self.spec.check.is_some()
    }

    /// One check's result.
    pub fn checked(&mut self, passed: bool) {
        let Some(c) = &self.spec.check else { return };
        if self.active_since.is_none() {
            return;
        }
        if passed {
            self.passes = self.passes.saturating_add(1);
            self.fails = 0;
            if self.passes >= c.healthy_threshold {
                self.verdict = Some(Health::Healthy);
                self.been_healthy = true;
            }
        } else {
            self.fails = self.fails.saturating_add(1);
            self.passes = 0;
            if self.fails >= c.unhealthy_threshold {
                self.verdict = Some(Health::Unhealthy);
            }
        }
    }

    /// The health at `now`; None while the unit is not active.
    pub fn health(&self, now: u64) -> Option<Health> {
        let since = self.active_since?;
        let long_enough = now.saturating_sub(since) >= self.spec.min_healthy.as_millis() as u64;
        let in_grace = |c: &HealthCheck| !self.been_healthy && now.saturating_sub(since) < c.grace.as_millis() as u64;
        Some(match (&self.spec.check, self.verdict) {
            (Some(c), Some(Health::Unhealthy)) if in_grace(c) => Health::Starting,
            (_, Some(Health::Unhealthy)) => Health::Unhealthy,
            (None, _) | (Some(_), Some(Health::Healthy)) if long_enough => Health::Healthy,
            _ => Health::Starting,
        })
    }

    /// When the health may change by time alone (`MinHealthyTime` passing), if it may.
    pub fn changes_at(&self) -> Option<u64> {
        let since = self.active_since?;
        // Failing within its grace: unhealthy when the grace ends.
        if let (Some(c), Some(Health::Unhealthy), false) = (&self.spec.check, self.verdict, self.been_healthy) {
            return Some(since + c.grace.as_millis() as u64);
        }
        let at = since + self.spec.min_healthy.as_millis() as u64;
        (!self.spec.min_healthy.is_zero()).then_some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(lines: &[(&str, &str)]) -> Result<HealthSpec, RuleError> {
        let mut s = HealthSpec::default();
        for (k, v) in lines {
            s.set(k, v)?;
        }
        Ok(s)
    }

    #[test]
    fn keys_parse_into_a_check_with_defaults() {
        let s = spec(&[
            ("HealthCheck", "/usr/bin/test -f /run/ok"),
            ("HealthCheckInterval", "2s"),
            ("MinHealthyTime", "1min"),
        ])
        .expect("valid");
        let c = s.check.expect("a check");
        assert_eq!(c.probe, Probe::Exec(vec!["/usr/bin/test".into(), "-f".into(), "/run/ok".into()]));
        assert_eq!((c.interval, c.timeout), (Duration::from_secs(2), DEFAULT_TIMEOUT));
        assert_eq!((c.healthy_threshold, c.unhealthy_threshold, c.grace), (1, 3, DEFAULT_GRACE));
        assert_eq!(s.min_healthy, Duration::from_secs(60));
        let s = spec(&[("HealthCheck", "http://127.0.0.1:8080/healthz"), ("UnhealthyThreshold", "2")]).expect("valid");
        assert_eq!(
            s.check.as_ref().map(|c| (&c.probe, c.unhealthy_threshold)),
            Some((&Probe::Http("http://127.0.0.1:8080/healthz".into()), 2))
        );
        // An empty value restores the default.
        assert!(spec(&[("HealthCheck", "/bin/true"), ("HealthCheck", "")]).expect("valid").check.is_none());
        assert_eq!(parse_span("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_span("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_span("1.5h"), Some(Duration::from_secs(5400)));
    }

    #[test]
    fn bad_health_keys_are_refused_naming_the_key() {
        for (lines, want) in [
            (vec![("HealthCheck", "curl localhost")], "absolute path"),
            (vec![("HealthCheck", "https://x/health")], "https checks are not supported"),
            (vec![("HealthCheck", "http:///x")], "http://HOST"),
            (vec![("HealthCheckInterval", "5s")], "set HealthCheck= first"),
            (vec![("HealthCheck", "/bin/true"), ("HealthCheckInterval", "10 parsecs")], "time span"),
            (vec![("HealthCheck", "/bin/true"), ("HealthCheckInterval", "10ms")], "at least 100ms"),
            (vec![("HealthCheck", "/bin/true"), ("UnhealthyThreshold", "0")], "count from 1 to 100"),
            (vec![("MinHealthyTime", "soon")], "time span"),
        ] {
            let err = spec(&lines).expect_err("refused").to_string();
            assert!(
                err.contains(want) && err.contains(lines.last().map(|l| l.0).unwrap_or_default()),
                "{lines:?}: {err}"
            );
        }
    }

    #[test]
    fn a_unit_without_a_check_is_healthy_once_active_for_its_minimum_time() {
        let mut t = HealthTracker::new(spec(&[("MinHealthyTime", "10s")]).expect("valid"));
        assert_eq!(t.health(0), None, "not active: no health");
        t.active(true, 1_000);
        assert_eq!(t.health(1_000), Some(Health::Starting));
        assert_eq!(t.changes_at(), Some(11_000));
        assert_eq!(t.health(10_999), Some(Health::Starting));
        assert_eq!(t.health(11_000), Some(Health::Healthy));
        assert!(!t.wants_checks());
        t.active(false, 12_000);
        assert_eq!(t.health(12_000), None);
        t.active(true, 13_000);
        assert_eq!(t.health(14_000), Some(Health::Starting), "a restart starts over");
        // No minimum: healthy as soon as active.
        let mut t = HealthTracker::new(HealthSpec::default());
        t.active(true, 5);
        assert_eq!(t.health(5), Some(Health::Healthy));
    }

    #[test]
    fn a_check_makes_a_unit_healthy_after_its_threshold_and_unhealthy_after_its_failures() {
        let s = spec(&[("HealthCheck", "/bin/true"), ("HealthyThreshold", "2"), ("UnhealthyThreshold", "2")])
            .expect("valid");
        let mut t = HealthTracker::new(s);
        t.checked(true);
        t.active(true, 0);
        assert!(t.wants_checks());
        assert_eq!(t.health(0), Some(Health::Starting), "a result before activity does not count");
        t.checked(true);
        assert_eq!(t.health(1), Some(Health::Starting), "one pass of two");
        t.checked(true);
        assert_eq!(t.health(2), Some(Health::Healthy));
        t.checked(false);
        assert_eq!(t.health(3), Some(Health::Healthy), "one failure of two");
        t.checked(false);
        assert_eq!(t.health(4), Some(Health::Unhealthy));
        t.checked(true);
        assert_eq!(t.health(5), Some(Health::Unhealthy), "one pass of two");
        t.checked(true);
        assert_eq!(t.health(6), Some(Health::Healthy), "recovered");
    }

    /// A service still starting fails its check without being unhealthy, until it has passed
    /// once or its grace is over (then it is, and the agent is told when to look again).
    #[test]
    fn failures_before_the_first_pass_are_forgiven_for_the_grace() {
        let s = spec(&[("HealthCheck", "/bin/true"), ("UnhealthyThreshold", "2"), ("HealthCheckGrace", "5s")])
            .expect("valid");
        let mut slow = HealthTracker::new(s.clone());
        slow.active(true, 0);
        slow.checked(false);
        slow.checked(false);
        assert_eq!(slow.health(1000), Some(Health::Starting), "failing while it starts");
        assert_eq!(slow.changes_at(), Some(5000));
        assert_eq!(slow.health(5000), Some(Health::Unhealthy), "its grace is over");
        let mut started = HealthTracker::new(s);
        started.active(true, 0);
        started.checked(false);
        started.checked(false);
        started.checked(true);
        assert_eq!(started.health(2000), Some(Health::Healthy));
        started.checked(false);
        started.checked(false);
        assert_eq!(started.health(3000), Some(Health::Unhealthy), "once healthy, no grace");
        assert_eq!(started.changes_at(), None);
    }
}
