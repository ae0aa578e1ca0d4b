//! `POST /units:wait`: one streaming answer per request, an event per unit as it gets where it
//! was asked to, however many units are named.

use super::*;

/// Longest wait one request may ask for; a client waiting longer asks again.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
const DEFAULT_WAIT: Duration = Duration::from_secs(5);
/// A unit the leader cannot place may still be placed soon (a machine joining): it is reported
/// unplaceable only after this long.
const UNPLACEABLE_GRACE: Duration = Duration::from_secs(10);
/// A failed unit may be replaced by a newer state reported just after: it is reported failed
/// only after this long.
const FAILED_GRACE: Duration = Duration::from_secs(2);
/// How often a waiting stream says how many units are still pending, so a client can tell a
/// slow wait from a dead engine.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Shortest time between two looks at the pending units while the view keeps changing.
const RECHECK: Duration = Duration::from_millis(10);

/// Where a unit stands against what is awaited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// There, on this machine (empty for `inactive` and `gone`).
    Reached { machine: String },
    /// Not yet; `unplaceable` says why the leader could not place it, `failed` that systemd on
    /// its machine reports it failed.
    Pending { unplaceable: Option<String>, failed: bool },
    /// The unit no longer exists.
    Destroyed,
}

/// Where `name` stands against `until` in `v`.
pub fn check(v: &ClusterView, name: &UnitName, until: Until) -> Check {
    let reported = v.states.get(name);
    let Some(rec) = v.units.get(name) else {
        return match until {
            Until::Gone if reported.is_none_or(|s| s.is_empty()) => Check::Reached { machine: String::new() },
            Until::Gone => Check::Pending { unplaceable: None, failed: false },
            _ => Check::Destroyed,
        };
    };
    let (current, machine) = placement_of(v, rec);
    let Some(machine) = machine else {
        // A global unit runs on every eligible machine: there is no one machine to wait for,
        // except until all have stopped it.
        let stopped = reported.into_iter().flatten().all(|(_, s)| is_stopped(&s.active_state));
        return match until {
            Until::Stopped if !stopped => Check::Pending { unplaceable: None, failed: false },
            _ => Check::Reached { machine: String::new() },
        };
    };
    let unplaceable = match (current, v.why.get(name)) {
        (DesiredState::Inactive, Some(why)) if !why.is_empty() && until != Until::Inactive => Some(why.clone()),
        _ => None,
    };
    let on_machine = reported.and_then(|s| s.get(&machine));
    let (reached, failed) = match until {
        Until::Launched => (current == DesiredState::Launched, false),
        Until::Loaded => (current == DesiredState::Loaded, false),
        Until::Inactive => (current == DesiredState::Inactive, false),
        Until::Active => {
            let active = on_machine.is_some_and(|s| s.active_state == "active" && s.load_state == "loaded");
            let failed = current == DesiredState::Launched && on_machine.is_some_and(|s| s.active_state == "failed");
            (current == DesiredState::Launched && active, failed)
        }
        Until::Stopped => {
            let stopped = reported.into_iter().flatten().all(|(_, s)| is_stopped(&s.active_state));
            (current == DesiredState::Loaded && stopped, false)
        }
        Until::Gone => (false, false),
    };
    match reached {
        true if matches!(until, Until::Inactive) => Check::Reached { machine: String::new() },
        true => Check::Reached { machine },
        false => Check::Pending { unplaceable, failed },
    }
}

/// `POST /units:wait`: a stream (one JSON object a line) that reports each unit as it gets to
/// what is awaited, or why it will not, and ends when none is pending or the time is up.
pub async fn wait(State(api): State<Api>, headers: HeaderMap, body: axum::body::Bytes) -> Result<Response, BatchError> {
    check_json(&headers)?;
    let req: WaitRequest = decode_body(&body)?;
    let names = parse_names(&req.names)?;
    let window = req.timeout_ms.map(Duration::from_millis).unwrap_or(DEFAULT_WAIT);
    if window > MAX_WAIT {
        return Err(ApiError::bad_request(format!("timeoutMs: at most {}", MAX_WAIT.as_millis())).into());
    }
    fresh(&api).await?;
    if req.revision > api.cluster.revision() {
        settle(&api, req.revision).await;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(follow(api, names, req.until, window, tx));
    let stream = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|line| line.map(|l| Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(l))))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(stream)).into_response())
}

/// Re-checks the pending units each time the view changes, sending a line for each that is
/// done with, until none is left, the deadline passes or the client goes away.
async fn follow(api: Api, names: Vec<UnitName>, until: Until, window: Duration, tx: tokio::sync::mpsc::Sender<String>) {
    let deadline = Instant::now() + window;
    // A wait shorter than the grace reports an unplaceable unit, with the leader's reason, at its end.
    let unplaceable_grace = UNPLACEABLE_GRACE.min(window);
    let mut pending = names;
    let mut unplaceable_since: HashMap<UnitName, Instant> = HashMap::new();
    let mut failed_since: HashMap<UnitName, Instant> = HashMap::new();
    let mut changes = api.cluster.subscribe();
    let mut heartbeat = Instant::now() + HEARTBEAT;
    let line = |e: &WaitEvent| {
        serde_json::to_string(e).map(|mut s| {
            s.push('\n');
            s
        })
    };
    loop {
        changes.borrow_and_update();
        let now = Instant::now();
        let looked = now;
        let mut out = Vec::new();
        api.cluster.read(|v| {
            pending.retain(|name| {
                let event = match check(v, name, until) {
                    Check::Reached { machine } => {
                        let ip = v.machines.get(&machine).map(|m| m.public_ip.clone()).unwrap_or_default();
                        WaitEvent { machine_id: machine, primary_ip: ip, ..Default::default() }
                    }
                    Check::Destroyed => WaitEvent { error: "destroyed".into(), ..Default::default() },
                    Check::Pending { unplaceable, failed } => {
                        let graced = |since: &mut HashMap<UnitName, Instant>, on: bool, grace: Duration| match on {
                            true => now.duration_since(*since.entry(name.clone()).or_insert(now)) >= grace,
                            false => {
                                since.remove(name);
                                false
                            }
                        };
                        let failed_long = graced(&mut failed_since, failed, FAILED_GRACE);
                        // At the end of the wait an unplaceable unit is reported with its reason,
                        // however long it has been unplaceable.
                        let unplaceable_long = graced(&mut unplaceable_since, unplaceable.is_some(), unplaceable_grace)
                            || (now >= deadline && unplaceable.is_some());
                        if failed_long {
                            WaitEvent { error: "failed".into(), ..Default::default() }
                        } else if unplaceable_long {
                            WaitEvent {
                                error: "unplaceable".into(),
                                reason: unplaceable.unwrap_or_default(),
                                ..Default::default()
                            }
                        } else {
                            return true;
                        }
                    }
                };
                out.push(WaitEvent { name: name.to_string(), ..event });
                false
            })
        });
        let over = pending.is_empty() || Instant::now() >= deadline;
        if over {
            out.push(WaitEvent { pending: Some(pending.len()), done: true, ..Default::default() });
        } else if Instant::now() >= heartbeat {
            out.push(WaitEvent { pending: Some(pending.len()), ..Default::default() });
            heartbeat = Instant::now() + HEARTBEAT;
        }
        for e in &out {
            let Ok(l) = line(e) else { return };
            if tx.send(l).await.is_err() {
                return;
            }
        }
        if over {
            return;
        }
        // Grace periods end without a change in the view: look again at least this often.
        let timers = !unplaceable_since.is_empty() || !failed_since.is_empty();
        let next =
            deadline.min(heartbeat).min(Instant::now() + if timers { Duration::from_millis(250) } else { HEARTBEAT });
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                // A burst of changes (many units starting) is looked at once every few ms; the
                // first change after a quiet spell at once.
                tokio::time::sleep_until((looked + RECHECK).into()).await;
            }
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_model::{MachineRecord, ScheduleEntry, UnitStateRecord};

    fn name(n: &str) -> UnitName {
        UnitName::parse(n).expect("a unit name")
    }

    fn view_with(unit: &str, desired: DesiredState) -> ClusterView {
        let mut v = ClusterView::default();
        v.units.insert(name(unit), UnitRecord { name: name(unit), hash: "h".into(), desired_state: desired });
        v.machines
            .insert("m1".into(), MachineRecord { id: "m1".into(), public_ip: "10.0.0.1".into(), ..Default::default() });
        v
    }

    fn schedule(v: &mut ClusterView, unit: &str, machine: &str, desired: DesiredState) {
        v.schedule
            .entry(name(unit))
            .or_default()
            .insert(machine, ScheduleEntry { hash: "h".into(), desired_state: desired });
    }

    fn report(v: &mut ClusterView, unit: &str, machine: &str, applied: DesiredState, active: &str) {
        v.states.entry(name(unit)).or_default().insert(
            machine,
            UnitStateRecord {
                hash: "h".into(),
                load_state: "loaded".into(),
                active_state: active.into(),
                sub_state: Default::default(),
                applied,
                health: None,
            },
        );
    }

    #[test]
    fn a_unit_is_active_once_its_machine_reports_it_so() {
        let mut v = view_with("a.service", DesiredState::Launched);
        let pending = Check::Pending { unplaceable: None, failed: false };
        assert_eq!(check(&v, &name("a.service"), Until::Active), pending);
        schedule(&mut v, "a.service", "m1", DesiredState::Launched);
        report(&mut v, "a.service", "m1", DesiredState::Launched, "activating");
        assert_eq!(check(&v, &name("a.service"), Until::Launched), Check::Reached { machine: "m1".into() });
        assert_eq!(check(&v, &name("a.service"), Until::Active), pending);
        report(&mut v, "a.service", "m1", DesiredState::Launched, "active");
        assert_eq!(check(&v, &name("a.service"), Until::Active), Check::Reached { machine: "m1".into() });
        report(&mut v, "a.service", "m1", DesiredState::Launched, "failed");
        assert_eq!(check(&v, &name("a.service"), Until::Active), Check::Pending { unplaceable: None, failed: true });
    }

    #[test]
    fn a_state_of_another_version_of_the_unit_does_not_count() {
        let mut v = view_with("a.service", DesiredState::Launched);
        schedule(&mut v, "a.service", "m1", DesiredState::Launched);
        report(&mut v, "a.service", "m1", DesiredState::Launched, "active");
        if let Some(s) = v.states.get_mut(&name("a.service")).and_then(|s| s.get_mut("m1")) {
            s.hash = "old".into();
        }
        assert!(matches!(check(&v, &name("a.service"), Until::Launched), Check::Pending { .. }));
    }

    #[test]
    fn stopped_waits_for_every_machine_that_reports_the_unit() {
        let mut v = view_with("a.service", DesiredState::Loaded);
        schedule(&mut v, "a.service", "m1", DesiredState::Loaded);
        report(&mut v, "a.service", "m1", DesiredState::Loaded, "deactivating");
        report(&mut v, "a.service", "m2", DesiredState::Launched, "inactive");
        assert!(matches!(check(&v, &name("a.service"), Until::Stopped), Check::Pending { .. }));
        assert_eq!(check(&v, &name("a.service"), Until::Loaded), Check::Reached { machine: "m1".into() });
        report(&mut v, "a.service", "m1", DesiredState::Loaded, "inactive");
        assert_eq!(check(&v, &name("a.service"), Until::Stopped), Check::Reached { machine: "m1".into() });
    }

    #[test]
    fn a_global_unit_is_stopped_once_no_machine_runs_it() {
        let mut v = view_with("g.service", DesiredState::Loaded);
        v.rules.insert(
            name("g.service"),
            Ok(std::sync::Arc::new(fleet_model::rules::Rules { global: true, ..Default::default() })),
        );
        report(&mut v, "g.service", "m1", DesiredState::Loaded, "inactive");
        report(&mut v, "g.service", "m2", DesiredState::Launched, "active");
        assert!(matches!(check(&v, &name("g.service"), Until::Stopped), Check::Pending { .. }));
        report(&mut v, "g.service", "m2", DesiredState::Loaded, "failed");
        assert_eq!(check(&v, &name("g.service"), Until::Stopped), Check::Reached { machine: String::new() });
    }

    #[test]
    fn gone_means_destroyed_and_reported_by_no_machine() {
        let mut v = view_with("a.service", DesiredState::Launched);
        assert!(matches!(check(&v, &name("a.service"), Until::Gone), Check::Pending { .. }));
        v.units.clear();
        report(&mut v, "a.service", "m1", DesiredState::Launched, "deactivating");
        assert!(matches!(check(&v, &name("a.service"), Until::Gone), Check::Pending { .. }));
        assert_eq!(check(&v, &name("a.service"), Until::Active), Check::Destroyed);
        v.states.clear();
        assert_eq!(check(&v, &name("a.service"), Until::Gone), Check::Reached { machine: String::new() });
    }

    #[test]
    fn an_unplaced_unit_carries_the_leaders_reason() {
        let mut v = view_with("a.service", DesiredState::Launched);
        v.why.insert(name("a.service"), "no machine has region=mars".into());
        assert_eq!(
            check(&v, &name("a.service"), Until::Active),
            Check::Pending { unplaceable: Some("no machine has region=mars".into()), failed: false }
        );
        assert_eq!(check(&v, &name("a.service"), Until::Inactive), Check::Reached { machine: String::new() });
    }

    #[test]
    fn batches_are_validated_as_a_whole_with_each_units_error() {
        let body = br#"{"units":[{"name":"a.service","desiredState":"launched"},{"name":"b","desiredState":"launched"},
            {"name":"c.service"},{"name":"t@.service","desiredState":"launched"},{"name":"d.service","desiredState":"up"}]}"#;
        let err = parse_changes(body).expect_err("refused");
        assert_eq!(err.error.status(), StatusCode::BAD_REQUEST);
        let named: Vec<&str> = err.units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(named, ["b"], "an invalid name is refused before anything else: {err:?}");
        let body = br#"{"units":[{"name":"a.service","desiredState":"launched"},{"name":"c.service"},
            {"name":"t@.service","desiredState":"launched"},{"name":"d.service","desiredState":"up"}]}"#;
        let err = parse_changes(body).expect_err("refused");
        let named: Vec<&str> = err.units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(named, ["c.service", "t@.service", "d.service"], "{err:?}");
        let ok = parse_changes(br#"{"units":[{"name":"a.service","desiredState":"loaded"}]}"#).expect("valid");
        assert_eq!(ok[0].desired, Some(DesiredState::Loaded));
        let twice = parse_names(&["a.service".into(), "a.service".into()]).expect_err("refused");
        assert_eq!(twice.units[0].error, "named twice in this request");
        assert!(parse_names(&[]).is_err());
    }

    #[test]
    fn refusals_name_the_units_in_the_body() {
        let resp = refuse(
            StatusCode::NOT_FOUND,
            "units do not exist",
            vec![UnitError { name: "a.service".into(), error: "unit does not exist".into() }],
        )
        .expect_err("refused")
        .into_response();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }
}
