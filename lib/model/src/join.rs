//! Join tokens: how a new machine proves it may join the cluster (docs/install.md, "Adding a
//! machine"), after kubeadm's bootstrap tokens.
//!
//! A token is `ID.SECRET` (6 and 16 characters of `[a-z0-9]`): the id names its record in etcd
//! (`join-tokens/ID`), which keeps only the secret's SHA-256, how long the token is good for,
//! how many joins it has left and the metadata a machine joining with it gets. Whether a token
//! admits a machine is decided here, on the record alone ([`admit`]); the engine does the
//! hashing, the etcd transaction and the signing.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A join token as given to a machine: `ID.SECRET`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
}

pub const ID_LEN: usize = 6;
pub const SECRET_LEN: usize = 16;

/// Why a text is not a join token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a join token: expected ID.SECRET, {ID_LEN} and {SECRET_LEN} characters of a-z and 0-9 (as `fleetctl join-token create` prints)")]
pub struct NotAToken;

impl JoinToken {
    pub fn parse(text: &str) -> Result<JoinToken, NotAToken> {
        let (id, secret) = text.trim().split_once('.').ok_or(NotAToken)?;
        let ok =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok(id, ID_LEN) || !ok(secret, SECRET_LEN) {
            return Err(NotAToken);
        }
        Ok(JoinToken { id: id.into(), secret: secret.into() })
    }

    /// A token id on its own (`fleetctl join-token revoke ID`).
    pub fn valid_id(id: &str) -> bool {
        id.len() == ID_LEN && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

// The secret stays out of logs and panics.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken({}.<secret>)", self.id)
    }
}

/// What etcd keeps of a token (`join-tokens/ID`). Never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinTokenRecord {
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds after which the token admits nobody.
    pub expires: i64,
    /// Joins it still allows.
    pub uses_left: u32,
    /// Machines that joined with it (machine ids), for the record.
    #[serde(default)]
    pub joined: Vec<String>,
    /// Machine ids it admits; empty: any (a token holder names its machine id, as kubeadm's
    /// node name: binding a token to the machines it is for stops it admitting another).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub for_machines: Vec<String>,
    /// Given to every machine joining with it (its `metadata` setting).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub description: String,
    /// Who made it (the API caller).
    #[serde(default)]
    pub created_by: String,
}

/// Why a token did not admit a machine. The words reach the joining machine; a token that is
/// unknown and one whose secret is wrong are told apart from nothing, so a guesser learns no ids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("join token refused: no such token, or a wrong secret (check the token; an admin can list them with `fleetctl join-token list`)")]
    Unknown,
    #[error("join token {0} has expired (make a new one with `fleetctl join-token create`)")]
    Expired(String),
    #[error("join token {0} is used up (it allowed no more joins; make a new one with `fleetctl join-token create`)")]
    UsedUp(String),
    #[error("machine {1} already joined with join token {0}")]
    AlreadyJoined(String, String),
    #[error("join token {0} is not for machine {1} (it names the machines it admits)")]
    NotForMachine(String, String),
}

/// Whether `record` (none: no such token) admits `machine` at `now`, given whether the secret
/// offered hashed to the record's. Returns the record as it must be stored after the join.
pub fn admit(
    record: Option<&JoinTokenRecord>,
    secret_matches: bool,
    machine: &str,
    now: i64,
) -> Result<JoinTokenRecord, Refusal> {
    let Some(r) = record.filter(|_| secret_matches) else {
        return Err(Refusal::Unknown);
    };
    if now >= r.expires {
        return Err(Refusal::Expired(r.id.clone()));
    }
    if !r.for_machines.is_empty() && !r.for_machines.iter().any(|m| m == machine) {
        return Err(Refusal::NotForMachine(r.id.clone(), machine.into()));
    }
    if r.joined.iter().any(|m| m == machine) {
        return Err(Refusal::AlreadyJoined(r.id.clone(), machine.into()));
    }
    if r.uses_left == 0 {
        return Err(Refusal::UsedUp(r.id.clone()));
    }
    let mut after = r.clone();
    after.uses_left -= 1;
    after.joined.push(machine.into());
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> JoinTokenRecord {
        JoinTokenRecord { id: "abc123".into(), expires: 100, uses_left: 1, ..Default::default() }
    }

    #[test]
    fn tokens_parse_only_in_their_one_shape() {
        let t = JoinToken::parse(" abc123.0123456789abcdef\n").expect("a token");
        assert_eq!((t.id.as_str(), t.secret.as_str()), ("abc123", "0123456789abcdef"));
        assert_eq!(t.to_string(), "abc123.0123456789abcdef");
        assert!(!format!("{t:?}").contains("0123456789abcdef"), "the secret stays out of Debug");
        for bad in
            ["", "abc123", "abc123.", "ABC123.0123456789abcdef", "abc12.0123456789abcdef", "abc123.0123456789abcde!"]
        {
            assert_eq!(JoinToken::parse(bad), Err(NotAToken), "{bad:?}");
        }
    }

    #[test]
    fn a_token_admits_while_it_is_good_and_counts_each_join() {
        let after = admit(Some(&record()), true, "m1", 99).expect("admitted");
        assert_eq!((after.uses_left, after.joined.clone()), (0, vec!["m1".to_string()]));
        assert_eq!(admit(Some(&after), true, "m2", 99), Err(Refusal::UsedUp("abc123".into())));
        assert_eq!(admit(Some(&after), true, "m1", 99), Err(Refusal::AlreadyJoined("abc123".into(), "m1".into())));
        assert_eq!(admit(Some(&record()), true, "m1", 100), Err(Refusal::Expired("abc123".into())));
        // A token bound to machines admits only them.
        let bound = JoinTokenRecord { for_machines: vec!["m2".into()], ..record() };
        assert_eq!(admit(Some(&bound), true, "m1", 99), Err(Refusal::NotForMachine("abc123".into(), "m1".into())));
        assert!(admit(Some(&bound), true, "m2", 99).is_ok());
        // A wrong secret reads as an unknown token.
        assert_eq!(admit(Some(&record()), false, "m1", 99), Err(Refusal::Unknown));
        assert_eq!(admit(None, true, "m1", 99), Err(Refusal::Unknown));
    }
}
