//! A simulation run as a `fleet-sim` process of its own (the million-unit bench's way, and the
//! engine alone's smoke test, which checks that way end to end).

use super::SimConfig;
use anyhow::{bail, Context, Result};

/// Which simulation a `fleet-sim` child runs.
#[derive(Clone, Copy, Debug)]
pub enum Simulation {
    /// `--engine-alone`, its units submitted this way.
    EngineAlone(super::Submission),
    /// The whole cluster, submitted as `cfg.submission` says.
    Cluster,
}

/// Runs one simulation in a `fleet-sim` process of its own (from `cfg.bin_dir`), as it is run by
/// hand, and reads its report from the child's output. In one process the third of three
/// million-unit simulations was consistently slower than the same run by hand (machines up in
/// 36-40 s against 22-28 s): each now starts from a fresh process, and what one leaves behind
/// (memory, threads, tasks still winding down) cannot weigh on the next.
pub async fn in_child<R: serde::de::DeserializeOwned>(cfg: &SimConfig, what: Simulation) -> Result<R> {
    let mut cmd = command(cfg, what)?;
    // Its log goes where the bench's goes; its report (JSON) comes on stdout. (Not `output()`:
    // tokio's captures stderr too, whatever was set.)
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", cfg.bin_dir.join("fleet-sim").display()))?;
    let out = child.wait_with_output().await.context("fleet-sim's report")?;
    if !out.status.success() {
        bail!("fleet-sim exited with {} (its log above says why)", out.status);
    }
    serde_json::from_slice(&out.stdout).context("fleet-sim's report")
}

/// The `fleet-sim` command line that runs `what` as `cfg` says.
fn command(cfg: &SimConfig, what: Simulation) -> Result<tokio::process::Command> {
    let mut cmd = tokio::process::Command::new(cfg.bin_dir.join("fleet-sim"));
    cmd.arg("--etcd-endpoints")
        .arg(cfg.etcd_endpoints.join(","))
        .args(["--prefix", &cfg.prefix])
        .args(["--machines", &cfg.machines.to_string(), "--units", &cfg.units.to_string()])
        .args(["--lease-ttl-secs", &cfg.lease_ttl_secs.to_string()])
        .args(["--election-ttl-secs", &cfg.election_ttl_secs.to_string()])
        .arg("--bin-dir")
        .arg(&cfg.bin_dir)
        .args(["--api-port", &cfg.api_port.to_string(), "--idle-secs", &cfg.idle_secs.to_string()]);
    // fleet-sim takes both identities from one directory laid out as the lab's: `root` for etcd,
    // `engine` for serving the API (the bench's own PKI and the lab's are).
    match (&cfg.etcd_tls, &cfg.api_tls) {
        (Some(etcd), Some(api)) => {
            let dir = etcd.ca_file.parent().context("the etcd identity's directory")?;
            if *etcd != crate::pki::identity_in(dir, "root") || *api != crate::pki::identity_in(dir, "engine") {
                bail!("fleet-sim takes the identities root (etcd) and engine (the API) from {}", dir.display());
            }
            cmd.arg("--etcd-identity").arg(dir);
        }
        (None, None) => {}
        _ => bail!("fleet-sim runs etcd and the API both over TLS or both without"),
    }
    if let Some(n) = cfg.event_history {
        cmd.args(["--event-history", &n.to_string()]);
    }
    if !cfg.metrics {
        cmd.arg("--no-metrics");
    }
    match what {
        Simulation::EngineAlone(submission) => {
            cmd.arg("--engine-alone");
            if matches!(submission, super::Submission::Fleetctl) {
                cmd.arg("--submit-with-fleetctl");
            }
        }
        Simulation::Cluster => {
            if cfg.faults {
                cmd.arg("--faults");
            }
            if matches!(cfg.submission, super::Submission::Fleetctl) {
                cmd.arg("--fleetctl");
            }
            if cfg.leader_first {
                cmd.arg("--leader-first");
            }
        }
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::Submission;

    /// Every setting of a whole cluster reaches the child: one that did not (the leader started
    /// before the submission) made a bench run measure what its configuration did not say.
    #[test]
    fn a_child_is_told_every_setting_of_its_cluster() {
        let cfg = SimConfig {
            etcd_endpoints: vec!["http://127.0.0.1:1".into()],
            etcd_tls: None,
            prefix: "/p/".into(),
            machines: 3,
            units: 7,
            lease_ttl_secs: 11,
            election_ttl_secs: 4,
            bin_dir: "/bin-dir".into(),
            api_port: 1234,
            faults: true,
            idle_secs: 9,
            event_history: Some(0),
            metrics: false,
            api_tls: None,
            submission: Submission::Fleetctl,
            leader_first: true,
        };
        let cmd = command(&cfg, Simulation::Cluster).expect("command");
        let args: Vec<String> = cmd.as_std().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let line = args.join(" ");
        for expected in [
            "--prefix /p/",
            "--machines 3 --units 7",
            "--lease-ttl-secs 11",
            "--election-ttl-secs 4",
            "--api-port 1234",
            "--idle-secs 9",
            "--event-history 0",
            "--no-metrics",
            "--faults",
            "--fleetctl",
            "--leader-first",
        ] {
            assert!(line.contains(expected), "{expected:?} missing from {line}");
        }
        let plain = SimConfig { leader_first: false, submission: Submission::Api, faults: false, ..cfg };
        let cmd = command(&plain, Simulation::Cluster).expect("command");
        let line: Vec<String> = cmd.as_std().get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(!line.iter().any(|a| a == "--leader-first" || a == "--fleetctl" || a == "--faults"), "{line:?}");
    }
}
