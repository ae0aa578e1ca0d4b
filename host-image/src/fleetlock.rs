//! The client side of FleetLock: the update agent takes a reboot slot from the engines before it
//! reboots into a new slot, and gives it back once the new boot is healthy. It authenticates with
//! the machine's own certificate (CN `machine-<id>`), which the engines accept for that machine.

use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Client {
    /// An engine's API, `https://host:port`.
    pub url: String,
    pub machine_id: String,
    pub group: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum FleetLockError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("TLS material: {0}")]
    Tls(String),
    #[error("{op}: gave up after {secs} s; last answer: {last}")]
    GaveUp { op: &'static str, secs: u64, last: String },
}

impl Client {
    fn http(&self) -> Result<reqwest::blocking::Client, FleetLockError> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|source| FleetLockError::Io { path: p.clone(), source });
        let ca =
            reqwest::Certificate::from_pem(&read(&self.ca_file)?).map_err(|e| FleetLockError::Tls(e.to_string()))?;
        let mut identity = read(&self.cert_file)?;
        identity.push(b'\n');
        identity.extend(read(&self.key_file)?);
        let identity = reqwest::Identity::from_pem(&identity).map_err(|e| FleetLockError::Tls(e.to_string()))?;
        reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .identity(identity)
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| FleetLockError::Tls(e.to_string()))
    }

    /// POSTs `op` until the engine says 200, every `retry`, for at most `timeout`. Refusals the
    /// protocol expects (every slot taken, still draining) and unreachable engines are retried.
    pub fn call(&self, op: &'static str, timeout: Duration, retry: Duration) -> Result<(), FleetLockError> {
        let http = self.http()?;
        let body = serde_json::json!({"client_params": {"id": self.machine_id, "group": self.group}});
        let url = format!("{}/v1/{op}", self.url.trim_end_matches('/'));
        let until = Instant::now() + timeout;
        loop {
            let last = match http.post(&url).header("fleet-lock-protocol", "true").json(&body).send() {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => format!("{} {}", r.status(), r.text().unwrap_or_default()),
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
