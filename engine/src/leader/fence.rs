//! A leader's writes: each in one transaction that compares the leader's election key, so etcd
//! itself refuses a deposed leader's late writes; sent again while a failure may pass.

use super::{LeadError, FENCED_WRITE_TIMEOUT};
use fleet_store::kv::{CmpOp, Compare, Op, OpResult, Store, StoreError, Target, Txn};
use fleet_store::retry::{RetryError, RetryPolicy};
use std::time::Duration;

/// A leader's write: `ops` only while `fence` (and `extra`) hold; returns its revision.
///
/// A write that fails for a passing reason (one etcd member down, a request that raced an auth
/// change) is sent again rather than costing the leadership, for as long as the lease can still
/// be ours (`ttl` seconds); the fence makes a late or repeated attempt safe, and every write a
/// pass makes is idempotent.
pub(super) async fn fenced_write<S: Store>(
    store: &S,
    ttl: i64,
    fence: &Compare,
    extra: Vec<Compare>,
    ops: Vec<Op>,
) -> Result<i64, LeadError> {
    // Attempts short enough that a request hung on a frozen member is tried again within the
    // TTL, on another member.
    let ttl = Duration::from_secs(ttl.max(1) as u64);
    let policy = RetryPolicy {
        attempts: u32::MAX,
        first_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(1),
        timeout: (ttl / 3).max(Duration::from_secs(1)),
    };
    let retryable = |e: &FenceError| match e {
        FenceError::Store(e) => e.is_transient(),
        FenceError::TimedOut => true,
        FenceError::Refused | FenceError::GuardRefused => false,
    };
    let attempts = policy.run("fenced write", retryable, || fenced_txn(store, fence, extra.clone(), ops.clone()));
    match tokio::time::timeout(ttl, attempts).await {
        Ok(Ok(rev)) => Ok(rev),
        Ok(Err(RetryError::Failed { source: FenceError::GuardRefused, .. })) => Err(LeadError::GuardFailed),
        Ok(Err(RetryError::Failed { source: FenceError::Refused, .. })) => {
            Err(LeadError::Deposed("fenced write refused: another engine leads".into()))
        }
        Ok(Err(RetryError::Failed { source: FenceError::Store(e), .. })) => Err(LeadError::Store(e)),
        Ok(Err(_)) | Err(_) => Err(LeadError::Deposed("writes failed for a lease TTL".into())),
    }
}

/// The compare every leader write carries: its election key still exists with the create
/// revision it had when this engine won. Once the key is gone (its lease expired or was
/// revoked) or belongs to another campaign, etcd refuses the write.
pub fn fence_of(leader_key: &etcd_client::LeaderKey) -> Compare {
    Compare::create_revision(leader_key.key().to_vec(), CmpOp::Equal, leader_key.rev())
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The store refused the transaction: the fence (or an extra guard) did not hold; nothing
    /// of it was written.
    #[error("fenced write refused")]
    Refused,
    /// The fence held but an extra guard did not: the leader still leads.
    #[error("fenced write refused by its guard")]
    GuardRefused,
    #[error("fenced write timed out")]
    TimedOut,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Writes `ops` in one transaction guarded by `fence` (and `extra`); returns its revision.
pub async fn fenced_txn<S: Store>(
    store: &S,
    fence: &Compare,
    extra: Vec<Compare>,
    ops: Vec<Op>,
) -> Result<i64, FenceError> {
    let mut when = vec![fence.clone()];
    let guarded = !extra.is_empty();
    when.extend(extra);
    let ops_count = ops.len();
    // Refused with guards: the election key read back says whether it was the fence or a guard.
    let otherwise = if guarded { vec![Op::Get(fence.key.clone())] } else { Vec::new() };
    let txn = Txn { when, then: ops, otherwise };
    let resp = tokio::time::timeout(FENCED_WRITE_TIMEOUT, store.txn(txn)).await.map_err(|_| FenceError::TimedOut)??;
    if !resp.succeeded {
        let fence_holds = match (resp.results.first(), &fence.target) {
            (Some(OpResult::Get(Some(e))), Target::CreateRevision(rev)) => guarded && e.create_revision == *rev,
            _ => false,
        };
        if fence_holds {
            return Err(FenceError::GuardRefused);
        }
        tracing::warn!(ops = ops_count, "fenced write refused: another engine leads; nothing of it was written");
        return Err(FenceError::Refused);
    }
    Ok(resp.revision)
}

#[cfg(test)]
mod tests {
    //! The leader's fenced writes on the in-memory store, with each fault it injects.
    use super::*;
    use fleet_store::kv::MemStore;

    const TTL: i64 = 6;

    /// An election key won by a campaign on a lease (long enough to outlive each test unless
    /// the test expires it), and its fence.
    async fn elected(store: &MemStore, key: &str) -> (i64, Compare) {
        let lease = store.grant(60).await.expect("lease");
        let won = store.txn(Txn { then: vec![Op::put(key, "e1", lease)], ..Txn::default() }).await.expect("campaign");
        (lease, Compare::create_revision(key, CmpOp::Equal, won.revision))
    }

    fn put(k: &str, v: &str) -> Vec<Op> {
        vec![Op::put(k, v, 0)]
    }

    #[tokio::test]
    async fn a_fenced_write_lands_while_the_election_key_is_ours_and_never_after() {
        let store = MemStore::new();
        let (lease, fence) = elected(&store, "/leader/a").await;
        let rev = fenced_write(&store, TTL, &fence, vec![], put("/schedule/u", "m1")).await;
        assert!(rev.is_ok_and(|r| r == store.revision()));
        // The lease runs out (a leader frozen past its TTL) and another engine campaigns.
        store.expire_lease(lease);
        let (_, _newer) = elected(&store, "/leader/a").await;
        let late = fenced_write(&store, TTL, &fence, vec![], put("/schedule/u", "m2")).await;
        assert!(matches!(late, Err(LeadError::Deposed(_))), "{late:?}");
        assert_eq!(store.peek(b"/schedule/u"), Some(b"m1".to_vec()), "nothing of the late write landed");
    }

    #[tokio::test]
    async fn a_failed_extra_guard_is_not_a_lost_leadership() {
        let store = MemStore::new();
        let (_, fence) = elected(&store, "/leader/a").await;
        let body = fenced_write(&store, TTL, &fence, vec![], put("/bodies/h", "text")).await.expect("body");
        // The body changed since the view that decided to remove it: the removal is refused.
        store.txn(Txn { then: put("/bodies/h", "text again"), ..Txn::default() }).await.expect("rewrite");
        let guard = Compare::mod_revision("/bodies/h", CmpOp::Less, body + 1);
        let removal = fenced_write(&store, TTL, &fence, vec![guard], vec![Op::delete("/bodies/h")]).await;
        assert!(matches!(removal, Err(LeadError::GuardFailed)), "{removal:?}");
        assert!(store.peek(b"/bodies/h").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn writes_refused_for_a_passing_reason_are_sent_again_and_land_once() {
        let store = MemStore::new();
        let (_, fence) = elected(&store, "/leader/a").await;
        store.refuse_next_txns(3);
        let before = store.requests();
        let rev = fenced_write(&store, TTL, &fence, vec![], put("/schedule/u", "m1")).await;
        assert!(rev.is_ok(), "{rev:?}");
        assert_eq!(store.requests() - before, 4, "three refused attempts, then the one that landed");
        assert_eq!(store.peek(b"/schedule/u"), Some(b"m1".to_vec()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_unreachable_for_the_lease_ttl_ends_the_leadership_within_it() {
        let store = MemStore::new();
        let (_, fence) = elected(&store, "/leader/a").await;
        store.set_unavailable(true);
        let start = tokio::time::Instant::now();
        let r = fenced_write(&store, TTL, &fence, vec![], put("/schedule/u", "m1")).await;
        assert!(matches!(r, Err(LeadError::Deposed(_))), "{r:?}");
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(TTL as u64 - 1) && took <= Duration::from_secs(TTL as u64), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_hung_on_a_slow_store_is_given_up_and_tried_again() {
        let store = MemStore::new();
        let (_, fence) = elected(&store, "/leader/a").await;
        // Slower than one attempt may take (TTL/3 = 2 s) but within the TTL: every attempt
        // times out, and the leadership ends once the TTL is spent, nothing written.
        store.set_delay(Duration::from_secs(3));
        let before = store.requests();
        let r = fenced_write(&store, TTL, &fence, vec![], put("/schedule/u", "m1")).await;
        assert!(matches!(r, Err(LeadError::Deposed(_))), "{r:?}");
        assert!(store.requests() - before >= 2, "attempts were made again: {}", store.requests() - before);
        assert_eq!(store.peek(b"/schedule/u"), None);
        store.set_delay(Duration::from_millis(500));
        let r = fenced_write(&store, TTL, &fence, vec![], put("/schedule/u", "m1")).await;
        assert!(r.is_ok(), "a merely slow store is waited for: {r:?}");
    }
}
