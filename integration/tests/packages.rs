//! The Debian packages `./lab package` built (target/debian/), installed with apt into a fresh
//! Debian 12 tree made by mmdebstrap (a minimal bootstrap with systemd, not the host's own root),
//! as a person following docs/install.md would: what they install, that nothing starts by
//! itself, that the conffiles are conffiles, and that removing and purging leave nothing behind.
//! The last phase of `./lab test`; skipped outside CI when no packages were built.

use fleet_integration::debian::{built_debs, fresh_tree, in_tree, run};
use std::path::Path;

/// The fresh tree's base (docs/install.md's machines add etcd-server).
const BASE_PACKAGES: &str = "systemd,systemd-sysv,dbus,apt";

/// Runs a command inside the tree; its output, or a failure with everything it printed.
fn inside(root: &Path, args: &[&str]) -> String {
    run(&format!("in the fresh tree: {}", args.join(" ")), &mut in_tree(root, args)).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn the_packages_install_into_a_fresh_debian_and_leave_nothing_when_purged() {
    let Some(debs) = built_debs() else { return };
    let version = env!("CARGO_PKG_VERSION");
    let dir = fleet_integration::process::scratch_dir(&std::env::temp_dir(), "fleet-packages").expect("scratch dir");
    let root = dir.join("root");
    fresh_tree(&root, BASE_PACKAGES).expect("a fresh Debian tree");
    std::fs::create_dir_all(root.join("debs")).expect("debs dir");
    let mut inner = Vec::new();
    for d in &debs {
        let name = d.file_name().expect("file name").to_string_lossy().into_owned();
        std::fs::copy(d, root.join("debs").join(&name)).expect("copy deb");
        inner.push(format!("/debs/{name}"));
    }
    let mut install = vec!["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q"];
    install.extend(inner.iter().map(String::as_str));
    inside(&root, &install);

    // Each package installed, at the workspace's version.
    let packages = ["fleet-agent", "fleet-engine", "fleet-update", "fleetctl"];
    let mut query = vec!["dpkg-query", "-W", "-f", "${Package} ${Version} ${Status}\n"];
    query.extend(packages);
    let listed = inside(&root, &query);
    for p in packages {
        let line = format!("{p} {version}-1 install ok installed");
        assert!(listed.lines().any(|l| l == line), "{line:?} not in:\n{listed}");
    }
    // The binaries run.
    assert!(inside(&root, &["fleetctl", "version"]).contains(version));
    for bin in ["fleet-engine", "fleet-agent", "fleet-image", "fleet-pki", "fleet-update"] {
        inside(&root, &[bin, "--help"]);
    }
    // Configuration is the admin's: conffiles, kept on upgrade and removal.
    let conffiles = inside(&root, &["dpkg-query", "-W", "-f", "${Conffiles}\n", "fleet-agent", "fleet-engine"]);
    assert!(conffiles.contains("/etc/fleet/agent.toml") && conffiles.contains("/etc/fleet/engine.toml"), "{conffiles}");
    // The engine's socket group, and its state directories once tmpfiles ran.
    assert!(inside(&root, &["getent", "group", "fleet"]).starts_with("fleet:"));
    inside(&root, &["systemd-tmpfiles", "--create"]);
    let pki = inside(&root, &["stat", "-c", "%a %U", "/var/lib/fleet/pki"]);
    assert_eq!(pki.trim(), "700 root", "fleet-pki's directory");
    // The units are installed, and neither enabled nor started: they need configuration first.
    for unit in ["fleet-engine.service", "fleet-agent.service"] {
        let text = inside(&root, &["cat", &format!("/usr/lib/systemd/system/{unit}")]);
        assert!(text.contains("ExecReload="), "{unit} reloads:\n{text}");
        let enabled = in_tree(&root, &["systemctl", "is-enabled", unit]).output().expect("systemctl is-enabled");
        assert_eq!(String::from_utf8_lossy(&enabled.stdout).trim(), "disabled", "{unit}");
    }
    // fleetctl's man page and completions where man and the shells look.
    for f in [
        "/usr/share/man/man1/fleetctl.1.gz",
        "/usr/share/bash-completion/completions/fleetctl",
        "/usr/share/zsh/vendor-completions/_fleetctl",
        "/usr/share/fish/vendor_completions.d/fleetctl.fish",
    ] {
        inside(&root, &["test", "-s", f]);
    }
    inside(&root, &["gzip", "-t", "/usr/share/man/man1/fleetctl.1.gz"]);

    // Removing keeps the configuration; purging removes it and every file of the package.
    inside(&root, &["apt-get", "remove", "-y", "-q", "fleet-agent"]);
    inside(&root, &["test", "-f", "/etc/fleet/agent.toml"]);
    inside(&root, &["test", "!", "-e", "/usr/bin/fleet-agent"]);
    inside(&root, &["apt-get", "purge", "-y", "-q", "fleet-agent", "fleet-engine"]);
    inside(&root, &["test", "!", "-e", "/etc/fleet/agent.toml"]);
    inside(&root, &["test", "!", "-e", "/etc/fleet/engine.toml"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian versions come from the workspace: the changelog's first entry must name its version,
/// or the packages and their changelog disagree (lintian does not check this).
#[test]
fn the_changelog_names_the_workspace_version() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/changelog");
    let text = std::fs::read_to_string(&path).expect("integration/packaging/changelog");
    let first = text.lines().next().unwrap_or_default();
    let want = format!("fleet ({}-", env!("CARGO_PKG_VERSION"));
    assert!(first.starts_with(&want), "{}: first line {first:?} should start with {want:?}", path.display());
}
