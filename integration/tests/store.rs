//! The store seam's contract against the lab's real etcd: the same scenarios the in-memory store
//! passes in fleet-store's unit tests (`fleet_store::kv::contract`), so what components are
//! unit-tested on is known to behave as etcd does.

use fleet_integration::testkit;
use fleet_store::kv::{contract, EtcdStore};

#[tokio::test]
async fn etcd_passes_the_store_contract() -> anyhow::Result<()> {
    let Some(lab) = testkit::lab() else { return Ok(()) };
    let etcd = testkit::etcd(&lab).await?;
    let prefix = format!("/fl-test-store-{}/", std::process::id());
    let result = contract::all(&EtcdStore::new(etcd.clone()), &prefix).await;
    // Leave nothing behind, whatever happened.
    let mut kv = etcd.kv_client();
    kv.delete(prefix.as_str(), Some(etcd_client::DeleteOptions::new().with_prefix())).await?;
    if let Err(e) = result {
        panic!("etcd answered differently from the contract: {e}");
    }
    Ok(())
}
