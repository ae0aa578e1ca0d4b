//! Runs one scale simulation (see `fleet_integration::sim`) and prints its report as JSON.

use anyhow::Context;
use clap::Parser;
use fleet_integration::sim::{engine_alone, run, SimConfig, Submission};
use std::path::PathBuf;

/// mimalloc, as the engine: ten thousand agents' small, short-lived allocations took 9% of the
/// host's CPU samples in glibc's allocator (`perf`, a million units).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Thousands of simulated machines (real agent code, in-memory systemd) against a real etcd and
/// a real fleet-engine. For benchmarks only: `./lab bench` drives it.
#[derive(Parser, Debug)]
#[command(name = "fleet-sim")]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:12379")]
    etcd_endpoints: Vec<String>,
    #[arg(long, default_value = "/fleet-sim")]
    prefix: String,
    #[arg(long, default_value_t = 1000)]
    machines: usize,
    #[arg(long, default_value_t = 10_000)]
    units: usize,
    #[arg(long, default_value_t = 10)]
    lease_ttl_secs: i64,
    #[arg(long, default_value_t = 5)]
    election_ttl_secs: i64,
    /// Directory holding fleet-engine and fleetctl (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 12570)]
    api_port: u16,
    /// Also measure idle cost, machine loss and leader loss.
    #[arg(long)]
    faults: bool,
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// The engine alone: machines registered but no agents; measures placement and list-units.
    #[arg(long)]
    engine_alone: bool,
    /// With --engine-alone: submit by `fleetctl start --names-from` rather than the API.
    #[arg(long, requires = "engine_alone")]
    submit_with_fleetctl: bool,
    /// The engines' `event_history`; 0 switches events off (to measure what they cost).
    #[arg(long)]
    event_history: Option<usize>,
    /// The engines record no metrics (`metrics = false`; to measure what they cost).
    #[arg(long)]
    no_metrics: bool,
    /// Against the running lab's etcd (TLS, client certificates, auth: as `./lab bench`'s secure
    /// rows) instead of `--etcd-endpoints`.
    #[arg(long, conflicts_with = "etcd_endpoints")]
    lab_etcd: bool,
    /// For `https://` endpoints: a directory holding `ca.pem` and the client identity
    /// `root.pem`/`root.key` (as `./lab bench` makes for its own secure etcd); the engines then
    /// serve the API over TLS with `engine.pem`/`engine.key` from it.
    #[arg(long, conflicts_with = "lab_etcd")]
    etcd_identity: Option<PathBuf>,
    /// Submit the whole cluster's units by `fleetctl start --names-from` (without: the API).
    #[arg(long)]
    fleetctl: bool,
    /// Start the leader before the whole cluster's units are submitted, as in a user's cluster
    /// (without: once they are all stored).
    #[arg(long)]
    leader_first: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let bin_dir = match a.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?.parent().context("binary directory")?.to_path_buf(),
    };
    let (etcd_tls, etcd_endpoints) = if a.lab_etcd {
        let lab = fleet_integration::LabState::load()?.context("--lab-etcd: the lab is not up (./lab up)")?;
        (Some(fleet_integration::pki::identity("root")), lab.etcd_endpoints())
    } else if let Some(dir) = &a.etcd_identity {
        (Some(fleet_integration::pki::identity_in(dir, "root")), a.etcd_endpoints)
    } else {
        (None, a.etcd_endpoints)
    };
    let cfg = SimConfig {
        etcd_tls,
        etcd_endpoints,
        prefix: a.prefix,
        machines: a.machines,
        units: a.units,
        lease_ttl_secs: a.lease_ttl_secs,
        election_ttl_secs: a.election_ttl_secs,
        bin_dir,
        api_port: a.api_port,
        faults: a.faults,
        idle_secs: a.idle_secs,
        event_history: a.event_history,
        metrics: !a.no_metrics,
        api_tls: a.etcd_identity.as_ref().map(|dir| fleet_integration::pki::identity_in(dir, "engine")),
        submission: if a.fleetctl { Submission::Fleetctl } else { Submission::Api },
        leader_first: a.leader_first,
    };
    let rt = fleet_integration::sim::runtime(None)?;
    if a.engine_alone {
        let submission = if a.submit_with_fleetctl { Submission::Fleetctl } else { Submission::Api };
        let report = rt.block_on(engine_alone(cfg, submission))?;
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let report = rt.block_on(run(cfg))?;
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
