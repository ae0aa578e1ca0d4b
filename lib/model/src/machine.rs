//! Machines: identity, address and metadata, as an agent registers them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub type MachineId = String;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineIdError {
    #[error("machine id {0:?} is not 32 lowercase hex digits")]
    Malformed(String),
}

/// Validates an `/etc/machine-id` value (trailing newline allowed).
pub fn parse_machine_id(text: &str) -> Result<MachineId, MachineIdError> {
    let id = text.trim();
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(id.to_string())
    } else {
        Err(MachineIdError::Malformed(id.to_string()))
    }
}

/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY: usize = 64;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE: usize = 512;
/// Most metadata keys one machine may carry.
pub const MAX_METADATA_KEYS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("key {0:?} must be 1 to {MAX_METADATA_KEY} of [A-Za-z0-9_.-]")]
    Key(String),
    #[error("value of {key:?} is {len} bytes; at most {MAX_METADATA_VALUE}")]
    ValueTooLong { key: String, len: usize },
    #[error("value of {0:?} contains a control character")]
    ValueControl(String),
    #[error("{0} keys; at most {MAX_METADATA_KEYS}")]
    TooMany(usize),
}

/// Checks one metadata entry against fleet's limits (placement rules compare values as text, so
/// they are short printable strings).
pub fn check_metadata(key: &str, value: &str) -> Result<(), MetadataError> {
    if key.is_empty()
        || key.len() > MAX_METADATA_KEY
        || !key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(MetadataError::Key(key.chars().take(80).collect()));
    }
    if value.len() > MAX_METADATA_VALUE {
        return Err(MetadataError::ValueTooLong { key: key.into(), len: value.len() });
    }
    if value.chars().any(char::is_control) {
        return Err(MetadataError::ValueControl(key.into()));
    }
    Ok(())
}

/// What an agent publishes about its machine, on its lease.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineRecord {
    pub id: MachineId,
    #[serde(default)]
    pub public_ip: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub version: String,
    /// What the machine offers to units that reserve resources; zero means not advertised.
    #[serde(default, skip_serializing_if = "crate::rules::Resources::is_zero")]
    pub capacity: crate::rules::Resources,
    /// The lifetime of the agent's lease: how long after its last renewal the machine counts
    /// as lost (and its exclusive units are stopped by the agent itself).
    #[serde(default)]
    pub lease_ttl: i64,
    /// Where the agent serves unit status and journals (`http://ip:port`), if it does.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_url: String,
    /// Exclusive units the agent stopped while its lease was in doubt (the machine cut off from
    /// etcd), told when it registers again: it could not write while cut off.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stopped_while_cut_off: Vec<String>,
    /// The agent reads its schedule in pages (`schedule/<id>/<page>`, `crate::pages`); an agent
    /// of an earlier version leaves this out and is given a key per unit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub schedule_pages: bool,
}

impl MachineRecord {
    /// `0f1ee701.../10.0.0.1`, fleetctl's machine legend.
    pub fn legend(&self, full: bool) -> String {
        let id = if full || self.id.len() <= 8 { self.id.clone() } else { format!("{}...", &self.id[..8]) };
        if self.public_ip.is_empty() {
            id
        } else {
            format!("{id}/{}", self.public_ip)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ids() {
        assert!(parse_machine_id("0f1ee701000040008000000000000001\n").is_ok());
        assert!(parse_machine_id("0F1EE701000040008000000000000001").is_err());
        assert!(parse_machine_id("short").is_err());
    }

    #[test]
    fn legend_like_fleetctl() {
        let m = MachineRecord {
            id: "0f1ee701000040008000000000000001".into(),
            public_ip: "10.1.2.3".into(),
            ..Default::default()
        };
        assert_eq!(m.legend(false), "0f1ee701.../10.1.2.3");
        assert_eq!(m.legend(true), "0f1ee701000040008000000000000001/10.1.2.3");
    }
}
