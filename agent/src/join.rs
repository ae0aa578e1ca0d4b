//! `fleet-agent join`: a new machine joins the cluster with a join token (docs/install.md), as
//! kubeadm's `join` does: it trusts the engine only once the CA the engine shows matches the pin
//! it was given, makes its own key (which never leaves it), has the engine sign a certificate for
//! it, and writes its configuration. Nothing is written unless the engine admitted it.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a join needs.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Engine API URLs (`https://`); tried in turn.
    pub engines: Vec<String>,
    pub token: String,
    /// `sha256:<hex>` of the cluster CA's public key.
    pub ca_hash: String,
    /// Where the configuration goes (`/etc/fleet`).
    pub config_dir: PathBuf,
    pub machine_id_file: PathBuf,
    /// The address the machine's agent API answers on; default: the one that reaches the engine.
    pub public_ip: Option<String>,
}

/// What a join wrote.
#[derive(Debug)]
pub struct JoinedFiles {
    pub machine_id: String,
    pub fragment: PathBuf,
    pub files: Vec<PathBuf>,
}

/// Each request to an engine; a join is tried once per engine (the operator runs it again).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// The fragment a join writes (`agent.d/50-join.toml`), and the machine's identity files.
pub fn fragment_path(config_dir: &Path) -> PathBuf {
    config_dir.join("agent.d").join("50-join.toml")
}

fn pki_dir(config_dir: &Path) -> PathBuf {
    config_dir.join("pki")
}

/// Joins: checks nothing is there yet, gets admitted by an engine, then writes the files.
pub async fn join(opts: &JoinOptions) -> Result<JoinedFiles> {
    let token = fleet_model::join::JoinToken::parse(&opts.token)?;
    if !opts.ca_hash.starts_with("sha256:") || opts.ca_hash.len() != "sha256:".len() + 64 {
        bail!("--ca-hash {:?}: expected sha256:<64 hex digits> (as `fleetctl join-token create` prints)", opts.ca_hash);
    }
    let machine_id = std::fs::read_to_string(&opts.machine_id_file)
        .with_context(|| format!("cannot read the machine id from {}", opts.machine_id_file.display()))?;
    let machine_id = fleet_model::machine::parse_machine_id(machine_id.trim())
        .map_err(|e| anyhow::anyhow!("{}: {e}", opts.machine_id_file.display()))?
        .to_string();
    let fragment = fragment_path(&opts.config_dir);
    let key_path = pki_dir(&opts.config_dir).join("machine.key");
    for existing in [&fragment, &key_path] {
        if existing.exists() {
            bail!(
                "{} exists: this machine has joined before. To join again, remove {} and {} (and have an admin remove its etcd user: fleet-pki etcd-remove-machine --machine-id {machine_id})",
                existing.display(),
                fragment.display(),
                pki_dir(&opts.config_dir).display()
            );
        }
    }
    if opts.engines.is_empty() {
        bail!("no engine URL given (--engine https://ENGINE:PORT)");
    }
    let mut reasons = Vec::new();
    for engine in &opts.engines {
        match join_through(engine, &token, opts, &machine_id).await {
            Ok(admitted) => return write(opts, &machine_id, &token.id, &admitted),
            // A refusal is the cluster's answer: another engine would give the same.
            Err(JoinError::Refused(e)) => return Err(e),
            Err(JoinError::Unreachable(e)) => reasons.push(format!("{engine}: {e:#}")),
        }
    }
    bail!("no engine could be reached: {}", reasons.join("; "))
}

/// What an engine gave, with the key made here.
struct Admitted {
    joined: fleet_api::Joined,
    key_pem: String,
    ip: String,
}

enum JoinError {
    Refused(anyhow::Error),
    Unreachable(anyhow::Error),
}

async fn join_through(
    engine: &str,
    token: &fleet_model::join::JoinToken,
    opts: &JoinOptions,
    machine_id: &str,
) -> Result<Admitted, JoinError> {
    let base = engine.trim_end_matches('/');
    if !base.starts_with("https://") {
        return Err(JoinError::Refused(anyhow::anyhow!(
            "{engine}: an engine URL must be https:// (the token and the machine's certificate travel over it)"
        )));
    }
    // The CA, fetched without trusting anyone yet, then checked against the pin: a server in
    // between cannot show a CA with the same public key.
    let blind = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| JoinError::Refused(e.into()))?;
    let resp = blind
        .get(format!("{base}/fleet/v1/join/ca"))
        .send()
        .await
        .map_err(|e| JoinError::Unreachable(anyhow::anyhow!("cannot reach it: {e}")))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(JoinError::Refused(anyhow::anyhow!(
            "{engine} does not admit machines ({status}): {}",
            message_of(&body)
        )));
    }
    let ca_pem = resp.bytes().await.map_err(|e| JoinError::Unreachable(e.into()))?;
    let shown = fleet_store::tls::ca_hash(&ca_pem).map_err(|e| JoinError::Refused(anyhow::anyhow!("{engine}: {e}")))?;
    if shown != opts.ca_hash {
        return Err(JoinError::Refused(anyhow::anyhow!(
            "{engine} shows a CA whose hash is {shown}, not the {} given with --ca-hash: refusing to join (a wrong engine, a wrong hash, or someone in between). Nothing was sent or written.",
            opts.ca_hash
        )));
    }
    // From here on the engine is verified against that CA, as every other client does.
    let ca = reqwest::Certificate::from_pem(&ca_pem).map_err(|e| JoinError::Refused(e.into()))?;
    let trusted = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| JoinError::Refused(e.into()))?;
    let ip = match &opts.public_ip {
        Some(ip) => ip.clone(),
        None => local_address_towards(base).map_err(JoinError::Unreachable)?,
    };
    // The key is made here and never leaves the machine: only a request for its certificate does.
    let key = rcgen::KeyPair::generate().map_err(|e| JoinError::Refused(e.into()))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(|e| JoinError::Refused(e.into()))?;
    let req =
        fleet_api::JoinRequest { token: token.to_string(), machine_id: machine_id.into(), csr, ips: vec![ip.clone()] };
    let resp = trusted
        .post(format!("{base}/fleet/v1/join"))
        .json(&req)
        .send()
        .await
        .map_err(|e| JoinError::Unreachable(anyhow::anyhow!("cannot reach it: {e}")))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| JoinError::Unreachable(e.into()))?;
    if status.is_server_error() && status != reqwest::StatusCode::NOT_IMPLEMENTED {
        return Err(JoinError::Unreachable(anyhow::anyhow!("{status}: {}", message_of(&body))));
    }
    if !status.is_success() {
        return Err(JoinError::Refused(anyhow::anyhow!("the engine refused the join: {}", message_of(&body))));
    }
    let joined: fleet_api::Joined =
        serde_json::from_str(&body).map_err(|e| JoinError::Refused(anyhow::anyhow!("the engine's answer: {e}")))?;
    Ok(Admitted { joined, key_pem: key.serialize_pem(), ip })
}

/// The error message of an API error body, or the body.
fn message_of(body: &str) -> String {
    serde_json::from_str::<fleet_api::ErrorBody>(body)
        .map(|e| e.error.message)
        .unwrap_or_else(|_| body.chars().take(300).collect())
}

/// The local address the system would use to reach `url`'s host (no packet is sent).
fn local_address_towards(url: &str) -> Result<String> {
    let host = url.trim_start_matches("https://").split('/').next().unwrap_or_default();
    // Without a port (`https://engine.example`), HTTPS's.
    let host = if host.ends_with(']') || !host.contains(':') { format!("{host}:443") } else { host.to_string() };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host.as_str())
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let bind = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = std::net::UdpSocket::bind(bind).context("cannot open a socket")?;
    socket.connect(addr).with_context(|| format!("no route to {addr}"))?;
    Ok(socket.local_addr().context("no local address")?.ip().to_string())
}

/// Writes the machine's identity and the configuration fragment, each file atomically; the
/// fragment last, so a machine whose files are half there does not look joined.
fn write(opts: &JoinOptions, machine_id: &str, token_id: &str, admitted: &Admitted) -> Result<JoinedFiles> {
    let Admitted { joined, key_pem: key, ip } = admitted;
    let certificate = &joined.certificate;
    let pki = pki_dir(&opts.config_dir);
    std::fs::create_dir_all(&pki).with_context(|| format!("cannot create {}", pki.display()))?;
    let (ca, etcd_ca, cert, key_path) =
        (pki.join("ca.pem"), pki.join("etcd-ca.pem"), pki.join("machine.pem"), pki.join("machine.key"));
    write_file(&key_path, key, 0o600)?;
    write_file(&cert, certificate, 0o644)?;
    write_file(&ca, &joined.ca, 0o644)?;
    write_file(&etcd_ca, &joined.etcd_ca, 0o644)?;
    let quoted = |v: &str| toml_string(v);
    let mut text = format!(
        "# Written by `fleet-agent join` (join token {token_id}). Settings in agent.toml are overridden by these.\n\
         etcd_endpoints = [{}]\netcd_prefix = {}\npublic_ip = {}\n\
         etcd_ca_file = {}\netcd_cert_file = {}\netcd_key_file = {}\n",
        joined.etcd_endpoints.iter().map(|e| quoted(e)).collect::<Vec<_>>().join(", "),
        quoted(&joined.etcd_prefix),
        quoted(ip),
        quoted(&etcd_ca.display().to_string()),
        quoted(&cert.display().to_string()),
        quoted(&key_path.display().to_string()),
    );
    if !joined.metadata.is_empty() {
        text += "\n[metadata]\n";
        for (k, v) in &joined.metadata {
            text += &format!("{} = {}\n", quoted(k), quoted(v));
        }
    }
    // The daemon's configuration file, if no package put one there.
    let main = opts.config_dir.join("agent.toml");
    let mut files = vec![key_path, cert, ca, etcd_ca];
    if !main.exists() {
        write_file(
            &main,
            "# fleet-agent's settings (docs/configuration.md); agent.d/*.toml are read after it.\n",
            0o644,
        )?;
        files.push(main);
    }
    let fragment = fragment_path(&opts.config_dir);
    if let Some(dir) = fragment.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_file(&fragment, &text, 0o644)?;
    files.push(fragment.clone());
    Ok(JoinedFiles { machine_id: machine_id.into(), fragment, files })
}

/// A TOML basic string.
fn toml_string(v: &str) -> String {
    let mut out = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("joining");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_round_trip() {
        for v in ["plain", "with \"quotes\" and \\", "tab\there"] {
            let table: toml::Table = toml::from_str(&format!("k = {}", toml_string(v))).expect("toml");
            assert_eq!(table["k"].as_str(), Some(v));
        }
    }

    #[tokio::test]
    async fn bad_input_is_refused_before_anything_is_sent_or_written() {
        let dir = std::env::temp_dir().join(format!("fleet-join-agent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("machine-id"), "0123456789abcdef0123456789abcdef\n").expect("machine id");
        let opts = JoinOptions {
            // Nothing listens there: any request would fail differently.
            engines: vec!["https://127.0.0.1:9".into()],
            token: "abc123.0123456789abcdef".into(),
            ca_hash: format!("sha256:{}", "0".repeat(64)),
            config_dir: dir.join("etc"),
            machine_id_file: dir.join("machine-id"),
            public_ip: None,
        };
        async fn err(o: JoinOptions) -> String {
            format!("{:#}", join(&o).await.expect_err("refused"))
        }
        assert!(err(JoinOptions { token: "nope".into(), ..opts.clone() }).await.contains("ID.SECRET"));
        assert!(err(JoinOptions { ca_hash: "md5:xx".into(), ..opts.clone() }).await.contains("--ca-hash"));
        assert!(err(JoinOptions { engines: vec!["http://127.0.0.1:9".into()], ..opts.clone() })
            .await
            .contains("https://"));
        assert!(err(opts.clone()).await.contains("no engine could be reached"));
        assert!(!dir.join("etc").exists(), "nothing written");
        // A machine that joined before is told so, before any engine is asked.
        std::fs::create_dir_all(dir.join("etc/agent.d")).expect("dir");
        std::fs::write(fragment_path(&dir.join("etc")), "").expect("fragment");
        assert!(err(opts.clone()).await.contains("has joined before"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
