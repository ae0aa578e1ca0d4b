//! docs/install.md, run as written: every shell block of the page, in order, on five fresh
//! Debian 12 machines (node1..node4 and a laptop) booted with systemd from minimal mmdebstrap
//! trees, with the packages `./lab package` built; after each section, what it promised is
//! checked on the machines themselves (their systemd, their packages) and through the laptop's
//! fleetctl. The page cannot drift from what works: a block it adds runs here, and a block that
//! says nowhere to run fails (`fleet_integration::runbook`).
//!
//! Part of the `packages` phase of `./lab test`; skipped outside CI when no packages were built.

use fleet_integration::debian::{self, Booted};
use fleet_integration::runbook::{self, Action, Block, CopyLine};
use fleet_integration::{cgroup, net};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The members' tree has Debian's etcd; the others are plain.
const MEMBER_PACKAGES: &str = "systemd,systemd-sysv,dbus,apt,etcd-server";
const PLAIN_PACKAGES: &str = "systemd,systemd-sysv,dbus,apt";
const MEMBERS: [&str; 3] = ["node1", "node2", "node3"];
/// The units the page starts.
const UNITS: usize = 8;
/// How long one block may run on one machine.
const BLOCK_LIMIT: Duration = Duration::from_secs(300);

/// The document's 10.0.0.N is the lab's 10.231.90.(220+N) (the lab's own subnet, above its
/// numbered machines).
fn lab_ip(n: u8) -> String {
    format!("10.231.90.{}", 220 + u32::from(n))
}

struct Machine {
    name: &'static str,
    netns: String,
    ip: String,
    root: PathBuf,
    booted: Option<Booted>,
}

impl Machine {
    fn booted(&self) -> &Booted {
        self.booted.as_ref().unwrap_or_else(|| panic!("{} is not booted", self.name))
    }

    fn sh(&self, script: &str) -> String {
        self.booted().sh(script, BLOCK_LIMIT).unwrap_or_else(|e| panic!("{e:#}"))
    }
}

/// The five machines; powered off, their network and cgroups removed, when dropped (after a
/// failure, their journals are kept in /var/tmp/fleet-lab-logs/install first).
struct Cluster {
    dir: PathBuf,
    machines: Vec<Machine>,
    /// The lab's bridge was made for this test (no lab was up): removed with the machines.
    made_bridge: bool,
}

impl Cluster {
    fn get(&self, name: &str) -> &Machine {
        self.machines
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("the page names machine {name:?}, which the test has not"))
    }

    fn laptop(&self) -> &Machine {
        self.get("laptop")
    }

    /// The machine with lab address `ip`.
    fn at(&self, ip: &str) -> &Machine {
        self.machines.iter().find(|m| m.ip == ip).unwrap_or_else(|| panic!("no machine at {ip}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = Path::new("/var/tmp/fleet-lab-logs/install");
            let _ = std::fs::create_dir_all(out);
            for m in &self.machines {
                if let Ok(o) = Command::new("journalctl")
                    .arg("-D")
                    .arg(m.root.join("var/log/journal"))
                    .args(["--no-pager", "-o", "short-precise"])
                    .output()
                {
                    let _ = std::fs::write(out.join(format!("{}.journal", m.name)), o.stdout);
                }
                let _ = std::fs::copy(
                    self.dir.join(format!("{}.console.log", m.name)),
                    out.join(format!("{}.console.log", m.name)),
                );
            }
            eprintln!("install: the machines' journals are in {}", out.display());
        }
        for m in &self.machines {
            if let Some(b) = &m.booted {
                b.stop(Duration::from_secs(15), &m.netns);
            } else {
                cgroup::remove(&m.netns);
            }
            net::del_machine_netns(&m.netns);
        }
        if self.made_bridge {
            net::remove_bridge();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A copy of `deb` at version `<its version>+upgrade1`: the same files, newer to dpkg, as the
/// next release would be.
fn newer(deb: &Path, into: &Path) -> PathBuf {
    let work = into.join("unpacked");
    let _ = std::fs::remove_dir_all(&work);
    debian::run("dpkg-deb -R", Command::new("dpkg-deb").arg("-R").arg(deb).arg(&work)).expect("unpack the package");
    let control = work.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).expect("control");
    let text: String = text
        .lines()
        .map(|l| match l.strip_prefix("Version: ") {
            Some(v) => format!("Version: {v}+upgrade1\n"),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&control, text).expect("write control");
    let built = debian::run(
        "dpkg-deb -b",
        Command::new("dpkg-deb").args(["--root-owner-group", "-Zgzip", "-b"]).arg(&work).arg(into),
    )
    .expect("build the newer package");
    let _ = std::fs::remove_dir_all(&work);
    // "dpkg-deb: building package 'fleet-agent' in '<into>/fleet-agent_..._amd64.deb'."
    let path = built.split('\'').nth(3).map(PathBuf::from).unwrap_or_else(|| panic!("dpkg-deb said {built:?}"));
    assert!(path.exists(), "{} not built", path.display());
    path
}

fn version_of(deb: &Path) -> String {
    debian::run("dpkg-deb -f", Command::new("dpkg-deb").arg("-f").arg(deb).arg("Version"))
        .expect("version")
        .trim()
        .to_string()
}

/// Makes the five machines' trees and boots them on the lab's bridge.
fn cluster(debs: &[PathBuf]) -> Cluster {
    let dir = fleet_integration::process::scratch_dir(&std::env::temp_dir(), "fleet-install").expect("scratch dir");
    let upgrades: Vec<PathBuf> = debs
        .iter()
        .filter(|d| {
            d.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with("fleet-engine_") || n.to_string_lossy().starts_with("fleet-agent_")
            })
        })
        .map(|d| newer(d, &dir))
        .collect();
    assert_eq!(upgrades.len(), 2, "fleet-engine and fleet-agent among {debs:?}");
    let names: [(&'static str, u8); 5] = [("node1", 1), ("node2", 2), ("node3", 3), ("node4", 4), ("laptop", 10)];
    let hosts: String = names.iter().map(|(n, i)| format!("{} {n}\n", lab_ip(*i))).collect();
    let mut machines = Vec::new();
    for (name, n) in names {
        let root = dir.join(name);
        let packages = if MEMBERS.contains(&name) { MEMBER_PACKAGES } else { PLAIN_PACKAGES };
        debian::fresh_tree(&root, packages).expect("a fresh Debian tree");
        std::fs::write(root.join("etc/hostname"), format!("{name}\n")).expect("hostname");
        // What an installed Debian has (mmdebstrap writes none): localhost and the neighbours.
        std::fs::write(root.join("etc/hosts"), format!("127.0.0.1 localhost\n::1 localhost\n{hosts}")).expect("hosts");
        let home = root.join("root");
        for d in debs {
            std::fs::copy(d, home.join(d.file_name().expect("name"))).expect("copy a package");
        }
        if MEMBERS.contains(&name) {
            std::fs::create_dir_all(home.join("upgrade")).expect("upgrade dir");
            for d in &upgrades {
                std::fs::copy(d, home.join("upgrade").join(d.file_name().expect("name"))).expect("copy a package");
            }
        }
        machines.push(Machine { name, netns: format!("fl-inst-{name}"), ip: lab_ip(n), root, booted: None });
    }
    let mut c = Cluster { dir: dir.clone(), machines, made_bridge: !net::bridge_exists() };
    net::ensure_bridge().expect("the lab's bridge");
    for m in &mut c.machines {
        net::add_machine_netns(&m.netns, &m.ip).expect("the machine's network");
        let uuid = new_machine_id();
        let console = dir.join(format!("{}.console.log", m.name));
        m.booted = Some(Booted::boot(&m.root, m.name, &uuid, &m.netns, &console).expect("boot"));
    }
    for m in &c.machines {
        m.booted().wait_booted(Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e:#}"));
    }
    c
}

/// A random machine id (the kernel's UUID source, without dashes), so machines of two runs
/// never share one.
fn new_machine_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("a random uuid").trim().replace('-', "")
}

/// Copies as a `# copy` line says: a source ending in `/` is a directory whose contents go into
/// the destination directory; otherwise a file, into the destination directory when it ends in
/// `/`.
fn copy(c: &Cluster, line: &CopyLine) {
    let src = c.get(&line.from.0).root.join(line.from.1.trim_start_matches('/'));
    let dst = c.get(&line.to.0).root.join(line.to.1.trim_start_matches('/'));
    let dst_dir = if line.to.1.ends_with('/') { dst.clone() } else { dst.parent().expect("a parent").to_path_buf() };
    std::fs::create_dir_all(&dst_dir).expect("destination dir");
    let from = if line.from.1.ends_with('/') { format!("{}/.", src.display()) } else { src.display().to_string() };
    debian::run(&format!("copy {line:?}"), Command::new("cp").arg("-a").arg(from).arg(&dst))
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// Runs one block of the page.
fn run_block(c: &Cluster, block: &Block) {
    match &block.action {
        // `./lab test` builds the packages before this phase.
        Action::BuildHost => {}
        Action::Copy(lines) => lines.iter().for_each(|l| copy(c, l)),
        Action::Run { machines, script } => {
            for name in machines {
                let m = c.get(name);
                eprintln!("install.md:{} on {name}:\n{script}", block.line);
                match m.booted().sh(script, BLOCK_LIMIT) {
                    Ok(out) => eprintln!("{out}"),
                    // A command that powers its machine off may not live to report.
                    Err(_)
                        if script.contains("poweroff")
                            && wait_until("the machine is off", 30, || !m.booted().alive()) => {}
                    Err(e) => panic!("install.md:{}: {e:#}", block.line),
                }
            }
        }
    }
}

fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("not within {secs} s: {what}");
    false
}

/// `fleetctl list-machines -l` on the laptop: address -> metadata.
fn machines(c: &Cluster) -> BTreeMap<String, String> {
    let out = c.laptop().sh("fleetctl list-machines -l --no-legend");
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_id, ip) = (f.next()?, f.next()?);
            Some((ip.to_string(), f.next().unwrap_or("-").to_string()))
        })
        .collect()
}

/// `fleetctl list-units -l` on the laptop: unit -> (machine address, active state).
fn units(c: &Cluster) -> BTreeMap<String, (String, String)> {
    let out = c.laptop().sh("fleetctl list-units -l --no-legend");
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (unit, machine, active) = (f.next()?, f.next()?, f.next()?);
            let ip = machine.rsplit('/').next().unwrap_or(machine).to_string();
            Some((unit.to_string(), (ip, active.to_string())))
        })
        .collect()
}

/// Every unit of the page active on the machine fleetctl names, as that machine's systemd says.
fn all_units_run(c: &Cluster, avoid: Option<&str>) -> Option<BTreeMap<String, String>> {
    let listed = units(c);
    let hello: BTreeMap<String, String> = listed
        .iter()
        .filter(|(u, (_, active))| u.starts_with("hello@") && active == "active")
        .map(|(u, (ip, _))| (u.clone(), ip.clone()))
        .collect();
    if hello.len() != UNITS || hello.values().any(|ip| Some(ip.as_str()) == avoid) {
        return None;
    }
    for (unit, ip) in &hello {
        let state = c.at(ip).booted().sh(&format!("systemctl is-active {unit} || true"), BLOCK_LIMIT).ok()?;
        if state.trim() != "active" {
            eprintln!("{unit}: fleetctl says active on {ip}, its systemd says {}", state.trim());
            return None;
        }
    }
    Some(hello)
}

/// node4's etcd identity (what `fleet-agent join` wrote on it) reads its own schedule from etcd:
/// Ok if etcd answers, the error if it refuses. Asked from the host, with node4's files.
fn node4_reads_etcd(c: &Cluster) -> Result<(), String> {
    let node4 = c.get("node4");
    let pki = node4.root.join("etc/fleet/pki");
    let id = std::fs::read_to_string(node4.root.join("etc/machine-id")).map_err(|e| e.to_string())?;
    let tls = fleet_store::tls::ClientTls {
        ca_file: pki.join("etcd-ca.pem"),
        cert_file: pki.join("machine.pem"),
        key_file: pki.join("machine.key"),
    };
    let endpoint = format!("https://{}:2379", lab_ip(1));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_tls(tls.etcd_options().map_err(|e| e.to_string())?);
        let mut client = etcd_client::Client::connect([endpoint], Some(opts)).await.map_err(|e| e.to_string())?;
        let key = fleet_model::Keys::new("/fleet/").schedule_of(id.trim());
        client
            .get(key, Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

/// Main PIDs on a machine: its daemons and the page's units there.
fn main_pids(m: &Machine) -> BTreeMap<String, String> {
    let names = m.sh("systemctl list-units --plain --no-legend --state=active 'hello@*' fleet-engine.service fleet-agent.service | cut -d' ' -f1");
    names
        .lines()
        .filter(|n| !n.trim().is_empty())
        .map(|n| {
            (n.trim().to_string(), m.sh(&format!("systemctl show -p MainPID --value {}", n.trim())).trim().to_string())
        })
        .collect()
}

/// What each section of the page promises, checked before (`before`) and after its blocks.
struct Checks {
    pids_before_upgrade: BTreeMap<&'static str, BTreeMap<String, String>>,
    upgraded_version: String,
}

impl Checks {
    fn before(&mut self, c: &Cluster, section: &str) {
        if section == "Upgrading" {
            for name in MEMBERS {
                let pids = main_pids(c.get(name));
                assert!(
                    pids.contains_key("fleet-engine.service") && pids.contains_key("fleet-agent.service"),
                    "{name}: {pids:?}"
                );
                self.pids_before_upgrade.insert(name, pids);
            }
        }
    }

    fn after(&mut self, c: &Cluster, section: &str) {
        let members: Vec<String> = (1..=3).map(lab_ip).collect();
        match section {
            "" => {}
            "A cluster of three machines" => {
                let ok = wait_until("the three machines listed", 60, || {
                    let m = machines(c);
                    members.iter().all(|ip| m.get(ip).is_some_and(|md| md.contains("role=member")))
                });
                assert!(ok, "fleetctl list-machines: {:?}", machines(c));
            }
            "Adding a machine (join token)" => {
                let ok = wait_until("node4 listed", 60, || {
                    machines(c).get(&lab_ip(4)).is_some_and(|md| md.contains("rack=r7"))
                });
                assert!(ok, "fleetctl list-machines: {:?}", machines(c));
                assert_eq!(machines(c).len(), 4, "{:?}", machines(c));
                // The identity it joined with works in etcd (what "Removing a machine" takes away).
                node4_reads_etcd(c).unwrap_or_else(|e| panic!("node4's own etcd identity refused: {e}"));
            }
            "Running units" => {
                let ok = wait_until("every unit running where fleetctl says", 90, || all_units_run(c, None).is_some());
                assert!(ok, "fleetctl list-units: {:?}", units(c));
                let placed = all_units_run(c, None).expect("still running");
                assert!(placed.values().any(|ip| *ip == lab_ip(4)), "no unit on node4: {placed:?}");
            }
            "Removing a machine" => {
                assert!(!c.get("node4").booted().alive(), "node4 still runs after its poweroff");
                let ok =
                    wait_until("node4's units active elsewhere", 60, || all_units_run(c, Some(&lab_ip(4))).is_some());
                assert!(ok, "fleetctl list-units: {:?}", units(c));
                let listed = machines(c);
                assert!(listed.len() == 3 && !listed.contains_key(&lab_ip(4)), "fleetctl list-machines: {listed:?}");
                // Its etcd user is gone: etcd refuses its certificate.
                let refused =
                    node4_reads_etcd(c).expect_err("etcd still admits node4's identity after etcd-remove-machine");
                assert!(
                    refused.contains("not found") || refused.contains("denied"),
                    "etcd's refusal of node4: {refused}"
                );
            }
            "Upgrading" => {
                for name in MEMBERS {
                    let m = c.get(name);
                    let versions = m.sh("dpkg-query -W -f '${Package} ${Version}\\n' fleet-engine fleet-agent");
                    for p in ["fleet-engine", "fleet-agent"] {
                        let want = format!("{p} {}", self.upgraded_version);
                        assert!(versions.lines().any(|l| l == want), "{name}: {want:?} not in {versions}");
                    }
                    let before = &self.pids_before_upgrade[name];
                    let after = main_pids(m);
                    for daemon in ["fleet-engine.service", "fleet-agent.service"] {
                        assert!(
                            after.get(daemon).is_some_and(|p| p != "0" && Some(p) != before.get(daemon)),
                            "{name}: {daemon} not restarted by the upgrade: before {before:?}, after {after:?}"
                        );
                    }
                    for (unit, pid) in before.iter().filter(|(u, _)| u.starts_with("hello@")) {
                        assert_eq!(
                            after.get(unit),
                            Some(pid),
                            "{name}: {unit} restarted by the upgrade: before {before:?}, after {after:?}"
                        );
                    }
                }
                assert!(all_units_run(c, Some(&lab_ip(4))).is_some(), "units after the upgrade: {:?}", units(c));
            }
            other => panic!("docs/install.md has a section {other:?} with commands the test does not check"),
        }
    }
}

#[test]
fn docs_install_md_runs_on_fresh_machines_from_the_packages() {
    let Some(debs) = debian::built_debs() else { return };
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/install.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/install.md");
    let doc = runbook::map_addresses(&doc, lab_ip);
    let blocks = runbook::parse(&doc).unwrap_or_else(|e| panic!("docs/install.md: {e:#}"));
    assert!(blocks.len() > 10, "docs/install.md has {} shell blocks", blocks.len());

    let started = Instant::now();
    let c = cluster(&debs);
    eprintln!("install: five machines booted in {:?}", started.elapsed());
    let engine_deb =
        debs.iter().find(|d| d.to_string_lossy().contains("fleet-engine_")).expect("fleet-engine's package");
    let mut checks = Checks {
        pids_before_upgrade: BTreeMap::new(),
        upgraded_version: format!("{}+upgrade1", version_of(engine_deb)),
    };
    let mut section: Option<&str> = None;
    for block in &blocks {
        if section != Some(block.section.as_str()) {
            if let Some(done) = section {
                checks.after(&c, done);
                eprintln!("install: section {done:?} done at {:?}", started.elapsed());
            }
            checks.before(&c, &block.section);
            section = Some(block.section.as_str());
        }
        run_block(&c, block);
    }
    if let Some(done) = section {
        checks.after(&c, done);
    }
    eprintln!("install: every block of docs/install.md ran and was checked in {:?}", started.elapsed());
}
