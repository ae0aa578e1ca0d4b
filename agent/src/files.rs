//! The agent's unit files, written and removed a pass's batch at a time, behind [`UnitFiles`]:
//! [`DiskUnitFiles`] is the real one (the `fleet-agent` binary's); [`MemoryUnitFiles`] is an
//! in-memory stand-in for the large-scale benchmarks, beside the simulated service manager that
//! reads them (`fleet-sim` runs ten thousand agents on one host, whose million small files cost
//! it a sixth of the host's CPU in the kernel: page allocation, copies and path walks that real
//! agents spend on their own machines).
//!
//! Each `tokio::fs` call is a trip to tokio's blocking pool: a hand-off and a wake-up of another
//! thread. A pass that writes a hundred units made three such trips per unit (write, rename, and
//! the check for a machine unit of the same name, which also ran on the async thread itself); the
//! hand-offs cost more than the files. A batch now makes one trip.

use crate::guard;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where the agent keeps the unit files it links into the service manager.
pub trait UnitFiles: Send + Sync + 'static {
    /// Where the service manager finds `name`'s file (what the agent links).
    fn path(&self, name: &str) -> PathBuf;
    /// Every unit file there now (an earlier run's): name and text, or why it cannot be read.
    fn read_all(&self) -> impl Future<Output = std::io::Result<Vec<(String, std::io::Result<String>)>>> + Send;
    /// Writes `files`, each whole or not at all; each with what became of it.
    fn write(&self, files: Vec<ToWrite>) -> impl Future<Output = Vec<(ToWrite, Written)>> + Send;
    /// Removes the files of `names`; those that could not be removed, with why (a file already
    /// gone counts as removed).
    fn remove(&self, names: &[String]) -> impl Future<Output = Vec<(String, std::io::Error)>> + Send;
}

/// Unit files in a directory (`units_dir`, tmpfs on a real machine), checked against the
/// machine's own units (see [`guard`]).
#[derive(Debug, Clone)]
pub struct DiskUnitFiles {
    pub dir: PathBuf,
    pub system_dirs: Vec<PathBuf>,
}

impl DiskUnitFiles {
    pub fn new(dir: PathBuf) -> Self {
        DiskUnitFiles { dir, system_dirs: guard::SYSTEM_UNIT_DIRS.iter().map(PathBuf::from).collect() }
    }
}

impl UnitFiles for DiskUnitFiles {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    async fn read_all(&self) -> std::io::Result<Vec<(String, std::io::Result<String>)>> {
        let mut out = Vec::new();
        let mut dir = tokio::fs::read_dir(&self.dir).await?;
        while let Some(entry) = dir.next_entry().await? {
            let name = entry.file_name().to_string_lossy().to_string();
            if fleet_model::UnitName::parse(&name).is_err() {
                continue;
            }
            let text = tokio::fs::read_to_string(entry.path()).await;
            out.push((name, text));
        }
        Ok(out)
    }

    async fn write(&self, files: Vec<ToWrite>) -> Vec<(ToWrite, Written)> {
        write(&self.dir, &self.system_dirs, files).await
    }

    async fn remove(&self, names: &[String]) -> Vec<(String, std::io::Error)> {
        remove(&self.dir, names).await
    }
}

/// Unit files in memory, by path: for benchmarks only (the simulated service manager reads
/// them from here, see [`crate::driver::SimulatedSystemd::with_files`]). A simulated machine has
/// no units of its own, so nothing is refused for shadowing one.
#[derive(Debug, Clone, Default)]
pub struct MemoryUnitFiles {
    dir: PathBuf,
    texts: Arc<Mutex<HashMap<PathBuf, String>>>,
}

impl MemoryUnitFiles {
    /// Files that read as if in `dir` (nothing is written there).
    pub fn new(dir: PathBuf) -> Self {
        MemoryUnitFiles { dir, texts: Arc::default() }
    }

    /// The text of the file at `path`, if there is one.
    pub fn text(&self, path: &Path) -> Option<String> {
        self.with(|t| t.get(path).cloned())
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<PathBuf, String>) -> T) -> T {
        // A poisoned lock means a panic elsewhere in the benchmark; carry on with its files.
        let mut guard = self.texts.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }
}

impl UnitFiles for MemoryUnitFiles {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    async fn read_all(&self) -> std::io::Result<Vec<(String, std::io::Result<String>)>> {
        Ok(self.with(|t| {
            t.iter()
                .filter_map(|(p, text)| Some((p.file_name()?.to_string_lossy().to_string(), Ok(text.clone()))))
                .collect()
        }))
    }

    async fn write(&self, files: Vec<ToWrite>) -> Vec<(ToWrite, Written)> {
        self.with(|t| {
            files
                .into_iter()
                .map(|f| {
                    t.insert(self.dir.join(&f.name), f.body.clone());
                    (f, Written::Ok)
                })
                .collect()
        })
    }

    async fn remove(&self, names: &[String]) -> Vec<(String, std::io::Error)> {
        self.with(|t| {
            for n in names {
                t.remove(&self.dir.join(n));
            }
        });
        Vec::new()
    }
}

/// One unit file to write.
pub struct ToWrite {
    pub name: String,
    /// Its content hash, as scheduled.
    pub hash: String,
    pub body: String,
    /// Refuse it if the machine has its own unit of this name (see [`guard`]); a file the agent
    /// already wrote once was checked then.
    pub check_shadowing: bool,
}

/// What became of a unit file the agent was to write.
#[derive(Debug)]
pub enum Written {
    Ok,
    /// Not written: the machine's own unit file of that name.
    Shadows(PathBuf),
    Failed(std::io::Error),
}

/// Writes `files` into `dir`, each through a temporary name and a rename (systemd never reads
/// half a file), in one blocking task; each file with what became of it.
async fn write(dir: &Path, system_dirs: &[PathBuf], files: Vec<ToWrite>) -> Vec<(ToWrite, Written)> {
    if files.is_empty() {
        return Vec::new();
    }
    let (dir, system_dirs) = (dir.to_path_buf(), system_dirs.to_vec());
    // If the task panicked its files are unknown: none is reported, so none is recorded as
    // written, and the caller makes the pass again.
    in_blocking_pool(move || {
        files
            .into_iter()
            .map(|f| {
                let done = write_one(&dir, &system_dirs, &f);
                (f, done)
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// Runs `f` on tokio's blocking pool (one hand-off for a whole batch); `None` if it panicked.
async fn in_blocking_pool<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(done) => Some(done),
        Err(e) => {
            tracing::error!(error = %e, "a unit file task failed");
            None
        }
    }
}

fn write_one(dir: &Path, system_dirs: &[PathBuf], f: &ToWrite) -> Written {
    if f.check_shadowing {
        if let Some(own) = guard::shadowed_system_unit(&f.name, system_dirs, dir) {
            return Written::Shadows(own);
        }
    }
    let path = dir.join(&f.name);
    let tmp = dir.join(format!(".{}.tmp", f.name));
    match std::fs::write(&tmp, f.body.as_bytes()).and_then(|()| std::fs::rename(&tmp, &path)) {
        Ok(()) => Written::Ok,
        Err(e) => Written::Failed(e),
    }
}

/// Removes the unit files of `names` from `dir` in one blocking task; the ones that could not be
/// removed, with why (a file already gone counts as removed).
async fn remove(dir: &Path, names: &[String]) -> Vec<(String, std::io::Error)> {
    if names.is_empty() {
        return Vec::new();
    }
    let (dir, batch) = (dir.to_path_buf(), names.to_vec());
    let removed = in_blocking_pool(move || {
        batch
            .into_iter()
            .filter_map(|n| match std::fs::remove_file(dir.join(&n)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Some((n, e)),
                _ => None,
            })
            .collect()
    });
    removed.await.unwrap_or_else(|| {
        names.iter().map(|n| (n.clone(), std::io::Error::other("the removal task failed"))).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_is_written_whole_except_what_shadows_a_machine_unit() {
        let root = std::env::temp_dir().join(format!("fleet-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (system, units) = (root.join("lib"), root.join("units"));
        for d in [&system, &units] {
            std::fs::create_dir_all(d).expect("dir");
        }
        std::fs::write(system.join("ssh.service"), "[Service]\n").expect("write");
        let to = |name: &str, body: &str, check_shadowing| ToWrite {
            name: name.into(),
            hash: String::new(),
            body: body.into(),
            check_shadowing,
        };
        let out = write(
            &units,
            std::slice::from_ref(&system),
            vec![
                to("a.service", "[Service]\nExecStart=/bin/a\n", true),
                to("ssh.service", "x", true),
                to("b.service", "b", false),
            ],
        )
        .await;
        let out: Vec<Written> = out.into_iter().map(|(_, w)| w).collect();
        assert!(matches!(out[0], Written::Ok), "{out:?}");
        assert!(matches!(&out[1], Written::Shadows(p) if *p == system.join("ssh.service")), "{out:?}");
        assert!(matches!(out[2], Written::Ok), "{out:?}");
        assert_eq!(std::fs::read_to_string(units.join("a.service")).expect("a"), "[Service]\nExecStart=/bin/a\n");
        assert!(!units.join("ssh.service").exists());
        assert!(!units.join(".a.service.tmp").exists(), "the temporary name is renamed away");
        // A file that cannot be written is reported as such, the rest written.
        let out = write(&root.join("missing"), &[], vec![to("c.service", "c", false)]).await;
        assert!(matches!(out[0].1, Written::Failed(_)), "{:?}", out[0].1);

        let failed = remove(&units, &["a.service".into(), "gone.service".into(), "b.service".into()]).await;
        assert!(failed.is_empty(), "{failed:?}");
        assert!(!units.join("a.service").exists() && !units.join("b.service").exists());
        let _ = std::fs::remove_dir_all(&root);
    }
}
