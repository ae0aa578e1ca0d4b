//! What the simulation sees of the cluster: a watch of schedules and states, counting placements
//! and active units as they happen.

use anyhow::{bail, Result};
use fleet_model::pages::{PageChange, PageFollower};
use fleet_model::schema::{decode, Key};
use fleet_model::{Keys, UnitStateRecord};
use fleet_store::etcd::Client;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Counts of unit states from a watch on `states/`.
#[derive(Default)]
pub(super) struct Observed {
    /// unit -> machines where it is active.
    pub(super) active: HashMap<String, HashSet<String>>,
    /// Units active somewhere (kept as `active` changes: checked after every watch response).
    pub(super) active_units: usize,
    pub(super) placed: usize,
    pub(super) first_placed: Option<Instant>,
    pub(super) last_placed: Option<Instant>,
    pub(super) puts: u64,
    /// Puts of units' own keys: records, schedule entries, states.
    pub(super) own_puts: u64,
    /// Puts and deletes under the prefix.
    pub(super) writes: u64,
    /// Puts of schedule keys (pages, or per-unit entries) and of state keys, and their values'
    /// bytes: what etcd applied, stored and sent to every watcher of them for each kind.
    pub(super) schedule_writes: Written,
    pub(super) state_writes: Written,
    /// Which units each machine's state pages hold.
    pub(super) pages: PageFollower,
    /// Which units each machine's schedule pages hold.
    pub(super) schedule_pages: PageFollower,
}

/// Puts of one kind of key, and their values' bytes.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Written {
    pub puts: u64,
    pub bytes: u64,
}

impl Written {
    fn add(&mut self, value: &[u8]) {
        self.puts += 1;
        self.bytes += value.len() as u64;
    }
}

/// Whether each unit a state key's event concerns is now active on its machine: (unit, machine,
/// active). Reads pages (what agents write) and per-unit keys (what agents before pages wrote).
pub(crate) fn activity(
    pages: &mut PageFollower,
    key: Option<Key>,
    put: bool,
    value: &[u8],
) -> Vec<(String, String, bool)> {
    let active = |raw: &[u8]| decode::<UnitStateRecord>(raw).is_ok_and(|s| s.active_state == "active");
    match key {
        Some(Key::State(m, u)) => vec![(u.to_string(), m, put && active(value))],
        Some(Key::StatePage(m, n)) => {
            let changes = if put {
                pages.put(&m, n, 0, value, |u| u).unwrap_or_else(|e| {
                    tracing::warn!(machine = %m, page = n, error = %e, "unreadable state page");
                    Vec::new()
                })
            } else {
                pages.delete(&m, n)
            };
            changes
                .into_iter()
                .map(|c| match c {
                    PageChange::Put(u, raw) => (u.to_string(), m.clone(), active(raw)),
                    PageChange::Removed(u) => (u.to_string(), m.clone(), false),
                })
                .collect()
        }
        _ => Vec::new(),
    }
}

/// How many units a schedule key's event newly places on its machine: a per-unit key created, or
/// units a machine's schedule page holds that it did not before.
pub(crate) fn placements(pages: &mut PageFollower, key: Option<Key>, put: bool, version: i64, value: &[u8]) -> usize {
    match key {
        Some(Key::Schedule(..)) => usize::from(put && version == 1),
        Some(Key::SchedulePage(m, n)) if put => {
            let before: std::collections::BTreeSet<String> =
                pages.pages_of(&m).filter(|(p, _, _)| *p == n).flat_map(|(_, _, u)| u.map(|u| u.to_string())).collect();
            let changes = pages.put(&m, n, 0, value, |u| u).unwrap_or_else(|e| {
                tracing::warn!(machine = %m, page = n, error = %e, "unreadable schedule page");
                Vec::new()
            });
            changes.iter().filter(|c| matches!(c, PageChange::Put(u, _) if !before.contains(u.as_str()))).count()
        }
        Some(Key::SchedulePage(m, n)) => {
            pages.delete(&m, n);
            0
        }
        _ => 0,
    }
}

impl Observed {
    pub(super) fn all_active(&self, units: usize) -> bool {
        self.active_units >= units
    }

    pub(super) fn set_active(&mut self, unit: String, machine: String, active: bool) {
        let set = self.active.entry(unit).or_default();
        let before = !set.is_empty();
        if active {
            set.insert(machine);
        } else {
            set.remove(&machine);
        }
        match (before, !set.is_empty()) {
            (false, true) => self.active_units += 1,
            (true, false) => self.active_units -= 1,
            _ => {}
        }
    }

    /// Schedule entries per second, first to last.
    pub(super) fn placement_rate(&self) -> f64 {
        match (self.first_placed, self.last_placed) {
            (Some(a), Some(b)) => self.placed as f64 / (b - a).as_secs_f64().max(0.001),
            _ => 0.0,
        }
    }
}

/// What the observer watches.
pub(super) enum Watched {
    /// Every write under the cluster's prefix.
    All,
    /// Schedules and states only: what placements and active units are counted from. The
    /// whole cluster's observer watches no more, so that it does not cost etcd a third copy
    /// of every unit record sent over TLS (beside the API replica's and the leader's) while the
    /// units are submitted; the other keys written are counted at the end ([`puts_outside`]).
    Placement,
}

/// Follows writes under the prefix (or, with [`Watched::Placement`], its schedules and states)
/// from revision `from`. Each watch is reopened where it left off if etcd ends it (it may, under
/// the load these runs make): an observer that silently stopped would read as a cluster that
/// never converges.
pub(super) fn follow(
    client: Client,
    keys: Keys,
    from: i64,
    watched: Watched,
) -> watch::Receiver<std::sync::Arc<std::sync::Mutex<Observed>>> {
    let observed = std::sync::Arc::new(std::sync::Mutex::new(Observed::default()));
    let (tx, rx) = watch::channel(observed.clone());
    let prefixes = match watched {
        Watched::All => vec![keys.prefix().to_string()],
        Watched::Placement => vec![keys.schedules(), keys.states()],
    };
    for prefix in prefixes {
        follow_one(client.clone(), keys.clone(), from, prefix, observed.clone(), tx.clone());
    }
    rx
}

fn follow_one(
    client: Client,
    keys: Keys,
    from: i64,
    prefix: String,
    observed: std::sync::Arc<std::sync::Mutex<Observed>>,
    tx: watch::Sender<std::sync::Arc<std::sync::Mutex<Observed>>>,
) {
    tokio::spawn(async move {
        let mut next = from;
        while !tx.is_closed() {
            let mut wc = fleet_store::etcd::watch_client(&client);
            let opts = etcd_client::WatchOptions::new().with_prefix().with_start_revision(next);
            let mut stream = match wc.watch(prefix.clone(), Some(opts)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "observer: cannot watch; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                let resp = match stream.message().await {
                    Ok(Some(resp)) if !resp.canceled() => resp,
                    other => {
                        tracing::warn!(?other, next, "observer: watch ended; watching again");
                        break;
                    }
                };
                {
                    let mut o = observed.lock().unwrap_or_else(|e| e.into_inner());
                    let now = Instant::now();
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        next = next.max(kv.mod_revision() + 1);
                        let put = ev.event_type() == etcd_client::EventType::Put;
                        o.writes += 1;
                        let decoded = keys.decode(kv.key());
                        if put {
                            o.puts += 1;
                            if matches!(
                                decoded,
                                Some(
                                    Key::Unit(_)
                                        | Key::Schedule(..)
                                        | Key::SchedulePage(..)
                                        | Key::State(..)
                                        | Key::StatePage(..)
                                )
                            ) {
                                o.own_puts += 1;
                            }
                        }
                        match decoded {
                            key @ Some(Key::Schedule(..) | Key::SchedulePage(..)) => {
                                if put {
                                    o.schedule_writes.add(kv.value());
                                }
                                let n = placements(&mut o.schedule_pages, key, put, kv.version(), kv.value());
                                if n > 0 {
                                    o.placed += n;
                                    o.first_placed.get_or_insert(now);
                                    o.last_placed = Some(now);
                                }
                            }
                            key @ Some(Key::State(..) | Key::StatePage(..)) => {
                                if put {
                                    o.state_writes.add(kv.value());
                                }
                                for (u, m, active) in activity(&mut o.pages, key, put, kv.value()) {
                                    o.set_active(u, m, active);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                if tx.send(observed.clone()).is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// Keys written under the prefix since revision `from` outside schedules and states (unit
/// records, bodies, machines...), as (all such puts, puts of unit records), from each key's
/// version: a key created since counts every version, a key created before and written since
/// counts once (a lower bound). For an observer that watched [`Watched::Placement`] only.
pub(super) async fn puts_outside(client: &Client, keys: &Keys, from: i64) -> Result<(u64, u64)> {
    let (schedules, states) = (keys.schedules(), keys.states());
    let end = fleet_store::kv::prefix_end(keys.prefix().as_bytes());
    let mut kv = client.kv_client().max_decoding_message_size(fleet_store::etcd::MAX_WATCH_RESPONSE);
    let mut at = keys.prefix().as_bytes().to_vec();
    let (mut puts, mut records) = (0, 0);
    loop {
        let opts = etcd_client::GetOptions::new().with_range(end.clone()).with_keys_only().with_limit(100_000);
        let resp = kv.get(at.clone(), Some(opts)).await?;
        for k in resp.kvs() {
            let key = k.key();
            if k.mod_revision() < from || key.starts_with(schedules.as_bytes()) || key.starts_with(states.as_bytes()) {
                continue;
            }
            let n = if k.create_revision() >= from { k.version() as u64 } else { 1 };
            puts += n;
            if matches!(keys.decode(key), Some(Key::Unit(_))) {
                records += n;
            }
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                at = last.key().to_vec();
                at.push(0);
            }
            _ => return Ok((puts, records)),
        }
    }
}

/// Waits until `done` holds for what the observer has seen: false if `deadline` passes first, an
/// error if the observer stopped.
pub(super) async fn observe_until(
    observed: &mut watch::Receiver<std::sync::Arc<std::sync::Mutex<Observed>>>,
    deadline: Instant,
    done: impl Fn(&Observed) -> bool,
) -> Result<bool> {
    // Progress every 10 s: where a long wait spends its time (placing, or agents starting).
    let started = Instant::now();
    let mut told = started;
    loop {
        let seen = observed.borrow_and_update().clone();
        {
            let o = seen.lock().unwrap_or_else(|e| e.into_inner());
            if done(&o) {
                return Ok(true);
            }
            if told.elapsed() >= Duration::from_secs(10) {
                told = Instant::now();
                tracing::info!(
                    secs = started.elapsed().as_secs(),
                    placed = o.placed,
                    active = o.active_units,
                    writes = o.writes,
                    "waiting"
                );
            }
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(100), observed.changed()).await {
            bail!("the observer's watch stopped");
        }
    }
}

pub(super) async fn revision(client: &Client, keys: &Keys) -> Result<i64> {
    let mut kv = client.kv_client();
    let r = kv.get(keys.prefix(), Some(etcd_client::GetOptions::new().with_count_only())).await?;
    Ok(r.header().map(|h| h.revision()).unwrap_or(0))
}
