//! The in-memory [`Store`]: etcd's semantics and injectable faults, for unit tests only.

use super::*;

/// A watch's buffer in [`MemStore`]: a watcher that falls this far behind is dropped, as etcd
/// cancels a watcher too slow to keep up.
pub(super) const MEM_WATCH_BUFFER: usize = 1024;

/// An in-memory [`Store`] with etcd's semantics and injectable faults, for unit tests only.
#[derive(Clone)]
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
    lose_answers: usize,
    delay: Duration,
    requests: u64,
    /// Transactions as received, while `record_txns` is on.
    recorded: Option<Vec<Txn>>,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

impl MemStore {
    /// An empty store at revision 1, as a new etcd cluster is.
    pub fn new() -> MemStore {
        let mem = Mem { revision: 1, ..Mem::default() };
        MemStore { inner: Arc::new(Mutex::new(mem)) }
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

    /// The next `n` transactions that write are applied, but answered as unavailable: an answer
    /// lost on the way back (a client's timeout under load), so the client tries a write that
    /// went through again.
    pub fn lose_next_answers(&self, n: usize) {
        self.lock().lose_answers = n;
    }

    /// From now on keeps every transaction it receives, so a test can send one again: a request
    /// that reaches etcd late (after its client timed out and wrote something newer).
    pub fn record_txns(&self) {
        self.lock().recorded.get_or_insert_with(Vec::new);
    }

    /// The transactions received since `record_txns`, oldest first.
    pub fn recorded_txns(&self) -> Vec<Txn> {
        self.lock().recorded.clone().unwrap_or_default()
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
        if let Some(r) = m.recorded.as_mut() {
            r.push(txn.clone());
        }
        if m.refuse_txns > 0 {
            m.refuse_txns -= 1;
            return Err(StoreError::Unavailable("injected: transaction refused".into()));
        }
        // etcd's default `--max-txn-ops`: more operations in any of a transaction's lists are
        // refused, so a caller that packs transactions too full fails here as on etcd.
        if [txn.when.len(), txn.then.len(), txn.otherwise.len()].into_iter().any(|n| n > ETCD_MAX_TXN_OPS) {
            return Err(StoreError::Other("etcdserver: too many operations in txn request".into()));
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
            if m.lose_answers > 0 {
                m.lose_answers -= 1;
                return Err(StoreError::Unavailable("injected: answer lost".into()));
            }
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
