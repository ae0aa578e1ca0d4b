//! The leader's pass on the in-memory store: what it writes for a given cluster, that it writes
//! nothing once deposed, and that the store's faults cost no decision and double none. The view
//! is fed from the same store, as an engine's is from etcd.

use super::*;
use fleet_model::schema::{decode, Key, ScheduleEntry};
use fleet_model::{DesiredState, MachineRecord, UnitFile, UnitName, UnitRecord};
use fleet_store::kv::{MemStore, Txn};
use std::collections::{BTreeMap, BTreeSet};

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
        max_pending_starts: PENDING_STARTS,
        bulk_arrival: BULK_ARRIVAL,
    };
    Lab { store, keys, planner, fence, election_lease }
}

impl Lab {
    /// A machine as its agent registers it: on a lease of its own. Returns the lease.
    async fn machine(&self, id: &str, metadata: &[(&str, &str)]) -> i64 {
        self.machine_reading(id, metadata, true).await
    }

    /// A machine whose agent reads its schedule in pages or not (an earlier version's agent).
    async fn machine_reading(&self, id: &str, metadata: &[(&str, &str)], pages: bool) -> i64 {
        let lease = self.store.grant(10).await.expect("lease");
        let rec = MachineRecord {
            id: id.into(),
            metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            lease_ttl: 10,
            schedule_pages: pages,
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

    /// A planning copy of the view, as a new leader takes it.
    fn planning(&self) -> Planning {
        Planning::new(tokio::task::block_in_place(|| self.planner.cluster.plan_view()))
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

    /// unit -> machines it is scheduled on, as stored (in pages or a key per unit).
    async fn schedule(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, machine, unit, entry) in self.schedule_keys().await {
            assert_eq!(entry.desired_state, DesiredState::Launched, "{key}");
            out.entry(unit).or_default().push(machine);
        }
        out
    }

    /// Every entry stored: (its key, machine, unit, entry).
    async fn schedule_keys(&self) -> Vec<(String, String, String, ScheduleEntry)> {
        let (entries, _) = self.store.range(self.keys.schedules().as_bytes()).await.expect("range");
        let mut out = Vec::new();
        for e in entries {
            let key = String::from_utf8_lossy(&e.key).into_owned();
            match self.keys.decode(&e.key) {
                Some(Key::Schedule(m, u)) => out.push((key, m, u.to_string(), decode(&e.value).expect("entry"))),
                Some(Key::SchedulePage(m, _)) => {
                    let page: fleet_model::SchedulePage = decode(&e.value).expect("schedule page");
                    assert!(
                        !page.is_empty() && page.len() <= fleet_model::pages::SCHEDULE_PAGE_UNITS,
                        "{key}: {page:?}"
                    );
                    out.extend(page.into_iter().map(|(u, entry)| (key.clone(), m.clone(), u, entry)));
                }
                other => panic!("{key} is not a schedule key: {other:?}"),
            }
        }
        out
    }

    /// Takes `unit`'s entry out of the stored schedule, as no leader would.
    async fn unschedule_by_hand(&self, unit: &str) {
        let (key, _, _, _) = self.schedule_keys().await.into_iter().find(|e| e.2 == unit).expect("scheduled");
        let op = match self.keys.decode(key.as_bytes()) {
            Some(Key::SchedulePage(..)) => {
                let mut page: fleet_model::SchedulePage =
                    decode(&self.store.peek(key.as_bytes()).expect("page")).expect("page");
                page.remove(unit);
                Op::put(key, encode(&page).expect("encode"), 0)
            }
            _ => Op::delete(key),
        };
        self.store.txn(Txn { then: vec![op], ..Txn::default() }).await.expect("unschedule");
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
    let mut plan = c.planning();
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
    c.unschedule_by_hand("a0.service").await;
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
    let mut plan = c.planning();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_reading_pages_get_a_key_per_page_and_earlier_agents_a_key_per_unit() {
    let c = cluster().await;
    let m1 = c.machine("m1", &[]).await;
    c.machine_reading("m2", &[], false).await;
    for i in 0..300 {
        c.unit(&format!("u{i:03}.service"), PLAIN).await;
    }
    c.pass().await.expect("pass");
    let stored = c.schedule_keys().await;
    assert_eq!(stored.len(), 300, "every unit placed once");
    let keys_of = |m: &str| stored.iter().filter(|e| e.1 == m).map(|e| e.0.clone()).collect::<BTreeSet<_>>();
    // 150 units each: m1's in three pages (64, 64, 22), m2's one key each.
    assert_eq!(keys_of("m1"), (0..3).map(|n| c.keys.schedule_page("m1", n)).collect::<BTreeSet<_>>());
    assert_eq!(keys_of("m2").len(), 150);
    // Units destroyed leave their page (the page rewritten without them) or their key.
    let gone: Vec<&(String, String, String, ScheduleEntry)> =
        ["m1", "m2"].iter().flat_map(|m| stored.iter().filter(move |e| e.1 == *m).take(2)).collect();
    let then = gone.iter().map(|e| Op::delete(c.keys.unit(&UnitName::parse(&e.2).expect("name")))).collect();
    c.store.txn(Txn { then, ..Txn::default() }).await.expect("destroy");
    c.pass().await.expect("pass");
    let left = c.schedule().await;
    assert_eq!(left.len(), 296);
    assert!(gone.iter().all(|e| !left.contains_key(&e.2)), "{gone:?}");
    // The view shows each unit's entry where it was written, whichever way.
    let in_view = c.planner.cluster.read(|v| v.schedule.values().map(|e| e.len()).sum::<usize>());
    assert_eq!(in_view, 296);
    // A machine lost: its page goes with its units, which move to the other machine's keys.
    c.store.expire_lease(m1);
    c.pass().await.expect("pass");
    let stored = c.schedule_keys().await;
    assert_eq!(stored.len(), 296);
    assert!(stored.iter().all(|e| e.1 == "m2" && !e.0.starts_with(&c.keys.schedule_of("m1"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_starts_reading_pages_has_its_entries_moved_into_them() {
    let c = cluster().await;
    c.machine_reading("m1", &[], false).await;
    for i in 0..5 {
        c.unit(&format!("u{i}.service"), PLAIN).await;
    }
    c.pass().await.expect("pass");
    assert_eq!(c.schedule_keys().await.len(), 5);
    let events = || {
        let read = c.planner.cluster.events().read(None, &crate::events::Filter::default(), 1000, None);
        read.events.into_iter().map(|e| (e.kind, e.unit)).collect::<Vec<_>>()
    };
    let events_before = events().len();
    // The agent is upgraded: it registers again, saying it reads pages.
    c.machine("m1", &[]).await;
    c.pass().await.expect("pass");
    let stored = c.schedule_keys().await;
    assert_eq!(stored.len(), 5, "{stored:?}");
    assert!(stored.iter().all(|e| e.0 == c.keys.schedule_page("m1", 0)), "every entry in the page: {stored:?}");
    // Nothing was unscheduled on the way: the view kept every entry, and no event says otherwise.
    assert!(c.planner.cluster.caught_up(c.store.revision(), Duration::from_secs(5)).await);
    let in_view = c.planner.cluster.read(|v| v.schedule.values().map(|e| e.len()).sum::<usize>());
    assert_eq!(in_view, 5);
    let after = events();
    assert!(after.len() > events_before || after.len() == events_before);
    let since: Vec<_> = after[events_before..].iter().filter(|(kind, _)| kind.contains("unit")).collect();
    assert!(since.is_empty(), "moving entries into a page is no unit event: {since:?}");
    // And a pass after writes nothing more.
    let before = c.store.revision();
    c.pass().await.expect("pass");
    assert_eq!(c.store.revision(), before);
    // A key left behind by a move cut short (the pass ended before deleting it) goes with the
    // unit: the agent reads both, and the key would keep the unit on the machine.
    let u0 = UnitName::parse("u0.service").expect("name");
    let left = Op::put(c.keys.schedule("m1", &u0), encode(&stored[0].3).expect("encode"), 0);
    c.store.txn(Txn { then: vec![left], ..Txn::default() }).await.expect("leftover key");
    c.store.txn(Txn { then: vec![Op::delete(c.keys.unit(&u0))], ..Txn::default() }).await.expect("destroy");
    c.pass().await.expect("pass");
    assert_eq!(c.store.peek(c.keys.schedule("m1", &u0).as_bytes()), None, "the leftover key is deleted");
    assert!(!c.schedule().await.contains_key("u0.service"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_changed_since_the_view_showed_it_is_not_overwritten() {
    let c = cluster().await;
    c.machine("m1", &[]).await;
    c.unit("a.service", PLAIN).await;
    c.pass().await.expect("pass");
    c.unit("b.service", PLAIN).await;
    assert!(c.planner.cluster.caught_up(c.store.revision(), Duration::from_secs(5)).await);
    // Planned on the view as it is: page 0 holds a; b goes there too.
    let b = UnitName::parse("b.service").expect("name");
    let entry = ScheduleEntry {
        hash: UnitFile::parse(PLAIN).expect("unit").hash().into(),
        desired_state: DesiredState::Launched,
    };
    let decisions = vec![Decision::Put { unit: b.clone(), machine: "m1".into(), entry }];
    let writes = c.planner.cluster.read(|v| ScheduleWrites::plan(&c.keys, v, &decisions)).expect("plan");
    assert_eq!(writes.puts.len(), 1);
    // Meanwhile page 0 is written by someone else (the view has not seen it when the write goes).
    // (x is a unit of the cluster's: the leader's next pass keeps it where it is.)
    c.unit("x.service", PLAIN).await;
    let hash = UnitFile::parse(PLAIN).expect("unit").hash();
    let other = format!(
        r#"{{"a.service":{{"hash":"{hash}","desiredState":"launched"}},"x.service":{{"hash":"{hash}","desiredState":"launched"}}}}"#
    );
    let other = other.as_bytes();
    let page = c.keys.schedule_page("m1", 0);
    c.store.txn(Txn { then: vec![Op::put(page.clone(), other.to_vec(), 0)], ..Txn::default() }).await.expect("put");
    let guards: Vec<Compare> = writes.puts.iter().filter_map(|w| w.guard(&HashMap::new())).collect();
    assert_eq!(guards.len(), 1);
    let ops = writes.puts.iter().map(|w| w.op.clone()).collect();
    let result = c.planner.fenced(&c.fence, guards, ops).await;
    assert!(matches!(result, Err(LeadError::GuardFailed)), "{result:?}");
    assert_eq!(c.store.peek(page.as_bytes()).as_deref(), Some(other), "the page as the other write left it");
    // The next pass plans from a view that shows it: b is added, x kept.
    c.pass().await.expect("pass");
    let placed = c.schedule().await;
    assert!(
        ["a.service", "b.service", "x.service"].iter().all(|u| placed.get(*u) == Some(&vec!["m1".to_string()])),
        "{placed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_shows_the_revision_the_planning_copy_has_taken_in() {
    let c = cluster().await;
    let plan_revision = || c.planner.status.lock().map(|s| s.plan_revision).unwrap_or_default();
    c.machine("m1", &[]).await;
    c.unit("a.service", PLAIN).await;
    let before = c.store.revision();
    c.pass().await.expect("pass");
    assert!(plan_revision() >= before, "{} < {before}", plan_revision());
    c.unit("b.service", PLAIN).await;
    let before = c.store.revision();
    c.pass().await.expect("pass");
    assert!(plan_revision() >= before, "{} < {before}", plan_revision());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_or_empty_schedule_page_is_replaced_by_the_next_write_of_it() {
    let c = cluster().await;
    c.machine("m1", &[]).await;
    c.unit("a.service", PLAIN).await;
    c.pass().await.expect("pass");
    // Page 0 (holding a) overwritten by hand with something no one can read.
    let page = c.keys.schedule_page("m1", 0);
    let garbage = Op::put(page.clone(), b"{not json".to_vec(), 0);
    c.store.txn(Txn { then: vec![garbage], ..Txn::default() }).await.expect("put");
    // The next unit for that machine goes into page 0, guarded by the revision of the unreadable
    // value: the write goes through, and the page holds what the view held (a) and b.
    c.unit("b.service", PLAIN).await;
    c.pass().await.expect("a pass after an unreadable page");
    let placed = c.schedule().await;
    assert!(["a.service", "b.service"].iter().all(|u| placed.get(*u) == Some(&vec!["m1".to_string()])), "{placed:?}");
    assert!(c.store.peek(page.as_bytes()).is_some_and(|v| v.as_slice() != b"{not json"));
    // A readable page naming no unit (written by hand): its units are gone from it, and are
    // placed again with the next one, into that page, guarded by its revision.
    let emptied = Op::put(page.clone(), b"{}".to_vec(), 0);
    c.store.txn(Txn { then: vec![emptied], ..Txn::default() }).await.expect("put");
    c.unit("c.service", PLAIN).await;
    c.pass().await.expect("a pass after an empty page");
    let placed = c.schedule().await;
    assert!(
        ["a.service", "b.service", "c.service"].iter().all(|u| placed.get(*u) == Some(&vec!["m1".to_string()])),
        "{placed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_write_whose_answer_was_lost_is_not_taken_for_a_stale_view() {
    let c = cluster().await;
    c.machine("m1", &[]).await;
    c.machine("m2", &[]).await;
    for i in 0..200 {
        c.unit(&format!("u{i:03}.service"), PLAIN).await;
    }
    let mut plan = c.planning();
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.whole_passes(), 1);
    // New units; the first schedule write goes through but its answer is lost: the retry finds
    // its guard changed by itself, which is no reason to plan everything again.
    for i in 0..50 {
        c.unit(&format!("n{i:03}.service"), PLAIN).await;
    }
    c.store.lose_next_answers(1);
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.schedule().await.len(), 250, "every unit placed");
    assert!(c.schedule().await.values().all(|m| m.len() == 1));
    c.unit("last.service", PLAIN).await;
    c.pass_on(&mut plan).await.expect("pass");
    assert_eq!(c.schedule().await.len(), 251);
    assert_eq!(c.whole_passes(), 1, "the write found done carried the pass on");
}

/// `machines` machines with `per_machine` units each to place, the leader holding a placement
/// back while more than 500 units it placed are not yet reported by their machines.
async fn a_large_placement(machines: usize, per_machine: usize) -> Lab {
    let mut c = cluster().await;
    c.planner.max_pending_starts = 500;
    for m in 0..machines {
        c.machine(&format!("m{m:04}"), &[]).await;
    }
    for u in 0..machines * per_machine {
        c.unit(&format!("u{u:05}.service"), PLAIN).await;
    }
    c
}

fn waits_for_agents(c: &Lab) -> u64 {
    let metrics = c.planner.metrics.render();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("fleet_schedule_waits_for_agents_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no waits counter in {metrics}"))
}

/// Agents as the leader sees them: every 20 ms, each machine publishes an active state for
/// every unit in its schedule (what a real agent does once systemd started them).
fn agents_reporting(c: &Lab) -> (tokio::task::JoinHandle<()>, tokio::sync::watch::Sender<bool>) {
    let (store, keys) = (c.store.clone(), c.keys.clone());
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let mut reported: BTreeMap<String, usize> = BTreeMap::new();
        while !*stopped.borrow() {
            let (entries, _) = store.range(keys.schedules().as_bytes()).await.expect("range");
            let mut by_machine: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for e in entries {
                if let Some(Key::SchedulePage(m, _)) = keys.decode(&e.key) {
                    let page: fleet_model::SchedulePage = decode(&e.value).expect("schedule page");
                    by_machine.entry(m).or_default().extend(page.into_keys());
                }
            }
            for (m, units) in by_machine {
                if reported.get(&m) == Some(&units.len()) {
                    continue;
                }
                let page: fleet_model::StatePage = units
                    .iter()
                    .map(|u| {
                        let rec = fleet_model::UnitStateRecord {
                            load_state: "loaded".into(),
                            active_state: "active".into(),
                            sub_state: "running".into(),
                            applied: DesiredState::Launched,
                            ..Default::default()
                        };
                        (u.clone(), rec)
                    })
                    .collect();
                let put = Op::put(keys.state_page(&m, 0), encode(&page).expect("encode"), 0);
                store.txn(Txn { then: vec![put], ..Txn::default() }).await.expect("state");
                reported.insert(m, units.len());
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), stopped.changed()).await;
        }
    });
    (task, stop)
}

/// A placement larger than the limit goes out no faster than the machines report what they
/// were given: the leader holds it back (more than once over 25 transactions), and every unit
/// is placed once all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_placement_waits_for_the_machines_to_report_what_they_were_given() {
    // 3,000 page writes: 25 transactions, eight in flight at most.
    let c = a_large_placement(3_000, 4).await;
    let (agents, stop) = agents_reporting(&c);
    c.pass().await.expect("pass");
    let _ = stop.send(true);
    agents.await.expect("agents");
    let placed = c.schedule().await;
    assert_eq!(placed.len(), 12_000);
    assert!(placed.values().all(|m| m.len() == 1));
    let waits = waits_for_agents(&c);
    assert!(waits >= 2, "the placement was held back {waits} times");
}

/// Machines registered and no agent reporting anything (cut off, or the engine-alone bench):
/// after one wait in which none reported, the rest of the placement is not held back (it was, two
/// seconds a transaction: 2,500 placements a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_placement_to_silent_machines_waits_once() {
    let c = a_large_placement(3_000, 4).await;
    c.pass().await.expect("pass");
    assert_eq!(c.schedule().await.len(), 12_000);
    assert_eq!(waits_for_agents(&c), 1, "held back more than once for machines that report nothing");
}

impl Lab {
    /// Units as one API request stores them: every record and the shared body in one transaction.
    async fn units_at_once(&self, names: impl Iterator<Item = String>) {
        let file = UnitFile::parse(PLAIN).expect("unit file");
        let hash: fleet_model::Text = file.hash().into();
        let mut then = vec![Op::put(self.keys.body(&hash), file.canonical(), 0)];
        for name in names {
            let rec = UnitRecord {
                name: UnitName::parse(&name).expect("name"),
                hash: hash.clone(),
                desired_state: DesiredState::Launched,
            };
            then.push(Op::put(self.keys.unit(&rec.name), encode(&rec).expect("encode"), 0));
        }
        self.store.txn(Txn { then, ..Txn::default() }).await.expect("submit");
    }
}

/// Units arriving in bulk (more than `bulk_arrival` within a few seconds, in one request or in
/// requests each within the limit) are placed once they stop arriving, not as each request is
/// stored; a request within the limit is placed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_places_a_bulk_submission_once_it_stops_arriving() {
    let mut c = cluster().await;
    c.planner.bulk_arrival = 50;
    c.machine("m1", &[]).await;
    c.machine("m2", &[]).await;
    let (_lost_tx, mut lost) = watch::channel(false);
    let leading = c.planner.lead(c.fence.clone(), &mut lost);
    let submitting = async {
        // A user's start within the limit: placed without waiting for anything.
        c.units_at_once((0..20).map(|i| format!("user{i:02}.service"))).await;
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while c.schedule().await.len() < 20 {
            assert!(tokio::time::Instant::now() < until, "a small start was not placed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A bulk submission: 100 units, then 10 more every 100 ms for 2 s.
        c.units_at_once((0..100).map(|i| format!("bulk{i:03}.service"))).await;
        for batch in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.units_at_once((0..10).map(|i| format!("more{batch:02}-{i}.service"))).await;
            assert_eq!(c.schedule().await.len(), 20, "placed while units were still arriving (batch {batch})");
        }
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while c.schedule().await.len() < 320 {
            assert!(tokio::time::Instant::now() < until, "the bulk submission was not placed once it ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Another, in requests within the limit each (as fleetctl sends 10,000 a request), one
        // after the other: held once more than the limit arrived within the window.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut placed_early = 0;
        for batch in 0..20 {
            c.units_at_once((0..40).map(|i| format!("req{batch:02}-{i:02}.service"))).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let placed = c.schedule().await.len();
            match batch {
                0..=3 => placed_early = placed,
                _ => assert_eq!(placed, placed_early, "placed while requests kept arriving (request {batch})"),
            }
        }
        assert!(placed_early < 320 + 800, "nothing held");
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while c.schedule().await.len() < 1120 {
            assert!(tokio::time::Instant::now() < until, "the requests were not placed once they ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        r = leading => panic!("the leader stopped: {r:?}"),
        _ = submitting => {}
    }
    let placed = c.schedule().await;
    assert_eq!(placed.len(), 1120);
    assert!(placed.values().all(|m| m.len() == 1));
    let metrics = c.planner.metrics.render();
    let holds = metrics.lines().find_map(|l| l.strip_prefix("fleet_schedule_bulk_holds_total "));
    assert_eq!(holds.map(str::trim), Some("2"), "one hold per bulk submission, none for the small start: {metrics}");
}
