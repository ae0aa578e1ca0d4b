//! fleet-update against real releases (signed with minisign keys made here, hash trees made by
//! `veritysetup format`) and slots and an ESP made of files: what gets written, what boots, and
//! what is refused with nothing written. Needs veritysetup (cryptsetup-bin); skipped without it
//! outside CI.

use fleet_host_image::{boot, release, slots};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn have_veritysetup() -> bool {
    let ok = Command::new("veritysetup").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok && std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI=true but veritysetup (cryptsetup-bin) is missing");
    }
    ok
}

struct Scratch(PathBuf);
impl Scratch {
    fn new(test: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("fleet-update-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch");
        Scratch(d)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A release of `version` with an image of `mib` MiB, signed with `key`.
fn make_release(dir: &Path, version: &str, mib: usize, key: &Path) -> PathBuf {
    let rel = dir.join(format!("release-{version}"));
    std::fs::create_dir_all(&rel).expect("dir");
    let mut image = Vec::with_capacity(mib << 20);
    let mut x: u32 = version.bytes().fold(7, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
    while image.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        image.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(rel.join("root.erofs"), &image).expect("image");
    std::fs::write(rel.join("vmlinuz"), format!("kernel {version}")).expect("kernel");
    let out = Command::new("veritysetup")
        .args(["format", "--salt", "00112233", "--uuid", "00000000-0000-0000-0000-000000000001"])
        .arg(rel.join("root.erofs"))
        .arg(rel.join("root.verity"))
        .output()
        .expect("veritysetup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let root_hash = text
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_string())
        .expect("root hash printed");
    let verity = release::Verity { data: "root.erofs".into(), hash: "root.verity".into(), root_hash };
    release::seal(&rel, version, &["root.erofs", "root.verity", "vmlinuz"], verity, key).expect("seal");
    rel
}

/// Slot files and an ESP with version 1 installed and blessed in slot a.
fn machine(dir: &Path) -> slots::Layout {
    let layout = slots::Layout {
        slot_a: dir.join("root-a.img"),
        slot_b: dir.join("root-b.img"),
        esp: dir.join("esp"),
        cmdline: "console=ttyS0".into(),
    };
    std::fs::write(&layout.slot_a, b"version 1 in slot a").expect("slot a");
    std::fs::write(&layout.slot_b, b"old contents of slot b").expect("slot b");
    std::fs::create_dir_all(boot::entries_dir(&layout.esp)).expect("esp");
    std::fs::write(boot::entries_dir(&layout.esp).join("fleet-1-a.conf"), "title fleet 1\n").expect("entry");
    layout
}

/// Every file under `dir` with its contents, to show nothing changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

fn keys(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    release::keygen(&dir.join(name)).expect("keygen")
}

#[test]
fn a_good_update_is_written_to_the_other_slot_booted_once_and_blessed() {
    if !have_veritysetup() {
        return;
    }
    let s = Scratch::new("good");
    let (sk, pk) = keys(&s.0, "release");
    let rel = make_release(&s.0, "2", 3, &sk);
    release::verify(&rel, &pk).expect("verifies");
    let layout = machine(&s.0);
    let applied = slots::apply(&rel, &pk, &layout, 'a').expect("applies");
    assert_eq!((applied.slot, applied.entry.file_name().as_str()), ('b', "fleet-2-b+1-0.conf"));
    // The slot holds the image, then its hash tree at the next 4 KiB boundary.
    let slot = std::fs::read(&layout.slot_b).expect("slot b");
    let image = std::fs::read(rel.join("root.erofs")).expect("image");
    assert_eq!(&slot[..image.len()], &image[..]);
    assert_eq!(std::fs::read(&layout.slot_a).expect("slot a"), b"version 1 in slot a", "running slot untouched");
    let entry = std::fs::read_to_string(boot::entries_dir(&layout.esp).join("fleet-2-b+1-0.conf")).expect("entry");
    assert!(entry.contains("fleet.slot=b") && entry.contains(&applied.manifest.verity.root_hash), "{entry}");
    assert!(layout.esp.join("fleet/2-b/vmlinuz").exists());

    // The boot loader tries it once; the health check passes and it is blessed for good.
    assert_eq!(
        boot::select(&layout.esp).expect("select").map(|e| e.file_name()).as_deref(),
        Some("fleet-2-b+0-1.conf")
    );
    boot::bless(&layout.esp, "fleet-2-b").expect("bless");
    assert_eq!(boot::select(&layout.esp).expect("select").map(|e| e.file_name()).as_deref(), Some("fleet-2-b.conf"));
    // The same version again is refused rather than written over the running slot.
    let again = slots::apply(&rel, &pk, &layout, 'b');
    assert!(matches!(again, Err(slots::ApplyError::AlreadyThere(..))), "{again:?}");

    // The next release goes to slot a; version 1's entry and its kernel leave the ESP with it.
    std::fs::create_dir_all(layout.esp.join("fleet/1-a")).expect("kernel dir");
    std::fs::write(layout.esp.join("fleet/1-a/vmlinuz"), "kernel 1").expect("kernel 1");
    let rel3 = make_release(&s.0, "3", 1, &sk);
    slots::apply(&rel3, &pk, &layout, 'b').expect("3 to slot a");
    let names: Vec<String> = boot::entries(&layout.esp).expect("entries").iter().map(|e| e.file_name()).collect();
    assert_eq!(names, ["fleet-3-a+1-0.conf", "fleet-2-b.conf"], "in boot order");
    assert!(!layout.esp.join("fleet/1-a").exists(), "version 1's kernel removed with its entry");
    assert!(layout.esp.join("fleet/3-a/vmlinuz").exists() && layout.esp.join("fleet/2-b/vmlinuz").exists());
}

#[test]
fn an_update_that_does_not_boot_well_rolls_back() {
    if !have_veritysetup() {
        return;
    }
    let s = Scratch::new("rollback");
    let (sk, pk) = keys(&s.0, "release");
    let rel = make_release(&s.0, "2", 1, &sk);
    let layout = machine(&s.0);
    slots::apply(&rel, &pk, &layout, 'a').expect("applies");
    assert_eq!(boot::select(&layout.esp).expect("select").map(|e| e.id()).as_deref(), Some("fleet-2-b"));
    // No blessing (the health unit failed, boot-complete.target was never reached): the next
    // boot is the old slot's.
    assert_eq!(boot::select(&layout.esp).expect("select").map(|e| e.file_name()).as_deref(), Some("fleet-1-a.conf"));
    assert_eq!(boot::select(&layout.esp).expect("select").map(|e| e.file_name()).as_deref(), Some("fleet-1-a.conf"));
}

#[test]
fn tampered_or_wrongly_signed_releases_are_refused_with_nothing_written() {
    if !have_veritysetup() {
        return;
    }
    let s = Scratch::new("refused");
    let (sk, pk) = keys(&s.0, "release");
    let (other_sk, _) = keys(&s.0, "other");
    let layout = machine(&s.0);
    let before = snapshot(&s.0.join("esp"));
    let slots_before = (std::fs::read(&layout.slot_a).expect("a"), std::fs::read(&layout.slot_b).expect("b"));

    let check = |rel: &Path, needle: &str| {
        let err = slots::apply(rel, &pk, &layout, 'a').expect_err("refused").to_string();
        assert!(err.contains(needle), "error {err:?} should contain {needle:?}");
        let out = Command::new(env!("CARGO_BIN_EXE_fleet-update"))
            .arg("verify")
            .arg(rel)
            .arg("--public-key")
            .arg(&pk)
            .output()
            .expect("fleet-update");
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains(needle));
        assert_eq!(snapshot(&s.0.join("esp")), before, "ESP changed");
        assert_eq!(
            (std::fs::read(&layout.slot_a).expect("a"), std::fs::read(&layout.slot_b).expect("b")),
            slots_before
        );
    };
    // Signed by a key the image does not trust.
    check(&make_release(&s.0, "3", 1, &other_sk), "bad signature");
    // A payload changed after signing.
    let rel = make_release(&s.0, "4", 1, &sk);
    let mut image = std::fs::read(rel.join("root.erofs")).expect("image");
    image[4096 * 3 + 7] ^= 1;
    std::fs::write(rel.join("root.erofs"), image).expect("tamper");
    check(&rel, "root.erofs: sha256 is");
    // The manifest changed after signing.
    let rel = make_release(&s.0, "5", 1, &sk);
    let m = std::fs::read_to_string(rel.join(release::MANIFEST)).expect("manifest").replace("\"5\"", "\"6\"");
    std::fs::write(rel.join(release::MANIFEST), m).expect("edit");
    check(&rel, "bad signature");
    // Signed, but with a root hash that is not the image's.
    let rel = make_release(&s.0, "7", 1, &sk);
    let text = std::fs::read_to_string(rel.join(release::MANIFEST)).expect("manifest");
    let m: release::Manifest = serde_json::from_str(&text).expect("json");
    let verity = release::Verity { root_hash: "ab".repeat(32), ..m.verity };
    release::seal(&rel, "7", &["root.erofs", "root.verity", "vmlinuz"], verity, &sk).expect("reseal");
    check(&rel, "verity");
}

#[test]
fn an_update_killed_while_writing_leaves_the_old_slot_booting() {
    if !have_veritysetup() {
        return;
    }
    let s = Scratch::new("killed");
    let (sk, pk) = keys(&s.0, "release");
    let rel = make_release(&s.0, "2", 16, &sk);
    let layout = machine(&s.0);
    // A previous good update left slot b with an entry: it must go before b is overwritten.
    std::fs::write(boot::entries_dir(&layout.esp).join("fleet-0-b.conf"), "title fleet 0\n").expect("entry");
    std::fs::write(
        s.0.join("layout.toml"),
        format!(
            "slot_a = {:?}\nslot_b = {:?}\nesp = {:?}\n",
            layout.slot_a.display().to_string(),
            layout.slot_b.display().to_string(),
            layout.esp.display().to_string()
        ),
    )
    .expect("layout");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-update"))
        .arg("apply")
        .arg(&rel)
        .arg("--public-key")
        .arg(&pk)
        .arg("--layout")
        .arg(s.0.join("layout.toml"))
        .args(["--running", "a"])
        .env("FLEET_UPDATE_THROTTLE_MS", "150")
        .spawn()
        .expect("fleet-update");
    // Wait until it is writing the slot (past verification), then kill it.
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&layout.slot_b).map(|m| m.len()).unwrap_or(0) < 3 << 20 {
        assert!(std::time::Instant::now() < until, "the update never started writing");
        assert!(child.try_wait().expect("poll").is_none(), "the update finished before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill");
    let _ = child.wait();
    assert_eq!(std::fs::read(&layout.slot_a).expect("slot a"), b"version 1 in slot a");
    let names: Vec<String> = boot::entries(&layout.esp).expect("entries").iter().map(|e| e.file_name()).collect();
    assert_eq!(names, ["fleet-1-a.conf"], "no entry may point at a half-written slot");
    assert_eq!(boot::select(&layout.esp).expect("select").map(|e| e.id()).as_deref(), Some("fleet-1-a"));
}

/// The update agent's passes over a source directory, on a machine of files: it applies the
/// newest release offered, then (before its reboot) knows it only has to reboot; a release that
/// fails verification is refused once and left alone; after a rollback the bad release is not
/// applied again.
#[test]
fn the_update_agent_applies_the_newest_release_once_and_never_a_bad_one() {
    use fleet_host_image::update_agent::{Action, Agent, AgentSettings, Host, UpdateConfig};
    if !have_veritysetup() {
        return;
    }
    let s = Scratch::new("agent");
    let (sk, pk) = keys(&s.0, "release");
    let source = s.0.join("source");
    std::fs::create_dir_all(&source).expect("source");
    let layout = machine(&s.0);
    std::fs::write(s.0.join("os-release"), "NAME=fleet\nIMAGE_VERSION=1\n").expect("os-release");
    std::fs::write(s.0.join("cmdline"), "console=ttyS0\n").expect("cmdline");
    let host = Host { os_release: s.0.join("os-release"), cmdline: s.0.join("cmdline"), machine_id: s.0.join("id") };
    let config = UpdateConfig {
        layout: layout.clone(),
        agent: AgentSettings {
            source: source.clone(),
            public_key: pk.clone(),
            reboot_command: vec!["touch".into(), s.0.join("rebooted").display().to_string()],
            ..AgentSettings::default()
        },
        fleetlock: None,
    };
    let mut agent = Agent::new(config, host);
    assert_eq!(agent.step().expect("step"), Action::Nothing, "nothing offered");

    // Releases 2 and 3 offered: 3 is written to slot b, 2 is skipped.
    let r2 = make_release(&source, "2", 2, &sk);
    let r3 = make_release(&source, "3", 2, &sk);
    let first = agent.step().expect("step");
    assert!(matches!(&first, Action::Apply(o) if o.version == "3" && o.dir == r3), "{first:?}");
    let names: Vec<String> = boot::entries(&layout.esp).expect("entries").iter().map(|e| e.file_name()).collect();
    assert_eq!(names, ["fleet-3-b+1-0.conf", "fleet-1-a.conf"], "in boot order");
    // Stopped before its reboot: the next pass reboots without writing again.
    let before = snapshot(&s.0.join("esp"));
    assert_eq!(agent.step().expect("step"), Action::Reboot { version: "3".into() });
    assert_eq!(snapshot(&s.0.join("esp")), before);
    agent.reboot("3").expect("reboot command");
    assert!(s.0.join("rebooted").exists(), "the reboot command ran");

    // Release 3 failed its boot: rolled back to 1, the agent leaves 3 alone.
    assert_eq!(
        boot::select(&layout.esp).expect("select").map(|e| e.file_name()).as_deref(),
        Some("fleet-3-b+0-1.conf")
    );
    assert_eq!(boot::select(&layout.esp).expect("select").map(|e| e.file_name()).as_deref(), Some("fleet-1-a.conf"));
    assert_eq!(agent.step().expect("step"), Action::Nothing, "3 failed here; 2 is not tried in its place");

    // Release 4, corrupted after signing: refused with nothing written, and only once.
    let r4 = make_release(&source, "4", 2, &sk);
    let image = std::fs::OpenOptions::new().write(true).open(r4.join("root.erofs")).expect("image");
    std::os::unix::fs::FileExt::write_at(&image, b"tampered", 4096).expect("tamper");
    let before = snapshot(&s.0);
    assert_eq!(agent.step().expect("step"), Action::Nothing);
    assert_eq!(snapshot(&s.0), before, "a refused release writes nothing");
    assert_eq!(agent.step().expect("step"), Action::Nothing);
    drop(r2);
}
