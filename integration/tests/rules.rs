//! Every `[X-Fleet]` rule, end to end through fleetctl on the lab's three machines
//! (fl-m1..fl-m3, metadata `hostname=<name>`, capacity 2G memory and 200% CPU each).

use fleet_integration::testkit::{self, fleetctl, text, wait_for, MachineBus};
use fleet_integration::LabState;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

struct Ctx {
    lab: LabState,
    api: String,
    dir: PathBuf,
    units: Vec<String>,
}

impl Ctx {
    fn new(test: &str) -> Option<Ctx> {
        let lab = testkit::lab()?;
        let api = lab.api_url()?.to_string();
        let dir = testkit::scratch(test).ok()?;
        Some(Ctx { lab, api, dir, units: Vec::new() })
    }

    fn file(&mut self, name: &str, xfleet: &str) -> String {
        self.file_with(name, xfleet, "")
    }

    fn file_with(&mut self, name: &str, xfleet: &str, extra: &str) -> String {
        let p = self.dir.join(name);
        let body = format!(
            "[Unit]\nDescription={name}\n\n[Service]\nExecStart=/bin/sleep infinity\n{extra}\n[X-Fleet]\n{xfleet}"
        );
        std::fs::write(&p, body).expect("write unit file");
        if !self.units.contains(&name.to_string()) {
            self.units.push(name.to_string());
        }
        p.display().to_string()
    }

    fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        let out = fleetctl(&self.lab, &self.api, args).expect("run fleetctl");
        let (o, e) = text(&out);
        (out.status.success(), o, e)
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, o, e) = self.ctl(args);
        assert!(ok, "fleetctl {args:?} failed:\n{o}\n{e}");
        o
    }

    fn machine_name(&self, id: &str) -> String {
        self.lab
            .machines
            .iter()
            .find(|m| id.starts_with(&m.machine_id) || m.machine_id.starts_with(id))
            .map(|m| m.name.clone())
            .unwrap_or_else(|| id.to_string())
    }

    /// unit -> lab machine names where systemd reports it active.
    fn active(&self) -> BTreeMap<String, Vec<String>> {
        let out = self.ok(&["list-units", "--no-legend", "--full", "--fields", "unit,machine,active"]);
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for l in out.lines() {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() == 3 && cols[2] == "active" && self.units.iter().any(|u| u == cols[0]) {
                map.entry(cols[0].to_string())
                    .or_default()
                    .push(self.machine_name(cols[1].split('/').next().unwrap_or("")));
            }
        }
        for v in map.values_mut() {
            v.sort();
        }
        map
    }

    async fn wait_active(&self, n: usize) -> BTreeMap<String, Vec<String>> {
        wait_for(&format!("{n} active placements"), T, || async {
            let a = self.active();
            (a.values().map(Vec::len).sum::<usize>() == n).then_some(a)
        })
        .await
        .expect("units become active")
    }

    fn reason(&self, unit: &str) -> String {
        let out = self.ok(&["list-unit-files", "--no-legend", "--fields", "unit,reason"]);
        out.lines()
            .find(|l| l.starts_with(unit))
            .and_then(|l| l.split_once('\t'))
            .map(|(_, r)| r.trim().to_string())
            .unwrap_or_default()
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if !self.units.is_empty() {
            let mut args = vec!["destroy"];
            args.extend(self.units.iter().map(String::as_str));
            let _ = fleetctl(&self.lab, &self.api, &args);
        }
    }
}

#[tokio::test]
async fn machine_id_full_and_short() {
    let Some(mut c) = Ctx::new("rules-id") else { return };
    let m2 = c.lab.machine("fl-m2").expect("fl-m2").machine_id.clone();
    let m3 = c.lab.machine("fl-m3").expect("fl-m3").machine_id.clone();
    let a = c.file("pin-full.service", &format!("MachineID={m2}\n"));
    let b = c.file("pin-short.service", &format!("MachineID={}\n", &m3[..8]));
    c.ok(&["start", &a, &b]);
    let active = c.wait_active(2).await;
    assert_eq!(active["pin-full.service"], vec!["fl-m2"]);
    assert_eq!(active["pin-short.service"], vec!["fl-m3"]);
    let bad = c.file("pin-nowhere.service", "MachineID=ffffffff\n");
    let (ok, _, err) = c.ctl(&["start", "--block-attempts", "2", &bad]);
    assert!(!ok);
    assert!(err.contains("no machine has id ffffffff"), "{err}");
}

#[tokio::test]
async fn machine_metadata_with_operators_and_specifiers() {
    let Some(mut c) = Ctx::new("rules-md") else { return };
    let eq = c.file("md-eq.service", "MachineMetadata=hostname=fl-m2\n");
    let or = c.file("md-or.service", "MachineMetadata=hostname=fl-m1|fl-m9\n");
    let ne = c.file("md-ne.service", "MachineMetadata=\"hostname!=fl-m1\" \"hostname!=fl-m2\"\n");
    let tmpl = c.file("md@.service", "MachineMetadata=hostname=%i\n");
    c.ok(&["submit", &tmpl]);
    c.units.push("md@fl-m2.service".into());
    c.ok(&["start", &eq, &or, &ne, "md@fl-m2.service"]);
    let active = c.wait_active(4).await;
    assert_eq!(active["md-eq.service"], vec!["fl-m2"]);
    assert_eq!(active["md-or.service"], vec!["fl-m1"]);
    assert_eq!(active["md-ne.service"], vec!["fl-m3"]);
    assert_eq!(active["md@fl-m2.service"], vec!["fl-m2"]);
    let none = c.file("md-none.service", "MachineMetadata=region=us-west\n");
    let (ok, _, err) = c.ctl(&["start", "--block-attempts", "2", &none]);
    assert!(!ok);
    assert!(err.contains("no machine has metadata region=us-west"), "{err}");
    assert_eq!(c.reason("md-none.service"), "no machine has metadata region=us-west");
}

#[tokio::test]
async fn conflicts_spread_and_explain_the_surplus() {
    let Some(mut c) = Ctx::new("rules-conflicts") else { return };
    let files: Vec<String> = (0..4).map(|i| c.file(&format!("cf.{i}.service"), "Conflicts=cf.*.service\n")).collect();
    let (ok, _, err) = c.ctl(&["start", "--block-attempts", "3", &files[0], &files[1], &files[2], &files[3]]);
    assert!(!ok, "the fourth unit cannot be placed");
    assert!(err.contains("cannot be placed: conflicts with cf."), "{err}");
    let active = c.wait_active(3).await;
    let machines: std::collections::BTreeSet<_> = active.values().flatten().collect();
    assert_eq!(machines.len(), 3, "{active:?}");
    let surplus = c.units.iter().find(|u| !active.contains_key(*u)).cloned().expect("one unplaced");
    assert!(c.reason(&surplus).starts_with("conflicts with cf."), "{}", c.reason(&surplus));
    // Destroying one of the placed units lets the surplus in.
    let placed = active.keys().next().cloned().expect("placed");
    c.ok(&["destroy", &placed]);
    c.units.retain(|u| *u != placed);
    let active = c.wait_active(3).await;
    assert!(active.contains_key(&surplus));
    // One-way conflicts keep a unit without Conflicts away too.
    let m1 = c.lab.machine("fl-m1").expect("fl-m1").machine_id.clone();
    let a = c.file("ow-a.service", "MachineMetadata=hostname=fl-m1\nConflicts=ow-b.service\n");
    let b = c.file("ow-b.service", &format!("MachineID={m1}\n"));
    c.ok(&["start", &a]);
    let (ok, _, err) = c.ctl(&["start", "--block-attempts", "2", &b]);
    assert!(!ok && err.contains("conflicts with ow-a.service"), "{err}");
}

#[tokio::test]
async fn machine_of_keeps_followers_with_their_peers() {
    let Some(mut c) = Ctx::new("rules-machineof") else { return };
    let ping = c.file("ping.0.service", "MachineMetadata=hostname=fl-m3\n");
    let pong = c.file("pong.0.service", "MachineOf=ping.0.service\n");
    c.ok(&["start", &ping, &pong]);
    let active = c.wait_active(2).await;
    assert_eq!(active["pong.0.service"], vec!["fl-m3"]);
    let lonely = c.file("pong.1.service", "MachineOf=ping.9.service\n");
    let (ok, _, err) = c.ctl(&["start", "--block-attempts", "2", &lonely]);
    assert!(!ok && err.contains("ping.9.service"), "{err}");
}

#[tokio::test]
async fn global_units_run_on_every_eligible_machine() {
    let Some(mut c) = Ctx::new("rules-global") else { return };
    let g = c.file("glob.service", "Global=true\nMachineMetadata=hostname!=fl-m1\n");
    let out = c.ok(&["start", &g]);
    assert!(out.contains("Triggered global unit glob.service start"), "{out}");
    let active = c.wait_active(2).await;
    assert_eq!(active["glob.service"], vec!["fl-m2", "fl-m3"]);
    let out = c.ok(&["list-unit-files", "--no-legend", "--fields", "unit,global,state,target"]);
    let line = out.lines().find(|l| l.starts_with("glob.service")).unwrap_or_default();
    assert_eq!(line.split_whitespace().collect::<Vec<_>>(), vec!["glob.service", "true", "-", "global"]);
    // Two mutually conflicting globals: placement is sticky, so the one already running stays
    // and the newcomer is explained.
    let g0 = c.file("gc.0.service", "Global=true\nConflicts=gc.*.service\n");
    let g1 = c.file("gc.1.service", "Global=true\nConflicts=gc.*.service\n");
    c.ok(&["start", &g1]);
    c.wait_active(5).await;
    c.ok(&["start", &g0]);
    wait_for("reason for gc.0", T, || async {
        c.reason("gc.0.service").contains("conflicts with gc.1.service").then_some(())
    })
    .await
    .expect("gc.0 explained");
    let active = c.active();
    assert_eq!(active.get("gc.1.service").map(Vec::len), Some(3), "{active:?}");
    assert!(!active.contains_key("gc.0.service"), "{active:?}");
}

#[tokio::test]
async fn replaces_displaces_the_named_unit() {
    let Some(mut c) = Ctx::new("rules-replaces") else { return };
    let r0 = c.file("replace.0.service", "MachineMetadata=hostname!=fl-m3\n");
    c.ok(&["start", &r0]);
    let before = c.wait_active(1).await["replace.0.service"][0].clone();
    let kick = c.file("replace-kick0.service", "Replaces=replace.0.service\n");
    c.ok(&["start", &kick]);
    let active = wait_for("replace.0 moved", T, || async {
        let a = c.active();
        (a.len() == 2 && a["replace.0.service"][0] != before).then_some(a)
    })
    .await
    .expect("displacement");
    assert_eq!(active["replace-kick0.service"], vec![before.clone()]);
    assert_ne!(active["replace.0.service"], vec!["fl-m3".to_string()], "displaced unit keeps its own rules");
    // Circular Replaces is refused at submit.
    let loop_a = c.file("loop-a.service", "Replaces=loop-b.service\n");
    let loop_b = c.file("loop-b.service", "Replaces=loop-a.service\n");
    c.ok(&["submit", &loop_a]);
    let (ok, _, err) = c.ctl(&["submit", &loop_b]);
    assert!(!ok && err.contains("circular Replaces"), "{err}");
}

#[tokio::test]
async fn capacity_max_per_machine_and_spread() {
    let Some(mut c) = Ctx::new("rules-capacity") else { return };
    let files: Vec<String> = (0..4).map(|i| c.file(&format!("big.{i}.service"), "MemoryMax=1500M\n")).collect();
    let (ok, _, err) = c.ctl(&["start", "--block-attempts", "3", &files[0], &files[1], &files[2], &files[3]]);
    assert!(!ok && err.contains("not enough capacity"), "{err}");
    let active = c.wait_active(3).await;
    assert_eq!(active.values().flatten().collect::<std::collections::BTreeSet<_>>().len(), 3);
    let mut args = vec!["destroy".to_string()];
    args.append(&mut c.units);
    c.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let t = c.file("one@.service", "MaxPerMachine=1\n");
    c.ok(&["submit", &t]);
    let names: Vec<String> = (1..=4).map(|i| format!("one@{i}.service")).collect();
    c.units.extend(names.iter().cloned());
    let mut start = vec!["start", "--no-block"];
    start.extend(names.iter().map(String::as_str));
    c.ok(&start);
    let active = c.wait_active(3).await;
    assert_eq!(active.values().flatten().collect::<std::collections::BTreeSet<_>>().len(), 3);
    let unplaced = names.iter().find(|n| !active.contains_key(*n)).expect("one unplaced");
    wait_for("MaxPerMachine reason", T, || async {
        c.reason(unplaced).contains("MaxPerMachine=1 reached").then_some(())
    })
    .await
    .expect("reason");

    let s = c.file("spread@.service", "SpreadBy=hostname\n");
    c.ok(&["submit", &s]);
    let names: Vec<String> = (1..=3).map(|i| format!("spread@{i}.service")).collect();
    c.units.extend(names.iter().cloned());
    let mut start = vec!["start"];
    start.extend(names.iter().map(String::as_str));
    c.ok(&start);
    let active = c.active();
    let hosts: std::collections::BTreeSet<_> = names.iter().filter_map(|n| active.get(n)).flatten().collect();
    assert_eq!(hosts.len(), 3, "replicas share a machine: {active:?}");
}

#[tokio::test]
async fn templates_install_sections_and_bad_rules() {
    let Some(mut c) = Ctx::new("rules-templates") else { return };
    let t = c.file("tpl@.service", "");
    c.ok(&["submit", &t]);
    let (ok, _, err) = c.ctl(&["start", "--block-attempts", "1", "tpl@.service"]);
    assert!(!ok && err.contains("cannot activate template"), "{err}");
    c.units.push("tpl@7.service".into());
    let out = c.ok(&["start", "tpl@7.service"]);
    assert!(out.contains("Unit tpl@7.service launched on"), "{out}");

    // [Install]: the sidekick is enabled on load, so systemd starts it with its peer.
    let hello = c.file("inst-hello.service", "MachineMetadata=hostname=fl-m1\n");
    let side = c.file_with(
        "inst-side.service",
        "MachineOf=inst-hello.service\n",
        "\n[Install]\nWantedBy=inst-hello.service\n",
    );
    c.ok(&["load", &hello, &side]);
    let m1 = c.lab.machine("fl-m1").expect("fl-m1").clone();
    let bus = MachineBus::connect(&m1).await.expect("bus");
    assert_eq!(bus.unit("inst-side.service").await.expect("props").active_state, "inactive");
    c.ok(&["start", "inst-hello.service"]);
    wait_for("sidekick started by systemd", T, || async {
        bus.unit("inst-side.service").await.ok().filter(|p| p.active_state == "active")
    })
    .await
    .expect("sidekick");

    let bad = c.file("bad-key.service", "Bogus=1\n");
    let (ok, _, err) = c.ctl(&["submit", &bad]);
    assert!(!ok && err.contains("unrecognized requirement in [X-Fleet] section: \"Bogus\""), "{err}");
    let combo = c.file("bad-combo.service", "Global=true\nMachineOf=x.service\n");
    let (ok, _, err) = c.ctl(&["submit", &combo]);
    assert!(!ok && err.contains("Global cannot be used with MachineOf"), "{err}");
}

#[tokio::test]
async fn move_goes_where_asked_and_refuses_what_rules_forbid() {
    let Some(mut c) = Ctx::new("rules-move") else { return };
    let m3 = c.lab.machine("fl-m3").expect("fl-m3").machine_id.clone();
    let m1 = c.lab.machine("fl-m1").expect("fl-m1").machine_id.clone();
    let a = c.file("mv-a.service", "MachineMetadata=hostname!=fl-m3\n");
    let b = c.file("mv-b.service", "MachineMetadata=hostname=fl-m3\n");
    let f = c.file("mv-f.service", "MachineOf=mv-a.service\n");
    c.ok(&["start", &a, &b, &f]);
    let before = c.wait_active(3).await;
    let from = before["mv-a.service"][0].clone();
    let (to_name, to_id) = if from == "fl-m1" {
        ("fl-m2", c.lab.machine("fl-m2").expect("fl-m2").machine_id.clone())
    } else {
        ("fl-m1", m1.clone())
    };
    let out = c.ok(&["move", "mv-a.service", &to_id[..8]]);
    assert!(out.contains("Unit mv-a.service moved to "), "{out}");
    let after = wait_for("follower follows", T, || async {
        let a = c.active();
        (a.get("mv-f.service") == Some(&vec![to_name.to_string()]) && a.values().map(Vec::len).sum::<usize>() == 3)
            .then_some(a)
    })
    .await
    .expect("moved");
    assert_eq!(after["mv-a.service"], vec![to_name]);
    assert_eq!(after["mv-b.service"], before["mv-b.service"], "unrelated unit moved");
    // Its rules forbid fl-m3: refused, and it keeps running where it is.
    let (ok, _, err) = c.ctl(&["move", "mv-a.service", &m3]);
    assert!(!ok && err.contains("cannot move mv-a.service to") && err.contains("hostname!=fl-m3"), "{err}");
    assert_eq!(c.active()["mv-a.service"], vec![to_name]);
    let (ok, _, err) = c.ctl(&["move", "mv-nosuch.service"]);
    assert!(!ok && err.contains("does not exist"), "{err}");
}

/// An exclusive unit that takes its time to stop (`ExecStop=`) is moved: it starts on the new
/// machine only once systemd on the old one has stopped it, so it never runs (or stops) on two
/// machines at once. Then one moved while still starting. Sampled in every machine's systemd.
// Two workers: the sampler runs while fleetctl blocks this test's thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_unit_moved_starts_anew_only_once_stopped_where_it_was() {
    let Some(mut c) = Ctx::new("rules-handover") else { return };
    let x = c.file_with("ho-x.service", "Exclusive=true\n", "ExecStop=/bin/sleep 3\n");
    c.ok(&["start", &x]);
    let from = c.wait_active(1).await["ho-x.service"][0].clone();
    let to = c.lab.machines.iter().find(|m| m.name != from).expect("another machine").clone();
    let sampler = sample_overlaps(&c.lab, "ho-x.service");
    let started = std::time::Instant::now();
    // Bounded (~60 s), so a handover that never completes fails the test instead of hanging it.
    let out = c.ok(&["move", "--block-attempts", "30", "ho-x.service", &to.machine_id[..8]]);
    assert!(out.contains("Unit ho-x.service moved to "), "{out}");
    let after = c.wait_active(1).await;
    let took = started.elapsed();
    let samples = sampler.finish().await;
    assert_eq!(after["ho-x.service"], vec![to.name.clone()]);
    // It did wait for the old machine's 3 s ExecStop.
    assert!(took >= Duration::from_secs(3), "moved in {took:?}, before its ExecStop could have ended");
    assert!(samples > 10, "only {samples} samples");

    // Moved while it is still starting (2 s in `activating`): the engine knows it runs there too.
    let y = c.file_with("ho-y.service", "Exclusive=true\n", "ExecStartPre=/bin/sleep 2\n");
    c.ok(&["start", "--no-block", &y]);
    let placed = wait_for("ho-y scheduled", T, || async {
        let out = c.ok(&["list-units", "--no-legend", "--full", "--fields", "unit,machine"]);
        let line = out.lines().find(|l| l.starts_with("ho-y.service"))?;
        let machine = line.split_whitespace().nth(1)?.split('/').next()?;
        Some(c.machine_name(machine))
    })
    .await
    .expect("ho-y placed");
    let to = c.lab.machines.iter().find(|m| m.name != placed).expect("another machine").clone();
    let sampler = sample_overlaps(&c.lab, "ho-y.service");
    c.ok(&["move", "--block-attempts", "30", "ho-y.service", &to.machine_id[..8]]);
    let after = wait_for("ho-y active on its new machine", T, || async {
        let a = c.active();
        (a.get("ho-y.service") == Some(&vec![to.name.clone()])).then_some(a)
    })
    .await
    .expect("ho-y moved");
    sampler.finish().await;
    assert_eq!(after["ho-y.service"], vec![to.name.clone()]);
}

struct Sampler {
    unit: String,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<(Vec<Vec<String>>, usize)>,
}

impl Sampler {
    /// Stops sampling, asserts the unit never ran on two machines at once, and says how many
    /// samples were taken.
    async fn finish(self) -> usize {
        let _ = self.stop.send(true);
        let (overlaps, samples) = self.task.await.expect("sampler");
        assert!(
            overlaps.is_empty(),
            "{} on two machines at once ({samples} samples): {:?}",
            self.unit,
            &overlaps[..overlaps.len().min(5)]
        );
        samples
    }
}

/// Samples `unit` in every machine's systemd every 100 ms, recording each moment it is running,
/// starting or stopping on more than one machine.
fn sample_overlaps(lab: &LabState, unit: &str) -> Sampler {
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let machines = lab.machines.clone();
    let name = unit.to_string();
    let unit = name.clone();
    let task = tokio::spawn(async move {
        let mut overlaps = Vec::new();
        let mut samples = 0;
        while !*stop_rx.borrow() {
            let mut running = Vec::new();
            for m in &machines {
                let Ok(bus) = MachineBus::connect(m).await else { continue };
                if let Ok(p) = bus.unit(&unit).await {
                    if !fleet_model::schema::is_stopped(&p.active_state) {
                        running.push(format!("{} {}/{}", m.name, p.active_state, p.sub_state));
                    }
                }
            }
            samples += 1;
            if running.len() > 1 {
                overlaps.push(running);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop_rx.changed() => {}
            }
        }
        (overlaps, samples)
    });
    Sampler { unit: name, stop, task }
}
