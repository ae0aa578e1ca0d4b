//! The agent against a real systemd machine. The test plays the engine: it writes schedule
//! entries straight into etcd and checks what systemd (over the machine's bus) and etcd show.

use etcd_client::GetOptions;
use fleet_integration::testkit::{self, wait_for, MachineBus};
use fleet_integration::{boot_machine, machine_id_for, stop_machine, MachineSpec};
use fleet_model::schema::{decode, encode};
use fleet_model::{DesiredState, Keys, ScheduleEntry, UnitFile, UnitName, UnitStateRecord};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

struct Machine(fleet_integration::MachineProc);
impl Drop for Machine {
    fn drop(&mut self) {
        stop_machine(&self.0, Duration::from_secs(10));
    }
}

async fn state_of(
    etcd: &mut etcd_client::Client,
    keys: &Keys,
    machine: &str,
    unit: &UnitName,
) -> Option<UnitStateRecord> {
    let opts = GetOptions::new().with_prefix();
    let resp = etcd.get(keys.states_of(machine), Some(opts)).await.ok()?;
    resp.kvs().iter().find_map(|kv| {
        let page: fleet_model::StatePage = decode(kv.value()).ok()?;
        page.get(unit.as_str()).cloned()
    })
}

#[tokio::test]
async fn agent_runs_its_schedule_and_adopts_units_after_restart() -> anyhow::Result<()> {
    let Some(lab) = testkit::lab() else {
        return Ok(());
    };
    let prefix = testkit::unique_prefix("agent");
    let keys = Keys::new(&prefix);
    let generation = std::process::id();
    let spec = MachineSpec {
        name: "fl-t1".into(),
        ip: "10.231.90.201".into(),
        machine_id: machine_id_for("fl-t1", generation),
        metadata: vec![("role".into(), "test".into())],
        etcd_prefix: prefix.clone(),
        lease_ttl_secs: 5,
        capacity: (String::new(), String::new()),
        image: None,
        joining: false,
        provisioned: false,
        etcd_endpoints: lab
            .etcd
            .iter()
            .map(|e| {
                format!(
                    "https://{}:{}",
                    fleet_integration::HOST_IP,
                    e.client_port.max(fleet_integration::ETCD_CLIENT_PORT)
                )
            })
            .collect(),
    };
    let unit_text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../agent/fleet-agent.service"))?;
    let machine = Machine(boot_machine(&spec, &lab.bin_dir, &unit_text).await?);
    let id = machine.0.machine_id.clone();
    let mut etcd = testkit::etcd(&lab).await?;

    // Registration: the machine record appears, on a lease.
    let rec = wait_for("machine registration", T, || {
        let mut etcd = etcd.clone();
        let key = keys.machine(&id);
        async move { etcd.get(key, None).await.ok()?.kvs().first().map(|kv| (kv.lease(), kv.value().to_vec())) }
    })
    .await?;
    assert_ne!(rec.0, 0, "machine record must be on a lease");
    let machine_rec: fleet_model::MachineRecord = decode(&rec.1)?;
    assert_eq!(machine_rec.public_ip, "10.231.90.201");
    assert_eq!(machine_rec.metadata.get("role").map(String::as_str), Some("test"));

    // Schedule one unit launched and one loaded.
    let web = UnitName::parse("agent-web.service")?;
    let idle = UnitName::parse("agent-idle.service")?;
    let file = UnitFile::parse("[Unit]\nDescription=agent test\n\n[Service]\nExecStart=/bin/sleep infinity\n")?;
    let hash = file.hash();
    etcd.put(keys.body(&hash), file.canonical(), None).await?;
    let entry = |s| ScheduleEntry { hash: hash.as_str().into(), desired_state: s };
    etcd.put(keys.schedule(&id, &web), encode(&entry(DesiredState::Launched))?, None).await?;
    etcd.put(keys.schedule(&id, &idle), encode(&entry(DesiredState::Loaded))?, None).await?;

    let bus = MachineBus::connect(&machine.0).await?;
    let running = wait_for("agent-web active", T, || async {
        bus.unit(web.as_str()).await.ok().filter(|p| p.active_state == "active")
    })
    .await?;
    assert!(running.main_pid > 0);
    // The loaded unit is linked in the same pass, not necessarily before the other one starts.
    let idle_props = wait_for("agent-idle loaded", T, || async {
        bus.unit(idle.as_str()).await.ok().filter(|p| p.load_state != "not-found")
    })
    .await?;
    assert_eq!((idle_props.load_state.as_str(), idle_props.active_state.as_str()), ("loaded", "inactive"));

    // States are published on the agent's lease.
    let st = wait_for("published state of agent-web", T, || {
        let mut etcd = etcd.clone();
        let keys = keys.clone();
        let id = id.clone();
        let web = web.clone();
        async move { state_of(&mut etcd, &keys, &id, &web).await.filter(|s| s.active_state == "active") }
    })
    .await?;
    assert_eq!(
        (st.load_state.as_str(), st.sub_state.as_str(), st.applied, st.hash.as_str()),
        ("loaded", "running", DesiredState::Launched, hash.as_str())
    );
    let lease_of_state = etcd.get(keys.state_page(&id, 0), None).await?.kvs().first().map(|kv| kv.lease());
    assert_eq!(lease_of_state, Some(rec.0), "states share the machine's one lease");

    // Restart the agent: the unit keeps running with the same MainPID, the lease is kept.
    let agent_before = bus.unit("fleet-agent.service").await?.main_pid;
    bus.restart("fleet-agent.service").await?;
    wait_for("agent restarted", T, || async {
        bus.unit("fleet-agent.service")
            .await
            .ok()
            .filter(|p| p.active_state == "active" && p.main_pid != agent_before && p.main_pid != 0)
    })
    .await?;
    // While the new agent reconciles it must not touch the running unit: sampled for 2 s.
    let samples = testkit::holds_for(Duration::from_secs(2), || async {
        let now = bus.unit(web.as_str()).await.map_err(|e| e.to_string())?;
        match (now.active_state.as_str(), now.main_pid) {
            ("active", pid) if pid == running.main_pid => Ok(()),
            other => Err(format!("unit was restarted by the agent restart: {other:?}")),
        }
    })
    .await
    .map_err(anyhow::Error::msg)?;
    assert!(samples >= 5, "only {samples} samples");
    let lease_after = etcd.get(keys.machine(&id), None).await?.kvs().first().map(|kv| kv.lease());
    assert_eq!(lease_after, Some(rec.0), "restarted agent took over its lease");

    // Launched -> loaded stops the unit; its state says so.
    etcd.put(keys.schedule(&id, &web), encode(&entry(DesiredState::Loaded))?, None).await?;
    wait_for("agent-web stopped", T, || async {
        bus.unit(web.as_str()).await.ok().filter(|p| p.active_state == "inactive")
    })
    .await?;
    wait_for("published inactive state", T, || {
        let mut etcd = etcd.clone();
        let (keys, id, web) = (keys.clone(), id.clone(), web.clone());
        async move {
            state_of(&mut etcd, &keys, &id, &web)
                .await
                .filter(|s| s.active_state == "inactive" && s.applied == DesiredState::Loaded)
        }
    })
    .await?;

    // Unscheduled: unloaded from systemd and its state deleted.
    etcd.delete(keys.schedule(&id, &web), None).await?;
    etcd.delete(keys.schedule(&id, &idle), None).await?;
    for u in [&web, &idle] {
        wait_for(&format!("{u} unloaded"), T, || async {
            bus.unit(u.as_str()).await.ok().filter(|p| p.load_state == "not-found")
        })
        .await?;
    }
    wait_for("states deleted", T, || {
        let mut etcd = etcd.clone();
        let prefix = keys.states_of(&id);
        async move {
            etcd.get(prefix, Some(GetOptions::new().with_prefix().with_count_only()))
                .await
                .ok()
                .filter(|r| r.count() == 0)
        }
    })
    .await?;

    // Clean up this test's keys (the machine record goes with the lease when the machine stops).
    drop(bus);
    drop(machine);
    etcd.delete(prefix.as_str(), Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    Ok(())
}
