//! What may run where: a unit's rules against a machine (metadata, capacity, conflicts, peers,
//! spreading), and the bookkeeping of units kept, stopped and removed during a pass.

use super::*;

impl<'a> Pass<'a> {
    pub(super) fn rules(&self, u: &UnitName) -> Option<&'a Rules> {
        self.snap.rules.get(u).and_then(|r| r.as_ref().ok()).map(|r| &**r)
    }

    pub(super) fn exclusive(&self, u: &UnitName) -> bool {
        self.rules(u).is_some_and(|r| r.exclusive)
    }

    /// Whether the user wants `u` to run (loaded or launched).
    pub(super) fn wanted_unit(&self, u: &UnitName) -> bool {
        self.snap.units.get(u).is_some_and(|r| r.desired_state != DesiredState::Inactive)
    }

    /// Takes `unit` off `machine`. An exclusive unit that is to run elsewhere is first stopped
    /// there: its entry is rewritten `inactive` (entries are never inactive otherwise) and goes
    /// once its agent reports it stopped, or, were the machine lost meanwhile, once the machine's
    /// fence has passed.
    pub(super) fn remove(&mut self, unit: UnitName, machine: String, reason: Reason) {
        let entry = self.snap.schedule.get(&unit).and_then(|e| e.get(machine.as_str()));
        if let Some(entry) = entry.filter(|_| self.exclusive(&unit) && self.wanted_unit(&unit)) {
            if self.snap.machines.contains_key(&machine) && !self.stopped_on(&unit, &machine) {
                if entry.desired_state != DesiredState::Inactive {
                    let entry = ScheduleEntry { hash: entry.hash.clone(), desired_state: DesiredState::Inactive };
                    self.out.decisions.push(Decision::Put { unit: unit.clone(), machine: machine.clone(), entry });
                }
                self.leaving.insert(unit, machine);
                return;
            }
        }
        self.out.decisions.push(Decision::Remove { unit, machine, reason });
    }

    /// Whether `machine`'s agent reports `unit` stopped (or does not report it at all).
    pub(super) fn stopped_on(&self, unit: &UnitName, machine: &str) -> bool {
        self.snap.states.get(unit).and_then(|s| s.get(machine)).is_none_or(UnitStateRecord::stopped)
    }

    /// A live machine an exclusive unit is still running or stopping on, although it is not
    /// (or no longer) scheduled there. Lost machines are the fence's business.
    pub(super) fn stopping_on(&self, unit: &UnitName) -> Option<&str> {
        if !self.exclusive(unit) {
            return None;
        }
        if let Some(m) = self.leaving.get(unit) {
            return Some(m);
        }
        let placed = self.p.at.get(unit);
        self.snap.states.get(unit)?.iter().find_map(|(m, s)| {
            (!s.stopped() && self.snap.machines.contains_key(m.as_str()) && !placed.is_some_and(|p| p.contains(m)))
                .then_some(m.as_str())
        })
    }

    pub(super) fn reserve(&self, u: &UnitName) -> Resources {
        self.rules(u).map(|r| r.reserve).unwrap_or_default()
    }

    pub(super) fn mutual_replace(&self, a: &UnitName, b: &UnitName) -> bool {
        match (self.rules(a), self.rules(b)) {
            (Some(ra), Some(rb)) => {
                ra.replaces_unit(a.as_str(), b.as_str()) && rb.replaces_unit(b.as_str(), a.as_str())
            }
            _ => false,
        }
    }

    /// Whether `unit` may run on `machine` next to what is placed there now. `check_peers` is off
    /// while keeping existing placements (peers are checked once everything is kept).
    pub(super) fn eligible(
        &self,
        unit: &UnitName,
        rules: &Rules,
        machine: &MachineRecord,
        check_peers: bool,
    ) -> Result<(), Fail> {
        if self.snap.drained.contains(&machine.id) {
            return Err(Fail::Draining);
        }
        if !rules.machine_id_matches(&machine.id) {
            return Err(Fail::MachineId(rules.machine_id.clone().unwrap_or_default()));
        }
        rules.metadata_matches(&machine.metadata).map_err(Fail::Metadata)?;
        if check_peers && !self.avoid.is_empty() && self.avoid.get(unit).is_some_and(|a| a.contains(&machine.id)) {
            return Err(Fail::Avoided);
        }
        if check_peers && rules.exclusive {
            // An exclusive unit displaced by a `Replaces` waits to stop before it is placed again:
            // not back next to the unit that took its machine.
            let mut here = self.p.on.get(&machine.id).into_iter().flatten();
            if let Some(by) = here.find(|o| {
                self.rules(o).is_some_and(|r| r.replaces_unit(o.as_str(), unit.as_str()))
                    && !self.mutual_replace(unit, o)
            }) {
                return Err(Fail::Displaced(by.to_string()));
            }
        }
        if check_peers {
            if let Some(peer) = rules.machine_of.iter().find(|p| {
                !self
                    .p
                    .at
                    .get(&UnitName::parse(p).unwrap_or_else(|_| unit.clone()))
                    .is_some_and(|ms| ms.contains(&machine.id))
            }) {
                return Err(Fail::Peer(peer.clone()));
            }
        }
        let here = self.p.on.get(&machine.id);
        let clashes = |other: &&UnitName| {
            *other != unit
                && (rules.conflicts_with(unit.as_str(), other.as_str())
                    || self.rules(other).is_some_and(|r| r.conflicts_with(other.as_str(), unit.as_str())))
        };
        // The first clash in name order either way. Without rules of its own, the unit can only
        // clash with the (usually few) units that declare `Conflicts`.
        let here_count = here.map_or(0, BTreeSet::len);
        let clash = if rules.conflicts.is_empty() && self.conflicting.len() < here_count {
            self.conflicting
                .iter()
                .filter(|o| self.p.at.get(*o).is_some_and(|ms| ms.contains(&machine.id)))
                .find(clashes)
        } else {
            here.into_iter().flatten().find(clashes)
        };
        if let Some(other) = clash {
            return Err(Fail::Conflict(other.to_string()));
        }
        let cap = machine.capacity;
        let used = self.p.used.get(&machine.id).copied().unwrap_or_default();
        let over = |cap: u64, used: u64, want: u64| cap > 0 && want > 0 && used + want > cap;
        if over(cap.memory, used.memory, rules.reserve.memory) || over(cap.cpu, used.cpu, rules.reserve.cpu) {
            return Err(Fail::Capacity);
        }
        if let Some(max) = rules.max_per_machine {
            let g = group(unit);
            let n = here.into_iter().flatten().filter(|o| *o != unit && group(o) == g).count();
            if n >= max as usize {
                return Err(Fail::MaxPerMachine(max));
            }
        }
        Ok(())
    }

    /// Utilisation of a machine in permille of its most used advertised resource.
    pub(super) fn utilisation(&self, machine: &MachineRecord) -> u64 {
        let used = self.p.used.get(&machine.id).copied().unwrap_or_default();
        let frac = |used: u64, cap: u64| used.saturating_mul(1000).checked_div(cap).unwrap_or(0);
        frac(used.memory, machine.capacity.memory).max(frac(used.cpu, machine.capacity.cpu))
    }

    pub(super) fn spread_count(&self, unit: &UnitName, key: &str, machine: &MachineRecord) -> usize {
        let domain = machine.metadata.get(key);
        let g = group(unit);
        self.snap
            .machines
            .values()
            .filter(|m| m.metadata.get(key) == domain)
            .map(|m| {
                self.p.on.get(&m.id).map(|s| s.iter().filter(|o| *o != unit && group(o) == g).count()).unwrap_or(0)
            })
            .sum()
    }
}
