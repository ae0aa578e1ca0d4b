//! Rollouts (`/fleet/v1/rollouts`): a new version of a service rolled over its running
//! instances a few at a time (docs/services.md).

use crate::UnitOption;
use serde::{Deserialize, Serialize};

/// `POST /fleet/v1/rollouts`: roll the unit file in `options` over `service`'s launched
/// instances (a template `web@.service`: its instances; a unit: that unit). Admin role.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RolloutRequest {
    pub service: String,
    /// The new version's unit file.
    pub options: Vec<UnitOption>,
    /// Instances unavailable at once, at most (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    /// Instances replaced first; the rollout then waits for a promote (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canaries: Option<u32>,
    /// How long a replaced instance must stay healthy to count (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_healthy_secs: Option<u64>,
    /// How long a replaced instance may take to become healthy (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_secs: Option<u64>,
}

/// One instance of a rollout's service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RolloutInstance {
    pub name: String,
    /// `new`, `previous` (or a hash, for neither): the version its unit record holds.
    pub version: String,
    /// The machine it is scheduled to (empty: none).
    #[serde(default)]
    pub machine: String,
    /// systemd's ActiveState there, as its agent reported it.
    #[serde(default)]
    pub active_state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub health: String,
    /// Replaced in the current direction and healthy long enough.
    #[serde(default)]
    pub done: bool,
}

/// A rollout as `GET /fleet/v1/rollouts[/{service}]` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    pub service: String,
    /// `running`, `paused`, `awaiting-promotion`, `succeeded`, `reverted` or `failed`.
    pub phase: String,
    /// Going back to the previous version.
    #[serde(default)]
    pub reverting: bool,
    /// Why it is going back.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why_back: String,
    /// The new version's unit file hash, and the previous one's.
    pub version: String,
    pub previous: String,
    pub max_parallel: u32,
    #[serde(default)]
    pub canaries: u32,
    #[serde(default)]
    pub promoted: bool,
    #[serde(default)]
    pub min_healthy_secs: u64,
    pub deadline_secs: u64,
    /// What happened last, in words.
    #[serde(default)]
    pub note: String,
    /// RFC 3339.
    #[serde(default)]
    pub created: String,
    #[serde(default)]
    pub instances: Vec<RolloutInstance>,
}

/// `GET /fleet/v1/rollouts`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutList {
    pub rollouts: Vec<Rollout>,
}
