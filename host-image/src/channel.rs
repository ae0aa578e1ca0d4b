//! Update channels over HTTPS (docs/host-image.md, "Updates over the network"), after Flatcar's
//! update service and Bottlerocket's TUF repository: `fleet-update publish` turns releases into
//! a static tree any HTTPS server can serve, and the update agent fetches from it.
//!
//! The tree: `<channel>.json` (the channel's metadata) and `<channel>.json.minisig` (its
//! signature, by the release key), and `releases/<version>/` with the release's files. The
//! metadata names the newest release, every file of it (size and SHA-256), a serial that grows
//! with every publication, and when it expires. A machine refuses metadata that is not signed
//! by the key in its image, that has expired (a server frozen on old metadata cannot keep
//! machines from a fix past that date), or whose serial is lower than one it has seen (a server
//! replaying older metadata cannot roll machines back to a release with known holes).
//!
//! Downloads go to a directory of their own (`.partial-<version>/`), resume where an
//! interrupted one stopped (HTTP ranges), and each file is checked against the metadata before
//! the release is moved into the agent's source; the release's own signature, hashes and
//! verity root are checked again when it is applied, before the slot is written.

use crate::release::{self, FileEntry, ReleaseError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const RELEASES: &str = "releases";

/// `<channel>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelMeta {
    pub channel: String,
    /// Grows with every publication of the channel.
    pub serial: u64,
    /// Unix seconds.
    pub issued: i64,
    /// Unix seconds after which a machine refuses this metadata.
    pub expires: i64,
    /// The newest release.
    pub version: String,
    /// Its directory, relative to the metadata's URL.
    pub release: String,
    /// Every file of it, the manifest and its signature included.
    pub files: Vec<FileEntry>,
}

/// Why a machine refuses channel metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("bad signature on the channel metadata: {0}")]
    Signature(String),
    #[error("the channel metadata is not valid: {0}")]
    Invalid(String),
    #[error("the channel metadata expired at {}: refusing it (a frozen or stale server)", rfc3339(*expires))]
    Expired { expires: i64, now: i64 },
    #[error("the channel metadata has serial {serial}, older than serial {seen} seen before: refusing it (a replay)")]
    Replayed { serial: u64, seen: u64 },
    #[error("the metadata is for channel {got:?}, this machine follows {want:?}")]
    WrongChannel { got: String, want: String },
}

fn rfc3339(unix: i64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64)).to_string()
}

/// Whether verified metadata may be acted on: the pure part of the check.
pub fn accept(meta: &ChannelMeta, want_channel: &str, seen_serial: Option<u64>, now: i64) -> Result<(), Refusal> {
    if meta.channel != want_channel {
        return Err(Refusal::WrongChannel { got: meta.channel.clone(), want: want_channel.into() });
    }
    if now >= meta.expires {
        return Err(Refusal::Expired { expires: meta.expires, now });
    }
    if let Some(seen) = seen_serial {
        if meta.serial < seen {
            return Err(Refusal::Replayed { serial: meta.serial, seen });
        }
    }
    let plain = release::plain;
    if !plain(&meta.version) || meta.files.iter().any(|f| !plain(&f.name) || f.name.starts_with('.')) {
        return Err(Refusal::Invalid("versions and file names are plain names".into()));
    }
    if meta.release.split('/').any(|c| c == ".." || c.starts_with('.')) || meta.release.starts_with('/') {
        return Err(Refusal::Invalid(format!("release path {:?} leaves the channel's tree", meta.release)));
    }
    Ok(())
}

/// The channel's name from its URL (`https://host/path/stable.json` -> `stable`).
pub fn channel_name(url: &str) -> Option<&str> {
    url.rsplit('/').next()?.strip_suffix(".json").filter(|n| !n.is_empty())
}

/// Verifies and parses metadata with the image's public key.
pub fn verify(bytes: &[u8], signature: &str, public_key: &Path) -> Result<ChannelMeta, Refusal> {
    release::verify_bytes(bytes, signature, public_key).map_err(|e| match e {
        ReleaseError::Signature(m) => Refusal::Signature(m),
        other => Refusal::Signature(other.to_string()),
    })?;
    serde_json::from_slice(bytes).map_err(|e| Refusal::Invalid(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

fn pio(path: &Path) -> impl FnOnce(std::io::Error) -> PublishError + '_ {
    move |source| PublishError::Io { path: path.to_path_buf(), source }
}

/// `fleet-update publish`: copies a verified release into `tree/releases/<version>/` and writes
/// the channel's metadata naming it, signed, with the next serial (above the last one and not
/// below the time in seconds). Each file is written under a
/// temporary name and renamed, the metadata last, so a server never serves half of a release.
pub fn publish(
    tree: &Path,
    channel: &str,
    release_dir: &Path,
    public_key: &Path,
    secret_key: &Path,
    expires_in: Duration,
    now: i64,
) -> Result<ChannelMeta, PublishError> {
    if channel.is_empty() || !channel.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(PublishError::Invalid(format!("channel {channel:?}: letters, digits, '-' and '_'")));
    }
    // What is published was checked as a machine will check it.
    let manifest = release::verify(release_dir, public_key)?;
    let rel = format!("{RELEASES}/{}", manifest.version);
    let dest = tree.join(&rel);
    std::fs::create_dir_all(&dest).map_err(pio(&dest))?;
    let mut names: Vec<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
    names.extend([release::MANIFEST.to_string(), release::SIGNATURE.to_string()]);
    let mut files = Vec::new();
    for name in &names {
        let (src, dst) = (release_dir.join(name), dest.join(name));
        let tmp = dest.join(format!(".{name}.tmp"));
        std::fs::copy(&src, &tmp).map_err(pio(&src))?;
        std::fs::rename(&tmp, &dst).map_err(pio(&dst))?;
        let (sha256, size) = release::sha256_file(&dst)?;
        files.push(FileEntry { name: name.clone(), sha256, size });
    }
    let meta_path = tree.join(format!("{channel}.json"));
    let previous = std::fs::read(&meta_path).ok().and_then(|b| serde_json::from_slice::<ChannelMeta>(&b).ok());
    // Never below the clock: a tree restored from an old copy must not publish serials the
    // machines have seen pass (they would refuse every one as a replay).
    let serial = previous.map_or(1, |p| p.serial + 1).max(now.max(0) as u64);
    let meta = ChannelMeta {
        channel: channel.into(),
        serial,
        issued: now,
        expires: now.saturating_add(expires_in.as_secs().min(i64::MAX as u64) as i64),
        version: manifest.version.clone(),
        release: format!("{rel}/"),
        files,
    };
    let mut bytes = serde_json::to_vec_pretty(&meta).map_err(|e| PublishError::Invalid(e.to_string()))?;
    bytes.push(b'\n');
    let sig = release::sign_bytes(&bytes, secret_key, &format!("fleet channel {channel} serial {serial}"))?;
    // The signature first: a machine fetching in between sees the old metadata with a signature
    // that does not match, refuses it, and tries again at its next look.
    for (name, content) in [(format!("{channel}.json.minisig"), sig.into_bytes()), (format!("{channel}.json"), bytes)] {
        let path = tree.join(&name);
        let tmp = tree.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, content).map_err(pio(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(pio(&path))?;
    }
    Ok(meta)
}

/// What this machine remembers of its channel: the highest serial it accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub channel: String,
    pub serial: u64,
}

pub fn load_seen(path: &Path) -> Option<Seen> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The seen serial, failing closed: a file that is there but unreadable stops the channel
/// (ignoring it would turn the replay protection off) until an operator looks.
fn read_seen(path: &Path) -> Result<Option<Seen>, SyncError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| SyncError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a seen serial ({e}): remove it to trust the channel afresh"),
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SyncError::Io { path: path.to_path_buf(), source: e }),
    }
}

fn store_seen(path: &Path, seen: &Seen) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(seen).unwrap_or_default())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{url}: {message}")]
    Fetch { url: String, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{name}: {message}")]
    File { name: String, message: String },
}

fn sio(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |source| SyncError::Io { path: path.to_path_buf(), source }
}

/// Where the agent fetches from and keeps what it fetched.
#[derive(Debug, Clone)]
pub struct Follow {
    pub url: String,
    /// The CA the server is checked against; the built-in roots without it.
    pub ca_file: Option<PathBuf>,
    pub public_key: PathBuf,
    /// The agent's source: complete releases, `<version>/`.
    pub download_dir: PathBuf,
    pub seen_file: PathBuf,
}

/// What one look at the channel came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// The newest release is in the download directory (now or before).
    Ready { version: String, serial: u64 },
}

/// One look at the channel: fetch and check the metadata, remember its serial, download the
/// release it names unless it is there or `wanted` says it is not wanted (not newer than what
/// runs). Resumes a download an earlier look left unfinished.
pub fn sync(follow: &Follow, now: i64, wanted: impl Fn(&str) -> bool) -> Result<Option<Synced>, SyncError> {
    let want = channel_name(&follow.url)
        .ok_or_else(|| SyncError::Fetch {
            url: follow.url.clone(),
            message: "the channel URL must end in <channel>.json".into(),
        })?
        .to_string();
    let http = client(follow)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SyncError::Fetch { url: follow.url.clone(), message: e.to_string() })?;
    let bytes = rt.block_on(get_all(&http, &follow.url))?;
    let sig = rt.block_on(get_all(&http, &format!("{}.minisig", follow.url)))?;
    let meta = verify(&bytes, &String::from_utf8_lossy(&sig), &follow.public_key)?;
    let seen = read_seen(&follow.seen_file)?.filter(|s| s.channel == want);
    accept(&meta, &want, seen.as_ref().map(|s| s.serial), now)?;
    if seen.as_ref().is_none_or(|s| s.serial < meta.serial) {
        store_seen(&follow.seen_file, &Seen { channel: want.clone(), serial: meta.serial })
            .map_err(sio(&follow.seen_file))?;
    }
    let ready = Synced::Ready { version: meta.version.clone(), serial: meta.serial };
    let dest = follow.download_dir.join(&meta.version);
    if dest.join(release::MANIFEST).exists() {
        return Ok(Some(ready));
    }
    if !wanted(&meta.version) {
        return Ok(None);
    }
    let partial = follow.download_dir.join(format!(".partial-{}", meta.version));
    std::fs::create_dir_all(&partial).map_err(sio(&partial))?;
    // Downloads of releases no longer named are dropped.
    if let Ok(entries) = std::fs::read_dir(&follow.download_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".partial-") && e.path() != partial {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let base = follow.url.rsplit_once('/').map_or(follow.url.as_str(), |(b, _)| b);
    for f in &meta.files {
        let url = format!("{base}/{}{}", meta.release, f.name);
        rt.block_on(download(&http, &url, &partial.join(&f.name), f))?;
    }
    std::fs::rename(&partial, &dest).map_err(sio(&dest))?;
    tracing::info!(version = %meta.version, serial = meta.serial, "release downloaded from the channel");
    Ok(Some(ready))
}

fn client(follow: &Follow) -> Result<reqwest::Client, SyncError> {
    let err = |message: String| SyncError::Fetch { url: follow.url.clone(), message };
    let mut b =
        reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).read_timeout(Duration::from_secs(30));
    if let Some(ca) = &follow.ca_file {
        let pem = std::fs::read(ca).map_err(|e| err(format!("CA {}: {e}", ca.display())))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| err(format!("CA {}: {e}", ca.display())))?;
        b = b.tls_built_in_root_certs(false).add_root_certificate(cert);
    }
    b.build().map_err(|e| err(e.to_string()))
}

async fn get_all(http: &reqwest::Client, url: &str) -> Result<Vec<u8>, SyncError> {
    let err = |message: String| SyncError::Fetch { url: url.to_string(), message };
    let resp = tokio::time::timeout(Duration::from_secs(60), http.get(url).send())
        .await
        .map_err(|_| err("timed out".into()))?
        .map_err(|e| err(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(err(format!("HTTP {}", resp.status())));
    }
    // Metadata is small; a server sending more is not a channel (read no more than that).
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), futures::StreamExt::next(&mut stream))
        .await
        .map_err(|_| err("stalled".into()))?
    {
        body.extend_from_slice(&chunk.map_err(|e| err(e.to_string()))?);
        if body.len() > 1 << 20 {
            return Err(err("more than 1 MiB of metadata".into()));
        }
    }
    Ok(body)
}

/// Downloads `url` into `path`, resuming from what is there, then checks size and SHA-256.
async fn download(http: &reqwest::Client, url: &str, path: &Path, want: &FileEntry) -> Result<(), SyncError> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let err = |message: String| SyncError::Fetch { url: url.to_string(), message };
    let have = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if have > want.size {
        std::fs::remove_file(path).map_err(sio(path))?;
    }
    let have = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if have < want.size {
        let mut req = http.get(url);
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
            tracing::info!(file = %want.name, from = have, "resuming the download");
        }
        let resp = req.send().await.map_err(|e| err(e.to_string()))?;
        let append = match resp.status().as_u16() {
            // Only the range asked for is appended.
            206 => {
                let range = resp.headers().get("content-range").and_then(|v| v.to_str().ok()).unwrap_or("");
                if !range.starts_with(&format!("bytes {have}-")) {
                    let _ = std::fs::remove_file(path);
                    return Err(err(format!("asked for bytes {have}-, got {range:?}: starting again")));
                }
                true
            }
            200 => false,
            416 => {
                let _ = std::fs::remove_file(path);
                return Err(err("the server refused the range: starting again".into()));
            }
            s => return Err(err(format!("HTTP {s}"))),
        };
        let mut written = if append { have } else { 0 };
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .await
            .map_err(sio(path))?;
        let mut body = resp.bytes_stream();
        while let Some(chunk) =
            tokio::time::timeout(Duration::from_secs(60), body.next()).await.map_err(|_| err("stalled".into()))?
        {
            let chunk = chunk.map_err(|e| err(format!("interrupted: {e}")))?;
            written += chunk.len() as u64;
            // Never more than the channel said: a server sending on cannot fill var.
            if written > want.size {
                drop(f);
                let _ = std::fs::remove_file(path);
                return Err(SyncError::File {
                    name: want.name.clone(),
                    message: format!("longer than the {} bytes the channel says", want.size),
                });
            }
            f.write_all(&chunk).await.map_err(sio(path))?;
        }
        f.sync_all().await.map_err(sio(path))?;
    }
    let (sha, size) =
        release::sha256_file(path).map_err(|e| SyncError::File { name: want.name.clone(), message: e.to_string() })?;
    if size != want.size || sha != want.sha256 {
        // Whatever this is, it is not the file: the next look starts it again.
        let _ = std::fs::remove_file(path);
        return Err(SyncError::File {
            name: want.name.clone(),
            message: format!("{size} bytes with sha256 {sha}; the channel says {} bytes, {}", want.size, want.sha256),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(serial: u64, expires: i64) -> ChannelMeta {
        ChannelMeta {
            channel: "stable".into(),
            serial,
            issued: 0,
            expires,
            version: "2".into(),
            release: "releases/2/".into(),
            files: vec![FileEntry { name: "root.erofs".into(), sha256: "0".repeat(64), size: 1 }],
        }
    }

    #[test]
    fn expired_replayed_or_foreign_metadata_is_refused() {
        assert_eq!(accept(&meta(5, 100), "stable", Some(5), 99), Ok(()));
        assert_eq!(accept(&meta(6, 100), "stable", Some(5), 99), Ok(()));
        assert_eq!(accept(&meta(5, 100), "stable", None, 99), Ok(()));
        assert_eq!(accept(&meta(5, 100), "stable", None, 100), Err(Refusal::Expired { expires: 100, now: 100 }));
        assert_eq!(accept(&meta(4, 100), "stable", Some(5), 99), Err(Refusal::Replayed { serial: 4, seen: 5 }));
        assert!(matches!(accept(&meta(5, 100), "beta", None, 99), Err(Refusal::WrongChannel { .. })));
        let mut m = meta(5, 100);
        m.release = "../../etc/".into();
        assert!(matches!(accept(&m, "stable", None, 99), Err(Refusal::Invalid(_))));
        let mut m = meta(5, 100);
        m.files[0].name = "../x".into();
        assert!(matches!(accept(&m, "stable", None, 99), Err(Refusal::Invalid(_))));
    }

    #[test]
    fn the_channel_is_named_by_its_url() {
        assert_eq!(channel_name("https://u.example/fleet/stable.json"), Some("stable"));
        assert_eq!(channel_name("https://u.example/fleet/"), None);
    }

    #[test]
    fn metadata_signed_by_another_key_or_changed_is_refused() {
        let dir = std::env::temp_dir().join(format!("fleet-channel-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (sk, pk) = release::keygen(&dir.join("k")).expect("keys");
        let (_, other_pk) = release::keygen(&dir.join("other")).expect("keys");
        let bytes = serde_json::to_vec(&meta(1, 100)).expect("json");
        let sig = release::sign_bytes(&bytes, &sk, "test").expect("sign");
        assert_eq!(verify(&bytes, &sig, &pk).expect("verified"), meta(1, 100));
        assert!(matches!(verify(&bytes, &sig, &other_pk), Err(Refusal::Signature(_))));
        let changed = serde_json::to_vec(&meta(9, 100)).expect("json");
        assert!(matches!(verify(&changed, &sig, &pk), Err(Refusal::Signature(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
