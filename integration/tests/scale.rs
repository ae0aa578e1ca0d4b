//! The scale benchmark's small version, as a smoke test: 1,000 simulated machines (real agent
//! code with the in-memory systemd of `fleet-sim`) and 10,000 units against the lab's real etcd
//! and a real engine. It checks convergence and correctness, never time: every unit active on
//! exactly one machine, a lost machine's units active elsewhere, a new leader placing after the
//! old one is killed, nothing written while idle; on the default install's settings (etcd and the
//! API over TLS). `./lab bench` runs the timed, larger sizes.

use fleet_integration::sim::{run, SimConfig};
use fleet_integration::testkit;

/// One simulation at a time, also in a bare `cargo test` (`./lab test` runs one test at a time
/// anyway): side by side on two cores, each slowed the other until the engine alone's leader had
/// not settled when its idle window began, and what an idle window sees (writes, events) must be
/// the idle cluster's.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_machines_ten_thousand_units_converge_and_survive_faults() {
    let Some(state) = testkit::lab() else { return };
    let _alone = ONE_AT_A_TIME.lock().await;
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
        // As the million bench's second cluster: the API over TLS (the lab's engine certificate),
        // the units started by fleetctl while the leader runs.
        api_tls: Some(fleet_integration::pki::identity("engine")),
        submission: fleet_integration::sim::Submission::Fleetctl,
        leader_first: true,
    })
    .await
    .expect("simulation runs");
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    assert_eq!((report.missing, report.duplicates), (0, 0), "{report:?}");
    assert_eq!(report.list_units_rows, 10_000, "list-units shows every unit");
    assert!(report.submitted_by_fleetctl && report.api_tls && report.etcd_tls && report.leader_first, "{report:?}");
    assert!(report.start_more_secs.is_some(), "fleetctl start of 1,000 more units returned");
    assert!(report.machine_lost_secs.is_some() && report.leader_lost_secs.is_some());
    // The standby was seen leading, and not after the unit it placed was active.
    let elected = report.leader_elected_secs.expect("the standby was seen leading");
    assert!(report.leader_lost_secs.is_some_and(|all| elected <= all), "{report:?}");
    assert_eq!(report.idle_writes_per_min, Some(0.0), "an idle cluster wrote to etcd");
    assert_eq!(report.idle_events, Some(Default::default()), "an idle cluster told its users something happened");
    // Each unit: its record, its schedule entry, its state (docs/performance-notes.md); bodies,
    // machine records and the leader's keys are shared and not counted.
    assert!(report.own_keys_per_unit <= 3.0, "{} keys of its own written per unit", report.own_keys_per_unit);
    // At least its record: counted from key versions at the end, as the observer watches only
    // schedules and states (a record uncounted would show as far under one key per unit).
    assert!(report.own_keys_per_unit >= 1.0, "{} keys of its own written per unit", report.own_keys_per_unit);
    // Every machine holds units here (ten each), so at least as many schedule and state writes
    // as machines, each a value of some bytes (per machine: the observer counts totals).
    for (kind, w) in [("schedule", report.schedule_writes), ("state", report.state_writes)] {
        assert!(w.puts >= 1000 && w.bytes > w.puts * 20, "{kind} writes: {w:?}");
    }
}

/// The engine alone as `./lab bench --machines N --units M` measures it at a million units,
/// small and the same way (a `fleet-sim` process of its own, its report read from its output):
/// every unit placed, `list-units` streaming every row (more than fleetctl holds), its first row
/// before its last, etcd's size and the engines' memory read, the idle window taken once the
/// leader settled, nothing written idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_alone_places_lists_and_idles_as_the_million_bench_measures() {
    let Some(state) = testkit::lab() else { return };
    let _alone = ONE_AT_A_TIME.lock().await;
    let report: fleet_integration::sim::EngineReport = fleet_integration::sim::in_child(
        &SimConfig {
            etcd_tls: Some(fleet_integration::pki::identity("root")),
            etcd_endpoints: state.etcd_endpoints(),
            prefix: testkit::unique_prefix("alone-smoke"),
            machines: 500,
            units: 20_000,
            lease_ttl_secs: 3600,
            election_ttl_secs: 5,
            bin_dir: state.bin_dir.clone(),
            api_port: 12580,
            faults: false,
            idle_secs: 10,
            event_history: None,
            metrics: true,
            api_tls: Some(fleet_integration::pki::identity("engine")),
            submission: fleet_integration::sim::Submission::Api,
            leader_first: false,
        },
        fleet_integration::sim::Simulation::EngineAlone(fleet_integration::sim::Submission::Fleetctl),
    )
    .await
    .expect("the engine alone runs");
    eprintln!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    assert_eq!(report.list_units_rows, 20_000, "list-units shows every unit");
    assert!(report.submitted_by_fleetctl, "units named from a file, started by fleetctl");
    assert!(report.api_tls && report.etcd_tls, "the default install's TLS");
    assert!(report.list_units_first_row_secs > 0.0 && report.list_units_first_row_secs <= report.list_units_secs);
    assert!(report.etcd_db_bytes > 0 && report.leader_peak_rss_mib > 0.0 && report.api_peak_rss_mib > 0.0);
    assert_eq!(report.idle_writes_per_min, Some(0.0), "an idle engine wrote to etcd");
    assert_eq!(report.idle_events, Some(Default::default()), "an idle engine told its users something happened");
}
