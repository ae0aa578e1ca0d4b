//! A rolling update of a lab whose machines run the host image (`./lab up --image`, the third
//! phase of `./lab test`): a new release is offered to every machine at once; each machine's
//! update agent writes it to its inactive slot, and they reboot one at a time through the
//! engines' FleetLock, each drained first, while their units keep running on the others.
//!
//! Sampled throughout: at most one reboot slot is held; at most one machine is away; no unit is
//! scheduled on a machine that is away; whenever no slot is held every unit is active. At the
//! end every machine booted the new release once, blessed, and every unit is active.
//!
//! Then a bad release (3, whose fleet-agent is missing) is offered: the first machine to get the
//! slot tries it, fails its health check, reboots into the previous slot and keeps the slot, so
//! the other machines never boot it.

use fleet_integration::image;
use fleet_integration::testkit::{self, fleetctl, text, wait_for};
use serde_json::Value;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const UNITS: usize = 6;

fn releases() -> PathBuf {
    PathBuf::from(std::env::var("FLEET_IMAGE_RELEASES").unwrap_or_else(|_| "/var/tmp/fleet-tier-releases".into()))
}

/// Offers a release the way a distributor would: copied in under a dot-name, renamed into place.
fn offer(version: &str) {
    let offered = image::updates_dir();
    let tmp = offered.join(format!(".{version}"));
    let _ = std::fs::remove_dir_all(&tmp);
    let status = std::process::Command::new("cp").arg("-r").arg(releases().join(version)).arg(&tmp).status();
    assert!(status.is_ok_and(|s| s.success()), "copy release {version}");
    std::fs::rename(&tmp, offered.join(version)).expect("offer the release");
}

/// The last lines of a machine's fleet-agent journal (image machines keep it on their var), for
/// failure messages: why a machine was away is in there.
fn agent_journal(m: &fleet_integration::MachineProc) -> String {
    let dir = image::var_dir(&m.dir).join("log/journal");
    let out = std::process::Command::new("journalctl")
        .arg("-D")
        .arg(&dir)
        .args(["-u", "fleet-agent", "-u", "fleet-health", "-n", "25", "--no-pager", "-o", "short-precise"])
        .output();
    match out {
        Ok(o) => format!("--- {} ({}):\n{}", m.name, m.machine_id, String::from_utf8_lossy(&o.stdout)),
        Err(e) => format!("--- {}: journalctl: {e}", m.name),
    }
}

fn journals_of_away(lab: &fleet_integration::LabState, present: &HashSet<String>) -> String {
    lab.machines.iter().filter(|m| !present.contains(&m.machine_id)).map(agent_journal).collect::<Vec<_>>().join("\n")
}

fn boots(m: &fleet_integration::MachineProc) -> Vec<String> {
    std::fs::read_to_string(image::boots_log(&m.dir)).unwrap_or_default().lines().map(String::from).collect()
}

async fn sample(api: &fleet_client::Client, etcd: &mut etcd_client::Client) -> Option<testkit::RebootSample> {
    testkit::reboot_sample(api, etcd, "rollout-").await
}

/// Waits (up to 60 s) until every test unit is reported active.
async fn every_unit_active(lab: &fleet_integration::LabState, api: &fleet_client::Client, what: &str) {
    wait_for(what, Duration::from_secs(60), || async {
        let s = sample(api, &mut testkit::etcd(lab).await.ok()?).await?;
        (s.units.len() == UNITS && s.units.iter().all(|u| u.2)).then_some(())
    })
    .await
    .expect("units active");
}

#[tokio::test]
async fn image_machines_update_one_at_a_time_while_their_units_run_elsewhere() {
    let Some(lab) = testkit::lab() else { return };
    assert!(
        lab.machines.iter().all(|m| m.spec.as_ref().is_some_and(|s| s.image.is_some())),
        "this test needs a lab of image machines: ./lab up --image RELEASE"
    );
    let api = lab.api_url().expect("engine").to_string();
    let client = std::sync::Arc::new(fleet_integration::pki::client_as("admin", &api).expect("API client"));
    let mut etcd = testkit::etcd(&lab).await.expect("etcd");
    let n = lab.machines.len();

    // Every machine is registered before units are placed (the lab waited for that, but a
    // machine that dropped out since would leave the rollout nothing to move units to).
    let registered = wait_for("every lab machine registered", Duration::from_secs(60), || {
        let (client, mut etcd) = (client.clone(), etcd.clone());
        async move {
            let s = sample(&client, &mut etcd).await?;
            (s.machines.len() == n).then_some(s)
        }
    })
    .await;
    if registered.is_err() {
        let s = sample(&client, &mut etcd).await.unwrap_or_default();
        panic!("not every lab machine is registered: {s:?}\n{}", journals_of_away(&lab, &s.machines));
    }

    // Units on every machine.
    let dir = testkit::scratch("rollout").expect("dir");
    let names: Vec<String> = (0..UNITS).map(|i| format!("rollout-{i}.service")).collect();
    for name in &names {
        std::fs::write(dir.join(name), "[Service]\nExecStart=/bin/sleep 100000\n").expect("write");
    }
    let paths: Vec<String> = names.iter().map(|u| dir.join(u).display().to_string()).collect();
    let mut args = vec!["start"];
    args.extend(paths.iter().map(String::as_str));
    let out = fleetctl(&lab, &api, &args).expect("fleetctl");
    assert!(out.status.success(), "{:?}", text(&out));
    every_unit_active(&lab, &client, "every unit active").await;

    offer("2");

    let blessed = |m: &fleet_integration::MachineProc| m.dir.join("disk/esp/loader/entries/fleet-2-b.conf").exists();
    let until = Instant::now() + Duration::from_secs(400);
    let mut samples = 0;
    let mut max_away = 0;
    loop {
        if let Some(s) = sample(&client, &mut etcd).await {
            samples += 1;
            assert!(s.slot_holders <= 1, "more than one reboot slot held: {s:?}");
            let away = n - s.machines.len();
            max_away = max_away.max(away);
            assert!(away <= 1, "more than one machine away at once: {s:?}\n{}", journals_of_away(&lab, &s.machines));
            for (unit, machine, _) in &s.units {
                assert!(
                    machine.is_empty() || s.machines.contains(machine),
                    "{unit} is scheduled on {machine}, which is away (not drained before its reboot): {s:?}"
                );
            }
            if s.slot_holders == 0 && away == 0 {
                assert!(
                    s.units.len() == UNITS && s.units.iter().all(|u| u.2),
                    "with no machine updating, every unit runs: {s:?}"
                );
            }
            if lab.machines.iter().all(blessed) && s.slot_holders == 0 && away == 0 {
                break;
            }
        }
        assert!(
            Instant::now() < until,
            "not every machine updated in time; boots: {:?}",
            lab.machines.iter().map(|m| std::fs::read_to_string(image::boots_log(&m.dir))).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(samples > 10 && max_away == 1, "the rollout was observed ({samples} samples, at most {max_away} away)");

    // Each machine: release 1, then one try of release 2, healthy and blessed; nothing else.
    for m in &lab.machines {
        let boots = std::fs::read_to_string(image::boots_log(&m.dir)).expect("boots log");
        let lines: Vec<&str> = boots.lines().collect();
        assert_eq!(lines, ["fleet-1-a.conf 1 healthy", "fleet-2-b+0-1.conf 2 healthy"], "{}", m.name);
    }
    every_unit_active(&lab, &client, "every unit active after the rollout").await;

    // The bad release: one machine tries it and comes back to 2 on its own.
    offer("3");
    let rolled_back = wait_for("a machine to try release 3 and roll back", Duration::from_secs(400), || async {
        lab.machines.iter().find(|m| {
            let b = boots(m);
            b.len() >= 4 && b[2].starts_with("fleet-3-a+0-1.conf 3 ") && b[3] == "fleet-2-b.conf 2 healthy"
        })
    })
    .await
    .expect("rollback");
    // It keeps the reboot slot: nobody else gets to try 3. The others wait, their units run.
    let others: Vec<_> = lab.machines.iter().filter(|m| m.name != rolled_back.name).collect();
    let quiet_until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < quiet_until {
        let key = format!("{}reboot-lock/default", fleet_integration::ETCD_PREFIX);
        let resp = etcd.get(key, None).await.expect("semaphore");
        let holders: Value = serde_json::from_slice(resp.kvs().first().expect("held").value()).expect("json");
        assert_eq!(
            holders["holders"].as_array().map(|h| h.iter().map(|h| h["id"].clone()).collect::<Vec<_>>()),
            Some(vec![Value::from(rolled_back.machine_id.clone())]),
            "the machine that rolled back holds the only slot"
        );
        for m in &others {
            assert_eq!(boots(m).len(), 2, "{} booted again: {:?}", m.name, boots(m));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let s = sample(&client, &mut etcd).await.expect("sample");
    assert!(s.units.len() == UNITS && s.units.iter().all(|u| u.2), "units run on the others: {s:?}");
}
