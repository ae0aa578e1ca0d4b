//! The agent's loop on the in-memory store (fleet_store::kv::MemStore) with the in-memory service
//! manager: what it does with its schedule and what it publishes, under each fault the store can
//! inject. The same behaviour on etcd and systemd is the lab's (integration/tests/agent.rs,
//! faults.rs); these run in milliseconds and fail at the line that broke.

use fleet_agent::config::AgentConfig;
use fleet_agent::driver::SimulatedSystemd;
use fleet_agent::files::MemoryUnitFiles;
use fleet_agent::Agent;
use fleet_model::health::Health;
use fleet_model::schema::{decode, encode};
use fleet_model::unit_file::content_hash;
use fleet_model::{DesiredState, Keys, ScheduleEntry, StatePage, UnitFile, UnitName, UnitStateRecord};
use fleet_store::kv::{MemStore, Op, Store, Txn};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::watch;

const MACHINE: &str = "0123456789abcdef0123456789abcdef";

struct Running {
    store: MemStore,
    keys: Keys,
    systemd: SimulatedSystemd,
    shutdown: watch::Sender<bool>,
    lease: watch::Sender<Option<i64>>,
    agent: tokio::task::JoinHandle<Result<(), fleet_agent::AgentError>>,
    dir: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(name: &str) -> Running {
    let store = MemStore::new();
    let dir = std::env::temp_dir().join(format!("fleet-agent-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let systemd = SimulatedSystemd::new(Duration::from_millis(1));
    run_agent(store, dir, systemd).await
}

/// An agent on `store` with units directory `dir` and service manager `systemd` (an agent
/// started again on the same machine gets the same ones).
async fn run_agent(store: MemStore, dir: PathBuf, systemd: SimulatedSystemd) -> Running {
    let keys = Keys::new("/fleet/");
    let cfg = AgentConfig { etcd_prefix: "/fleet/".into(), units_dir: dir.join("units"), ..AgentConfig::default() };
    let agent = Agent::new(&cfg, store.clone(), MACHINE.to_string(), systemd.clone()).await.expect("agent");
    let lease = store.grant(60).await.expect("lease");
    let (lease_tx, lease_rx) = watch::channel(Some(lease));
    let (cleaned_tx, _cleaned_rx) = watch::channel(fleet_agent::presence::Cleaned::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let agent = tokio::spawn(agent.run(lease_rx, cleaned_tx, shutdown_rx));
    Running { store, keys, systemd, shutdown: shutdown_tx, lease: lease_tx, agent, dir }
}

/// An agent whose unit files are in memory, read from there by the simulated service manager
/// (what `fleet-sim` runs): nothing is written to `dir`'s units.
async fn run_agent_in_memory(store: MemStore, dir: PathBuf) -> (Running, MemoryUnitFiles) {
    let keys = Keys::new("/fleet/");
    let cfg = AgentConfig { etcd_prefix: "/fleet/".into(), units_dir: dir.join("units"), ..AgentConfig::default() };
    let files = MemoryUnitFiles::new(cfg.units_dir.clone());
    let systemd = SimulatedSystemd::new(Duration::from_millis(1)).with_files(files.clone());
    let agent = Agent::with_files(&cfg, store.clone(), MACHINE.to_string(), systemd.clone(), files.clone())
        .await
        .expect("agent");
    let lease = store.grant(60).await.expect("lease");
    let (lease_tx, lease_rx) = watch::channel(Some(lease));
    let (cleaned_tx, _cleaned_rx) = watch::channel(fleet_agent::presence::Cleaned::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let agent = tokio::spawn(agent.run(lease_rx, cleaned_tx, shutdown_rx));
    (Running { store, keys, systemd, shutdown: shutdown_tx, lease: lease_tx, agent, dir }, files)
}

impl Running {
    /// Schedules `unit` here, with its body, as the engine and the leader would.
    async fn schedule(&self, unit: &str) {
        self.schedule_file(unit, "[Service]\nExecStart=/bin/sleep 1000\n").await
    }

    /// Schedules `unit` here with the unit file `file`.
    async fn schedule_file(&self, unit: &str, file: &str) {
        let name = UnitName::parse(unit).expect("name");
        let text = UnitFile::parse(file).expect("unit file").canonical();
        let hash = content_hash(&text);
        let entry = encode(&ScheduleEntry { hash: hash.as_str().into(), desired_state: DesiredState::Launched })
            .expect("entry");
        let txn = Txn {
            then: vec![Op::put(self.keys.body(&hash), text, 0), Op::put(self.keys.schedule(MACHINE, &name), entry, 0)],
            ..Txn::default()
        };
        self.store.txn(txn).await.expect("schedule");
    }

    async fn unschedule(&self, unit: &str) {
        let name = UnitName::parse(unit).expect("name");
        let txn = Txn { then: vec![Op::delete(self.keys.schedule(MACHINE, &name))], ..Txn::default() };
        self.store.txn(txn).await.expect("unschedule");
    }

    /// What the agent published for `unit`, in whichever page holds it.
    fn published(&self, unit: &str) -> Option<UnitStateRecord> {
        (0..4).find_map(|n| {
            let page: StatePage = decode(&self.store.peek(self.keys.state_page(MACHINE, n).as_bytes())?).ok()?;
            page.get(unit).cloned()
        })
    }

    /// Waits (up to 10 s) until `unit` is published in `active_state`.
    async fn until_published(&self, unit: &str, active_state: &str) -> Result<(), String> {
        for _ in 0..1000 {
            if self.published(unit).is_some_and(|r| r.active_state == active_state) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!("{unit} not published {active_state}: {:?}", self.published(unit)))
    }

    /// Waits (up to 10 s) until `unit` is stopped here and its state gone.
    async fn until_gone(&self, unit: &str, active_left: usize) -> Result<(), String> {
        for _ in 0..1000 {
            if self.published(unit).is_none() && self.systemd.active_count() == active_left {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!("{unit} still here: {:?}, {} active", self.published(unit), self.systemd.active_count()))
    }

    /// Waits (up to 10 s) until `unit`'s published health is `health`.
    async fn until_health(&self, unit: &str, health: Option<Health>) -> Result<(), String> {
        for _ in 0..1000 {
            if self.published(unit).is_some_and(|r| r.health == health) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!("{unit} not published with health {health:?}: {:?}", self.published(unit)))
    }
}

/// Health is published with the state of a unit that declares it: starting until its minimum
/// time, then what its check says, as the check's results change; a unit that declares none
/// has none.
#[tokio::test]
async fn a_units_health_is_checked_and_published_as_it_changes() {
    let a = start("health").await;
    let flag = a.dir.join("healthy");
    a.schedule("plain.service").await;
    a.schedule_file(
        "checked.service",
        &format!(
            "[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nHealthCheck=/bin/test -f {}\nHealthCheckInterval=100ms\nUnhealthyThreshold=2\nHealthCheckGrace=0\n",
            flag.display()
        ),
    )
    .await;
    a.schedule_file("slow.service", "[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nMinHealthyTime=700ms\n").await;
    a.until_published("plain.service", "active").await.expect("published");
    a.until_health("slow.service", Some(Health::Starting)).await.expect("starting at first");
    a.until_health("checked.service", Some(Health::Unhealthy)).await.expect("its check fails: no flag");
    std::fs::write(&flag, "").expect("flag");
    a.until_health("checked.service", Some(Health::Healthy)).await.expect("its check passes");
    a.until_health("slow.service", Some(Health::Healthy)).await.expect("healthy after its minimum time");
    std::fs::remove_file(&flag).expect("flag");
    a.until_health("checked.service", Some(Health::Unhealthy)).await.expect("unhealthy again");
    assert_eq!(a.published("plain.service").map(|r| r.health), Some(None), "no declaration, no health");
}

/// A unit given a new file (a rollout's next version) starts its health over: the state
/// published with the new file's hash never carries the health of the version before it.
#[tokio::test]
async fn a_rewritten_unit_starts_its_health_over() {
    let a = start("health-rewrite").await;
    let file = |v: &str| {
        format!("[Unit]\nDescription={v}\n[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nMinHealthyTime=700ms\n")
    };
    a.schedule_file("web.service", &file("v1")).await;
    a.until_health("web.service", Some(Health::Healthy)).await.expect("healthy");
    let v2 = content_hash(&UnitFile::parse(&file("v2")).expect("unit file").canonical());
    a.schedule_file("web.service", &file("v2")).await;
    let mut first = None;
    for _ in 0..1000 {
        if let Some(r) = a.published("web.service").filter(|r| r.hash == v2) {
            first = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = first.expect("the new version published");
    assert_ne!(first.health, Some(Health::Healthy), "the new version was published healthy at once: {first:?}");
    a.until_health("web.service", Some(Health::Healthy)).await.expect("healthy again after its minimum time");
}

/// An exclusive unit is stopped while the lease is in doubt, and etcd (also in doubt) never hears
/// of it; the agent then dies. The agent started next must not take what etcd still says
/// (launched) for the truth: it starts the unit again once it holds a lease. (Found by the chaos
/// test: a unit left inactive for good after a quorum loss and an agent kill.)
#[tokio::test]
async fn exclusive_units_stopped_for_a_lease_in_doubt_start_again_after_an_agent_restart() {
    let mut a = start("excl-restart").await;
    a.schedule_file("x.service", "[Service]\nExecStart=/bin/sleep 1000\n[X-Fleet]\nExclusive=true\n").await;
    a.until_published("x.service", "active").await.expect("published");
    a.store.set_unavailable(true);
    a.lease.send(None).expect("lease in doubt");
    for _ in 0..500 {
        if a.systemd.active_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.systemd.active_count(), 0, "an exclusive unit runs on while the lease is in doubt");
    a.shutdown.send(true).expect("stop the agent");
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut a.agent).await;
    assert_eq!(
        a.published("x.service").map(|r| (r.active_state.to_string(), r.applied)),
        Some(("active".to_string(), DesiredState::Launched)),
        "etcd never heard of the stop"
    );
    a.store.set_unavailable(false);
    let b = run_agent(a.store.clone(), a.dir.clone(), a.systemd.clone()).await;
    for _ in 0..500 {
        if b.systemd.active_count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.systemd.active_count(), 1, "not started again by the next agent: {:?}", b.published("x.service"));
}

#[tokio::test]
async fn a_scheduled_unit_is_started_and_its_state_published() {
    let a = start("basic").await;
    a.schedule("web.service").await;
    a.until_published("web.service", "active").await.expect("published");
    assert_eq!(a.systemd.active_count(), 1);
    a.unschedule("web.service").await;
    a.until_gone("web.service", 0).await.expect("an unscheduled unit is stopped and its state removed");
}

/// An agent upgraded from one that wrote a key per unit state: what that one published moves
/// into pages (a unit still stopping keeps its state), and the old keys are deleted.
#[tokio::test]
async fn states_an_earlier_version_published_per_unit_move_into_pages() {
    let store = MemStore::new();
    let dir = std::env::temp_dir().join(format!("fleet-agent-test-{}-legacy", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let systemd = SimulatedSystemd::new(Duration::from_millis(1));
    let keys = Keys::new("/fleet/");
    let old = |active: &str| UnitStateRecord {
        hash: "old".into(),
        load_state: "loaded".into(),
        active_state: active.into(),
        sub_state: "dead".into(),
        applied: DesiredState::Launched,
        health: None,
    };
    let legacy = |u: &str| keys.state(MACHINE, &UnitName::parse(u).expect("name"));
    let txn = Txn {
        then: vec![
            Op::put(legacy("gone.service"), encode(&old("inactive")).expect("state"), 0),
            Op::put(legacy("web.service"), encode(&old("active")).expect("state"), 0),
        ],
        ..Txn::default()
    };
    store.txn(txn).await.expect("earlier states");
    let a = run_agent(store, dir, systemd).await;
    a.schedule("web.service").await;
    a.until_published("web.service", "active").await.expect("published into a page");
    for _ in 0..500 {
        if a.store.peek(legacy("web.service").as_bytes()).is_none()
            && a.store.peek(legacy("gone.service").as_bytes()).is_none()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.store.peek(legacy("web.service").as_bytes()), None, "the old key of a republished unit stays");
    assert_eq!(a.store.peek(legacy("gone.service").as_bytes()), None, "the old key of a stopped unit stays");
    assert_eq!(a.published("gone.service"), None, "a stopped unit no longer here is published again");
}

#[tokio::test]
async fn states_refused_by_the_store_are_published_on_a_later_try() {
    let a = start("refused").await;
    a.schedule("web.service").await;
    // The publications that follow are refused for a while (the schedule write went through).
    a.store.refuse_next_txns(3);
    a.until_published("web.service", "active").await.expect("published after the refusals");
}

#[tokio::test]
async fn a_lost_watch_misses_nothing() {
    let a = start("lost-watch").await;
    a.schedule("one.service").await;
    a.until_published("one.service", "active").await.expect("first");
    a.store.drop_watches();
    a.schedule("two.service").await;
    a.until_published("two.service", "active").await.expect("scheduled while the watch was down");
}

#[tokio::test]
async fn after_compaction_the_schedule_is_listed_again() {
    let a = start("compaction").await;
    a.schedule("one.service").await;
    a.until_published("one.service", "active").await.expect("first");
    // The watch is lost, the unit is taken away and another scheduled, and the history of both is
    // compacted before the agent looks again: only a new listing can tell it.
    a.store.drop_watches();
    a.unschedule("one.service").await;
    a.schedule("two.service").await;
    a.store.compact(a.store.revision());
    a.until_published("two.service", "active").await.expect("the new unit");
    a.until_gone("one.service", 1).await.expect("the unit taken away during the outage is stopped");
}

#[tokio::test]
async fn a_store_down_for_a_while_delays_but_loses_nothing() {
    let a = start("down").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The schedule changes (written by the engine through another member) while this agent
    // cannot reach the store, and its watch is gone.
    a.store.drop_watches();
    a.schedule("web.service").await;
    a.store.set_unavailable(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.published("web.service").is_none(), "nothing published while the store is down");
    a.store.set_unavailable(false);
    a.until_published("web.service", "active").await.expect("published once the store is back");
}

/// The leader writes the schedule of an agent that reads pages a page at a time, and moves
/// entries it wrote one key each into a page (the page first, the keys deleted after): the
/// agent runs what the pages say, a unit moving from its key into a page keeps running, and a
/// unit left out of a rewritten page is stopped.
#[tokio::test]
async fn a_schedule_in_pages_is_run_and_entries_moving_into_them_keep_running() {
    let a = start("schedule-pages").await;
    let file = "[Service]\nExecStart=/bin/sleep 1000\n";
    let text = UnitFile::parse(file).expect("unit file").canonical();
    let hash = content_hash(&text);
    let entry = ScheduleEntry { hash: hash.as_str().into(), desired_state: DesiredState::Launched };
    let page = |units: &[&str]| {
        let p: fleet_model::SchedulePage = units.iter().map(|u| (u.to_string(), entry.clone())).collect();
        encode(&p).expect("page")
    };
    // One unit as an earlier leader wrote it (its own key), two in page 0.
    a.schedule("old.service").await;
    let txn = Txn {
        then: vec![Op::put(a.keys.schedule_page(MACHINE, 0), page(&["a.service", "b.service"]), 0)],
        ..Txn::default()
    };
    a.store.txn(txn).await.expect("page");
    for u in ["old.service", "a.service", "b.service"] {
        a.until_published(u, "active").await.expect("started from its page or key");
    }
    assert_eq!(a.systemd.active_count(), 3);
    // old.service moves into page 1: the page is written, then its key deleted.
    let txn =
        Txn { then: vec![Op::put(a.keys.schedule_page(MACHINE, 1), page(&["old.service"]), 0)], ..Txn::default() };
    a.store.txn(txn).await.expect("page 1");
    a.unschedule("old.service").await;
    // b.service leaves page 0.
    let txn = Txn { then: vec![Op::put(a.keys.schedule_page(MACHINE, 0), page(&["a.service"]), 0)], ..Txn::default() };
    a.store.txn(txn).await.expect("page 0 rewritten");
    a.until_gone("b.service", 2).await.expect("a unit left out of its page is stopped");
    assert!(a.published("old.service").is_some_and(|s| s.active_state == "active"), "moved into a page, still running");
    assert!(a.published("a.service").is_some_and(|s| s.active_state == "active"));
    // Page 1 deleted: its unit is stopped.
    let txn = Txn { then: vec![Op::delete(a.keys.schedule_page(MACHINE, 1))], ..Txn::default() };
    a.store.txn(txn).await.expect("page 1 deleted");
    a.until_gone("old.service", 1).await.expect("a unit whose page is deleted is stopped");
}

#[tokio::test]
async fn a_state_write_that_arrives_late_does_not_overwrite_a_newer_one() {
    let a = start("late-write").await;
    a.store.record_txns();
    a.schedule("x.service").await;
    a.until_published("x.service", "active").await.expect("x");
    a.schedule("y.service").await;
    a.until_published("y.service", "active").await.expect("y");
    let page = a.keys.state_page(MACHINE, 0);
    let writes_page = |t: &Txn| t.then.iter().any(|op| matches!(op, Op::Put { key, .. } if *key == page.as_bytes()));
    // The agent's last write of its page so far (x and y)...
    let late = a.store.recorded_txns().into_iter().rfind(writes_page).expect("a page write");
    a.schedule("z.service").await;
    a.until_published("z.service", "active").await.expect("z");
    // ...reaches etcd again after a newer one, as a request does whose client timed out.
    let r = a.store.txn(late).await.expect("txn");
    assert!(!r.succeeded, "a late write of an older page must be refused");
    assert!(a.published("z.service").is_some_and(|s| s.active_state == "active"), "the newer state stays");

    // A page changed behind the agent's back (by anyone) is read back before the agent writes
    // it again, and what it lost is published again.
    let only_x: StatePage = [("x.service".to_string(), a.published("x.service").expect("x"))].into_iter().collect();
    let txn = Txn { then: vec![Op::put(page.clone(), encode(&only_x).expect("page"), 0)], ..Txn::default() };
    a.store.txn(txn).await.expect("overwrite");
    a.schedule("w.service").await;
    a.until_published("w.service", "active").await.expect("w published after reading its page back");
    for u in ["x.service", "y.service", "z.service"] {
        a.until_published(u, "active").await.expect("republished");
    }
}

/// The benchmarks' agents keep their unit files in memory: units run from there (a unit whose
/// file says `/bin/false` fails, so the service manager read that file), nothing is written to
/// the units directory, and a unit taken off the machine leaves no file behind.
#[tokio::test]
async fn unit_files_in_memory_are_run_and_removed() {
    let store = MemStore::new();
    let dir = std::env::temp_dir().join(format!("fleet-agent-test-{}-in-memory", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (a, files) = run_agent_in_memory(store, dir.clone()).await;
    a.schedule("ok.service").await;
    a.schedule_file("bad.service", "[Service]\nExecStart=/bin/false\n").await;
    a.until_published("ok.service", "active").await.expect("ok active");
    a.until_published("bad.service", "failed").await.expect("bad failed: its file was read from memory");
    let units = dir.join("units");
    assert!(files.text(&units.join("ok.service")).is_some_and(|t| t.contains("sleep 1000")));
    assert!(!units.join("ok.service").exists(), "a unit file was written to disk");
    a.unschedule("ok.service").await;
    a.until_gone("ok.service", 0).await.expect("ok gone");
    assert!(files.text(&units.join("ok.service")).is_none(), "the unit's file is still there");
}
