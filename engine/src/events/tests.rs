//! The kept history and its readers' filters.

use super::*;

const M1: &str = "0000000000000000000000000000000a";
const M2: &str = "b000000000000000000000000000000b";

fn name(s: &str) -> UnitName {
    UnitName::parse(s).expect("unit name")
}

fn happened(kind: EventKind, unit: &str) -> Happened {
    Happened::new(kind).unit(&name(unit))
}

#[test]
fn the_history_is_bounded_and_a_reader_from_before_it_is_told() {
    let log = EventLog::new(3);
    log.listed(10, "t");
    log.record((11..16).map(|r| (r, happened(EventKind::UnitSubmitted, &format!("u{r}.service")))).collect(), "t");
    let all = log.read(None, &Filter::default(), 100, None).events;
    let ids: Vec<&str> = all.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, vec!["13.0", "14.0", "15.0"]);
    // From before what is kept: a gap first, then what is kept.
    let from_old = log.read(Some("11.0".parse().expect("id")), &Filter::default(), 100, None).events;
    assert_eq!(from_old[0].kind, "gap");
    assert_eq!(from_old[0].id, "12.0", "resuming after the gap gives what is kept");
    assert_eq!(from_old.len(), 4);
    // From the last kept one: nothing lost, nothing repeated.
    assert!(log.read(Some("15.0".parse().expect("id")), &Filter::default(), 100, None).events.is_empty());
    // Pages and tails.
    let page = log.read(Some("0".parse().expect("id")), &Filter::default(), 2, None);
    assert_eq!((page.events.len(), page.more), (2, true));
    let tail = log.read(None, &Filter::default(), 100, Some(1)).events;
    assert_eq!(tail.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), vec!["15.0"]);
    assert_eq!(log.newest().to_string(), "15.0");
}

#[test]
fn filters_choose_by_unit_glob_machine_and_kind() {
    let log = EventLog::new(100);
    log.listed(1, "t");
    let mut placed = happened(EventKind::UnitScheduled, "web@1.service");
    placed.machine = M1.into();
    let mut moved = happened(EventKind::UnitMoved, "web@2.service");
    moved.machine = M2.into();
    moved.from = M1.into();
    log.record(
        vec![
            (2, happened(EventKind::UnitSubmitted, "web@1.service")),
            (3, placed),
            (4, moved),
            (5, happened(EventKind::UnitSubmitted, "db.service")),
        ],
        "t",
    );
    let ids = |f: Filter| -> Vec<String> { log.read(None, &f, 100, None).events.into_iter().map(|e| e.id).collect() };
    let f = |u: Option<&str>, m: Option<&str>, k: Option<&str>| Filter::parse(u, m, k).expect("filter");
    assert_eq!(ids(f(Some("web@*"), None, None)), vec!["2.0", "3.0", "4.0"]);
    assert_eq!(ids(f(Some("db.service,web@2.service"), None, None)), vec!["4.0", "5.0"]);
    assert_eq!(ids(f(None, Some(M1), None)), vec!["3.0", "4.0"], "a move concerns the machine it left");
    assert_eq!(ids(f(None, Some(&M2[..8]), None)), vec!["4.0"], "a machine by the prefix fleetctl shows");
    assert_eq!(ids(f(None, None, Some("unit-submitted"))), vec!["2.0", "5.0"]);
    assert_eq!(ids(f(None, None, Some("unit-moved, unit-sched*"))), vec!["3.0", "4.0"]);
    let bad = Filter::parse(None, None, Some("unit-exploded")).err().unwrap_or_default();
    assert!(bad.contains("unit-exploded") && bad.contains("unit-started"), "{bad}");
}
