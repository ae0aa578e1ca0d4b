//! `./lab up --image RELEASE --provision`: machines made from nothing but the host image and
//! each one's provisioning config (docs/host-image.md, "From zero to a cluster"). No etcd or
//! engine of the lab's: the first machines are etcd members running engines, the rest workers;
//! they form their TLS cluster among themselves and join it with the configs' token.
//!
//! The lab plays the operator and the network: it writes the configs with `fleet-pki
//! provision`'s code (with the lab's CA, so the lab's admin certificate works against the
//! machines' engines), serves them and releases over HTTPS on the bridge ([`serve`], a
//! `fleet-lab serve-https` process), and gives each machine its config the way a real one gets
//! it: on the kernel command line (a pinned https URL) or on a config drive.

use crate::{lab_dir, pki, HOST_IP};
use anyhow::{bail, Context, Result};
use fleet_engine::provisioning::{cluster_configs, ClusterSpec};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The lab's HTTPS server of configs and releases, on the bridge.
pub const SERVE_PORT: u16 = 12599;
/// The engines' API port inside provisioned members.
pub const ENGINE_PORT: u16 = crate::ENGINE_PORT;

/// What the HTTPS server serves: `provision/NAME.toml`, `updates/...`.
pub fn serve_dir() -> PathBuf {
    lab_dir().join("serve")
}

/// The channel tree's directory under [`serve_dir`], and the channel the machines follow.
pub const UPDATES: &str = "updates";
pub const CHANNEL: &str = "stable";

/// The server's request log: one line per request, `METHOD PATH RANGE STATUS`.
pub fn serve_log() -> PathBuf {
    lab_dir().join("serve.log")
}

pub fn serve_url(path: &str) -> String {
    format!("https://{HOST_IP}:{SERVE_PORT}/{path}")
}

/// The operator's files (ca.pem, admin certificate, fleetctl.toml, ca-hash) and each machine's
/// config, as `fleet-pki provision` writes them.
pub fn operator_dir() -> PathBuf {
    lab_dir().join("provision")
}

/// How many of `machines` are members: three when there are three or more, else one.
pub fn members_of(machines: u8) -> u8 {
    if machines >= 3 {
        3
    } else {
        1
    }
}

/// Writes every machine's config for lab machines `fl-m1..fl-mN`; returns the engines' URLs.
pub fn write_configs(machines: u8) -> Result<Vec<String>> {
    let ip = |n: u8| -> Result<IpAddr> { Ok(crate::MachineSpec::numbered(n).ip.parse()?) };
    let members = members_of(machines);
    let mut spec = ClusterSpec {
        members: Vec::new(),
        workers: Vec::new(),
        engine_port: ENGINE_PORT,
        token_ttl_secs: 24 * 3600,
        admin_name: "admin".into(),
    };
    for n in 1..=machines {
        let name = crate::MachineSpec::numbered(n).name;
        if n <= members {
            spec.members.push((name, ip(n)?));
        } else {
            spec.workers.push((name, ip(n)?));
        }
    }
    let ca = fleet_engine::pki::Ca::load(&pki::pki_dir())?;
    let made = cluster_configs(&ca, &spec)?;
    let out = operator_dir();
    let served = serve_dir().join("provision");
    for d in [&out, &served] {
        std::fs::create_dir_all(d)?;
    }
    let ca_pem = std::fs::read_to_string(pki::pki_dir().join("ca.pem"))?;
    for (name, mut config) in made.configs {
        // The lab's tests find machines by their hostname metadata, as on the lab's other machines.
        config.metadata.insert("hostname".into(), name.clone());
        // Updates from the lab's channel, over HTTPS checked against the lab's CA; the disk is
        // the lab's files (image.rs), not partitions.
        config.update = Some(fleet_provision::Update {
            channel: serve_url(&format!("{UPDATES}/{CHANNEL}.json")),
            ca: Some(ca_pem.clone()),
            group: "default".into(),
            check_interval_secs: 2,
            slot_a: Some("/run/fleet-disk/root-a.img".into()),
            slot_b: Some("/run/fleet-disk/root-b.img".into()),
            esp: Some("/run/fleet-disk/esp".into()),
        });
        let text = config.to_toml();
        fleet_engine::pki::write_private(&out.join(format!("{name}.toml")), &text)?;
        std::fs::write(served.join(format!("{name}.toml")), &text)?;
    }
    std::fs::write(out.join("ca-hash"), format!("{}\n", made.ca_hash))?;
    Ok(made.engines)
}

/// SHA-256 of a served file, hex.
pub fn sha256_of(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(fleet_host_image::provision::sha256_hex(&bytes))
}

/// The pin of the server's certificate (`sha256:` of its DER), for `fleet.provision.tls_pin`.
pub fn server_pin() -> Result<String> {
    use base64::Engine;
    let pem = std::fs::read_to_string(server_identity().cert_file)?;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body.trim()).context("the server certificate's PEM")?;
    Ok(format!("sha256:{}", fleet_host_image::provision::sha256_hex(&der)))
}

/// The server's identity: the lab's engine certificate, which names the bridge address.
fn server_identity() -> fleet_store::tls::ClientTls {
    pki::identity("engine")
}

/// The kernel command line that fetches `name`'s config from the lab's server.
pub fn cmdline_for(name: &str) -> Result<String> {
    let file = serve_dir().join("provision").join(format!("{name}.toml"));
    Ok(format!(
        "fleet.provision={} fleet.provision.sha256={} fleet.provision.tls_pin={}",
        serve_url(&format!("provision/{name}.toml")),
        sha256_of(&file)?,
        server_pin()?
    ))
}

/// Gives machine `name` (directory `dir`) its config: on a config drive, or on its kernel
/// command line.
pub fn give_config(dir: &Path, name: &str, drive: bool) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut args = String::from("systemd.firstboot=off");
    if drive {
        let d = dir.join(crate::image::CONFIG_DRIVE);
        std::fs::create_dir_all(&d)?;
        std::fs::copy(operator_dir().join(format!("{name}.toml")), d.join(fleet_host_image::provision::DRIVE_FILE))?;
    } else {
        args = format!("{args} {}", cmdline_for(name)?);
    }
    std::fs::write(dir.join(crate::image::BOOT_ARGS), args)?;
    Ok(())
}

/// `fleet-lab serve-https`: serves `dir` over HTTPS at `listen` (files, with ranges), logging
/// every request to `log`. With `cut_after`, the first whole-file GET of each path ending in
/// `cut_suffix` is cut off after that many bytes (an interrupted download, to be resumed).
pub async fn serve(
    dir: PathBuf,
    listen: String,
    log: PathBuf,
    cut_suffix: Option<String>,
    cut_after: u64,
) -> Result<()> {
    use axum::body::Body;
    use axum::extract::Request;
    use axum::middleware::Next;
    use futures::StreamExt;
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    let id = server_identity();
    let tls = fleet_store::tls::server_config(&id.cert_file, &id.key_file, &fleet_store::tls::ClientAuth::None)?;
    let cut: Arc<Mutex<std::collections::HashSet<String>>> = Arc::default();
    let log = Arc::new(Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(&log)?));
    let app = axum::Router::new().fallback_service(tower_http::services::ServeDir::new(&dir)).layer(
        axum::middleware::from_fn(move |req: Request, next: Next| {
            let (cut, log, cut_suffix) = (cut.clone(), log.clone(), cut_suffix.clone());
            async move {
                let path = req.uri().path().to_string();
                let method = req.method().to_string();
                let range = req.headers().get("range").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                let cut_this = range == "-"
                    && cut_suffix.as_deref().is_some_and(|s| path.ends_with(s))
                    && cut.lock().map(|mut c| c.insert(path.clone())).unwrap_or(false);
                let resp = next.run(req).await;
                if let Ok(mut f) = log.lock() {
                    let _ = writeln!(
                        f,
                        "{method} {path} {range} {}{}",
                        resp.status().as_u16(),
                        if cut_this { " cut" } else { "" }
                    );
                }
                if !cut_this {
                    return resp;
                }
                let (parts, body) = resp.into_parts();
                let mut sent = 0u64;
                let stream = body.into_data_stream().map(move |chunk| {
                    let chunk = chunk.map_err(std::io::Error::other)?;
                    if sent >= cut_after {
                        return Err(std::io::Error::other("cut off by the lab"));
                    }
                    let room = (cut_after - sent).min(chunk.len() as u64) as usize;
                    sent += room as u64;
                    Ok(chunk.slice(..room))
                });
                axum::response::Response::from_parts(parts, Body::from_stream(stream))
            }
        }),
    );
    let listener =
        tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let server = fleet_listen::serve_tls(listener, app, fleet_listen::tls_config(tls), stop, |_, _| ());
    tracing::info!(%listen, dir = %dir.display(), "serving over HTTPS");
    server.await??;
    Ok(())
}

/// Waits until the server at [`SERVE_PORT`] answers.
pub async fn wait_serving(timeout: Duration) -> Result<()> {
    let until = std::time::Instant::now() + timeout;
    let http = pki::http_anonymous()?;
    loop {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), http.get(serve_url("")).send()).await {
            if r.status().as_u16() < 500 {
                return Ok(());
            }
        }
        if std::time::Instant::now() > until {
            bail!("the lab's HTTPS server did not answer at {} within {timeout:?}", serve_url(""));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
