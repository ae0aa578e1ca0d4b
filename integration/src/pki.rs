//! The lab's cluster CA and identities, made fresh by every `./lab up` (as the host image makes
//! them on first boot): the lab is TLS-only with auth on, like a default install.
//!
//! Files under `<lab dir>/pki`: `ca.pem`; `etcd` (every member's server and peer certificate);
//! `root` (etcd's administrator: the lab itself and tests that read etcd directly); `engine`
//! (every engine: etcd client, API server, client of the agents); `admin` (fleetctl, API role
//! admin); `machine-<name>` (one per machine); `token-read|operate|admin` (API tokens) and
//! `engine.toml`, the engines' shared configuration.

use crate::{lab_dir, HOST_IP};
use anyhow::{Context, Result};
use fleet_engine::pki::{self, Ca, Usage};
use fleet_store::tls::ClientTls;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub fn pki_dir() -> PathBuf {
    lab_dir().join("pki")
}

fn local_ips() -> Vec<IpAddr> {
    let host: IpAddr = HOST_IP.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]));
    vec![IpAddr::from([127, 0, 0, 1]), host]
}

/// Creates the lab's CA and every host-side identity (replacing any earlier lab's).
pub fn create() -> Result<()> {
    let dir = pki_dir();
    let _ = std::fs::remove_dir_all(&dir);
    let ca = Ca::load_or_create(&dir)?;
    let localhost = vec!["localhost".to_string()];
    ca.issue_to(&dir, "etcd", "etcd", &local_ips(), &localhost, Usage::Both)?;
    ca.issue_to(&dir, "root", pki::ROOT_IDENTITY, &[], &[], Usage::Client)?;
    ca.issue_to(&dir, "engine", pki::ENGINE_IDENTITY, &local_ips(), &localhost, Usage::Both)?;
    ca.issue_to(&dir, "admin", "admin", &[], &[], Usage::Client)?;
    let mut tokens = String::new();
    for role in ["read", "operate", "admin"] {
        let token = pki::new_token()?;
        pki::write_private(&dir.join(format!("token-{role}")), &token)?;
        tokens += &format!(
            "\n[[auth.tokens]]\nname = \"lab-{role}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            pki::token_hash(&token)
        );
    }
    let p = |name: &str| dir.join(name).display().to_string();
    let config = format!(
        "# Written by ./lab up: what every lab engine shares.\n\
         etcd_ca_file = {ca:?}\netcd_cert_file = {cert:?}\netcd_key_file = {key:?}\n\
         tls_cert_file = {cert:?}\ntls_key_file = {key:?}\ntls_client_ca_file = {ca:?}\n\n\
         [auth]\nsocket_role = \"admin\"\ncertificates = {{ admin = \"admin\" }}\n{tokens}",
        ca = p("ca.pem"),
        cert = p("engine.pem"),
        key = p("engine.key"),
    );
    std::fs::write(dir.join("engine.toml"), config)?;
    Ok(())
}

/// Lets the lab's engines admit machines by join token: `[join]` with the lab's CA and root
/// identity, telling machines etcd's bridge addresses.
pub fn allow_joins(etcd_for_machines: &[String]) -> Result<()> {
    use std::io::Write;
    let list: Vec<String> = etcd_for_machines.iter().map(|e| format!("{e:?}")).collect();
    let mut f = std::fs::OpenOptions::new().append(true).open(engine_config())?;
    write!(f, "\n[join]\npki_dir = {:?}\netcd_endpoints = [{}]\n", pki_dir().display().to_string(), list.join(", "))?;
    Ok(())
}

/// The files of identity `name` (`root`, `engine`, `admin`, `machine-<name>`).
pub fn identity(name: &str) -> ClientTls {
    identity_in(&pki_dir(), name)
}

/// The files of identity `name` in a CA directory laid out as the lab's (`ca.pem`,
/// `<name>.pem`, `<name>.key`), such as the one `./lab bench` makes for its own etcd.
pub fn identity_in(dir: &Path, name: &str) -> ClientTls {
    ClientTls {
        ca_file: dir.join("ca.pem"),
        cert_file: dir.join(format!("{name}.pem")),
        key_file: dir.join(format!("{name}.key")),
    }
}

/// The engines' shared configuration file.
pub fn engine_config() -> PathBuf {
    pki_dir().join("engine.toml")
}

/// An API token of the lab for `role` (`read`, `operate`, `admin`).
pub fn token(role: &str) -> Result<String> {
    let path = pki_dir().join(format!("token-{role}"));
    Ok(std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?.trim().to_string())
}

/// Issues machine `name`'s certificate (CN `machine-<id>`) into `into` as `ca.pem`, `machine.pem`
/// and `machine.key`, the files its agent is configured with.
pub fn issue_machine(name: &str, machine_id: &str, ip: &str, into: &Path) -> Result<()> {
    let dir = pki_dir();
    let ca = Ca::load_or_create(&dir)?;
    let ip: IpAddr = ip.parse().with_context(|| format!("machine {name}: bad address {ip}"))?;
    let issued = ca.issue(&pki::machine_identity(machine_id), &[ip], &[], Usage::Both)?;
    std::fs::create_dir_all(into)?;
    std::fs::copy(dir.join("ca.pem"), into.join("ca.pem"))?;
    std::fs::write(into.join("machine.pem"), &issued.cert_pem)?;
    pki::write_private(&into.join("machine.key"), &issued.key_pem)?;
    // Tests that act as a machine from the host find its identity here too.
    std::fs::write(dir.join(format!("machine-{name}.pem")), &issued.cert_pem)?;
    pki::write_private(&dir.join(format!("machine-{name}.key")), &issued.key_pem)?;
    Ok(())
}

/// An etcd client of the lab with identity `who`.
pub async fn etcd_as(endpoints: &[String], who: &str) -> Result<etcd_client::Client> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(std::time::Duration::from_secs(3))
        .with_timeout(std::time::Duration::from_secs(10))
        .with_tls(identity(who).etcd_options()?);
    Ok(etcd_client::Client::connect(endpoints, Some(opts)).await?)
}

/// An HTTP client that trusts the lab's CA and presents identity `who` (`admin`, `engine`, ...).
pub fn http_as(who: &str) -> Result<reqwest::Client> {
    let (ca, identity) = identity(who).pems()?;
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .identity(reqwest::Identity::from_pem(&identity)?)
        .timeout(std::time::Duration::from_secs(30))
        .build()?)
}

/// A fleet API client of `endpoints` as `who` (the lab's CA, `who`'s certificate).
pub fn client_as(who: &str, endpoints: &str) -> Result<fleet_client::Client> {
    let id = identity(who);
    let creds = fleet_client::Credentials {
        ca_file: Some(id.ca_file),
        cert_file: Some(id.cert_file),
        key_file: Some(id.key_file),
        token: None,
    };
    Ok(fleet_client::Client::new(endpoints, std::time::Duration::from_secs(30), &creds)?)
}

/// An HTTP client that trusts the lab's CA and presents no certificate.
pub fn http_anonymous() -> Result<reqwest::Client> {
    let (ca, _) = identity("admin").pems()?;
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
        .timeout(std::time::Duration::from_secs(30))
        .build()?)
}
