//! The store seam: the few things fleet's components do with etcd, as a narrow trait ([`Store`]):
//! read a prefix at one revision, read a key, a transaction guarded by compares (fleet's only way
//! to write), follow a prefix from a revision, and leases.
//!
//! Two implementations: [`EtcdStore`], etcd itself, and [`MemStore`], an in-memory store with
//! etcd's semantics (one revision per write, create/mod revisions, leases that take their keys
//! with them, watches from a revision, compaction) that injects faults on demand: an unavailable
//! store, refused transactions, slow answers, lost watches, compacted history, expired leases. The
//! in-memory store exists for unit tests of the components built on the trait and is never used
//! in a fleet process.

use crate::etcd::{Change, PrefixUpdate};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// One key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The lease the key lives on (0: none).
    pub lease: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Equal,
    NotEqual,
    Less,
    Greater,
}

/// What a compare looks at. A missing key has create and mod revision 0, lease 0, and no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    CreateRevision(i64),
    ModRevision(i64),
    Value(Vec<u8>),
    Lease(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub op: CmpOp,
    pub target: Target,
}

impl Compare {
    pub fn create_revision(key: impl Into<Vec<u8>>, op: CmpOp, revision: i64) -> Compare {
        Compare { key: key.into(), op, target: Target::CreateRevision(revision) }
    }
    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CmpOp, revision: i64) -> Compare {
        Compare { key: key.into(), op, target: Target::ModRevision(revision) }
    }
    pub fn value(key: impl Into<Vec<u8>>, op: CmpOp, value: impl Into<Vec<u8>>) -> Compare {
        Compare { key: key.into(), op, target: Target::Value(value.into()) }
    }
    pub fn lease(key: impl Into<Vec<u8>>, op: CmpOp, lease: i64) -> Compare {
        Compare { key: key.into(), op, target: Target::Lease(lease) }
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Get(Vec<u8>),
    /// A put on `lease` (0: none).
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    Delete(Vec<u8>),
    Txn(Box<Txn>),
}

impl Op {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> Op {
        Op::Put { key: key.into(), value: value.into(), lease }
    }
    pub fn delete(key: impl Into<Vec<u8>>) -> Op {
        Op::Delete(key.into())
    }
}

/// If every compare of `when` holds, `then`; otherwise `otherwise`: all at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub when: Vec<Compare>,
    pub then: Vec<Op>,
    pub otherwise: Vec<Op>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    Get(Option<Entry>),
    Put,
    Delete { deleted: i64 },
    Txn(TxnResult),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether `when` held (`then` ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    pub results: Vec<OpResult>,
}

/// etcd's default `--max-txn-ops`: a transaction with more operations than this in one of its
/// lists (guards, then, otherwise) is refused.
pub const ETCD_MAX_TXN_OPS: usize = 128;

/// Operations fleet puts in one list of a transaction: etcd's limit, with room to spare for a
/// guard or a body added to a batch.
pub const TXN_OPS: usize = 120;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Worth trying again: the store (or the way to it) failed for a while.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// History before this revision is gone: list again.
    #[error("revision {0} has been compacted")]
    Compacted(i64),
    #[error("lease {0:x} not found")]
    LeaseNotFound(i64),
    #[error("store: {0}")]
    Other(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Entry),
    Delete { key: Vec<u8>, mod_revision: i64 },
}

/// The changes of one revision under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: i64,
    pub events: Vec<Event>,
}

/// A watch: batches in revision order, until the watch is lost (the channel closes) or fails
/// (an error, such as [`StoreError::Compacted`], then the channel closes).
pub type Watch = mpsc::Receiver<Result<WatchBatch, StoreError>>;

/// The sending side of a [`Watch`].
type WatchSender = mpsc::Sender<Result<WatchBatch, StoreError>>;

/// What fleet's components need of etcd.
pub trait Store: Clone + Send + Sync + 'static {
    /// Every key under `prefix`, and the revision they were read at.
    fn range(&self, prefix: &[u8]) -> impl Future<Output = Result<(Vec<Entry>, i64), StoreError>> + Send;
    fn get(&self, key: &[u8]) -> impl Future<Output = Result<Option<Entry>, StoreError>> + Send;
    /// [`Store::get`] that any member may answer from its own copy, which may lag a little: for
    /// keys that never change once written (unit bodies, named by their hash), read by many
    /// machines at once without a consensus round each.
    fn get_local(&self, key: &[u8]) -> impl Future<Output = Result<Option<Entry>, StoreError>> + Send;
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<TxnResult, StoreError>> + Send;
    /// Changes under `prefix` from `from_revision` on.
    fn watch(&self, prefix: &[u8], from_revision: i64) -> impl Future<Output = Result<Watch, StoreError>> + Send;
    /// A new lease of `ttl` seconds.
    fn grant(&self, ttl: i64) -> impl Future<Output = Result<i64, StoreError>> + Send;
    /// Renews a lease; its TTL, or [`StoreError::LeaseNotFound`] once it is gone.
    fn keep_alive(&self, lease: i64) -> impl Future<Output = Result<i64, StoreError>> + Send;
    /// Seconds left on a lease; `None` once it is gone.
    fn time_to_live(&self, lease: i64) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;
    /// Ends a lease now, with its keys.
    fn revoke(&self, lease: i64) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// How many committed entries the answering member has yet to apply. etcd renews a lease
    /// only once it has applied what it committed, so a writer of large batches that keeps
    /// this high costs every machine its lease; 0 for stores that apply as they commit.
    fn apply_backlog(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        async { Ok(0) }
    }
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Follows `prefix` for as long as `tx` is open, on any [`Store`]: a snapshot, then each
/// revision's changes; a lost watch is resumed from the last revision delivered (nothing missed,
/// nothing repeated), and a watch that fell behind compaction starts again with a new snapshot.
/// On etcd, listings are read in pages at one revision (`EtcdStore::range`); the engine's
/// whole-cluster view still follows with `etcd::follow_prefix` (one update per watch message,
/// a kick to rewatch, a periodic check of its count of keys), which this does not do yet.
pub async fn follow<S: Store>(store: S, prefix: String, tx: mpsc::Sender<PrefixUpdate>) {
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut revision: Option<i64> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        if tx.is_closed() {
            return;
        }
        let start = match revision {
            Some(r) => r + 1,
            None => match store.range(prefix.as_bytes()).await {
                Ok((entries, rev)) => {
                    if tx.send(snapshot_of(entries, rev)).await.is_err() {
                        return;
                    }
                    revision = Some(rev);
                    rev + 1
                }
                Err(e) => {
                    tracing::warn!(%prefix, error = %e, "cannot list prefix; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        let mut watch = match store.watch(prefix.as_bytes(), start).await {
            Ok(w) => w,
            Err(StoreError::Compacted(_)) => {
                revision = None;
                continue;
            }
            Err(e) => {
                tracing::warn!(%prefix, error = %e, "cannot watch prefix; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        loop {
            let got = tokio::select! {
                _ = tx.closed() => return,
                got = watch.recv() => got,
            };
            match got {
                Some(Ok(batch)) => {
                    backoff = Duration::from_millis(100);
                    revision = Some(batch.revision);
                    let changes = batch
                        .events
                        .into_iter()
                        .map(|e| match e {
                            Event::Put(e) => change_of_entry(e),
                            Event::Delete { key, mod_revision } => Change::Delete { key, mod_revision },
                        })
                        .collect();
                    if tx.send(PrefixUpdate::Changes { revision: batch.revision, changes }).await.is_err() {
                        return;
                    }
                }
                Some(Err(StoreError::Compacted(_))) => {
                    tracing::info!(%prefix, "watch fell behind compaction; relisting");
                    revision = None;
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(%prefix, error = %e, "watch failed; rewatching");
                    break;
                }
                None => break,
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A listing as a follower's snapshot.
pub fn snapshot_of(entries: Vec<Entry>, revision: i64) -> PrefixUpdate {
    PrefixUpdate::Snapshot { revision, puts: entries.into_iter().map(change_of_entry).collect() }
}

fn change_of_entry(e: Entry) -> Change {
    Change::Put { key: e.key, value: e.value, lease: e.lease, mod_revision: e.mod_revision }
}

mod any;
mod etcd;
mod memory;

pub use any::AnyStore;
pub use etcd::EtcdStore;
pub use memory::MemStore;
#[cfg(test)]
use memory::MEM_WATCH_BUFFER;

pub mod contract;
#[cfg(test)]
mod tests;
