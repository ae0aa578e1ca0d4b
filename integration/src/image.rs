//! Lab machines that run the host image (`./lab up --image RELEASE_DIR`): what ships, booted as
//! systemd-nspawn containers, so the tests run against the image's own systemd, fleet-agent,
//! health check and update agent.
//!
//! Each machine has a disk of files under its directory: `disk/root-a.img`, `disk/root-b.img`
//! (the slots, as `fleet-update apply` writes them) and `disk/esp` (boot entries); and `var`, its
//! persistent /var (agent.toml, update.toml, its certificate). A `fleet-lab firmware` process per
//! machine plays what a container does not have: the boot loader (systemd-boot's counting, via
//! [`boot::select`]), dm-verity (a slot that fails its entry's root hash does not boot) and
//! systemd-bless-boot (the entry is blessed once `fleet-health.service` succeeded); it boots the
//! chosen slot (loop-mounted inside a private mount namespace, so nothing is left mounted when it
//! ends) and boots again when the machine reboots (nspawn's exit code 133).
//!
//! Releases offered to the machines' update agents go in [`updates_dir`], bound read-only at
//! `/run/fleet-updates` in every machine.

use crate::{lab_dir, process, HOST_IP};
use anyhow::{bail, Context, Result};
use fleet_host_image::{boot, slots};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// The release a machine is installed with, and the key it is checked against.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageSpec {
    pub release: PathBuf,
    pub public_key: PathBuf,
}

/// Where tests offer releases to the image machines' update agents.
pub fn updates_dir() -> PathBuf {
    lab_dir().join("updates")
}

/// The machine's persistent /var; its fleet configuration lives in `lib/fleet/etc` (/etc/fleet).
pub fn var_dir(machine_dir: &Path) -> PathBuf {
    machine_dir.join("var")
}

pub fn fleet_etc(machine_dir: &Path) -> PathBuf {
    var_dir(machine_dir).join("lib/fleet/etc")
}

fn layout(machine_dir: &Path) -> slots::Layout {
    let disk = machine_dir.join("disk");
    slots::Layout {
        slot_a: disk.join("root-a.img"),
        slot_b: disk.join("root-b.img"),
        esp: disk.join("esp"),
        cmdline: String::new(),
    }
}

/// The file the firmware appends one line to per boot: `<entry file> <version|-> <healthy|unhealthy|unverified>`.
pub fn boots_log(machine_dir: &Path) -> PathBuf {
    machine_dir.join("boots")
}

/// The factory install on first boot (version in slot a, blessed), and the update agent's
/// settings; a machine that was only powered off keeps its disk.
pub fn prepare(machine_dir: &Path, image: &ImageSpec, engine_port: u16) -> Result<()> {
    let layout = layout(machine_dir);
    let etc = fleet_etc(machine_dir);
    std::fs::create_dir_all(boot::entries_dir(&layout.esp))?;
    std::fs::create_dir_all(&etc)?;
    std::fs::create_dir_all(updates_dir())?;
    if boot::entries(&layout.esp)?.is_empty() {
        let applied = slots::apply(&image.release, &image.public_key, &layout, 'b')
            .with_context(|| format!("cannot install {} on {}", image.release.display(), machine_dir.display()))?;
        boot::bless(&layout.esp, &applied.entry.id())?;
    }
    // Inside the machine, the disk is at /run/fleet-disk and the offered releases at
    // /run/fleet-updates; the engines' FleetLock is on the bridge.
    let update = format!(
        "slot_a = \"/run/fleet-disk/root-a.img\"\nslot_b = \"/run/fleet-disk/root-b.img\"\nesp = \"/run/fleet-disk/esp\"\n\n\
         [agent]\nsource = \"/run/fleet-updates\"\ncheck_interval_secs = 2\n\n\
         [fleetlock]\nurl = \"https://{HOST_IP}:{engine_port}\"\nretry_secs = 1\n"
    );
    std::fs::write(etc.join("update.toml"), update)?;
    Ok(())
}

/// The `fleet-lab firmware` command line for a machine.
pub fn firmware_command(bin_dir: &Path, machine_dir: &Path, name: &str, uuid: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin_dir.join("fleet-lab"));
    cmd.arg("firmware").arg("--dir").arg(machine_dir).args(["--name", name, "--uuid", uuid]);
    cmd
}

fn log(machine_dir: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(boots_log(machine_dir)) {
        let _ = writeln!(f, "{line}");
    }
}

/// The firmware's loop: select an entry, check its slot, boot it, bless it when healthy; again
/// after a reboot; until the machine powers off or this process is told to stop (SIGTERM, which
/// powers the machine off first).
pub async fn firmware(machine_dir: &Path, name: &str, uuid: &str) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let layout = layout(machine_dir);
    let mnt = machine_dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    std::fs::create_dir_all("/run/systemd/nspawn")?;
    let mut unbootable = 0;
    loop {
        let entry = boot::select(&layout.esp)?.context("no boot entry left")?;
        let entries_dir = boot::entries_dir(&layout.esp);
        let text = std::fs::read_to_string(entries_dir.join(entry.file_name()))?;
        let (root_hash, offset, blocks) =
            slots::entry_verity(&text).with_context(|| format!("{}: no verity options", entry.file_name()))?;
        let slot = layout.slot(entry.slot).to_path_buf();
        if let Err(e) = slots::check_slot(&slot, blocks * 4096, offset, &root_hash) {
            tracing::warn!(entry = %entry.file_name(), error = %e, "slot fails dm-verity: not booted");
            log(machine_dir, &format!("{} - unverified", entry.file_name()));
            unbootable += 1;
            if unbootable > 4 {
                bail!("no entry boots");
            }
            continue;
        }
        unbootable = 0;
        let bus = machine_dir.join("bus");
        let _ = std::fs::remove_file(bus.join("system_bus_socket"));
        // A provisioned machine's kernel command line (`boot-args`: fleet.provision=...) and
        // config drive (`config-drive/`, given as /run/fleet-config: a container has no block
        // devices); a machine prepared by the lab has neither, and no etcd of its own.
        let (args, drive) = boot_args(machine_dir);
        // nspawn wants a tmpfs at /run/systemd/nspawn to boot a directory other than / here.
        let enter = crate::cgroup::enter_script(&crate::cgroup::prepare(name)?);
        let script = format!(
            "{enter}mount -t tmpfs tmpfs /run/systemd/nspawn && mount -t erofs -o ro,loop {slot} {mnt} && \
             exec systemd-nspawn -D {mnt} --volatile=overlay --register=no --keep-unit -M {name} --uuid={uuid} \
             --network-namespace-path=/run/netns/{name} --bind={var}:/var --bind={bus}:/run/dbus \
             --bind={disk}:/run/fleet-disk --bind-ro={updates}:/run/fleet-updates {drive}\
             --boot --quiet -- systemd.firstboot=off {args}",
            drive = drive,
            args = args,
            slot = slot.display(),
            mnt = mnt.display(),
            var = var_dir(machine_dir).display(),
            bus = bus.display(),
            disk = machine_dir.join("disk").display(),
            updates = updates_dir().display(),
        );
        let console = std::fs::OpenOptions::new().create(true).append(true).open(machine_dir.join("console.log"))?;
        let mut child = tokio::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .spawn()
            .context("cannot start systemd-nspawn")?;
        let assess = tokio::spawn(assess(machine_dir.to_path_buf(), layout.esp.clone(), entry.clone()));
        let status = tokio::select! {
            s = child.wait() => s?,
            _ = term.recv() => {
                if let Some(pid) = child.id() {
                    process::stop(pid, "systemd-nspawn", Duration::from_secs(15));
                }
                // Still in the shell before nspawn: nothing is booted yet.
                let _ = child.start_kill();
                let _ = child.wait().await;
                assess.abort();
                return Ok(());
            }
        };
        if !assess.is_finished() {
            log(machine_dir, &format!("{} {} ended before its health check did", entry.file_name(), entry.version));
        }
        assess.abort();
        // 133: the machine asked for a reboot.
        if status.code() != Some(133) {
            tracing::info!(%status, "machine powered off");
            return Ok(());
        }
    }
}

/// The words after nspawn's `--` and the config drive's bind option.
fn boot_args(machine_dir: &Path) -> (String, String) {
    let args = match std::fs::read_to_string(machine_dir.join(BOOT_ARGS)) {
        Ok(words) => words.split_whitespace().collect::<Vec<_>>().join(" "),
        Err(_) => "systemd.mask=etcd.service".to_string(),
    };
    let drive = machine_dir.join(CONFIG_DRIVE);
    let drive = if drive.is_dir() {
        format!("--bind-ro={}:{} ", drive.display(), fleet_host_image::provision::CONTAINER_DRIVE)
    } else {
        String::new()
    };
    (args, drive)
}

/// A provisioned machine's kernel command line, in its directory.
pub const BOOT_ARGS: &str = "boot-args";
/// A provisioned machine's config drive, in its directory.
pub const CONFIG_DRIVE: &str = "config-drive";

/// A machine booted from nothing but the image and its provisioning config: the factory install
/// only, an empty var.
pub fn prepare_blank(machine_dir: &Path, image: &ImageSpec) -> Result<()> {
    let layout = layout(machine_dir);
    std::fs::create_dir_all(boot::entries_dir(&layout.esp))?;
    std::fs::create_dir_all(var_dir(machine_dir))?;
    std::fs::create_dir_all(updates_dir())?;
    if boot::entries(&layout.esp)?.is_empty() {
        let applied = slots::apply(&image.release, &image.public_key, &layout, 'b')
            .with_context(|| format!("cannot install {} on {}", image.release.display(), machine_dir.display()))?;
        boot::bless(&layout.esp, &applied.entry.id())?;
    }
    Ok(())
}

/// systemd-bless-boot's part: the entry is blessed once the health check succeeded.
async fn assess(machine_dir: PathBuf, esp: PathBuf, entry: boot::Entry) {
    let address = format!("--address=unix:path={}", machine_dir.join("bus/system_bus_socket").display());
    let get = |what: &'static str, path: &'static str, iface: &'static str, prop: &'static str| {
        let address = address.clone();
        async move {
            let out = tokio::process::Command::new("busctl")
                .args([address.as_str(), what, "org.freedesktop.systemd1", path, iface, prop])
                .output()
                .await
                .ok()?;
            out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
    };
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let state = get(
            "get-property",
            "/org/freedesktop/systemd1/unit/fleet_2dhealth_2eservice",
            "org.freedesktop.systemd1.Unit",
            "ActiveState",
        )
        .await;
        match state.as_deref() {
            Some("s \"active\"") => {
                if entry.counter.is_some() {
                    if let Err(e) = boot::bless(&esp, &entry.id()) {
                        tracing::error!(entry = %entry.file_name(), error = %e, "cannot bless");
                    }
                }
                log(&machine_dir, &format!("{} {} healthy", entry.file_name(), entry.version));
                return;
            }
            Some("s \"failed\"") => {
                log(&machine_dir, &format!("{} {} unhealthy", entry.file_name(), entry.version));
                return;
            }
            _ => {}
        }
    }
}
