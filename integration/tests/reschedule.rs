//! Units that keep failing (docs/services.md, "Rescheduling"): a unit with
//! `[X-Fleet] RescheduleAttempts=` that systemd reports failed on its lab machine is moved by the
//! leader to a machine it has not failed on, at most that many times; a unit without it stays
//! where it failed. Observed on every machine's own systemd, explained by `fleetctl events`.

use fleet_integration::testkit::{self, fleetctl, text, wait_for, MachineBus};
use fleet_integration::LabState;
use std::time::Duration;

/// The machine (by name) whose systemd has `unit` in `state`, if exactly one has.
async fn where_in(lab: &LabState, buses: &[MachineBus], unit: &str, state: &str) -> Option<String> {
    let mut found = Vec::new();
    for (m, bus) in lab.machines.iter().zip(buses) {
        let props = bus.unit(unit).await.ok()?;
        if props.active_state == state {
            found.push(m.name.clone());
        }
    }
    (found.len() == 1).then(|| found.remove(0))
}

fn bus_of<'a>(lab: &LabState, buses: &'a [MachineBus], name: &str) -> &'a MachineBus {
    let i = lab.machines.iter().position(|m| m.name == name).expect("machine");
    &buses[i]
}

fn id_of(lab: &LabState, name: &str) -> String {
    lab.machines.iter().find(|m| m.name == name).map(|m| m.machine_id.clone()).expect("machine")
}

fn events(lab: &LabState, api: &str, unit: &str) -> String {
    let out = fleetctl(lab, api, &["events", "--lines", "100", "--full", unit]).expect("fleetctl events");
    let (o, e) = text(&out);
    assert!(out.status.success(), "fleetctl events: {o}{e}");
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_unit_moves_away_from_where_it_failed_and_one_without_the_option_stays() {
    let Some(lab) = testkit::lab() else { return };
    let Some(api) = lab.api_url().map(str::to_string) else { return };
    assert!(lab.machines.len() >= 3, "the lab has three machines");
    let mut buses = Vec::new();
    for m in &lab.machines {
        buses.push(MachineBus::connect(m).await.expect("machine bus"));
    }
    let dir = testkit::scratch("reschedule").expect("scratch");
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let moving = format!("rs{nanos:x}-moving.service");
    let staying = format!("rs{nanos:x}-staying.service");
    let service = "[Service]\nExecStart=/bin/sleep infinity\n";
    let policy = "RescheduleAttempts=2\nRescheduleDelay=1s\nRescheduleInterval=10min\nRescheduleAvoid=10min\n";
    std::fs::write(dir.join(&moving), format!("{service}\n[X-Fleet]\n{policy}")).expect("write");
    std::fs::write(dir.join(&staying), service).expect("write");
    let paths = [dir.join(&moving).display().to_string(), dir.join(&staying).display().to_string()];
    let out = fleetctl(&lab, &api, &["start", &paths[0], &paths[1]]).expect("fleetctl start");
    assert!(out.status.success(), "{:?}", text(&out));

    let running = |unit: String| {
        let (lab, buses) = (&lab, &buses);
        async move {
            wait_for(&format!("{unit} active on one machine"), Duration::from_secs(30), || {
                let unit = unit.clone();
                async move { where_in(lab, buses, &unit, "active").await }
            })
            .await
            .expect("active")
        }
    };
    let mut visited = vec![running(moving.clone()).await];
    let stays_on = running(staying.clone()).await;

    // Two crashes, two moves: each time to a machine it has not failed on.
    for attempt in 1..=2 {
        let here = visited.last().cloned().expect("a machine");
        bus_of(&lab, &buses, &here).kill(&moving).await.expect("kill");
        let next = wait_for(&format!("move {attempt} of {moving}"), Duration::from_secs(30), || async {
            where_in(&lab, &buses, &moving, "active").await.filter(|m| !visited.contains(m))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; events:\n{}", events(&lab, &api, &moving)));
        // The machine it failed on no longer has it (the agent removed its file).
        let left = bus_of(&lab, &buses, &here).unit(&moving).await.expect("unit");
        assert_ne!(left.active_state, "active", "{moving} still runs on {here}");
        let told = events(&lab, &api, &moving);
        let because = format!("it failed on machine {} (RescheduleAttempts)", id_of(&lab, &here));
        assert!(
            told.lines().any(|l| l.contains("unit-moved") && l.contains(&because)),
            "no move saying it failed on {here}:\n{told}"
        );
        visited.push(next);
    }
    // The third crash within the interval: attempts spent, it stays failed where it is, and the
    // events say so.
    let last = visited.last().cloned().expect("a machine");
    bus_of(&lab, &buses, &last).kill(&moving).await.expect("kill");
    let told = wait_for("the leader saying it stays", Duration::from_secs(20), || async {
        let told = events(&lab, &api, &moving);
        told.contains("not moved: it moved 2 times within 10min").then_some(told)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; events:\n{}", events(&lab, &api, &moving)));
    assert!(told.contains("unit-reschedule"), "{told}");
    eprintln!("fleetctl events {moving}:\n{told}");

    // Without the option, a crash leaves the unit failed where it was, however long one waits
    // (longer than the other unit's delays).
    bus_of(&lab, &buses, &stays_on).kill(&staying).await.expect("kill");
    let held = testkit::holds_for(Duration::from_secs(6), || async {
        let failed_there =
            bus_of(&lab, &buses, &stays_on).unit(&staying).await.is_ok_and(|p| p.active_state == "failed");
        let moving_held = bus_of(&lab, &buses, &last).unit(&moving).await.is_ok_and(|p| p.active_state == "failed");
        if !failed_there {
            return Err(format!("{staying} is no longer failed on {stays_on}"));
        }
        if !moving_held {
            return Err(format!("{moving} moved a third time from {last}"));
        }
        Ok(())
    })
    .await;
    assert!(held.is_ok(), "{held:?}");
    let told = events(&lab, &api, &staying);
    assert!(!told.contains("unit-moved") && !told.contains("unit-reschedule"), "{told}");

    let out = fleetctl(&lab, &api, &["destroy", &moving, &staying]).expect("fleetctl destroy");
    assert!(out.status.success(), "{:?}", text(&out));
}
