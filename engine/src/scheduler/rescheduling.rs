//! Units that keep failing (`RescheduleAttempts=`): once systemd reports one `failed` on its
//! machine, the pass waits out its delay, then moves it to the best machine it has not failed on
//! lately, and records what it did (`reschedule/<unit>`) so the next pass, or the next leader,
//! goes on counting. Units without the option are never moved for failing. The policy's
//! arithmetic is `fleet_model::reschedule`'s; this is what a pass does with it.

use super::*;
use fleet_model::reschedule::{span_words, Moved, RescheduleRecord, Verdict};

impl<'a> Pass<'a> {
    /// Machines each unit with a record avoids when it is placed (read by `eligible`).
    pub(super) fn learn_avoided(&mut self) {
        for (unit, rec) in self.snap.reschedules {
            let Some(policy) = self.rules(unit).map(|r| &r.reschedule).filter(|p| p.is_on()) else { continue };
            let avoided = policy.avoided(rec, self.snap.now);
            if !avoided.is_empty() {
                self.avoid.insert(unit.clone(), avoided);
            }
        }
    }

    /// Whether systemd reports `unit` failed on `machine`.
    fn failed_there(&self, unit: &UnitName, machine: &str) -> bool {
        self.snap.states.get(unit).and_then(|s| s.get(machine)).is_some_and(|s| s.active_state == "failed")
    }

    fn wake(&mut self, at: u64) {
        self.out.wake_at = Some(self.out.wake_at.map_or(at, |w| w.min(at)));
    }

    pub(super) fn reschedule_failed(&mut self) {
        let now = self.snap.now;
        let mut units: BTreeSet<&'a UnitName> = self.rescheduling.iter().copied().collect();
        units.extend(self.snap.reschedules.keys());
        for unit in units {
            let before = self.snap.reschedules.get(unit);
            let policy = match self.snap.rules.get(unit) {
                _ if !self.wanted_unit(unit) => None,
                Some(Ok(r)) => Some(&r.reschedule).filter(|p| p.is_on()),
                // Rules not read yet (the body may be on its way): keep what is recorded.
                _ => continue,
            };
            let Some(policy) = policy else {
                if before.is_some() {
                    self.out.reschedules.insert(unit.clone(), None);
                }
                continue;
            };
            let mut rec = before.cloned().unwrap_or_default();
            let failed_on = self.p.at.get(unit).and_then(|ms| ms.iter().find(|m| self.failed_there(unit, m))).cloned();
            match &failed_on {
                Some(m) => rec.failed_on(m, now),
                // Running again (restarted by hand), or moved: no failure being handled.
                None => rec.failing = None,
            }
            policy.prune(&mut rec, now);
            if let Some(from) = failed_on {
                self.avoid.insert(unit.clone(), policy.avoided(&rec, now));
                match policy.verdict(&rec, now) {
                    Verdict::Healthy => {}
                    Verdict::Wait { until } => {
                        self.wake(until);
                        let recent = policy.recent_moves(&rec, now);
                        rec.note = format!(
                            "failed on {}; to be moved {} after the failure (move {} of {} within {})",
                            short(&from),
                            span_words(policy.delay_after(recent)),
                            recent + 1,
                            policy.attempts,
                            span_words(policy.interval),
                        );
                    }
                    Verdict::Exhausted { recent } => {
                        rec.note = format!(
                            "failed on {}; not moved: it moved {recent} times within {} (RescheduleAttempts={})",
                            short(&from),
                            span_words(policy.interval),
                            policy.attempts,
                        );
                        // It may move again once the oldest move leaves the interval.
                        let interval = policy.interval.as_secs();
                        let counted = rec.moves.iter().map(|m| m.at).filter(|at| now.saturating_sub(*at) < interval);
                        if let Some(oldest) = counted.min() {
                            self.wake(oldest + interval);
                        }
                    }
                    Verdict::Move { attempt } => self.move_failed(unit, &from, attempt, &mut rec),
                }
            }
            if rec.is_empty() {
                if before.is_some() {
                    self.out.reschedules.insert(unit.clone(), None);
                }
            } else if before != Some(&rec) {
                self.out.reschedules.insert(unit.clone(), Some(rec));
            }
        }
    }

    /// Takes a failed unit off `from` and places it on the best machine it has not failed on
    /// lately; when there is none it stays failed where it is, and the record says why.
    fn move_failed(&mut self, unit: &UnitName, from: &str, attempt: usize, rec: &mut RescheduleRecord) {
        let Some(rules) = self.rules(unit) else { return };
        let policy = &rules.reschedule;
        let reserve = rules.reserve;
        self.p.remove(unit, from, reserve);
        match self.best_machine(unit, rules, |_| true).map(|m| m.id.clone()) {
            Ok(to) => {
                self.remove(unit.clone(), from.to_string(), Reason::Failed);
                // An exclusive unit still stopping on `from` (it is failed, so seldom) is placed
                // by a later pass, where its failed machines are avoided all the same.
                if self.stopping_on(unit).is_none() {
                    self.p.add(unit, &to, reserve);
                    self.put(unit, &to);
                }
                rec.note = format!(
                    "failed on {}; moved to {} (move {attempt} of {} within {}); {} avoided for {}",
                    short(from),
                    short(&to),
                    policy.attempts,
                    span_words(policy.interval),
                    short(from),
                    span_words(policy.avoid),
                );
                rec.moves.push(Moved { from: from.to_string(), to, at: self.snap.now });
                rec.failing = None;
            }
            Err(fails) => {
                self.p.add(unit, from, reserve);
                rec.note = format!(
                    "failed on {}; no other machine can take it: {}",
                    short(from),
                    explain(&fails, self.snap.machines.len())
                );
                // Machines may come or free up: look again after the delay.
                self.wake(self.snap.now + policy.delay.as_secs().max(1));
            }
        }
    }
}
