//! Units' health on the lab's machines (docs/services.md): `[X-Fleet] HealthCheck=` run by the
//! real agent next to real systemd, its results shown by fleetctl through the engine.

use fleet_integration::testkit::{self, fleetctl, text, wait_for};
use std::collections::BTreeMap;
use std::time::Duration;

/// unit -> health as `fleetctl list-units --fields unit,health` shows it.
fn health(lab: &fleet_integration::LabState, api: &str, prefix: &str) -> BTreeMap<String, String> {
    let out = fleetctl(lab, api, &["list-units", "--no-legend", "--fields", "unit,active,health"]).expect("fleetctl");
    let (o, e) = text(&out);
    assert!(out.status.success(), "fleetctl list-units: {o}{e}");
    o.lines()
        .filter_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (c.len() == 3 && c[0].starts_with(prefix)).then(|| (c[0].to_string(), format!("{} {}", c[1], c[2])))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_run_on_the_machine_and_show_in_fleetctl() {
    let Some(lab) = testkit::lab() else { return };
    let Some(api) = lab.api_url().map(str::to_string) else { return };
    let dir = testkit::scratch("health").expect("scratch");
    // Unit names of this run only.
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let prefix = format!("hc{nanos:x}");
    // Ready after 3 s (it makes its flag), never healthy (its check always fails), and one that
    // declares nothing.
    let units = [
        (
            format!("{prefix}-ready.service"),
            "ExecStart=/bin/sh -c 'sleep 3; touch /run/%n.ready; exec sleep infinity'\nExecStopPost=/bin/rm -f /run/%n.ready",
            "HealthCheck=/usr/bin/test -f /run/%n.ready\nHealthCheckInterval=500ms\nMinHealthyTime=1s",
        ),
        (format!("{prefix}-sick.service"), "ExecStart=/bin/sleep infinity", "HealthCheck=/bin/false\nHealthCheckInterval=300ms\nUnhealthyThreshold=2"),
        (format!("{prefix}-plain.service"), "ExecStart=/bin/sleep infinity", ""),
    ];
    let mut paths = Vec::new();
    for (name, service, xfleet) in &units {
        let p = dir.join(name);
        std::fs::write(&p, format!("[Unit]\nDescription={name}\n\n[Service]\n{service}\n\n[X-Fleet]\n{xfleet}\n"))
            .expect("write");
        paths.push(p.display().to_string());
    }
    let mut args = vec!["start"];
    args.extend(paths.iter().map(String::as_str));
    let out = fleetctl(&lab, &api, &args).expect("fleetctl start");
    assert!(out.status.success(), "{:?}", text(&out));
    let (ready, sick, plain) = (&units[0].0, &units[1].0, &units[2].0);

    // While it makes its flag, the ready unit is active but starting.
    let seen = wait_for("the ready unit starting", Duration::from_secs(30), || async {
        let h = health(&lab, &api, &prefix);
        (h.get(ready).map(String::as_str) == Some("active starting")).then_some(h)
    })
    .await
    .expect("starting first");
    assert_eq!(seen.get(plain).map(String::as_str), Some("active -"), "no declaration, no health: {seen:?}");
    let seen = wait_for("health settled", Duration::from_secs(30), || async {
        let h = health(&lab, &api, &prefix);
        (h.get(ready).map(String::as_str) == Some("active healthy")
            && h.get(sick).map(String::as_str) == Some("active unhealthy"))
        .then_some(h)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", health(&lab, &api, &prefix)));
    assert_eq!(seen.get(plain).map(String::as_str), Some("active -"));

    // A unit refused for a bad check never gets stored: the error names the key.
    let bad = dir.join(format!("{prefix}-bad.service"));
    std::fs::write(&bad, "[Service]\nExecStart=/bin/sleep infinity\n[X-Fleet]\nHealthCheck=curl localhost\n")
        .expect("write");
    let out = fleetctl(&lab, &api, &["submit", &bad.display().to_string()]).expect("fleetctl submit");
    let (o, e) = text(&out);
    assert!(!out.status.success() && format!("{o}{e}").contains("HealthCheck"), "a bad check was accepted: {o}{e}");

    let mut args = vec!["destroy"];
    args.extend(units.iter().map(|u| u.0.as_str()));
    let out = fleetctl(&lab, &api, &args).expect("fleetctl destroy");
    assert!(out.status.success(), "{:?}", text(&out));
}
