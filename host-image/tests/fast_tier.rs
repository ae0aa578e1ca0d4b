//! The fast test tier of the host image: built releases booted as systemd-nspawn machines, with a
//! harness playing the parts a container does not have. The boot loader's (systemd-boot's
//! counting rules: [`boot::select`]), dm-verity's (a slot that does not match its entry's root
//! hash does not boot) and systemd-bless-boot's (the boot is blessed once `fleet-health.service`,
//! which gates boot-complete.target, succeeded). Everything else is the image's own: its systemd,
//! its etcd, its fleet-agent, its health check.
//!
//! Run by `host-image/test`, which builds the releases first (`FLEET_IMAGE_RELEASES`: `1`, `2`,
//! `3` whose fleet-agent is missing, and `release.pub`). Needs root.

use fleet_host_image::{boot, release, slots};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn releases() -> PathBuf {
    PathBuf::from(std::env::var("FLEET_IMAGE_RELEASES").expect("FLEET_IMAGE_RELEASES (run host-image/test)"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A machine of the test tier: slot files, an ESP and a persistent var, in one directory.
struct Machine {
    name: String,
    dir: PathBuf,
    layout: slots::Layout,
}

/// What one boot showed.
#[derive(Debug)]
struct Boot {
    entry: boot::Entry,
    /// `IMAGE_VERSION` of the image that booted; `None` if the slot failed its verity check.
    version: Option<String>,
    healthy: bool,
}

impl Machine {
    fn new(name: &str) -> Machine {
        let dir = std::env::temp_dir().join(format!("fleet-tier-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["esp/loader/entries", "var/lib/fleet/etc", "bus", "mnt"] {
            std::fs::create_dir_all(dir.join(sub)).expect("dir");
        }
        let layout = slots::Layout {
            slot_a: dir.join("root-a.img"),
            slot_b: dir.join("root-b.img"),
            esp: dir.join("esp"),
            cmdline: String::new(),
        };
        // The machine's own settings, on var: its etcd is its own (a single member on loopback).
        std::fs::write(
            dir.join("var/lib/fleet/etc/agent.toml"),
            "etcd_endpoints = [\"http://127.0.0.1:2379\"]\nlease_ttl_secs = 5\napi_listen = \"off\"\n",
        )
        .expect("agent config");
        // The image runs etcd where var has its settings (members); here etcd's defaults.
        std::fs::write(dir.join("var/lib/fleet/etc/etcd.env"), "# a single member on loopback: etcd's defaults\n")
            .expect("etcd settings");
        Machine { name: name.into(), dir, layout }
    }

    fn apply(&self, version: &str, running: char) -> Result<slots::Applied, slots::ApplyError> {
        slots::apply(&releases().join(version), &releases().join("release.pub"), &self.layout, running)
    }

    /// The factory install: version 1 in slot a, blessed.
    fn install(&self) {
        let applied = self.apply("1", 'b').expect("install");
        boot::bless(&self.layout.esp, &applied.entry.id()).expect("bless");
    }

    fn busctl(&self, args: &[&str]) -> Option<String> {
        let addr = format!("--address=unix:path={}", self.dir.join("bus/system_bus_socket").display());
        let out = Command::new("busctl").arg(addr).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn unit_state(&self, unit_path: &str) -> Option<String> {
        self.busctl(&[
            "get-property",
            "org.freedesktop.systemd1",
            unit_path,
            "org.freedesktop.systemd1.Unit",
            "ActiveState",
        ])
    }

    /// One boot: the loader's choice, dm-verity's check, the machine's systemd until its health
    /// check ends, systemd-bless-boot's verdict, power off.
    fn boot(&self) -> Boot {
        let entry = boot::select(&self.layout.esp).expect("select").expect("a boot entry");
        let text = std::fs::read_to_string(boot::entries_dir(&self.layout.esp).join(entry.file_name())).expect("entry");
        let (root_hash, offset, blocks) = slots::entry_verity(&text).expect("verity options in the entry");
        let slot = self.layout.slot(entry.slot).to_path_buf();
        if slots::check_slot(&slot, blocks * 4096, offset, &root_hash).is_err() {
            return Boot { entry, version: None, healthy: false };
        }
        let mnt = self.dir.join("mnt");
        run(Command::new("mount").args(["-t", "erofs", "-o", "ro,loop"]).arg(&slot).arg(&mnt));
        let version = std::fs::read_to_string(mnt.join("usr/lib/os-release"))
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("IMAGE_VERSION=")).map(str::to_string));
        let _ = std::fs::remove_file(self.dir.join("bus/system_bus_socket"));
        // nspawn wants a tmpfs at /run/systemd/nspawn to boot a directory other than / here.
        let script = format!(
            "mount -t tmpfs tmpfs /run/systemd/nspawn && exec systemd-nspawn -D {mnt} --volatile=overlay \
             --register=no --keep-unit -M {name} --private-network --uuid=6d0e1f2a-0000-4000-8000-00000000{n:04} \
             --bind={var}:/var --bind={bus}:/run/dbus --boot --quiet -- systemd.firstboot=off",
            mnt = mnt.display(),
            name = self.name,
            n = self.name.len(),
            var = self.dir.join("var").display(),
            bus = self.dir.join("bus").display(),
        );
        std::fs::create_dir_all("/run/systemd/nspawn").expect("nspawn dir");
        let log = std::fs::File::create(self.dir.join(format!("console-{}.log", entry.id()))).expect("log");
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("nspawn");
        let guard = Running(child, mnt.clone());
        let until = Instant::now() + Duration::from_secs(150);
        let health = loop {
            let state = self.unit_state("/org/freedesktop/systemd1/unit/fleet_2dhealth_2eservice");
            match state.as_deref() {
                Some("s \"active\"") => break true,
                Some("s \"failed\"") => break false,
                _ if Instant::now() > until => break false,
                _ => std::thread::sleep(Duration::from_millis(500)),
            }
        };
        drop(guard);
        if health {
            boot::bless(&self.layout.esp, &entry.id()).expect("bless");
        }
        Boot { entry, version, healthy: health }
    }
}

/// A booted machine: powered off (SIGTERM to nspawn, SIGKILL after 15 s) and unmounted when dropped.
struct Running(Child, PathBuf);
impl Drop for Running {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let until = Instant::now() + Duration::from_secs(15);
        while Instant::now() < until {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = Command::new("umount").arg(&self.1).status();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.join("mnt")).status();
        if std::env::var_os("FLEET_TIER_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[test]
#[ignore = "needs built releases and root: run host-image/test"]
fn updates_boot_once_are_blessed_or_rolled_back_and_bad_releases_never_boot() {
    let m = Machine::new("fltier1");
    m.install();
    let first = m.boot();
    assert_eq!(
        (first.entry.file_name().as_str(), first.version.as_deref(), first.healthy),
        ("fleet-1-a.conf", Some("1"), true),
        "{first:?}"
    );

    // A good update: one counted try, healthy, blessed; it stays.
    m.apply("2", 'a').expect("update to 2");
    let b = m.boot();
    assert_eq!(
        (b.entry.file_name().as_str(), b.version.as_deref(), b.healthy),
        ("fleet-2-b+0-1.conf", Some("2"), true),
        "{b:?}"
    );
    assert_eq!(boot::entries(&m.layout.esp).expect("entries")[0].file_name(), "fleet-2-b.conf", "blessed");
    let again = m.boot();
    assert_eq!((again.entry.file_name().as_str(), again.version.as_deref()), ("fleet-2-b.conf", Some("2")));

    // A bad update (its fleet-agent does not run): the health check fails, the boot is not
    // blessed, and the next boot is the previous slot's.
    m.apply("3", 'b').expect("update to 3");
    let bad = m.boot();
    assert_eq!(
        (bad.entry.file_name().as_str(), bad.version.as_deref(), bad.healthy),
        ("fleet-3-a+0-1.conf", Some("3"), false),
        "{bad:?}"
    );
    let back = m.boot();
    assert_eq!(
        (back.entry.file_name().as_str(), back.version.as_deref(), back.healthy),
        ("fleet-2-b.conf", Some("2"), true),
        "{back:?}"
    );

    // A slot corrupted after it was written does not pass dm-verity: that try is spent and the
    // other slot boots.
    m.apply("3", 'b').expect("3 again in slot a");
    let slot_a = std::fs::OpenOptions::new().write(true).open(&m.layout.slot_a).expect("slot a");
    std::os::unix::fs::FileExt::write_at(&slot_a, b"corrupt", 1 << 20).expect("corrupt");
    drop(slot_a);
    let corrupt = m.boot();
    assert_eq!(
        (corrupt.entry.file_name().as_str(), corrupt.version.as_deref()),
        ("fleet-3-a+0-1.conf", None),
        "{corrupt:?}"
    );
    let after = m.boot();
    assert_eq!(
        (after.entry.file_name().as_str(), after.version.as_deref(), after.healthy),
        ("fleet-2-b.conf", Some("2"), true)
    );

    // A release signed by another key is refused before anything is written.
    let (other_sk, _) = release::keygen(&m.dir.join("other")).expect("keygen");
    let forged = m.dir.join("forged");
    run(Command::new("cp").arg("-r").arg(releases().join("2")).arg(&forged));
    let text = std::fs::read_to_string(forged.join(release::MANIFEST)).expect("manifest");
    let manifest: release::Manifest = serde_json::from_str(&text).expect("json");
    let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    release::seal(&forged, "4", &names, manifest.verity.clone(), &other_sk).expect("forge");
    let before = boot::entries(&m.layout.esp).expect("entries");
    let refused = slots::apply(&forged, &releases().join("release.pub"), &m.layout, 'b');
    assert!(refused.as_ref().is_err_and(|e| e.to_string().contains("bad signature")), "{refused:?}");
    assert_eq!(boot::entries(&m.layout.esp).expect("entries"), before);
}
