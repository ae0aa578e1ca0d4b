//! Rolling a new version of a service over its running instances: the rollout's record
//! (`rollouts/<service>`, written by the API when asked and by the leader as it goes) and the
//! pure step the leader takes on every pass.
//!
//! A service is a template (`web@.service`: its launched instances) or one unit. The rollout sets
//! instances' unit records to the new version a few at a time; the leader's scheduling then
//! rewrites their schedule entries in place and their agents restart them with the new file.
//! At most `max_parallel` instances are unavailable at any time (being replaced, or not healthy
//! for any reason), so a service of N never has fewer than N - max_parallel healthy instances
//! because of the rollout. An instance is done once it runs the new version healthy (its
//! `[X-Fleet]` health, or simply active when it declares none) for `min_healthy_secs`; one that
//! fails, turns unhealthy or is not healthy within `deadline_secs` of being replaced turns the
//! rollout back to the previous version, the same way. With canaries, the first ones are replaced
//! and the rollout waits for a promote. Pure: time (unix seconds) is given, never read.

use crate::health::Health;

/// Instances one step sets at most (each is a guarded write of one transaction, which etcd
/// bounds); more wait for the next step.
pub const MAX_STEP: usize = 100;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Replacing instances.
    Running,
    /// Paused by a user: nothing new begins; instances being replaced finish.
    Paused,
    /// The canaries run the new version, healthy: waiting for `promote`.
    AwaitingPromotion,
    /// Every instance runs the new version, healthy.
    Succeeded,
    /// Every instance is back on the previous version (a failed instance, or `undo`).
    Reverted,
    /// Going back failed too: stopped where it is, for a person to look at.
    Failed,
}

impl Phase {
    pub fn is_over(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Reverted | Phase::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::AwaitingPromotion => "awaiting-promotion",
            Phase::Succeeded => "succeeded",
            Phase::Reverted => "reverted",
            Phase::Failed => "failed",
        }
    }
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Instances unavailable at once, at most (at least 1).
    pub max_parallel: u32,
    /// Instances replaced first, before the rollout waits for a promote (0: none).
    #[serde(default)]
    pub canaries: u32,
    /// How long a replaced instance must stay healthy to count as done.
    #[serde(default)]
    pub min_healthy_secs: u64,
    /// How long a replaced instance may take to become healthy.
    pub deadline_secs: u64,
}

/// One replaced instance's progress.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceProgress {
    /// When it was set to the target version.
    pub began: u64,
    /// Since when it has run the target version healthy (none while it does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_since: Option<u64>,
    #[serde(default)]
    pub done: bool,
}

/// `<P>rollouts/<service>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRecord {
    pub service: String,
    /// The version asked for: its unit file's hash (`bodies/<hash>`).
    pub version: String,
    /// The version the instances ran before: what a revert goes back to.
    pub previous: String,
    pub spec: RolloutSpec,
    pub phase: Phase,
    /// Going back to `previous` (after a failure, or asked to by `undo`).
    #[serde(default)]
    pub reverting: bool,
    /// The canaries were promoted.
    #[serde(default)]
    pub promoted: bool,
    /// Instances set to the target version in the current direction, by unit name.
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceProgress>,
    /// Why it is going back (an instance's failure, or `undo`), kept while it does.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why_back: String,
    /// What happened last, in words (status and events show it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// When it was asked for (unix seconds).
    pub created: u64,
}

impl RolloutRecord {
    /// A new rollout of `version` over instances running `previous`.
    pub fn new(service: &str, version: &str, previous: &str, spec: RolloutSpec, now: u64) -> Self {
        RolloutRecord {
            service: service.to_string(),
            version: version.to_string(),
            previous: previous.to_string(),
            spec,
            phase: Phase::Running,
            reverting: false,
            promoted: false,
            instances: BTreeMap::new(),
            why_back: String::new(),
            note: String::new(),
            created: now,
        }
    }

    /// The version instances are being set to now.
    pub fn target(&self) -> &str {
        if self.reverting {
            &self.previous
        } else {
            &self.version
        }
    }
}

/// A user's request to a rollout that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Promote,
    Undo,
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pause" => Ok(Action::Pause),
            "resume" => Ok(Action::Resume),
            "promote" => Ok(Action::Promote),
            "undo" => Ok(Action::Undo),
            other => Err(format!("{other:?}: pause, resume, promote or undo")),
        }
    }
}

/// Applies a user's action, or says why it does not apply.
pub fn act(record: &RolloutRecord, action: Action) -> Result<RolloutRecord, String> {
    let mut r = record.clone();
    match action {
        Action::Pause => match r.phase {
            Phase::Running | Phase::AwaitingPromotion => {
                r.phase = Phase::Paused;
                r.note = "paused".into();
            }
            p => return Err(format!("the rollout is {}: nothing to pause", p.as_str())),
        },
        Action::Resume => match r.phase {
            Phase::Paused => {
                r.phase = Phase::Running;
                r.note = "resumed".into();
            }
            p => return Err(format!("the rollout is {}, not paused", p.as_str())),
        },
        Action::Promote => {
            if r.spec.canaries == 0 || r.reverting || r.promoted || r.phase.is_over() {
                return Err(format!("the rollout is {} and has no canaries waiting", r.phase.as_str()));
            }
            r.promoted = true;
            if r.phase == Phase::AwaitingPromotion {
                r.phase = Phase::Running;
            }
            r.note = "promoted".into();
        }
        Action::Undo => {
            if r.reverting && r.phase != Phase::Failed {
                return Err(format!("the rollout is already going back ({})", r.phase.as_str()));
            }
            if r.phase == Phase::Failed {
                return Err("going back failed already: look at the instances, then roll out a version again".into());
            }
            r.reverting = true;
            r.phase = Phase::Running;
            r.instances.clear();
            r.why_back = "undo".into();
            r.note = "undo: going back to the previous version".into();
        }
    }
    Ok(r)
}

/// One instance as the leader's view shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Instance {
    /// The version its unit record holds.
    pub version: String,
    /// The version its machine's agent last reported (any state), if any.
    pub reported: Option<String>,
    /// systemd's ActiveState there.
    pub active_state: String,
    pub health: Option<Health>,
    /// Whether its unit declares health (then only `healthy` counts).
    pub declares_health: bool,
}

impl Instance {
    /// Runs the version its record holds, healthy.
    fn healthy(&self) -> bool {
        self.active_state == "active"
            && self.reported.as_deref() == Some(self.version.as_str())
            && match self.health {
                Some(h) => h == Health::Healthy,
                None => !self.declares_health,
            }
    }

    /// What is wrong with it, once it reports `version`.
    fn broken(&self, version: &str) -> Option<&'static str> {
        if self.reported.as_deref() != Some(version) {
            return None;
        }
        if self.active_state == "failed" {
            Some("failed")
        } else if self.health == Some(Health::Unhealthy) {
            Some("is unhealthy")
        } else {
            None
        }
    }
}

/// What one step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub record: RolloutRecord,
    /// Instances whose unit record is to hold this version now.
    pub set: Vec<(String, String)>,
    /// When a step is due although nothing changes (a deadline, a minimum healthy time).
    pub wake_at: Option<u64>,
}

fn earliest(a: &mut Option<u64>, t: u64) {
    *a = Some(a.map_or(t, |x| x.min(t)));
}

/// The leader's step over a rollout: note instances' progress, turn back on a failure, begin
/// replacing more within `max_parallel`, finish.
pub fn step(record: &RolloutRecord, instances: &BTreeMap<String, Instance>, now: u64) -> Step {
    let mut r = record.clone();
    let mut wake = None;
    if r.phase.is_over() {
        return Step { record: r, set: Vec::new(), wake_at: None };
    }
    let target = r.target().to_string();
    // Instances destroyed meanwhile are no longer the rollout's business.
    r.instances.retain(|n, _| instances.contains_key(n));
    let mut failure: Option<String> = None;
    for (name, i) in instances.iter().filter(|(_, i)| i.version == target) {
        let p = r.instances.entry(name.clone()).or_insert(InstanceProgress { began: now, ..Default::default() });
        if p.done {
            continue;
        }
        if i.healthy() {
            let since = *p.healthy_since.get_or_insert(now);
            let ready = since.saturating_add(r.spec.min_healthy_secs);
            if now >= ready {
                p.done = true;
            } else {
                earliest(&mut wake, ready);
            }
            continue;
        }
        p.healthy_since = None;
        let due = p.began.saturating_add(r.spec.deadline_secs);
        let why = match i.broken(&target) {
            Some(what) => Some(format!("{name} {what}")),
            None if now >= due => Some(format!("{name} was not healthy within {}s", r.spec.deadline_secs)),
            None => {
                earliest(&mut wake, due);
                None
            }
        };
        if failure.is_none() {
            failure = why;
        }
    }
    if let Some(why) = failure {
        if r.reverting {
            r.phase = Phase::Failed;
            r.note = format!("{why} while going back to the previous version: stopped");
            return Step { record: r, set: Vec::new(), wake_at: None };
        }
        r.reverting = true;
        r.phase = Phase::Running;
        r.instances.clear();
        r.note = format!("{why}: going back to the previous version");
        r.why_back = why;
        return step(&r, instances, now);
    }
    let mut set = Vec::new();
    let pending: Vec<&String> = instances.iter().filter(|(_, i)| i.version != target).map(|(n, _)| n).collect();
    let at_target = instances.len() - pending.len();
    let canaries_waiting = !r.reverting && r.spec.canaries > 0 && !r.promoted;
    if r.phase == Phase::Running {
        let unavailable =
            instances.iter().filter(|(n, i)| !i.healthy() || r.instances.get(*n).is_some_and(|p| !p.done)).count();
        // Replacing an instance that is not healthy anyway costs no availability: those go
        // first and need no room (a revert must be able to replace the broken batch).
        let (broken, working): (Vec<&String>, Vec<&String>) =
            pending.iter().copied().partition(|n| instances.get(*n).is_some_and(|i| !i.healthy()));
        let room = (r.spec.max_parallel as usize).saturating_sub(unavailable).min(working.len());
        let mut begin: Vec<&String> = broken.into_iter().chain(working.into_iter().take(room)).collect();
        if canaries_waiting {
            begin.truncate((r.spec.canaries as usize).saturating_sub(at_target));
        }
        begin.truncate(MAX_STEP);
        for name in &begin {
            set.push(((*name).clone(), target.clone()));
            r.instances.insert((*name).clone(), InstanceProgress { began: now, ..Default::default() });
            earliest(&mut wake, now.saturating_add(r.spec.deadline_secs));
        }
        if !begin.is_empty() {
            let done = r.instances.values().filter(|p| p.done).count();
            r.note = format!(
                "{} version: {done} of {} done, replacing {}",
                if r.reverting {
                    format!("going back ({}) to the previous", r.why_back)
                } else {
                    "rolling out the new".into()
                },
                instances.len(),
                begin.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let all_done = instances.keys().all(|n| r.instances.get(n).is_some_and(|p| p.done));
    if pending.is_empty() && all_done {
        r.phase = if r.reverting { Phase::Reverted } else { Phase::Succeeded };
        r.note = if r.reverting {
            format!("every instance ({}) is back on the previous version", instances.len())
        } else {
            format!("every instance ({}) runs the new version, healthy", instances.len())
        };
        wake = None;
    } else if canaries_waiting
        && r.phase == Phase::Running
        && at_target + set.len() >= r.spec.canaries as usize
        && set.is_empty()
        && instances
            .iter()
            .filter(|(_, i)| i.version == target)
            .all(|(n, _)| r.instances.get(n).is_some_and(|p| p.done))
    {
        r.phase = Phase::AwaitingPromotion;
        r.note = format!("{} canaries run the new version, healthy: waiting for promote", r.spec.canaries);
    }
    Step { record: r, set, wake_at: wake }
}

#[cfg(test)]
mod tests;
