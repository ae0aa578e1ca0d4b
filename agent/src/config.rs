//! The agent's configuration: a TOML file, overridden by flags and `FLEET_*` environment variables.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// etcd client URLs.
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this cluster in etcd.
    pub etcd_prefix: String,
    /// Per-request etcd timeout, milliseconds.
    pub etcd_request_timeout_ms: u64,
    /// Address published for this machine (fleetctl's machine legend).
    pub public_ip: String,
    /// Metadata published for this machine, used by `MachineMetadata=` rules.
    pub metadata: BTreeMap<String, String>,
    /// Lifetime of the machine's lease; the machine counts as lost this long after its agent
    /// last reached etcd.
    pub lease_ttl_secs: i64,
    /// Where unit files are materialised before being linked into systemd.
    pub units_dir: PathBuf,
    /// Runtime state of the agent itself (its lease id, to be reused after a restart).
    pub state_dir: PathBuf,
    pub machine_id_file: PathBuf,
    /// D-Bus address of systemd's bus; empty for the system bus.
    pub systemd_bus: String,
    /// On a graceful stop (SIGTERM), stop and unload every unit and give up the lease so the
    /// engine places them elsewhere at once. Default: leave units running and let the lease
    /// expire, so a restarted agent adopts them (the original fleet always purged).
    pub stop_units_on_exit: bool,
    /// The cluster CA, and this machine's certificate (common name `machine-<machine id>`) and key:
    /// presented to etcd on `https://` endpoints, and served by the agent API, which then admits
    /// only clients whose certificate the CA signed for an engine (`api_allowed_clients`).
    pub etcd_ca_file: String,
    pub etcd_cert_file: String,
    pub etcd_key_file: String,
    /// Certificate common names the agent API accepts (with TLS on).
    pub api_allowed_clients: Vec<String>,
    /// Where the agent serves unit status and journal lines to the engines: `host:port`, empty
    /// for `<public_ip>:`[`DEFAULT_API_PORT`], or `off`.
    pub api_listen: String,
    /// A plain-HTTP listener on a loopback address (`127.0.0.1:9101`) serving only `/metrics`,
    /// for a Prometheus agent on the machine; empty: none.
    pub metrics_listen: String,
    /// What this machine offers to units that reserve resources (`MemoryMax=`, `CPUQuota=` in
    /// `[X-Fleet]`). Unset: not advertised, such reservations are not limited here.
    pub capacity: CapacityConfig,
}

/// The agent API's port when `api_listen` is empty. Below Linux's ephemeral range (32768-60999):
/// it was 49154, inside it, and an outgoing connection from the machine (`fleet-agent join`'s
/// own request to the engine, in CI) took it as its local port, which kept the agent from
/// listening for the minute that connection spent in TIME_WAIT.
pub const DEFAULT_API_PORT: u16 = 29154;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapacityConfig {
    /// Bytes, with an optional K/M/G/T suffix: `"8G"`.
    pub memory: String,
    /// Percent of one CPU (`"400%"`) or cores (`"4"`).
    pub cpu: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            etcd_prefix: fleet_model::schema::DEFAULT_PREFIX.into(),
            etcd_request_timeout_ms: 5000,
            public_ip: String::new(),
            metadata: BTreeMap::new(),
            lease_ttl_secs: 10,
            units_dir: "/run/fleet/units".into(),
            state_dir: "/run/fleet".into(),
            machine_id_file: "/etc/machine-id".into(),
            systemd_bus: String::new(),
            capacity: CapacityConfig::default(),
            api_listen: String::new(),
            metrics_listen: String::new(),
            etcd_ca_file: String::new(),
            etcd_cert_file: String::new(),
            etcd_key_file: String::new(),
            api_allowed_clients: vec![fleet_store::tls::ENGINE_IDENTITY.into()],
            stop_units_on_exit: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("metadata {0:?}: expected key=value[,key=value...]")]
    Metadata(String),
    #[error("{0}")]
    Invalid(String),
}

/// Settings a running agent applies on reload: what it publishes about its machine.
pub const HOT_SETTINGS: &[&str] = &["metadata", "public_ip", "capacity"];

/// The settings changed between `running` and `new` that wait for a restart (everything that
/// shapes the agent itself: etcd and its TLS files, directories, lease TTL, the API).
pub fn restart_only_changes(running: &AgentConfig, new: &AgentConfig) -> Vec<String> {
    fleet_config::restart_only_changes(running, new, HOT_SETTINGS)
}

/// Where the fragments of configuration file `path` live: `agent.d/` beside `agent.toml`.
pub fn fragments_dir(path: &Path) -> PathBuf {
    path.with_extension("d")
}

impl AgentConfig {
    /// The file at `path` and its fragments (`<dir>/agent.d/*.toml` for `<dir>/agent.toml`, in
    /// name order, each over the ones before: what `fleet-agent join` writes); none: defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(AgentConfig::default());
        };
        let mut files = vec![path.to_path_buf()];
        let fragments = fragments_dir(path);
        if let Ok(dir) = std::fs::read_dir(&fragments) {
            let mut found: Vec<PathBuf> = dir
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            found.sort();
            files.extend(found);
        }
        let mut tables = Vec::new();
        for file in &files {
            let text =
                std::fs::read_to_string(file).map_err(|source| ConfigError::Read { path: file.clone(), source })?;
            let table: serde_json::Value =
                toml::from_str(&text).map_err(|source| ConfigError::Parse { path: file.clone(), source })?;
            tables.push(table);
        }
        let merged = fleet_config::merged_fragments(tables);
        serde_json::from_value(merged).map_err(|e| {
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            ConfigError::Invalid(format!("{}: {e}", names.join(" + ")))
        })
    }

    /// The address the agent API listens on, if any.
    pub fn api_address(&self) -> Option<String> {
        match self.api_listen.trim() {
            "off" => None,
            "" if self.public_ip.is_empty() => None,
            "" => Some(format!("{}:{DEFAULT_API_PORT}", self.public_ip)),
            a => Some(a.to_string()),
        }
    }

    pub fn capacity(&self) -> Result<fleet_model::rules::Resources, ConfigError> {
        let parse = |what: &str, v: &str, f: fn(&str) -> Option<u64>| {
            if v.trim().is_empty() {
                Ok(0)
            } else {
                f(v).ok_or_else(|| ConfigError::Invalid(format!("capacity.{what} = {v:?} is not a valid amount")))
            }
        };
        Ok(fleet_model::rules::Resources {
            memory: parse("memory", &self.capacity.memory, fleet_model::rules::parse_bytes)?,
            cpu: parse("cpu", &self.capacity.cpu, fleet_model::rules::parse_cpu)?,
        })
    }

    /// This machine's TLS identity, if configured.
    pub fn tls(&self) -> Result<Option<fleet_store::tls::ClientTls>, ConfigError> {
        fleet_store::tls::ClientTls::from_files(&self.etcd_ca_file, &self.etcd_cert_file, &self.etcd_key_file)
            .map_err(|e| ConfigError::Invalid(format!("etcd TLS: {e}")))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.capacity()?;
        self.tls()?;
        for (k, v) in &self.metadata {
            fleet_model::machine::check_metadata(k, v).map_err(|e| ConfigError::Invalid(format!("metadata: {e}")))?;
        }
        if self.etcd_endpoints.is_empty() {
            return Err(ConfigError::Invalid("etcd_endpoints is empty".into()));
        }
        if !self.metrics_listen.is_empty() {
            fleet_config::loopback_only("metrics_listen", &self.metrics_listen).map_err(ConfigError::Invalid)?;
        }
        if self.lease_ttl_secs < 2 {
            return Err(ConfigError::Invalid(format!(
                "lease_ttl_secs = {} is too short (minimum 2)",
                self.lease_ttl_secs
            )));
        }
        Ok(())
    }
}

/// Parses fleet's `k=v,k=v` metadata syntax (spaces around items trimmed).
pub fn parse_metadata(text: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| ConfigError::Metadata(item.to_string()))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(ConfigError::Metadata(item.to_string()));
        }
        out.insert(k.to_string(), v.trim().to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reload applies and what it reports as waiting for a restart, by class: the list is
    /// derived from the type, so the settings it used to miss (etcd's TLS files, the API's allowed
    /// clients) are reported now.
    #[test]
    fn a_reload_applies_what_the_machine_publishes_and_reports_the_rest() {
        let running = AgentConfig::default();
        let mut hot = running.clone();
        hot.metadata.insert("rack".into(), "r7".into());
        hot.public_ip = "10.0.0.9".into();
        hot.capacity.memory = "8G".into();
        assert!(restart_only_changes(&running, &hot).is_empty());
        let mut cold = running.clone();
        cold.etcd_cert_file = "/etc/fleet/new.pem".into();
        cold.api_allowed_clients.push("engine-9".into());
        cold.etcd_request_timeout_ms += 1;
        cold.lease_ttl_secs += 1;
        assert_eq!(
            restart_only_changes(&running, &cold),
            vec!["api_allowed_clients", "etcd_cert_file", "etcd_request_timeout_ms", "lease_ttl_secs"]
        );
    }

    /// The default agent API port is one no outgoing connection of this machine can be given
    /// (the kernel hands those out from `ip_local_port_range`).
    #[test]
    fn the_default_api_port_is_outside_the_ephemeral_range() {
        let range =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_else(|_| "32768 60999".into());
        let bounds: Vec<u16> = range.split_whitespace().filter_map(|p| p.parse().ok()).collect();
        assert_eq!(bounds.len(), 2, "ip_local_port_range: {range:?}");
        let cfg = AgentConfig { public_ip: "10.0.0.9".into(), ..AgentConfig::default() };
        let addr = cfg.api_address().expect("an address by default");
        let port: u16 = addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port");
        assert!(port < bounds[0] || port > bounds[1], "{addr} is in the ephemeral range {range:?}");
        assert_eq!(addr, format!("10.0.0.9:{DEFAULT_API_PORT}"));
    }

    #[test]
    fn parses_file_and_metadata() {
        let cfg: AgentConfig = toml::from_str(
            "etcd_endpoints = [\"http://10.0.0.1:1\"]\nmetadata = { region = \"east\" }\nlease_ttl_secs = 4\n",
        )
        .expect("parses");
        assert_eq!(cfg.etcd_endpoints, vec!["http://10.0.0.1:1".to_string()]);
        assert_eq!(cfg.metadata.get("region").map(String::as_str), Some("east"));
        assert_eq!(cfg.units_dir, PathBuf::from("/run/fleet/units"));
        assert!(toml::from_str::<AgentConfig>("bogus = 1").is_err());
        let md = parse_metadata(" region=east , disk = ssd,").expect("parses");
        assert_eq!(md.len(), 2);
        assert!(parse_metadata("novalue").is_err());
    }

    #[test]
    fn fragments_in_agent_d_are_read_after_the_file_in_name_order() {
        let dir = std::env::temp_dir().join(format!("fleet-agent-fragments-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("agent.d")).expect("dir");
        let main = dir.join("agent.toml");
        std::fs::write(&main, "lease_ttl_secs = 4\npublic_ip = \"10.0.0.1\"\n[metadata]\nregion = \"east\"\n")
            .expect("file");
        std::fs::write(dir.join("agent.d/50-join.toml"), "public_ip = \"10.0.0.2\"\n[metadata]\nrole = \"web\"\n")
            .expect("fragment");
        std::fs::write(dir.join("agent.d/90-local.toml"), "public_ip = \"10.0.0.3\"\n").expect("fragment");
        std::fs::write(dir.join("agent.d/README"), "not toml").expect("other file");
        let cfg = AgentConfig::load(Some(&main)).expect("loads");
        assert_eq!((cfg.lease_ttl_secs, cfg.public_ip.as_str()), (4, "10.0.0.3"));
        assert_eq!(cfg.metadata.len(), 2, "{:?}", cfg.metadata);
        // A misspelt setting in a fragment is refused, naming the files.
        std::fs::write(dir.join("agent.d/60-bad.toml"), "bogus = 1\n").expect("fragment");
        let err = AgentConfig::load(Some(&main)).expect_err("refused").to_string();
        assert!(err.contains("bogus") && err.contains("60-bad.toml"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
