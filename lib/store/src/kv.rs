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
/// For bounded prefixes (one machine's schedule); the engine's whole-cluster view pages its
/// listings with `etcd::follow_prefix`.
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
                            Event::Delete { key, .. } => Change::Delete { key },
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

// ---------------------------------------------------------------------------------------------
// etcd

/// etcd as a [`Store`].
#[derive(Clone)]
pub struct EtcdStore {
    client: etcd_client::Client,
}

impl EtcdStore {
    pub fn new(client: etcd_client::Client) -> EtcdStore {
        EtcdStore { client }
    }
}

fn from_etcd(e: etcd_client::Error) -> StoreError {
    if crate::etcd::is_transient(&e) {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Other(e.to_string())
    }
}

/// etcd's answer about a lease that is gone, as [`StoreError::LeaseNotFound`].
fn lease_error(e: etcd_client::Error, lease: i64) -> StoreError {
    if e.to_string().contains("lease not found") {
        StoreError::LeaseNotFound(lease)
    } else {
        from_etcd(e)
    }
}

fn entry_of(kv: &etcd_client::KeyValue) -> Entry {
    Entry {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

fn etcd_txn(txn: &Txn) -> etcd_client::Txn {
    use etcd_client::{Compare as C, CompareOp as O, PutOptions, TxnOp};
    let op = |o: CmpOp| match o {
        CmpOp::Equal => O::Equal,
        CmpOp::NotEqual => O::NotEqual,
        CmpOp::Less => O::Less,
        CmpOp::Greater => O::Greater,
    };
    let compares: Vec<C> = txn
        .when
        .iter()
        .map(|c| match &c.target {
            Target::CreateRevision(r) => C::create_revision(c.key.clone(), op(c.op), *r),
            Target::ModRevision(r) => C::mod_revision(c.key.clone(), op(c.op), *r),
            Target::Value(v) => C::value(c.key.clone(), op(c.op), v.clone()),
            Target::Lease(l) => C::lease(c.key.clone(), op(c.op), *l),
        })
        .collect();
    let ops = |ops: &[Op]| -> Vec<TxnOp> {
        ops.iter()
            .map(|o| match o {
                Op::Get(k) => TxnOp::get(k.clone(), None),
                Op::Put { key, value, lease } => {
                    let opts = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
                    TxnOp::put(key.clone(), value.clone(), opts)
                }
                Op::Delete(k) => TxnOp::delete(k.clone(), None),
                Op::Txn(t) => TxnOp::txn(etcd_txn(t)),
            })
            .collect()
    };
    etcd_client::Txn::new().when(compares).and_then(ops(&txn.then)).or_else(ops(&txn.otherwise))
}

/// The first lease a transaction's puts name (0: none).
fn first_lease(txn: &Txn) -> i64 {
    txn.then
        .iter()
        .chain(&txn.otherwise)
        .find_map(|op| match op {
            Op::Put { lease, .. } if *lease != 0 => Some(*lease),
            Op::Txn(t) => Some(first_lease(t)).filter(|l| *l != 0),
            _ => None,
        })
        .unwrap_or(0)
}

fn etcd_txn_result(resp: &etcd_client::TxnResponse, revision: i64) -> TxnResult {
    use etcd_client::TxnOpResponse as R;
    let results = resp
        .op_responses()
        .iter()
        .map(|r| match r {
            R::Get(g) => OpResult::Get(g.kvs().first().map(entry_of)),
            R::Put(_) => OpResult::Put,
            R::Delete(d) => OpResult::Delete { deleted: d.deleted() },
            R::Txn(t) => OpResult::Txn(etcd_txn_result(t, revision)),
        })
        .collect();
    TxnResult { succeeded: resp.succeeded(), revision, results }
}

impl Store for EtcdStore {
    /// One request: for the bounded prefixes read through the seam (a machine's own keys). The
    /// whole cluster's prefixes are listed in pages by `etcd::list_prefix`.
    async fn range(&self, prefix: &[u8]) -> Result<(Vec<Entry>, i64), StoreError> {
        let opts = etcd_client::GetOptions::new().with_range(prefix_end(prefix));
        let resp = self.client.kv_client().get(prefix.to_vec(), Some(opts)).await.map_err(from_etcd)?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok((resp.kvs().iter().map(entry_of).collect(), revision))
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        let resp = self.client.kv_client().get(key.to_vec(), None).await.map_err(from_etcd)?;
        Ok(resp.kvs().first().map(entry_of))
    }

    async fn get_local(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        let opts = etcd_client::GetOptions::new().with_serializable();
        let resp = self.client.kv_client().get(key.to_vec(), Some(opts)).await.map_err(from_etcd)?;
        Ok(resp.kvs().first().map(entry_of))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let resp = match self.client.kv_client().txn(etcd_txn(&txn)).await {
            Ok(r) => r,
            // etcd does not say which lease: the transaction's (fleet writes on one at a time).
            Err(e) if e.to_string().contains("lease not found") => {
                return Err(StoreError::LeaseNotFound(first_lease(&txn)));
            }
            Err(e) => return Err(from_etcd(e)),
        };
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok(etcd_txn_result(&resp, revision))
    }

    async fn watch(&self, prefix: &[u8], from_revision: i64) -> Result<Watch, StoreError> {
        let opts = etcd_client::WatchOptions::new().with_prefix().with_start_revision(from_revision);
        let mut watch_client = crate::etcd::watch_client(&self.client);
        let mut stream = watch_client.watch(prefix.to_vec(), Some(opts)).await.map_err(from_etcd)?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            // Dropping the stream (when the receiver is gone) cancels the watch on etcd's side.
            loop {
                let msg = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(from_etcd(e))).await;
                        return;
                    }
                };
                if msg.compact_revision() > 0 {
                    let _ = tx.send(Err(StoreError::Compacted(msg.compact_revision()))).await;
                    return;
                }
                if msg.canceled() {
                    return;
                }
                // One message may carry several revisions: one batch each.
                let mut batches: Vec<WatchBatch> = Vec::new();
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let event = match ev.event_type() {
                        etcd_client::EventType::Put => Event::Put(entry_of(kv)),
                        etcd_client::EventType::Delete => {
                            Event::Delete { key: kv.key().to_vec(), mod_revision: kv.mod_revision() }
                        }
                    };
                    match batches.last_mut() {
                        Some(b) if b.revision == kv.mod_revision() => b.events.push(event),
                        _ => batches.push(WatchBatch { revision: kv.mod_revision(), events: vec![event] }),
                    }
                }
                for b in batches {
                    if tx.send(Ok(b)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn grant(&self, ttl: i64) -> Result<i64, StoreError> {
        Ok(self.client.lease_client().grant(ttl, None).await.map_err(from_etcd)?.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        let err = |e| lease_error(e, lease);
        let (mut keeper, mut responses) = self.client.lease_client().keep_alive(lease).await.map_err(err)?;
        keeper.keep_alive().await.map_err(err)?;
        match responses.message().await.map_err(err)? {
            Some(r) if r.ttl() > 0 => Ok(r.ttl()),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn time_to_live(&self, lease: i64) -> Result<Option<i64>, StoreError> {
        let resp = self.client.lease_client().time_to_live(lease, None).await.map_err(from_etcd)?;
        Ok((resp.ttl() > 0).then_some(resp.ttl()))
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.client.lease_client().revoke(lease).await.map(|_| ()).map_err(|e| lease_error(e, lease))
    }
}

// ---------------------------------------------------------------------------------------------
// In memory

/// A watch's buffer in [`MemStore`]: a watcher that falls this far behind is dropped, as etcd
/// cancels a watcher too slow to keep up.
const MEM_WATCH_BUFFER: usize = 1024;

/// An in-memory [`Store`] with etcd's semantics and injectable faults, for unit tests only.
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<Mem>>,
}

#[derive(Default)]
struct Mem {
    kvs: BTreeMap<Vec<u8>, Entry>,
    revision: i64,
    /// History before this revision is gone.
    compacted: i64,
    history: Vec<(i64, Event)>,
    leases: BTreeMap<i64, (i64, Instant)>,
    next_lease: i64,
    /// Open watches: their prefix and where their batches go.
    watchers: Vec<(Vec<u8>, WatchSender)>,
    unavailable: bool,
    refuse_txns: usize,
    delay: Duration,
    requests: u64,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Mem> {
        // A test that panicked while holding the lock has failed already; its data is still good.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every request fails as unavailable while `down` (a partition, a dead etcd).
    pub fn set_unavailable(&self, down: bool) {
        self.lock().unavailable = down;
    }

    /// The next `n` transactions fail as unavailable without being applied.
    pub fn refuse_next_txns(&self, n: usize) {
        self.lock().refuse_txns = n;
    }

    /// Every request waits this long before it is answered.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Ends every open watch, as a lost connection does.
    pub fn drop_watches(&self) {
        self.lock().watchers.clear();
    }

    /// Forgets history before `revision`: watches from before it fail with
    /// [`StoreError::Compacted`], and so do open ones (etcd cancels them).
    pub fn compact(&self, revision: i64) {
        let mut m = self.lock();
        m.compacted = revision.min(m.revision);
        let compacted = m.compacted;
        m.history.retain(|(r, _)| *r >= compacted);
        for (_, tx) in m.watchers.drain(..) {
            let _ = tx.try_send(Err(StoreError::Compacted(compacted)));
        }
    }

    /// Ends a lease now, as its TTL running out would.
    pub fn expire_lease(&self, lease: i64) {
        let mut m = self.lock();
        if m.leases.remove(&lease).is_some() {
            m.drop_keys_of(&[lease]);
        }
    }

    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// Requests made so far, answered or not (a test can assert how many round trips something
    /// took).
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    /// The value under `key`, read without counting as a request or meeting a fault.
    pub fn peek(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().kvs.get(key).map(|e| e.value.clone())
    }

    /// Counts the request, waits the configured delay, then checks for an outage.
    async fn enter(&self) -> Result<(), StoreError> {
        let delay = {
            let mut m = self.lock();
            m.requests += 1;
            m.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut m = self.lock();
        m.expire_due();
        if m.unavailable {
            return Err(StoreError::Unavailable("injected: store unavailable".into()));
        }
        Ok(())
    }
}

impl Mem {
    fn expire_due(&mut self) {
        let now = Instant::now();
        let due: Vec<i64> = self.leases.iter().filter(|(_, (_, at))| *at <= now).map(|(id, _)| *id).collect();
        if due.is_empty() {
            return;
        }
        for id in &due {
            self.leases.remove(id);
        }
        self.drop_keys_of(&due);
    }

    /// Deletes every key on `leases`, at one new revision.
    fn drop_keys_of(&mut self, leases: &[i64]) {
        let keys: Vec<Vec<u8>> =
            self.kvs.values().filter(|e| leases.contains(&e.lease)).map(|e| e.key.clone()).collect();
        if keys.is_empty() {
            return;
        }
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for k in keys {
            self.kvs.remove(&k);
            events.push(Event::Delete { key: k, mod_revision: revision });
        }
        self.commit(revision, events);
    }

    /// Records a revision's events and hands them to the watchers of their prefixes.
    fn commit(&mut self, revision: i64, events: Vec<Event>) {
        self.revision = revision;
        for ev in &events {
            self.history.push((revision, ev.clone()));
        }
        self.watchers.retain(|(prefix, tx)| {
            let mine: Vec<Event> = events.iter().filter(|e| event_key(e).starts_with(prefix)).cloned().collect();
            if mine.is_empty() {
                return !tx.is_closed();
            }
            tx.try_send(Ok(WatchBatch { revision, events: mine })).is_ok()
        });
    }

    fn holds(&self, c: &Compare) -> bool {
        let e = self.kvs.get(&c.key);
        let ord = |have: i64, want: i64| match c.op {
            CmpOp::Equal => have == want,
            CmpOp::NotEqual => have != want,
            CmpOp::Less => have < want,
            CmpOp::Greater => have > want,
        };
        match &c.target {
            Target::CreateRevision(r) => ord(e.map_or(0, |e| e.create_revision), *r),
            Target::ModRevision(r) => ord(e.map_or(0, |e| e.mod_revision), *r),
            Target::Lease(l) => ord(e.map_or(0, |e| e.lease), *l),
            Target::Value(v) => match (e, c.op) {
                (None, CmpOp::NotEqual) => true,
                (None, _) => false,
                (Some(e), CmpOp::Equal) => e.value == *v,
                (Some(e), CmpOp::NotEqual) => e.value != *v,
                (Some(e), CmpOp::Less) => e.value < *v,
                (Some(e), CmpOp::Greater) => e.value > *v,
            },
        }
    }

    /// Checks every put's lease before anything is applied: etcd refuses the whole transaction.
    fn check_leases(&self, txn: &Txn) -> Result<(), StoreError> {
        let branch = if txn.when.iter().all(|c| self.holds(c)) { &txn.then } else { &txn.otherwise };
        for op in branch {
            match op {
                Op::Put { lease, .. } if *lease != 0 && !self.leases.contains_key(lease) => {
                    return Err(StoreError::LeaseNotFound(*lease));
                }
                Op::Txn(t) => self.check_leases(t)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn apply(&mut self, txn: &Txn, revision: i64, events: &mut Vec<Event>) -> TxnResult {
        let succeeded = txn.when.iter().all(|c| self.holds(c));
        let branch = if succeeded { &txn.then } else { &txn.otherwise };
        let mut results = Vec::with_capacity(branch.len());
        for op in branch {
            results.push(match op {
                Op::Get(k) => OpResult::Get(self.kvs.get(k).cloned()),
                Op::Put { key, value, lease } => {
                    let create = self.kvs.get(key).map_or(revision, |e| e.create_revision);
                    let e = Entry {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: create,
                        mod_revision: revision,
                        lease: *lease,
                    };
                    self.kvs.insert(key.clone(), e.clone());
                    events.push(Event::Put(e));
                    OpResult::Put
                }
                Op::Delete(k) => match self.kvs.remove(k) {
                    Some(_) => {
                        events.push(Event::Delete { key: k.clone(), mod_revision: revision });
                        OpResult::Delete { deleted: 1 }
                    }
                    None => OpResult::Delete { deleted: 0 },
                },
                Op::Txn(t) => OpResult::Txn(self.apply(t, revision, events)),
            });
        }
        TxnResult { succeeded, revision, results }
    }
}

fn event_key(e: &Event) -> &[u8] {
    match e {
        Event::Put(e) => &e.key,
        Event::Delete { key, .. } => key,
    }
}

impl Store for MemStore {
    async fn range(&self, prefix: &[u8]) -> Result<(Vec<Entry>, i64), StoreError> {
        self.enter().await?;
        let m = self.lock();
        let end = prefix_end(prefix);
        let entries = m.kvs.range(prefix.to_vec()..end).map(|(_, e)| e.clone()).collect();
        Ok((entries, m.revision))
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        self.enter().await?;
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn get_local(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        self.get(key).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        self.enter().await?;
        let mut m = self.lock();
        if m.refuse_txns > 0 {
            m.refuse_txns -= 1;
            return Err(StoreError::Unavailable("injected: transaction refused".into()));
        }
        m.check_leases(&txn)?;
        let revision = m.revision + 1;
        let mut events = Vec::new();
        let mut result = m.apply(&txn, revision, &mut events);
        if events.is_empty() {
            result.revision = m.revision;
            fix_revisions(&mut result, m.revision);
        } else {
            m.commit(revision, events);
        }
        Ok(result)
    }

    async fn watch(&self, prefix: &[u8], from_revision: i64) -> Result<Watch, StoreError> {
        self.enter().await?;
        let mut m = self.lock();
        if from_revision < m.compacted {
            return Err(StoreError::Compacted(m.compacted));
        }
        let (tx, rx) = mpsc::channel(MEM_WATCH_BUFFER);
        let mut batch: Option<WatchBatch> = None;
        for (rev, ev) in m.history.iter().filter(|(r, e)| *r >= from_revision && event_key(e).starts_with(prefix)) {
            match &mut batch {
                Some(b) if b.revision == *rev => b.events.push(ev.clone()),
                _ => {
                    if let Some(b) = batch.take() {
                        let _ = tx.try_send(Ok(b));
                    }
                    batch = Some(WatchBatch { revision: *rev, events: vec![ev.clone()] });
                }
            }
        }
        if let Some(b) = batch {
            let _ = tx.try_send(Ok(b));
        }
        m.watchers.push((prefix.to_vec(), tx));
        Ok(rx)
    }

    async fn grant(&self, ttl: i64) -> Result<i64, StoreError> {
        self.enter().await?;
        let mut m = self.lock();
        m.next_lease += 1;
        let id = 0x1000 + m.next_lease;
        m.leases.insert(id, (ttl, Instant::now() + Duration::from_secs(ttl.max(1) as u64)));
        Ok(id)
    }

    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        self.enter().await?;
        let mut m = self.lock();
        match m.leases.get_mut(&lease) {
            Some((ttl, at)) => {
                *at = Instant::now() + Duration::from_secs((*ttl).max(1) as u64);
                Ok(*ttl)
            }
            None => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn time_to_live(&self, lease: i64) -> Result<Option<i64>, StoreError> {
        self.enter().await?;
        let m = self.lock();
        Ok(m.leases.get(&lease).map(|(_, at)| at.saturating_duration_since(Instant::now()).as_secs() as i64))
    }

    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.enter().await?;
        let mut m = self.lock();
        if m.leases.remove(&lease).is_none() {
            return Err(StoreError::LeaseNotFound(lease));
        }
        m.drop_keys_of(&[lease]);
        Ok(())
    }
}

/// A transaction that wrote nothing leaves the revision where it was.
fn fix_revisions(result: &mut TxnResult, revision: i64) {
    result.revision = revision;
    for r in &mut result.results {
        if let OpResult::Txn(t) = r {
            fix_revisions(t, revision);
        }
    }
}

pub mod contract;
#[cfg(test)]
mod tests;
