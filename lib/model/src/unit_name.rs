//! Unit names, validated by fleet's rules (`name.suffix`, `name@instance.suffix`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

const MAX_LEN: usize = 256;
const SUFFIXES: &[&str] = &[
    "automount",
    "busname",
    "device",
    "mount",
    "path",
    "scope",
    "service",
    "slice",
    "snapshot",
    "socket",
    "swap",
    "target",
    "timer",
];
const TEMPLATE_SUFFIXES: &[&str] = &["path", "service", "socket", "target", "timer"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitNameError {
    #[error("unit name cannot be empty")]
    Empty,
    #[error("unit name exceeds maximum length ({MAX_LEN})")]
    TooLong,
    #[error("unit name must contain \".\"")]
    NoDot,
    #[error("unit name cannot end in \".\"")]
    EndsInDot,
    #[error("unit name cannot start in \"@\"")]
    StartsWithAt,
    #[error("invalid unit type: {0:?}")]
    InvalidType(String),
    #[error("invalid unit type for template: {0:?}")]
    InvalidTemplateType(String),
    #[error("invalid character '{0}' in unit name")]
    InvalidChar(char),
}

/// A validated unit name, ordered like fleet lists units (bytewise). Cheap to clone: clones share
/// one allocation, so the engine's maps keyed by unit (records, schedule, states, rules) hold a
/// million names once, not once per map.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UnitName(Arc<str>);

impl UnitName {
    pub fn parse(name: &str) -> Result<Self, UnitNameError> {
        if name.is_empty() {
            return Err(UnitNameError::Empty);
        }
        if name.len() > MAX_LEN {
            return Err(UnitNameError::TooLong);
        }
        if name.starts_with('@') {
            return Err(UnitNameError::StartsWithAt);
        }
        let Some(dot) = name.rfind('.') else {
            return Err(UnitNameError::NoDot);
        };
        let (stem, suffix) = (&name[..dot], &name[dot + 1..]);
        if suffix.is_empty() {
            return Err(UnitNameError::EndsInDot);
        }
        if name.contains('@') {
            if !TEMPLATE_SUFFIXES.contains(&suffix) {
                return Err(UnitNameError::InvalidTemplateType(suffix.to_string()));
            }
        } else if !SUFFIXES.contains(&suffix) {
            return Err(UnitNameError::InvalidType(suffix.to_string()));
        }
        if let Some(c) =
            stem.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '@' | '-' | '\\')))
        {
            return Err(UnitNameError::InvalidChar(c));
        }
        Ok(UnitName(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether both are one allocation, not merely equal (see the engine's view).
    pub fn shares(&self, other: &UnitName) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Text after the last `.`.
    pub fn suffix(&self) -> &str {
        self.0.rsplit_once('.').map(|(_, s)| s).unwrap_or("")
    }

    fn stem(&self) -> &str {
        self.0.rsplit_once('.').map(|(s, _)| s).unwrap_or(&self.0)
    }

    /// Text before the first `@`, or the whole stem for a plain unit.
    pub fn prefix(&self) -> &str {
        let stem = self.stem();
        stem.split_once('@').map(|(p, _)| p).unwrap_or(stem)
    }

    /// The instance of `foo@bar.service` (`bar`); `None` for plain units, `Some("")` for templates.
    pub fn instance(&self) -> Option<&str> {
        self.stem().split_once('@').map(|(_, i)| i)
    }

    pub fn is_template(&self) -> bool {
        self.instance() == Some("")
    }

    pub fn is_instance(&self) -> bool {
        matches!(self.instance(), Some(i) if !i.is_empty())
    }

    /// `foo@.service` for `foo@bar.service`.
    pub fn template(&self) -> Option<UnitName> {
        self.is_instance().then(|| UnitName(Arc::from(format!("{}@.{}", self.prefix(), self.suffix()))))
    }
}

// Ordering and hashing are the inner string's (derived), so maps keyed by unit name can be
// looked up and ranged over with a plain `&str`.
impl std::borrow::Borrow<str> for UnitName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for UnitName {
    type Error = UnitNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        UnitName::parse(&s)
    }
}

impl From<UnitName> for String {
    fn from(n: UnitName) -> String {
        n.0.to_string()
    }
}

impl std::str::FromStr for UnitName {
    type Err = UnitNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        UnitName::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_fleet_names() {
        for n in ["hello.service", "a.b.socket", "web@1.service", "web@.service", "x\\x2d.mount", "a:b_c-d.timer"] {
            assert!(UnitName::parse(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_with_fleet_messages() {
        let cases = [
            ("", "unit name cannot be empty"),
            ("hello", "unit name must contain \".\""),
            ("hello.", "unit name cannot end in \".\""),
            ("@x.service", "unit name cannot start in \"@\""),
            ("hello.txt", "invalid unit type: \"txt\""),
            ("a@1.mount", "invalid unit type for template: \"mount\""),
            ("he llo.service", "invalid character ' ' in unit name"),
            ("a/b.service", "invalid character '/' in unit name"),
        ];
        for (name, msg) in cases {
            assert_eq!(UnitName::parse(name).map_err(|e| e.to_string()), Err(msg.to_string()), "{name}");
        }
        let long = format!("{}.service", "a".repeat(250));
        assert_eq!(UnitName::parse(&long), Err(UnitNameError::TooLong));
    }

    #[test]
    fn splits_templates_and_instances() {
        let i = UnitName::parse("web@a@b.service").expect("valid");
        assert_eq!(i.prefix(), "web");
        assert_eq!(i.instance(), Some("a@b"));
        assert_eq!(i.template().map(|t| t.to_string()), Some("web@.service".into()));
        let t = UnitName::parse("web@.service").expect("valid");
        assert!(t.is_template() && !t.is_instance());
        let p = UnitName::parse("plain.service").expect("valid");
        assert_eq!((p.prefix(), p.instance(), p.template()), ("plain", None, None));
    }
}
