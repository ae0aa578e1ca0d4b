use super::*;

/// A service of `n` instances running v1, healthy, and a simulated cluster: a set instance is
/// restarted by its agent (one step later it reports the new version), its health decided by
/// `healthy_version`.
struct Sim {
    instances: BTreeMap<String, Instance>,
    /// Instances set but not yet restarted.
    restarting: Vec<String>,
    good: fn(&str) -> Option<Health>,
}

fn service(n: usize) -> Sim {
    let instances = (1..=n)
        .map(|i| {
            let inst = Instance {
                version: "v1".into(),
                reported: Some("v1".into()),
                active_state: "active".into(),
                health: Some(Health::Healthy),
                declares_health: true,
            };
            (format!("web@{i}.service"), inst)
        })
        .collect();
    Sim { instances, restarting: Vec::new(), good: |_| Some(Health::Healthy) }
}

fn spec(max_parallel: u32) -> RolloutSpec {
    RolloutSpec { max_parallel, canaries: 0, min_healthy_secs: 0, deadline_secs: 60 }
}

impl Sim {
    /// The agents act on what was set last time, then the leader steps.
    fn tick(&mut self, r: &RolloutRecord, now: u64) -> Step {
        for name in self.restarting.drain(..) {
            let i = self.instances.get_mut(&name).expect("instance");
            i.reported = Some(i.version.clone());
            i.active_state = "active".into();
            i.health = (self.good)(&i.version);
        }
        let s = step(r, &self.instances, now);
        for (name, version) in &s.set {
            let i = self.instances.get_mut(name).expect("instance");
            i.version = version.clone();
            i.active_state = "activating".into();
            i.health = None;
            self.restarting.push(name.clone());
        }
        s
    }

    fn healthy(&self) -> usize {
        self.instances.values().filter(|i| i.healthy()).count()
    }

    fn on(&self, version: &str) -> usize {
        self.instances.values().filter(|i| i.version == version).count()
    }

    /// Steps until the rollout is over or `limit` steps passed; the fewest healthy instances seen.
    fn run(&mut self, mut r: RolloutRecord, limit: u64) -> (RolloutRecord, usize) {
        let mut fewest = self.healthy();
        for now in 0..limit {
            let s = self.tick(&r, now);
            fewest = fewest.min(self.healthy());
            r = s.record;
            if r.phase.is_over() || r.phase == Phase::AwaitingPromotion {
                break;
            }
        }
        (r, fewest)
    }
}

#[test]
fn six_instances_two_at_a_time_never_fewer_than_four_healthy() {
    let mut sim = service(6);
    let (r, fewest) = sim.run(RolloutRecord::new("web@.service", "v2", "v1", spec(2), 0), 50);
    assert_eq!(r.phase, Phase::Succeeded, "{r:?}");
    assert_eq!(sim.on("v2"), 6);
    assert_eq!(fewest, 4);
    assert!(r.note.contains("every instance (6) runs the new version"), "{}", r.note);
}

#[test]
fn a_bad_version_stops_at_the_first_batch_and_goes_back() {
    let mut sim = service(6);
    sim.good = |v| Some(if v == "v2" { Health::Unhealthy } else { Health::Healthy });
    let mut r = RolloutRecord::new("web@.service", "v2", "v1", spec(2), 0);
    let mut most_on_v2 = 0;
    for now in 0..50 {
        r = sim.tick(&r, now).record;
        most_on_v2 = most_on_v2.max(sim.on("v2"));
        if r.phase.is_over() {
            break;
        }
    }
    assert_eq!(r.phase, Phase::Reverted, "{r:?}");
    assert_eq!(most_on_v2, 2, "only the first batch ever ran the bad version");
    assert_eq!(sim.on("v1"), 6);
    assert!(r.reverting);
}

#[test]
fn an_instance_not_healthy_by_its_deadline_turns_the_rollout_back() {
    let mut sim = service(3);
    sim.good = |v| if v == "v2" { None } else { Some(Health::Healthy) }; // never says
    let r = RolloutRecord::new("web@.service", "v2", "v1", RolloutSpec { deadline_secs: 10, ..spec(1) }, 0);
    let s = sim.tick(&r, 0);
    assert_eq!(s.set, vec![("web@1.service".to_string(), "v2".to_string())]);
    assert_eq!(s.wake_at, Some(10));
    let s = sim.tick(&s.record, 9);
    assert_eq!(s.record.phase, Phase::Running);
    assert!(!s.record.reverting);
    let s = sim.tick(&s.record, 10);
    assert!(s.record.reverting);
    assert!(s.record.note.contains("web@1.service was not healthy within 10s"), "{}", s.record.note);
    assert_eq!(s.set, vec![("web@1.service".to_string(), "v1".to_string())]);
}

#[test]
fn canaries_wait_for_a_promote() {
    let mut sim = service(4);
    let r = RolloutRecord::new("web@.service", "v2", "v1", RolloutSpec { canaries: 1, ..spec(2) }, 0);
    let (r, _) = sim.run(r, 20);
    assert_eq!(r.phase, Phase::AwaitingPromotion, "{r:?}");
    assert_eq!(sim.on("v2"), 1);
    // Waiting: nothing more happens, however long.
    let s = sim.tick(&r, 100);
    assert!(s.set.is_empty());
    assert_eq!(s.record.phase, Phase::AwaitingPromotion);
    let r = act(&s.record, Action::Promote).expect("promote");
    let (r, _) = sim.run(r, 50);
    assert_eq!(r.phase, Phase::Succeeded);
    assert_eq!(sim.on("v2"), 4);
}

#[test]
fn min_healthy_time_holds_an_instance_before_it_counts() {
    let mut sim = service(2);
    let r = RolloutRecord::new("web@.service", "v2", "v1", RolloutSpec { min_healthy_secs: 5, ..spec(1) }, 0);
    let s = sim.tick(&r, 0);
    let s = sim.tick(&s.record, 1); // restarted, healthy from now
    assert_eq!(s.wake_at, Some(6));
    assert!(s.set.is_empty(), "the second waits for the first's minimum time");
    let s = sim.tick(&s.record, 6);
    assert_eq!(s.set, vec![("web@2.service".to_string(), "v2".to_string())]);
}

#[test]
fn pause_resume_and_undo() {
    let mut sim = service(4);
    let r = RolloutRecord::new("web@.service", "v2", "v1", spec(1), 0);
    let s = sim.tick(&r, 0);
    let paused = act(&s.record, Action::Pause).expect("pause");
    let s = sim.tick(&paused, 1);
    let s = sim.tick(&s.record, 2);
    assert!(s.set.is_empty());
    assert_eq!(s.record.phase, Phase::Paused);
    assert_eq!(sim.on("v2"), 1);
    let (r, _) = sim.run(act(&s.record, Action::Resume).expect("resume"), 50);
    assert_eq!((r.phase, sim.on("v2")), (Phase::Succeeded, 4));
    // Undone after it succeeded: the same way back.
    let (r, fewest) = sim.run(act(&r, Action::Undo).expect("undo"), 50);
    assert_eq!((r.phase, sim.on("v1")), (Phase::Reverted, 4));
    assert_eq!(fewest, 3);
    assert!(act(&r, Action::Resume).is_err());
    assert!(act(&r, Action::Promote).is_err());
}

#[test]
fn a_failure_while_going_back_stops_the_rollout() {
    let mut sim = service(2);
    sim.good = |_| Some(Health::Unhealthy);
    let (r, _) = sim.run(RolloutRecord::new("web@.service", "v2", "v1", spec(1), 0), 20);
    assert_eq!(r.phase, Phase::Failed, "{r:?}");
    assert!(r.note.contains("while going back"), "{}", r.note);
    assert!(act(&r, Action::Undo).is_err());
}

#[test]
fn units_that_are_already_unavailable_count_against_max_parallel() {
    let mut sim = service(4);
    sim.instances.get_mut("web@4.service").expect("instance").active_state = "failed".into();
    let s = sim.tick(&RolloutRecord::new("web@.service", "v2", "v1", spec(2), 0), 0);
    let set: Vec<&str> = s.set.iter().map(|(n, _)| n.as_str()).collect();
    // The broken one costs nothing to replace; it leaves room for one more.
    assert_eq!(set, vec!["web@4.service", "web@1.service"]);
}
