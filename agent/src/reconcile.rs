//! What the agent must do to make its machine match its schedule: a pure function of the
//! schedule, the unit files on disk and what was applied before, so it is tested without systemd.

use fleet_model::{DesiredState, ScheduleEntry};
use std::collections::BTreeMap;

/// Steps in the order the agent runs them: stops, removals, writes (then one `Reload`), starts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub stop: Vec<String>,
    pub remove: Vec<String>,
    /// Unit name and the hash of the body to write for it.
    pub write: Vec<(String, String)>,
    pub start: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.stop.is_empty() && self.remove.is_empty() && self.write.is_empty() && self.start.is_empty()
    }

    /// Every unit the plan touches, for state publishing.
    pub fn touched(&self) -> impl Iterator<Item = &String> {
        self.stop.iter().chain(&self.remove).chain(self.write.iter().map(|(n, _)| n)).chain(&self.start)
    }
}

/// `schedule`: this machine's entries; `files`: unit name -> hash of the file on disk;
/// `applied`: what the agent last applied per unit (`Launched` = a start was requested).
///
/// A unit already running with the scheduled hash is left alone, which is what lets a restarted
/// agent adopt its units without restarting them.
pub fn plan(
    schedule: &BTreeMap<String, ScheduleEntry>,
    files: &BTreeMap<String, String>,
    applied: &BTreeMap<String, DesiredState>,
) -> Plan {
    let mut p = Plan::default();
    for name in files.keys().filter(|n| !schedule.contains_key(*n)) {
        p.stop.push(name.clone());
        p.remove.push(name.clone());
    }
    for (name, entry) in schedule {
        let was_launched = applied.get(name) == Some(&DesiredState::Launched);
        let changed = files.get(name).is_none_or(|h| *h != entry.hash);
        if changed {
            if files.contains_key(name) && was_launched {
                p.stop.push(name.clone());
            }
            p.write.push((name.clone(), entry.hash.to_string()));
        }
        match entry.desired_state {
            DesiredState::Launched if changed || !was_launched => p.start.push(name.clone()),
            DesiredState::Loaded | DesiredState::Inactive if was_launched && !changed => p.stop.push(name.clone()),
            _ => {}
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(hash: &str, s: DesiredState) -> ScheduleEntry {
        ScheduleEntry { hash: hash.into(), desired_state: s }
    }
    fn m<V: Clone>(items: &[(&str, V)]) -> BTreeMap<String, V> {
        items.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn new_units_are_written_then_started() {
        let p = plan(
            &m(&[("a.service", e("h1", DesiredState::Launched)), ("b.service", e("h2", DesiredState::Loaded))]),
            &m::<String>(&[]),
            &m(&[]),
        );
        assert_eq!(p.write, vec![("a.service".into(), "h1".into()), ("b.service".into(), "h2".into())]);
        assert_eq!(p.start, vec!["a.service".to_string()]);
        assert!(p.stop.is_empty() && p.remove.is_empty());
    }

    #[test]
    fn running_units_are_adopted_untouched() {
        let p = plan(
            &m(&[("a.service", e("h1", DesiredState::Launched))]),
            &m(&[("a.service", "h1".to_string())]),
            &m(&[("a.service", DesiredState::Launched)]),
        );
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn unscheduled_units_are_stopped_and_removed() {
        let p = plan(&m(&[]), &m(&[("a.service", "h1".to_string())]), &m(&[("a.service", DesiredState::Launched)]));
        assert_eq!((p.stop.clone(), p.remove.clone()), (vec!["a.service".to_string()], vec!["a.service".to_string()]));
    }

    #[test]
    fn launched_to_loaded_stops_and_changed_hash_restarts() {
        let p = plan(
            &m(&[("a.service", e("h1", DesiredState::Loaded))]),
            &m(&[("a.service", "h1".to_string())]),
            &m(&[("a.service", DesiredState::Launched)]),
        );
        assert_eq!(p.stop, vec!["a.service".to_string()]);
        assert!(p.start.is_empty() && p.write.is_empty());
        let p = plan(
            &m(&[("a.service", e("h2", DesiredState::Launched))]),
            &m(&[("a.service", "h1".to_string())]),
            &m(&[("a.service", DesiredState::Launched)]),
        );
        assert_eq!(p.stop, vec!["a.service".to_string()]);
        assert_eq!(p.write, vec![("a.service".into(), "h2".into())]);
        assert_eq!(p.start, vec!["a.service".to_string()]);
    }

    #[test]
    fn loaded_unit_is_started_when_launched() {
        let p = plan(
            &m(&[("a.service", e("h1", DesiredState::Launched))]),
            &m(&[("a.service", "h1".to_string())]),
            &m(&[("a.service", DesiredState::Loaded)]),
        );
        assert_eq!(p.start, vec!["a.service".to_string()]);
        assert!(p.write.is_empty() && p.stop.is_empty());
    }
}
