//! Events derived by a view fed from the in-memory store, as an engine's is from etcd: the writes
//! the API, the leader and the agents make, and the events a reader sees.

use crate::cluster::Cluster;
use crate::events::Filter;
use fleet_api::{Event, EventId};
use fleet_model::schema::encode;
use fleet_model::{DesiredState, UnitFile};
use fleet_model::{Keys, MachineRecord, ScheduleEntry, UnitName, UnitRecord, UnitStateRecord};
use fleet_store::kv::{MemStore, Op, Store, Txn};
use std::time::Duration;

const M1: &str = "0000000000000000000000000000000a";
const M2: &str = "b000000000000000000000000000000b";

struct World {
    store: MemStore,
    keys: Keys,
    cluster: Cluster,
}

async fn world() -> World {
    let store = MemStore::new();
    let keys = Keys::new("/ev/");
    let cluster = Cluster::follow_store(store.clone(), keys.clone());
    assert!(cluster.caught_up(1, Duration::from_secs(5)).await, "the view lists the store");
    World { store, keys, cluster }
}

fn name(s: &str) -> UnitName {
    UnitName::parse(s).expect("unit name")
}

impl World {
    /// One transaction of `ops`; returns once the view has it.
    async fn write(&self, ops: Vec<Op>) -> i64 {
        let done = self.store.txn(Txn { then: ops, ..Txn::default() }).await.expect("txn");
        assert!(self.cluster.caught_up(done.revision, Duration::from_secs(5)).await, "the view follows");
        done.revision
    }

    fn unit(&self, unit: &str, body: &str, desired: DesiredState) -> Vec<Op> {
        let file = UnitFile::parse(body).expect("unit file");
        let rec = UnitRecord { name: name(unit), hash: file.hash().into(), desired_state: desired };
        vec![
            Op::put(self.keys.body(&rec.hash), file.canonical(), 0),
            Op::put(self.keys.unit(&rec.name), encode(&rec).expect("encode"), 0),
        ]
    }

    fn machine(&self, id: &str) -> Op {
        let rec = MachineRecord { id: id.into(), public_ip: "10.0.0.1".into(), ..Default::default() };
        Op::put(self.keys.machine(id), encode(&rec).expect("encode"), 0)
    }

    fn schedule(&self, m: &str, unit: &str) -> Op {
        let e = ScheduleEntry { hash: "h".into(), desired_state: DesiredState::Launched };
        Op::put(self.keys.schedule(m, &name(unit)), encode(&e).expect("encode"), 0)
    }

    fn state(&self, m: &str, unit: &str, active: &str) -> Op {
        self.state_with(m, unit, active, None)
    }

    fn state_with(&self, m: &str, unit: &str, active: &str, health: Option<fleet_model::health::Health>) -> Op {
        let s = UnitStateRecord {
            hash: "h".into(),
            load_state: "loaded".into(),
            active_state: active.into(),
            sub_state: format!("{active}-sub").into(),
            applied: DesiredState::Launched,
            health,
        };
        Op::put(self.keys.state(m, &name(unit)), encode(&s).expect("encode"), 0)
    }

    /// `m`'s state page `n` holding `units` (name, active state), as an agent writes it.
    fn page(&self, m: &str, n: u32, units: &[(&str, &str)]) -> Op {
        let page: fleet_model::StatePage = units
            .iter()
            .map(|(u, active)| {
                let s = UnitStateRecord {
                    hash: "h".into(),
                    load_state: "loaded".into(),
                    active_state: (*active).into(),
                    sub_state: format!("{active}-sub").into(),
                    applied: DesiredState::Launched,
                    health: None,
                };
                (u.to_string(), s)
            })
            .collect();
        Op::put(self.keys.state_page(m, n), encode(&page).expect("encode"), 0)
    }

    /// The view's state of each unit on `m`: (unit, active state).
    fn states_on(&self, m: &str) -> Vec<(String, String)> {
        self.cluster.read(|v| {
            v.states
                .iter()
                .filter_map(|(u, per)| per.get(m).map(|s| (u.to_string(), s.active_state.to_string())))
                .collect()
        })
    }

    fn read(&self, since: Option<EventId>) -> Vec<Event> {
        self.cluster.events().read(since, &Filter::default(), 1000, None).events
    }

    /// (kind, unit, machine, from) of every event kept.
    fn seen(&self) -> Vec<(String, String, String, String)> {
        self.read(None).into_iter().map(|e| (e.kind, e.unit, e.machine, e.from)).collect()
    }
}

fn ev(kind: &str, unit: &str, machine: &str, from: &str) -> (String, String, String, String) {
    (kind.into(), unit.into(), machine.into(), from.into())
}

/// A unit's health is told when it changes, with the activity its state record also changed;
/// republishing the same health is not news, nor is a unit without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_changes_are_told() {
    use fleet_model::health::Health;
    let w = world().await;
    w.write(vec![w.state_with(M1, "h.service", "active", Some(Health::Starting))]).await;
    w.write(vec![w.state_with(M1, "h.service", "active", Some(Health::Starting))]).await;
    w.write(vec![w.state_with(M1, "h.service", "active", Some(Health::Healthy))]).await;
    w.write(vec![w.state_with(M1, "h.service", "active", Some(Health::Unhealthy))]).await;
    w.write(vec![w.state_with(M1, "h.service", "inactive", None)]).await;
    let told: Vec<(String, String)> = w.read(None).into_iter().map(|e| (e.kind, e.state)).collect();
    let want: Vec<(String, String)> = [
        ("unit-started", "active-sub"),
        ("unit-health", "starting"),
        ("unit-health", "healthy"),
        ("unit-health", "unhealthy"),
        ("unit-stopped", "inactive-sub"),
    ]
    .iter()
    .map(|(k, s)| (k.to_string(), s.to_string()))
    .collect();
    assert_eq!(told, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_units_life_is_told_in_order_with_ids_that_grow() {
    let w = world().await;
    w.write(vec![w.machine(M1)]).await;
    let body = "[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineMetadata=region=eu\n";
    let submitted = w.write(w.unit("a.service", body, DesiredState::Launched)).await;
    w.write(vec![w.schedule(M1, "a.service")]).await;
    w.write(vec![w.state(M1, "a.service", "activating")]).await;
    w.write(vec![w.state(M1, "a.service", "active")]).await;
    // The same state again (an agent republishing) is not news.
    w.write(vec![w.state(M1, "a.service", "active")]).await;
    w.write(vec![w.state(M1, "a.service", "failed")]).await;
    w.write(vec![w.state(M1, "a.service", "active")]).await;
    w.write(vec![w.state(M1, "a.service", "inactive")]).await;
    w.write(w.unit("a.service", body, DesiredState::Loaded)).await;
    w.write(vec![Op::delete(w.keys.unit(&name("a.service")))]).await;
    w.write(vec![Op::delete(w.keys.schedule(M1, &name("a.service")))]).await;
    // An agent stops what it was taken off and removes its state: a stop.
    w.write(vec![w.state(M1, "a.service", "active")]).await;
    w.write(vec![Op::delete(w.keys.state(M1, &name("a.service")))]).await;
    // A lost machine's states go with it: no stop is claimed.
    w.write(vec![w.state(M1, "b.service", "active")]).await;
    w.write(vec![Op::delete(w.keys.state(M1, &name("b.service"))), Op::delete(w.keys.machine(M1))]).await;
    assert_eq!(
        w.seen(),
        vec![
            ev("machine-joined", "", M1, ""),
            ev("unit-submitted", "a.service", "", ""),
            ev("unit-scheduled", "a.service", M1, ""),
            ev("unit-started", "a.service", M1, ""),
            ev("unit-failed", "a.service", M1, ""),
            ev("unit-started", "a.service", M1, ""),
            ev("unit-stopped", "a.service", M1, ""),
            ev("unit-desired-state", "a.service", "", ""),
            ev("unit-destroyed", "a.service", "", ""),
            ev("unit-unscheduled", "a.service", M1, ""),
            ev("unit-started", "a.service", M1, ""),
            ev("unit-stopped", "a.service", M1, ""),
            ev("unit-started", "b.service", M1, ""),
            ev("machine-lost", "", M1, ""),
        ]
    );
    let all = w.read(None);
    assert_eq!(all[1].id, format!("{submitted}.0"), "an event's id is its etcd revision and place");
    assert_eq!(all[1].state, "launched");
    assert!(all[2].reason.contains("MachineMetadata (region)"), "why there: {:?}", all[2].reason);
    assert_eq!(all[7].state, "loaded");
    assert_eq!(all[9].reason, "the unit was destroyed");
    let ids: Vec<EventId> = all.iter().map(|e| e.event_id().expect("id")).collect();
    assert!(ids.windows(2).all(|p| p[0] < p[1]), "ids do not grow: {ids:?}");
    // Resuming after an event gives exactly what followed it.
    let after = w.read(Some(ids[4]));
    assert_eq!(after.first().map(|e| e.id.clone()), Some(all[5].id.clone()));
    assert_eq!(after.len(), all.len() - 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_is_one_event_saying_why_whatever_the_order_of_its_writes() {
    let w = world().await;
    w.write(vec![w.machine(M1), w.machine(M2)]).await;
    w.write(w.unit("a.service", "[Service]\nExecStart=/bin/true\n", DesiredState::Launched)).await;
    w.write(w.unit("b.service", "[Service]\nExecStart=/bin/true\n", DesiredState::Launched)).await;
    w.write(vec![w.schedule(M1, "a.service"), w.schedule(M1, "b.service")]).await;
    w.write(vec![Op::delete(w.keys.machine(M1))]).await;
    // One transaction deleting the old entry first, as the leader does for a lost machine.
    w.write(vec![Op::delete(w.keys.schedule(M1, &name("a.service"))), w.schedule(M2, "a.service")]).await;
    // Two transactions: the old entry goes, the unit is placed later (what the leader does for
    // a plain unit of a lost machine): unscheduled, then the move.
    w.write(w.unit("c.service", "[Service]\nExecStart=/bin/true\n", DesiredState::Launched)).await;
    w.write(vec![w.machine(M1)]).await;
    w.write(vec![w.schedule(M1, "c.service")]).await;
    w.write(vec![Op::delete(w.keys.machine(M1))]).await;
    w.write(vec![Op::delete(w.keys.schedule(M1, &name("c.service")))]).await;
    w.write(vec![w.schedule(M2, "c.service")]).await;
    let c: Vec<(String, String, String)> =
        w.read(None).into_iter().filter(|e| e.unit == "c.service").map(|e| (e.kind, e.from, e.reason)).collect();
    let lost = format!("machine {M1} was lost");
    assert_eq!(
        c[2..],
        [
            ("unit-unscheduled".to_string(), String::new(), lost.clone()),
            ("unit-moved".to_string(), M1.to_string(), lost.clone())
        ]
    );
    // The new entry first, the old one later (an exclusive unit waits to be stopped).
    w.write(vec![w.schedule(M2, "b.service")]).await;
    w.write(vec![Op::delete(w.keys.schedule(M1, &name("b.service")))]).await;
    let moves: Vec<Event> =
        w.read(None).into_iter().filter(|e| e.unit == "a.service" || e.unit == "b.service").collect();
    let kinds: Vec<(&str, &str, &str, &str)> =
        moves.iter().map(|e| (e.kind.as_str(), e.unit.as_str(), e.machine.as_str(), e.from.as_str())).collect();
    assert_eq!(
        kinds,
        vec![
            ("unit-submitted", "a.service", "", ""),
            ("unit-submitted", "b.service", "", ""),
            ("unit-scheduled", "a.service", M1, ""),
            ("unit-scheduled", "b.service", M1, ""),
            ("unit-moved", "a.service", M2, M1),
            ("unit-moved", "b.service", M2, M1),
        ]
    );
    assert_eq!(moves[4].reason, format!("machine {M1} was lost"));
    // The view's count of units per machine followed (what the machines listing shows).
    assert_eq!(w.cluster.read(|v| (v.scheduled_on.get(M1).copied(), v.scheduled_on.get(M2).copied())), (None, Some(3)));
    assert!(w.seen().contains(&ev("machine-lost", "", M1, "")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_drains_and_reboot_slots_are_events() {
    let w = world().await;
    w.write(vec![w.machine(M1)]).await;
    w.write(vec![Op::put(format!("{}/1", w.keys.leader()), "engine-1", 0)]).await;
    // A second candidate does not lead while the first lives.
    w.write(vec![Op::put(format!("{}/2", w.keys.leader()), "engine-2", 0)]).await;
    w.write(vec![Op::delete(format!("{}/1", w.keys.leader()))]).await;
    w.write(vec![Op::put(w.keys.drain(M1), "", 0)]).await;
    w.write(vec![Op::put(w.keys.reboot_lock("default"), format!(r#"{{"holders":["{M1}"]}}"#), 0)]).await;
    w.write(vec![Op::put(w.keys.reboot_lock("default"), r#"{"holders":[]}"#, 0)]).await;
    w.write(vec![Op::delete(w.keys.drain(M1))]).await;
    let got: Vec<(String, String, String)> =
        w.read(None).into_iter().map(|e| (e.kind, e.machine, e.reason)).skip(1).collect();
    let t = |k: &str, m: &str, r: &str| (k.to_string(), m.to_string(), r.to_string());
    assert_eq!(
        got,
        vec![
            t("leader-changed", "", "engine-1"),
            t("leader-changed", "", "engine-2"),
            t("machine-drained", M1, ""),
            t("reboot-slot-taken", M1, "default"),
            t("reboot-slot-released", M1, "default"),
            t("machine-undrained", M1, ""),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_after_compaction_is_a_gap() {
    let w = world().await;
    w.write(vec![w.machine(M1)]).await;
    // The watch is lost and history compacted meanwhile: the view relists.
    w.store.drop_watches();
    w.store.txn(Txn { then: vec![w.machine(M2)], ..Txn::default() }).await.expect("txn");
    w.store.txn(Txn { then: vec![Op::put("/ev/other", "x", 0)], ..Txn::default() }).await.expect("txn");
    let rev = w.store.revision();
    w.store.compact(rev);
    assert!(w.cluster.caught_up(rev, Duration::from_secs(10)).await, "the view relists");
    let kinds: Vec<String> = w.read(None).into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, vec!["machine-joined", "gap"], "M2's joining fell in the gap");
    // After the gap, events flow again.
    w.write(vec![Op::delete(w.keys.machine(M2))]).await;
    assert_eq!(w.read(None).last().map(|e| e.kind.as_str()), Some("machine-lost"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_stopped_while_a_machine_was_cut_off_are_told_when_it_returns() {
    let w = world().await;
    w.write(vec![w.machine(M1)]).await;
    w.write(vec![Op::delete(w.keys.machine(M1))]).await;
    let rec = MachineRecord { id: M1.into(), stopped_while_cut_off: vec!["db.service".into()], ..Default::default() };
    w.write(vec![Op::put(w.keys.machine(M1), encode(&rec).expect("encode"), 0)]).await;
    let got: Vec<(String, String, String)> =
        w.read(None).into_iter().skip(2).map(|e| (e.kind, e.unit, e.machine)).collect();
    assert_eq!(
        got,
        vec![
            ("machine-joined".to_string(), String::new(), M1.to_string()),
            ("unit-stopped".to_string(), "db.service".to_string(), M1.to_string())
        ]
    );
    assert!(w.read(None).last().is_some_and(|e| e.reason.contains("cut off")));
}

/// What deriving costs per unit, on the view alone (no store, no tasks): 100,000 units submitted
/// and then their schedule entries, applied in batches of 1,000, with and without the deriver. A measurement, not a
/// check: `cargo test --release -p fleet-engine derive_cost -- --ignored --nocapture`.
#[test]
#[ignore]
fn derive_cost() {
    use crate::cluster::ClusterView;
    use fleet_store::etcd::{Change, PrefixUpdate};
    let keys = Keys::new("/ev/");
    let machines: Vec<String> = (0..10_000).map(|i| format!("{i:032x}")).collect();
    let units: Vec<UnitName> = (0..100_000).map(|i| name(&format!("u-{i:06}.service"))).collect();
    let mut puts = Vec::new();
    for m in &machines {
        let rec = MachineRecord { id: m.clone(), public_ip: "10.0.0.1".into(), ..Default::default() };
        puts.push(Change::Put {
            key: keys.machine(m).into(),
            value: encode(&rec).expect("encode"),
            lease: 1,
            mod_revision: 1,
        });
    }
    let file = UnitFile::parse("[Service]\nExecStart=/bin/true\n").expect("unit");
    puts.push(Change::Put {
        key: keys.body(&file.hash()).into(),
        value: file.canonical().into(),
        lease: 0,
        mod_revision: 1,
    });
    // The units are submitted after the listing, 1,000 a transaction, then placed.
    let submissions: Vec<PrefixUpdate> = units
        .chunks(1_000)
        .enumerate()
        .map(|(b, chunk)| PrefixUpdate::Changes {
            revision: 2 + b as i64,
            changes: chunk
                .iter()
                .map(|u| {
                    let rec =
                        UnitRecord { name: u.clone(), hash: file.hash().into(), desired_state: DesiredState::Launched };
                    Change::Put {
                        key: keys.unit(u).into(),
                        value: encode(&rec).expect("encode"),
                        lease: 0,
                        mod_revision: 2 + b as i64,
                    }
                })
                .collect(),
        })
        .collect();
    let first = 2 + submissions.len() as i64;
    let entry =
        encode(&ScheduleEntry { hash: file.hash().into(), desired_state: DesiredState::Launched }).expect("encode");
    let batches: Vec<PrefixUpdate> = units
        .chunks(1_000)
        .enumerate()
        .map(|(b, chunk)| PrefixUpdate::Changes {
            revision: first + b as i64,
            changes: chunk
                .iter()
                .enumerate()
                .map(|(i, u)| Change::Put {
                    key: keys.schedule(&machines[(b * 1000 + i) % machines.len()], u).into(),
                    value: entry.clone(),
                    lease: 0,
                    mod_revision: first + b as i64,
                })
                .collect(),
        })
        .collect();
    for derive in [false, true, false, true] {
        let mut view = ClusterView::default();
        view.apply_update(&keys, PrefixUpdate::Snapshot { revision: 1, puts: puts.clone() });
        let mut deriver = super::Deriver::default();
        let log = crate::events::EventLog::new(if derive { crate::events::DEFAULT_HISTORY } else { 0 });
        let batches: Vec<PrefixUpdate> = submissions.iter().chain(&batches).cloned().collect();
        let started = std::time::Instant::now();
        let (mut in_change, mut in_finish, mut in_record) = Default::default();
        for update in batches {
            if derive {
                view.apply_update_observed(&keys, update, &mut |view, seen| {
                    let t = std::time::Instant::now();
                    deriver.seen(view, seen);
                    in_change += t.elapsed();
                });
                let t = std::time::Instant::now();
                let happened = deriver.finish();
                in_finish += t.elapsed();
                let t = std::time::Instant::now();
                log.record(happened, "2026-01-01T00:00:00.000Z");
                in_record += t.elapsed();
            } else {
                view.apply_update(&keys, update);
            }
        }
        let (c, f, r): (std::time::Duration, std::time::Duration, std::time::Duration) =
            (in_change, in_finish, in_record);
        println!(
            "derive {derive}: {:?} for {} submissions and placements (change {c:?}, finish {f:?}, record {r:?})",
            started.elapsed(),
            units.len()
        );
    }
}

/// A failing unit's handling is told as the leader records it, and its move says it failed:
/// the writes as the leader makes them (the record first, then the old entry goes and the new
/// one comes in one transaction).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_for_failing_says_so() {
    use fleet_model::reschedule::{Failure, Moved, RescheduleRecord};
    let w = world().await;
    w.write(vec![w.machine(M1), w.machine(M2)]).await;
    let body = "[Service]\nExecStart=/bin/false\n[X-Fleet]\nRescheduleAttempts=1\n";
    w.write(w.unit("f.service", body, DesiredState::Launched)).await;
    w.write(vec![w.schedule(M1, "f.service")]).await;
    w.write(vec![w.state(M1, "f.service", "failed")]).await;
    let record = |r: &RescheduleRecord| Op::put(w.keys.reschedule(&name("f.service")), encode(r).expect("encode"), 0);
    let failing = Failure { machine: M1.into(), at: 100 };
    let mut rec = RescheduleRecord {
        failing: Some(failing.clone()),
        failures: vec![failing],
        note: "failed on 00000000; to be moved 30s after the failure".into(),
        ..Default::default()
    };
    w.write(vec![record(&rec)]).await;
    // The same note again is not news.
    w.write(vec![record(&rec)]).await;
    rec.failing = None;
    rec.moves.push(Moved { from: M1.into(), to: M2.into(), at: 130 });
    rec.note = "failed on 00000000; moved to b0000000".into();
    w.write(vec![record(&rec), Op::delete(w.keys.schedule(M1, &name("f.service"))), w.schedule(M2, "f.service")]).await;
    let told: Vec<(String, String, String)> =
        w.read(None).into_iter().filter(|e| e.unit == "f.service").map(|e| (e.kind, e.machine, e.reason)).collect();
    assert_eq!(
        told[2..],
        [
            ("unit-failed".to_string(), M1.to_string(), String::new()),
            (
                "unit-reschedule".to_string(),
                String::new(),
                "failed on 00000000; to be moved 30s after the failure".into()
            ),
            ("unit-reschedule".to_string(), String::new(), "failed on 00000000; moved to b0000000".into()),
            ("unit-moved".to_string(), M2.to_string(), format!("it failed on machine {M1} (RescheduleAttempts)")),
        ]
    );
}

/// Agents publish a machine's states in pages: a page is told unit by unit, only for the units
/// whose state it changed; an agent moving an older per-unit key into a page is no stop; a page
/// going with its machine's lease is no stop either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_pages_are_told_unit_by_unit() {
    let w = world().await;
    w.write(vec![w.machine(M1)]).await;
    // An agent before pages wrote a's state in a key of its own.
    w.write(vec![w.state(M1, "a.service", "active")]).await;
    // Upgraded, it writes a page with a (unchanged) and b, and deletes a's old key.
    w.write(vec![
        w.page(M1, 0, &[("a.service", "active"), ("b.service", "active")]),
        Op::delete(w.keys.state(M1, &name("a.service"))),
    ])
    .await;
    assert_eq!(w.states_on(M1), vec![("a.service".into(), "active".into()), ("b.service".into(), "active".into())]);
    // b fails, c starts on a second page; a is written again unchanged.
    w.write(vec![
        w.page(M1, 0, &[("a.service", "active"), ("b.service", "failed")]),
        w.page(M1, 1, &[("c.service", "active")]),
    ])
    .await;
    // a's state removed from its page (its agent stopped it): a stop.
    w.write(vec![w.page(M1, 0, &[("b.service", "failed")])]).await;
    assert_eq!(w.states_on(M1), vec![("b.service".into(), "failed".into()), ("c.service".into(), "active".into())]);
    // The machine lost: its pages go with its lease.
    w.write(vec![
        Op::delete(w.keys.state_page(M1, 0)),
        Op::delete(w.keys.state_page(M1, 1)),
        Op::delete(w.keys.machine(M1)),
    ])
    .await;
    assert_eq!(w.states_on(M1), vec![]);
    assert_eq!(
        w.seen(),
        vec![
            ev("machine-joined", "", M1, ""),
            ev("unit-started", "a.service", M1, ""),
            ev("unit-started", "b.service", M1, ""),
            ev("unit-failed", "b.service", M1, ""),
            ev("unit-started", "c.service", M1, ""),
            ev("unit-stopped", "a.service", M1, ""),
            ev("machine-lost", "", M1, ""),
        ]
    );
}

/// A unit's record is read once for the view and its events: a new body is a replacement, a new
/// desired state with it both, and a record that cannot be read tells nothing and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_units_record_rewritten_is_told_as_what_changed() {
    let w = world().await;
    w.write(w.unit("r.service", "[Service]\nExecStart=/bin/true\n", DesiredState::Launched)).await;
    w.write(w.unit("r.service", "[Service]\nExecStart=/bin/false\n", DesiredState::Launched)).await;
    w.write(w.unit("r.service", "[Service]\nExecStart=/bin/sleep 1\n", DesiredState::Loaded)).await;
    w.write(vec![Op::put(w.keys.unit(&name("r.service")), b"{not json".to_vec(), 0)]).await;
    assert_eq!(
        w.seen(),
        vec![
            ev("unit-submitted", "r.service", "", ""),
            ev("unit-replaced", "r.service", "", ""),
            ev("unit-replaced", "r.service", "", ""),
            ev("unit-desired-state", "r.service", "", ""),
        ]
    );
    let kept = w.cluster.read(|v| v.units.get(&name("r.service")).map(|u| u.desired_state));
    assert_eq!(kept, Some(DesiredState::Loaded), "the unreadable record left the unit as it was");
}
