//! Agents: killed, stopped and started again, reloaded, stopped while etcd is unreachable; units
//! destroyed and submitted again, a failed unit started again.

use super::*;

#[tokio::test]
async fn fault_agent_killed_and_restarted_adopts_its_units() {
    let Some(mut lab) = fault_lab("fault-agent").await else { return };
    let files: Vec<String> =
        (0..3).map(|i| lab.file(&format!("fl-ag-{i}.service"), "MachineMetadata=hostname=fl-m1\n")).collect();
    let mut args = vec!["start"];
    args.extend(files.iter().map(String::as_str));
    lab.ok(&args);
    let before = lab.all_active_once().await;
    let bus = MachineBus::connect(&lab.machine("fl-m1")).await.expect("bus");
    let agent_pid = bus.unit("fleet-agent.service").await.expect("agent").main_pid;
    faults::kill(&mut lab.state, Kind::Agent, "fl-m1").await.expect("kill agent");
    wait_for("agent restarted by systemd", T, || async {
        bus.unit("fleet-agent.service")
            .await
            .ok()
            .filter(|p| p.active_state == "active" && p.main_pid != agent_pid && p.main_pid != 0)
    })
    .await
    .expect("agent back");
    unchanged_for_2s(&lab, &before, "units restarted or moved by an agent restart").await;
    assert_eq!(lab.ok(&["list-machines", "--no-legend"]).lines().count(), lab.state.machines.len());
}

/// `systemctl stop fleet-agent` (an upgrade) leaves units running; the agent started again
/// within the lease TTL takes its lease over and restarts nothing (reference scenarios 29 and 38,
/// with the original's purge-on-stop deliberately not kept).
#[tokio::test]
async fn fault_agent_stopped_and_started_again_restarts_nothing() {
    let Some(mut lab) = fault_lab("fault-upgrade").await else { return };
    let f = lab.file("fl-up-a.service", "MachineMetadata=hostname=fl-m2\n");
    lab.ok(&["start", &f]);
    let before = lab.all_active_once().await;
    let bus = MachineBus::connect(&lab.machine("fl-m2")).await.expect("bus");
    let _: zbus::zvariant::OwnedObjectPath = zbus::Proxy::new(
        &zbus::connection::Builder::address(lab.machine("fl-m2").bus_address().as_str())
            .expect("addr")
            .build()
            .await
            .expect("bus"),
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
    )
    .await
    .expect("manager")
    .call("StopUnit", &("fleet-agent.service", "replace"))
    .await
    .expect("stop agent");
    let stopped = wait_for("agent stopped", T, || async {
        bus.unit("fleet-agent.service").await.ok().filter(|p| p.active_state == "inactive")
    })
    .await
    .expect("agent stops cleanly");
    assert_eq!(stopped.active_state, "inactive", "a graceful stop is not a failure");
    assert_eq!(lab.active_in_systemd().await, before, "stopping the agent stopped units");
    faults::start(&mut lab.state, Kind::Agent, "fl-m2", &unit_template()).await.expect("start agent");
    unchanged_for_2s(&lab, &before, "units restarted or moved").await;
}

/// Regression (original bugs#8, #412): a unit destroyed and submitted again on the same machine
/// must not be stuck `not-found`.
#[tokio::test]
async fn fault_destroy_and_resubmit_on_the_same_machine() {
    let Some(mut lab) = fault_lab("fault-resubmit").await else { return };
    let f = lab.file("fl-rs.service", "MachineMetadata=hostname=fl-m1\n");
    for _ in 0..3 {
        lab.ok(&["start", &f]);
        let a = lab.all_active_once().await;
        assert_eq!(a["fl-rs.service"][0].0, "fl-m1");
        lab.ok(&["destroy", "fl-rs.service"]);
        assert!(lab.active_in_systemd().await.is_empty());
    }
}

/// Reference scenario 37: SIGHUP reloads the configuration. The agent publishes its new metadata
/// at once (a `MachineMetadata=` rule can use it) and the engine keeps serving; nothing restarts.
#[tokio::test]
async fn fault_reload_configuration_on_sighup_restarts_nothing() {
    let Some(mut lab) = fault_lab("fault-reload").await else { return };
    let m3 = lab.machine("fl-m3");
    let config = m3.dir.join("fleet/agent.toml");
    let original = std::fs::read_to_string(&config).expect("agent config");
    struct Restore(std::path::PathBuf, String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write(&self.0, &self.1);
        }
    }
    let _restore = Restore(config.clone(), original.clone());
    let f = lab.file("fl-rl-a.service", "MachineMetadata=hostname=fl-m3\n");
    lab.ok(&["start", &f]);
    let before = lab.all_active_once().await;
    let bus = MachineBus::connect(&m3).await.expect("bus");
    let agent_pid = bus.unit("fleet-agent.service").await.expect("agent").main_pid;

    // [metadata] is the file's last table: a line appended lands in it.
    std::fs::write(&config, format!("{original}rack = \"r9\"\n")).expect("rewrite config");
    let manager = zbus::Proxy::new(
        &zbus::connection::Builder::address(m3.bus_address().as_str()).expect("addr").build().await.expect("bus"),
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
    )
    .await
    .expect("manager");
    let () = manager
        .call("KillUnit", &("fleet-agent.service", "main", nix::sys::signal::Signal::SIGHUP as i32))
        .await
        .expect("SIGHUP agent");
    let engine = lab.state.engines[0].clone();
    assert!(fleet_integration::process::signal(engine.pid, "fleet-engine", nix::sys::signal::Signal::SIGHUP));

    wait_for("fl-m3's new metadata in list-machines", T, || async {
        let out = lab.ok(&["list-machines", "--no-legend", "--full", "--fields", "machine,metadata"]);
        out.lines().any(|l| l.starts_with(&m3.machine_id) && l.contains("rack=r9")).then_some(())
    })
    .await
    .expect("reloaded metadata published");
    // The new metadata places units at once.
    let g = lab.file("fl-rl-b.service", "MachineMetadata=rack=r9\n");
    lab.ok(&["start", &g]);
    let after = lab.all_active_once().await;
    assert_eq!(after["fl-rl-b.service"][0].0, "fl-m3");
    assert_eq!(after["fl-rl-a.service"], before["fl-rl-a.service"], "the running unit was restarted");
    let agent = bus.unit("fleet-agent.service").await.expect("agent");
    assert_eq!((agent.active_state.as_str(), agent.main_pid), ("active", agent_pid), "the agent restarted");
    let log =
        std::fs::read_to_string(fleet_integration::lab_dir().join(format!("{}.log", engine.name))).expect("engine log");
    assert!(log.contains("Reloading configuration"), "engine did not log the reload");
    assert!(fleet_integration::process::alive(engine.pid), "engine died on SIGHUP");
    let (ok, _, e) = fleetctl(&lab.state, &engine.api_url, &["list-units"])
        .map(|o| {
            let (a, b) = text(&o);
            (o.status.success(), a, b)
        })
        .expect("fleetctl");
    assert!(ok, "engine stopped serving after SIGHUP: {e}");
    std::fs::write(&config, &original).expect("restore config");
    let () = manager
        .call("KillUnit", &("fleet-agent.service", "main", nix::sys::signal::Signal::SIGHUP as i32))
        .await
        .expect("SIGHUP agent");
    wait_for("fl-m3's metadata back as it was", T, || async {
        let out = lab.ok(&["list-machines", "--no-legend", "--full", "--fields", "machine,metadata"]);
        out.lines().any(|l| l.starts_with(&m3.machine_id) && !l.contains("rack=r9")).then_some(())
    })
    .await
    .expect("metadata restored");
}

/// Reference scenario 39: stopping the agent while etcd is unreachable is a clean stop (no hang
/// in a reconnect loop, no failure), and its units keep running.
#[tokio::test]
async fn fault_agent_stops_cleanly_while_etcd_is_unreachable() {
    let Some(mut lab) = fault_lab("fault-stop-cut").await else { return };
    let f = lab.file("fl-sc.service", "MachineMetadata=hostname=fl-m4\n");
    lab.ok(&["start", &f]);
    let before = lab.all_active_once().await;
    let m4 = lab.machine("fl-m4");
    let heal = Cut::new(&lab.state, "fl-m4");
    // Long enough for the agent to be in its reconnect and lease-doubt loops.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let conn = zbus::connection::Builder::address(m4.bus_address().as_str()).expect("addr").build().await.expect("bus");
    let manager = zbus::Proxy::new(
        &conn,
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
    )
    .await
    .expect("manager");
    let started = Instant::now();
    let _: zbus::zvariant::OwnedObjectPath =
        manager.call("StopUnit", &("fleet-agent.service", "replace")).await.expect("stop agent");
    let bus = MachineBus::connect(&m4).await.expect("bus");
    wait_for("agent stopped", T, || async {
        bus.unit("fleet-agent.service").await.ok().filter(|p| p.active_state == "inactive")
    })
    .await
    .expect("agent stops");
    assert!(started.elapsed() < Duration::from_secs(9), "the stop ran into systemd's timeout");
    let path: zbus::zvariant::OwnedObjectPath = manager.call("GetUnit", &("fleet-agent.service",)).await.expect("unit");
    let service = zbus::Proxy::new(&conn, "org.freedesktop.systemd1", path, "org.freedesktop.systemd1.Service")
        .await
        .expect("service");
    let result: String = service.get_property("Result").await.expect("Result");
    assert_eq!(result, "success");
    let unit = bus.unit("fl-sc.service").await.expect("unit");
    assert_eq!((unit.active_state.as_str(), unit.main_pid), ("active", before["fl-sc.service"][0].1));
    drop(heal);
    faults::start(&mut lab.state, Kind::Agent, "fl-m4", &unit_template()).await.expect("start agent");
    // The lease expired meanwhile, so the pinned unit may have been restarted; it must run again.
    let after = lab.all_active_once().await;
    assert_eq!(after["fl-sc.service"][0].0, "fl-m4");
}

/// Regression (original #1025, #1091): `fleetctl start` on a launched unit that has failed did
/// nothing, since its desired state did not change. It now runs it again, as `systemctl start`.
#[tokio::test]
async fn fault_start_runs_a_failed_unit_again() {
    let Some(mut lab) = fault_lab("fault-start-failed").await else { return };
    let marker = format!("/run/fl-sf-{}", std::process::id());
    let path = lab.dir.join("fl-sf.service");
    std::fs::write(
        &path,
        format!(
            "[Service]\nExecStart=/bin/sh -c 'test -e {marker} || {{ touch {marker}; exit 3; }}; exec sleep infinity'\n\n[X-Fleet]\nMachineMetadata=hostname=fl-m2\n"
        ),
    )
    .expect("write");
    lab.units.push("fl-sf.service".into());
    let f = path.display().to_string();
    lab.ok(&["start", "--no-block", &f]);
    let bus = MachineBus::connect(&lab.machine("fl-m2")).await.expect("bus");
    wait_for("the first run to fail", T, || async {
        bus.unit("fl-sf.service").await.ok().filter(|p| p.active_state == "failed")
    })
    .await
    .expect("unit failed");
    // fleetctl knows what the API knows: wait until the agent's report of the failure is there.
    let http = testkit::http();
    let url = format!("{}/fleet/v1/state/fl-sf.service", lab.api());
    wait_for("the API to report the failure", T, || async {
        let v: serde_json::Value = http.get(&url).send().await.ok()?.json().await.ok()?;
        (v["systemdActiveState"] == "failed").then_some(())
    })
    .await
    .expect("failure reported");
    let (ok, out, err) = lab.ctl(&["start", &f]);
    assert!(ok, "start of a failed unit: {out}\n{err}");
    assert!(err.contains("has failed; starting it again"), "{err}");
    let p = bus.unit("fl-sf.service").await.expect("unit");
    assert_eq!((p.active_state.as_str(), p.sub_state.as_str()), ("active", "running"));
}
