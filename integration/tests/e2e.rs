//! End to end through fleetctl on the lab's 3-machine cluster, checked against systemd inside the
//! machines and against etcd.

use fleet_integration::testkit::{self, fleetctl, keys_under, text, wait_for, MachineBus};
use std::collections::BTreeSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn unit_file(desc: &str) -> String {
    format!("[Unit]\nDescription={desc}\n\n[Service]\nExecStart=/bin/sleep infinity\n")
}

#[tokio::test]
async fn three_units_spread_over_three_machines_then_leave_no_trace() -> anyhow::Result<()> {
    let Some(lab) = testkit::lab() else {
        return Ok(());
    };
    let api = lab.api_url().expect("lab has an engine").to_string();
    let dir = testkit::scratch("e2e-spread")?;
    let names: Vec<String> = (1..=3).map(|i| format!("e2e-spread-{i}.service")).collect();
    let mut paths = Vec::new();
    for n in &names {
        let p = dir.join(n);
        std::fs::write(&p, unit_file(n))?;
        paths.push(p.display().to_string());
    }
    let mut args = vec!["start"];
    args.extend(paths.iter().map(String::as_str));
    let out = fleetctl(&lab, &api, &args)?;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "start failed: {stdout}\n{stderr}");
    for n in &names {
        assert!(stdout.contains(&format!("Unit {n} launched on ")), "{stdout}");
    }

    // list-units: three active rows on three distinct machines.
    let out = fleetctl(&lab, &api, &["list-units", "--no-legend", "--full", "--fields", "unit,machine,active,sub"])?;
    let (stdout, _) = text(&out);
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|r: &Vec<&str>| names.iter().any(|n| n == r[0]))
        .collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    assert!(rows.iter().all(|r| r[2] == "active" && r[3] == "running"), "{stdout}");
    let machines: BTreeSet<&str> = rows.iter().map(|r| r[1].split('/').next().unwrap_or("")).collect();
    assert_eq!(machines.len(), 3, "units not spread: {stdout}");

    // systemd inside each machine agrees.
    for r in &rows {
        let id = r[1].split('/').next().unwrap_or("");
        let m = lab.machines.iter().find(|m| m.machine_id == id).expect("row names a lab machine");
        assert_eq!(r[1], format!("{}/{}", m.machine_id, m.ip), "MACHINE shows the machine's address");
        let props = MachineBus::connect(m).await?.unit(r[0]).await?;
        assert_eq!(
            (props.load_state.as_str(), props.active_state.as_str()),
            ("loaded", "active"),
            "{} on {}",
            r[0],
            m.name
        );
    }

    let mut stop = vec!["stop"];
    stop.extend(names.iter().map(String::as_str));
    let out = fleetctl(&lab, &api, &stop)?;
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).1.contains("Successfully stopped units"), "{:?}", text(&out));
    for r in &rows {
        let m =
            lab.machines.iter().find(|m| m.machine_id == r[1].split('/').next().unwrap_or("")).expect("lab machine");
        let props = MachineBus::connect(m).await?.unit(r[0]).await?;
        assert_eq!(props.active_state, "inactive", "{} still running on {}", r[0], m.name);
    }

    // Each unit's body (its own: the descriptions differ) is stored while it exists...
    let mut etcd = testkit::etcd(&lab).await?;
    let body_keys: Vec<String> = names
        .iter()
        .map(|n| {
            Ok(fleet_model::Keys::new(fleet_integration::ETCD_PREFIX)
                .body(&fleet_model::UnitFile::parse(&unit_file(n))?.hash()))
        })
        .collect::<anyhow::Result<_>>()?;
    let bodies_before = keys_under(&mut etcd, &format!("{}bodies/", fleet_integration::ETCD_PREFIX)).await?;
    for k in &body_keys {
        assert!(bodies_before.contains(k), "{k} not stored: {bodies_before:?}");
    }

    let mut destroy = vec!["destroy"];
    destroy.extend(names.iter().map(String::as_str));
    let out = fleetctl(&lab, &api, &destroy)?;
    assert!(out.status.success(), "{:?}", text(&out));

    // ...and removed by the leader once no unit uses it: three fewer bodies.
    let bodies_after = wait_for("the destroyed units' bodies collected", T, || async {
        let mut etcd = etcd.clone();
        let now = keys_under(&mut etcd, &format!("{}bodies/", fleet_integration::ETCD_PREFIX)).await.ok()?;
        (!body_keys.iter().any(|k| now.contains(k))).then_some(now)
    })
    .await?;
    assert!(bodies_after.len() + 3 <= bodies_before.len(), "before {bodies_before:?}, after {bodies_after:?}");

    // Nothing left: no rows, no keys, no unit in any machine's systemd.
    let out = fleetctl(&lab, &api, &["list-units", "--no-legend"])?;
    assert!(!text(&out).0.contains("e2e-spread"), "{:?}", text(&out));
    let left: Vec<String> = keys_under(&mut etcd, fleet_integration::ETCD_PREFIX)
        .await?
        .into_iter()
        .filter(|k| k.contains("e2e-spread"))
        .collect();
    assert!(left.is_empty(), "keys left in etcd: {left:?}");
    for m in &lab.machines {
        let bus = MachineBus::connect(m).await?;
        for n in &names {
            let props = wait_for(&format!("{n} gone from {}", m.name), T, || async {
                bus.unit(n).await.ok().filter(|p| p.load_state == "not-found")
            })
            .await?;
            assert_eq!(props.active_state, "inactive");
        }
    }
    Ok(())
}

#[tokio::test]
async fn bad_input_is_refused_with_one_line_and_nothing_written() -> anyhow::Result<()> {
    let Some(lab) = testkit::lab() else {
        return Ok(());
    };
    let api = lab.api_url().expect("lab has an engine").to_string();
    let dir = testkit::scratch("e2e-bad")?;
    let mut etcd = testkit::etcd(&lab).await?;

    // Invalid unit name.
    let bad = dir.join("bad name.service");
    std::fs::write(&bad, unit_file("x"))?;
    let out = fleetctl(&lab, &api, &["start", bad.to_str().unwrap_or_default()])?;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid character ' ' in unit name"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // Unreadable unit file (not a unit file at all).
    let garbage = dir.join("e2e-garbage.service");
    std::fs::write(&garbage, "[Service]\nthis is not an assignment\n")?;
    let out = fleetctl(&lab, &api, &["submit", garbage.to_str().unwrap_or_default()])?;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("line 2"), "{stderr}");

    // Unknown units: cat fails, start without a file fails, stop/destroy say so and succeed.
    let out = fleetctl(&lab, &api, &["cat", "e2e-nosuch.service"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("Unit e2e-nosuch.service not found"));
    let out = fleetctl(&lab, &api, &["start", "e2e-nosuch.service"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("unable to find Unit(e2e-nosuch.service)"), "{:?}", text(&out));
    let out = fleetctl(&lab, &api, &["destroy", "e2e-nosuch.service"])?;
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out).1.contains("Units not found in registry"));

    // Unreachable endpoint.
    let out = fleetctl(&lab, "http://127.0.0.1:9", &["list-units"])?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("cannot reach the fleet API at http://127.0.0.1:9"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let left: Vec<String> = keys_under(&mut etcd, fleet_integration::ETCD_PREFIX)
        .await?
        .into_iter()
        .filter(|k| k.contains("e2e-garbage") || k.contains("e2e-nosuch") || k.contains("bad name"))
        .collect();
    assert!(left.is_empty(), "half-written keys: {left:?}");
    Ok(())
}

#[tokio::test]
async fn cat_and_list_unit_files_show_what_was_submitted() -> anyhow::Result<()> {
    let Some(lab) = testkit::lab() else {
        return Ok(());
    };
    let api = lab.api_url().expect("lab has an engine").to_string();
    let dir = testkit::scratch("e2e-cat")?;
    let p = dir.join("e2e-cat.service");
    let body = unit_file("cat me");
    std::fs::write(&p, &body)?;
    let out = fleetctl(&lab, &api, &["submit", p.to_str().unwrap_or_default()])?;
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(text(&out).0.trim(), "Unit e2e-cat.service inactive");
    let out = fleetctl(&lab, &api, &["cat", "e2e-cat.service"])?;
    assert_eq!(text(&out).0.trim(), body.trim());
    let out = fleetctl(&lab, &api, &["list-unit-files", "--no-legend", "--fields", "unit,dstate,state,target,desc"])?;
    let line = text(&out).0.lines().find(|l| l.starts_with("e2e-cat.service")).map(str::to_string).unwrap_or_default();
    assert_eq!(
        line.split('\t').filter(|s| !s.is_empty()).collect::<Vec<_>>(),
        vec!["e2e-cat.service", "inactive", "inactive", "-", "cat me"]
    );
    let out = fleetctl(&lab, &api, &["destroy", "e2e-cat.service"])?;
    assert!(out.status.success());
    Ok(())
}

/// etcd down: writes fail with one line naming the cause, and nothing is half-written. Uses its
/// own etcd and engine so the shared lab is not disturbed.
#[tokio::test]
async fn etcd_down_is_reported_and_nothing_is_half_written() -> anyhow::Result<()> {
    let Some(lab) = testkit::lab() else {
        return Ok(());
    };
    struct Proc(u32, &'static str);
    impl Drop for Proc {
        fn drop(&mut self) {
            fleet_integration::process::stop(self.0, self.1, Duration::from_secs(5));
        }
    }
    let etcd = fleet_integration::start_etcd_on("etcd-e2e-down", 12479, 12478, false)?;
    let etcd_guard = Proc(etcd.pid, "etcd");
    fleet_integration::wait_etcd(std::slice::from_ref(&etcd.client_url), T).await?;
    let engine = fleet_integration::start_engine(
        "t-etcd-down",
        &lab.bin_dir,
        std::slice::from_ref(&etcd.client_url),
        "/fleet/",
        12584,
        2,
    )?;
    let _engine_guard = Proc(engine.pid, "fleet-engine");
    let api = engine.api_url.clone();
    let dir = testkit::scratch("e2e-etcd-down")?;
    let (a, b) = (dir.join("down-a.service"), dir.join("down-b.service"));
    std::fs::write(&a, unit_file("a"))?;
    std::fs::write(&b, unit_file("b"))?;
    wait_for("engine API", T, || async {
        fleetctl(&lab, &api, &["list-unit-files"]).ok().filter(|o| o.status.success())
    })
    .await?;
    let out = fleetctl(&lab, &api, &["submit", a.to_str().unwrap_or_default()])?;
    assert!(out.status.success(), "{:?}", text(&out));

    drop(etcd_guard);
    let out = fleetctl(&lab, &api, &["--request-timeout", "20", "submit", b.to_str().unwrap_or_default()])?;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("etcd"), "error should name etcd: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // Back up (same data directory): the first unit is intact, the second was never written.
    let data = fleet_integration::lab_dir().join("etcd-e2e-down/data");
    let cmd = fleet_integration::etcd_command("etcd-e2e-down", &data, &etcd.client_url, &etcd.client_url, 12478);
    let pid =
        fleet_integration::process::spawn_logged(cmd, &fleet_integration::lab_dir().join("etcd-e2e-down/etcd2.log"))?;
    let _etcd2 = Proc(pid, "etcd");
    fleet_integration::wait_etcd(std::slice::from_ref(&etcd.client_url), T).await?;
    let mut client = fleet_integration::etcd_admin(std::slice::from_ref(&etcd.client_url)).await?;
    let keys = keys_under(&mut client, "/fleet/").await?;
    assert!(keys.iter().any(|k| k.ends_with("units/down-a.service")), "{keys:?}");
    assert!(!keys.iter().any(|k| k.contains("down-b")), "half-written: {keys:?}");
    assert_eq!(keys.iter().filter(|k| k.contains("/bodies/")).count(), 1, "{keys:?}");
    Ok(())
}

/// Every machine's systemd manages a cgroup tree of its own: sharing one, two machines' units of
/// the same name shared a cgroup, and one machine removing it after a stop made the other's start
/// fail (`status=219/CGROUP`).
#[tokio::test]
async fn every_machine_has_a_cgroup_tree_of_its_own() -> anyhow::Result<()> {
    let Some(lab) = testkit::lab() else {
        return Ok(());
    };
    let mut trees = BTreeSet::new();
    for m in &lab.machines {
        let init = fleet_integration::process::children(m.pid);
        let init = init.first().ok_or_else(|| anyhow::anyhow!("{}: no container init under {}", m.name, m.pid))?;
        let cgroups = std::fs::read_to_string(format!("/proc/{init}/cgroup"))?;
        let unified = cgroups.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default().to_string();
        assert!(unified.contains(&m.name), "{}'s init is in {unified:?}, not in a cgroup named after it", m.name);
        assert!(trees.insert(unified.clone()), "{} shares the cgroup tree {unified:?}", m.name);
    }
    assert_eq!(trees.len(), lab.machines.len());
    Ok(())
}
