//! Container images for units (docs/services.md, "Containers as units"): fetched from where the
//! unit says, verified against the SHA-256 the unit names before anything of them is unpacked,
//! and kept per machine under one directory by that hash, so a unit runs its image with
//! systemd's own `RootDirectory=` and no container runtime. `fleet-image fetch` is what a unit's
//! `ExecStartPre=+` runs.
//!
//! An image is a tar archive (optionally gzip-compressed) of a root filesystem. Nothing is half
//! written: the archive is unpacked into a temporary directory beside its final place and renamed
//! there once complete; an image whose hash does not match is refused and nothing of it is kept.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where images are kept unless `--cache` says otherwise.
pub const DEFAULT_CACHE: &str = "/var/lib/fleet/images";
/// One download's limit on time (the whole transfer), and attempts on a transient failure.
const FETCH_TIMEOUT: Duration = Duration::from_secs(300);
const ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0:?} is not a SHA-256 (64 hexadecimal digits)")]
    BadHash(String),
    #[error("image {url}: its SHA-256 is {actual}, the unit names {expected}: refusing to run it")]
    Mismatch { url: String, expected: String, actual: String },
    #[error("image {url}: {why}")]
    Fetch { url: String, why: String },
    #[error("image {url}: cannot unpack: {source}")]
    Unpack { url: String, source: std::io::Error },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

/// The directory an image with `sha256` is unpacked to (its root filesystem).
pub fn rootfs(cache: &Path, sha256: &str) -> PathBuf {
    cache.join(sha256).join("rootfs")
}

/// Checks that `s` is a SHA-256 in hex, and returns it in lower case.
pub fn parse_hash(s: &str) -> Result<String, ImageError> {
    let h = s.trim().to_ascii_lowercase();
    if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(h)
    } else {
        Err(ImageError::BadHash(s.to_string()))
    }
}

/// What `fetch` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// The image was already here.
    Cached(PathBuf),
    /// Downloaded, verified and unpacked now.
    Unpacked(PathBuf),
}

/// Makes the image at `url` (http://, https:// or a local path) with SHA-256 `sha256` available
/// under `cache`, or says why not.
pub async fn fetch(cache: &Path, url: &str, sha256: &str) -> Result<Fetched, ImageError> {
    let sha256 = parse_hash(sha256)?;
    let root = rootfs(cache, &sha256);
    if root.is_dir() {
        return Ok(Fetched::Cached(root));
    }
    let bytes = download(url).await?;
    let actual = hex(&Sha256::digest(&bytes));
    if actual != sha256 {
        return Err(ImageError::Mismatch { url: url.to_string(), expected: sha256, actual });
    }
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { what, path, source }
    };
    std::fs::create_dir_all(cache).map_err(io("cannot create", cache))?;
    // Unpacked beside its final place and renamed there whole (a second fetch of the same image
    // at the same time loses the rename race harmlessly).
    let tmp = cache.join(format!(".{sha256}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let unpacked =
        unpack(&bytes, &tmp.join("rootfs")).map_err(|source| ImageError::Unpack { url: url.to_string(), source });
    if let Err(e) = unpacked {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match std::fs::rename(&tmp, cache.join(&sha256)) {
        Ok(()) => Ok(Fetched::Unpacked(root)),
        Err(_) if root.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(Fetched::Cached(root))
        }
        Err(source) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(ImageError::Io { what: "cannot move into place", path: cache.join(&sha256), source })
        }
    }
}

async fn download(url: &str) -> Result<Vec<u8>, ImageError> {
    let fail = |why: String| ImageError::Fetch { url: url.to_string(), why };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        let path = url.strip_prefix("file://").unwrap_or(url);
        return tokio::fs::read(path).await.map_err(|e| fail(format!("cannot read {path}: {e}")));
    }
    let http = reqwest::Client::builder().timeout(FETCH_TIMEOUT).build().map_err(|e| fail(e.to_string()))?;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        match http.get(url).send().await {
            Ok(resp) if resp.status().is_success() => match resp.bytes().await {
                Ok(b) => return Ok(b.to_vec()),
                Err(e) => last = format!("download cut short: {e}"),
            },
            // The server answered: asking again will not change its mind.
            Ok(resp) if resp.status().is_client_error() => {
                return Err(fail(format!("the server answered {}", resp.status())))
            }
            Ok(resp) => last = format!("the server answered {}", resp.status()),
            Err(e) => last = format!("cannot fetch: {e}"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(Duration::from_millis(500 * 2u64.pow(attempt - 1))).await;
        }
    }
    Err(fail(format!("{last} ({ATTEMPTS} attempts)")))
}

/// Unpacks a tar archive, gzip-compressed or not, into `dest`.
fn unpack(bytes: &[u8], dest: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dest)?;
    let gzip = bytes.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn Read + '_> = if gzip { Box::new(flate2::read::GzDecoder::new(bytes)) } else { Box::new(bytes) };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    // `unpack` refuses entries that would land outside `dest` (`..`, absolute paths).
    archive.unpack(dest)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar archive holding `etc/hello` with `text`.
    fn image(text: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "etc/hello", text.as_bytes()).expect("append");
        b.into_inner().expect("tar")
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fleet-image-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch");
        d
    }

    #[tokio::test]
    async fn an_image_is_verified_unpacked_once_and_then_served_from_the_cache() {
        let d = scratch("ok");
        let bytes = image("hi\n");
        let file = d.join("img.tar");
        std::fs::write(&file, &bytes).expect("write");
        let sha = hex(&Sha256::digest(&bytes));
        let cache = d.join("cache");
        let root = rootfs(&cache, &sha);
        assert_eq!(
            fetch(&cache, file.to_str().unwrap_or(""), &sha).await.expect("fetch"),
            Fetched::Unpacked(root.clone())
        );
        assert_eq!(std::fs::read_to_string(root.join("etc/hello")).expect("unpacked"), "hi\n");
        // The archive may go away: the cache serves it.
        std::fs::remove_file(&file).expect("rm");
        let upper = sha.to_ascii_uppercase();
        assert_eq!(fetch(&cache, file.to_str().unwrap_or(""), &upper).await.expect("cached"), Fetched::Cached(root));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn a_wrong_hash_is_refused_and_nothing_is_kept() {
        let d = scratch("bad");
        let file = d.join("img.tar");
        std::fs::write(&file, image("hi\n")).expect("write");
        let wrong = "0".repeat(64);
        let cache = d.join("cache");
        let e = fetch(&cache, file.to_str().unwrap_or(""), &wrong).await.expect_err("refused").to_string();
        assert!(e.contains("refusing to run it") && e.contains(&wrong), "{e}");
        let kept: Vec<_> = std::fs::read_dir(&cache).map(|r| r.flatten().collect()).unwrap_or_default();
        assert!(kept.is_empty(), "{kept:?}");
        let e = fetch(&cache, file.to_str().unwrap_or(""), "abc").await.expect_err("not a hash").to_string();
        assert!(e.contains("not a SHA-256"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn gzip_archives_unpack_too() {
        use std::io::Write;
        let d = scratch("gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&image("zipped\n")).expect("gzip");
        let bytes = gz.finish().expect("gzip");
        let file = d.join("img.tar.gz");
        std::fs::write(&file, &bytes).expect("write");
        let sha = hex(&Sha256::digest(&bytes));
        let cache = d.join("cache");
        fetch(&cache, file.to_str().unwrap_or(""), &sha).await.expect("fetch");
        assert_eq!(std::fs::read_to_string(rootfs(&cache, &sha).join("etc/hello")).expect("unpacked"), "zipped\n");
        let _ = std::fs::remove_dir_all(&d);
    }
}
