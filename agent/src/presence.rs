//! The machine's presence in etcd: one lease that carries the machine record and every unit
//! state this agent publishes, kept alive for as long as the agent runs.
//!
//! The lease id is saved under the state directory so a restarted agent takes over the same
//! lease: nothing it published disappears and no unit is rescheduled because of the restart.

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use fleet_model::schema::encode;
use fleet_model::{Keys, MachineRecord};
use fleet_store::etcd::{is_transient, Client};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What the agent tells presence once it has cleaned up after losing its lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// Bumped at each clean-up.
    pub generation: u64,
    /// Exclusive units it stopped while the lease was in doubt.
    pub stopped: Vec<String>,
}

pub struct Presence {
    /// Bumped by the agent once it has stopped every unit no longer scheduled to it; a machine
    /// that lost its lease registers again only after that, so duplicates end before it rejoins.
    pub cleaned: watch::Receiver<Cleaned>,
    pub client: Client,
    pub keys: Keys,
    /// The record to publish; a configuration reload replaces it.
    pub record: watch::Receiver<MachineRecord>,
    pub ttl: i64,
    pub lease_file: PathBuf,
    /// Written (with the lease id) while the machine is registered, removed when the lease is
    /// lost: the image's health check blesses a boot only once the machine is back in the cluster.
    pub registered_file: Option<PathBuf>,
    /// Lease renewals and etcd's last answer are counted here (the daemon's; none in benchmarks).
    pub metrics: Option<std::sync::Arc<crate::metrics::AgentMetrics>>,
}

impl Presence {
    /// Registers and keeps the lease alive; publishes the current lease (or `None` while lost)
    /// on `lease_tx`. Runs until `lease_tx` has no receivers.
    pub async fn run(mut self, lease_tx: watch::Sender<Option<i64>>) {
        let mut backoff = Duration::from_millis(200);
        // Told in the next registration's record: the units stopped while cut off.
        let mut stopped = Vec::new();
        loop {
            if lease_tx.is_closed() {
                return;
            }
            match self.register(&stopped).await {
                Ok(lease) => {
                    backoff = Duration::from_millis(200);
                    tracing::info!(machine = %self.id(), lease = format!("{lease:x}"), "registered");
                    lease_tx.send_replace(Some(lease));
                    self.mark_registered(Some(lease)).await;
                    stopped.clear();
                    // The clean-up to wait for is one the agent finishes after it was told the
                    // lease is lost (or in doubt): one it finished earlier, after a doubt the
                    // lease recovered from, holds neither this loss's stops nor its relisting.
                    let doubted = self.keep_alive(lease, &lease_tx).await;
                    let before = doubted.unwrap_or_else(|| self.cleaned.borrow().generation);
                    lease_tx.send_replace(None);
                    self.mark_registered(None).await;
                    tracing::warn!(machine = %self.id(), "lease lost; stopping units no longer scheduled here before registering again");
                    let cleaned =
                        tokio::time::timeout(Duration::from_secs(60), self.cleaned.wait_for(|c| c.generation > before))
                            .await;
                    match cleaned {
                        Ok(Ok(c)) => stopped = c.stopped.clone(),
                        _ => tracing::warn!("the agent did not finish its clean-up within 60 s; registering anyway"),
                    }
                }
                Err(e) => {
                    tracing::warn!(machine = %self.id(), error = %e, "cannot register");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(self.ttl.max(2) as u64));
                }
            }
        }
    }

    async fn mark_registered(&self, lease: Option<i64>) {
        let Some(path) = &self.registered_file else { return };
        let done = match lease {
            Some(lease) => tokio::fs::write(path, format!("{} {lease:x}\n", self.id())).await,
            None => match tokio::fs::remove_file(path).await {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        if let Err(e) = done {
            tracing::warn!(path = %path.display(), error = %e, "cannot record whether this machine is registered");
        }
    }

    fn id(&self) -> String {
        self.record.borrow().id.clone()
    }

    async fn saved_lease(&self) -> Option<i64> {
        let text = tokio::fs::read_to_string(&self.lease_file).await.ok()?;
        let id = i64::from_str_radix(text.trim(), 16).ok()?;
        let mut lc = self.client.lease_client();
        let ttl = lc.time_to_live(id, None).await.ok()?.ttl();
        (ttl > 0).then_some(id)
    }

    async fn register(&self, stopped_while_cut_off: &[String]) -> Result<i64, RegisterError> {
        let lease = match self.saved_lease().await {
            Some(l) => l,
            None => self.client.lease_client().grant(self.ttl, None).await?.id(),
        };
        if let Err(e) = tokio::fs::write(&self.lease_file, format!("{lease:x}\n")).await {
            tracing::warn!(path = %self.lease_file.display(), error = %e, "cannot save lease id; a restart will re-register");
        }
        let mut record = self.record.borrow().clone();
        record.stopped_while_cut_off = stopped_while_cut_off.to_vec();
        let key = self.keys.machine(&record.id);
        let value = encode(&record).map_err(|e| RegisterError::Encode(e.to_string()))?;
        // Create, or take over our own earlier record: never overwrite a live foreign one, which
        // would mean two machines share this machine id.
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::txn(
                Txn::new().when([Compare::lease(key.clone(), CompareOp::Equal, lease)]).and_then([TxnOp::put(
                    key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )]),
            )]);
        let resp = self.client.kv_client().txn(txn).await?;
        let nested_ok =
            resp.op_responses().iter().any(|r| matches!(r, etcd_client::TxnOpResponse::Txn(t) if t.succeeded()));
        if resp.succeeded() || nested_ok {
            Ok(lease)
        } else {
            Err(RegisterError::Clash(record.id))
        }
    }

    /// Returns when the lease is gone. While renewals fail for longer than the TTL the lease is
    /// in doubt: `None` is published (the agent stops its exclusive units), and the lease again
    /// once a renewal succeeds.
    /// Keeps `lease` alive until etcd says it is gone. Returns the agent's clean-up generation
    /// as it was when the agent was last told the lease is in doubt, if it still is.
    async fn keep_alive(&self, lease: i64, lease_tx: &watch::Sender<Option<i64>>) -> Option<u64> {
        let ttl = Duration::from_secs(self.ttl as u64);
        let period = ttl / 3;
        let mut last_ok = Instant::now();
        // Reopening a keepalive after a failure backs off (with jitter): when etcd is overloaded
        // or back from an outage, thousands of agents retrying every half second in step would
        // keep it down.
        let mut retry = Duration::from_millis(250);
        let max_retry = (period / 2).max(Duration::from_millis(500));
        // The generation at the last doubt; `NOT_IN_DOUBT` once renewed (an atomic: the closure
        // below is held across awaits of a task that may move between threads).
        const NOT_IN_DOUBT: u64 = u64::MAX;
        let doubted = std::sync::atomic::AtomicU64::new(NOT_IN_DOUBT);
        let in_doubt = |d: &std::sync::atomic::AtomicU64| {
            let g = d.load(std::sync::atomic::Ordering::Relaxed);
            (g != NOT_IN_DOUBT).then_some(g)
        };
        let doubt = |last_ok: Instant| {
            if last_ok.elapsed() > ttl && lease_tx.borrow().is_some() {
                tracing::warn!(lease = format!("{lease:x}"), "lease not renewed for its TTL; it is in doubt");
                doubted.store(self.cleaned.borrow().generation, std::sync::atomic::Ordering::Relaxed);
                lease_tx.send_replace(None);
            }
        };
        loop {
            let mut lc = self.client.lease_client();
            let stream = tokio::time::timeout(period, lc.keep_alive(lease)).await;
            let (mut keeper, mut responses) = match stream {
                Ok(Ok(s)) => s,
                other => {
                    let err = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    tracing::warn!(error = %err, "cannot open lease keepalive");
                    if let Some(m) = &self.metrics {
                        m.renewal(false);
                    }
                    doubt(last_ok);
                    if last_ok.elapsed() > ttl && !self.lease_alive(lease).await {
                        return in_doubt(&doubted);
                    }
                    tokio::time::sleep(jittered(retry)).await;
                    retry = (retry * 2).min(max_retry);
                    continue;
                }
            };
            loop {
                let beat = async {
                    keeper.keep_alive().await?;
                    responses.message().await
                };
                match tokio::time::timeout(period, beat).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {
                        last_ok = Instant::now();
                        if let Some(m) = &self.metrics {
                            m.renewal(true);
                        }
                        retry = Duration::from_millis(250);
                        if lease_tx.borrow().is_none() {
                            tracing::info!("lease renewed again");
                            doubted.store(NOT_IN_DOUBT, std::sync::atomic::Ordering::Relaxed);
                            lease_tx.send_replace(Some(lease));
                        }
                    }
                    Ok(Ok(Some(_))) => return in_doubt(&doubted),
                    other => {
                        let err = match other {
                            Ok(Err(e)) => e.to_string(),
                            Ok(Ok(None)) => "stream ended".into(),
                            _ => "timed out".into(),
                        };
                        tracing::warn!(error = %err, "lease keepalive failed");
                        if let Some(m) = &self.metrics {
                            m.renewal(false);
                        }
                        doubt(last_ok);
                        break;
                    }
                }
                tokio::time::sleep(period).await;
            }
            doubt(last_ok);
            if last_ok.elapsed() > ttl && !self.lease_alive(lease).await {
                return in_doubt(&doubted);
            }
            tokio::time::sleep(jittered(retry)).await;
            retry = (retry * 2).min(max_retry);
        }
    }

    async fn lease_alive(&self, lease: i64) -> bool {
        let mut lc = self.client.lease_client();
        match tokio::time::timeout(Duration::from_secs(3), lc.time_to_live(lease, None)).await {
            Ok(Ok(r)) => r.ttl() > 0,
            // etcd unreachable: we cannot know, and etcd extends leases after an outage, so keep
            // going rather than dropping every state we published.
            Ok(Err(e)) if is_transient(&e) => true,
            Err(_) => true,
            Ok(Err(_)) => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("cannot encode machine record: {0}")]
    Encode(String),
    #[error("machine id {0} is already registered by another live agent (two machines share /etc/machine-id?); waiting for that registration to expire")]
    Clash(String),
}

/// `d` scaled by a factor in [0.5, 1.5), so agents that failed together do not retry together.
fn jittered(d: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0);
    let mut x = u64::from(nanos) ^ (std::process::id() as u64).rotate_left(32) ^ (&d as *const Duration as u64);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    d.mul_f64(0.5 + (x % 1000) as f64 / 1000.0)
}
