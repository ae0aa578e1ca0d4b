//! The event stream on the lab, through fleetctl as a user meets it: `fleetctl events --follow`
//! sees a unit started with fleetctl submitted, placed and started on a real machine's systemd,
//! then stopped and destroyed; the history, `--since` resumption and `status`'s recent events
//! agree with it.

use fleet_integration::testkit::{self, fleetctl, text, EventFollower};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[test]
fn fleetctl_follows_a_units_life_and_resumes_where_it_left_off() {
    let Some(lab) = testkit::lab() else { return };
    let Some(api) = lab.api_url().map(str::to_string) else { return };
    let dir = testkit::scratch("events").expect("scratch dir");
    // An instance of its own: the lab's engine keeps the events of earlier runs.
    let unit = &format!("evtest@{}.service", std::process::id());
    let path = dir.join("evtest@.service");
    std::fs::write(&path, "[Service]\nExecStart=/bin/sleep infinity\n").expect("write unit");
    let run = |args: &[&str]| {
        let out = fleetctl(&lab, &api, args).expect("fleetctl runs");
        let (o, e) = text(&out);
        assert_eq!(out.status.code(), Some(0), "fleetctl {args:?}:\n{o}\n{e}");
        o
    };

    let mut follow = EventFollower::start(&lab, &api, &[unit]).expect("fleetctl events --follow");
    let mut expect = |words: &[&str]| follow.expect(words, T).expect("event line");

    // The instance's path: fleetctl finds the template beside it, as the original did.
    run(&["start", &dir.join(unit).display().to_string()]);
    expect(&["unit-submitted", unit, "launched"]);
    let placed = expect(&["unit-scheduled", unit]);
    let started = expect(&["unit-started", unit]);
    // Started on the machine it was placed on, which fleetctl lists.
    let machine = started.split_whitespace().nth(3).expect("machine column").trim_end_matches("...").to_string();
    assert!(placed.contains(&machine), "placed on one machine, started on another:\n{placed}\n{started}");
    let listed = run(&["list-units", "--no-legend"]);
    assert!(listed.lines().any(|l| l.starts_with(unit) && l.contains(&machine) && l.contains("active")), "{listed}");

    // The same history, in order, without --follow; and from an id on, only what followed it.
    let history = run(&["events", unit]);
    let pos = |k: &str| history.lines().position(|l| l.contains(k)).unwrap_or_else(|| panic!("no {k} in:\n{history}"));
    assert!(pos("unit-submitted") < pos("unit-scheduled") && pos("unit-scheduled") < pos("unit-started"), "{history}");
    let json = run(&["events", "-o", "json", unit]);
    let events: Vec<serde_json::Value> =
        json.lines().map(|l| serde_json::from_str(l).expect("one event per line")).collect();
    let submitted = events.iter().find(|e| e["kind"] == "unit-submitted").expect("submitted event");
    let id = submitted["id"].as_str().expect("id");
    let after = run(&["events", "-o", "json", "--since", id, unit]);
    let kinds: Vec<String> = after
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| e["kind"].as_str().map(str::to_string))
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("unit-scheduled"), "after {id}: {kinds:?}");
    assert!(!kinds.contains(&"unit-submitted".to_string()), "an event repeated: {kinds:?}");

    // status ends with the unit's recent events.
    let status = run(&["status", unit]);
    assert!(status.contains("Recent fleet events:") && status.contains("unit-started"), "{status}");

    // Stopped and destroyed: systemd's stop and the unscheduling reach the follower.
    run(&["destroy", unit]);
    expect(&["unit-destroyed", unit]);
    expect(&["unit-stopped", unit, &machine]);
    let gone = expect(&["unit-unscheduled", unit]);
    assert!(gone.contains("the unit was destroyed"), "{gone}");
    // Only the units asked for: nothing of other tests' units came through the filter.
    assert!(follow.seen.iter().all(|l| l.contains(unit.as_str())), "{}", follow.seen.join("\n"));

    // A filter that names no kind is refused with what is wrong.
    let out = fleetctl(&lab, &api, &["events", "--kind", "unit-exploded"]).expect("fleetctl runs");
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("unit-exploded") && err.contains("unit-started"), "{err}");
}
