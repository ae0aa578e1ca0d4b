//! The scale benchmark's small version, as a smoke test: 1,000 simulated machines (real agent
//! code with the in-memory systemd of `fleet-sim`) and 10,000 units against the lab's real etcd
//! and a real engine. It checks convergence and correctness, never time: every unit active on
//! exactly one machine, a lost machine's units active elsewhere, a new leader placing after the
//! old one is killed, nothing written while idle. `./lab bench` runs the timed, larger sizes.

use fleet_integration::sim::{run, SimConfig};
use fleet_integration::testkit;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_machines_ten_thousand_units_converge_and_survive_faults() {
    let Some(state) = testkit::lab() else { return };
    let report = run(SimConfig {
        etcd_tls: Some(fleet_integration::pki::identity("root")),
        etcd_endpoints: state.etcd_endpoints(),
        prefix: testkit::unique_prefix("sim-smoke"),
        machines: 1000,
        units: 10_000,
        lease_ttl_secs: 10,
        election_ttl_secs: 5,
        bin_dir: state.bin_dir.clone(),
        api_port: 12575,
        faults: true,
        idle_secs: 10,
        event_history: None,
        metrics: true,
    })
    .await
    .expect("simulation runs");
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    assert_eq!((report.missing, report.duplicates), (0, 0), "{report:?}");
    assert_eq!(report.list_units_rows, 10_000, "list-units shows every unit");
    assert!(report.machine_lost_secs.is_some() && report.leader_lost_secs.is_some());
    assert_eq!(report.idle_writes_per_min, Some(0.0), "an idle cluster wrote to etcd");
    // Each unit: its record, its schedule entry, its state (docs/performance-notes.md); bodies,
    // machine records and the leader's keys are shared and not counted.
    assert!(report.own_keys_per_unit <= 3.0, "{} keys of its own written per unit", report.own_keys_per_unit);
}
