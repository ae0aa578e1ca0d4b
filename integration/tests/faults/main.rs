//! Fault scenarios on a lab with a 3-member etcd cluster, two engines and five machines
//! (`./lab up --machines 5 --etcd 3 --engines 2`; `./lab test` runs these in a second phase).
//! Each test breaks something with the same functions as `./lab kill|start|cut|heal` and checks what systemd
//! inside the machines says, not only what fleet reports. Test names start with `fault_`;
//! one module per part broken (engines and etcd, agents, machines) and the chaos run.

use fleet_integration::faults::{self, Kind};
use fleet_integration::testkit::{self, fleetctl, text, wait_for, MachineBus};
use fleet_integration::{LabState, MachineProc};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod agents;
mod chaos;
mod dashboard;
mod engines;
mod machines;
mod rollouts;

const T: Duration = Duration::from_secs(60);

fn unit_template() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../agent/fleet-agent.service"))
        .expect("agent unit file")
}

struct Lab {
    state: LabState,
    dir: std::path::PathBuf,
    units: Vec<String>,
}

/// The fault lab, or a skip (a failure under CI=true) when the lab is not the fault lab.
///
/// Whatever an earlier fault test left broken (it failed with a machine still cut, say) is
/// mended first, and units it left behind are destroyed: the fault lab is the fault tests' own.
async fn fault_lab(test: &str) -> Option<Lab> {
    let mut state = testkit::lab()?;
    if state.engines.len() < 2 || state.etcd.len() < 3 {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("fault tests need ./lab up --etcd 3 --engines 2 (./lab test runs them so)");
        }
        eprintln!("skipped: not the fault lab");
        return None;
    }
    let mended = faults::repair(&mut state, &unit_template()).await.expect("repair the fault lab");
    let lab = Lab { state, dir: testkit::scratch(test).ok()?, units: Vec::new() };
    let leftovers: Vec<String> = wait_for("the fault lab's API", T, || async {
        let (ok, out, _) = lab.ctl(&["list-unit-files", "--no-legend"]);
        ok.then(|| out.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect())
    })
    .await
    .expect("the fault lab answers");
    if !mended.is_empty() || !leftovers.is_empty() {
        eprintln!("{test}: mended {mended:?}; destroying {} units left behind", leftovers.len());
    }
    if !leftovers.is_empty() {
        let mut args = vec!["destroy"];
        args.extend(leftovers.iter().map(String::as_str));
        lab.ok(&args);
    }
    // Every machine registered again before the test starts.
    let want = lab.state.machines.len();
    wait_for("every machine registered", T, || async {
        (lab.ok(&["list-machines", "--no-legend"]).lines().count() == want).then_some(())
    })
    .await
    .expect("machines registered");
    Some(lab)
}

/// A machine cut off until this is dropped, also when the test fails half-way.
struct Cut {
    state: LabState,
    machine: String,
}

impl Cut {
    fn new(state: &LabState, machine: &str) -> Self {
        faults::set_cut(state, machine, true).expect("cut");
        Cut { state: state.clone(), machine: machine.to_string() }
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        if let Err(e) = faults::set_cut(&self.state, &self.machine, false) {
            eprintln!("cannot heal {}: {e:#}", self.machine);
        }
    }
}

impl Lab {
    fn api(&self) -> String {
        // Any live engine serves the API.
        self.state
            .engines
            .iter()
            .find(|e| fleet_integration::process::alive(e.pid))
            .map(|e| e.api_url.clone())
            .unwrap_or_default()
    }
    fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        let out = fleetctl(&self.state, &self.api(), args).expect("fleetctl runs");
        let (o, e) = text(&out);
        (out.status.success(), o, e)
    }
    fn ok(&self, args: &[&str]) -> String {
        let (ok, o, e) = self.ctl(args);
        assert!(ok, "fleetctl {args:?}:\n{o}\n{e}");
        o
    }
    fn file(&mut self, name: &str, xfleet: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, format!("[Service]\nExecStart=/bin/sleep infinity\n\n[X-Fleet]\n{xfleet}")).expect("write");
        self.units.push(name.into());
        p.display().to_string()
    }
    fn machine(&self, name: &str) -> MachineProc {
        self.state.machine(name).expect("machine").clone()
    }
    fn name_of(&self, id: &str) -> String {
        self.state.machines.iter().find(|m| m.machine_id == id).map(|m| m.name.clone()).unwrap_or_default()
    }
    /// unit -> machine name, from fleet.
    fn placement(&self) -> BTreeMap<String, String> {
        self.ok(&["list-unit-files", "--no-legend", "--full", "--fields", "unit,target"])
            .lines()
            .filter_map(|l| {
                let c: Vec<&str> = l.split_whitespace().collect();
                (c.len() == 2 && self.units.iter().any(|u| u == c[0]))
                    .then(|| (c[0].to_string(), self.name_of(c[1].split('/').next().unwrap_or(""))))
            })
            .collect()
    }
    /// Where systemd itself reports each of our units active, and its MainPID there.
    async fn active_in_systemd(&self) -> BTreeMap<String, Vec<(String, u32)>> {
        let mut out: BTreeMap<String, Vec<(String, u32)>> = BTreeMap::new();
        for m in &self.state.machines {
            if !fleet_integration::process::alive(m.pid) {
                continue;
            }
            let Ok(bus) = MachineBus::connect(m).await else { continue };
            for u in &self.units {
                if let Ok(p) = bus.unit(u).await {
                    if p.active_state == "active" {
                        out.entry(u.clone()).or_default().push((m.name.clone(), p.main_pid));
                    }
                }
            }
        }
        out
    }
    async fn all_active_once(&self) -> BTreeMap<String, Vec<(String, u32)>> {
        let want = self.units.len();
        wait_for("every unit active on exactly one machine", T, || async {
            let a = self.active_in_systemd().await;
            (a.len() == want && a.values().all(|v| v.len() == 1)).then_some(a)
        })
        .await
        .expect("units active")
    }
    /// Each engine's answer to /engine/status, or why there was none (for failure messages).
    async fn engine_statuses(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.state.engines {
            let answer = match testkit::http().get(format!("{}/engine/status", e.api_url)).send().await {
                Ok(resp) => format!("{} {}", resp.status(), resp.text().await.unwrap_or_default()),
                Err(err) => format!("no answer: {err:#}"),
            };
            out.push(format!(
                "{} (pid {}, alive {}): {answer}",
                e.name,
                e.pid,
                fleet_integration::process::alive(e.pid)
            ));
        }
        out
    }
    async fn leader(&self) -> Option<String> {
        for e in &self.state.engines {
            let Ok(resp) = testkit::http().get(format!("{}/engine/status", e.api_url)).send().await else { continue };
            if let Ok(v) = resp.json::<serde_json::Value>().await {
                if v["leader"] == true {
                    return Some(e.name.clone());
                }
            }
        }
        None
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.units.is_empty() {
            let mut args = vec!["destroy".to_string()];
            args.extend(self.units.iter().cloned());
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let _ = fleetctl(&self.state, &self.api(), &refs);
        }
    }
}

/// What systemd runs (unit, machine, MainPID) stays `before`, sampled for 2 s.
async fn unchanged_for_2s(lab: &Lab, before: &BTreeMap<String, Vec<(String, u32)>>, what: &str) {
    let samples = testkit::holds_for(Duration::from_secs(2), || async {
        let now = lab.active_in_systemd().await;
        if &now == before {
            Ok(())
        } else {
            Err(format!("{what}: before {before:?}, now {now:?}"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(samples >= 3, "only {samples} samples in 2 s");
}
