//! What an operator watching the cluster is told: `fleetctl events --follow` over a window.

use super::SimConfig;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

/// `fleetctl -o json events --follow -n 0` through the API at `api`, started before a window and
/// stopped after it: the events the cluster told its users in between, counted by kind. An idle
/// cluster tells nothing; an engine that relisted its view would tell a `gap`.
pub(crate) struct EventWatch {
    child: tokio::process::Child,
    read: tokio::task::JoinHandle<BTreeMap<String, usize>>,
}

impl EventWatch {
    pub(crate) async fn start(cfg: &SimConfig, api: &str, token: &str) -> Result<Self> {
        let mut child = tokio::process::Command::new(cfg.bin_dir.join("fleetctl"))
            .args(["--endpoint", api])
            .args(cfg.fleetctl_tls_args())
            .args(["-o", "json", "events", "--follow", "-n", "0"])
            .env("FLEETCTL_TOKEN", token)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("fleetctl events --follow")?;
        let stdout = child.stdout.take().context("fleetctl events --follow: no stdout")?;
        let read = tokio::spawn(async move {
            let mut kinds = BTreeMap::new();
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let kind = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|e| e["kind"].as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("unreadable: {line}"));
                *kinds.entry(kind).or_default() += 1;
            }
            kinds
        });
        // fleetctl first asks where the event stream stands, then follows it from there: what
        // happened before that is not the window's, so the window starts once it has.
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(status) = child.try_wait().context("fleetctl events --follow")? {
            bail!("fleetctl events --follow ended before the window: {status}");
        }
        Ok(Self { child, read })
    }

    /// Stops fleetctl; what it printed, by kind. An error if it ended by itself (a follower
    /// refused or lost its API would count nothing and prove nothing).
    pub(crate) async fn stop(mut self) -> Result<BTreeMap<String, usize>> {
        if let Some(status) = self.child.try_wait().context("fleetctl events --follow")? {
            bail!("fleetctl events --follow ended during the window: {status}");
        }
        self.child.kill().await.context("stopping fleetctl events --follow")?;
        self.read.await.context("reading fleetctl events --follow")
    }
}
