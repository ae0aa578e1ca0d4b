//! Boot entries with automatic boot assessment, as systemd-boot and systemd-bless-boot handle
//! them (systemd's "Automatic Boot Assessment"): a new entry is written with one try left,
//! `fleet-<version>-<slot>+1-0.conf`. The boot loader counts the try down before booting it
//! (`+0-1`); if the system reaches `boot-complete.target` (our health unit gates it),
//! systemd-bless-boot renames the entry without a counter, for good. An entry with no tries left
//! is bad and sorts last, so the previous slot's entry boots next time: that is the rollback.
//!
//! [`select`] plays the boot loader's part for the fast test tier (systemd-nspawn has no
//! firmware); [`bless`] and [`mark_bad`] are systemd-bless-boot's.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

/// One entry of `<esp>/loader/entries`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub version: String,
    pub slot: char,
    /// Tries left and tries done; `None` once blessed (or for an entry never counted).
    pub counter: Option<(u32, u32)>,
}

impl Entry {
    /// The entry's name without its counter: what identifies it across renames.
    pub fn id(&self) -> String {
        format!("fleet-{}-{}", self.version, self.slot)
    }

    pub fn file_name(&self) -> String {
        match self.counter {
            Some((left, done)) => format!("{}+{left}-{done}.conf", self.id()),
            None => format!("{}.conf", self.id()),
        }
    }

    pub fn is_bad(&self) -> bool {
        matches!(self.counter, Some((0, _)))
    }

    pub fn parse(file_name: &str) -> Option<Entry> {
        let stem = file_name.strip_suffix(".conf")?.strip_prefix("fleet-")?;
        let (base, counter) = match stem.rsplit_once('+') {
            Some((base, c)) => {
                let (left, done) = c.split_once('-').unwrap_or((c, "0"));
                (base, Some((left.parse().ok()?, done.parse().ok()?)))
            }
            None => (stem, None),
        };
        let (version, slot) = base.rsplit_once('-')?;
        let slot = match slot {
            "a" => 'a',
            "b" => 'b',
            _ => return None,
        };
        (!version.is_empty()).then(|| Entry { version: version.into(), slot, counter })
    }
}

/// Compares versions as systemd-boot does (runs of digits numerically, the rest bytewise).
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (&a[..da], &b[..db]);
                let strip = |n: &[u8]| n.iter().skip_while(|c| **c == b'0').count();
                let ord = strip(na).cmp(&strip(nb)).then_with(|| {
                    let (ta, tb) = (&na[na.len() - strip(na)..], &nb[nb.len() - strip(nb)..]);
                    ta.cmp(tb)
                });
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

pub fn entries_dir(esp: &Path) -> PathBuf {
    esp.join("loader/entries")
}

/// The entries, in the boot loader's order: good before bad, newer version first.
pub fn entries(esp: &Path) -> std::io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let dir = entries_dir(esp);
    let read = match std::fs::read_dir(&dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in read {
        if let Some(entry) = e?.file_name().to_str().and_then(Entry::parse) {
            out.push(entry);
        }
    }
    out.sort_by(|a, b| a.is_bad().cmp(&b.is_bad()).then_with(|| version_cmp(&b.version, &a.version)));
    Ok(out)
}

fn rename(esp: &Path, from: &Entry, to: &Entry) -> std::io::Result<()> {
    let dir = entries_dir(esp);
    std::fs::rename(dir.join(from.file_name()), dir.join(to.file_name()))?;
    std::fs::File::open(&dir)?.sync_all()
}

/// The boot loader's choice, with the try counted down before it boots.
pub fn select(esp: &Path) -> std::io::Result<Option<Entry>> {
    let Some(first) = entries(esp)?.into_iter().next() else { return Ok(None) };
    if let Some((left, done)) = first.counter.filter(|(left, _)| *left > 0) {
        let counted = Entry { counter: Some((left - 1, done + 1)), ..first.clone() };
        rename(esp, &first, &counted)?;
        return Ok(Some(counted));
    }
    Ok(Some(first))
}

fn find(esp: &Path, id: &str) -> std::io::Result<Entry> {
    entries(esp)?
        .into_iter()
        .find(|e| e.id() == id)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("no boot entry {id}")))
}

/// systemd-bless-boot `good`: the entry loses its counter.
pub fn bless(esp: &Path, id: &str) -> std::io::Result<Entry> {
    let e = find(esp, id)?;
    let good = Entry { counter: None, ..e.clone() };
    if e != good {
        rename(esp, &e, &good)?;
    }
    Ok(good)
}

/// systemd-bless-boot `bad`: no tries left.
pub fn mark_bad(esp: &Path, id: &str) -> std::io::Result<Entry> {
    let e = find(esp, id)?;
    let bad = Entry { counter: Some((0, e.counter.map(|c| c.1).unwrap_or(0))), ..e.clone() };
    if e != bad {
        rename(esp, &e, &bad)?;
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_round_trip() {
        for name in ["fleet-2026.11.26-a+1-0.conf", "fleet-2-b+0-1.conf", "fleet-1.2.3-rc1-a.conf"] {
            assert_eq!(Entry::parse(name).map(|e| e.file_name()).as_deref(), Some(name));
        }
        assert_eq!(Entry::parse("fleet-1-c.conf"), None);
        assert_eq!(Entry::parse("debian-1-a.conf"), None);
        assert!(Entry::parse("fleet-2-b+0-1.conf").is_some_and(|e| e.is_bad()));
    }

    #[test]
    fn versions_compare_like_systemd_boot() {
        assert_eq!(version_cmp("2026.11.9", "2026.11.10"), Ordering::Less);
        assert_eq!(version_cmp("10", "9"), Ordering::Greater);
        assert_eq!(version_cmp("1.0", "1.0"), Ordering::Equal);
        assert_eq!(version_cmp("007", "7"), Ordering::Equal);
    }

    #[test]
    fn a_new_entry_gets_one_try_then_is_blessed_or_falls_back() {
        let esp = std::env::temp_dir().join(format!("fleet-boot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&esp);
        std::fs::create_dir_all(entries_dir(&esp)).expect("dir");
        let touch = |n: &str| std::fs::write(entries_dir(&esp).join(n), "title x\n").expect("write");
        touch("fleet-1-a.conf");
        touch("fleet-2-b+1-0.conf");
        // The new entry boots, its try counted.
        let booted = select(&esp).expect("select").expect("an entry");
        assert_eq!(booted.file_name(), "fleet-2-b+0-1.conf");
        // Not blessed: next boot falls back to the old slot.
        assert_eq!(select(&esp).expect("select").map(|e| e.id()).as_deref(), Some("fleet-1-a"));
        // Blessed instead: it stays the default.
        bless(&esp, "fleet-2-b").expect("bless");
        assert_eq!(select(&esp).expect("select").map(|e| e.file_name()).as_deref(), Some("fleet-2-b.conf"));
        mark_bad(&esp, "fleet-2-b").expect("bad");
        assert_eq!(select(&esp).expect("select").map(|e| e.id()).as_deref(), Some("fleet-1-a"));
        let _ = std::fs::remove_dir_all(&esp);
    }
}
