//! Join tokens and joining (`/fleet/v1/join-tokens`, `/fleet/v1/join`): docs/install.md.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `POST /fleet/v1/join-tokens`: a new token (admin role).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct JoinTokenRequest {
    /// How long the token admits machines, in seconds (default 86,400: a day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// How many machines may join with it (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
    /// Metadata every machine joining with it gets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Machine ids it admits (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<String>,
}

/// A join token as listed (never its secret).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct JoinTokenInfo {
    pub id: String,
    /// RFC 3339.
    #[serde(default)]
    pub created: String,
    /// RFC 3339.
    #[serde(default)]
    pub expires: String,
    #[serde(default)]
    pub expired: bool,
    #[serde(default)]
    pub uses_left: u32,
    /// Machines that joined with it.
    #[serde(default)]
    pub joined: Vec<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub created_by: String,
    /// Machine ids it admits (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<String>,
}

/// The answer to `POST /fleet/v1/join-tokens`: the token (shown once), and what a machine needs
/// besides it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct JoinTokenCreated {
    /// `ID.SECRET`: only this answer ever holds the secret.
    pub token: String,
    pub info: JoinTokenInfo,
    /// The cluster CA's pin, `sha256:<hex>` of its public key (SubjectPublicKeyInfo).
    pub ca_hash: String,
}

/// `GET /fleet/v1/join-tokens`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct JoinTokenPage {
    #[serde(default)]
    pub tokens: Vec<JoinTokenInfo>,
}

/// `POST /fleet/v1/join`: a machine asking to join (no other credential than the token).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct JoinRequest {
    /// `ID.SECRET`.
    pub token: String,
    /// The machine's id (`/etc/machine-id`).
    #[serde(rename = "machineID")]
    pub machine_id: String,
    /// A PKCS#10 certificate signing request (PEM) for the key the machine made; the engine
    /// decides the certificate's names and uses, the request gives only the public key.
    pub csr: String,
    /// Addresses the machine's agent API answers on (put in the certificate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
}

/// What a machine gets when it is admitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Joined {
    /// The machine's certificate (PEM), common name `machine-<id>`: its etcd user and its
    /// identity to the API.
    pub certificate: String,
    /// The cluster CA (PEM).
    pub ca: String,
    /// The CA etcd's server certificates chain to (PEM); often the same.
    pub etcd_ca: String,
    pub etcd_endpoints: Vec<String>,
    pub etcd_prefix: String,
    /// The token's metadata, for the machine's configuration.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}
