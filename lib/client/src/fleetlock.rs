//! The client side of FleetLock (the reboot-slot protocol of Zincati and fleet-update), served by
//! every engine beside the fleet API: `POST /v1/pre-reboot` takes a slot (and drains the
//! machine), `POST /v1/steady-state` gives it back.

use crate::{Client, Error, Result};

/// A FleetLock request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetLockOp {
    /// Take a reboot slot (the engine drains the machine first).
    PreReboot,
    /// Give the slot back (and lift the drain).
    SteadyState,
}

impl FleetLockOp {
    pub fn path(self) -> &'static str {
        match self {
            FleetLockOp::PreReboot => "pre-reboot",
            FleetLockOp::SteadyState => "steady-state",
        }
    }
}

impl Client {
    /// One FleetLock request for machine `id` in reboot group `group`. A refusal the protocol
    /// expects (every slot taken, still draining) is an `Error::Api`; the caller asks again.
    pub async fn fleetlock(&self, op: FleetLockOp, id: &str, group: &str) -> Result<()> {
        let body = serde_json::json!({"client_params": {"id": id, "group": group}});
        let what = format!("FleetLock {}", op.path());
        let resp = self
            .send(&what, |http, base| {
                let root = base.trim_end_matches("/fleet/v1");
                http.post(format!("{root}/v1/{}", op.path())).header("fleet-lock-protocol", "true").json(&body)
            })
            .await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        // FleetLock's own error body: {"kind": ..., "value": ...}.
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let message = match (body["kind"].as_str(), body["value"].as_str()) {
            (Some(k), Some(v)) => format!("{k}: {v}"),
            _ => status.canonical_reason().unwrap_or("").to_string(),
        };
        Err(Error::Api { status: status.as_u16(), message, units: Vec::new() })
    }
}
