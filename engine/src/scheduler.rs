//! Placement as a pure function: a snapshot of the cluster in, decisions out.
//!
//! No I/O and no clock, so every rule is tested with tables and properties and the leader only
//! has to write what this returns. Placement is sticky: a unit with a valid placement is never
//! moved by a later pass.

use fleet_model::{DesiredState, MachineRecord, ScheduleEntry, UnitName, UnitRecord};
use std::collections::{BTreeMap, HashMap};

/// What the scheduler sees.
pub struct Snapshot<'a> {
    pub units: &'a BTreeMap<UnitName, UnitRecord>,
    pub machines: &'a BTreeMap<String, MachineRecord>,
    pub schedule: &'a BTreeMap<UnitName, BTreeMap<String, ScheduleEntry>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write a schedule entry (new placement, or a changed hash or desired state).
    Put {
        unit: UnitName,
        machine: String,
        entry: ScheduleEntry,
    },
    /// Delete a schedule entry.
    Remove {
        unit: UnitName,
        machine: String,
        reason: Reason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    UnitGone,
    UnitInactive,
    MachineLost,
    Duplicate,
    Template,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub decisions: Vec<Decision>,
    /// Units that want a machine but got none, and why.
    pub unplaceable: BTreeMap<UnitName, String>,
}

pub fn schedule(snap: &Snapshot<'_>) -> Outcome {
    let mut out = Outcome::default();
    let mut load: HashMap<&str, usize> = snap.machines.keys().map(|m| (m.as_str(), 0)).collect();
    let mut kept: BTreeMap<&UnitName, &str> = BTreeMap::new();

    for (unit, entries) in snap.schedule {
        let record = snap.units.get(unit);
        for machine in entries.keys() {
            let reason = match record {
                None => Some(Reason::UnitGone),
                Some(_) if unit.is_template() => Some(Reason::Template),
                Some(r) if r.desired_state == DesiredState::Inactive => Some(Reason::UnitInactive),
                Some(_) if !snap.machines.contains_key(machine) => Some(Reason::MachineLost),
                Some(_) if kept.contains_key(unit) => Some(Reason::Duplicate),
                Some(_) => None,
            };
            match reason {
                Some(reason) => out.decisions.push(Decision::Remove {
                    unit: unit.clone(),
                    machine: machine.clone(),
                    reason,
                }),
                None => {
                    kept.insert(unit, machine);
                    if let Some(n) = load.get_mut(machine.as_str()) {
                        *n += 1;
                    }
                }
            }
        }
    }

    for (name, unit) in snap.units {
        if unit.desired_state == DesiredState::Inactive {
            continue;
        }
        if name.is_template() {
            out.unplaceable.insert(
                name.clone(),
                format!(
                    "{name} is a template; start an instance such as {}",
                    name.as_str().replacen("@.", "@1.", 1)
                ),
            );
            continue;
        }
        let entry = ScheduleEntry {
            hash: unit.hash.clone(),
            desired_state: unit.desired_state,
        };
        if let Some(machine) = kept.get(name) {
            let current = snap.schedule.get(name).and_then(|e| e.get(*machine));
            if current != Some(&entry) {
                out.decisions.push(Decision::Put {
                    unit: name.clone(),
                    machine: machine.to_string(),
                    entry,
                });
            }
            continue;
        }
        // Least loaded; ties go to the smallest machine id so the choice is deterministic.
        let Some(machine) = snap
            .machines
            .keys()
            .min_by_key(|m| (load.get(m.as_str()).copied().unwrap_or(0), m.as_str()))
        else {
            out.unplaceable
                .insert(name.clone(), "no machines are available".into());
            continue;
        };
        if let Some(n) = load.get_mut(machine.as_str()) {
            *n += 1;
        }
        out.decisions.push(Decision::Put {
            unit: name.clone(),
            machine: machine.clone(),
            entry,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> UnitName {
        UnitName::parse(s).expect("valid name")
    }
    fn unit(n: &str, s: DesiredState) -> (UnitName, UnitRecord) {
        (
            name(n),
            UnitRecord {
                name: name(n),
                hash: format!("h-{n}"),
                desired_state: s,
            },
        )
    }
    fn machines(ids: &[&str]) -> BTreeMap<String, MachineRecord> {
        ids.iter()
            .map(|i| {
                (
                    i.to_string(),
                    MachineRecord {
                        id: i.to_string(),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }
    fn placed(out: &Outcome) -> BTreeMap<String, String> {
        out.decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Put { unit, machine, .. } => Some((unit.to_string(), machine.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn spreads_over_least_loaded_machines() {
        let units: BTreeMap<_, _> = ["a.service", "b.service", "c.service"]
            .iter()
            .map(|n| unit(n, DesiredState::Launched))
            .collect();
        let ms = machines(&["m1", "m2", "m3"]);
        let out = schedule(&Snapshot {
            units: &units,
            machines: &ms,
            schedule: &BTreeMap::new(),
        });
        let p = placed(&out);
        assert_eq!(p.len(), 3);
        let mut used: Vec<_> = p.values().cloned().collect();
        used.sort();
        assert_eq!(used, vec!["m1", "m2", "m3"]);
    }

    #[test]
    fn existing_placements_count_and_stick() {
        let units: BTreeMap<_, _> = [
            unit("a.service", DesiredState::Launched),
            unit("b.service", DesiredState::Launched),
        ]
        .into_iter()
        .collect();
        let ms = machines(&["m1", "m2"]);
        let mut sched = BTreeMap::new();
        sched.insert(
            name("a.service"),
            BTreeMap::from([(
                "m2".to_string(),
                ScheduleEntry {
                    hash: "h-a.service".into(),
                    desired_state: DesiredState::Launched,
                },
            )]),
        );
        let out = schedule(&Snapshot {
            units: &units,
            machines: &ms,
            schedule: &sched,
        });
        assert_eq!(
            out.decisions,
            vec![Decision::Put {
                unit: name("b.service"),
                machine: "m1".into(),
                entry: ScheduleEntry {
                    hash: "h-b.service".into(),
                    desired_state: DesiredState::Launched
                }
            }]
        );
    }

    #[test]
    fn lost_machine_units_move_and_stale_entries_go() {
        let units: BTreeMap<_, _> = [
            unit("a.service", DesiredState::Launched),
            unit("off.service", DesiredState::Inactive),
        ]
        .into_iter()
        .collect();
        let ms = machines(&["m1"]);
        let e = |n: &str| ScheduleEntry {
            hash: format!("h-{n}"),
            desired_state: DesiredState::Launched,
        };
        let mut sched = BTreeMap::new();
        sched.insert(
            name("a.service"),
            BTreeMap::from([("gone".to_string(), e("a.service"))]),
        );
        sched.insert(
            name("off.service"),
            BTreeMap::from([("m1".to_string(), e("off.service"))]),
        );
        sched.insert(
            name("deleted.service"),
            BTreeMap::from([("m1".to_string(), e("deleted.service"))]),
        );
        let out = schedule(&Snapshot {
            units: &units,
            machines: &ms,
            schedule: &sched,
        });
        let removed: Vec<_> = out
            .decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Remove { unit, reason, .. } => Some((unit.to_string(), *reason)),
                _ => None,
            })
            .collect();
        assert_eq!(
            removed,
            vec![
                ("a.service".into(), Reason::MachineLost),
                ("deleted.service".into(), Reason::UnitGone),
                ("off.service".into(), Reason::UnitInactive)
            ]
        );
        assert_eq!(
            placed(&out),
            BTreeMap::from([("a.service".to_string(), "m1".to_string())])
        );
    }

    #[test]
    fn desired_state_changes_update_in_place() {
        let units: BTreeMap<_, _> = [unit("a.service", DesiredState::Loaded)]
            .into_iter()
            .collect();
        let ms = machines(&["m1", "m2"]);
        let mut sched = BTreeMap::new();
        sched.insert(
            name("a.service"),
            BTreeMap::from([(
                "m2".to_string(),
                ScheduleEntry {
                    hash: "h-a.service".into(),
                    desired_state: DesiredState::Launched,
                },
            )]),
        );
        let out = schedule(&Snapshot {
            units: &units,
            machines: &ms,
            schedule: &sched,
        });
        assert_eq!(
            placed(&out),
            BTreeMap::from([("a.service".to_string(), "m2".to_string())])
        );
    }

    #[test]
    fn nothing_to_place_without_machines_or_for_templates() {
        let units: BTreeMap<_, _> = [
            unit("a.service", DesiredState::Launched),
            unit("t@.service", DesiredState::Launched),
        ]
        .into_iter()
        .collect();
        let out = schedule(&Snapshot {
            units: &units,
            machines: &BTreeMap::new(),
            schedule: &BTreeMap::new(),
        });
        assert!(out.decisions.is_empty());
        assert_eq!(
            out.unplaceable.get(&name("a.service")).map(String::as_str),
            Some("no machines are available")
        );
        assert!(out.unplaceable.contains_key(&name("t@.service")));
    }

    #[test]
    fn a_second_pass_over_its_own_result_decides_nothing() {
        let units: BTreeMap<_, _> = (0..50)
            .map(|i| unit(&format!("u{i}.service"), DesiredState::Launched))
            .collect();
        let ms = machines(&["m1", "m2", "m3", "m4"]);
        let out = schedule(&Snapshot {
            units: &units,
            machines: &ms,
            schedule: &BTreeMap::new(),
        });
        let mut sched: BTreeMap<UnitName, BTreeMap<String, ScheduleEntry>> = BTreeMap::new();
        for d in out.decisions {
            if let Decision::Put {
                unit,
                machine,
                entry,
            } = d
            {
                sched.entry(unit).or_default().insert(machine, entry);
            }
        }
        let counts: Vec<usize> = ms
            .keys()
            .map(|m| sched.values().filter(|e| e.contains_key(m)).count())
            .collect();
        assert!(
            counts.iter().max().copied().unwrap_or(0) - counts.iter().min().copied().unwrap_or(0)
                <= 1,
            "{counts:?}"
        );
        let again = schedule(&Snapshot {
            units: &units,
            machines: &ms,
            schedule: &sched,
        });
        assert!(again.decisions.is_empty());
    }
}
