//! How fleet's daemons put their settings together, and treat them on a reload (SIGHUP,
//! `systemctl reload`).
//!
//! Layers, one way for every daemon ([`layered`]): the typed defaults, the configuration file
//! over them, then flags and `FLEET_*` environment variables over those. The result is typed
//! and checked by deserializing it once more, so a flag wired to a setting that does not exist is
//! refused like a misspelt key in the file.
//!
//! Each daemon names the few settings it applies while running (its hot settings); every other
//! setting that changed is reported as taking effect on restart. The restart-only list is not
//! kept by hand: it is every field of the typed configuration that is not hot, so a new setting
//! can never be silently ignored by a reload. Pure functions over `Serialize` types: this crate
//! must not depend on a daemon, on I/O or on a runtime.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why the layers could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("configuration is not a table of settings")]
    NotATable,
    #[error("override {0:?} names a setting inside {1:?}, which is not a table")]
    NotNested(String, String),
    #[error("settings after flags and environment: {0}")]
    Invalid(#[from] serde_json::Error),
}

/// `base` (defaults with the file over them) with `overrides` laid over it: every field
/// `overrides` serializes replaces the setting of that name, and a dotted name
/// (`auth.audit_log`) reaches into a section. Fields an override leaves out (serialize `None`
/// as absent: `skip_serializing_if = "Option::is_none"`) keep the base's value.
pub fn layered<C, O>(base: &C, overrides: &O) -> Result<C, LayerError>
where
    C: Serialize + DeserializeOwned,
    O: Serialize,
{
    let mut merged = serde_json::to_value(base)?;
    let serde_json::Value::Object(over) = serde_json::to_value(overrides)? else {
        return Err(LayerError::NotATable);
    };
    for (name, value) in over {
        let mut at = &mut merged;
        let mut parts = name.split('.').peekable();
        while let Some(part) = parts.next() {
            let serde_json::Value::Object(table) = at else {
                return Err(LayerError::NotNested(name.clone(), part.to_string()));
            };
            if parts.peek().is_none() {
                table.insert(part.to_string(), value);
                break;
            }
            at = table.entry(part.to_string()).or_insert_with(|| serde_json::Value::Object(Default::default()));
        }
    }
    Ok(serde_json::from_value(merged)?)
}

/// The configuration file and its drop-in fragments (`agent.d/*.toml` beside `agent.toml`, in
/// name order) as one table: each fragment's settings replace the ones before, and a section
/// (`[metadata]`) is merged key by key, so `fleet-agent join` can add what it learnt without
/// rewriting the file a package owns. `files` are already parsed (this crate does no I/O).
pub fn merged_fragments(files: impl IntoIterator<Item = serde_json::Value>) -> serde_json::Value {
    fn merge(into: &mut serde_json::Value, over: serde_json::Value) {
        match (into, over) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    match a.get_mut(&k) {
                        Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                        _ => {
                            a.insert(k, v);
                        }
                    }
                }
            }
            (into, over) => *into = over,
        }
    }
    let mut all = serde_json::Value::Object(Default::default());
    for f in files {
        merge(&mut all, f);
    }
    all
}

/// The top-level settings whose values differ between `running` and `new` (field names as in the
/// configuration file). Two configurations that cannot be serialized compare as one change named
/// `configuration`.
pub fn changed_settings<T: Serialize>(running: &T, new: &T) -> Vec<String> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(running), serde_json::to_value(new)) else {
        return vec!["configuration".into()];
    };
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return if a == b { Vec::new() } else { vec!["configuration".into()] };
    };
    let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
    names.sort();
    names.dedup();
    names.into_iter().filter(|k| a.get(*k) != b.get(*k)).cloned().collect()
}

/// The settings that changed and that a running daemon does not apply: every changed one not in
/// `hot`.
pub fn restart_only_changes<T: Serialize>(running: &T, new: &T, hot: &[&str]) -> Vec<String> {
    changed_settings(running, new).into_iter().filter(|k| !hot.contains(&k.as_str())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Clone, Default, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        address: String,
        labels: Vec<String>,
        nested: Nested,
    }

    #[derive(Serialize, Deserialize, Clone, Default, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Nested {
        slots: u32,
    }

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        address: Option<String>,
        #[serde(rename = "nested.slots", skip_serializing_if = "Option::is_none")]
        slots: Option<u32>,
    }

    #[test]
    fn fragments_replace_settings_and_merge_sections() {
        let file = serde_json::json!({"address": "file", "labels": ["a"], "nested": {"slots": 1, "name": "x"}});
        let fragment = serde_json::json!({"labels": ["b"], "nested": {"slots": 2}});
        let merged = merged_fragments([file, fragment]);
        assert_eq!(
            merged,
            serde_json::json!({"address": "file", "labels": ["b"], "nested": {"slots": 2, "name": "x"}})
        );
    }

    #[test]
    fn flags_given_replace_settings_and_flags_not_given_leave_them() {
        let file = Settings { address: "file".into(), labels: vec!["a".into()], nested: Nested { slots: 1 } };
        assert_eq!(layered(&file, &Flags::default()).ok(), Some(file.clone()));
        let flags = Flags { address: Some("flag".into()), slots: Some(3) };
        let got = layered(&file, &flags).ok();
        assert_eq!(
            got,
            Some(Settings { address: "flag".into(), labels: vec!["a".into()], nested: Nested { slots: 3 } })
        );
    }

    #[test]
    fn an_override_naming_no_setting_is_refused() {
        #[derive(Serialize)]
        struct Misspelt {
            adress: &'static str,
        }
        let err = layered(&Settings::default(), &Misspelt { adress: "x" }).err().map(|e| e.to_string());
        assert!(err.as_deref().is_some_and(|e| e.contains("adress")), "{err:?}");
        #[derive(Serialize)]
        struct IntoAValue {
            #[serde(rename = "address.port")]
            port: u16,
        }
        assert!(matches!(layered(&Settings::default(), &IntoAValue { port: 1 }), Err(LayerError::NotNested(..))));
    }

    #[test]
    fn a_change_anywhere_in_a_setting_counts_and_hot_settings_are_left_out() {
        let running = Settings::default();
        let mut new = running.clone();
        assert!(changed_settings(&running, &new).is_empty());
        new.nested.slots = 2;
        new.labels.push("a".into());
        assert_eq!(changed_settings(&running, &new), vec!["labels", "nested"]);
        assert_eq!(restart_only_changes(&running, &new, &["labels"]), vec!["nested"]);
        new.address = "x".into();
        assert_eq!(restart_only_changes(&running, &new, &["labels"]), vec!["address", "nested"]);
    }
}

/// Checks a plain-HTTP listen address is on loopback (`127.0.0.1:9101`, `[::1]:9101`): what is
/// served without TLS or auth must not be reachable from other machines.
pub fn loopback_only(setting: &str, addr: &str) -> Result<(), String> {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_loopback() => Ok(()),
        Ok(_) => Err(format!("{setting} {addr:?}: served without TLS or auth, so on a loopback address only")),
        Err(_) => Err(format!("{setting} {addr:?}: expected ip:port, e.g. 127.0.0.1:9101")),
    }
}

#[cfg(test)]
mod loopback_tests {
    #[test]
    fn only_loopback_addresses_pass() {
        assert!(super::loopback_only("metrics_listen", "127.0.0.1:9101").is_ok());
        assert!(super::loopback_only("metrics_listen", "[::1]:9101").is_ok());
        for bad in ["0.0.0.0:9101", "10.0.0.1:9101", "localhost:9101", "9101"] {
            assert!(super::loopback_only("metrics_listen", bad).is_err(), "{bad}");
        }
    }
}
