//! The leader's part of rollouts: on every pass, one step of each rollout under way
//! (`fleet_model::rollout::step`, pure) over its instances as the view shows them, turned into
//! writes: instances' unit records set to the version the step chose (the pass after schedules
//! them in place, and their agents restart them) and the rollout's record. Written fenced with
//! the pass's other writes, so a new leader takes over from what etcd holds.

use crate::cluster::ClusterView;
use fleet_model::health::HealthSpec;
use fleet_model::rollout::{self, Instance};
use fleet_model::schema::encode;
use fleet_model::{DesiredState, Keys, UnitName, UnitRecord};
use fleet_store::kv::{CmpOp, Compare, Op};
use std::collections::BTreeMap;

/// The launched units a rollout of `service` goes over: a template's instances, or the unit.
pub fn instances_of(v: &ClusterView, service: &UnitName) -> BTreeMap<String, Instance> {
    let member =
        |u: &UnitName| if service.is_template() { u.template().as_ref() == Some(service) } else { u == service };
    v.units
        .values()
        .filter(|u| u.desired_state == DesiredState::Launched && member(&u.name))
        .map(|u| {
            let machine = v.schedule.get(&u.name).and_then(|e| e.keys().next());
            let state = machine.and_then(|m| v.states.get(&u.name).and_then(|s| s.get(m)));
            let declares_health = matches!(v.rules.get(&u.name), Some(Ok(r)) if r.health != HealthSpec::default());
            let instance = Instance {
                version: u.hash.to_string(),
                reported: state.map(|s| s.hash.to_string()),
                active_state: state.map(|s| s.active_state.to_string()).unwrap_or_default(),
                health: state.and_then(|s| s.health),
                declares_health,
            };
            (u.name.to_string(), instance)
        })
        .collect()
}

/// One rollout's step as one transaction: its writes, guarded by what they replace being what the
/// step read (a user's `pause` or `fleetctl stop` meanwhile is never overwritten by a step taken
/// from an older view; the step is taken again from the newer one).
pub struct StepWrite {
    pub service: UnitName,
    pub guards: Vec<Compare>,
    pub ops: Vec<Op>,
}

/// One step of every rollout under way: the writes, and when a step is next due without any
/// change.
pub fn steps(v: &ClusterView, keys: &Keys, now: u64) -> (Vec<StepWrite>, Option<u64>) {
    let mut writes = Vec::new();
    let mut wake: Option<u64> = None;
    for (service, record) in v.rollouts.iter().filter(|(_, r)| !r.phase.is_over()) {
        let step = rollout::step(record, &instances_of(v, service), now);
        let mut w = StepWrite { service: service.clone(), guards: Vec::new(), ops: Vec::new() };
        for (name, version) in &step.set {
            let Some(unit) = UnitName::parse(name).ok().and_then(|n| v.units.get(&n)) else { continue };
            set_version(&mut w, keys, unit, version);
        }
        // The template too, so that instances started later run the version rolled out.
        if let Some(template) = v.units.get(service).filter(|t| t.name.is_template()) {
            if template.hash != step.record.target() {
                set_version(&mut w, keys, template, step.record.target());
            }
        }
        if step.record != *record {
            if step.record.note != record.note || step.record.phase != record.phase {
                tracing::info!(%service, phase = step.record.phase.as_str(), note = %step.record.note, "rollout");
            }
            if let (Ok(old), Ok(value)) = (encode(record), encode(&step.record)) {
                w.guards.push(Compare::value(keys.rollout(service), CmpOp::Equal, old));
                w.ops.push(Op::put(keys.rollout(service), value, 0));
            }
        }
        if !w.ops.is_empty() {
            writes.push(w);
        }
        if let Some(at) = step.wake_at {
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
    }
    (writes, wake)
}

fn set_version(w: &mut StepWrite, keys: &Keys, unit: &UnitRecord, version: &str) {
    let rec = UnitRecord { hash: version.into(), ..unit.clone() };
    if let (Ok(old), Ok(value)) = (encode(unit), encode(&rec)) {
        w.guards.push(Compare::value(keys.unit(&unit.name), CmpOp::Equal, old));
        w.ops.push(Op::put(keys.unit(&unit.name), value, 0));
    }
}
