//! The engine's configuration: a TOML file, overridden by flags and `FLEET_*` environment variables.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub etcd_endpoints: Vec<String>,
    pub etcd_prefix: String,
    pub etcd_request_timeout_ms: u64,
    /// TCP addresses the API listens on.
    pub listen: Vec<String>,
    /// Lifetime of the leader's lease: a dead leader is replaced this long after it stopped.
    pub election_ttl_secs: i64,
    /// Name of this engine in elections and logs; defaults to the host name.
    pub engine_id: String,
    /// API page size.
    pub token_limit: u16,
    /// Addresses (host:port) serving the API over TLS; needs `tls_cert_file` and `tls_key_file`.
    pub listen_tls: Vec<String>,
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// The cluster CA: TLS clients presenting a certificate it signed are identified by the
    /// certificate's common name (see `auth.certificates`); other certificates are refused.
    pub tls_client_ca_file: String,
    /// CA, certificate and key for `https://` etcd endpoints (all three or none).
    pub etcd_ca_file: String,
    pub etcd_cert_file: String,
    pub etcd_key_file: String,
    /// Who may do what through the API, and the audit log.
    pub auth: crate::auth::AuthConfig,
    /// Reboot coordination (FleetLock) slots per group.
    pub fleetlock: FleetLockConfig,
    /// Take part in leader elections. `false` makes an API-only replica: it serves the API from
    /// its own view and never places units (more API capacity without more candidates).
    pub lead: bool,
    /// A plain-HTTP listener on a loopback address (`127.0.0.1:9100`) serving only `/metrics`
    /// without auth, for a Prometheus agent on the machine; empty: none (`/metrics` on the API
    /// needs the read role).
    pub metrics_listen: String,
    /// Record Prometheus metrics and serve them on `/metrics` (default); `false` records
    /// nothing and `/metrics` answers 404 saying so.
    pub metrics: bool,
    /// Events this engine keeps in memory for `GET /fleet/v1/events` and for streams resuming
    /// after a reconnect (about 300 bytes each); 0 switches events off: none are derived, and
    /// the events API answers 404 saying so.
    pub event_history: usize,
    /// Admitting machines by join token (docs/install.md).
    pub join: JoinConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            etcd_prefix: fleet_model::schema::DEFAULT_PREFIX.into(),
            etcd_request_timeout_ms: 5000,
            // As the original: the local unix socket, which only root (and group `fleet`) opens.
            listen: vec!["/var/run/fleet.sock".into()],
            election_ttl_secs: 5,
            engine_id: String::new(),
            token_limit: 100,
            listen_tls: Vec::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_client_ca_file: String::new(),
            etcd_ca_file: String::new(),
            etcd_cert_file: String::new(),
            etcd_key_file: String::new(),
            auth: Default::default(),
            fleetlock: Default::default(),
            lead: true,
            event_history: crate::events::DEFAULT_HISTORY,
            metrics_listen: String::new(),
            metrics: true,
            join: JoinConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("{0}")]
    Invalid(String),
}

impl EngineConfig {
    /// The engine's etcd client identity, also presented to agents.
    pub fn etcd_tls(&self) -> Result<Option<fleet_store::tls::ClientTls>, fleet_store::tls::TlsError> {
        fleet_store::tls::ClientTls::from_files(&self.etcd_ca_file, &self.etcd_cert_file, &self.etcd_key_file)
    }

    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(EngineConfig::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.etcd_endpoints.is_empty() {
            return Err(ConfigError::Invalid("etcd_endpoints is empty".into()));
        }
        if self.election_ttl_secs < 2 {
            return Err(ConfigError::Invalid(format!(
                "election_ttl_secs = {} is too short (minimum 2)",
                self.election_ttl_secs
            )));
        }
        if !self.listen_tls.is_empty() && (self.tls_cert_file.is_empty() || self.tls_key_file.is_empty()) {
            return Err(ConfigError::Invalid("listen_tls needs tls_cert_file and tls_key_file".into()));
        }
        for addr in &self.listen {
            if let Ok(sock) = addr.parse::<std::net::SocketAddr>() {
                if !sock.ip().is_loopback() {
                    return Err(ConfigError::Invalid(format!(
                        "listen {addr:?}: plain HTTP is served on loopback addresses only; use listen_tls"
                    )));
                }
            }
        }
        self.etcd_tls().map_err(|e| ConfigError::Invalid(format!("etcd TLS: {e}")))?;
        crate::auth::Auth::new(&crate::auth::AuthConfig { audit_log: String::new(), ..self.auth.clone() })
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !self.metrics_listen.is_empty() && !self.metrics {
            return Err(ConfigError::Invalid(
                "metrics_listen is set but metrics = false: nothing to serve there".into(),
            ));
        }
        if !self.metrics_listen.is_empty() {
            fleet_config::loopback_only("metrics_listen", &self.metrics_listen).map_err(ConfigError::Invalid)?;
        }
        if self.token_limit == 0 {
            return Err(ConfigError::Invalid("token_limit must be at least 1".into()));
        }
        Ok(())
    }
}

/// The `[join]` section: set, this engine admits machines by join token.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinConfig {
    /// fleet-pki's directory on this machine: the CA (`ca.pem`, `ca.key`), which signs joining
    /// machines' certificates, and etcd's `root` identity (`root.pem`, `root.key`), which makes
    /// their etcd users. Empty: this engine admits no machines.
    pub pki_dir: String,
    /// etcd endpoints told to joining machines; empty: this engine's `etcd_endpoints`.
    pub etcd_endpoints: Vec<String>,
}

/// The `[fleetlock]` section of the engine's configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetLockConfig {
    /// Slots of groups not listed in `groups`.
    pub default_slots: u32,
    /// Slots per group: how many machines of the group may reboot at once.
    pub groups: BTreeMap<String, u32>,
    /// Drain a machine when it takes a slot, and hold `pre-reboot` until its units are gone.
    pub drain: bool,
}

impl Default for FleetLockConfig {
    fn default() -> Self {
        FleetLockConfig { default_slots: 1, groups: BTreeMap::new(), drain: true }
    }
}

impl FleetLockConfig {
    pub fn slots(&self, group: &str) -> u32 {
        self.groups.get(group).copied().unwrap_or(self.default_slots)
    }
}

#[cfg(test)]
mod reload_tests {
    use super::*;

    /// The engine reloads its API certificate; every other change is reported as waiting for a
    /// restart, derived from the type (a changed `[fleetlock]` section or etcd timeout used to be
    /// ignored without a word).
    #[test]
    fn a_reload_applies_the_certificate_and_reports_the_rest() {
        let running = EngineConfig::default();
        let mut hot = running.clone();
        hot.tls_cert_file = "/etc/fleet/engine2.pem".into();
        hot.tls_key_file = "/etc/fleet/engine2.key".into();
        assert!(crate::restart_only_changes(&running, &hot).is_empty());
        let mut cold = running.clone();
        cold.fleetlock.default_slots += 1;
        cold.etcd_request_timeout_ms += 1;
        cold.auth.audit_log = "/var/log/fleet-audit.log".into();
        assert_eq!(crate::restart_only_changes(&running, &cold), vec!["auth", "etcd_request_timeout_ms", "fleetlock"]);
    }

    /// A loopback metrics listener with metrics switched off would serve nothing: refused,
    /// naming both settings.
    #[test]
    fn metrics_off_with_a_metrics_listener_is_refused() {
        let cfg = EngineConfig { metrics: false, metrics_listen: "127.0.0.1:9100".into(), ..EngineConfig::default() };
        let err = cfg.validate().expect_err("refused").to_string();
        assert!(err.contains("metrics_listen") && err.contains("metrics = false"), "{err}");
        assert!(EngineConfig { metrics: false, ..EngineConfig::default() }.validate().is_ok());
    }
}
