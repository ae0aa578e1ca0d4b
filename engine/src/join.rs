//! Admitting machines by join token (docs/install.md, "Adding a machine"): what an engine needs
//! to do it — the cluster CA (its key never leaves the engines' machines), what a machine is told
//! about etcd, and the etcd accounts a machine's certificate is confined by.
//!
//! Whether a token admits a machine is `fleet_model::join::admit`; the handlers are in
//! `api::join`. Creating etcd users needs etcd's `root` identity, which only an engine that admits
//! machines holds (`[join]` in its configuration).

use crate::pki::{Ca, PkiError};
use futures::future::BoxFuture;
use std::path::Path;
use std::sync::Arc;

/// Where a joining machine's etcd user and role are made, behind a trait so the API's unit tests
/// can use an in-memory substitute ([`MemAccounts`]); engines use [`EtcdAccounts`].
pub trait MachineAccounts: Send + Sync {
    /// Creates machine `id`'s etcd user and role, confined to its own keys; refuses one that
    /// already exists (a machine joins once; a reinstalled one is removed first).
    fn add(&self, id: &str) -> BoxFuture<'_, Result<(), AccountError>>;
    /// Removes them again (a join that failed after creating them leaves nothing behind).
    fn remove(&self, id: &str) -> BoxFuture<'_, Result<(), AccountError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("machine {0} already has an etcd user: it joined before (remove it first: fleet-pki etcd-remove-machine --machine-id {0})")]
    Exists(String),
    #[error("etcd: {0}")]
    Etcd(String),
    /// Making the account failed after etcd said there was none: what was made of it is this
    /// join's to remove (never an account that existed before).
    #[error("etcd: {0}")]
    Incomplete(String),
}

/// The real accounts: etcd's users and roles, through a client holding the `root` identity.
pub struct EtcdAccounts {
    client: etcd_client::Client,
    prefix: String,
}

impl EtcdAccounts {
    pub fn new(client: etcd_client::Client, prefix: &str) -> Self {
        EtcdAccounts { client, prefix: prefix.to_string() }
    }
}

impl MachineAccounts for EtcdAccounts {
    fn add(&self, id: &str) -> BoxFuture<'_, Result<(), AccountError>> {
        let id = id.to_string();
        Box::pin(async move {
            let name = crate::pki::machine_identity(&id);
            // Transient failures (a member still starting, a dead endpoint picked) are tried
            // again: a join during a cluster's formation should not need its operator.
            let exists = ETCD_RETRY
                .run("look for the machine's etcd user", fleet_store::etcd::is_transient, || {
                    let (mut c, name) = (self.client.clone(), name.clone());
                    async move {
                        match c.user_get(name.as_str()).await {
                            Ok(_) => Ok(true),
                            Err(e) if e.to_string().contains("not found") => Ok(false),
                            Err(e) => Err(e),
                        }
                    }
                })
                .await
                .map_err(|e| AccountError::Etcd(e.to_string()))?;
            if exists {
                return Err(AccountError::Exists(id));
            }
            // Idempotent: an attempt that made part of the account is completed by the next.
            ETCD_RETRY
                .run("make the machine's etcd user and role", transient_pki, || {
                    let (mut c, id) = (self.client.clone(), id.clone());
                    async move { crate::pki::etcd_add_machine(&mut c, &self.prefix, &id).await }
                })
                .await
                .map_err(|e| AccountError::Incomplete(e.to_string()))
        })
    }

    fn remove(&self, id: &str) -> BoxFuture<'_, Result<(), AccountError>> {
        let id = id.to_string();
        Box::pin(async move {
            ETCD_RETRY
                .run("remove the machine's etcd user and role", transient_pki, || {
                    let (mut c, id) = (self.client.clone(), id.clone());
                    async move { crate::pki::etcd_remove_machine(&mut c, &id).await }
                })
                .await
                .map_err(|e| AccountError::Etcd(e.to_string()))
        })
    }
}

fn transient_pki(e: &PkiError) -> bool {
    matches!(e, PkiError::Etcd { source, .. } if fleet_store::etcd::is_transient(source))
}

/// Each etcd call of a join: a few attempts within seconds, each bounded, so a join answers
/// well within its client's patience (`fleet-agent join` waits 20 s).
const ETCD_RETRY: fleet_store::retry::RetryPolicy = fleet_store::retry::RetryPolicy {
    attempts: 4,
    first_backoff: std::time::Duration::from_millis(200),
    max_backoff: std::time::Duration::from_secs(1),
    timeout: std::time::Duration::from_secs(3),
};

/// In-memory accounts, for the API's unit tests only: which machines have one.
#[derive(Default)]
pub struct MemAccounts {
    pub machines: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Make the next `add` fail (a test of the roll-back).
    pub fail_next_add: std::sync::atomic::AtomicBool,
}

impl MachineAccounts for MemAccounts {
    fn add(&self, id: &str) -> BoxFuture<'_, Result<(), AccountError>> {
        let r = if self.fail_next_add.swap(false, std::sync::atomic::Ordering::SeqCst) {
            Err(AccountError::Etcd("injected failure".into()))
        } else {
            match self.machines.lock().map(|mut m| m.insert(id.to_string())) {
                Ok(true) => Ok(()),
                Ok(false) => Err(AccountError::Exists(id.to_string())),
                Err(_) => Err(AccountError::Etcd("poisoned".into())),
            }
        };
        Box::pin(async move { r })
    }

    fn remove(&self, id: &str) -> BoxFuture<'_, Result<(), AccountError>> {
        if let Ok(mut m) = self.machines.lock() {
            m.remove(id);
        }
        Box::pin(async { Ok(()) })
    }
}

/// What an engine admitting machines holds.
pub struct Joining {
    pub ca: Ca,
    pub ca_pem: String,
    /// `sha256:<hex>` of the CA's public key: what a joining machine pins.
    pub ca_hash: String,
    /// The CA etcd's certificates chain to (PEM), told to machines.
    pub etcd_ca_pem: String,
    pub etcd_endpoints: Vec<String>,
    pub etcd_prefix: String,
    pub accounts: Arc<dyn MachineAccounts>,
}

impl Joining {
    /// From the CA in `ca_dir` (`ca.pem`, `ca.key`) and etcd's CA file.
    pub fn new(
        ca_dir: &Path,
        etcd_ca_file: &str,
        etcd_endpoints: Vec<String>,
        etcd_prefix: &str,
        accounts: Arc<dyn MachineAccounts>,
    ) -> Result<Joining, PkiError> {
        let ca = Ca::load(ca_dir)?;
        // The stored certificate, as every other part of the cluster has it.
        let path = ca_dir.join("ca.pem");
        let ca_pem = std::fs::read_to_string(&path).map_err(|source| PkiError::Io { path, source })?;
        let ca_hash = fleet_store::tls::ca_hash(ca_pem.as_bytes()).map_err(|e| PkiError::Io {
            path: ca_dir.join("ca.pem"),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })?;
        let etcd_ca_pem = if etcd_ca_file.is_empty() {
            ca_pem.clone()
        } else {
            std::fs::read_to_string(etcd_ca_file)
                .map_err(|source| PkiError::Io { path: etcd_ca_file.into(), source })?
        };
        Ok(Joining { ca, ca_pem, ca_hash, etcd_ca_pem, etcd_endpoints, etcd_prefix: etcd_prefix.to_string(), accounts })
    }
}
