//! `fleet-pki provision`: the provisioning configs a cluster is made from (docs/host-image.md,
//! "From zero to a cluster"), and the one-time etcd set-up a member does on its first boot.
//!
//! The configs are [`fleet_provision::Config`]s: a member's carries the CA (certificate and key),
//! etcd's `root` identity and its own etcd and engine certificates for its address; a worker's
//! carries only the engines' URLs, the CA's pin and a join token, so the CA key is only ever on
//! the machines that hold the engine role (and in their configs, which are theirs).

use crate::pki::{Ca, PkiError, Usage};
use fleet_model::join::{JoinToken, JoinTokenRecord};
use fleet_provision::{BootstrapToken, Cluster, Config, Member, Role};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// What a cluster is to be: its machines by name and address.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub members: Vec<(String, IpAddr)>,
    pub workers: Vec<(String, IpAddr)>,
    pub engine_port: u16,
    /// How long the join token the configs share admits machines.
    pub token_ttl_secs: u64,
    /// API users by certificate (common name -> role); the admin certificate issued is `admin`.
    pub admin_name: String,
}

/// The configs, and what the operator keeps: the CA certificate (public), its pin, and an
/// admin certificate for fleetctl.
pub struct ClusterConfigs {
    pub configs: Vec<(String, Config)>,
    pub ca_pem: String,
    pub ca_hash: String,
    pub admin: crate::pki::Issued,
    pub engines: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisioningError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{0}")]
    Spec(String),
}

/// Writes every machine's config. The token admits each machine once (members' agents too).
pub fn cluster_configs(ca: &Ca, spec: &ClusterSpec) -> Result<ClusterConfigs, ProvisioningError> {
    if spec.members.is_empty() {
        return Err(ProvisioningError::Spec("a cluster needs at least one member (--member NAME=IP)".into()));
    }
    if spec.members.len().is_multiple_of(2) {
        return Err(ProvisioningError::Spec(format!(
            "{} members: etcd needs an odd number (1, 3, 5) to keep a majority",
            spec.members.len()
        )));
    }
    let mut names = std::collections::BTreeSet::new();
    for (n, _) in spec.members.iter().chain(&spec.workers) {
        if !names.insert(n.as_str()) {
            return Err(ProvisioningError::Spec(format!("machine name {n:?} is given twice")));
        }
    }
    let ca_pem = ca.cert_pem();
    let ca_hash = fleet_store::tls::ca_hash(ca_pem.as_bytes())
        .map_err(|e| ProvisioningError::Spec(format!("the CA's pin: {e}")))?;
    let token = crate::pki::new_join_token()?;
    let engines: Vec<String> = spec
        .members
        .iter()
        .map(|(_, ip)| format!("https://{}", fleet_provision::host_port(&ip.to_string(), spec.engine_port)))
        .collect();
    let cluster = Cluster { engines: engines.clone(), ca_hash: ca_hash.clone(), join_token: token.to_string() };
    let root = ca.issue(crate::pki::ROOT_IDENTITY, &[], &[], Usage::Client)?;
    let loopback: IpAddr = [127, 0, 0, 1].into();
    let initial_cluster: BTreeMap<String, String> =
        spec.members.iter().map(|(n, ip)| (n.clone(), ip.to_string())).collect();
    let uses = (spec.members.len() + spec.workers.len()) as u32;
    let mut configs = Vec::new();
    for (name, ip) in &spec.members {
        let etcd = ca.issue("etcd", &[*ip, loopback], &[], Usage::Both)?;
        let engine = ca.issue(crate::pki::ENGINE_IDENTITY, &[*ip, loopback], &[], Usage::Both)?;
        let member = Member {
            name: name.clone(),
            initial_cluster: initial_cluster.clone(),
            engine_port: spec.engine_port,
            ca_cert: ca_pem.clone(),
            ca_key: ca.key_pem(),
            root_cert: root.cert_pem.clone(),
            root_key: root.key_pem.clone(),
            etcd_cert: etcd.cert_pem,
            etcd_key: etcd.key_pem,
            engine_cert: engine.cert_pem,
            engine_key: engine.key_pem,
            admins: BTreeMap::from([(spec.admin_name.clone(), "admin".to_string())]),
            join_tokens: vec![BootstrapToken {
                token: token.to_string(),
                ttl_secs: spec.token_ttl_secs,
                uses,
                metadata: BTreeMap::new(),
            }],
        };
        configs.push((name.clone(), machine(Role::Member, name, ip, &cluster, Some(member))));
    }
    for (name, ip) in &spec.workers {
        configs.push((name.clone(), machine(Role::Worker, name, ip, &cluster, None)));
    }
    for (name, c) in &configs {
        c.validate().map_err(|e| ProvisioningError::Spec(format!("{name}: {e}")))?;
    }
    let admin = ca.issue(&spec.admin_name, &[], &[], Usage::Client)?;
    Ok(ClusterConfigs { configs, ca_pem, ca_hash, admin, engines })
}

fn machine(role: Role, name: &str, ip: &IpAddr, cluster: &Cluster, member: Option<Member>) -> Config {
    Config {
        version: fleet_provision::VERSION,
        role,
        address: ip.to_string(),
        hostname: Some(name.to_string()),
        cluster: cluster.clone(),
        member,
        metadata: BTreeMap::from([("role".to_string(), format!("{role:?}").to_lowercase())]),
        capacity: None,
        update: None,
        files: Vec::new(),
        units: Vec::new(),
    }
}

/// The record a bootstrap token becomes in etcd (what `fleetctl join-token create` would
/// store), made by a member at its first boot.
pub fn token_record(
    token: &JoinToken,
    ttl_secs: u64,
    uses: u32,
    metadata: BTreeMap<String, String>,
    now: i64,
) -> JoinTokenRecord {
    JoinTokenRecord {
        id: token.id.clone(),
        secret_sha256: fleet_store::tls::sha256_hex(token.secret.as_bytes()),
        created: now,
        expires: now.saturating_add(ttl_secs.min(i64::MAX as u64) as i64),
        uses_left: uses,
        joined: Vec::new(),
        for_machines: Vec::new(),
        metadata,
        description: "bootstrap token (provisioning config)".into(),
        created_by: "fleet-pki provision".into(),
    }
}

/// Stores a bootstrap token unless a token with its id exists (every member tries: the first
/// stores it, the others find it). `client` must be `root`. Returns whether it stored it.
pub async fn add_bootstrap_token(
    client: &mut etcd_client::Client,
    prefix: &str,
    record: &JoinTokenRecord,
) -> Result<bool, PkiError> {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let key = fleet_model::Keys::new(prefix).join_token(&record.id);
    let value =
        fleet_model::schema::encode(record).map_err(|e| PkiError::Name(format!("cannot encode the token: {e}")))?;
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, value, None)]);
    let resp =
        client.txn(txn).await.map_err(|source| PkiError::Etcd { what: "store a bootstrap token".into(), source })?;
    Ok(resp.succeeded())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(members: usize, workers: usize) -> ClusterSpec {
        let ip = |i: usize| -> IpAddr { [10, 0, 0, i as u8].into() };
        ClusterSpec {
            members: (1..=members).map(|i| (format!("m{i}"), ip(i))).collect(),
            workers: (1..=workers).map(|i| (format!("w{i}"), ip(10 + i))).collect(),
            engine_port: 49153,
            token_ttl_secs: 3600,
            admin_name: "admin".into(),
        }
    }

    #[test]
    fn members_hold_the_ca_key_and_workers_only_its_pin() {
        let ca = Ca::create("test CA").expect("CA");
        let out = cluster_configs(&ca, &spec(3, 2)).expect("configs");
        assert_eq!(out.configs.len(), 5);
        assert_eq!(out.engines, ["https://10.0.0.1:49153", "https://10.0.0.2:49153", "https://10.0.0.3:49153"]);
        for (name, c) in &out.configs {
            // Each config survives its own text (what goes on a config drive).
            let back = Config::parse(&c.to_toml()).expect("parses");
            assert_eq!(&back, c, "{name}");
            assert_eq!(c.cluster.ca_hash, out.ca_hash);
            let text = c.to_toml();
            match c.role {
                Role::Member => {
                    let m = c.member.as_ref().expect("member section");
                    assert_eq!(m.initial_cluster.len(), 3);
                    assert!(m.ca_key.contains("PRIVATE KEY"));
                    assert_eq!(m.join_tokens[0].uses, 5);
                    assert_eq!(m.join_tokens[0].token, c.cluster.join_token);
                }
                Role::Worker => assert!(!text.contains("PRIVATE KEY"), "{name}'s config holds a key"),
            }
        }
    }

    #[test]
    fn an_even_or_empty_membership_and_duplicate_names_are_refused() {
        let ca = Ca::create("test CA").expect("CA");
        let refused = |r: Result<ClusterConfigs, ProvisioningError>| match r {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        };
        let even = refused(cluster_configs(&ca, &spec(2, 1)));
        assert!(even.contains("odd number"), "{even}");
        assert!(cluster_configs(&ca, &spec(0, 1)).is_err());
        let mut dup = spec(1, 1);
        dup.workers[0].0 = "m1".into();
        assert!(refused(cluster_configs(&ca, &dup)).contains("twice"));
    }
}
