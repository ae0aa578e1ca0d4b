//! How fleet's daemons treat their settings on a reload (SIGHUP, `systemctl reload`).
//!
//! Each daemon names the few settings it applies while running (its hot settings); every other
//! setting that changed is reported as taking effect on restart. The restart-only list is not
//! kept by hand: it is every field of the typed configuration that is not hot, so a new setting
//! can never be silently ignored by a reload. Pure functions over `Serialize` types: this crate
//! must not depend on a daemon, on I/O or on a runtime.

use serde::Serialize;

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

    #[derive(Serialize, Clone, Default)]
    struct Settings {
        address: String,
        labels: Vec<String>,
        nested: Nested,
    }

    #[derive(Serialize, Clone, Default)]
    struct Nested {
        slots: u32,
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
