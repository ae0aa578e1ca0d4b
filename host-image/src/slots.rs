//! The A/B slots and applying an update to the one not running: verify everything first, then
//! take away the inactive slot's old boot entry (its contents are about to go), write the image
//! and its hash tree into the slot, check the slot against the signed root hash, copy the kernel,
//! and only then add the new entry, with one boot try. A write interrupted at any point leaves
//! the running slot and its entry as they were, and no entry pointing at a half-written slot.

use crate::boot::{self, Entry};
use crate::release::{self, Manifest, ReleaseError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Where the slots and the ESP are (block devices on a machine; files in tests).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub slot_a: PathBuf,
    pub slot_b: PathBuf,
    pub esp: PathBuf,
    /// Kernel command line of every entry, before fleet's own options.
    #[serde(default)]
    pub cmdline: String,
}

impl Layout {
    pub fn slot(&self, s: char) -> &Path {
        if s == 'a' {
            &self.slot_a
        } else {
            &self.slot_b
        }
    }
}

pub fn other(slot: char) -> char {
    if slot == 'a' {
        'b'
    } else {
        'a'
    }
}

/// The running slot, from the kernel command line (`fleet.slot=a|b`).
pub fn running_slot(cmdline: &str) -> Option<char> {
    cmdline.split_whitespace().find_map(|w| match w {
        "fleet.slot=a" => Some('a'),
        "fleet.slot=b" => Some('b'),
        _ => None,
    })
}

/// The layout with `systemd.machine_id=<id>` added to its command line (unless it has one): on a
/// read-only root systemd cannot keep /etc/machine-id, so the machine's id travels in its boot
/// entries from one release to the next. Not a valid id (32 lowercase hex digits): unchanged.
pub fn with_machine_id(layout: &Layout, machine_id: &str) -> Layout {
    let id = machine_id.trim();
    let valid = id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let mut out = layout.clone();
    if valid && !layout.cmdline.split_whitespace().any(|w| w.starts_with("systemd.machine_id=")) {
        out.cmdline = format!("{} systemd.machine_id={id}", layout.cmdline.trim()).trim().to_string();
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("version {0} is already in slot {1}")]
    AlreadyThere(String, char),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ApplyError + 'a {
    move |source| ApplyError::Io { what, path: path.to_path_buf(), source }
}

/// Bytes written between pauses when `FLEET_UPDATE_THROTTLE_MS` is set: a test hook, so that a
/// test can kill an update in the middle of writing a slot.
const CHUNK: usize = 1 << 20;

fn copy_into(src: &Path, dst: &mut std::fs::File, at: u64, dst_path: &Path) -> Result<u64, ApplyError> {
    let throttle = std::env::var("FLEET_UPDATE_THROTTLE_MS").ok().and_then(|v| v.parse::<u64>().ok());
    let mut f = std::fs::File::open(src).map_err(io("read", src))?;
    dst.seek(SeekFrom::Start(at)).map_err(io("seek", dst_path))?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io("read", src))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).map_err(io("write", dst_path))?;
        total += n as u64;
        if let Some(ms) = throttle {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
    Ok(total)
}

/// Where the hash tree starts in a slot: after the image, on a 4 KiB boundary.
pub fn hash_offset(image_size: u64) -> u64 {
    image_size.div_ceil(4096) * 4096
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ApplyError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename", path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("sync", dir))?;
    }
    Ok(())
}

/// What `apply` did.
#[derive(Debug)]
pub struct Applied {
    pub manifest: Manifest,
    pub slot: char,
    pub entry: Entry,
}

/// Applies the release in `dir` to the slot that is not `running`.
pub fn apply(dir: &Path, public_key: &Path, layout: &Layout, running: char) -> Result<Applied, ApplyError> {
    // Nothing is written until everything checks out.
    let manifest = release::verify(dir, public_key)?;
    let target = other(running);
    let entries = boot::entries(&layout.esp).map_err(io("read", &boot::entries_dir(&layout.esp)))?;
    if entries.iter().any(|e| e.slot == running && e.version == manifest.version) {
        return Err(ApplyError::AlreadyThere(manifest.version.clone(), running));
    }
    for e in entries.iter().filter(|e| e.slot == target) {
        let path = boot::entries_dir(&layout.esp).join(e.file_name());
        std::fs::remove_file(&path).map_err(io("remove", &path))?;
        // Its kernel and initrd go with it (after the entry: never an entry without its kernel),
        // or the ESP fills up a release at a time.
        let kernel_dir = layout.esp.join("fleet").join(format!("{}-{target}", e.version));
        match std::fs::remove_dir_all(&kernel_dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", &kernel_dir)(err)),
            _ => {}
        }
    }
    let slot_path = layout.slot(target);
    let mut slot = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(slot_path)
        .map_err(io("open", slot_path))?;
    let data = dir.join(&manifest.verity.data);
    let size = copy_into(&data, &mut slot, 0, slot_path)?;
    let offset = hash_offset(size);
    copy_into(&dir.join(&manifest.verity.hash), &mut slot, offset, slot_path)?;
    slot.sync_all().map_err(io("sync", slot_path))?;
    drop(slot);
    check_slot(slot_path, size, offset, &manifest.verity.root_hash)?;

    let kernel_dir = layout.esp.join("fleet").join(format!("{}-{target}", manifest.version));
    std::fs::create_dir_all(&kernel_dir).map_err(io("create", &kernel_dir))?;
    let mut boot_files = Vec::new();
    for name in ["vmlinuz", "initrd.img"] {
        if manifest.file(name).is_some() {
            let bytes = std::fs::read(dir.join(name)).map_err(io("read", &dir.join(name)))?;
            write_atomically(&kernel_dir.join(name), &bytes)?;
            boot_files.push(name);
        }
    }
    let entry = Entry { version: manifest.version.clone(), slot: target, counter: Some((1, 0)) };
    let rel = |n: &str| format!("/fleet/{}-{target}/{n}", manifest.version);
    let mut text = format!("title fleet {} (slot {target})\nversion {}\n", manifest.version, manifest.version);
    if boot_files.contains(&"vmlinuz") {
        text += &format!("linux {}\n", rel("vmlinuz"));
    }
    if boot_files.contains(&"initrd.img") {
        text += &format!("initrd {}\n", rel("initrd.img"));
    }
    let part = format!("PARTLABEL=root-{target}");
    text += &format!(
        "options {} fleet.slot={target} roothash={} systemd.verity_root_data={part} systemd.verity_root_hash={part} systemd.verity_root_options=hash-offset={offset},data-blocks={} root=/dev/mapper/root ro\n",
        layout.cmdline.trim(),
        manifest.verity.root_hash,
        size / 4096,
    );
    let entries_dir = boot::entries_dir(&layout.esp);
    std::fs::create_dir_all(&entries_dir).map_err(io("create", &entries_dir))?;
    write_atomically(&entries_dir.join(entry.file_name()), text.as_bytes())?;
    Ok(Applied { manifest, slot: target, entry })
}

/// What a boot entry says about its slot's integrity: root hash, hash tree offset, image blocks.
pub fn entry_verity(entry_text: &str) -> Option<(String, u64, u64)> {
    let options = entry_text.lines().find_map(|l| l.strip_prefix("options "))?;
    let word = |key: &str| options.split_whitespace().find_map(|w| w.strip_prefix(key)).map(str::to_string);
    let root_hash = word("roothash=")?;
    let vopts = word("systemd.verity_root_options=")?;
    let opt = |key: &str| vopts.split(',').find_map(|o| o.strip_prefix(key)).and_then(|v| v.parse().ok());
    Some((root_hash, opt("hash-offset=")?, opt("data-blocks=")?))
}

/// A written slot against the signed root hash: the image's blocks, with its hash tree at `offset`.
pub fn check_slot(slot: &Path, image_size: u64, offset: u64, root_hash: &str) -> Result<(), ReleaseError> {
    release::check_verity(slot, slot, root_hash, Some((image_size, offset)))
}
