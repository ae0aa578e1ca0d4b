//! FleetLock on the lab: machines take reboot slots with their own certificates, one at a time
//! (one slot in the default group), and a machine holding a slot is drained first: `pre-reboot`
//! says 200 only once its units run elsewhere. `steady-state` gives the slot back and lifts the
//! drain.

use fleet_integration::pki;
use fleet_integration::testkit::{self, fleetctl, text, wait_for};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

async fn fleetlock(http: &reqwest::Client, api: &str, op: &str, id: &str) -> (StatusCode, Value) {
    let resp = http
        .post(format!("{api}/v1/{op}"))
        .header("fleet-lock-protocol", "true")
        .json(&json!({"client_params": {"id": id, "group": "default"}}))
        .send()
        .await
        .expect("FleetLock request");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Whether the API lists machine `id` as drained.
async fn drained(http: &reqwest::Client, api: &str, id: &str) -> Option<bool> {
    let v: Value = http.get(format!("{api}/fleet/v1/machines")).send().await.ok()?.json().await.ok()?;
    Some(v["machines"].as_array()?.iter().any(|m| m["id"] == id && m["drained"] == true))
}

#[tokio::test]
async fn machines_reboot_one_at_a_time_and_empty() {
    let Some(lab) = testkit::lab() else { return };
    let api = lab.api_url().expect("engine").to_string();
    let (m1, m2) = (&lab.machines[0], &lab.machines[1]);
    let as_m1 = pki::http_as(&format!("machine-{}", m1.name)).expect("m1 identity");
    let as_m2 = pki::http_as(&format!("machine-{}", m2.name)).expect("m2 identity");

    // Units, at least one on m1: start one per machine (they spread over the least loaded).
    let dir = testkit::scratch("fleetlock").expect("dir");
    let names: Vec<String> = (0..lab.machines.len()).map(|i| format!("flock-{i}.service")).collect();
    for n in &names {
        std::fs::write(dir.join(n), "[Service]\nExecStart=/bin/sleep 100000\n").expect("write");
    }
    let paths: Vec<String> = names.iter().map(|n| dir.join(n).display().to_string()).collect();
    let mut args = vec!["start"];
    args.extend(paths.iter().map(String::as_str));
    let out = fleetctl(&lab, &api, &args).expect("fleetctl");
    assert!(out.status.success(), "{:?}", text(&out));
    let http = testkit::http();
    let on = |machine: String| {
        let http = http.clone();
        let api = api.clone();
        async move {
            let v: Value = http.get(format!("{api}/fleet/v1/state")).send().await.ok()?.json().await.ok()?;
            let states = v["states"].as_array().cloned().unwrap_or_default();
            Some(
                states
                    .iter()
                    .filter(|s| {
                        s["machineID"] == machine.as_str()
                            && s["name"].as_str().is_some_and(|n| n.starts_with("flock-"))
                    })
                    .filter(|s| s["systemdActiveState"] == "active")
                    .count(),
            )
        }
    };
    wait_for("a unit active on machine 1", T, || async { on(m1.machine_id.clone()).await.filter(|n| *n > 0) })
        .await
        .expect("unit on m1");

    // Protocol checks: the header is required; a machine acts only for itself.
    let resp = as_m1
        .post(format!("{api}/v1/pre-reboot"))
        .json(&json!({"client_params": {"id": m1.machine_id, "group": "default"}}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (s, v) = fleetlock(&as_m1, &api, "pre-reboot", &m2.machine_id).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // Machine 1 takes the slot: it is drained, and told to wait until its units are gone.
    let (s, v) = wait_for("machine 1's slot and drain", T, || async {
        let (s, v) = fleetlock(&as_m1, &api, "pre-reboot", &m1.machine_id).await;
        assert!(s == StatusCode::OK || v["kind"] == "draining", "{s} {v}");
        (s == StatusCode::OK).then_some((s, v))
    })
    .await
    .expect("slot");
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(on(m1.machine_id.clone()).await, Some(0), "machine 1 still runs units");
    assert_eq!(drained(&http, &api, &m1.machine_id).await, Some(true));
    wait_for("every unit active elsewhere", T, || async {
        let v: Value = http.get(format!("{api}/fleet/v1/state")).send().await.ok()?.json().await.ok()?;
        let active = v["states"]
            .as_array()?
            .iter()
            .filter(|s| {
                s["name"].as_str().is_some_and(|n| n.starts_with("flock-")) && s["systemdActiveState"] == "active"
            })
            .count();
        (active == names.len()).then_some(())
    })
    .await
    .expect("units moved");

    // Recursive: asking again is still one slot. Machine 2 must wait for it.
    assert_eq!(fleetlock(&as_m1, &api, "pre-reboot", &m1.machine_id).await.0, StatusCode::OK);
    let (s, v) = fleetlock(&as_m2, &api, "pre-reboot", &m2.machine_id).await;
    assert_eq!((s, v["kind"].as_str()), (StatusCode::CONFLICT, Some("failed_lock")), "{v}");

    // Back in steady state: the slot and the drain go; machine 2 gets its turn.
    assert_eq!(fleetlock(&as_m1, &api, "steady-state", &m1.machine_id).await.0, StatusCode::OK);
    assert_eq!(fleetlock(&as_m1, &api, "steady-state", &m1.machine_id).await.0, StatusCode::OK, "idempotent");
    assert_eq!(drained(&http, &api, &m1.machine_id).await, Some(false), "machine 1 still drained");
    let (s, v) = wait_for("machine 2's slot", T, || async {
        let (s, v) = fleetlock(&as_m2, &api, "pre-reboot", &m2.machine_id).await;
        (s == StatusCode::OK).then_some((s, v))
    })
    .await
    .expect("slot for machine 2");
    assert_eq!(s, StatusCode::OK, "{v}");
    // An operator may release a slot for a machine (one that will never come back, say).
    let operate = pki::token("operate").expect("token");
    let resp = pki::http_anonymous()
        .expect("client")
        .post(format!("{api}/v1/steady-state"))
        .bearer_auth(operate)
        .header("fleet-lock-protocol", "true")
        .json(&json!({"client_params": {"id": m2.machine_id, "group": "default"}}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::OK);

    // The update agent's side: fleet-update takes machine 3's slot with that machine's
    // certificate (waiting out the drain), then gives it back.
    let m3 = &lab.machines[2];
    let id = pki::identity(&format!("machine-{}", m3.name));
    let update = |op: &str| {
        std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/fleet-update"))
            .args([op, "--url", &api, "--machine-id", &m3.machine_id, "--timeout", "60", "--retry", "1"])
            .arg("--ca-file")
            .arg(&id.ca_file)
            .arg("--cert-file")
            .arg(&id.cert_file)
            .arg("--key-file")
            .arg(&id.key_file)
            .output()
            .expect("fleet-update runs")
    };
    let out = update("take-reboot-slot");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(drained(&http, &api, &m3.machine_id).await, Some(true));
    assert_eq!(on(m3.machine_id.clone()).await, Some(0), "machine 3 still runs units");
    let out = update("release-reboot-slot");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(drained(&http, &api, &m3.machine_id).await, Some(false));

    let mut args = vec!["destroy"];
    args.extend(names.iter().map(String::as_str));
    let out = fleetctl(&lab, &api, &args).expect("fleetctl");
    assert!(out.status.success(), "{:?}", text(&out));
}
