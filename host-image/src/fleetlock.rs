//! The client side of FleetLock: the update agent takes a reboot slot from the engines before it
//! reboots into a new slot, and gives it back once the new boot is healthy. It authenticates with
//! the machine's own certificate (CN `machine-<id>`), which the engines accept for that machine.
//! The requests are fleet-client's; this keeps the update agent's blocking shape and its
//! patience (a slot may be taken for as long as another machine updates).

use fleet_client::{Credentials, FleetLockOp};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Client {
    /// Engines' APIs, `https://host:port`, comma-separated: any engine serves FleetLock.
    pub url: String,
    pub machine_id: String,
    pub group: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetLockError {
    #[error("FleetLock client: {0}")]
    Client(#[from] fleet_client::Error),
    #[error("cannot start the FleetLock client's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{op}: gave up after {secs} s; last answer: {last}")]
    GaveUp { op: &'static str, secs: u64, last: String },
}

impl Client {
    /// POSTs `op` until an engine says 200, every `retry`, for at most `timeout`. Refusals the
    /// protocol expects (every slot taken, still draining) and unreachable engines are retried.
    pub fn call(&self, op: &'static str, timeout: Duration, retry: Duration) -> Result<(), FleetLockError> {
        let op_kind = match op {
            "pre-reboot" => FleetLockOp::PreReboot,
            _ => FleetLockOp::SteadyState,
        };
        let creds = Credentials {
            ca_file: Some(self.ca_file.clone()),
            cert_file: Some(self.cert_file.clone()),
            key_file: Some(self.key_file.clone()),
            token: None,
        };
        let client = fleet_client::Client::new(&self.url, Duration::from_secs(30), &creds)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(FleetLockError::Runtime)?;
        let until = Instant::now() + timeout;
        loop {
            let last = match rt.block_on(client.fleetlock(op_kind, &self.machine_id, &self.group)) {
                Ok(()) => return Ok(()),
                Err(e) => e.to_string(),
            };
            tracing::info!(op, answer = %last, "FleetLock: not yet");
            if Instant::now() + retry > until {
                return Err(FleetLockError::GaveUp { op, secs: timeout.as_secs(), last });
            }
            std::thread::sleep(retry);
        }
    }
}
