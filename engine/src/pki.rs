//! The cluster's public-key infrastructure, so that a default install is encrypted and
//! authenticated without anyone running openssl: one cluster CA, and certificates it signs for
//! etcd members, engines, machines and administrators; API tokens; and etcd's users and roles,
//! which confine each machine's certificate to its own keys.
//!
//! Identities are certificate common names, the same string in etcd (which takes a client
//! certificate's CN as the user name when auth is on) and in the engine's role mapping:
//! `root` (etcd administrator), `fleet-engine` (every engine), `machine-<machine id>` (one agent),
//! anything else for people (`admin` in the lab).
//!
//! `fleet-pki` is the command-line face of this module.

use etcd_client::{Client, Permission, PermissionType, UserAddOptions};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
#[cfg(test)]
use rustls::pki_types::pem::PemObject;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub use fleet_store::tls::{machine_identity, ENGINE_IDENTITY};
/// etcd's built-in administrator.
pub const ROOT_IDENTITY: &str = "root";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{what}: {source}")]
    Cert { what: String, source: rcgen::Error },
    #[error("invalid name {0:?} in a certificate")]
    Name(String),
    #[error("etcd: {what}: {source}")]
    Etcd { what: String, source: etcd_client::Error },
    #[error("no random numbers from the system")]
    Random,
}

/// What a certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
    /// Both: etcd members (peers are both), engines (API server and etcd client), agents (agent
    /// API server and etcd client).
    Both,
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster CA: signs every certificate of the cluster.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Cert { what: what.to_string(), source }
}

/// Validity from a year ago (clock skew between machines) to `years` ahead.
fn validity(params: &mut CertificateParams, years: i32) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let year = 1970 + (now / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

/// What a certificate the CA signs says: its identity, addresses and uses, for five years.
fn leaf(common_name: &str, ips: &[IpAddr], dns: &[String], usage: Usage) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
    for d in dns {
        let name = d.clone().try_into().map_err(|_| PkiError::Name(d.clone()))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = match usage {
        Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Usage::Both => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
    };
    validity(&mut params, 5);
    Ok(params)
}

impl Ca {
    pub fn create(common_name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(cert_err("generate the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        validity(&mut params, 20);
        let cert = params.self_signed(&key).map_err(cert_err("sign the CA"))?;
        Ok(Ca { cert, key })
    }

    /// The CA in `dir` (`ca.pem`, `ca.key`), created there if it is not.
    pub fn load_or_create(dir: &Path) -> Result<Ca, PkiError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        if cert_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&key_pem).map_err(cert_err("read ca.key"))?;
            // Re-signing the same name with the same key gives an issuer equivalent to the
            // stored CA certificate: what it signs verifies against the stored one.
            let params = CertificateParams::from_ca_cert_pem(&cert_pem).map_err(cert_err("read ca.pem"))?;
            let cert = params.self_signed(&key).map_err(cert_err("load the CA"))?;
            return Ok(Ca { cert, key });
        }
        let ca = Ca::create("fleet cluster CA")?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        write_private(&key_path, &ca.key.serialize_pem())?;
        std::fs::write(&cert_path, ca.cert.pem()).map_err(io(&cert_path))?;
        Ok(ca)
    }

    /// The CA's private key (PEM): only for a member's provisioning config, which holds it
    /// because that machine admits others.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `common_name`, valid for the given IP addresses and DNS names.
    pub fn issue(&self, common_name: &str, ips: &[IpAddr], dns: &[String], usage: Usage) -> Result<Issued, PkiError> {
        let key = KeyPair::generate().map_err(cert_err("generate a key"))?;
        let params = leaf(common_name, ips, dns, usage)?;
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(cert_err(common_name))?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Signs a certificate signing request (PEM) from a joining machine: the request gives the
    /// public key only; the name, addresses and uses are the CA's to decide.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        common_name: &str,
        ips: &[IpAddr],
        usage: Usage,
    ) -> Result<String, PkiError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(cert_err("the certificate signing request"))?;
        csr.params = leaf(common_name, ips, &[], usage)?;
        let cert = csr.signed_by(&self.cert, &self.key).map_err(cert_err(common_name))?;
        Ok(cert.pem())
    }

    /// Loads the CA in `dir` (`ca.pem`, `ca.key`); unlike [`Ca::load_or_create`] it never makes
    /// one (an engine admitting machines must sign with the cluster's own CA).
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = dir.join("ca.pem");
        if !cert_path.exists() {
            return Err(PkiError::Io {
                path: cert_path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no CA here (fleet-pki init makes one)"),
            });
        }
        Ca::load_or_create(dir)
    }

    /// Issues into `dir/<file>.pem` and `dir/<file>.key` unless both already exist; returns the
    /// two paths.
    pub fn issue_to(
        &self,
        dir: &Path,
        file: &str,
        common_name: &str,
        ips: &[IpAddr],
        dns: &[String],
        usage: Usage,
    ) -> Result<(PathBuf, PathBuf), PkiError> {
        let (cert, key) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")));
        if cert.exists() && key.exists() {
            return Ok((cert, key));
        }
        let issued = self.issue(common_name, ips, dns, usage)?;
        // `file` may name a subdirectory (`node2/etcd`): one directory per machine to copy.
        let parent = cert.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        write_private(&key, &issued.key_pem)?;
        std::fs::write(&cert, issued.cert_pem).map_err(io(&cert))?;
        Ok((cert, key))
    }
}

/// Writes a file only its owner can read, atomically.
pub fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// A new API token: 32 random bytes, hex.
pub fn new_token() -> Result<String, PkiError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| PkiError::Random)?;
    Ok(hex::encode(bytes))
}

/// A new join token (`ID.SECRET`, letters and digits: it is typed and pasted by people).
pub fn new_join_token() -> Result<fleet_model::join::JoinToken, PkiError> {
    use ring::rand::SecureRandom;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let want = fleet_model::join::ID_LEN + fleet_model::join::SECRET_LEN;
    let mut out = String::with_capacity(want);
    while out.len() < want {
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| PkiError::Random)?;
        // 252 is the largest multiple of 36 below 256: bytes above it are drawn again, so every
        // character is equally likely.
        out.extend(
            bytes.iter().filter(|b| **b < 252).map(|b| ALPHABET[(*b % 36) as usize] as char).take(want - out.len()),
        );
    }
    let (id, secret) = out.split_at(fleet_model::join::ID_LEN);
    Ok(fleet_model::join::JoinToken { id: id.into(), secret: secret.into() })
}

/// What the engine's configuration stores of a token: its SHA-256, hex, so the configuration does
/// not hold secrets.
pub fn token_hash(token: &str) -> String {
    fleet_store::tls::sha256_hex(token.trim().as_bytes())
}

pub use fleet_store::tls::common_name;

fn etcd_err(what: &str) -> impl FnOnce(etcd_client::Error) -> PkiError + '_ {
    move |source| PkiError::Etcd { what: what.to_string(), source }
}

fn is_exists(e: &etcd_client::Error) -> bool {
    e.to_string().contains("already exists")
}

/// Adds a user authenticated by certificate only (no password) and grants it its own role.
async fn user_with_role(client: &mut Client, name: &str) -> Result<(), PkiError> {
    match client.user_add(name, "", Some(UserAddOptions::new().with_no_pwd())).await {
        Err(e) if !is_exists(&e) => return Err(etcd_err("add user")(e)),
        _ => {}
    }
    match client.role_add(name).await {
        Err(e) if !is_exists(&e) => return Err(etcd_err("add role")(e)),
        _ => {}
    }
    client.user_grant_role(name, name).await.map_err(etcd_err("grant role"))?;
    Ok(())
}

/// Turns on etcd's auth (idempotently), with the engines' role: read and write under
/// `engine_prefix` (a plain string prefix: `/fleet` also covers `/fleet-test/...`).
/// `client` must present the `root` certificate.
pub async fn etcd_enable_auth(client: &mut Client, engine_prefix: &str) -> Result<(), PkiError> {
    user_with_role(client, ROOT_IDENTITY).await?;
    client.user_grant_role(ROOT_IDENTITY, "root").await.map_err(etcd_err("grant root"))?;
    user_with_role(client, ENGINE_IDENTITY).await?;
    let all = Permission::read_write(engine_prefix).with_prefix();
    client.role_grant_permission(ENGINE_IDENTITY, all).await.map_err(etcd_err("grant the engines' role"))?;
    match client.auth_enable().await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("already") => Ok(()),
        Err(e) => Err(etcd_err("enable auth")(e)),
    }
}

/// One grant of an etcd role: a key, or every key under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub key: String,
    pub prefix: bool,
    pub write: bool,
}

impl Grant {
    fn permission(&self) -> Permission {
        let t = if self.write { PermissionType::Readwrite } else { PermissionType::Read };
        let p = Permission::new(t, self.key.clone());
        if self.prefix {
            p.with_prefix()
        } else {
            p
        }
    }
}

/// What machine `id`'s agent may touch under the cluster `prefix` (ending in `/`): read its own
/// schedule and unit bodies, read and write its own presence and unit states. Nothing else: it
/// cannot see other machines' schedules, nor write any key of another machine or the engines.
pub fn machine_grants(prefix: &str, id: &str) -> Vec<Grant> {
    let keys = fleet_model::Keys::new(prefix);
    let g = |key: String, prefix: bool, write: bool| Grant { key, prefix, write };
    vec![
        g(keys.schedule_of(id), true, false),
        g(keys.bodies(), true, false),
        g(keys.states_of(id), true, true),
        g(keys.machine(id), false, true),
    ]
}

/// Creates (idempotently) machine `id`'s etcd user and role. `client` must be `root`.
pub async fn etcd_add_machine(client: &mut Client, prefix: &str, id: &str) -> Result<(), PkiError> {
    let name = machine_identity(id);
    user_with_role(client, &name).await?;
    for g in machine_grants(prefix, id) {
        client
            .role_grant_permission(name.as_str(), g.permission())
            .await
            .map_err(etcd_err("grant a machine's role"))?;
    }
    Ok(())
}

/// Removes machine `id`'s etcd user and role (idempotently). `client` must be `root`.
pub async fn etcd_remove_machine(client: &mut Client, id: &str) -> Result<(), PkiError> {
    let name = machine_identity(id);
    let gone = |e: &etcd_client::Error| e.to_string().contains("not found");
    match client.user_delete(name.as_str()).await {
        Err(e) if !gone(&e) => return Err(etcd_err("delete a machine's user")(e)),
        _ => {}
    }
    match client.role_delete(name.as_str()).await {
        Err(e) if !gone(&e) => Err(etcd_err("delete a machine's role")(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_common_name_and_chain_to_the_ca() {
        let dir = std::env::temp_dir().join(format!("fleet-pki-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Ca::load_or_create(&dir).expect("ca");
        let (cert, key) = ca
            .issue_to(&dir, "m1", &machine_identity("abc"), &["10.0.0.1".parse().expect("ip")], &[], Usage::Both)
            .expect("issue");
        assert!(std::fs::metadata(&key)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .is_ok_and(|m| m == 0o600));
        let pem = std::fs::read(&cert).expect("cert");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).expect("pem");
        assert_eq!(common_name(&der).as_deref(), Some("machine-abc"));
        // A file in a subdirectory (one directory per machine to copy, as docs/install.md does).
        let (cert, _) = ca.issue_to(&dir, "node2/etcd", "etcd", &[], &[], Usage::Both).expect("issue into node2/");
        assert_eq!(cert, dir.join("node2").join("etcd.pem"));
        assert!(dir.join("node2/etcd.key").is_file());
        // A reloaded CA signs certificates that verify against the stored CA certificate.
        let again = Ca::load_or_create(&dir).expect("reload");
        let issued = again.issue("admin", &[], &[], Usage::Client).expect("issue");
        let stored =
            rustls::pki_types::CertificateDer::from_pem_slice(&std::fs::read(dir.join("ca.pem")).expect("ca.pem"))
                .expect("ca der");
        let leaf = rustls::pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("leaf");
        let (_, ca_x509) = x509_parser::parse_x509_certificate(&stored).expect("parse ca");
        let (_, leaf_x509) = x509_parser::parse_x509_certificate(&leaf).expect("parse leaf");
        assert!(leaf_x509.verify_signature(Some(ca_x509.public_key())).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let (a, b) = (new_token().expect("a"), new_token().expect("b"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(token_hash(&a), token_hash(&format!("{a}\n")));
        assert_ne!(token_hash(&a), token_hash(&b));
    }

    #[test]
    fn join_tokens_are_random_well_formed_and_csrs_are_signed_with_the_cas_names() {
        let (a, b) = (new_join_token().expect("a"), new_join_token().expect("b"));
        assert_ne!(a, b);
        assert_eq!(fleet_model::join::JoinToken::parse(&a.to_string()), Ok(a));
        let ca = Ca::create("test CA").expect("ca");
        // A request asking for another name gets the CA's choice.
        let key = KeyPair::generate().expect("key");
        let mut asked = CertificateParams::new(vec!["evil.example".to_string()]).expect("params");
        asked.distinguished_name.push(DnType::CommonName, "fleet-engine");
        let csr = asked.serialize_request(&key).expect("csr").pem().expect("pem");
        let pem =
            ca.sign_request(&csr, "machine-abc", &["10.0.0.9".parse().expect("ip")], Usage::Both).expect("signed");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
        assert_eq!(common_name(&der).as_deref(), Some("machine-abc"));
        let (_, x509) = x509_parser::parse_x509_certificate(&der).expect("parse");
        assert_eq!(x509.public_key().raw, key.public_key_der().as_slice(), "the machine's own key");
        assert!(!format!("{:?}", x509.subject_alternative_name()).contains("evil"));
        assert!(ca.sign_request("not a request", "machine-abc", &[], Usage::Both).is_err());
    }

    #[test]
    fn a_machine_may_write_only_its_own_keys() {
        let writable: Vec<String> =
            machine_grants("/fleet/", "m1").into_iter().filter(|g| g.write).map(|g| g.key).collect();
        assert_eq!(writable, ["/fleet/states/m1/", "/fleet/machines/m1"]);
    }
}
