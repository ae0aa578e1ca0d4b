//! Leadership: campaigning, keeping the election lease, and handing over to the planner
//! (`pass.rs`) while elected.
//!
//! Engines campaign through etcd's election API on their own lease. The leader plans from the
//! shared cluster view and writes decisions in transactions that compare its election key's
//! create revision, so a deposed leader's late writes are refused by etcd itself.

use fleet_store::etcd::{is_transient, Client};
use fleet_store::kv::{CmpOp, Compare, EtcdStore, StoreError};
use fleet_store::retry::RetryPolicy;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

mod fence;
mod pass;
mod schedule_write;

/// How often a campaign that has not returned asks the election who leads.
const CAMPAIGN_CHECK: Duration = Duration::from_secs(5);
pub mod rolling;
pub use fence::{fence_of, fenced_txn, FenceError};
pub(crate) use pass::unix_now;
pub use pass::{Fences, Planner, BULK_ARRIVAL, FENCE_MARGIN, PENDING_STARTS};

/// One attempt at a fenced write.
const FENCED_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderStatus {
    pub engine_id: String,
    pub leader: bool,
    /// Id of the engine currently leading, if known.
    pub leader_id: String,
    /// Units the last pass could not place, with the reason.
    pub unplaceable: std::collections::BTreeMap<String, String>,
    /// How long the last planning pass took, in milliseconds.
    pub last_plan_ms: u64,
    /// Whether a planning pass is under way now, and how many have ended since this engine
    /// started: what a client needs to see that the API answers while one runs.
    pub planning: bool,
    pub passes: u64,
    /// How many of those passes looked at every unit; the others placed new units only.
    pub whole_passes: u64,
    /// How long the last of those whole passes took, in milliseconds.
    pub last_whole_plan_ms: u64,
    /// The revision the leader's planning copy shows. The copy takes in what the view received
    /// when a pass starts and between passes: after a large change (a million states reported
    /// during a pass) it trails `revision` while it catches up, and that is CPU the leader
    /// spends before it is idle. Set while leading only (0 on an engine that has not led).
    pub plan_revision: i64,
}

pub type SharedStatus = Arc<Mutex<LeaderStatus>>;

#[derive(Debug, thiserror::Error)]
enum LeadError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{0}")]
    Store(#[from] StoreError),
    /// An extra guard of a fenced write did not hold (or the fence itself: the next unguarded
    /// write tells); nothing of it was written.
    #[error("guard failed")]
    GuardFailed,
    #[error("lost leadership: {0}")]
    Deposed(String),
}

pub struct Leader {
    /// For the election lease, its keepalive and observing who leads.
    pub client: Client,
    /// A connection without a per-request timeout, for the campaign: a campaign blocks for as long
    /// as another engine leads, and a timeout would make every follower campaign again (two
    /// etcd writes) every few seconds of an idle cluster.
    pub election: Client,
    pub engine_id: String,
    /// Plans and writes once elected; its keys, TTL and status are the leader's.
    pub planner: Planner<EtcdStore>,
}

impl Leader {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // Ready for when this engine is elected, while it is not.
        let ready = self.planner.keep_ready();
        tokio::pin!(ready);
        loop {
            let attempt = async {
                let result = self.campaign_and_lead().await;
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "not leading");
                }
            };
            tokio::select! {
                _ = attempt => {}
                _ = &mut ready => return,
                _ = shutdown.changed() => return,
            }
            self.set_leader(false, String::new());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn set_leader(&self, leader: bool, leader_id: String) {
        self.planner.metrics.set_leader(leader);
        if let Ok(mut s) = self.planner.status.lock() {
            s.leader = leader;
            s.leader_id = leader_id;
        }
    }

    async fn campaign_and_lead(&self) -> Result<(), LeadError> {
        let lease = self.client.lease_client().grant(self.planner.ttl, None).await?.id();
        let result = self.campaign_and_lead_with(lease).await;
        // Resign, whatever ended the attempt: a campaign that failed half-way (its connection
        // broke after etcd made the key) would otherwise leave a key that keeps every engine,
        // this one included, from leading until the lease expires. And when etcd lost its
        // quorum, the new etcd leader renews every lease for a full TTL once it is back, so the
        // revocation keeps being tried in the background (for up to 30 s, until etcd answers)
        // while the next campaign starts.
        let client = self.client.clone();
        tokio::spawn(async move {
            let revoke = RetryPolicy {
                attempts: 40,
                first_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_millis(500),
                timeout: Duration::from_secs(1),
            };
            let revoked = revoke
                .run("revoke the election lease", is_transient, || {
                    let mut lc = client.lease_client();
                    async move { lc.revoke(lease).await }
                })
                .await;
            if let Err(e) = revoked {
                tracing::debug!(error = %e, "election lease not revoked; it expires by itself");
            }
        });
        result
    }

    async fn campaign_and_lead_with(&self, lease: i64) -> Result<(), LeadError> {
        let mut lc = self.client.lease_client();
        let beats = lc.keep_alive(lease).await?;
        let (lost_tx, mut lost_rx) = watch::channel(false);
        let period = Duration::from_millis((self.planner.ttl as u64 * 1000) / 3);
        let ttl = Duration::from_secs(self.planner.ttl as u64);
        let keepalive = tokio::spawn(async move {
            let mut last_ok = tokio::time::Instant::now();
            // A failed renewal ends the gRPC stream (an etcd busy applying answers
            // `Unavailable`); it is reopened, so one busy moment does not cost the leadership.
            let mut stream = Some(beats);
            loop {
                if stream.is_none() {
                    stream = tokio::time::timeout(period, lc.keep_alive(lease)).await.ok().and_then(Result::ok);
                }
                if let Some((keeper, beats)) = stream.as_mut() {
                    let beat = async {
                        keeper.keep_alive().await?;
                        beats.message().await
                    };
                    match tokio::time::timeout(period, beat).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => last_ok = tokio::time::Instant::now(),
                        Ok(Ok(Some(_))) => break,
                        other => {
                            tracing::warn!(?other, "election lease renewal failed; retrying");
                            stream = None;
                        }
                    }
                }
                if last_ok.elapsed() >= ttl {
                    break;
                }
                let pause = if stream.is_some() { period } else { Duration::from_millis(200) };
                tokio::time::sleep(pause.min(ttl.saturating_sub(last_ok.elapsed()))).await;
            }
            let _ = lost_tx.send(true);
        });
        let _guard = AbortOnDrop(keepalive);

        // Watch who leads while we wait, for `ps` and the API.
        let observe = {
            let mut ec = self.client.election_client();
            let name = self.planner.keys.leader();
            let status = self.planner.status.clone();
            tokio::spawn(async move {
                if let Ok(mut stream) = ec.observe(name).await {
                    while let Ok(Some(resp)) = stream.message().await {
                        if let (Some(kv), Ok(mut s)) = (resp.kv(), status.lock()) {
                            s.leader_id = String::from_utf8_lossy(kv.value()).into_owned();
                        }
                    }
                }
            })
        };
        let _observe_guard = AbortOnDrop(observe);

        let mut ec = self.election.election_client();
        let campaign = ec.campaign(self.planner.keys.leader(), self.engine_id.clone(), lease);
        tokio::pin!(campaign);
        // etcd's campaign waits, on the server, for the deletion of every older candidate key;
        // that wait has been seen never to end (a bench run: this engine's key the only one, and
        // the engine idle for ten minutes), and others report the same of etcd's election. So
        // the election is also asked who leads: the key with the oldest create revision, which
        // is exactly what the campaign waits for. Ours: we lead, fenced by that key.
        let mut ask = tokio::time::interval(CAMPAIGN_CHECK);
        ask.tick().await;
        let fence = loop {
            tokio::select! {
                r = &mut campaign => {
                    let won = r?;
                    let Some(leader_key) = won.leader().cloned() else {
                        return Err(LeadError::Deposed("campaign returned no leader key".into()));
                    };
                    break fence_of(&leader_key);
                }
                _ = lost_rx.changed() => return Err(LeadError::Deposed("lease lost while campaigning".into())),
                _ = ask.tick() => {
                    let mut ec = self.client.election_client();
                    let asked = tokio::time::timeout(CAMPAIGN_CHECK, ec.leader(self.planner.keys.leader())).await;
                    let ours = match asked {
                        Ok(Ok(resp)) => resp.kv().filter(|kv| kv.lease() == lease).map(|kv| (kv.key().to_vec(), kv.create_revision())),
                        _ => None,
                    };
                    if let Some((key, rev)) = ours {
                        tracing::warn!(engine = %self.engine_id, "etcd's campaign has not returned, but the election names this engine: leading");
                        break Compare::create_revision(key, CmpOp::Equal, rev);
                    }
                }
            }
        };
        tracing::info!(engine = %self.engine_id, "leading");
        self.set_leader(true, self.engine_id.clone());

        self.planner.lead(fence, &mut lost_rx).await
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
