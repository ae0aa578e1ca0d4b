//! The leader's pass on the in-memory store: what it writes for a given cluster, that it writes
//! nothing once deposed, and that the store's faults cost no decision and double none. The view
//! is fed from the same store, as an engine's is from etcd.

use super::*;
use fleet_model::schema::{decode, ScheduleEntry};
use fleet_model::{DesiredState, MachineRecord, UnitFile, UnitName, UnitRecord};
use fleet_store::kv::{MemStore, Txn};
use std::collections::BTreeMap;

const PLAIN: &str = "[Service]\nExecStart=/bin/sleep infinity\n";
const WANTS_DB: &str = "[Service]\nExecStart=/bin/sleep infinity\n\n[X-Fleet]\nMachineMetadata=role=db\n";

struct Lab {
    store: MemStore,
    keys: Keys,
    planner: Planner<MemStore>,
    fence: Compare,
    election_lease: i64,
}

async fn cluster() -> Lab {
    let store = MemStore::new();
    let keys = Keys::new("/fleet-test/");
    let election_lease = store.grant(60).await.expect("lease");
    let key = format!("{}/e1", keys.leader());
    let won = store.txn(Txn { then: vec![Op::put(key.clone(), "e1", election_lease)], ..Txn::default() }).await;
    let fence = Compare::create_revision(key, CmpOp::Equal, won.expect("campaign").revision);
    let view = crate::cluster::Cluster::follow_store(store.clone(), keys.clone());
    assert!(view.caught_up(1, Duration::from_secs(5)).await, "the view lists the store");
    let planner = Planner {
        store: store.clone(),
        keys: keys.clone(),
        cluster: view,
        ttl: 6,
        status: Default::default(),
        fences: Default::default(),
        wake: Default::default(),
        metrics: crate::metrics::Metrics::new(),
        ready: Default::default(),
    };
    Lab { store, keys, planner, fence, election_lease }
}

impl Lab {
    /// A machine as its agent registers it: on a lease of its own. Returns the lease.
    async fn machine(&self, id: &str, metadata: &[(&str, &str)]) -> i64 {
        let lease = self.store.grant(10).await.expect("lease");
        let rec = MachineRecord {
            id: id.into(),
            metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            lease_ttl: 10,
            ..MachineRecord::default()
        };
        let put = Op::put(self.keys.machine(id), encode(&rec).expect("encode"), lease);
        self.store.txn(Txn { then: vec![put], ..Txn::default() }).await.expect("register");
        lease
    }

    /// A unit as the API stores it: its record and its body, in one transaction.
    async fn unit(&self, name: &str, text: &str) {
        let file = UnitFile::parse(text).expect("unit file");
        let rec = UnitRecord {
            name: UnitName::parse(name).expect("name"),
            hash: file.hash().into(),
            desired_state: DesiredState::Launched,
        };
        let then = vec![
            Op::put(self.keys.body(&rec.hash), file.canonical(), 0),
            Op::put(self.keys.unit(&rec.name), encode(&rec).expect("encode"), 0),
        ];
        self.store.txn(Txn { then, ..Txn::default() }).await.expect("submit");
    }

    /// Waits for the view to show everything written so far, then runs one pass.
    async fn pass(&self) -> Result<(), LeadError> {
        let now = self.store.revision();
        assert!(self.planner.cluster.caught_up(now, Duration::from_secs(5)).await, "the view follows");
        let mut plan = Planning::new(tokio::task::block_in_place(|| self.planner.cluster.plan_view()));
        self.planner.pass(&self.fence, &mut plan).await
    }

    /// One pass on `plan`, a planning copy kept from pass to pass as a leader keeps it.
    async fn pass_on(&self, plan: &mut Planning) -> Result<(), LeadError> {
        let now = self.store.revision();
        assert!(self.planner.cluster.caught_up(now, Duration::from_secs(5)).await, "the view follows");
        self.planner.pass(&self.fence, plan).await
    }

    /// Takes or brings up to date what this engine keeps ready to lead, once its view shows
    /// everything written so far.
    async fn get_ready(&self) {
        assert!(self.planner.cluster.caught_up(self.store.revision(), Duration::from_secs(5)).await);
        tokio::task::block_in_place(|| self.planner.get_ready());
    }

    fn whole_passes(&self) -> u64 {
        self.planner.status.lock().map(|s| s.whole_passes).unwrap_or_default()
    }

    /// unit -> machines it is scheduled on, as stored.
    async fn schedule(&self) -> BTreeMap<String, Vec<String>> {
        let (entries, _) = self.store.range(self.keys.schedules().as_bytes()).await.expect("range");
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in entries {
            let key = String::from_utf8_lossy(&e.key).into_owned();
            let rest = key.strip_prefix(&self.keys.schedules()).unwrap_or_default();
            let (machine, unit) = rest.split_once('/').expect("schedule/<machine>/<unit>");
            let entry: ScheduleEntry = decode(&e.value).expect("schedule entry");
            assert_eq!(entry.desired_state, DesiredState::Launched, "{key}");
            out.entry(unit.to_string()).or_default().push(machine.to_string());
        }
        out
    }

    fn why(&self, unit: &str) -> Option<String> {
        let name = UnitName::parse(unit).expect("name");
        self.store.peek(self.keys.why(&name).as_bytes()).map(|v| String::from_utf8_lossy(&v).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_places_every_placeable_unit_once_and_says_why_not_the_others() {
    let c = cluster().await;
    c.machine("m1", &[]).await;
    c.machine("m2", &[("role", "web")]).await;
    for i in 0..6 {
        c.unit(&format!("u{i}.service"), PLAIN).await;
    }
    c.unit("db.service", WANTS_DB).await;
    c.pass().await.expect("pass");
    let placed = c.schedule().await;
    assert_eq!(placed.len(), 6, "{placed:?}");
    assert!(placed.values().all(|m| m.len() == 1), "each unit on one machine: {placed:?}");
    let on_m1 = placed.values().filter(|m| m[0] == "m1").count();
    assert_eq!(on_m1, 3, "spread over both machines: {placed:?}");
    assert!(c.why("db.service").is_some_and(|w| w.contains("role")), "{:?}", c.why("db.service"));
    let metrics = c.planner.metrics.render();
    assert!(metrics.contains("fleet_schedule_decisions_total{kind=\"placed\"} 6\n"), "{metrics}");
    assert!(metrics.contains("fleet_units_unplaceable 1\n"), "{metrics}");
    // Nothing changed: the next pass writes nothing.
    let before = c.store.revision();
    c.pass().await.expect("pass");
    assert_eq!(c.store.revision(), before, "an idle pass writes nothing");
    // A machine that fits arrives: the waiting unit is placed there and its reason forgotten.
    c.machine("m3", &[("role", "db")]).await;
    c.pass().await.expect("pass");
    assert_eq!(c.schedule().await.get("db.service"), Some(&vec!["m3".to_string()]));
    assert_eq!(c.why("db.service"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_of_a_lost_machine_move_to_the_machines_left() {
    let c = cluster().await;
    let m1 = c.machine("m1", &[]).await;
    c.machine("m2", &[]).await;
    for i in 0..4 {
        c.unit(&format!("u{i}.service"), PLAIN).await;
    }
    c.pass().await.expect("pass");
    assert!(c.schedule().await.values().any(|m| m[0] == "m1"));
    c.store.expire_lease(m1);
    c.pass().await.expect("pass");
    let placed = c.schedule().await;
    assert_eq!(placed.len(), 4);
    assert!(placed.values().all(|m| m == &["m2".to_string()]), "{placed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_writes_nothing() {
    let c = cluster().await;
    c.machine("m1", &[]).await;
    c.unit("u.service", PLAIN).await;
    // Its election lease expired (another engine may lead now): the key it was fenced on is gone.
    c.store.expire_lease(c.election_lease);
    let result = c.pass().await;
    assert!(matches!(result, Err(LeadError::Deposed(_))), "{result:?}");
    assert!(c.schedule().await.is_empty(), "no schedule entry written");
    assert_eq!(c.why("u.service"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_during_a_pass_are_sent_again_and_place_each_unit_once() {
    let c = cluster().await;
    c.machine("m1", &[]).await;
    c.machine("m2", &[]).await;
    for i in 0..300 {
        c.unit(&format!("u{i:03}.service"), PLAIN).await;
    }
    // More units than one transaction holds, and the first attempts refused.
    c.store.refuse_next_txns(3);
    c.pass().await.expect("pass");
    let placed = c.schedule().await;
    assert_eq!(placed.len(), 300);
    assert!(placed.values().all(|m| m.len() == 1), "no unit on two machines");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_no_unit_uses_are_removed_and_used_ones_kept() {
    let c = cluster().await;
    c.machine("m1", &[]).await;
    c.unit("kept.service", PLAIN).await;
    c.unit("gone.service", WANTS_DB).await;
    let gone = UnitName::parse("gone.service").expect("name");
    let delete = Op::delete(c.keys.unit(&gone));
    c.store.txn(Txn { then: vec![delete], ..Txn::default() }).await.expect("destroy");
    c.pass().await.expect("pass");
    let (bodies, _) = c.store.range(c.keys.bodies().as_bytes()).await.expect("range");
    let kept = UnitFile::parse(PLAIN).expect("unit file").hash();
    let names: Vec<String> = bodies.iter().map(|e| String::from_utf8_lossy(&e.key).into_owned()).collect();
    assert_eq!(names, [c.keys.body(&kept)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_units_and_machines_need_no_whole_pass_and_anything_else_gets_one() {
    let c = cluster().await;
    let m1 = c.machine("m1", &[]).await;
    c.machine("m2", &[]).await;
    for i in 0..4 {
        c.unit(&format!("a{i}.service"), PLAIN).await;
    }
    let mut plan = Planning::new(tokio::task::block_in_place(|| c.planner.cluster.plan_view()));
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.whole_passes(), 1);
    // Only new units (and the leader's own writes come back): placed on what the pass left,
    // levelled with the units already there, and the one that fits nowhere says why.
    for i in 0..3 {
        c.unit(&format!("b{i}.service"), PLAIN).await;
    }
    c.unit("db.service", WANTS_DB).await;
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.whole_passes(), 1, "no whole pass for new units");
    let placed = c.schedule().await;
    assert_eq!(placed.len(), 7, "{placed:?}");
    let on_m1 = placed.values().filter(|m| m == &&["m1".to_string()]).count();
    assert!(on_m1 == 3 || on_m1 == 4, "levelled over both machines: {placed:?}");
    assert!(c.why("db.service").is_some_and(|w| w.contains("role")), "{:?}", c.why("db.service"));
    // A machine that joins: the waiting unit is placed there and its reason forgotten.
    c.machine("m3", &[("role", "db")]).await;
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.whole_passes(), 1, "no whole pass for a machine that joins");
    assert_eq!(c.schedule().await.get("db.service"), Some(&vec!["m3".to_string()]));
    assert_eq!(c.why("db.service"), None);
    // A machine lost (and a unit created meanwhile): its units move to the machines left.
    c.store.expire_lease(m1);
    c.unit("c0.service", PLAIN).await;
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.whole_passes(), 1, "no whole pass for a machine lost");
    let placed = c.schedule().await;
    assert_eq!(placed.len(), 9, "{placed:?}");
    assert!(placed.values().all(|m| m.len() == 1 && m[0] != "m1"), "{placed:?}");
    // A schedule entry the leader did not write (deleted by hand): a whole pass puts it back.
    let a0 = UnitName::parse("a0.service").expect("name");
    let on = c.schedule().await["a0.service"][0].clone();
    c.store.txn(Txn { then: vec![Op::delete(c.keys.schedule(&on, &a0))], ..Txn::default() }).await.expect("delete");
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.whole_passes(), 2);
    assert_eq!(c.schedule().await.get("a0.service").map(Vec::len), Some(1));
    // A unit destroyed: a whole pass takes it off its machine.
    let b0 = UnitName::parse("b0.service").expect("name");
    c.store.txn(Txn { then: vec![Op::delete(c.keys.unit(&b0))], ..Txn::default() }).await.expect("destroy");
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.whole_passes(), 3);
    assert!(!c.schedule().await.contains_key("b0.service"));
    // From there on, new units alone again; nothing changed: nothing written.
    let before = c.store.revision();
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.store.revision(), before, "an idle pass writes nothing");
    c.unit("c1.service", PLAIN).await;
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.whole_passes(), 3);
    assert_eq!(c.schedule().await.len(), 9);
}

/// Two machines and four units, placed by a pass of another engine's (a planning copy of its own).
async fn placed_by_another_engine() -> Lab {
    let c = cluster().await;
    c.machine("m1", &[]).await;
    c.machine("m2", &[]).await;
    for i in 0..4 {
        c.unit(&format!("a{i}.service"), PLAIN).await;
    }
    c.pass().await.expect("pass");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_ready_to_lead_places_new_units_before_its_whole_pass() {
    let c = placed_by_another_engine().await;
    let placed = c.schedule().await;
    // This one, not leading, keeps its copy and the schedule as it stands, and follows what
    // changes (new units).
    c.get_ready().await;
    for i in 0..3 {
        c.unit(&format!("b{i}.service"), PLAIN).await;
    }
    c.get_ready().await;
    let mut plan = c.planner.ready.lock().expect("ready").plan.take().expect("a copy kept ready");
    // Elected: the first pass places the new units, levelled with those the schedule holds, and
    // moves nothing; the whole pass follows.
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.whole_passes(), 1, "the old leader's pass only");
    let now = c.schedule().await;
    assert_eq!(now.len(), 7, "{now:?}");
    for (u, m) in &placed {
        assert_eq!(now.get(u), Some(m), "{u} stays where it was");
    }
    let on_m1 = now.values().filter(|m| m == &&["m1".to_string()]).count();
    assert!(on_m1 == 3 || on_m1 == 4, "levelled over both machines: {now:?}");
    let before = c.store.revision();
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.whole_passes(), 2, "then a whole pass");
    assert_eq!(c.store.revision(), before, "which finds nothing to change");
}

#[test]
fn slow_writes_narrow_the_window_and_prompt_ones_widen_it_again() {
    let mut p = Pacing::new();
    assert_eq!(p.window, PUTS_IN_FLIGHT);
    let slow = SLOW_WRITE + Duration::from_millis(1);
    let prompt = SLOW_WRITE / 8;
    let mut seen = Vec::new();
    for took in [slow, slow, slow, slow, slow, prompt, SLOW_WRITE / 2, prompt, prompt] {
        p.answered(took);
        seen.push(p.window);
    }
    // Halved down to one, never zero; an answer between a quarter and the limit keeps it.
    assert_eq!(seen, [4, 2, 1, 1, 1, 2, 2, 3, 4]);
    for _ in 0..20 {
        p.answered(prompt);
    }
    assert_eq!(p.window, PUTS_IN_FLIGHT, "never more than the most in flight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stops_leading_keeps_its_copy_ready_for_the_next_election() {
    let c = cluster().await;
    c.machine("m1", &[]).await;
    c.unit("a.service", PLAIN).await;
    let mut plan = Planning::new(tokio::task::block_in_place(|| c.planner.cluster.plan_view()));
    c.pass_on(&mut plan).await.expect("pass");
    if let Ok(mut r) = c.planner.ready.lock() {
        r.leading = true;
    }
    drop(ReadyAgain { ready: &c.planner.ready, plan: Some(plan) });
    // Ready again: the same copy, now following the schedule; no copy is taken anew.
    let mut plan = {
        let mut r = c.planner.ready.lock().expect("ready");
        assert!(!r.leading);
        r.plan.take().expect("the copy kept")
    };
    assert!(plan.followed);
    c.unit("b.service", PLAIN).await;
    assert!(c.planner.cluster.caught_up(c.store.revision(), Duration::from_secs(5)).await);
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.whole_passes(), 1, "the new unit placed before any second whole pass");
    assert_eq!(c.schedule().await.get("b.service"), Some(&vec!["m1".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_ready_to_lead_does_not_follow_what_it_cannot_and_plans_whole_then() {
    let c = placed_by_another_engine().await;
    c.get_ready().await;
    // A unit destroyed: following cannot take that in (its machine has room again), and the
    // schedule was taken whole a moment ago: nothing is carried until it is taken again.
    let a0 = UnitName::parse("a0.service").expect("name");
    c.store.txn(Txn { then: vec![Op::delete(c.keys.unit(&a0))], ..Txn::default() }).await.expect("destroy");
    c.unit("b0.service", PLAIN).await;
    c.get_ready().await;
    let mut plan = c.planner.ready.lock().expect("ready").plan.take().expect("a copy kept ready");
    assert!(plan.carried.is_none(), "nothing carried after a change it cannot follow");
    // Elected: a whole pass first, which removes the destroyed unit's entry and places the new one.
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.whole_passes(), 2);
    let now = c.schedule().await;
    assert!(!now.contains_key("a0.service") && now.contains_key("b0.service"), "{now:?}");
}
