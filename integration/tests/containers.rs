//! Containers as units (docs/services.md, "Containers as units"): a root filesystem image served
//! over HTTP on the lab's bridge, fetched by `fleet-image` on the unit's machine, verified
//! against the SHA-256 the unit names, cached there, and run with systemd's `RootDirectory=`;
//! the same unit naming a wrong hash is refused with the reason in its status, and runs nothing.

use fleet_integration::testkit::{self, fleetctl, text, wait_for, MachineBus};
use fleet_integration::LabState;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Where the lab's machines reach the host (the bridge), and a port of the lab's own range.
const SERVE: &str = "10.231.90.1:12598";

/// A root filesystem with a shell, `sleep`, `cat` and their libraries (as `ldd` names them),
/// and `/etc/hello`, as a tar archive in `dir`; returns the archive's SHA-256.
fn make_image(dir: &Path) -> String {
    let root = dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "etc", "dev", "proc", "sys", "tmp", "run"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::write(root.join("etc/hello"), "hello from the image\n").expect("hello");
    let mut libs = std::collections::BTreeSet::new();
    for bin in ["sh", "sleep", "cat"] {
        let host = format!("/bin/{bin}");
        let ok = Command::new("cp").args(["-L", &host]).arg(root.join("bin").join(bin)).status().expect("cp");
        assert!(ok.success(), "cp {host}");
        let ldd = Command::new("ldd").arg(&host).output().expect("ldd");
        for l in String::from_utf8_lossy(&ldd.stdout).lines() {
            if let Some(p) = l.split_whitespace().find(|w| w.starts_with('/')) {
                libs.insert(p.to_string());
            }
        }
    }
    for lib in libs {
        let to = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        let ok = Command::new("cp").args(["-L", &lib]).arg(&to).status().expect("cp");
        assert!(ok.success(), "cp {lib}");
    }
    let tar = dir.join("image.tar");
    let ok = Command::new("tar").arg("-C").arg(&root).args(["-cf"]).arg(&tar).arg(".").status().expect("tar");
    assert!(ok.success(), "tar");
    let sum = Command::new("sha256sum").arg(&tar).output().expect("sha256sum");
    String::from_utf8_lossy(&sum.stdout).split_whitespace().next().expect("a sum").to_string()
}

/// An HTTP server for `dir` on the lab's bridge, stopped when dropped.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path) -> Server {
    let (ip, port) = SERVE.split_once(':').expect("address");
    let child = Command::new("python3")
        .args(["-m", "http.server", port, "--bind", ip, "--directory"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 http.server");
    Server(child)
}

/// The unit file of a container unit: the documented pattern.
fn container_unit(sha: &str, extra_xfleet: &str) -> String {
    format!(
        "[Unit]\nDescription=a unit from a container image\n\n[Service]\n\
         ExecStartPre=+/opt/fleet/fleet-image fetch http://{SERVE}/image.tar {sha}\n\
         RootDirectory=/var/lib/fleet/images/{sha}/rootfs\nRootDirectoryStartOnly=yes\nWorkingDirectory=-/\n\
         ExecStart=/bin/sh -c 'cat /etc/hello; exec sleep infinity'\n\n[X-Fleet]\n{extra_xfleet}"
    )
}

fn ctl_text(lab: &LabState, api: &str, args: &[&str]) -> String {
    let out = fleetctl(lab, api, args).expect("fleetctl");
    let (o, e) = text(&out);
    format!("{o}{e}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_unit_runs_its_verified_image_and_a_wrong_hash_is_refused() {
    let Some(lab) = testkit::lab() else { return };
    let Some(api) = lab.api_url().map(str::to_string) else { return };
    let dir = testkit::scratch("containers").expect("scratch");
    let sha = make_image(&dir);
    let _server = serve(&dir);
    wait_for("the image server", Duration::from_secs(20), || async {
        testkit::http().get(format!("http://{SERVE}/image.tar")).send().await.ok().filter(|r| r.status().is_success())
    })
    .await
    .expect("served");
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let good = format!("ct{nanos:x}-good.service");
    let again = format!("ct{nanos:x}-again.service");
    let bad = format!("ct{nanos:x}-bad.service");
    // The first is examples/container.service itself, with the lab's image for its placeholder.
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/container.service"))
        .expect("examples/container.service");
    let placeholder = example
        .split_whitespace()
        .find(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .expect("the example names a hash")
        .to_string();
    let example = example
        .replace(&placeholder, &sha)
        .replace("https://images.example.com/hello.tar.gz", &format!("http://{SERVE}/image.tar"))
        .replace("/usr/bin/fleet-image", "/opt/fleet/fleet-image");
    assert!(example.contains(&format!("http://{SERVE}/image.tar {sha}")), "{example}");
    std::fs::write(dir.join(&good), example).expect("write");
    // The same image for a unit on the same machine: served from that machine's cache.
    std::fs::write(dir.join(&again), container_unit(&sha, &format!("MachineOf={good}\n"))).expect("write");
    let wrong: String = sha.chars().rev().collect();
    std::fs::write(dir.join(&bad), container_unit(&wrong, "")).expect("write");
    let path = |u: &str| dir.join(u).display().to_string();

    let out = ctl_text(&lab, &api, &["start", &path(&good)]);
    assert!(out.contains("launched on"), "{out}");
    let journal = wait_for("the image's own /etc/hello in the unit's journal", Duration::from_secs(30), || async {
        let j = ctl_text(&lab, &api, &["journal", "--lines", "50", &good]);
        j.contains("hello from the image").then_some(j)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", ctl_text(&lab, &api, &["status", &good])));
    assert!(journal.contains("(verified and unpacked)"), "{journal}");

    let out = ctl_text(&lab, &api, &["start", &path(&again)]);
    assert!(out.contains("launched on"), "{out}");
    let journal = wait_for("the second unit's journal", Duration::from_secs(30), || async {
        let j = ctl_text(&lab, &api, &["journal", "--lines", "50", &again]);
        j.contains("hello from the image").then_some(j)
    })
    .await
    .expect("runs");
    assert!(journal.contains("(cached)"), "the image was fetched again on the same machine: {journal}");

    // A wrong hash: the unit fails before anything of the image runs, and says why.
    let _ = ctl_text(&lab, &api, &["start", "--no-block", &path(&bad)]);
    let status = wait_for("the refusal in the unit's status", Duration::from_secs(30), || async {
        let s = ctl_text(&lab, &api, &["status", &bad]);
        s.contains("refusing to run it").then_some(s)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", ctl_text(&lab, &api, &["status", &bad])));
    assert!(status.contains(&format!("the unit names {wrong}")) && status.contains(&sha), "{status}");
    // systemd on its machine says failed, and nothing of the image ran.
    let mut failed = 0;
    for m in &lab.machines {
        let bus = MachineBus::connect(m).await.expect("bus");
        if bus.unit(&bad).await.is_ok_and(|p| p.active_state == "failed") {
            failed += 1;
        }
    }
    assert_eq!(failed, 1, "{bad} is not failed on its machine");
    let journal = ctl_text(&lab, &api, &["journal", "--lines", "50", &bad]);
    assert!(!journal.contains("hello from the image"), "the refused image ran: {journal}");

    let out = ctl_text(&lab, &api, &["destroy", &good, &again, &bad]);
    assert!(out.contains("Destroyed"), "{out}");
}
