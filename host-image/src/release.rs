//! A release directory: the OS image of one version, its dm-verity hash tree, a kernel and
//! initrd, and `manifest.json` naming each file with its SHA-256 and the verity root hash,
//! signed in minisign format (ed25519) as `manifest.json.minisig`. Trust flows from the public
//! key in the running image: signature, then each file's hash, then the verity root hash (which
//! the kernel checks again, block by block, on every read of the slot).

use blake2::Digest as _;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const MANIFEST: &str = "manifest.json";
pub const SIGNATURE: &str = "manifest.json.minisig";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: String,
    pub files: Vec<FileEntry>,
    pub verity: Verity,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

/// The image and its hash tree, as `veritysetup format` made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verity {
    pub data: String,
    pub hash: String,
    pub root_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("bad signature on {MANIFEST}: {0}")]
    Signature(String),
    #[error("{MANIFEST} is not valid: {0}")]
    Manifest(String),
    #[error("{name}: sha256 is {actual}, the signed manifest says {expected}")]
    Hash { name: String, actual: String, expected: String },
    #[error("{name}: {actual} bytes, the signed manifest says {expected}")]
    Size { name: String, actual: u64, expected: u64 },
    #[error("verity: {0}")]
    Verity(String),
    #[error("public key {path}: {what}")]
    Key { path: PathBuf, what: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReleaseError + '_ {
    move |source| ReleaseError::Io { path: path.to_path_buf(), source }
}

/// SHA-256 of a file, hex, and its size; read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<(String, u64), ReleaseError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        ctx.update(&buf[..n]);
    }
    Ok((hex::encode(ctx.finish()), size))
}

/// A name the manifest may use: one plain file in the release directory.
pub(crate) fn plain(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl Manifest {
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    fn check_shape(&self) -> Result<(), ReleaseError> {
        if self.version.is_empty() || !plain(&self.version) {
            return Err(ReleaseError::Manifest(format!("version {:?} must be [A-Za-z0-9._-]+", self.version)));
        }
        for f in &self.files {
            if !plain(&f.name) || f.name == MANIFEST || f.name == SIGNATURE {
                return Err(ReleaseError::Manifest(format!("file name {:?} is not a plain release file", f.name)));
            }
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ReleaseError::Manifest(format!("{}: sha256 must be 64 hex digits", f.name)));
            }
        }
        for name in [&self.verity.data, &self.verity.hash] {
            if self.file(name).is_none() {
                return Err(ReleaseError::Manifest(format!("verity names {name:?}, which the manifest does not list")));
            }
        }
        if self.verity.root_hash.len() != 64 || !self.verity.root_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReleaseError::Manifest("verity.root_hash must be 64 hex digits".into()));
        }
        Ok(())
    }
}

/// Checks the signature of `dir`'s manifest with `public_key` (a minisign public key file) and
/// returns the manifest; nothing else is trusted before this.
pub fn verified_manifest(dir: &Path, public_key: &Path) -> Result<Manifest, ReleaseError> {
    let manifest_path = dir.join(MANIFEST);
    let bytes = std::fs::read(&manifest_path).map_err(io(&manifest_path))?;
    let sig_path = dir.join(SIGNATURE);
    let sig_text = std::fs::read_to_string(&sig_path).map_err(io(&sig_path))?;
    verify_bytes(&bytes, &sig_text, public_key)?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| ReleaseError::Manifest(e.to_string()))?;
    manifest.check_shape()?;
    Ok(manifest)
}

/// Every file's size and SHA-256 against the manifest.
pub fn check_files(dir: &Path, manifest: &Manifest) -> Result<(), ReleaseError> {
    for f in &manifest.files {
        let (sha, size) = sha256_file(&dir.join(&f.name))?;
        if size != f.size {
            return Err(ReleaseError::Size { name: f.name.clone(), actual: size, expected: f.size });
        }
        if sha != f.sha256.to_ascii_lowercase() {
            return Err(ReleaseError::Hash { name: f.name.clone(), actual: sha, expected: f.sha256.clone() });
        }
    }
    Ok(())
}

/// `veritysetup verify`: the data (a file or a written slot) against the hash tree and the root
/// hash, block by block. With `in_slot` (image size, hash tree offset), the hash tree follows
/// the image in the same file, as in a written slot.
pub fn check_verity(
    data: &Path,
    hash_tree: &Path,
    root_hash: &str,
    in_slot: Option<(u64, u64)>,
) -> Result<(), ReleaseError> {
    let mut cmd = Command::new("veritysetup");
    cmd.arg("verify");
    if let Some((image_size, offset)) = in_slot {
        cmd.arg(format!("--data-blocks={}", image_size / 4096)).arg(format!("--hash-offset={offset}"));
    }
    let out = cmd
        .arg(data)
        .arg(hash_tree)
        .arg(root_hash)
        .output()
        .map_err(|e| ReleaseError::Verity(format!("cannot run veritysetup (cryptsetup-bin): {e}")))?;
    if !out.status.success() {
        return Err(ReleaseError::Verity(format!(
            "{} does not match root hash {root_hash}: {}",
            data.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// All of it: signature, hashes, verity. What `fleet-update verify` does.
pub fn verify(dir: &Path, public_key: &Path) -> Result<Manifest, ReleaseError> {
    let manifest = verified_manifest(dir, public_key)?;
    check_files(dir, &manifest)?;
    check_verity(&dir.join(&manifest.verity.data), &dir.join(&manifest.verity.hash), &manifest.verity.root_hash, None)?;
    Ok(manifest)
}

/// Writes `manifest.json` for the files of `dir` and signs it with `secret_key` (a minisign
/// secret key file: unencrypted as `fleet-update keygen` writes it, or encrypted with the
/// password in `FLEET_UPDATE_KEY_PASSWORD`). What `host-image/build` ends with.
pub fn seal(
    dir: &Path,
    version: &str,
    files: &[&str],
    verity: Verity,
    secret_key: &Path,
) -> Result<Manifest, ReleaseError> {
    let mut entries = Vec::new();
    for name in files {
        let (sha256, size) = sha256_file(&dir.join(name))?;
        entries.push(FileEntry { name: name.to_string(), sha256, size });
    }
    let manifest = Manifest { version: version.into(), files: entries, verity };
    manifest.check_shape()?;
    let mut text = serde_json::to_vec_pretty(&manifest).map_err(|e| ReleaseError::Manifest(e.to_string()))?;
    text.push(b'\n');
    let sig = sign_bytes(&text, secret_key, &format!("fleet release {version}"))?;
    let path = dir.join(MANIFEST);
    std::fs::write(&path, &text).map_err(io(&path))?;
    let path = dir.join(SIGNATURE);
    std::fs::write(&path, sig).map_err(io(&path))?;
    Ok(manifest)
}

/// Signs `bytes` with a minisign secret key file; the signature file's text. An unencrypted key
/// (as `keygen` makes) has the empty password; an encrypted one takes its password from
/// `FLEET_UPDATE_KEY_PASSWORD`, never from a prompt (builds are not interactive).
pub fn sign_bytes(bytes: &[u8], secret_key: &Path, comment: &str) -> Result<String, ReleaseError> {
    let password = std::env::var("FLEET_UPDATE_KEY_PASSWORD").unwrap_or_default();
    let sk = minisign::SecretKey::from_file(secret_key, Some(password))
        .map_err(|e| ReleaseError::Key { path: secret_key.into(), what: e.to_string() })?;
    let sig = minisign::sign(None, &sk, std::io::Cursor::new(bytes), Some(comment), None)
        .map_err(|e| ReleaseError::Signature(e.to_string()))?;
    Ok(sig.into_string())
}

/// Checks `signature` (a minisign signature file's text) over `bytes` with `public_key`.
pub fn verify_bytes(bytes: &[u8], signature: &str, public_key: &Path) -> Result<(), ReleaseError> {
    let pk = minisign::PublicKey::from_file(public_key)
        .map_err(|e| ReleaseError::Key { path: public_key.into(), what: e.to_string() })?;
    let sig = minisign::SignatureBox::from_string(signature).map_err(|e| ReleaseError::Signature(e.to_string()))?;
    minisign::verify(&pk, &sig, std::io::Cursor::new(bytes), true, false, false)
        .map_err(|e| ReleaseError::Signature(e.to_string()))
}

/// A new signing key pair: `<base>.key` (secret, mode 0600) and `<base>.pub`.
pub fn keygen(base: &Path) -> Result<(PathBuf, PathBuf), ReleaseError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: minisign::PError| ReleaseError::Signature(e.to_string());
    let kp = minisign::KeyPair::generate_unencrypted_keypair().map_err(err)?;
    // The crate's unencrypted keys carry no checksum and no "no KDF" marker; add both, so the key
    // file reads back without a password (kdf 0x0000). Signatures and public keys are standard
    // minisign either way.
    let mut bytes = kp.sk.to_bytes();
    let n = bytes.len();
    let (keynum, sk) = (&bytes[n - 104..n - 96], &bytes[n - 96..n - 32]);
    let mut h = blake2::Blake2b::<blake2::digest::consts::U32>::new();
    blake2::Digest::update(&mut h, &bytes[0..2]);
    blake2::Digest::update(&mut h, keynum);
    blake2::Digest::update(&mut h, sk);
    let chk = blake2::Digest::finalize(h);
    bytes[n - 32..].copy_from_slice(&chk);
    bytes[2..4].copy_from_slice(&[0, 0]);
    let secret = minisign::SecretKey::from_bytes(&bytes).map_err(err)?;
    let (sk_path, pk_path) = (base.with_extension("key"), base.with_extension("pub"));
    let sk_box = secret.to_box(None).map_err(err)?;
    let pk_box = kp.pk.to_box().map_err(err)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&sk_path)
        .map_err(io(&sk_path))?;
    f.write_all(sk_box.to_string().as_bytes()).map_err(io(&sk_path))?;
    std::fs::write(&pk_path, pk_box.to_string()).map_err(io(&pk_path))?;
    Ok((sk_path, pk_path))
}
