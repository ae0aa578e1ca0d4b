//! How a pass's decisions become etcd writes: a page per machine's units for machines whose agent
//! reads pages (`MachineRecord::schedule_pages`, `fleet_model::pages`), a key per unit for the
//! others (agents of an earlier version).
//!
//! A million entries one key each was a million etcd writes, each applied, indexed and sent to
//! its agent's watch and both engines' on its own; in pages, a machine given its hundred units is
//! one write. A page is rewritten whole from what the leader's view holds, so each page write is
//! guarded by the revision the view last saw the page at: a view behind etcd (it never should be:
//! the leader is the only writer and waits for its writes to show) refuses the write rather than
//! losing entries it did not know of.
//!
//! Pure: decisions and the view in, writes out (no store, no async), so the tests below need
//! neither.

use crate::cluster::ClusterView;
use crate::scheduler::Decision;
use fleet_model::pages::{SchedulePages, SCHEDULE_PAGE_UNITS};
use fleet_model::schema::encode;
use fleet_model::{Keys, ScheduleEntry, SchedulePage, UnitName};
use fleet_store::kv::{CmpOp, Compare, Op, TXN_OPS};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A transaction's size at most: far below etcd's 1.5 MiB request limit, and small enough that
/// other writers' requests (agents' states) are not queued behind a long apply.
const TXN_BYTES: usize = 512 << 10;

/// One write of a pass.
#[derive(Debug, Clone)]
pub(super) struct Write {
    pub op: Op,
    /// A page rewritten whole: the revision it must still be at (0: it must not exist).
    pub expect: Option<i64>,
    /// The page was written earlier in this pass (its removals): expect the revision that write
    /// got, known only once it is answered.
    pub after_removals: bool,
    bytes: usize,
}

/// A pass's writes, in the order they must happen.
#[derive(Debug, Default)]
pub(super) struct ScheduleWrites {
    /// First, in order: units leaving machines (pages without them, per-unit keys deleted), so
    /// a unit leaves its old machine before it appears on a new one (an exclusive unit must
    /// never be scheduled twice).
    pub removals: Vec<Write>,
    /// Then, several transactions at once: new and changed entries.
    pub puts: Vec<Write>,
    /// Last: the per-unit keys of entries now in pages (after the pages, so their agent never
    /// misses them).
    pub moved: Vec<Write>,
    /// Units placed or changed (for the metrics and the log).
    pub entries_put: usize,
}

impl ScheduleWrites {
    /// Plans the writes of `decisions` on the schedule as `v` shows it.
    pub(super) fn plan(keys: &Keys, v: &ClusterView, decisions: &[Decision]) -> Result<Self, serde_json::Error> {
        let mut out = ScheduleWrites::default();
        // Per machine, in the decisions' order: (unit, Some(entry)) to put, (unit, None) to remove.
        let mut by_machine: BTreeMap<&str, Vec<(&UnitName, Option<&ScheduleEntry>)>> = BTreeMap::new();
        for d in decisions {
            match d {
                Decision::Put { unit, machine, entry } => {
                    tracing::debug!(%unit, %machine, state = %entry.desired_state, "schedule");
                    by_machine.entry(machine).or_default().push((unit, Some(entry)));
                    out.entries_put += 1;
                }
                Decision::Remove { unit, machine, reason } => {
                    tracing::debug!(%unit, %machine, ?reason, "unschedule");
                    by_machine.entry(machine).or_default().push((unit, None));
                }
            }
        }
        // Machines whose agent reads pages but which hold entries one key each (written before
        // it said so): those move into pages, with this pass's writes or alone.
        let to_move: Vec<&str> = v
            .machines
            .values()
            .filter(|r| r.schedule_pages && v.schedule_keys_on(&r.id) > 0)
            .map(|r| r.id.as_str())
            .collect();
        let mut keyed: HashMap<&str, Vec<&UnitName>> = HashMap::new();
        if !to_move.is_empty() {
            // One walk over the schedule, only while an upgrade leaves such machines.
            let wanted: BTreeSet<&str> = to_move.iter().copied().collect();
            for (unit, entries) in &v.schedule {
                for m in entries.keys().filter(|m| wanted.contains(m.as_str())) {
                    if !v.in_schedule_page(m, unit.as_str()) {
                        keyed.entry(m.as_str()).or_default().push(unit);
                    }
                }
            }
            for m in &to_move {
                by_machine.entry(m).or_default();
            }
        }
        for (machine, changes) in by_machine {
            let pages_here = v.machines.get(machine).is_some_and(|r| r.schedule_pages);
            let moving = keyed.remove(machine).unwrap_or_default();
            out.machine(keys, v, machine, pages_here, &changes, &moving)?;
        }
        Ok(out)
    }

    fn machine(
        &mut self,
        keys: &Keys,
        v: &ClusterView,
        machine: &str,
        pages_here: bool,
        changes: &[(&UnitName, Option<&ScheduleEntry>)],
        moving: &[&UnitName],
    ) -> Result<(), serde_json::Error> {
        let entry_of = |u: &UnitName| v.schedule.get(u).and_then(|e| e.get(machine)).cloned();
        // The machine's pages as the view holds them, and the revision each was written at.
        let mut revisions: HashMap<u32, i64> = HashMap::new();
        let mut pages: Vec<(u32, SchedulePage)> = Vec::new();
        for (n, revision, units) in v.schedule_pages_of(machine) {
            revisions.insert(n, revision);
            pages.push((n, units.filter_map(|u| Some((u.to_string(), entry_of(u)?))).collect()));
        }
        let mut current = SchedulePages::from_pages_of(SCHEDULE_PAGE_UNITS, pages);

        let mut removed_from_pages = Vec::new();
        let mut put_in_pages = Vec::new();
        for (unit, entry) in changes {
            let in_page = current.contains_key(unit.as_str());
            match entry {
                None if in_page => {
                    removed_from_pages.push((unit.to_string(), None));
                    // And its own key, should one be left (its move into the page cut short by a
                    // pass that ended early): the agent reads both, and a key left behind would
                    // keep the unit there. Deleting a key that is not there writes nothing.
                    self.removals.push(Write::plain(Op::delete(keys.schedule(machine, unit))));
                }
                None => self.removals.push(Write::plain(Op::delete(keys.schedule(machine, unit)))),
                Some(e) if pages_here || in_page => {
                    put_in_pages.push((unit.to_string(), Some((*e).clone())));
                    if !in_page && v.schedule.get(*unit).is_some_and(|m| m.contains_key(machine)) {
                        // Its own key, changed: into a page, the key deleted after.
                        self.moved.push(Write::plain(Op::delete(keys.schedule(machine, unit))));
                    }
                }
                Some(e) => self.puts.push(Write::plain(Op::put(keys.schedule(machine, unit), encode(e)?, 0))),
            }
        }
        let changed: BTreeSet<&str> = changes.iter().map(|(u, _)| u.as_str()).collect();
        for unit in moving.iter().filter(|u| !changed.contains(u.as_str())) {
            if let Some(e) = entry_of(unit) {
                put_in_pages.push((unit.to_string(), Some(e)));
                self.moved.push(Write::plain(Op::delete(keys.schedule(machine, unit))));
            }
        }

        let mut after_removals = BTreeSet::new();
        for (n, page) in current.plan(&removed_from_pages) {
            let expect = revisions.get(&n).copied().unwrap_or(0);
            self.removals.push(Write::page(keys.schedule_page(machine, n), page.as_ref(), expect, false)?);
            after_removals.insert(n);
            current.written(n, page);
        }
        for (n, page) in current.plan(&put_in_pages) {
            let expect = if after_removals.contains(&n) { 0 } else { revisions.get(&n).copied().unwrap_or(0) };
            let write =
                Write::page(keys.schedule_page(machine, n), page.as_ref(), expect, after_removals.contains(&n))?;
            self.puts.push(write);
        }
        Ok(())
    }
}

impl Write {
    fn plain(op: Op) -> Self {
        let bytes = op_bytes(&op);
        Write { op, expect: None, after_removals: false, bytes }
    }

    fn page(
        key: String,
        page: Option<&SchedulePage>,
        expect: i64,
        after_removals: bool,
    ) -> Result<Self, serde_json::Error> {
        let op = match page {
            Some(p) => Op::put(key, encode(p)?, 0),
            None => Op::delete(key),
        };
        let bytes = op_bytes(&op);
        Ok(Write { op, expect: Some(expect), after_removals, bytes })
    }

    /// The key this writes.
    pub(super) fn key(&self) -> &[u8] {
        match &self.op {
            Op::Put { key, .. } | Op::Delete(key) | Op::Get(key) => key,
            Op::Txn(_) => &[],
        }
    }

    /// The guard of a page written whole: still at the revision expected (`written`: what this
    /// pass's earlier writes got).
    pub(super) fn guard(&self, written: &HashMap<Vec<u8>, i64>) -> Option<Compare> {
        let expect = self.expect?;
        let expect = if self.after_removals { written.get(self.key()).copied().unwrap_or(expect) } else { expect };
        Some(Compare::mod_revision(self.key().to_vec(), CmpOp::Equal, expect))
    }
}

fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Put { key, value, .. } => key.len() + value.len(),
        Op::Delete(key) | Op::Get(key) => key.len(),
        Op::Txn(_) => 0,
    }
}

/// `writes` in transactions of at most [`TXN_OPS`] writes and about 1 MiB.
pub(super) fn chunks(writes: Vec<Write>) -> Vec<Vec<Write>> {
    let mut out: Vec<Vec<Write>> = Vec::new();
    let mut bytes = 0;
    for w in writes {
        match out.last_mut() {
            Some(c) if c.len() < TXN_OPS && bytes + w.bytes <= TXN_BYTES => {
                bytes += w.bytes;
                c.push(w);
            }
            _ => {
                bytes = w.bytes;
                out.push(vec![w]);
            }
        }
    }
    out
}
