//! First-boot provisioning (docs/host-image.md, "From zero to a cluster"), after Ignition: one
//! declarative, versioned config per machine says what the machine is — an etcd member with an
//! engine, or a worker — how it joins the cluster, and what else goes on its var partition. The
//! image reads it once, at first boot, before etcd or fleet starts (`fleet-update provision`).
//!
//! This crate is the config's one definition: [`Config::parse`] reads and validates it (every
//! refusal names the setting), [`Config::plan`] turns it into the files it becomes, relative to
//! the machine's /var. It must stay pure: no I/O, no runtime, no certificates made here (the
//! config carries them: `fleet-pki provision` writes the configs).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The only config version this build reads.
pub const VERSION: u32 = 1;
/// etcd's client and peer ports on members.
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
/// The engine's API port on members unless the config says otherwise.
pub const ENGINE_PORT: u16 = 49153;
/// The key prefix the cluster's engines and agents use.
pub const ETCD_PREFIX: &str = "/fleet/";
/// etcd's database quota on members (8 GiB, etcd's largest advised): a million units took 3 GiB.
pub const ETCD_QUOTA_BYTES: u64 = 8 << 30;
/// Where a provisioned machine's record is kept, relative to /var: which config, when.
pub const RECORD: &str = "lib/fleet/provisioned.json";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProvisionError {
    #[error("not a provisioning config: {0}")]
    Syntax(String),
    #[error("version = {0}: this image reads provisioning configs of version {VERSION}")]
    Version(u32),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ProvisionError {
    ProvisionError::Invalid { field: field.into(), message: message.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An etcd member running an engine (and an agent): holds the CA key, admits machines.
    Member,
    /// Runs units only; joins through a member's engine with a token.
    Worker,
}

/// The whole config, as written (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub version: u32,
    pub role: Role,
    /// The machine's address: etcd, the engine and the agent listen on it; others reach it there.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    pub cluster: Cluster,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<Member>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<Update>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<File>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<HostUnit>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// The engines' APIs (`https://host:port`): joins go to them, and FleetLock.
    pub engines: Vec<String>,
    /// The cluster CA's pin (`sha256:<hex>` of its public key): the machine refuses an engine
    /// whose CA does not match.
    pub ca_hash: String,
    /// The token this machine's agent joins with (`ID.SECRET`).
    pub join_token: String,
}

/// What only a member has: etcd's initial cluster and the identities it serves with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// This member's etcd name: one of `initial_cluster`'s.
    pub name: String,
    /// Every member's etcd name and address: the cluster they bootstrap among themselves.
    pub initial_cluster: BTreeMap<String, String>,
    #[serde(default = "default_engine_port")]
    pub engine_port: u16,
    /// The cluster CA (its key signs joining machines' certificates: it never leaves members).
    pub ca_cert: String,
    pub ca_key: String,
    /// etcd's `root` identity: turns on etcd's auth, makes joining machines' etcd users.
    pub root_cert: String,
    pub root_key: String,
    /// This member's etcd server and peer identity, for its address.
    pub etcd_cert: String,
    pub etcd_key: String,
    /// Its engine's identity (etcd client, API server), for its address.
    pub engine_cert: String,
    pub engine_key: String,
    /// API users by certificate: common name -> role (read, operate, admin).
    #[serde(default)]
    pub admins: BTreeMap<String, String>,
    /// Tokens the cluster starts with, for its machines' first joins (the members' agents' too).
    #[serde(default)]
    pub join_tokens: Vec<BootstrapToken>,
}

fn default_engine_port() -> u16 {
    ENGINE_PORT
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapToken {
    pub token: String,
    pub ttl_secs: u64,
    pub uses: u32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
}

/// The update channel this machine follows (fleet-update's agent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// The channel's signed metadata (`https://.../CHANNEL.json`, as `fleet-update publish`
    /// writes it).
    pub channel: String,
    /// The CA the update server is checked against (PEM); without it, the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    #[serde(default = "default_group")]
    pub group: String,
    #[serde(default = "default_interval")]
    pub check_interval_secs: u64,
    /// The disk layout, when not the image's partitions (the lab's disks of files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_a: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_b: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub esp: Option<String>,
}

fn default_group() -> String {
    "default".into()
}
fn default_interval() -> u64 {
    300
}

/// A file put on var (under `/var/` or `/etc/fleet/`, which is var's `lib/fleet/etc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub path: String,
    /// Octal, as a string ("0644").
    #[serde(default = "default_mode")]
    pub mode: String,
    pub contents: String,
}

fn default_mode() -> String {
    "0644".into()
}

/// A systemd unit of the host (not a fleet unit): the image's root is read-only, so it is kept
/// on var and linked into /run/systemd/system at every boot (`fleet-host-units.service`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostUnit {
    pub name: String,
    pub contents: String,
    /// Started at every boot.
    #[serde(default)]
    pub enable: bool,
}

/// Who owns a planned file: root, or etcd (its key and the CA it checks peers with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Root,
    Etcd,
}

/// One file the config becomes: path relative to /var.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub path: String,
    pub mode: u32,
    pub owner: Owner,
    pub contents: String,
}

/// The join step's settings (`/etc/fleet/join.toml`), read by `fleet-update provision join`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinSettings {
    pub engines: Vec<String>,
    pub ca_hash: String,
    pub token: String,
    pub address: String,
}

/// A member's one-time etcd set-up (`/etc/fleet/bootstrap.toml`): auth on, the first tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapSettings {
    pub etcd_endpoints: Vec<String>,
    pub etcd_prefix: String,
    pub pki_dir: String,
    pub tokens: Vec<BootstrapTokenSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapTokenSettings {
    pub token: String,
    pub ttl_secs: u64,
    pub uses: u32,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

const ETC: &str = "lib/fleet/etc";

fn ip(field: &str, text: &str) -> Result<IpAddr, ProvisionError> {
    text.parse().map_err(|_| invalid(field, format!("{text:?} is not an IP address")))
}

fn https_url(field: &str, url: &str) -> Result<(), ProvisionError> {
    let rest =
        url.strip_prefix("https://").ok_or_else(|| invalid(field, format!("{url:?}: expected an https:// URL")))?;
    if rest.is_empty() || rest.starts_with('/') || url.chars().any(char::is_whitespace) {
        return Err(invalid(field, format!("{url:?} names no host")));
    }
    Ok(())
}

fn pem(field: &str, text: &str, kind: &str) -> Result<(), ProvisionError> {
    let t = text.trim_start();
    if !(t.starts_with("-----BEGIN ") && t.contains(kind) && text.contains("-----END ")) {
        return Err(invalid(field, format!("expected a PEM {}", kind.to_lowercase())));
    }
    Ok(())
}

fn metadata_ok(field: &str, m: &BTreeMap<String, String>) -> Result<(), ProvisionError> {
    for (k, v) in m {
        if k.is_empty() || k.contains(['=', ',']) || v.contains(',') || k.contains(char::is_whitespace) {
            return Err(invalid(format!("{field}.{k}"), "metadata keys hold no '=', ',' or space, values no ','"));
        }
    }
    Ok(())
}

/// A TOML string literal for `s` (toml's own escaping: every control character, DEL too).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl Config {
    /// Reads and validates a config. Every refusal names the setting that is wrong.
    pub fn parse(text: &str) -> Result<Config, ProvisionError> {
        // The version first: a newer config is refused for what it is, not for a key we lack.
        let table: toml::Table = toml::from_str(text).map_err(|e| ProvisionError::Syntax(e.message().to_string()))?;
        match table.get("version") {
            Some(toml::Value::Integer(1)) => {}
            Some(toml::Value::Integer(v)) => {
                return Err(ProvisionError::Version((*v).clamp(0, u32::MAX as i64) as u32))
            }
            Some(_) => return Err(invalid("version", "expected a number")),
            None => return Err(invalid("version", "missing: the config's version (1)")),
        }
        let config: Config = toml::from_str(text).map_err(|e| ProvisionError::Syntax(e.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), ProvisionError> {
        if self.version != VERSION {
            return Err(ProvisionError::Version(self.version));
        }
        ip("address", &self.address)?;
        if let Some(h) = &self.hostname {
            let ok = !h.is_empty()
                && h.len() <= 63
                && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !h.starts_with('-');
            if !ok {
                return Err(invalid("hostname", format!("{h:?}: letters, digits and '-', at most 63")));
            }
        }
        if self.cluster.engines.is_empty() {
            return Err(invalid("cluster.engines", "names no engine"));
        }
        for e in &self.cluster.engines {
            https_url("cluster.engines", e)?;
        }
        let hash_ok = self
            .cluster
            .ca_hash
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !hash_ok {
            return Err(invalid("cluster.ca_hash", "expected sha256:<64 hex digits> (fleet-pki ca-hash)"));
        }
        fleet_model::join::JoinToken::parse(&self.cluster.join_token)
            .map_err(|e| invalid("cluster.join_token", e.to_string()))?;
        metadata_ok("metadata", &self.metadata)?;
        // What the agent would refuse at every start is refused here, before anything is written.
        if let Some(c) = &self.capacity {
            if let Some(m) = c.memory.as_deref().filter(|m| fleet_model::rules::parse_bytes(m).is_none()) {
                return Err(invalid("capacity.memory", format!("{m:?} is not an amount of memory (\"8G\")")));
            }
            if let Some(cpu) = c.cpu.as_deref().filter(|c| fleet_model::rules::parse_cpu(c).is_none()) {
                return Err(invalid("capacity.cpu", format!("{cpu:?} is not an amount of CPU (\"400%\")")));
            }
        }
        match (self.role, &self.member) {
            (Role::Member, None) => return Err(invalid("member", "role = \"member\" needs a [member] section")),
            (Role::Worker, Some(_)) => {
                return Err(invalid("member", "a worker has no [member] section (it would hold the CA key)"))
            }
            (Role::Member, Some(m)) => self.validate_member(m)?,
            (Role::Worker, None) => {}
        }
        if let Some(u) = &self.update {
            https_url("update.channel", &u.channel)?;
            if let Some(ca) = &u.ca {
                pem("update.ca", ca, "CERTIFICATE")?;
            }
            if u.check_interval_secs == 0 {
                return Err(invalid("update.check_interval_secs", "must be at least 1"));
            }
        }
        for (i, f) in self.files.iter().enumerate() {
            let field = format!("files[{i}].path");
            var_path(&f.path).map_err(|m| invalid(field, format!("{:?}: {m}", f.path)))?;
            parse_mode(&f.mode)
                .ok_or_else(|| invalid(format!("files[{i}].mode"), format!("{:?} is not an octal mode", f.mode)))?;
        }
        for (i, u) in self.units.iter().enumerate() {
            let ok = u.name.rsplit_once('.').is_some_and(|(base, kind)| {
                !base.is_empty()
                    && ["service", "timer", "socket", "path", "mount", "target"].contains(&kind)
                    && base.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_@:.".contains(&b))
            });
            if !ok {
                return Err(invalid(format!("units[{i}].name"), format!("{:?} is not a unit name", u.name)));
            }
            if u.name.starts_with("fleet") || u.name.starts_with("etcd") {
                return Err(invalid(
                    format!("units[{i}].name"),
                    format!("{:?}: the image's own units are not replaced", u.name),
                ));
            }
        }
        Ok(())
    }

    fn validate_member(&self, m: &Member) -> Result<(), ProvisionError> {
        let mine = m.initial_cluster.get(&m.name).ok_or_else(|| {
            invalid("member.name", format!("{:?} is not one of member.initial_cluster's names", m.name))
        })?;
        for (name, addr) in &m.initial_cluster {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(invalid("member.initial_cluster", format!("{name:?} is not a member name")));
            }
            ip(&format!("member.initial_cluster.{name}"), addr)?;
        }
        if ip("member.initial_cluster", mine)? != ip("address", &self.address)? {
            return Err(invalid(
                "member.initial_cluster",
                format!("this member ({}) is at {mine} there, but address = {}", m.name, self.address),
            ));
        }
        for (field, text, kind) in [
            ("member.ca_cert", &m.ca_cert, "CERTIFICATE"),
            ("member.ca_key", &m.ca_key, "PRIVATE KEY"),
            ("member.root_cert", &m.root_cert, "CERTIFICATE"),
            ("member.root_key", &m.root_key, "PRIVATE KEY"),
            ("member.etcd_cert", &m.etcd_cert, "CERTIFICATE"),
            ("member.etcd_key", &m.etcd_key, "PRIVATE KEY"),
            ("member.engine_cert", &m.engine_cert, "CERTIFICATE"),
            ("member.engine_key", &m.engine_key, "PRIVATE KEY"),
        ] {
            pem(field, text, kind)?;
        }
        for (cn, role) in &m.admins {
            if !["read", "operate", "admin"].contains(&role.as_str()) {
                return Err(invalid(format!("member.admins.{cn}"), format!("{role:?}: read, operate or admin")));
            }
        }
        for (i, t) in m.join_tokens.iter().enumerate() {
            fleet_model::join::JoinToken::parse(&t.token)
                .map_err(|e| invalid(format!("member.join_tokens[{i}].token"), e.to_string()))?;
            if t.ttl_secs == 0 || t.ttl_secs > 365 * 86_400 {
                return Err(invalid(format!("member.join_tokens[{i}].ttl_secs"), "a token lasts 1 second to 365 days"));
            }
            if t.uses == 0 {
                return Err(invalid(format!("member.join_tokens[{i}].uses"), "a token admits at least one machine"));
            }
            metadata_ok(&format!("member.join_tokens[{i}].metadata"), &t.metadata)?;
        }
        Ok(())
    }

    /// The files this config becomes, relative to /var. Deterministic: applying it again after
    /// an interrupted first try writes the same files.
    pub fn plan(&self) -> Vec<Planned> {
        let mut out = Vec::new();
        let mut put = |path: String, mode: u32, owner: Owner, contents: String| {
            out.push(Planned { path, mode, owner, contents });
        };
        // The agent: its address, metadata and capacity; its etcd settings and identity come
        // from the join (agent.d/50-join.toml, pki/).
        let mut agent = format!(
            "# Written at first boot from the provisioning config (fleet-update provision).\npublic_ip = {}\n",
            toml_string(&self.address)
        );
        if !self.metadata.is_empty() {
            agent.push_str("\n[metadata]\n");
            for (k, v) in &self.metadata {
                agent.push_str(&format!("{} = {}\n", toml_string(k), toml_string(v)));
            }
        }
        if let Some(c) = &self.capacity {
            agent.push_str("\n[capacity]\n");
            if let Some(m) = &c.memory {
                agent.push_str(&format!("memory = {}\n", toml_string(m)));
            }
            if let Some(cpu) = &c.cpu {
                agent.push_str(&format!("cpu = {}\n", toml_string(cpu)));
            }
        }
        put(format!("{ETC}/agent.toml"), 0o644, Owner::Root, agent);
        let join = JoinSettings {
            engines: self.cluster.engines.clone(),
            ca_hash: self.cluster.ca_hash.clone(),
            token: self.cluster.join_token.clone(),
            address: self.address.clone(),
        };
        put(format!("{ETC}/join.toml"), 0o600, Owner::Root, toml::to_string(&join).unwrap_or_default());
        if let Some(h) = &self.hostname {
            put(format!("{ETC}/hostname"), 0o644, Owner::Root, format!("{h}\n"));
        }
        if let Some(m) = &self.member {
            self.plan_member(m, &mut put);
        }
        if let Some(u) = &self.update {
            let mut text = String::from("# Written at first boot from the provisioning config.\n");
            for (k, v) in [("slot_a", &u.slot_a), ("slot_b", &u.slot_b), ("esp", &u.esp)] {
                if let Some(v) = v {
                    text.push_str(&format!("{k} = {}\n", toml_string(v)));
                }
            }
            text.push_str(&format!(
                "\n[agent]\nchannel = {}\ncheck_interval_secs = {}\n",
                toml_string(&u.channel),
                u.check_interval_secs
            ));
            if u.ca.is_some() {
                text.push_str("channel_ca_file = \"/etc/fleet/update-ca.pem\"\n");
            }
            text.push_str(&format!(
                "\n[fleetlock]\nurl = {}\ngroup = {}\nca_file = \"/etc/fleet/pki/ca.pem\"\ncert_file = \"/etc/fleet/pki/machine.pem\"\nkey_file = \"/etc/fleet/pki/machine.key\"\n",
                toml_string(&self.cluster.engines.join(",")),
                toml_string(&u.group)
            ));
            put(format!("{ETC}/update.toml"), 0o644, Owner::Root, text);
            if let Some(ca) = &u.ca {
                put(format!("{ETC}/update-ca.pem"), 0o644, Owner::Root, ca.clone());
            }
        }
        for f in &self.files {
            if let (Ok(path), Some(mode)) = (var_path(&f.path), parse_mode(&f.mode)) {
                put(path, mode, Owner::Root, f.contents.clone());
            }
        }
        for u in &self.units {
            put(format!("{ETC}/units/{}", u.name), 0o644, Owner::Root, u.contents.clone());
        }
        let enabled: Vec<&str> = self.units.iter().filter(|u| u.enable).map(|u| u.name.as_str()).collect();
        if !self.units.is_empty() {
            put(format!("{ETC}/units/enabled"), 0o644, Owner::Root, enabled.iter().map(|n| format!("{n}\n")).collect());
        }
        out
    }

    fn plan_member(&self, m: &Member, put: &mut impl FnMut(String, u32, Owner, String)) {
        let peers: Vec<String> =
            m.initial_cluster.iter().map(|(n, a)| format!("{n}=https://{}", host_port(a, ETCD_PEER_PORT))).collect();
        let endpoints: Vec<String> =
            m.initial_cluster.values().map(|a| format!("https://{}", host_port(a, ETCD_CLIENT_PORT))).collect();
        let me = &self.address;
        let pki = "/var/lib/etcd/pki";
        let env = format!(
            "# etcd's settings, written at first boot from the provisioning config.\n\
             ETCD_NAME={name}\nETCD_DATA_DIR=/var/lib/etcd/fleet\n\
             ETCD_LISTEN_PEER_URLS=https://{peer}\nETCD_INITIAL_ADVERTISE_PEER_URLS=https://{peer}\n\
             ETCD_LISTEN_CLIENT_URLS=https://{client},https://127.0.0.1:{cport}\nETCD_ADVERTISE_CLIENT_URLS=https://{client}\n\
             ETCD_INITIAL_CLUSTER={cluster}\nETCD_INITIAL_CLUSTER_STATE=new\nETCD_INITIAL_CLUSTER_TOKEN=fleet\n\
             ETCD_CERT_FILE={pki}/etcd.pem\nETCD_KEY_FILE={pki}/etcd.key\nETCD_TRUSTED_CA_FILE={pki}/ca.pem\nETCD_CLIENT_CERT_AUTH=true\n\
             ETCD_PEER_CERT_FILE={pki}/etcd.pem\nETCD_PEER_KEY_FILE={pki}/etcd.key\nETCD_PEER_TRUSTED_CA_FILE={pki}/ca.pem\nETCD_PEER_CLIENT_CERT_AUTH=true\n\
             # Room for a million units (3 GiB of database, measured: docs/performance.md), old\n\
             # revisions compacted hourly, and etcd 3.4's write buffer kept small (docs/configuration.md).\n\
             ETCD_QUOTA_BACKEND_BYTES={quota}\nETCD_AUTO_COMPACTION_MODE=periodic\nETCD_AUTO_COMPACTION_RETENTION=1h\n\
             ETCD_BACKEND_BATCH_INTERVAL=10ms\nETCD_BACKEND_BATCH_LIMIT=500\n",
            name = m.name,
            peer = host_port(me, ETCD_PEER_PORT),
            client = host_port(me, ETCD_CLIENT_PORT),
            cport = ETCD_CLIENT_PORT,
            cluster = peers.join(","),
            quota = ETCD_QUOTA_BYTES,
        );
        put(format!("{ETC}/etcd.env"), 0o644, Owner::Root, env);
        put("lib/etcd/pki/ca.pem".into(), 0o644, Owner::Etcd, m.ca_cert.clone());
        put("lib/etcd/pki/etcd.pem".into(), 0o644, Owner::Etcd, m.etcd_cert.clone());
        put("lib/etcd/pki/etcd.key".into(), 0o600, Owner::Etcd, m.etcd_key.clone());
        // fleet-pki's directory: what [join] admits machines with. The CA key stays here.
        put("lib/fleet/pki/ca.pem".into(), 0o644, Owner::Root, m.ca_cert.clone());
        put("lib/fleet/pki/ca.key".into(), 0o600, Owner::Root, m.ca_key.clone());
        put("lib/fleet/pki/root.pem".into(), 0o644, Owner::Root, m.root_cert.clone());
        put("lib/fleet/pki/root.key".into(), 0o600, Owner::Root, m.root_key.clone());
        put(format!("{ETC}/engine-pki/ca.pem"), 0o644, Owner::Root, m.ca_cert.clone());
        put(format!("{ETC}/engine-pki/engine.pem"), 0o644, Owner::Root, m.engine_cert.clone());
        put(format!("{ETC}/engine-pki/engine.key"), 0o600, Owner::Root, m.engine_key.clone());
        let quoted: Vec<String> = endpoints.iter().map(|e| toml_string(e)).collect();
        let mut engine = format!(
            "# Written at first boot from the provisioning config.\n\
             etcd_endpoints = [{eps}]\netcd_prefix = {prefix}\n\
             etcd_ca_file = \"/etc/fleet/engine-pki/ca.pem\"\netcd_cert_file = \"/etc/fleet/engine-pki/engine.pem\"\netcd_key_file = \"/etc/fleet/engine-pki/engine.key\"\n\
             listen_tls = [{listen}]\ntls_cert_file = \"/etc/fleet/engine-pki/engine.pem\"\ntls_key_file = \"/etc/fleet/engine-pki/engine.key\"\ntls_client_ca_file = \"/etc/fleet/engine-pki/ca.pem\"\n",
            eps = quoted.join(", "),
            prefix = toml_string(ETCD_PREFIX),
            listen = toml_string(&host_port(me, m.engine_port)),
        );
        engine.push_str("\n[auth]\ncertificates = { ");
        let admins: Vec<String> =
            m.admins.iter().map(|(cn, role)| format!("{} = {}", toml_string(cn), toml_string(role))).collect();
        engine.push_str(&admins.join(", "));
        engine.push_str(" }\n\n[join]\npki_dir = \"/var/lib/fleet/pki\"\n");
        put(format!("{ETC}/engine.toml"), 0o644, Owner::Root, engine);
        let bootstrap = BootstrapSettings {
            etcd_endpoints: vec![format!("https://{}", host_port(me, ETCD_CLIENT_PORT))],
            etcd_prefix: ETCD_PREFIX.into(),
            pki_dir: "/var/lib/fleet/pki".into(),
            tokens: m
                .join_tokens
                .iter()
                .map(|t| BootstrapTokenSettings {
                    token: t.token.clone(),
                    ttl_secs: t.ttl_secs,
                    uses: t.uses,
                    metadata: t.metadata.clone(),
                })
                .collect(),
        };
        put(format!("{ETC}/bootstrap.toml"), 0o600, Owner::Root, toml::to_string(&bootstrap).unwrap_or_default());
    }
}

/// `ip:port`, with brackets for IPv6.
pub fn host_port(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// Where fleet keeps its own state and settings, relative to /var: a config's `[[files]]` may
/// not write there (the settings come from the config's own sections, and a file there could
/// skip the join, the bootstrap or the record, or replace a host unit's checks).
const OWN: &[&str] = &[
    ".fleet-provision",
    "lib/etcd",
    "lib/fleet/pki",
    "lib/fleet/downloads",
    "lib/fleet/updates",
    "lib/fleet/provisioned.json",
    "lib/fleet/bootstrapped",
    "lib/fleet/update-channel.json",
    "lib/fleet/etc/agent.toml",
    "lib/fleet/etc/agent.d",
    "lib/fleet/etc/engine.toml",
    "lib/fleet/etc/update.toml",
    "lib/fleet/etc/update-ca.pem",
    "lib/fleet/etc/etcd.env",
    "lib/fleet/etc/join.toml",
    "lib/fleet/etc/bootstrap.toml",
    "lib/fleet/etc/hostname",
    "lib/fleet/etc/pki",
    "lib/fleet/etc/engine-pki",
    "lib/fleet/etc/units",
];

/// A config's file path, relative to /var: `/var/...` or `/etc/fleet/...` (var's
/// `lib/fleet/etc`). Anything else is on the read-only root, or outside; fleet's own files are
/// not a config's to write ([`OWN`]).
fn var_path(path: &str) -> Result<String, &'static str> {
    if path.split('/').any(|c| c == ".." || c == ".") || path.contains("//") || path.ends_with('/') {
        return Err("no '.', '..', empty or trailing components");
    }
    let rel = if let Some(rest) = path.strip_prefix("/etc/fleet/") {
        format!("{ETC}/{rest}")
    } else if let Some(rest) = path.strip_prefix("/var/") {
        rest.to_string()
    } else {
        return Err("only files under /etc/fleet/ or /var/ can be written: the image's root is read-only");
    };
    if OWN.iter().any(|own| rel == *own || rel.starts_with(&format!("{own}/"))) {
        return Err("fleet's own settings and state come from the config's sections, not from [[files]]");
    }
    Ok(rel)
}

fn parse_mode(text: &str) -> Option<u32> {
    u32::from_str_radix(text, 8).ok().filter(|m| *m <= 0o7777)
}

/// What a provisioned machine keeps of its provisioning ([`RECORD`]): never applied twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Where the config came from (`config-drive`, `cmdline https://...`, `fw_cfg`).
    pub source: String,
    /// SHA-256 of the config as read, hex.
    pub sha256: String,
    pub role: Role,
    pub address: String,
    /// RFC 3339 UTC.
    pub applied: String,
    pub files: usize,
}

impl Record {
    pub fn role_name(&self) -> &'static str {
        match self.role {
            Role::Member => "member",
            Role::Worker => "worker",
        }
    }
}

#[cfg(test)]
mod tests;
