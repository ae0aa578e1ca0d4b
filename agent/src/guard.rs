//! What a scheduled unit may not be: a unit the machine already has. The agent links fleet's
//! unit files into `/run/systemd/system`, which systemd prefers over the vendor directories, so
//! without this check a unit named `ssh.service` or `systemd-journald.service` would replace the
//! machine's own. Unit names are validated before they reach here (no `/`, no NUL, ASCII only),
//! so a name cannot leave the units directory; this closes the other way out.

use std::path::{Path, PathBuf};

/// Where systemd finds unit files other than fleet's (see systemd.unit(5), "Unit File Load Path").
pub const SYSTEM_UNIT_DIRS: &[&str] = &[
    "/etc/systemd/system.control",
    "/run/systemd/system.control",
    "/run/systemd/transient",
    "/run/systemd/generator.early",
    "/etc/systemd/system",
    "/etc/systemd/system.attached",
    "/run/systemd/system",
    "/run/systemd/system.attached",
    "/run/systemd/generator",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
    "/run/systemd/generator.late",
];

/// Names never taken by a fleet unit, whatever the machine has installed.
const RESERVED: &[&str] = &["fleet-agent.service", "fleet-engine.service", "etcd.service", "init.scope", "-.slice"];

/// The machine's own file that unit `name` (or its template) would shadow, if any. A file that is
/// a link into `units_dir` is fleet's own and does not count.
pub fn shadowed_system_unit(name: &str, dirs: &[PathBuf], units_dir: &Path) -> Option<PathBuf> {
    if RESERVED.contains(&name) || name.starts_with("systemd-") {
        return Some(PathBuf::from(name));
    }
    let template = name.split_once('@').and_then(|(prefix, rest)| {
        let suffix = rest.rsplit_once('.').map(|(_, s)| s)?;
        Some(format!("{prefix}@.{suffix}"))
    });
    for dir in dirs {
        for candidate in std::iter::once(name.to_string()).chain(template.clone()) {
            let path = dir.join(&candidate);
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if meta.file_type().is_symlink() {
                if let Ok(target) = std::fs::read_link(&path) {
                    if target.starts_with(units_dir) {
                        continue;
                    }
                }
            }
            return Some(path);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_units_and_their_templates_are_not_shadowed() {
        let root = std::env::temp_dir().join(format!("fleet-guard-{}", std::process::id()));
        let (vendor, runtime, units) = (root.join("lib"), root.join("run"), root.join("units"));
        for d in [&vendor, &runtime, &units] {
            std::fs::create_dir_all(d).expect("dir");
        }
        std::fs::write(vendor.join("ssh.service"), "[Service]\n").expect("write");
        std::fs::write(vendor.join("getty@.service"), "[Service]\n").expect("write");
        std::fs::write(units.join("web.service"), "[Service]\n").expect("write");
        let _ = std::os::unix::fs::symlink(units.join("web.service"), runtime.join("web.service"));
        std::fs::write(runtime.join("other.service"), "[Service]\n").expect("write");
        let dirs = vec![runtime.clone(), vendor.clone()];

        assert_eq!(shadowed_system_unit("ssh.service", &dirs, &units), Some(vendor.join("ssh.service")));
        assert_eq!(shadowed_system_unit("getty@tty1.service", &dirs, &units), Some(vendor.join("getty@.service")));
        assert_eq!(shadowed_system_unit("other.service", &dirs, &units), Some(runtime.join("other.service")));
        // fleet's own link, and names the machine does not have, are fine.
        assert_eq!(shadowed_system_unit("web.service", &dirs, &units), None);
        assert_eq!(shadowed_system_unit("hello@1.service", &dirs, &units), None);
        assert!(shadowed_system_unit("fleet-agent.service", &dirs, &units).is_some());
        assert!(shadowed_system_unit("systemd-journald.service", &[], &units).is_some());
        let _ = std::fs::remove_dir_all(&root);
    }
}
