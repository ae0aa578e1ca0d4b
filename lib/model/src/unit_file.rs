//! Unit file text: parsing into ordered options, fleet's canonical form and its content hash.
//!
//! The hash is SHA-1 of the canonical serialisation, as in the original, so a unit file that is
//! already canonical hashes to the SHA-1 of its bytes and hashes shown by either tool agree.

use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};

/// Longest line accepted, as in the original.
pub const MAX_LINE: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UnitOption {
    pub section: String,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitFileError {
    #[error("line {line}: line too long (max {MAX_LINE} bytes)")]
    LineTooLong { line: usize },
    #[error("line {line}: unexpected text after section header")]
    TextAfterSection { line: usize },
    #[error("line {line}: invalid section header")]
    BadSection { line: usize },
    #[error("line {line}: expected Name=Value, got {text:?}")]
    NoAssignment { line: usize, text: String },
    #[error("line {line}: option name cannot be empty")]
    EmptyName { line: usize },
    #[error("unit file has no options")]
    Empty,
}

/// A parsed unit file: options in file order, sections in first-appearance order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UnitFile {
    pub options: Vec<UnitOption>,
}

impl UnitFile {
    pub fn parse(text: &str) -> Result<Self, UnitFileError> {
        let mut options = Vec::new();
        let mut section: Option<String> = None;
        let mut lines = text.split('\n').enumerate().peekable();
        while let Some((idx, raw)) = lines.next() {
            let line_no = idx + 1;
            if raw.len() >= MAX_LINE {
                return Err(UnitFileError::LineTooLong { line: line_no });
            }
            let line = raw.trim_end_matches('\r').trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(rest) = line.strip_prefix('[') {
                let Some(end) = rest.find(']') else {
                    return Err(UnitFileError::BadSection { line: line_no });
                };
                if !rest[end + 1..].trim().is_empty() {
                    return Err(UnitFileError::TextAfterSection { line: line_no });
                }
                section = Some(rest[..end].to_string());
                continue;
            }
            // Text before the first section header is ignored, as systemd and fleet do.
            let Some(sec) = &section else { continue };
            let Some((name, value)) = line.split_once('=') else {
                return Err(UnitFileError::NoAssignment { line: line_no, text: line.to_string() });
            };
            let name = name.trim();
            if name.is_empty() {
                return Err(UnitFileError::EmptyName { line: line_no });
            }
            // A trailing backslash continues the value on the next line; fleet keeps the
            // backslash and the newline so the canonical text round-trips.
            let mut value = value.trim_start().to_string();
            while value.ends_with('\\') {
                let Some((_, next)) = lines.next() else { break };
                if next.len() >= MAX_LINE {
                    return Err(UnitFileError::LineTooLong { line: line_no });
                }
                value.push('\n');
                value.push_str(next.trim_end_matches('\r'));
            }
            options.push(UnitOption {
                section: sec.clone(),
                name: name.to_string(),
                value: value.trim_end().to_string(),
            });
        }
        if options.is_empty() {
            return Err(UnitFileError::Empty);
        }
        Ok(UnitFile { options })
    }

    pub fn from_options(options: Vec<UnitOption>) -> Self {
        UnitFile { options }
    }

    /// fleet's canonical text: sections in first-appearance order, their options in file order,
    /// one blank line between sections and none after the last.
    pub fn canonical(&self) -> String {
        let mut sections: Vec<&str> = Vec::new();
        for o in &self.options {
            if !sections.contains(&o.section.as_str()) {
                sections.push(&o.section);
            }
        }
        let mut out = String::new();
        for (i, s) in sections.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push('[');
            out.push_str(s);
            out.push_str("]\n");
            for o in self.options.iter().filter(|o| o.section == *s) {
                out.push_str(&o.name);
                out.push('=');
                out.push_str(&o.value);
                out.push('\n');
            }
        }
        out
    }

    /// 40 hex digits of SHA-1 over the canonical text.
    pub fn hash(&self) -> String {
        content_hash(&self.canonical())
    }

    /// Values of `name` in `section`, in file order.
    pub fn values<'a>(&'a self, section: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.options.iter().filter(move |o| o.section == section && o.name == name).map(|o| o.value.as_str())
    }

    /// The first `[Unit] Description=`.
    pub fn description(&self) -> Option<&str> {
        self.values("Unit", "Description").next()
    }
}

/// SHA-1 hex of canonical unit text.
pub fn content_hash(canonical: &str) -> String {
    hex::encode(Sha1::digest(canonical.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "[Unit]\nDescription=Hello World\n\n[Service]\nExecStart=/bin/bash -c \"while true; do echo \\\"Hello, world\\\"; sleep 1; done\"\n";

    #[test]
    fn canonical_file_hashes_to_sha1_of_its_bytes() {
        let f = UnitFile::parse(HELLO).expect("parses");
        assert_eq!(f.canonical(), HELLO);
        assert_eq!(f.hash(), hex::encode(Sha1::digest(HELLO.as_bytes())));
        // The hash is stable across releases: stored bodies are addressed by it.
        assert_eq!(content_hash("[Service]\nExecStart=/bin/true\n"), "86943ac9f3754cb90f8dd38bf6da7b0cad074592");
    }

    #[test]
    fn comments_whitespace_and_order() {
        let text = "# top\nignored before sections\n[Service]\n ExecStart = /bin/a \n; c\nExecStart=/bin/b\n[Unit]\nDescription=d\n[Service]\nUser=x\n";
        let f = UnitFile::parse(text).expect("parses");
        assert_eq!(f.canonical(), "[Service]\nExecStart=/bin/a\nExecStart=/bin/b\nUser=x\n\n[Unit]\nDescription=d\n");
        assert_eq!(f.description(), Some("d"));
        // Canonicalising groups a section's options together; doing it again changes nothing.
        let again = UnitFile::parse(&f.canonical()).expect("reparses");
        assert_eq!(again.canonical(), f.canonical());
        assert_eq!(again.hash(), f.hash());
    }

    #[test]
    fn continuation_keeps_backslash_and_newline() {
        let f = UnitFile::parse("[Service]\nExecStart=/bin/sh -c \\\n   'echo hi'\n").expect("parses");
        assert_eq!(f.options[0].value, "/bin/sh -c \\\n   'echo hi'");
        assert_eq!(UnitFile::parse(&f.canonical()).expect("reparses"), f);
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            UnitFile::parse("[Service]\nExecStart\n").map_err(|e| e.to_string()),
            Err("line 2: expected Name=Value, got \"ExecStart\"".into())
        );
        assert_eq!(UnitFile::parse("[Service] x\n"), Err(UnitFileError::TextAfterSection { line: 1 }));
        assert_eq!(UnitFile::parse("# nothing\n"), Err(UnitFileError::Empty));
        let long = format!("[Service]\nExecStart={}\n", "x".repeat(MAX_LINE));
        assert_eq!(UnitFile::parse(&long), Err(UnitFileError::LineTooLong { line: 2 }));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn option() -> impl Strategy<Value = UnitOption> {
        (
            prop_oneof![
                Just("Unit".to_string()),
                Just("Service".to_string()),
                Just("X-Fleet".to_string()),
                Just("Install".to_string()),
                "[A-Z][A-Za-z-]{0,8}"
            ],
            "[A-Za-z][A-Za-z0-9_-]{0,12}",
            // Values as a file can hold them: no surrounding whitespace, no trailing backslash.
            "([!-~]([ -~]{0,30}[!-\\[\\]-~])?)?",
        )
            .prop_map(|(section, name, value)| UnitOption { section, name, value })
    }

    proptest! {
        #[test]
        fn parse_serialise_parse_is_identity(opts in proptest::collection::vec(option(), 1..20)) {
            let file = UnitFile::from_options(opts);
            let text = file.canonical();
            let parsed = UnitFile::parse(&text).expect("canonical text parses");
            prop_assert_eq!(parsed.canonical(), text.clone());
            prop_assert_eq!(UnitFile::parse(&parsed.canonical()).expect("reparses"), parsed);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(f) = UnitFile::parse(&text) {
                let name = crate::UnitName::parse("fuzz@x.service").expect("name");
                let _ = crate::rules::Rules::parse(&name, &f);
                let _ = UnitFile::parse(&f.canonical());
            }
        }

        #[test]
        fn arbitrary_xfleet_values_never_panic(key in prop_oneof![Just("MachineMetadata"), Just("Conflicts"), Just("MemoryMax"), Just("CPUQuota"), Just("MachineOf"), Just("Replaces"), Just("MaxPerMachine"), Just("SpreadBy"), Just("MachineID")], value in "[ -~]{0,40}") {
            let f = UnitFile::from_options(vec![UnitOption { section: "X-Fleet".into(), name: key.into(), value }]);
            let name = crate::UnitName::parse("fuzz@x.service").expect("name");
            let _ = crate::rules::Rules::parse(&name, &f);
        }
    }
}
