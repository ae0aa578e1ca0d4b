//! What the agent tells the cluster: the state of each of its units, published on its lease,
//! and on start what an earlier run of it published.

use crate::driver::UnitDriver;
use crate::systemd::ObservedUnit;
use crate::{Agent, AgentError, TRANSIENT_GRACE};
use fleet_model::schema::{decode, encode, is_stopped, Key};
use fleet_model::{DesiredState, UnitName, UnitStateRecord};
use fleet_store::kv::{Op, Store, StoreError, Txn};
use fleet_store::retry::RetryPolicy;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

impl<D: UnitDriver, S: Store> Agent<D, S> {
    /// Learns what an earlier run of this agent applied, so a failed unit it had launched is not
    /// started again just because the agent restarted.
    pub(crate) async fn read_published(&mut self) -> Result<(), AgentError> {
        let prefix = self.keys.states_of(&self.machine);
        let (entries, _) = RetryPolicy::default()
            .run("read published states", StoreError::is_transient, || self.store.range(prefix.as_bytes()))
            .await
            .map_err(|e| AgentError::Etcd(e.to_string()))?;
        for kv in &entries {
            if let (Some(Key::State(_, unit)), Ok(rec)) =
                (self.keys.decode(&kv.key), decode::<UnitStateRecord>(&kv.value))
            {
                if self.files.get(unit.as_str()).is_some_and(|h| *h == rec.hash) {
                    self.applied.insert(unit.to_string(), rec.applied);
                }
                self.published.insert(unit.to_string(), rec);
            }
        }
        // Whatever was published is republished (or deleted) under the current lease.
        self.unpublished.extend(self.published.keys().cloned());
        self.unpublished.extend(self.files.keys().cloned());
        Ok(())
    }

    /// Publishes the state of every unit in `unpublished`, in transactions on the lease.
    pub(crate) async fn publish(&mut self) -> Result<(), AgentError> {
        let Some(lease) = self.lease else {
            return Err(AgentError::Etcd("no lease".into()));
        };
        let names: Vec<String> = self.unpublished.iter().cloned().collect();
        let observed = self.systemd.observe(&names).await?;
        let mut deferred = BTreeSet::new();
        let mut ops = Vec::new();
        let mut next: Vec<(String, Option<UnitStateRecord>)> = Vec::new();
        let now = self.now_ms();
        for name in &names {
            let Ok(unit) = UnitName::parse(name) else {
                continue;
            };
            let key = self.keys.state(&self.machine, &unit);
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
                        let value = encode(&rec).map_err(|e| AgentError::Etcd(e.to_string()))?;
                        ops.push(Op::put(key, value, lease));
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
                        let value = encode(&rec).map_err(|e| AgentError::Etcd(e.to_string()))?;
                        ops.push(Op::put(key, value, lease));
                        next.push((name.clone(), Some(rec)));
                    }
                }
                None if self.published.contains_key(name) => {
                    // Taken off this machine: its last state stays until systemd has stopped it
                    // (the end of its stop job brings it back here), so a unit is never reported
                    // gone while it still runs, and an exclusive one is not started elsewhere
                    // while its `ExecStop` still runs here.
                    if let Some(o) = observed.get(name).filter(|o| !is_stopped(&o.active_state)) {
                        // Reported stopped, yet running again (started by a socket, a timer, a
                        // dependency): say so.
                        if let Some(last) = self.published.get(name).filter(|l| l.stopped()) {
                            let rec = UnitStateRecord {
                                hash: last.hash.clone(),
                                load_state: o.load_state.as_str().into(),
                                active_state: o.active_state.as_str().into(),
                                sub_state: o.sub_state.as_str().into(),
                                applied: DesiredState::Inactive,
                                health: None,
                            };
                            let value = encode(&rec).map_err(|e| AgentError::Etcd(e.to_string()))?;
                            ops.push(Op::put(key, value, lease));
                            next.push((name.clone(), Some(rec)));
                        }
                        continue;
                    }
                    ops.push(Op::delete(key));
                    next.push((name.clone(), None));
                }
                None => {}
            }
        }
        for (chunk_ops, chunk_next) in ops.chunks(100).zip(next.chunks(100)) {
            let txn = Txn { then: chunk_ops.to_vec(), ..Txn::default() };
            match tokio::time::timeout(Duration::from_secs(5), self.store.txn(txn)).await {
                Ok(Ok(_)) => {
                    for (name, rec) in chunk_next {
                        match rec {
                            Some(r) => self.published.insert(name.clone(), r.clone()),
                            None => self.published.remove(name),
                        };
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot publish unit states");
                    return Err(AgentError::Etcd(e.to_string()));
                }
                Err(_) => return Err(AgentError::Etcd("publishing unit states timed out".into())),
            }
        }
        self.unpublished = deferred;
        Ok(())
    }
}
