//! The Debian packages `./lab package` built (target/debian/), installed with apt into a fresh
//! Debian 12 tree made by mmdebstrap (a minimal bootstrap with systemd, not the host's own root),
//! as a person following docs/install.md would: what they install, that nothing starts by
//! itself, that the conffiles are conffiles, and that removing and purging leave nothing behind.
//! The last phase of `./lab test`; skipped outside CI when no packages were built.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The fresh tree's base, cached by its package list (minutes to make; seconds to unpack).
const BASE_PACKAGES: &str = "systemd,systemd-sysv,dbus,apt";

fn debs() -> Option<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    debs.sort();
    if debs.is_empty() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but no packages in {}: ./lab package first",
            dir.display()
        );
        return None;
    }
    Some(debs)
}

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh Debian 12 tree in `dir`, from the cached bootstrap (made first if needed).
fn fresh_tree(dir: &Path) -> PathBuf {
    let cache = Path::new("/var/cache/fleet-lab");
    std::fs::create_dir_all(cache).expect("cache dir");
    let base = cache.join(format!("bookworm-{}.tar", BASE_PACKAGES.replace(',', "+")));
    if !base.exists() {
        let partial = base.with_extension("partial.tar");
        run(
            "mmdebstrap",
            Command::new("mmdebstrap").args([
                "--quiet",
                "--variant=minbase",
                &format!("--include={BASE_PACKAGES}"),
                "bookworm",
                &partial.display().to_string(),
                "http://deb.debian.org/debian",
            ]),
        );
        std::fs::rename(&partial, &base).expect("cache the bootstrap");
    }
    let root = dir.join("root");
    std::fs::create_dir_all(&root).expect("root dir");
    run("unpack the bootstrap", Command::new("tar").arg("-C").arg(&root).arg("-xf").arg(&base));
    root
}

/// A command inside the tree: a container, not booted, as apt runs in an installer. Like the
/// lab's machines, not registered with machined and kept in the caller's unit; in a mount
/// namespace of its own with a tmpfs at /run/systemd/nspawn, which nspawn wants for a directory
/// other than /.
fn nspawn(root: &Path, args: &[&str]) -> Command {
    std::fs::create_dir_all("/run/systemd/nspawn").expect("nspawn dir");
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs tmpfs /run/systemd/nspawn && exec systemd-nspawn \"$@\"")
        .args(["sh", "--quiet", "--pipe", "--register=no", "--keep-unit", "--machine=fl-pkg", "-D"])
        .arg(root)
        .arg("--")
        .args(args);
    cmd
}

/// Runs a command inside the tree; its output, or a failure with everything it printed.
fn inside(root: &Path, args: &[&str]) -> String {
    run(&format!("in the fresh tree: {}", args.join(" ")), &mut nspawn(root, args))
}

#[test]
fn the_packages_install_into_a_fresh_debian_and_leave_nothing_when_purged() {
    let Some(debs) = debs() else { return };
    let version = env!("CARGO_PKG_VERSION");
    let dir = std::env::temp_dir().join(format!("fleet-packages-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = fresh_tree(&dir);
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
    for bin in ["fleet-engine", "fleet-agent", "fleet-pki", "fleet-update"] {
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
        let enabled = nspawn(&root, &["systemctl", "is-enabled", unit]).output().expect("systemctl is-enabled");
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
