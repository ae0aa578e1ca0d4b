//! The engine against real etcd: leadership and failover, least-loaded placement, and
//! rescheduling when a machine's lease expires. Machines here are bare etcd records on leases
//! (the agent has its own test), so only the engine is under test.

use etcd_client::{GetOptions, PutOptions};
use fleet_integration::testkit::{self, wait_for};
use fleet_integration::{process, start_engine, EngineProc};
use fleet_model::schema::{decode, encode, Key};
use fleet_model::{Keys, MachineRecord, ScheduleEntry};
use std::collections::BTreeMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

struct Engine(EngineProc);
impl Drop for Engine {
    fn drop(&mut self) {
        process::stop(self.0.pid, "fleet-engine", Duration::from_secs(5));
    }
}

async fn status(e: &EngineProc) -> Option<serde_json::Value> {
    testkit::http().get(format!("{}/engine/status", e.api_url)).send().await.ok()?.json().await.ok()
}

async fn is_leader(e: &EngineProc) -> bool {
    status(e).await.and_then(|s| s.get("leader").and_then(|l| l.as_bool())).unwrap_or(false)
}

/// A machine record kept alive on its own lease until `expire` is called.
struct FakeMachine {
    id: String,
    keeper: tokio::task::JoinHandle<()>,
}

impl FakeMachine {
    async fn register(etcd: &etcd_client::Client, keys: &Keys, id: &str) -> anyhow::Result<Self> {
        let mut c = etcd.clone();
        let lease = c.lease_grant(2, None).await?.id();
        let rec = MachineRecord { id: id.into(), public_ip: "192.0.2.1".into(), ..Default::default() };
        c.put(keys.machine(id), encode(&rec)?, Some(PutOptions::new().with_lease(lease))).await?;
        let (mut k, mut s) = c.lease_keep_alive(lease).await?;
        let keeper = tokio::spawn(async move {
            loop {
                if k.keep_alive().await.is_err() || s.message().await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(FakeMachine { id: id.into(), keeper })
    }

    /// Stops renewing, as if the machine died: etcd expires it within the lease TTL.
    fn expire(&self) {
        self.keeper.abort();
    }
}

async fn schedule(etcd: &mut etcd_client::Client, keys: &Keys) -> BTreeMap<String, String> {
    let Ok(resp) = etcd.get(keys.schedules(), Some(GetOptions::new().with_prefix())).await else {
        return BTreeMap::new();
    };
    // Machines whose agent reads pages get theirs in pages, the others a key per unit.
    resp.kvs()
        .iter()
        .flat_map(|kv| match keys.decode(kv.key()) {
            Some(Key::Schedule(m, u)) if decode::<ScheduleEntry>(kv.value()).is_ok() => vec![(u.to_string(), m)],
            Some(Key::SchedulePage(m, _)) => decode::<fleet_model::SchedulePage>(kv.value())
                .map(|p| p.into_keys().map(|u| (u, m.clone())).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        })
        .collect()
}

async fn start_units(api: &str, names: &[String]) -> anyhow::Result<()> {
    let http = testkit::http();
    for n in names {
        let body = serde_json::json!({"desiredState": "launched", "options": [
            {"section": "Service", "name": "ExecStart", "value": format!("/bin/sleep {}", n.len())}]});
        let resp = http.put(format!("{api}/fleet/v1/units/{n}")).json(&body).send().await?;
        anyhow::ensure!(resp.status().as_u16() == 201, "PUT {n}: {}", resp.status());
    }
    Ok(())
}

fn per_machine(s: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for m in s.values() {
        *out.entry(m.clone()).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn one_leader_and_a_follower_takes_over_when_it_is_killed() -> anyhow::Result<()> {
    let Some(lab) = testkit::lab() else {
        return Ok(());
    };
    let prefix = testkit::unique_prefix("election");
    let etcd = lab.etcd_endpoints();
    let a = Engine(start_engine("t-elect-a", &lab.bin_dir, &etcd, &prefix, 12581, 2)?);
    let b = Engine(start_engine("t-elect-b", &lab.bin_dir, &etcd, &prefix, 12582, 2)?);
    let (leader, follower) = wait_for("one leader", T, || async {
        match (is_leader(&a.0).await, is_leader(&b.0).await) {
            (true, false) => Some((&a, &b)),
            (false, true) => Some((&b, &a)),
            _ => None,
        }
    })
    .await?;
    // Both agree on who leads.
    let followers_view = wait_for("follower sees the leader", T, || async {
        status(&follower.0)
            .await
            .and_then(|s| s.get("leaderId").and_then(|l| l.as_str()).map(str::to_string))
            .filter(|l| !l.is_empty())
    })
    .await?;
    assert_eq!(followers_view, leader.0.name);

    assert!(process::signal(leader.0.pid, "fleet-engine", nix::sys::signal::Signal::SIGKILL));
    wait_for("the follower to lead", T, || async { is_leader(&follower.0).await.then_some(()) }).await?;
    Ok(())
}

#[tokio::test]
async fn places_on_least_loaded_machines_and_moves_units_off_lost_ones() -> anyhow::Result<()> {
    let Some(lab) = testkit::lab() else {
        return Ok(());
    };
    let prefix = testkit::unique_prefix("placement");
    let keys = Keys::new(&prefix);
    let mut etcd = testkit::etcd(&lab).await?;
    let engine = Engine(start_engine("t-place", &lab.bin_dir, &lab.etcd_endpoints(), &prefix, 12583, 2)?);
    let api = engine.0.api_url.clone();
    let machines = [
        FakeMachine::register(&etcd, &keys, "aaaa0000000000000000000000000001").await?,
        FakeMachine::register(&etcd, &keys, "aaaa0000000000000000000000000002").await?,
        FakeMachine::register(&etcd, &keys, "aaaa0000000000000000000000000003").await?,
    ];
    wait_for("engine ready", T, || async { is_leader(&engine.0).await.then_some(()) }).await?;

    let first: Vec<String> = (1..=3).map(|i| format!("place-{i}.service")).collect();
    start_units(&api, &first).await?;
    let placed_first = wait_for("3 placements", T, || {
        let mut etcd = etcd.clone();
        let keys = keys.clone();
        async move { Some(schedule(&mut etcd, &keys).await).filter(|s| s.len() == 3) }
    })
    .await?;
    assert_eq!(per_machine(&placed_first).values().copied().collect::<Vec<_>>(), vec![1, 1, 1], "{placed_first:?}");

    let second: Vec<String> = (4..=6).map(|i| format!("place-{i}.service")).collect();
    start_units(&api, &second).await?;
    let s = wait_for("6 placements", T, || {
        let mut etcd = etcd.clone();
        let keys = keys.clone();
        async move { Some(schedule(&mut etcd, &keys).await).filter(|s| s.len() == 6) }
    })
    .await?;
    assert_eq!(per_machine(&s).values().copied().collect::<Vec<_>>(), vec![2, 2, 2], "{s:?}");
    // Placement is sticky: each of the first units is on the machine it was on, not merely
    // somewhere.
    for u in &first {
        assert_eq!(s.get(u), placed_first.get(u), "{u} moved or vanished: {s:?}");
    }

    // Machine 3 dies: after its lease expires its units move to the others; nothing else moves.
    let lost = &machines[2];
    let on_lost: Vec<String> = s.iter().filter(|(_, m)| **m == lost.id).map(|(u, _)| u.clone()).collect();
    lost.expire();
    let moved = wait_for("units of the lost machine rescheduled", T, || {
        let mut etcd = etcd.clone();
        let keys = keys.clone();
        let lost = lost.id.clone();
        async move { Some(schedule(&mut etcd, &keys).await).filter(|s| s.len() == 6 && s.values().all(|m| *m != lost)) }
    })
    .await?;
    assert_eq!(per_machine(&moved).values().copied().collect::<Vec<_>>(), vec![3, 3], "{moved:?}");
    for (u, m) in &s {
        if !on_lost.contains(u) {
            assert_eq!(moved.get(u), Some(m), "{u} moved although its machine is alive");
        }
    }
    drop(engine);
    etcd.delete(prefix.as_str(), Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    Ok(())
}

/// Fencing, deterministically (the fault lab's frozen-leader test depends on where the freeze
/// catches a pass): a write guarded by the election key of an engine that lost it is refused by
/// etcd and writes nothing, while the new leader's fence lets its write through. Uses the
/// engine's own fence and fenced transaction.
#[tokio::test]
async fn a_write_fenced_by_a_lost_election_key_is_refused() -> anyhow::Result<()> {
    use fleet_engine::leader::{fence_of, fenced_txn, FenceError};
    use fleet_store::kv::{EtcdStore, Op};
    let Some(lab) = testkit::lab() else {
        return Ok(());
    };
    let etcd = testkit::etcd(&lab).await?;
    let store = EtcdStore::new(etcd.clone());
    let prefix = testkit::unique_prefix("fence");
    let keys = Keys::new(&prefix);
    let key = format!("{prefix}schedule/m1/x.service");
    let mut c = etcd.clone();
    let old_lease = c.lease_grant(30, None).await?.id();
    let won = c.election_client().campaign(keys.leader(), "e-old", old_lease).await?;
    let old = fence_of(won.leader().ok_or_else(|| anyhow::anyhow!("no leader key"))?);
    // While it leads, its writes land.
    fenced_txn(&store, &old, vec![], vec![Op::put(key.clone(), "old", 0)]).await?;
    // Deposed: its lease is gone (as when it is frozen past the TTL) and another engine wins.
    c.lease_revoke(old_lease).await?;
    let new_lease = c.lease_grant(30, None).await?.id();
    let won = c.election_client().campaign(keys.leader(), "e-new", new_lease).await?;
    let new = fence_of(won.leader().ok_or_else(|| anyhow::anyhow!("no leader key"))?);
    let late = fenced_txn(&store, &old, vec![], vec![Op::put(key.clone(), "late", 0)]).await;
    assert!(matches!(late, Err(FenceError::Refused)), "the deposed engine's write: {late:?}");
    let stored = c.get(key.clone(), None).await?;
    assert_eq!(stored.kvs().first().map(|kv| kv.value().to_vec()), Some(b"old".to_vec()), "nothing of it landed");
    fenced_txn(&store, &new, vec![], vec![Op::put(key.clone(), "new", 0)]).await?;
    let stored = c.get(key.clone(), None).await?;
    assert_eq!(stored.kvs().first().map(|kv| kv.value().to_vec()), Some(b"new".to_vec()));
    c.lease_revoke(new_lease).await?;
    c.delete(prefix.as_str(), Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    Ok(())
}

/// A planning pass never holds what the API needs. Units that declare `Conflicts=` are checked
/// against every other unit on their machine in each whole pass, so a few thousand of them on one
/// machine make such a pass take seconds (as a larger cluster does with any rules). New units
/// alone are placed without a whole pass, so one is asked for by changing a unit's desired state.
/// While such a pass runs, a unit is written and read back through the same engine (the read waits for the engine's
/// view to show the write) and the machines are listed: all three answer before that pass ends.
/// (The pass used to plan on the shared view under its lock: the watch could not apply the write,
/// the read waited for the pass, and every read queued behind the waiting watch.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_while_a_slow_planning_pass_runs() -> anyhow::Result<()> {
    let Some(lab) = testkit::lab() else {
        return Ok(());
    };
    let prefix = testkit::unique_prefix("slow-pass");
    let keys = Keys::new(&prefix);
    let mut etcd = testkit::etcd(&lab).await?;
    let engine = Engine(start_engine("t-slow", &lab.bin_dir, &lab.etcd_endpoints(), &prefix, 12584, 2)?);
    let api = engine.0.api_url.clone();
    let _machine = FakeMachine::register(&etcd, &keys, "bbbb0000000000000000000000000001").await?;
    wait_for("engine leads", T, || async { is_leader(&engine.0).await.then_some(()) }).await?;
    let http = testkit::http();
    let unit = |name: &str, xfleet: &str| {
        let mut options = vec![serde_json::json!({"section": "Service", "name": "ExecStart", "value": "/bin/true"})];
        if !xfleet.is_empty() {
            options.push(serde_json::json!({"section": "X-Fleet", "name": "Conflicts", "value": xfleet}));
        }
        serde_json::json!({"name": name, "desiredState": "launched", "options": options})
    };
    let field = |s: &Option<serde_json::Value>, f: &str| s.as_ref().and_then(|s| s.get(f).cloned());

    // Add conflicting units until one pass over them takes a second or more.
    let mut total = 0;
    let mut last_plan_ms = 0;
    let mut round = 0;
    while last_plan_ms < 1000 {
        round += 1;
        anyhow::ensure!(total < 16_000, "passes stay under 1 s ({last_plan_ms} ms) with {total} units");
        let more = if total == 0 { 2000 } else { total };
        let batch: Vec<_> =
            (total..total + more).map(|i| unit(&format!("slow-{i}.service"), "nomatch-*.service")).collect();
        let resp =
            http.post(format!("{api}/fleet/v1/units")).json(&serde_json::json!({ "units": batch })).send().await?;
        anyhow::ensure!(resp.status().as_u16() == 201, "create: {} {}", resp.status(), resp.text().await?);
        total += more;
        let want = total;
        wait_for("all placed", Duration::from_secs(300), || {
            let mut etcd = etcd.clone();
            let keys = keys.clone();
            async move { (schedule(&mut etcd, &keys).await.len() == want).then_some(()) }
        })
        .await?;
        // New units were placed without a whole pass: ask for one, and time it.
        let whole = |s: &Option<serde_json::Value>| field(s, "wholePasses").and_then(|v| v.as_u64()).unwrap_or(0);
        let before = whole(&status(&engine.0).await);
        let resp = http
            .put(format!("{api}/fleet/v1/units/slow-0.service"))
            .json(&serde_json::json!({"desiredState": if round % 2 == 1 { "loaded" } else { "launched" }}))
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "PUT slow-0: {}", resp.status());
        let idle = wait_for("a whole pass made, and none under way", Duration::from_secs(120), || async {
            let s = status(&engine.0).await;
            (whole(&s) > before && field(&s, "planning") == Some(false.into())).then_some(s)
        })
        .await?;
        last_plan_ms = field(&idle, "lastWholePlanMs").and_then(|v| v.as_u64()).unwrap_or(0);
        eprintln!("{total} units: a pass takes {last_plan_ms} ms");
    }

    // A change that makes the leader make a whole pass again, then catch that pass under way.
    let resp = http
        .put(format!("{api}/fleet/v1/units/slow-1.service"))
        .json(&serde_json::json!({"desiredState": "loaded"}))
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "PUT slow-1: {}", resp.status());
    let during = wait_for("a pass under way", T, || async {
        let s = status(&engine.0).await;
        (field(&s, "planning") == Some(true.into())).then_some(s)
    })
    .await?;
    let pass = field(&during, "passes").and_then(|v| v.as_u64());
    let asked = std::time::Instant::now();
    let put =
        http.put(format!("{api}/fleet/v1/units/probe-1.service")).json(&unit("probe-1.service", "")).send().await?;
    anyhow::ensure!(put.status().is_success(), "PUT probe-1: {}", put.status());
    let got = http.get(format!("{api}/fleet/v1/units/probe-1.service")).send().await?;
    anyhow::ensure!(got.status().as_u16() == 200, "GET probe-1 after its PUT: {}", got.status());
    let machines = http.get(format!("{api}/fleet/v1/machines")).send().await?;
    anyhow::ensure!(machines.status().as_u16() == 200, "GET machines: {}", machines.status());
    let answered = asked.elapsed();
    let after = status(&engine.0).await;
    eprintln!("write, read-your-write and machines answered in {answered:?} during a pass of ~{last_plan_ms} ms");
    assert_eq!(
        (field(&after, "planning"), field(&after, "passes").and_then(|v| v.as_u64())),
        (Some(true.into()), pass),
        "the pass that was under way ended before the API answered ({answered:?})"
    );
    drop(engine);
    etcd.delete(prefix.as_str(), Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    Ok(())
}
