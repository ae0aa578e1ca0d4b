//! What the agent tells the cluster: the state of each of its units, published on its lease,
//! and on start what an earlier run of it published.

use crate::driver::UnitDriver;
use crate::files::UnitFiles;
use crate::systemd::ObservedUnit;
use crate::{Agent, AgentError, TRANSIENT_GRACE};
use fleet_model::schema::{decode, encode, is_stopped, Key};
use fleet_model::{DesiredState, StatePage, StatePages, UnitName, UnitStateRecord};
use fleet_store::kv::{CmpOp, Compare, Op, Store, StoreError, Txn, TXN_OPS};
use fleet_store::retry::RetryPolicy;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

impl<D: UnitDriver, S: Store, F: UnitFiles> Agent<D, S, F> {
    /// Learns what an earlier run of this agent applied, so a failed unit it had launched is not
    /// started again just because the agent restarted.
    pub(crate) async fn read_published(&mut self) -> Result<(), AgentError> {
        let prefix = self.keys.states_of(&self.machine);
        let (entries, _) = RetryPolicy::default()
            .run("read published states", StoreError::is_transient, || self.store.range(prefix.as_bytes()))
            .await
            .map_err(|e| AgentError::Etcd(e.to_string()))?;
        let mut pages = Vec::new();
        self.page_revisions.clear();
        for kv in &entries {
            match self.keys.decode(&kv.key) {
                Some(Key::StatePage(_, n)) => {
                    self.page_revisions.insert(n, kv.mod_revision);
                    match decode::<StatePage>(&kv.value) {
                        Ok(page) => pages.push((n, page)),
                        // Rewritten from what systemd says: its units are all republished below.
                        Err(e) => tracing::warn!(page = n, error = %e, "unreadable state page; publishing it again"),
                    }
                }
                Some(Key::State(_, unit)) => {
                    if let Ok(rec) = decode::<UnitStateRecord>(&kv.value) {
                        self.legacy.insert(unit.to_string(), rec);
                    }
                }
                _ => {}
            }
        }
        self.published = StatePages::from_pages(pages);
        let earlier: Vec<(String, UnitStateRecord)> = self
            .published
            .units()
            .filter_map(|u| self.published.get(u).map(|r| (u.clone(), r.clone())))
            .chain(self.legacy.iter().map(|(u, r)| (u.clone(), r.clone())))
            .collect();
        for (unit, rec) in earlier {
            if self.files.get(unit.as_str()).is_some_and(|h| *h == rec.hash) {
                self.applied.insert(unit.clone(), rec.applied);
            }
            self.unpublished.insert(unit);
        }
        // Whatever was published is republished (or deleted) under the current lease.
        self.unpublished.extend(self.files.keys().cloned());
        Ok(())
    }

    /// After a write whose outcome is unknown (timed out, failed) or that found a page changed
    /// behind it: reads the pages back, with their revisions, and takes them as published,
    /// except pages on another lease (an earlier one: they are written again on this one). Every
    /// unit whose published state this changes is looked at again.
    async fn reread_pages(&mut self, lease: i64) -> Result<(), AgentError> {
        let prefix = self.keys.states_of(&self.machine);
        let (entries, _) = match tokio::time::timeout(Duration::from_secs(5), self.store.range(prefix.as_bytes())).await
        {
            Ok(Ok(got)) => got,
            Ok(Err(e)) => return Err(AgentError::Etcd(e.to_string())),
            Err(_) => return Err(AgentError::Etcd("reading the published states back timed out".into())),
        };
        let mut pages = Vec::new();
        let mut revisions = HashMap::new();
        for kv in &entries {
            if let Some(Key::StatePage(_, n)) = self.keys.decode(&kv.key) {
                revisions.insert(n, kv.mod_revision);
                if kv.lease == lease {
                    if let Ok(page) = decode::<StatePage>(&kv.value) {
                        pages.push((n, page));
                    }
                }
            }
        }
        let read = StatePages::from_pages(pages);
        let changed: Vec<String> = read
            .units()
            .chain(self.published.units())
            .filter(|u| read.get(u) != self.published.get(u))
            .cloned()
            .collect();
        self.unpublished.extend(changed);
        self.published = read;
        self.page_revisions = revisions;
        self.reread_pages = false;
        Ok(())
    }

    /// Publishes the state of every unit in `unpublished`, in transactions on the lease.
    pub(crate) async fn publish(&mut self) -> Result<(), AgentError> {
        let Some(lease) = self.lease else {
            return Err(AgentError::Etcd("no lease".into()));
        };
        if self.reread_pages {
            self.reread_pages(lease).await?;
        }
        let names: Vec<String> = self.unpublished.iter().cloned().collect();
        let observed = self.systemd.observe(&names).await?;
        let mut deferred = BTreeSet::new();
        let mut next: Vec<(String, Option<UnitStateRecord>)> = Vec::new();
        let now = self.now_ms();
        for name in &names {
            if UnitName::parse(name).is_err() {
                continue;
            }
            // What this machine last said about the unit: its page, or an earlier version's key.
            let last = self.published.get(name).or_else(|| self.legacy.get(name));
            match self.files.get(name) {
                Some(hash) => {
                    let o = observed.get(name).cloned().unwrap_or_else(|| ObservedUnit {
                        load_state: "not-found".into(),
                        active_state: "inactive".into(),
                        sub_state: "dead".into(),
                    });
                    // A unit on its way up or down is reported once it gets there (systemd
                    // signals that), which saves a write per start; one that stays in between
                    // for a second is reported as it is. An exclusive unit is reported at once:
                    // were it moved while still starting, the engine must know it runs here.
                    let transient = matches!(o.active_state.as_str(), "activating" | "deactivating");
                    if transient && !self.exclusive.contains(name) {
                        let since = *self.transient_since.entry(name.clone()).or_insert_with(Instant::now);
                        if since.elapsed() < TRANSIENT_GRACE {
                            deferred.insert(name.clone());
                            continue;
                        }
                    } else {
                        self.transient_since.remove(name);
                    }
                    // A unit declaring its health: its tracker sees it active or not, its check
                    // runs while it is active.
                    let health = self.health.get_mut(name).and_then(|t| {
                        t.active(o.active_state == "active", now);
                        if let Some(c) = self.checks.as_mut() {
                            c.set(name, t.spec().check.as_ref(), t.wants_checks());
                        }
                        t.health(now)
                    });
                    let rec = UnitStateRecord {
                        hash: hash.into(),
                        load_state: o.load_state.into(),
                        active_state: o.active_state.into(),
                        sub_state: o.sub_state.into(),
                        applied: self.applied.get(name).copied().unwrap_or(DesiredState::Loaded),
                        health,
                    };
                    if self.published.get(name) != Some(&rec) {
                        next.push((name.clone(), Some(rec)));
                    }
                }
                None if self.refused.contains_key(name) => {
                    let rec = UnitStateRecord {
                        hash: self.refused.get(name).map(Into::into).unwrap_or_default(),
                        load_state: "refused".into(),
                        active_state: "failed".into(),
                        sub_state: "shadows-system-unit".into(),
                        applied: DesiredState::Inactive,
                        health: None,
                    };
                    if self.published.get(name) != Some(&rec) {
                        next.push((name.clone(), Some(rec)));
                    }
                }
                None if last.is_some() => {
                    // Taken off this machine: its last state stays until systemd has stopped it
                    // (the end of its stop job brings it back here), so a unit is never reported
                    // gone while it still runs, and an exclusive one is not started elsewhere
                    // while its `ExecStop` still runs here.
                    if let Some(o) = observed.get(name).filter(|o| !is_stopped(&o.active_state)) {
                        // Reported stopped, yet running again (started by a socket, a timer, a
                        // dependency): say so.
                        if let Some(last) = last.filter(|l| l.stopped()) {
                            let rec = UnitStateRecord {
                                hash: last.hash.clone(),
                                load_state: o.load_state.as_str().into(),
                                active_state: o.active_state.as_str().into(),
                                sub_state: o.sub_state.as_str().into(),
                                applied: DesiredState::Inactive,
                                health: None,
                            };
                            next.push((name.clone(), Some(rec)));
                        } else if let Some(last) = last.filter(|_| !self.published.contains_key(name)) {
                            // Still stopping, known only by an earlier version's key: it moves
                            // into a page as it is (that key is deleted below).
                            next.push((name.clone(), Some(last.clone())));
                        }
                        continue;
                    }
                    next.push((name.clone(), None));
                }
                None => {}
            }
        }
        self.write_pages(lease, &next, &deferred).await?;
        self.unpublished = deferred;
        Ok(())
    }

    /// Writes the pages `next` changes, then deletes an earlier version's per-unit keys (except
    /// those of units still `deferred`), in transactions etcd accepts. A page rewritten in the
    /// same transaction as the old key it supersedes is seen first, so the engine never sees the
    /// unit without a state.
    async fn write_pages(
        &mut self,
        lease: i64,
        next: &[(String, Option<UnitStateRecord>)],
        deferred: &BTreeSet<String>,
    ) -> Result<(), AgentError> {
        enum Write {
            Page(u32, Option<StatePage>),
            Legacy(String),
        }
        let mut writes = Vec::new();
        for (n, contents) in self.published.plan(next) {
            let key = self.keys.state_page(&self.machine, n);
            let op = match &contents {
                Some(page) => Op::put(key, encode(page).map_err(|e| AgentError::Etcd(e.to_string()))?, lease),
                None => Op::delete(key),
            };
            writes.push((op, Write::Page(n, contents)));
        }
        for name in self.legacy.keys().filter(|n| !deferred.contains(*n)) {
            let Ok(unit) = UnitName::parse(name) else { continue };
            writes.push((Op::delete(self.keys.state(&self.machine, &unit)), Write::Legacy(name.clone())));
        }
        let mut writes = writes.into_iter().peekable();
        // Until a transaction is known to be written, its pages are in doubt.
        self.reread_pages = true;
        while writes.peek().is_some() {
            // Pages are up to ~40 KiB: a transaction stays well under etcd's 1.5 MiB request limit.
            let (mut ops, mut done, mut bytes) = (Vec::new(), Vec::new(), 0);
            while let Some((op, _)) = writes.peek() {
                let size = op_size(op);
                if !ops.is_empty() && (ops.len() >= TXN_OPS || bytes + size > TXN_BYTES) {
                    break;
                }
                bytes += size;
                if let Some((op, w)) = writes.next() {
                    ops.push(op);
                    done.push(w);
                }
            }
            // Each page as last seen (absent: not there): a page changed since (a late write of
            // this agent's, or anyone's) refuses the whole transaction, and the pages are read back.
            let when = done
                .iter()
                .filter_map(|w| match w {
                    Write::Page(n, _) => Some(Compare::mod_revision(
                        self.keys.state_page(&self.machine, *n),
                        CmpOp::Equal,
                        self.page_revisions.get(n).copied().unwrap_or(0),
                    )),
                    Write::Legacy(_) => None,
                })
                .collect();
            let txn = Txn { when, then: ops, ..Txn::default() };
            match tokio::time::timeout(Duration::from_secs(5), self.store.txn(txn)).await {
                Ok(Ok(r)) if !r.succeeded => {
                    tracing::info!("a state page changed since this agent last wrote it; reading them back");
                    return Err(AgentError::Etcd("state pages changed behind the agent".into()));
                }
                Ok(Ok(r)) => {
                    for w in done {
                        match w {
                            Write::Page(n, contents) => {
                                match contents.is_some() {
                                    true => self.page_revisions.insert(n, r.revision),
                                    false => self.page_revisions.remove(&n),
                                };
                                self.published.written(n, contents)
                            }
                            Write::Legacy(name) => {
                                self.legacy.remove(&name);
                            }
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot publish unit states");
                    return Err(AgentError::Etcd(e.to_string()));
                }
                Err(_) => return Err(AgentError::Etcd("publishing unit states timed out".into())),
            }
        }
        self.reread_pages = false;
        Ok(())
    }
}

/// Bytes of state one transaction carries at most.
const TXN_BYTES: usize = 1 << 20;

fn op_size(op: &Op) -> usize {
    match op {
        Op::Put { key, value, .. } => key.len() + value.len(),
        Op::Get(key) | Op::Delete(key) => key.len(),
        Op::Txn(_) => 0,
    }
}
