//! What an operator watching the cluster is told: `fleetctl events --follow` over a window.

use super::SimConfig;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use tokio::io::AsyncBufReadExt;

/// Events counted by kind.
pub type Told = BTreeMap<String, usize>;

/// `fleetctl -o json events --follow --since REVISION` through each engine's API, started at a
/// window's beginning and stopped at its end: the events the cluster told its users about what
/// was written after etcd's `revision`, counted by kind. An idle cluster tells nothing; an engine
/// that relisted its view tells a `gap`. Each engine is watched (the API replica and the leader):
/// each derives its events from its own view, and relists it on its own.
pub(crate) struct EventWatch {
    watches: Vec<(String, tokio::process::Child, tokio::task::JoinHandle<Result<Told>>)>,
}

impl EventWatch {
    /// `apis`: the engines' API addresses. From etcd's `revision` on, not from when fleetctl is
    /// connected: an engine whose view trails etcd tells about earlier writes after the window
    /// began, and a fleetctl slow to connect misses nothing after it.
    pub(crate) fn start(cfg: &SimConfig, apis: &[String], token: &str, revision: i64) -> Result<Self> {
        let mut watches = Vec::new();
        for api in apis {
            let mut child = tokio::process::Command::new(cfg.bin_dir.join("fleetctl"))
                .args(["--endpoint", api])
                .args(cfg.fleetctl_tls_args())
                .args(["-o", "json", "events", "--follow", "--since", &revision.to_string()])
                .env("FLEETCTL_TOKEN", token)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("fleetctl events --follow")?;
            let stdout = child.stdout.take().context("fleetctl events --follow: no stdout")?;
            let read = tokio::spawn(async move {
                let mut kinds = Told::new();
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Some(line) = lines.next_line().await.context("reading fleetctl events --follow")? {
                    let kind = serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|e| e["kind"].as_str().map(str::to_string))
                        .unwrap_or_else(|| format!("unreadable: {line}"));
                    *kinds.entry(kind).or_default() += 1;
                }
                Ok(kinds)
            });
            watches.push((api.clone(), child, read));
        }
        Ok(Self { watches })
    }

    /// Stops fleetctl; what it printed, by kind, over every engine. An error if one ended by
    /// itself (refused, or its engine unreachable: it would count nothing and prove nothing;
    /// its own error is in the simulation's log).
    pub(crate) async fn stop(self) -> Result<Told> {
        let mut told = Told::new();
        for (api, mut child, read) in self.watches {
            if let Some(status) = child.try_wait().context("fleetctl events --follow")? {
                bail!("fleetctl events --follow through {api} ended during the window: {status}");
            }
            child.kill().await.context("stopping fleetctl events --follow")?;
            for (kind, n) in read.await.context("reading fleetctl events --follow")?? {
                *told.entry(kind).or_default() += n;
            }
        }
        Ok(told)
    }
}

/// Runs `window`, watching `apis` over it when the engines keep events (`event_history = 0`
/// switches them off: nothing to watch): its output, and what they told or `None` when that
/// could not be watched. A failed watch does not cost the run's other figures (it is logged);
/// the smoke tests require the answer.
pub(crate) async fn told_over<T>(
    cfg: &SimConfig,
    apis: &[String],
    token: &str,
    revision: i64,
    window: impl std::future::Future<Output = T>,
) -> (T, Option<Told>) {
    if cfg.event_history == Some(0) {
        return (window.await, None);
    }
    let watch = EventWatch::start(cfg, apis, token, revision);
    let out = window.await;
    match async { watch?.stop().await }.await {
        Ok(told) => (out, Some(told)),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "the idle window's events could not be watched");
            (out, None)
        }
    }
}
