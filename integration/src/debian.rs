//! Fresh Debian 12 machines for the package tests: the packages `./lab package` built, minimal
//! bootstrap trees made by mmdebstrap (never the host's own root), commands run in such a tree
//! (as an installer does) or in a machine booted from one.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The packages `./lab package` built (target/debian/*.deb); None when there are none outside
/// CI, a failure in CI.
pub fn built_debs() -> Option<Vec<PathBuf>> {
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

/// Runs `cmd`; its stdout, or an error with everything it printed.
pub fn run(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{what}: cannot run"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{what} failed ({}):\n{text}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A bootstrap of Debian 12 with `packages` (comma-separated), as a tar cached in
/// /var/cache/fleet-lab by its package list: minutes to make, seconds to unpack.
pub fn bootstrap(packages: &str) -> Result<PathBuf> {
    let cache = Path::new("/var/cache/fleet-lab");
    std::fs::create_dir_all(cache).context("cache dir")?;
    let base = cache.join(format!("bookworm-{}.tar", packages.replace(',', "+")));
    if !base.exists() {
        let partial = base.with_extension("partial.tar");
        run(
            "mmdebstrap",
            Command::new("mmdebstrap").args([
                "--quiet",
                "--variant=minbase",
                &format!("--include={packages}"),
                "bookworm",
                &partial.display().to_string(),
                "http://deb.debian.org/debian",
            ]),
        )?;
        std::fs::rename(&partial, &base).context("cache the bootstrap")?;
    }
    Ok(base)
}

/// A fresh tree at `root` from the bootstrap with `packages`.
pub fn fresh_tree(root: &Path, packages: &str) -> Result<()> {
    let base = bootstrap(packages)?;
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root).context("root dir")?;
    run("unpack the bootstrap", Command::new("tar").arg("-C").arg(root).arg("-xf").arg(&base))?;
    Ok(())
}

/// A command inside the tree: a container, not booted, as apt runs in an installer. Like the
/// lab's machines, not registered with machined and kept in the caller's unit; in a mount
/// namespace of its own with a tmpfs at /run/systemd/nspawn, which nspawn wants for a directory
/// other than /.
pub fn in_tree(root: &Path, args: &[&str]) -> Command {
    let _ = std::fs::create_dir_all("/run/systemd/nspawn");
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("mount -t tmpfs tmpfs /run/systemd/nspawn && exec systemd-nspawn \"$@\"")
        .args(["sh", "--quiet", "--pipe", "--register=no", "--keep-unit", "--machine=fl-pkg", "-D"])
        .arg(root)
        .arg("--")
        .args(args);
    cmd
}

/// A machine booted from a tree: systemd as its init, in network namespace `netns` (made by
/// [`crate::net::add_machine_netns`]), in a cgroup of its own.
#[derive(Debug)]
pub struct Booted {
    pub name: String,
    pub root: PathBuf,
    /// systemd-nspawn's PID.
    pub pid: u32,
}

impl Booted {
    /// Boots `root` as machine `hostname` (machine id `uuid`) with the lab's network namespace
    /// `netns`; its console goes to `console`.
    pub fn boot(root: &Path, hostname: &str, uuid: &str, netns: &str, console: &Path) -> Result<Booted> {
        let _ = std::fs::create_dir_all("/run/systemd/nspawn");
        let enter = crate::cgroup::enter_script(&crate::cgroup::prepare(netns)?);
        let script = format!(
            "{enter}mount -t tmpfs tmpfs /run/systemd/nspawn && exec systemd-nspawn -D {root} --register=no \
             --keep-unit -M {hostname} --uuid={uuid} --network-namespace-path=/run/netns/{netns} \
             --boot --quiet -- systemd.firstboot=off",
            root = root.display(),
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c", &script]);
        let pid = crate::process::spawn_logged(cmd, console)?;
        Ok(Booted { name: hostname.to_string(), root: root.to_path_buf(), pid })
    }

    /// The machine's init (systemd), once nspawn has started it.
    pub fn init_pid(&self) -> Option<u32> {
        crate::process::children(self.pid).into_iter().next()
    }

    /// A command run inside the booted machine, as root in /root with a clean environment.
    pub fn command(&self, script: &str) -> Result<Command> {
        let Some(init) = self.init_pid() else { bail!("machine {} is not running", self.name) };
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &init.to_string(), "-a", "--", "env", "-i"])
            .args(["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"])
            .args(["DEBIAN_FRONTEND=noninteractive", "TERM=dumb", "sh", "-euc"])
            .arg(format!("cd /root\n{script}"));
        Ok(cmd)
    }

    /// Runs `script` in the machine; its output, or an error with all it printed. Killed after
    /// `limit`.
    pub fn sh(&self, script: &str, limit: Duration) -> Result<String> {
        let out = crate::testkit::output_within(self.command(script)?, limit)
            .with_context(|| format!("on {}: {script}", self.name))?;
        let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("on {} ({}):\n{script}\nprinted:\n{o}{e}", self.name, out.status);
        }
        Ok(format!("{o}{e}"))
    }

    /// Waits until the machine's systemd reports it booted (`running` or `degraded`).
    pub fn wait_booted(&self, limit: Duration) -> Result<()> {
        let until = std::time::Instant::now() + limit;
        let mut last = String::from("not started");
        while std::time::Instant::now() < until {
            if !crate::process::alive(self.pid) {
                bail!("machine {} exited while booting", self.name);
            }
            if let Ok(cmd) = self.command("systemctl is-system-running || true") {
                if let Ok(out) = crate::testkit::output_within(cmd, Duration::from_secs(10)) {
                    last = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    if last == "running" || last == "degraded" {
                        return Ok(());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        bail!("machine {} did not boot within {limit:?} (last: {last})", self.name)
    }

    /// True while the machine runs.
    pub fn alive(&self) -> bool {
        crate::process::alive(self.pid)
    }

    /// Powers the machine off (SIGTERM to nspawn), killing it after `grace`, and removes its
    /// cgroup.
    pub fn stop(&self, grace: Duration, cgroup: &str) {
        if self.alive() {
            crate::process::stop(self.pid, "systemd-nspawn", grace);
        }
        crate::cgroup::remove(cgroup);
    }
}
