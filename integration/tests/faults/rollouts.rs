//! Rollouts (docs/services.md) on the fault lab: a template's six instances over five machines,
//! a new version rolled over them with `fleetctl rollout`, what runs sampled on every machine's
//! own systemd all along (which version: the unit's `Description=`); a bad version going back by
//! itself; the leader killed in the middle of one; canaries waiting for a promote, and an undo.

use super::*;

/// The service's instances.
const INSTANCES: usize = 6;

/// A version of the template `name`: `Description=<version>`, checked by `check`; it takes a
/// second to start (systemd shows it `activating`, not running, meanwhile), as a real service
/// would, so that what a rollout takes down at once shows on systemd.
fn version(lab: &Lab, name: &str, version: &str, check: &str) -> String {
    let dir = lab.dir.join(version);
    std::fs::create_dir_all(&dir).expect("dir");
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            "[Unit]\nDescription={version}\n\n[Service]\nExecStartPre=/bin/sleep 1\nExecStart=/bin/sleep infinity\n\n[X-Fleet]\nHealthCheck={check}\nHealthCheckInterval=300ms\nUnhealthyThreshold=2\n"
        ),
    )
    .expect("write");
    p.display().to_string()
}

/// Every machine's systemd bus, connected once for fast sampling.
async fn buses(lab: &Lab) -> Vec<MachineBus> {
    let mut out = Vec::new();
    for m in &lab.state.machines {
        out.push(MachineBus::connect(m).await.expect("bus"));
    }
    out
}

/// Instance -> the version (Description) systemd runs it at, over every machine, active only.
async fn running(buses: &[MachineBus], instances: &[String]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for bus in buses {
        for i in instances {
            if let Ok(p) = bus.unit(i).await {
                if p.active_state == "active" {
                    out.entry(i.clone()).or_default().push(p.description);
                }
            }
        }
    }
    out
}

/// Samples what runs while `until` is not yet true: the fewest instances active, and every
/// version seen.
async fn sample_until<F, Fut>(
    buses: &[MachineBus],
    instances: &[String],
    limit: Duration,
    mut until: F,
) -> (usize, std::collections::BTreeSet<String>, usize)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    let (mut fewest, mut seen, mut samples) = (usize::MAX, std::collections::BTreeSet::new(), 0);
    loop {
        let now = running(buses, instances).await;
        fewest = fewest.min(now.len());
        seen.extend(now.values().flatten().cloned());
        samples += 1;
        if until().await {
            return (fewest, seen, samples);
        }
        assert!(Instant::now() < end, "not done within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The rollout's phase as `fleetctl rollout status` says it.
fn phase(lab: &Lab, service: &str) -> String {
    let (_, out, _) = lab.ctl(&["rollout", "status", service]);
    out.lines()
        .find_map(|l| l.strip_prefix("Phase:"))
        .map(|p| p.trim().split([',', ' ']).next().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Instances done, as `fleetctl rollout status` lists them.
fn done(lab: &Lab, service: &str) -> usize {
    let (_, out, _) = lab.ctl(&["rollout", "status", service]);
    out.lines().filter(|l| l.contains(".service") && l.split_whitespace().last() == Some("yes")).count()
}

/// Starts the six instances at `v1` and waits until systemd runs them all.
async fn service(lab: &mut Lab, name: &str, buses: &[MachineBus]) -> Vec<String> {
    let file = version(lab, name, "v1", "/bin/true");
    let dir = std::path::Path::new(&file).parent().expect("dir").to_path_buf();
    let stem = name.trim_end_matches("@.service");
    let instances: Vec<String> = (1..=INSTANCES).map(|i| format!("{stem}@{i}.service")).collect();
    let mut args = vec!["start".to_string()];
    for i in &instances {
        let link = dir.join(i);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(name, &link).expect("link");
        args.push(link.display().to_string());
        lab.units.push(i.clone());
    }
    lab.units.push(name.to_string());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.ok(&refs);
    wait_for("every instance active at v1", T, || async {
        let now = running(buses, &instances).await;
        (now.len() == INSTANCES && now.values().all(|v| v == &["v1".to_string()])).then_some(())
    })
    .await
    .expect("v1 running");
    instances
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_rollout_keeps_the_service_up_and_a_bad_version_goes_back_by_itself() {
    let Some(mut lab) = fault_lab("fault-rollout").await else { return };
    let buses = buses(&lab).await;
    let name = "ro@.service";
    let instances = service(&mut lab, name, &buses).await;

    // v2, two at a time, each healthy for 1 s before it counts (so the rollout lasts long
    // enough to be watched): never fewer than four running, sampled on every machine.
    let v2 = version(&lab, name, "v2", "/bin/true");
    let state = lab.state.clone();
    let api = lab.api();
    let rollout = std::thread::spawn(move || {
        let args = ["rollout", "--max-parallel", "2", "--min-healthy-time", "1s", "--deadline", "60s", &v2];
        fleetctl(&state, &api, &args).expect("fleetctl")
    });
    let (fewest, seen, samples) = sample_until(&buses, &instances, T, || async { rollout.is_finished() }).await;
    let out = rollout.join().expect("fleetctl thread");
    let (o, e) = text(&out);
    assert!(out.status.success(), "fleetctl rollout v2:\n{o}\n{e}");
    assert!(o.contains("succeeded"), "{o}");
    let now = running(&buses, &instances).await;
    assert!(now.len() == INSTANCES && now.values().all(|v| v == &["v2".to_string()]), "after v2: {now:?}");
    eprintln!("v2: fewest running {fewest} over {samples} samples; versions seen {seen:?}\n{o}");
    assert!(samples >= 10, "only {samples} samples of the rollout");
    assert!(fewest < INSTANCES, "the sampling never saw an instance being replaced");
    assert!(fewest >= INSTANCES - 2, "only {fewest} instances ran at one point (max-parallel 2)");

    // v3's check fails: the first batch (two) runs it, the rollout goes back by itself.
    let v3 = version(&lab, name, "v3", "/bin/false");
    let state = lab.state.clone();
    let api = lab.api();
    let rollout = std::thread::spawn(move || {
        fleetctl(&state, &api, &["rollout", "--max-parallel", "2", "--deadline", "60s", &v3]).expect("fleetctl")
    });
    let mut most_on_v3 = 0;
    let end = Instant::now() + T;
    while !rollout.is_finished() {
        let now = running(&buses, &instances).await;
        most_on_v3 = most_on_v3.max(now.values().flatten().filter(|v| *v == "v3").count());
        assert!(Instant::now() < end, "the bad rollout did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = rollout.join().expect("fleetctl thread");
    let (o, e) = text(&out);
    assert!(!out.status.success(), "a rollout that went back must fail:\n{o}\n{e}");
    assert!(o.contains("reverted") && o.contains("is unhealthy"), "{o}");
    assert!(most_on_v3 <= 2, "{most_on_v3} instances ran the bad version (the first batch is two)");
    wait_for("every instance back at v2", T, || async {
        let now = running(&buses, &instances).await;
        (now.len() == INSTANCES && now.values().all(|v| v == &["v2".to_string()])).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", lab.ctl(&["rollout", "status", name])));
    assert_eq!(phase(&lab, name), "reverted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_rollout_survives_the_leader_and_canaries_wait_for_a_promote() {
    let Some(mut lab) = fault_lab("fault-rollout-leader").await else { return };
    let buses = buses(&lab).await;
    let name = "rl@.service";
    let instances = service(&mut lab, name, &buses).await;

    // One at a time, each healthy for 2 s: long enough to kill the leader in the middle.
    let v2 = version(&lab, name, "v2", "/bin/true");
    lab.ok(&["rollout", "--max-parallel", "1", "--min-healthy-time", "2s", "--deadline", "60s", "--no-block", &v2]);
    wait_for("the first instance done", T, || async { (done(&lab, name) >= 1).then_some(()) }).await.expect("one done");
    let leader = wait_for("a leader", T, || lab.leader()).await.expect("leader");
    faults::kill(&mut lab.state, Kind::Engine, &leader).await.expect("kill the leader");
    let at_kill = done(&lab, name);
    eprintln!("killed {leader} with {at_kill} of {INSTANCES} done");
    assert!(at_kill < INSTANCES, "the rollout was over before the leader was killed");
    let (fewest, _, _) =
        sample_until(&buses, &instances, Duration::from_secs(90), || async { phase(&lab, name) == "succeeded" }).await;
    let now = running(&buses, &instances).await;
    assert!(now.len() == INSTANCES && now.values().all(|v| v == &["v2".to_string()]), "after v2: {now:?}");
    assert!(fewest >= INSTANCES - 1, "only {fewest} ran at one point (max-parallel 1)");
    let next = lab.leader().await.unwrap_or_default();
    assert_ne!(next, leader);
    faults::start(&mut lab.state, Kind::Engine, &leader, &unit_template()).await.expect("start engine");

    // Two canaries, then a wait for a promote: fleetctl returns, two instances run v3, for good.
    let v3 = version(&lab, name, "v3", "/bin/true");
    let o = lab.ok(&["rollout", "--max-parallel", "2", "--canaries", "2", "--deadline", "60s", &v3]);
    assert!(o.contains("awaiting-promotion") && o.contains("rollout promote"), "{o}");
    let waiting = testkit::holds_for(Duration::from_secs(2), || async {
        let now = running(&buses, &instances).await;
        let on_v3 = now.values().flatten().filter(|v| *v == "v3").count();
        if on_v3 == 2 && now.len() == INSTANCES {
            Ok(())
        } else {
            Err(format!("waiting for a promote, yet {on_v3} on v3 of {} running: {now:?}", now.len()))
        }
    })
    .await;
    assert!(waiting.is_ok(), "{waiting:?}");
    lab.ok(&["rollout", "promote", name]);
    wait_for("the promoted rollout done", T, || async { (phase(&lab, name) == "succeeded").then_some(()) })
        .await
        .expect("succeeded");
    // And undone: every instance back at v2.
    lab.ok(&["rollout", "undo", name]);
    wait_for("every instance back at v2", T, || async {
        let now = running(&buses, &instances).await;
        (phase(&lab, name) == "reverted" && now.len() == INSTANCES && now.values().all(|v| v == &["v2".to_string()]))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", lab.ctl(&["rollout", "status", name])));
    // Refusals reach the user with their reason.
    let (ok, _, e) = lab.ctl(&["rollout", "promote", name]);
    assert!(!ok && e.contains("no canaries waiting"), "{e}");
}
