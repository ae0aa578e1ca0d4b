//! etcd as a [`Store`].

use super::*;

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

/// Keys per page of a [`Store::range`] on etcd.
pub const RANGE_PAGE: i64 = 1000;

impl Store for EtcdStore {
    async fn apply_backlog(&self) -> Result<u64, StoreError> {
        let status = self.client.maintenance_client().status().await.map_err(from_etcd)?;
        Ok(status.raft_index().saturating_sub(status.raft_applied_index()))
    }

    /// In pages of [`RANGE_PAGE`] keys, every page read at the revision of the first: one
    /// consistent listing however many keys the prefix holds, each answer far below gRPC's
    /// message limit.
    async fn range(&self, prefix: &[u8]) -> Result<(Vec<Entry>, i64), StoreError> {
        let end = prefix_end(prefix);
        let mut kv = self.client.kv_client();
        let (mut from, mut revision, mut entries) = (prefix.to_vec(), 0, Vec::new());
        loop {
            let mut opts = etcd_client::GetOptions::new().with_range(end.clone()).with_limit(RANGE_PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = kv.get(from.clone(), Some(opts)).await.map_err(from_etcd)?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            entries.extend(resp.kvs().iter().map(entry_of));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((entries, revision)),
            }
        }
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
