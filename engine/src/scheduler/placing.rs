//! The steps of a pass that decide: keep what still holds, place global units, place the
//! others on their best machine (taking over from units they replace), and carry out moves.

use super::*;

impl<'a> Pass<'a> {
    pub(super) fn keep_existing(&mut self) {
        // First pass: machine-local rules (id, metadata, capacity, conflicts with earlier kept).
        for (unit, entries) in self.snap.schedule {
            let record = self.snap.units.get(unit);
            let rules = self.snap.rules.get(unit);
            for (machine, entry) in entries {
                let machine = machine.as_str();
                let leaving = entry.desired_state == DesiredState::Inactive
                    && self.snap.machines.contains_key(machine)
                    && self.exclusive(unit)
                    && self.wanted_unit(unit);
                if leaving {
                    // An exclusive unit stopping on its way elsewhere (see `remove`).
                    if self.stopped_on(unit, machine) {
                        self.out.decisions.push(Decision::Remove {
                            unit: unit.clone(),
                            machine: machine.to_string(),
                            reason: Reason::Stopped,
                        });
                    } else {
                        self.leaving.insert(unit.clone(), machine.to_string());
                    }
                    continue;
                }
                let reason = match (record, rules) {
                    (None, _) => Some(Reason::UnitGone),
                    _ if unit.is_template() => Some(Reason::Template),
                    (Some(r), _) if r.desired_state == DesiredState::Inactive => Some(Reason::UnitInactive),
                    (_, Some(Ok(r)))
                        if r.exclusive
                            && !self.snap.machines.contains_key(machine)
                            && self.snap.fencing.contains(machine) =>
                    {
                        // It may still run there: wait until its agent has certainly stopped it.
                        self.fenced.insert(unit.clone(), machine.to_string());
                        continue;
                    }
                    _ if !self.snap.machines.contains_key(machine) => Some(Reason::MachineLost),
                    _ if self.snap.drained.contains(machine) => Some(Reason::Drained),
                    (_, None) => Some(Reason::RulesBroken("unit file not available".into())),
                    (_, Some(Err(e))) => Some(Reason::RulesBroken(e.clone())),
                    (_, Some(Ok(r))) if !r.global && self.p.at.contains_key(unit) => Some(Reason::Duplicate),
                    (_, Some(Ok(r))) => {
                        let m = &self.snap.machines[machine];
                        match self.eligible(unit, r, m, false) {
                            Ok(()) => None,
                            Err(f) => Some(Reason::RulesBroken(describe_one(&f))),
                        }
                    }
                };
                match reason {
                    Some(reason) => self.remove(unit.clone(), machine.to_string(), reason),
                    None => self.p.add(unit, machine, self.reserve(unit)),
                }
            }
        }
        // Then MachineOf, until nothing changes: a follower whose peer left follows it.
        loop {
            let mut evict = Vec::new();
            for (unit, machines) in &self.p.at {
                let Some(r) = self.rules(unit) else { continue };
                for m in machines {
                    if let Some(peer) = r.machine_of.iter().find(|p| {
                        !UnitName::parse(p).ok().and_then(|p| self.p.at.get(&p)).is_some_and(|ms| ms.contains(m))
                    }) {
                        evict.push((unit.clone(), m.clone(), peer.clone()));
                    }
                }
            }
            if evict.is_empty() {
                break;
            }
            for (unit, m, peer) in evict {
                let reserve = self.reserve(&unit);
                self.p.remove(&unit, &m, reserve);
                self.remove(unit, m, Reason::RulesBroken(format!("MachineOf {peer} is no longer there")));
            }
        }
    }

    /// Every unit the user wants to run, in name order: what a whole pass places.
    pub(super) fn wanted(&self) -> Wanted<'a> {
        let wanted: fn(&(&'a UnitName, &'a UnitRecord)) -> bool = |(_, r)| r.desired_state != DesiredState::Inactive;
        self.snap.units.iter().filter(wanted)
    }

    /// Places the global units among `candidates` (wanted units, in name order) on every
    /// eligible machine that does not have them yet.
    pub(super) fn place_globals(&mut self, candidates: impl Iterator<Item = (&'a UnitName, &'a UnitRecord)>) {
        let globals: Vec<&UnitName> = candidates
            .filter(|(n, _)| self.rules(n).is_some_and(|r| r.global) && !n.is_template())
            .map(|(n, _)| n)
            .collect();
        for unit in globals {
            let Some(rules) = self.rules(unit) else { continue };
            let mut fails = Vec::new();
            for m in self.snap.machines.values() {
                if self.p.at.get(unit).is_some_and(|ms| ms.contains(&m.id)) {
                    continue;
                }
                match self.eligible(unit, rules, m, true) {
                    Ok(()) => {
                        self.p.add(unit, &m.id, rules.reserve);
                        self.put(unit, &m.id);
                    }
                    Err(f) => fails.push((m.id.clone(), f)),
                }
            }
            if !self.p.at.contains_key(unit) {
                self.out.unplaceable.insert(unit.clone(), explain(&fails, self.snap.machines.len()));
            }
        }
    }

    pub(super) fn put(&mut self, unit: &UnitName, machine: &str) {
        if let Some(rec) = self.snap.units.get(unit) {
            let entry = ScheduleEntry { hash: rec.hash.clone(), desired_state: rec.desired_state };
            self.out.decisions.push(Decision::Put { unit: unit.clone(), machine: machine.to_string(), entry });
        }
    }

    /// Places the units among `candidates` (wanted units, in name order) that are neither
    /// global nor placed, and says why of those that cannot be.
    pub(super) fn place_others(&mut self, candidates: impl Iterator<Item = (&'a UnitName, &'a UnitRecord)> + Clone) {
        for (unit, machine) in &self.fenced {
            self.out.unplaceable.insert(
                unit.clone(),
                format!("exclusive: waiting until lost machine {} has certainly stopped it", short(machine)),
            );
        }
        let mut pending: Vec<(UnitName, Option<String>)> = candidates
            .clone()
            .filter(|(n, _)| {
                !self.p.at.contains_key(*n) && !self.fenced.contains_key(*n) && self.rules(n).is_some_and(|r| !r.global)
            })
            .map(|(n, _)| (n.clone(), None))
            .collect();
        for (n, _) in candidates {
            if n.is_template() {
                self.out.unplaceable.insert(
                    n.clone(),
                    format!(
                        "{n} is a template and is never scheduled; start an instance such as {}",
                        n.as_str().replacen("@.", "@1.", 1)
                    ),
                );
            } else if let Some(Err(e)) = self.snap.rules.get(n) {
                self.out.unplaceable.insert(n.clone(), e.clone());
            } else if !self.snap.rules.contains_key(n) {
                self.out.unplaceable.insert(n.clone(), "unit file not available".into());
            }
        }
        pending.retain(|(n, _)| !n.is_template());
        let mut guard = 0;
        while !pending.is_empty() && guard < 10_000 {
            guard += 1;
            let mut deferred = Vec::new();
            let mut progress = false;
            for (unit, excluded) in std::mem::take(&mut pending) {
                let Some(rules) = self.rules(&unit) else { continue };
                // Followers wait for their peers to be placed in this pass.
                let waiting = rules.machine_of.iter().any(|p| {
                    UnitName::parse(p).is_ok_and(|p| !self.p.at.contains_key(&p) && pending_contains(&deferred, &p))
                });
                if waiting {
                    deferred.push((unit, excluded));
                    continue;
                }
                progress = true;
                self.place_one(&unit, rules, excluded.as_deref(), &mut deferred);
            }
            if !progress {
                // Peers that can never be placed: explain the followers.
                for (unit, _) in &deferred {
                    let Some(rules) = self.rules(unit) else { continue };
                    let peers: Vec<&str> = rules.machine_of.iter().map(String::as_str).collect();
                    self.out
                        .unplaceable
                        .insert(unit.clone(), format!("MachineOf {} cannot be placed", peers.join(", ")));
                }
                break;
            }
            pending = deferred;
        }
    }

    /// The preferred eligible machine among those `allowed`, or why each machine was not.
    pub(super) fn best_machine(
        &mut self,
        unit: &UnitName,
        rules: &Rules,
        allowed: impl Fn(&str) -> bool,
    ) -> Result<&'a MachineRecord, Vec<(String, Fail)>> {
        if rules.replaces.is_empty() && rules.spread_by.is_none() {
            // Every machine's preference is its load key: the first eligible machine in load
            // order is the best one. Only when none is eligible does the full scan below run,
            // to say why of each.
            let mut after: Option<LoadKey> = None;
            loop {
                let next = match &after {
                    None => self.p.by_load.iter().next().cloned(),
                    Some(k) => self.p.by_load.range((Excluded(k.clone()), Unbounded)).next().cloned(),
                };
                let Some(key) = next else { break };
                if allowed(&key.2) {
                    if let Some(m) = self.snap.machines.get(&*key.2) {
                        if self.eligible_replacing(unit, rules, m).is_ok() {
                            return Ok(m);
                        }
                    }
                }
                after = Some(key);
            }
        }
        let mut fails = Vec::new();
        let mut best: Option<(&'a MachineRecord, Preference)> = None;
        for m in self.snap.machines.values() {
            if !allowed(&m.id) {
                fails.push((m.id.clone(), Fail::Displaced(String::new())));
                continue;
            }
            // Units this one replaces do not count as conflicts: they will be moved away.
            if let Err(f) = self.eligible_replacing(unit, rules, m) {
                fails.push((m.id.clone(), f));
                continue;
            }
            let takes_over = self.replaceable_on(unit, rules, &m.id).next().is_some();
            let spread = rules.spread_by.as_deref().map(|k| self.spread_count(unit, k, m)).unwrap_or(0);
            let key = (!takes_over, spread, self.utilisation(m), self.p.count(&m.id));
            if best.as_ref().is_none_or(|(_, b)| key < *b) {
                best = Some((m, key));
            }
        }
        best.map(|(m, _)| m).ok_or(fails)
    }

    /// Users' move requests: take the unit off its machine and place it on the requested one
    /// (or the best other one), or refuse with the reason and leave it where it runs.
    pub(super) fn do_moves(&mut self) {
        for (unit, req) in self.snap.moves {
            if !req.refused.is_empty() {
                if !self.snap.units.contains_key(unit) {
                    self.out.moves.insert(unit.clone(), MoveOutcome::Done);
                }
                continue;
            }
            let Some(rules) = self.rules(unit) else {
                self.out.moves.insert(unit.clone(), MoveOutcome::Done);
                continue;
            };
            if rules.global {
                self.out.moves.insert(
                    unit.clone(),
                    MoveOutcome::Refused(format!("{unit} is global: it runs on every eligible machine")),
                );
                continue;
            }
            let on_from = self.p.at.get(unit).is_some_and(|ms| ms.contains(&req.from));
            // An exclusive unit taken off `from` by an earlier pass, waiting there to stop.
            let handing_over = !on_from && rules.exclusive && !self.p.at.contains_key(unit) && self.wanted_unit(unit);
            if !on_from && !handing_over {
                // Already moved, unscheduled or destroyed.
                self.out.moves.insert(unit.clone(), MoveOutcome::Done);
                continue;
            }
            if handing_over && (self.stopping_on(unit).is_some() || self.fenced.contains_key(unit)) {
                continue;
            }
            let reserve = rules.reserve;
            if on_from {
                self.p.remove(unit, &req.from, reserve);
            }
            let to = req.to.clone();
            let from = req.from.clone();
            let target =
                self.best_machine(unit, rules, |m| m != from && (to.is_empty() || m == to)).map(|m| m.id.clone());
            match target {
                Ok(machine) => {
                    if on_from {
                        self.remove(unit.clone(), from, Reason::Moved);
                    }
                    if self.stopping_on(unit).is_some() {
                        // The request stays, and the unit goes to `machine` (or the best other
                        // one then) once it has stopped where it was.
                        continue;
                    }
                    self.p.add(unit, &machine, reserve);
                    self.put(unit, &machine);
                    self.out.moves.insert(unit.clone(), MoveOutcome::Done);
                }
                Err(fails) => {
                    // Refused: it stays where it runs (or, handed over, goes wherever it can).
                    if on_from {
                        self.p.add(unit, &from, reserve);
                    }
                    let fails: Vec<_> =
                        fails.into_iter().filter(|(m, _)| *m != from && (to.is_empty() || *m == to)).collect();
                    let whereto = if to.is_empty() { "another machine".to_string() } else { short(&to).to_string() };
                    let why = if fails.is_empty() {
                        format!("machine {whereto} is not in the cluster")
                    } else {
                        explain(&fails, fails.len())
                    };
                    self.out
                        .moves
                        .insert(unit.clone(), MoveOutcome::Refused(format!("cannot move {unit} to {whereto}: {why}")));
                }
            }
        }
    }

    pub(super) fn place_one(
        &mut self,
        unit: &UnitName,
        rules: &Rules,
        excluded: Option<&str>,
        pending: &mut Vec<(UnitName, Option<String>)>,
    ) {
        if let Some(m) = self.stopping_on(unit) {
            self.out
                .unplaceable
                .insert(unit.clone(), format!("exclusive: waiting until it has stopped on {}", short(m)));
            return;
        }
        let best = match self.best_machine(unit, rules, |m| excluded != Some(m)) {
            Ok(m) => m,
            Err(fails) => {
                self.out.unplaceable.insert(unit.clone(), explain(&fails, self.snap.machines.len()));
                return;
            }
        };
        let m = best;
        let machine = m.id.clone();
        let displaced: Vec<UnitName> = self.replaceable_on(unit, rules, &machine).collect();
        for other in displaced {
            let reserve = self.reserve(&other);
            self.p.remove(&other, &machine, reserve);
            self.out
                .decisions
                .retain(|d| !matches!(d, Decision::Put { unit: u, machine: mm, .. } if *u == other && *mm == machine));
            self.remove(other.clone(), machine.clone(), Reason::Displaced(unit.clone()));
            pending.push((other, Some(machine.clone())));
        }
        self.p.add(unit, &machine, rules.reserve);
        self.put(unit, &machine);
    }

    /// Units on `machine` that `unit` replaces (never a mutual pair, never a global unit).
    pub(super) fn replaceable_on<'b>(
        &'b self,
        unit: &'b UnitName,
        rules: &'b Rules,
        machine: &str,
    ) -> impl Iterator<Item = UnitName> + 'b {
        // A unit without `Replaces` (most) does not walk the machine's units: that walk, a
        // name comparison per unit already there, was a fifth of a million-unit first pass.
        self.p
            .on
            .get(machine)
            .filter(|_| !rules.replaces.is_empty())
            .into_iter()
            .flatten()
            .filter(move |o| {
                rules.replaces_unit(unit.as_str(), o.as_str())
                    && !self.mutual_replace(unit, o)
                    && self.rules(o).is_some_and(|r| !r.global)
            })
            .cloned()
            .collect::<Vec<_>>()
            .into_iter()
    }

    pub(super) fn eligible_replacing(&mut self, unit: &UnitName, rules: &Rules, m: &MachineRecord) -> Result<(), Fail> {
        let replaced: Vec<UnitName> = self.replaceable_on(unit, rules, &m.id).collect();
        for o in &replaced {
            let r = self.reserve(o);
            self.p.remove(o, &m.id, r);
        }
        let result = self.eligible(unit, rules, m, true);
        for o in &replaced {
            let r = self.reserve(o);
            self.p.add(o, &m.id, r);
        }
        result
    }
}
