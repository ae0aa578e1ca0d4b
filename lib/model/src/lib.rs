//! fleet's shared model and etcd schema.
//!
//! This crate is the one place that knows what a unit, a machine and a schedule entry are, how
//! they are named, and where each lives in etcd. It owns no tasks and makes no decisions: the
//! engine decides placement, the agent drives systemd, and both read and write the shapes defined
//! here. The key layout is documented in `docs/registry.md`.
//!
//! Pure data and rules: it must not depend on tokio, etcd, gRPC, TLS or HTTP (talking to etcd is
//! `fleet-store`'s job), so that fleetctl, a REST client, compiles none of them.

pub mod glob;
pub mod health;
pub mod join;
pub mod machine;
pub mod pages;
pub mod reschedule;
pub mod rollout;
pub mod rules;
pub mod schema;
pub mod text;
pub mod unit_file;
pub mod unit_name;

pub use machine::{MachineId, MachineRecord};
pub use pages::{SchedulePage, SchedulePages, StatePage, StatePages};
pub use schema::{Keys, ScheduleEntry, UnitRecord, UnitStateRecord};
pub use text::{Interner, Text};
pub use unit_file::{UnitFile, UnitOption};
pub use unit_name::UnitName;

use serde::{Deserialize, Serialize};

/// The state a user wants a unit in, cluster-wide. Adjacent states only: fleet walks through
/// `loaded` on its way from `inactive` to `launched` by itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    #[default]
    Inactive,
    Loaded,
    Launched,
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Inactive => "inactive",
            DesiredState::Loaded => "loaded",
            DesiredState::Launched => "launched",
        }
    }
}

impl std::fmt::Display for DesiredState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid desired state {0:?}: expected inactive, loaded or launched")]
pub struct InvalidDesiredState(pub String);

impl std::str::FromStr for DesiredState {
    type Err = InvalidDesiredState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inactive" => Ok(DesiredState::Inactive),
            "loaded" => Ok(DesiredState::Loaded),
            "launched" => Ok(DesiredState::Launched),
            other => Err(InvalidDesiredState(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_state_parses_and_prints() {
        for s in [DesiredState::Inactive, DesiredState::Loaded, DesiredState::Launched] {
            assert_eq!(s.as_str().parse::<DesiredState>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).ok(), Some(format!("\"{s}\"")));
        }
        assert!("running".parse::<DesiredState>().is_err());
    }
}
