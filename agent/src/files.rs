//! The agent's unit files on disk, written and removed a pass's batch at a time.
//!
//! Each `tokio::fs` call is a trip to tokio's blocking pool: a hand-off and a wake-up of another
//! thread. A pass that writes a hundred units made three such trips per unit (write, rename, and
//! the check for a machine unit of the same name, which also ran on the async thread itself); the
//! hand-offs cost more than the files. A batch now makes one trip.

use crate::guard;
use std::path::{Path, PathBuf};

/// One unit file to write.
pub(crate) struct ToWrite {
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
pub(crate) enum Written {
    Ok,
    /// Not written: the machine's own unit file of that name.
    Shadows(PathBuf),
    Failed(std::io::Error),
}

/// Writes `files` into `dir`, each through a temporary name and a rename (systemd never reads
/// half a file), in one blocking task; each file with what became of it.
pub(crate) async fn write(dir: &Path, system_dirs: &[PathBuf], files: Vec<ToWrite>) -> Vec<(ToWrite, Written)> {
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
pub(crate) async fn remove(dir: &Path, names: &[String]) -> Vec<(String, std::io::Error)> {
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
