//! The seeded chaos run and its checker.

use super::*;

/// A small, seeded xorshift: the seed is printed so a failing run can be replayed with
/// `FLEET_CHAOS_SEED=<seed>`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the checker sees: for each sample, unit -> (machine, systemd's ActiveState) on every
/// machine whose systemd knows the unit.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sample {
    states: BTreeMap<String, Vec<(String, String)>>,
    /// Machines that were up (not powered off or booting) but whose systemd could not be read.
    unreadable: Vec<String>,
}

impl Sample {
    /// Machines where systemd reports `unit` active.
    fn active_on(&self, unit: &str) -> Vec<String> {
        self.on(unit, |s| s == "active")
    }

    /// Machines where anything of `unit` runs: active, activating, deactivating, reloading
    /// (everything but inactive and failed).
    fn running_on(&self, unit: &str) -> Vec<String> {
        self.on(unit, |s| !matches!(s, "inactive" | "failed"))
    }

    fn on(&self, unit: &str, f: impl Fn(&str) -> bool) -> Vec<String> {
        self.states.get(unit).into_iter().flatten().filter(|(_, s)| f(s)).map(|(m, _)| m.clone()).collect()
    }

    /// unit -> machines where it is active, for units active somewhere.
    fn active(&self) -> BTreeMap<String, Vec<String>> {
        self.states.keys().map(|u| (u.clone(), self.active_on(u))).filter(|(_, ms)| !ms.is_empty()).collect()
    }
}

/// Reads every machine's systemd; machines in `down` (powered off or booting) are skipped, any
/// other one that cannot be read is named in `unreadable`.
async fn sample(state: &LabState, units: &[String], down: &std::collections::BTreeSet<String>) -> Sample {
    let mut out = Sample::default();
    for m in &state.machines {
        if down.contains(&m.name) || !fleet_integration::process::alive(m.pid) {
            continue;
        }
        let states = match MachineBus::connect(m).await {
            Ok(bus) => bus.active_states(units).await,
            Err(e) => Err(e),
        };
        match states {
            Ok(states) => {
                for (u, st) in states {
                    out.states.entry(u).or_default().push((m.name.clone(), st));
                }
            }
            Err(_) => out.unreadable.push(m.name.clone()),
        }
    }
    out
}

/// The kinds of fault the chaos run injects; every one happens in every run.
/// Longest a chaos step waits for a leader after a fault that removed it.
const LEADER_AGAIN: Duration = Duration::from_secs(15);

const CHAOS_FAULTS: [&str; 7] = [
    "kill leader",
    "kill agent",
    "cut machine",
    "kill etcd member",
    "power off machine",
    "cut machine while the leader is killed",
    "etcd loses quorum",
];

/// Chaos: a few hundred units on the lab's machines, then a seeded random sequence of faults
/// (leader killed, agent killed, machine cut and healed, etcd member killed, machine killed and
/// rebooted), with a checker reading every machine's own systemd throughout.
/// `FLEET_CHAOS_SECS` sets how long faults are injected (default 60; a soak can run for hours).
#[tokio::test]
async fn fault_chaos() {
    let Some(mut lab) = fault_lab("fault-chaos").await else { return };
    let seed: u64 = std::env::var("FLEET_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1
    });
    let secs: u64 = std::env::var("FLEET_CHAOS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    eprintln!("chaos seed {seed} ({secs} s of faults); replay with FLEET_CHAOS_SEED={seed}");
    // A soak is asked for on purpose: the watchdog allows for it.
    testkit::allow_longer(Duration::from_secs(secs));
    let mut rng = Rng(seed);

    // 200 ordinary units (from one template), 6 exclusive ones, 4 conflicting pairs.
    let tpl = lab.dir.join("ch@.service");
    std::fs::write(&tpl, "[Service]\nExecStart=/bin/sleep infinity\n").expect("write");
    lab.ok(&["submit", tpl.to_str().unwrap_or_default()]);
    let plain: Vec<String> = (0..200).map(|i| format!("ch@{i}.service")).collect();
    lab.units.extend(plain.iter().cloned());
    let exclusive: Vec<String> = (0..6).map(|i| format!("chx-{i}.service")).collect();
    let mut files = Vec::new();
    for x in &exclusive {
        files.push(lab.file(x, "Exclusive=true\n"));
    }
    let mut pairs = Vec::new();
    for i in 0..4 {
        let (a, b) = (format!("chc-{i}-a.service"), format!("chc-{i}-b.service"));
        files.push(lab.file(&a, &format!("Conflicts={b}\n")));
        files.push(lab.file(&b, ""));
        pairs.push((a, b));
    }
    for chunk in plain.chunks(50) {
        let mut args = vec!["start", "--no-block"];
        args.extend(chunk.iter().map(String::as_str));
        lab.ok(&args);
    }
    let mut args = vec!["start", "--no-block"];
    args.extend(files.iter().map(String::as_str));
    lab.ok(&args);
    let units = lab.units.clone();
    let settled = |s: &Sample| units.iter().all(|u| s.active_on(u).len() == 1) && s.unreadable.is_empty();
    let state = lab.state.clone();
    let nobody_down = std::collections::BTreeSet::new();
    let first = wait_for("all chaos units active once", Duration::from_secs(120), || async {
        let s = sample(&state, &units, &nobody_down).await;
        settled(&s).then_some(s.active())
    })
    .await
    .expect("chaos units start");
    let unit_files = |lab: &Lab| -> std::collections::BTreeSet<String> {
        lab.ok(&["list-unit-files", "--no-legend"])
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    };
    let submitted = unit_files(&lab);
    let pids_before = main_pids(&lab.state, &first).await;

    // The checker: runs until told to stop, recording violations.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let (cut_tx, cut_rx) = tokio::sync::watch::channel::<(Option<String>, Option<Instant>)>((None, None));
    let (down_tx, down_rx) = tokio::sync::watch::channel(std::collections::BTreeSet::<String>::new());
    let checker = {
        let (state, units, exclusive, pairs) = (lab.state.clone(), units.clone(), exclusive.clone(), pairs.clone());
        tokio::spawn(async move {
            let mut violations = Vec::new();
            let start = Instant::now();
            let mut samples = 0;
            while !*stop_rx.borrow() {
                let down = down_rx.borrow().clone();
                let s = sample(&state, &units, &down).await;
                samples += 1;
                let (cut, healed_at) = cut_rx.borrow().clone();
                let t = start.elapsed();
                // A machine that is up but whose systemd cannot be read is not a machine running
                // nothing (one being powered off or booted is in `down`, read again just now).
                let still_up: Vec<&String> = s.unreadable.iter().filter(|m| !down_rx.borrow().contains(*m)).collect();
                if !still_up.is_empty() {
                    violations.push(format!("{t:?}: systemd of {still_up:?} could not be read"));
                }
                for x in &exclusive {
                    let running = s.running_on(x);
                    if running.len() > 1 {
                        violations.push(format!("{t:?}: exclusive {x} runs on {running:?} ({:?})", s.states.get(x)));
                    }
                }
                for (a, b) in &pairs {
                    let (ma, mb) = (s.active_on(a), s.active_on(b));
                    if ma.iter().any(|m| mb.contains(m)) {
                        violations.push(format!("{t:?}: conflicting {a} and {b} together on {ma:?}"));
                    }
                }
                // An ordinary unit may run twice only while a machine is cut off (one copy on
                // it), and for at most 10 s after the heal.
                let cut_now = cut.as_ref().filter(|_| healed_at.is_none());
                let grace = healed_at.is_some_and(|h| h.elapsed() < Duration::from_secs(10));
                for (u, ms) in s.active() {
                    let excused = grace || cut_now.is_some_and(|c| ms.contains(c));
                    if ms.len() > 1 && !excused {
                        violations.push(format!("{t:?}: {u} active on {ms:?} with no machine cut"));
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    _ = stop_rx.changed() => {}
                }
            }
            (violations, samples)
        })
    };

    // Faults, each undone before the next, in a seeded order that goes through every kind
    // before repeating one, so every run injects each kind at least once.
    let template = unit_template();
    let machines: Vec<String> = lab.state.machines.iter().map(|m| m.name.clone()).collect();
    let mut touched = std::collections::BTreeSet::new();
    let mut injected = [0usize; CHAOS_FAULTS.len()];
    // FLEET_CHAOS_FAULTS=0,4,6,5 replays a given order of kinds first (then random ones).
    let mut order: Vec<usize> = std::env::var("FLEET_CHAOS_FAULTS")
        .map(|s| s.split(',').rev().filter_map(|k| k.trim().parse().ok()).filter(|k| *k < CHAOS_FAULTS.len()).collect())
        .unwrap_or_default();
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until || injected.contains(&0) {
        if order.is_empty() {
            order = (0..CHAOS_FAULTS.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let kind = order.pop().unwrap_or(0);
        let m = machines[rng.below(machines.len() as u64) as usize].clone();
        eprintln!("chaos: {}", CHAOS_FAULTS[kind]);
        match kind {
            0 => {
                let Some(leader) = lab.leader().await else { continue };
                eprintln!("chaos: kill engine {leader}");
                faults::kill(&mut lab.state, Kind::Engine, &leader).await.expect("kill engine");
                tokio::time::sleep(Duration::from_secs(3 + rng.below(4))).await;
                faults::start(&mut lab.state, Kind::Engine, &leader, &template).await.expect("start engine");
            }
            1 => {
                eprintln!("chaos: kill agent on {m}");
                faults::kill(&mut lab.state, Kind::Agent, &m).await.expect("kill agent");
            }
            2 | 5 => {
                eprintln!("chaos: cut {m}");
                touched.insert(m.clone());
                let _ = cut_tx.send((Some(m.clone()), None));
                let cut = Cut::new(&lab.state, &m);
                if kind == 5 {
                    // Overlapping faults: the leader dies while a machine is cut off.
                    tokio::time::sleep(Duration::from_secs(1 + rng.below(3))).await;
                    // The fault before may have been a leader's death or a quorum loss: the
                    // leader is the one there is once there is one again.
                    let Ok(leader) = wait_for("a leader", LEADER_AGAIN, || lab.leader()).await else {
                        let statuses = lab.engine_statuses().await;
                        panic!("seed {seed}: no leader to kill in {LEADER_AGAIN:?}; the engines say: {statuses:#?}")
                    };
                    eprintln!("chaos: kill engine {leader} while {m} is cut");
                    faults::kill(&mut lab.state, Kind::Engine, &leader).await.expect("kill engine");
                    tokio::time::sleep(Duration::from_secs(3 + rng.below(4))).await;
                    faults::start(&mut lab.state, Kind::Engine, &leader, &template).await.expect("start engine");
                }
                tokio::time::sleep(Duration::from_secs(4 + rng.below(10))).await;
                drop(cut);
                let _ = cut_tx.send((Some(m.clone()), Some(Instant::now())));
                eprintln!("chaos: healed {m}");
            }
            3 => {
                let e = format!("etcd{}", 1 + rng.below(lab.state.etcd.len() as u64));
                eprintln!("chaos: kill {e}");
                faults::kill(&mut lab.state, Kind::Etcd, &e).await.expect("kill etcd");
                tokio::time::sleep(Duration::from_secs(2 + rng.below(5))).await;
                faults::start(&mut lab.state, Kind::Etcd, &e, &template).await.expect("start etcd");
            }
            6 => {
                // A majority of etcd's members down: nothing can be written for a while.
                let members: Vec<String> = lab.state.etcd.iter().map(|e| e.name.clone()).collect();
                let lost: Vec<String> = members.iter().take(members.len() / 2 + 1).cloned().collect();
                eprintln!("chaos: quorum lost: kill {lost:?}");
                for e in &lost {
                    faults::kill(&mut lab.state, Kind::Etcd, e).await.expect("kill etcd");
                }
                tokio::time::sleep(Duration::from_secs(3 + rng.below(5))).await;
                for e in &lost {
                    faults::start(&mut lab.state, Kind::Etcd, e, &template).await.expect("start etcd");
                }
                let back = Instant::now();
                // Writes resume once quorum is back: a new unit is accepted and runs.
                let probe = format!("chq-{}.service", injected[6]);
                let file = lab.file(&probe, "");
                wait_for("a write accepted after quorum returned", Duration::from_secs(60), || async {
                    lab.ctl(&["start", "--no-block", &file]).0.then_some(())
                })
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
                // And an engine leads again: the old leader's key outlives the outage by at most
                // its lease TTL (etcd renews leases when it elects a leader), unless revoked.
                let Ok(leader) = wait_for("a leader after quorum returned", LEADER_AGAIN, || lab.leader()).await else {
                    let statuses = lab.engine_statuses().await;
                    panic!("seed {seed}: no leader {LEADER_AGAIN:?} after quorum returned: {statuses:#?}")
                };
                eprintln!("chaos: {leader} leads {:?} after quorum returned", back.elapsed());
            }
            _ => {
                eprintln!("chaos: power off {m}");
                touched.insert(m.clone());
                down_tx.send_modify(|d| {
                    d.insert(m.clone());
                });
                faults::kill(&mut lab.state, Kind::Machine, &m).await.expect("kill machine");
                tokio::time::sleep(Duration::from_secs(2 + rng.below(8))).await;
                faults::start(&mut lab.state, Kind::Machine, &m, &template).await.expect("boot machine");
                down_tx.send_modify(|d| {
                    d.remove(&m);
                });
                eprintln!("chaos: {m} back");
            }
        }
        injected[kind] += 1;
        tokio::time::sleep(Duration::from_secs(1 + rng.below(4))).await;
    }
    let counts: Vec<String> = CHAOS_FAULTS.iter().zip(injected).map(|(k, n)| format!("{k}: {n}")).collect();
    eprintln!("chaos: faults injected: {}", counts.join(", "));
    assert!(!injected.contains(&0), "seed {seed}: a kind of fault never happened: {counts:?}");
    let last_fault = Instant::now();
    let state = lab.state.clone();
    let units = lab.units.clone();
    let settled = |s: &Sample| units.iter().all(|u| s.active_on(u).len() == 1) && s.unreadable.is_empty();
    let end = wait_for("every unit active exactly once after the last fault", Duration::from_secs(90), || async {
        let s = sample(&state, &units, &nobody_down).await;
        settled(&s).then_some(s.active())
    })
    .await;
    let _ = stop_tx.send(true);
    let (violations, samples) = checker.await.expect("checker");
    let end = match end {
        Ok(end) => end,
        Err(e) => {
            // Say which units are wrong and what fleet believes of them, so a failure found once in
            // CI can be understood without replaying it.
            let s = sample(&lab.state, &units, &nobody_down).await;
            let wrong: Vec<String> = units
                .iter()
                .filter(|u| s.active_on(u).len() != 1)
                .map(|u| format!("{u}: {:?}", s.states.get(u).cloned().unwrap_or_default()))
                .collect();
            let (_, listed, _) = lab.ctl(&["list-units", "--no-legend", "--full"]);
            let believed: Vec<&str> = listed
                .lines()
                .filter(|l| wrong.iter().any(|w| w.split(':').next().is_some_and(|u| l.starts_with(u))))
                .collect();
            let (_, machines, _) = lab.ctl(&["list-machines", "--full"]);
            panic!(
                "seed {seed}: {e}\n{} units not active exactly once (first 20): {:#?}\nunreadable machines: {:?}\nfleet lists them as: {believed:#?}\nmachines:\n{machines}",
                wrong.len(),
                &wrong[..wrong.len().min(20)],
                s.unreadable
            );
        }
    };
    eprintln!("chaos: settled {:?} after the last fault; {samples} samples", last_fault.elapsed());
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violations, first: {:?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
    // Every unit submitted is still there, by name (the quorum probes were added since).
    let listed = unit_files(&lab);
    let lost: Vec<&String> = submitted.iter().filter(|u| !listed.contains(*u)).collect();
    assert!(lost.is_empty(), "seed {seed}: units lost: {lost:?}");
    // Units that started on machines never cut or powered off stayed where they were: leader
    // changes, agent restarts and etcd faults moved nothing.
    let pids_after = main_pids(&lab.state, &end).await;
    for (u, ms) in &first {
        if !touched.contains(&ms[0]) {
            assert_eq!(
                end.get(u),
                Some(ms),
                "seed {seed}: {u} moved although its machine was never cut or powered off"
            );
            // An exclusive unit is stopped by its own agent when the lease cannot be renewed for a
            // TTL (docs/reliability.md: the price of never running it twice), which an etcd
            // without quorum for longer than that causes; it starts again where it was.
            if exclusive.contains(u) && injected[6] > 0 {
                continue;
            }
            assert_eq!(pids_after.get(u), pids_before.get(u), "seed {seed}: {u} was restarted (MainPID changed)");
        }
    }
}

/// MainPID of each unit on the machine where it is active.
async fn main_pids(state: &LabState, placed: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for m in &state.machines {
        let Ok(bus) = MachineBus::connect(m).await else { continue };
        for (u, ms) in placed {
            if ms.first() == Some(&m.name) {
                if let Ok(p) = bus.unit(u).await {
                    out.insert(u.clone(), p.main_pid);
                }
            }
        }
    }
    out
}
