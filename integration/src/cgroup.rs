//! Each machine's own cgroup subtree.
//!
//! With `--keep-unit` and no machined, systemd-nspawn puts a container in a `payload` child of the
//! cgroup nspawn was started in. Machines started from one process would therefore share one
//! subtree, and a unit of the same name on two machines would share one cgroup: when one
//! machine's systemd removed its (empty) cgroup after a stop, another machine's systemd could be
//! about to move a new process into it, which then failed with `status=219/CGROUP` ("Failed to
//! attach to cgroup ...: No such file or directory"). Every machine is started in a cgroup of its
//! own, named after it, in each hierarchy systemd uses.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The hierarchies systemd manages: the unified one, and the named v1 `systemd` one on a hybrid
/// host. Each as (mount point, this process's path in it).
fn systemd_hierarchies() -> Result<Vec<(PathBuf, String)>> {
    let own = std::fs::read_to_string("/proc/self/cgroup").context("cannot read /proc/self/cgroup")?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else { continue };
        let unified = id == "0" && controllers.is_empty();
        if !unified && controllers != "name=systemd" {
            continue;
        }
        if let Some(mount) = mount_point(&mounts, unified) {
            out.push((mount, path.to_string()));
        }
    }
    Ok(out)
}

/// Where a hierarchy is mounted, from /proc/self/mountinfo
/// (`id parent dev root mountpoint opts [optional...] - fstype source superopts`).
fn mount_point(mountinfo: &str, unified: bool) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split(' ');
        let (fstype, _source, superopts) = (r.next()?, r.next()?, r.next().unwrap_or(""));
        let ours = if unified {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && superopts.split(',').any(|o| o == "name=systemd")
        };
        ours.then(|| left.split(' ').nth(4).map(PathBuf::from)).flatten()
    })
}

/// The machine's cgroup directories (one per hierarchy), emptied of what an earlier boot left
/// and created afresh.
pub fn prepare(machine: &str) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for (mount, path) in systemd_hierarchies()? {
        let dir = mount.join(path.trim_start_matches('/')).join(machine);
        remove_tree(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create cgroup {}", dir.display()))?;
        dirs.push(dir);
    }
    Ok(dirs)
}

/// A shell prefix that moves the shell into `dirs`, to be followed by `exec systemd-nspawn ...`
/// (so nspawn, and the machine below it, start there).
pub fn enter_script(dirs: &[PathBuf]) -> String {
    dirs.iter().map(|d| format!("echo $$ > '{}/cgroup.procs' && ", d.display())).collect()
}

/// Removes the machine's cgroups once it is down. Cgroups that still hold processes stay.
pub fn remove(machine: &str) {
    if let Ok(hierarchies) = systemd_hierarchies() {
        for (mount, path) in hierarchies {
            remove_tree(&mount.join(path.trim_start_matches('/')).join(machine));
        }
    }
}

/// Cgroups are removed leaves first; their control files go with them.
fn remove_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        tracing::debug!(cgroup = %dir.display(), error = %e, "cgroup not removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
28 25 0:25 / /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory";

    #[test]
    fn finds_the_unified_and_the_named_systemd_hierarchy() {
        assert_eq!(mount_point(HYBRID, true), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(mount_point(HYBRID, false), Some(PathBuf::from("/sys/fs/cgroup/systemd")));
        let v2_only = "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(mount_point(v2_only, true), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(mount_point(v2_only, false), None);
    }

    #[test]
    fn the_script_moves_the_shell_into_every_directory() {
        let s = enter_script(&[
            PathBuf::from("/sys/fs/cgroup/unified/fl-m1"),
            PathBuf::from("/sys/fs/cgroup/systemd/fl-m1"),
        ]);
        assert_eq!(
            s,
            "echo $$ > '/sys/fs/cgroup/unified/fl-m1/cgroup.procs' && echo $$ > '/sys/fs/cgroup/systemd/fl-m1/cgroup.procs' && "
        );
    }
}
