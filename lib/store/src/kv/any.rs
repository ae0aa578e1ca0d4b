//! [`AnyStore`]: a [`Store`] chosen at run time, so a component can hold "the store" without a
//! type parameter threading through every handler that touches it (the API's axum state).

use super::*;

/// etcd in every fleet process; the in-memory store only in unit tests (see [`MemStore`]).
#[derive(Clone)]
pub enum AnyStore {
    /// Shared: etcd's client is a few KiB, and the API's state is cloned for every request.
    Etcd(Arc<EtcdStore>),
    Memory(MemStore),
}

impl From<EtcdStore> for AnyStore {
    fn from(s: EtcdStore) -> Self {
        AnyStore::Etcd(Arc::new(s))
    }
}

impl From<MemStore> for AnyStore {
    fn from(s: MemStore) -> Self {
        AnyStore::Memory(s)
    }
}

/// Calls the same method on whichever store this is.
macro_rules! each {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            AnyStore::Etcd($s) => $call.await,
            AnyStore::Memory($s) => $call.await,
        }
    };
}

impl Store for AnyStore {
    async fn range(&self, prefix: &[u8]) -> Result<(Vec<Entry>, i64), StoreError> {
        each!(self, s => s.range(prefix))
    }
    async fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        each!(self, s => s.get(key))
    }
    async fn get_local(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        each!(self, s => s.get_local(key))
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        each!(self, s => s.txn(txn))
    }
    async fn watch(&self, prefix: &[u8], from_revision: i64) -> Result<Watch, StoreError> {
        each!(self, s => s.watch(prefix, from_revision))
    }
    async fn grant(&self, ttl: i64) -> Result<i64, StoreError> {
        each!(self, s => s.grant(ttl))
    }
    async fn keep_alive(&self, lease: i64) -> Result<i64, StoreError> {
        each!(self, s => s.keep_alive(lease))
    }
    async fn time_to_live(&self, lease: i64) -> Result<Option<i64>, StoreError> {
        each!(self, s => s.time_to_live(lease))
    }
    async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        each!(self, s => s.revoke(lease))
    }
    async fn apply_backlog(&self) -> Result<u64, StoreError> {
        each!(self, s => s.apply_backlog())
    }
}
