//! First-boot provisioning on the machine (`fleet-update provision`, run by
//! `fleet-provision.service` before etcd and fleet start): find the machine's provisioning config,
//! check it, and apply it to var once.
//!
//! Sources, in this order (docs/host-image.md, "From zero to a cluster"):
//! 1. QEMU's fw_cfg, `opt/org.fleet/provision`;
//! 2. a config drive: a filesystem labelled `fleet-config` holding `provision.toml` (in a
//!    container, which has no block devices, the container manager gives the drive's contents
//!    as the directory `/run/fleet-config`);
//! 3. the kernel command line: `fleet.provision=https://...` with `fleet.provision.sha256=<hex>`
//!    (the config must hash to it) and optionally `fleet.provision.tls_pin=sha256:<hex>` (the
//!    server's certificate, for a server no public CA vouches for).
//!
//! Applying is all or nothing: every file is written to a staging directory on var, synced, then
//! renamed into place; the record (`/var/lib/fleet/provisioned.json`) is written last, so a crash
//! part-way leaves a machine that applies the same config again at its next boot. A config that
//! is invalid or cannot be read stops here, before anything is written or joins.

use fleet_provision::{Config, Owner, Planned, Record, RECORD};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DRIVE_LABEL: &str = "fleet-config";
pub const DRIVE_FILE: &str = "provision.toml";
pub const CONTAINER_DRIVE: &str = "/run/fleet-config";
pub const FW_CFG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/org.fleet/provision/raw";

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("no provisioning config: looked for QEMU fw_cfg {FW_CFG}, a config drive labelled {DRIVE_LABEL} (or {CONTAINER_DRIVE} in a container) and fleet.provision= on the kernel command line")]
    NotFound,
    #[error("{source_name}: {message}")]
    Source { source_name: String, message: String },
    #[error("{source_name}: {error}")]
    Invalid { source_name: String, error: fleet_provision::ProvisionError },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |error| ProvisionError::Io { path: path.to_path_buf(), error }
}

/// Where this boot's configuration may come from; paths are parameters so tests can point them
/// at files.
#[derive(Debug, Clone)]
pub struct Sources {
    pub fw_cfg: PathBuf,
    pub drive_device: PathBuf,
    pub container_drive: PathBuf,
    /// The kernel command line's words (or, in a container, PID 1's arguments).
    pub cmdline: Vec<String>,
}

impl Sources {
    pub fn system() -> Sources {
        Sources {
            fw_cfg: FW_CFG.into(),
            drive_device: Path::new("/dev/disk/by-label").join(DRIVE_LABEL),
            container_drive: CONTAINER_DRIVE.into(),
            cmdline: kernel_cmdline(),
        }
    }
}

/// The kernel command line; in a container, PID 1's arguments (systemd reads its settings from
/// there, and /proc/cmdline is the host's).
pub fn kernel_cmdline() -> Vec<String> {
    if Path::new("/run/systemd/container").exists() {
        if let Ok(raw) = std::fs::read("/proc/1/cmdline") {
            return raw.split(|b| *b == 0).skip(1).map(|w| String::from_utf8_lossy(w).into_owned()).collect();
        }
    }
    std::fs::read_to_string("/proc/cmdline")
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn arg<'a>(cmdline: &'a [String], key: &str) -> Option<&'a str> {
    cmdline.iter().rev().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// A config as read, before it is parsed: where from, and its bytes.
#[derive(Debug, Clone)]
pub struct Found {
    pub source: String,
    pub bytes: Vec<u8>,
}

/// Finds this machine's config; `Ok(None)` when there is none anywhere.
pub fn find(sources: &Sources) -> Result<Option<Found>, ProvisionError> {
    if sources.fw_cfg.exists() {
        let bytes = std::fs::read(&sources.fw_cfg).map_err(io(&sources.fw_cfg))?;
        return Ok(Some(Found { source: "fw_cfg opt/org.fleet/provision".into(), bytes }));
    }
    let in_container = sources.container_drive.join(DRIVE_FILE);
    if in_container.exists() {
        let bytes = std::fs::read(&in_container).map_err(io(&in_container))?;
        return Ok(Some(Found { source: format!("config drive {}", sources.container_drive.display()), bytes }));
    }
    if sources.drive_device.exists() {
        return read_drive(&sources.drive_device).map(Some);
    }
    if let Some(url) = arg(&sources.cmdline, "fleet.provision") {
        let source_name = format!("fleet.provision={url}");
        let sha = arg(&sources.cmdline, "fleet.provision.sha256").ok_or_else(|| ProvisionError::Source {
            source_name: source_name.clone(),
            message:
                "no fleet.provision.sha256=<hex> on the command line: a config fetched over the network must be pinned"
                    .into(),
        })?;
        let pin = arg(&sources.cmdline, "fleet.provision.tls_pin");
        let bytes = fetch(url, sha, pin)
            .map_err(|message| ProvisionError::Source { source_name: source_name.clone(), message })?;
        return Ok(Some(Found { source: source_name, bytes }));
    }
    Ok(None)
}

/// Mounts the config drive read-only, reads its config, unmounts it.
fn read_drive(device: &Path) -> Result<Found, ProvisionError> {
    let source_name = format!("config drive {}", device.display());
    let mnt = Path::new("/run/fleet-config-drive");
    std::fs::create_dir_all(mnt).map_err(io(mnt))?;
    let out = std::process::Command::new("mount").args(["-o", "ro"]).arg(device).arg(mnt).output().map_err(|e| {
        ProvisionError::Source { source_name: source_name.clone(), message: format!("cannot run mount: {e}") }
    })?;
    if !out.status.success() {
        return Err(ProvisionError::Source {
            source_name,
            message: format!("cannot mount it: {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    let file = mnt.join(DRIVE_FILE);
    let read = std::fs::read(&file);
    let _ = std::process::Command::new("umount").arg(mnt).status();
    let bytes = read.map_err(|e| ProvisionError::Source {
        source_name: source_name.clone(),
        message: format!("{DRIVE_FILE}: {e}"),
    })?;
    Ok(Found { source: source_name, bytes })
}

/// Fetches a pinned config over HTTPS: a few tries (the network may come up late), each with a
/// timeout; the body must hash to `sha256`.
fn fetch(url: &str, sha256: &str, tls_pin: Option<&str>) -> Result<Vec<u8>, String> {
    if !url.starts_with("https://") {
        return Err("only https:// URLs are fetched".into());
    }
    let want = sha256.trim().to_ascii_lowercase();
    if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("fleet.provision.sha256={sha256}: expected 64 hex digits"));
    }
    let pin = match tls_pin {
        Some(p) => Some(
            p.strip_prefix("sha256:")
                .filter(|h| h.len() == 64)
                .ok_or_else(|| format!("fleet.provision.tls_pin={p}: expected sha256:<64 hex digits>"))?
                .to_ascii_lowercase(),
        ),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        // The URL is what was pinned: a redirect elsewhere is not followed.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(pin) = &pin {
        // The pin replaces the CA check: the server must present exactly that certificate, and
        // the handshake's signatures are checked as ever (so it must hold its key).
        builder = builder.use_preconfigured_tls(pinned_tls(pin)?);
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let mut last = String::new();
    for attempt in 0..6u32 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1 << attempt.min(4)));
        }
        let got: Result<Vec<u8>, String> = rt.block_on(async {
            let resp = client.get(url).send().await.map_err(|e| {
                // A certificate that is not the pinned one is refused for good.
                if format!("{e:?}").contains(PIN_MISMATCH) {
                    format!("refused: the server's certificate is not the one fleet.provision.tls_pin names: {e}")
                } else {
                    e.to_string()
                }
            })?;
            if !resp.status().is_success() {
                return Err(format!("HTTP {}", resp.status()));
            }
            Ok(resp.bytes().await.map_err(|e| e.to_string())?.to_vec())
        });
        match got {
            Ok(bytes) => {
                let have = sha256_hex(&bytes);
                if have != want {
                    return Err(format!("refused: the config's sha256 is {have}, fleet.provision.sha256 says {want}"));
                }
                return Ok(bytes);
            }
            Err(e) if e.starts_with("refused") => return Err(e),
            Err(e) => {
                eprintln!("fleet-provision: {url}: {e} (attempt {})", attempt + 1);
                last = e;
            }
        }
    }
    Err(format!("gave up after 6 attempts: {last}"))
}

const PIN_MISMATCH: &str = "not the pinned certificate";

/// A TLS client configuration that accepts exactly the server certificate whose SHA-256 (of its
/// DER) is `pin`, and checks the handshake's signatures with it as rustls always does.
fn pinned_tls(pin: &str) -> Result<rustls::ClientConfig, String> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedLeaf { pin: pin.to_string(), provider: provider.clone() };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_no_client_auth())
}

#[derive(Debug)]
struct PinnedLeaf {
    pin: String,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if sha256_hex(end_entity.as_ref()) == self.pin {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(PIN_MISMATCH.into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Parses and validates what was found; the error names the source and the setting.
pub fn parse(found: &Found) -> Result<Config, ProvisionError> {
    let text = std::str::from_utf8(&found.bytes)
        .map_err(|_| ProvisionError::Source { source_name: found.source.clone(), message: "not UTF-8 text".into() })?;
    Config::parse(text).map_err(|error| ProvisionError::Invalid { source_name: found.source.clone(), error })
}

/// The record of an earlier provisioning, if this machine has one.
pub fn record(var: &Path) -> Option<Record> {
    let text = std::fs::read_to_string(var.join(RECORD)).ok()?;
    serde_json::from_str(&text).ok()
}

/// uid and gid of `user` in the image's /etc/passwd.
fn user_ids(passwd: &Path, user: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(passwd).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?))).flatten()
    })
}

/// Writes the plan under `var`, all or nothing, then the record. `passwd` names etcd's ids.
pub fn apply(var: &Path, plan: &[Planned], record: &Record, passwd: &Path) -> Result<(), ProvisionError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let stage = var.join(".fleet-provision");
    if stage.exists() {
        std::fs::remove_dir_all(&stage).map_err(io(&stage))?;
    }
    std::fs::create_dir_all(&stage).map_err(io(&stage))?;
    let etcd_ids = if plan.iter().any(|p| p.owner == Owner::Etcd) {
        Some(user_ids(passwd, "etcd").ok_or_else(|| ProvisionError::Source {
            source_name: passwd.display().to_string(),
            message: "no etcd user: this image cannot be a member".into(),
        })?)
    } else {
        None
    };
    // 1. Every file, whole and synced, in the staging directory.
    for (i, p) in plan.iter().enumerate() {
        let staged = stage.join(i.to_string());
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(p.mode).open(&staged).map_err(io(&staged))?;
        f.write_all(p.contents.as_bytes()).map_err(io(&staged))?;
        f.set_permissions(std::fs::Permissions::from_mode(p.mode)).map_err(io(&staged))?;
        if let (Owner::Etcd, Some((uid, gid))) = (p.owner, etcd_ids) {
            std::os::unix::fs::chown(&staged, Some(uid), Some(gid)).map_err(io(&staged))?;
        }
        f.sync_all().map_err(io(&staged))?;
    }
    // 2. Renamed into place (the same filesystem: each file appears whole).
    for (i, p) in plan.iter().enumerate() {
        let target = var.join(&p.path);
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            if let (Owner::Etcd, Some((uid, gid))) = (p.owner, etcd_ids) {
                // etcd may write in /var/lib/etcd: a link it left there is not followed.
                let meta = std::fs::symlink_metadata(dir).map_err(io(dir))?;
                if !meta.is_dir() {
                    return Err(ProvisionError::Io {
                        path: dir.to_path_buf(),
                        error: std::io::Error::other("not a directory (a symbolic link?): refusing to hand it to etcd"),
                    });
                }
                std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).map_err(io(dir))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
            }
        }
        std::fs::rename(stage.join(i.to_string()), &target).map_err(io(&target))?;
    }
    std::fs::remove_dir_all(&stage).map_err(io(&stage))?;
    // 3. The record last: until it is there, the machine is not provisioned.
    let path = var.join(RECORD);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(serde_json::to_string_pretty(record).unwrap_or_default().as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    if let Ok(d) = std::fs::File::open(var.join("lib/fleet")) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `fleet-update provision join`: runs `fleet-agent join` with the config's engines, pin and
/// token until one admits the machine, backing off between tries; every refusal goes to the
/// console. A machine that joined (its `agent.d/50-join.toml` exists) is left as it is.
pub fn join(config_dir: &Path, timeout: Duration) -> anyhow::Result<()> {
    use anyhow::Context;
    if config_dir.join("agent.d/50-join.toml").exists() {
        println!("fleet-join: this machine has joined already");
        return Ok(());
    }
    let path = config_dir.join("join.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let s: fleet_provision::JoinSettings = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let until = std::time::Instant::now() + timeout;
    let mut wait = Duration::from_secs(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let out = std::process::Command::new("fleet-agent")
            .arg("join")
            .arg("--engine")
            .arg(s.engines.join(","))
            .args(["--ca-hash", &s.ca_hash, "--address", &s.address, "--no-start", "--config-dir"])
            .arg(config_dir)
            .env("FLEET_JOIN_TOKEN", &s.token)
            .output()
            .context("cannot run fleet-agent join")?;
        if out.status.success() {
            print!("{}", String::from_utf8_lossy(&out.stdout));
            return Ok(());
        }
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        eprintln!("fleet-join: attempt {attempt}: {why}");
        if std::time::Instant::now() + wait > until {
            anyhow::bail!("no engine admitted this machine within {}: {why}", humantime::format_duration(timeout));
        }
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// `fleet-update provision host-units`, at every boot: the config's hostname, and its host units
/// linked into /run/systemd/system (the root is read-only), enabled ones started.
pub fn host_units(config_dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Ok(name) = std::fs::read_to_string(config_dir.join("hostname")) {
        let name = name.trim();
        let status = std::process::Command::new("hostname").arg(name).status().context("cannot run hostname")?;
        if !status.success() {
            eprintln!("fleet-host-units: cannot set the hostname {name}");
        }
    }
    let dir = config_dir.join("units");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(()) };
    let run = Path::new("/run/systemd/system");
    std::fs::create_dir_all(run).context("cannot create /run/systemd/system")?;
    let mut linked = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "enabled" {
            continue;
        }
        let link = run.join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(e.path(), &link).with_context(|| format!("cannot link {}", link.display()))?;
        linked += 1;
    }
    if linked == 0 {
        return Ok(());
    }
    let ok = |mut c: std::process::Command| c.status().map(|s| s.success()).unwrap_or(false);
    let mut reload = std::process::Command::new("systemctl");
    reload.arg("daemon-reload");
    if !ok(reload) {
        anyhow::bail!("systemctl daemon-reload failed");
    }
    let enabled = std::fs::read_to_string(dir.join("enabled")).unwrap_or_default();
    for name in enabled.lines().filter(|l| !l.trim().is_empty()) {
        let mut start = std::process::Command::new("systemctl");
        start.args(["start", "--no-block", name.trim()]);
        if !ok(start) {
            eprintln!("fleet-host-units: cannot start {name}");
        }
    }
    println!("fleet-host-units: {linked} host unit(s) linked");
    Ok(())
}

/// The UTC time now, RFC 3339 (seconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    fn worker() -> String {
        format!(
            "version = 1\nrole = \"worker\"\naddress = \"10.0.0.4\"\n[cluster]\nengines = [\"https://10.0.0.1:49153\"]\n\
             ca_hash = \"{HASH}\"\njoin_token = \"abc123.0123456789abcdef\"\n\
             [[files]]\npath = \"/var/lib/app/a\"\nmode = \"0600\"\ncontents = \"a\"\n"
        )
    }

    fn sources(dir: &Path) -> Sources {
        Sources {
            fw_cfg: dir.join("none-fw"),
            drive_device: dir.join("none-dev"),
            container_drive: dir.join("drive"),
            cmdline: vec!["quiet".into()],
        }
    }

    #[test]
    fn a_config_drive_is_found_and_applied_once_whole() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempdir();
        let src = sources(&tmp);
        assert!(find(&src).expect("no error").is_none(), "nothing there: no config");
        std::fs::create_dir_all(tmp.join("drive")).expect("dir");
        std::fs::write(tmp.join("drive").join(DRIVE_FILE), worker()).expect("write");
        let found = find(&src).expect("read").expect("found");
        assert!(found.source.starts_with("config drive"));
        let config = parse(&found).expect("valid");
        let var = tmp.join("var");
        // A crash of an earlier try left a staging directory: it is redone from scratch.
        std::fs::create_dir_all(var.join(".fleet-provision")).expect("dir");
        std::fs::write(var.join(".fleet-provision/0"), "half").expect("write");
        let rec = Record {
            source: found.source.clone(),
            sha256: sha256_hex(&found.bytes),
            role: config.role,
            address: config.address.clone(),
            applied: now_rfc3339(),
            files: config.plan().len(),
        };
        assert!(record(&var).is_none());
        apply(&var, &config.plan(), &rec, Path::new("/etc/passwd")).expect("applied");
        assert_eq!(record(&var).expect("recorded"), rec);
        let a = var.join("lib/app/a");
        assert_eq!(std::fs::read_to_string(&a).expect("a"), "a");
        assert_eq!(std::fs::metadata(&a).expect("meta").permissions().mode() & 0o7777, 0o600);
        assert!(var.join("lib/fleet/etc/join.toml").exists());
        assert!(!var.join(".fleet-provision").exists());
    }

    #[test]
    fn a_bad_config_names_its_source_and_setting() {
        let found =
            Found { source: "config drive /x".into(), bytes: worker().replace("10.0.0.4", "nowhere").into_bytes() };
        let e = parse(&found).expect_err("refused").to_string();
        assert!(e.starts_with("config drive /x: address:"), "{e}");
    }

    #[test]
    fn a_network_config_must_be_pinned() {
        let tmp = tempdir();
        let mut src = sources(&tmp);
        src.cmdline = vec!["fleet.provision=https://10.0.0.1/w.toml".into()];
        let e = find(&src).expect_err("refused").to_string();
        assert!(e.contains("fleet.provision.sha256"), "{e}");
        src.cmdline =
            vec!["fleet.provision=http://10.0.0.1/w.toml".into(), format!("fleet.provision.sha256={}", "0".repeat(64))];
        assert!(find(&src).expect_err("refused").to_string().contains("only https://"));
    }

    #[test]
    fn rfc3339_of_now_is_well_formed() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "fleet-provision-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        ));
        std::fs::create_dir_all(&d).expect("tempdir");
        d
    }
}
