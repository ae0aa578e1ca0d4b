//! `[X-Fleet]` placement rules: parsing, validation and matching.
//!
//! Parsing follows the original fleet (quoted values split on spaces, `Conflicts` also split on
//! whitespace, specifiers `%n %N %p %i` expanded with the unit's own name) and adds what its users
//! asked for: metadata operators, capacity reservations, per-machine limits and spreading. Unknown
//! keys and impossible combinations are errors that name the key, so nothing unrunnable is stored.

use crate::{UnitFile, UnitName};
use std::collections::BTreeMap;

pub use crate::glob::{glob_match, UnitGlob, MAX_GLOB_BYTES};

pub const SECTION: &str = "X-Fleet";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("unrecognized requirement in [X-Fleet] section: {0:?}")]
    UnknownKey(String),
    #[error("[X-Fleet] {key}: invalid value {value:?}: {why}")]
    BadValue { key: String, value: String, why: String },
    #[error("{0} cannot be used with {1}")]
    Combination(&'static str, &'static str),
    #[error("unresolvable requirements: peer {peer:?} matches {kind} {pattern:?}")]
    Unresolvable { peer: String, kind: &'static str, pattern: String },
}

/// One metadata requirement, e.g. `region=east|west`, `region!=east`, `disk>=100`.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataReq {
    /// The machine's value is one of these.
    OneOf(String, Vec<String>),
    /// The machine lacks the key or its value is none of these.
    NoneOf(String, Vec<String>),
    /// The machine's value is a number and compares to this one.
    Compare(String, CmpOp, f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
}

impl MetadataReq {
    pub fn key(&self) -> &str {
        match self {
            MetadataReq::OneOf(k, _) | MetadataReq::NoneOf(k, _) | MetadataReq::Compare(k, _, _) => k,
        }
    }

    pub fn matches(&self, metadata: &BTreeMap<String, String>) -> bool {
        match self {
            MetadataReq::OneOf(k, vs) => metadata.get(k).is_some_and(|v| vs.contains(v)),
            MetadataReq::NoneOf(k, vs) => metadata.get(k).is_none_or(|v| !vs.contains(v)),
            MetadataReq::Compare(k, op, n) => {
                metadata.get(k).and_then(|v| v.trim().parse::<f64>().ok()).is_some_and(|v| match op {
                    CmpOp::Lt => v < *n,
                    CmpOp::Le => v <= *n,
                    CmpOp::Gt => v > *n,
                    CmpOp::Ge => v >= *n,
                })
            }
        }
    }

    fn parse(raw: &str) -> Option<MetadataReq> {
        for (tok, op) in [
            (">=", Some(CmpOp::Ge)),
            ("<=", Some(CmpOp::Le)),
            ("!=", None),
            (">", Some(CmpOp::Gt)),
            ("<", Some(CmpOp::Lt)),
        ] {
            if let Some((k, v)) = raw.split_once(tok) {
                let (k, v) = (k.trim(), v.trim());
                if k.is_empty() || v.is_empty() {
                    return None;
                }
                return Some(match op {
                    Some(op) => MetadataReq::Compare(k.into(), op, v.parse().ok()?),
                    None => MetadataReq::NoneOf(k.into(), v.split('|').map(str::to_string).collect()),
                });
            }
        }
        let (k, v) = raw.split_once('=')?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || v.is_empty() || v.contains('=') {
            return None;
        }
        Some(MetadataReq::OneOf(k.into(), v.split('|').map(str::to_string).collect()))
    }
}

impl std::fmt::Display for MetadataReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetadataReq::OneOf(k, v) => write!(f, "{k}={}", v.join("|")),
            MetadataReq::NoneOf(k, v) => write!(f, "{k}!={}", v.join("|")),
            MetadataReq::Compare(k, op, n) => {
                let op = match op {
                    CmpOp::Lt => "<",
                    CmpOp::Le => "<=",
                    CmpOp::Gt => ">",
                    CmpOp::Ge => ">=",
                };
                write!(f, "{k}{op}{n}")
            }
        }
    }
}

/// Resources a unit reserves on its machine, or a machine offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Bytes of memory.
    #[serde(default)]
    pub memory: u64,
    /// CPU in percent of one core (systemd's `CPUQuota=` unit: 200 = two cores).
    #[serde(default)]
    pub cpu: u64,
}

impl Resources {
    pub fn is_zero(&self) -> bool {
        self.memory == 0 && self.cpu == 0
    }
}

/// Everything `[X-Fleet]` says about where a unit may run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rules {
    pub machine_id: Option<String>,
    pub machine_of: Vec<String>,
    pub metadata: Vec<MetadataReq>,
    pub conflicts: Vec<UnitGlob>,
    pub global: bool,
    pub replaces: Vec<UnitGlob>,
    pub reserve: Resources,
    pub max_per_machine: Option<u32>,
    pub spread_by: Option<String>,
    /// Never active on two machines at once, even across a partition: its agent stops it when it
    /// cannot renew its lease, and the engine waits that long before placing it elsewhere.
    pub exclusive: bool,
    /// When the unit counts as healthy (`HealthCheck=`, `MinHealthyTime=` ...; see
    /// [`crate::health`]): not a placement rule, but the same section.
    pub health: crate::health::HealthSpec,
    /// Whether and how the unit is moved when it keeps failing on its machine
    /// (`RescheduleAttempts=` ...; see [`crate::reschedule`]).
    pub reschedule: crate::reschedule::ReschedulePolicy,
}

/// Splits fleet's quoted multi-values: `"a=b" "c=d"` -> `a=b`, `c=d`; unquoted: one value.
fn values(raw: &str) -> Vec<String> {
    let t = raw.trim();
    if t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
        let mut out = Vec::new();
        let mut cur = String::new();
        let mut quoted = false;
        for c in t.chars() {
            match c {
                '"' => quoted = !quoted,
                ' ' if !quoted => {
                    if !cur.is_empty() {
                        out.push(std::mem::take(&mut cur));
                    }
                }
                c => cur.push(c),
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    } else {
        vec![t.to_string()]
    }
}

/// Expands `%n %N %p %i` (and `%%`) with the unit's own name.
pub fn expand_specifiers(value: &str, unit: &UnitName) -> String {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push_str(unit.as_str()),
            Some('N') => out.push_str(unit.as_str().rsplit_once('.').map(|(s, _)| s).unwrap_or(unit.as_str())),
            Some('p') => out.push_str(unit.prefix()),
            Some('i') => out.push_str(unit.instance().unwrap_or("")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "yes" | "1" | "on" | "t")
}

/// `512M`, `2G`, `1024` (bytes) -> bytes.
pub fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mult) = match v.chars().last()? {
        'K' | 'k' => (&v[..v.len() - 1], 1u64 << 10),
        'M' | 'm' => (&v[..v.len() - 1], 1 << 20),
        'G' | 'g' => (&v[..v.len() - 1], 1 << 30),
        'T' | 't' => (&v[..v.len() - 1], 1 << 40),
        _ => (v, 1),
    };
    let n: f64 = num.trim().parse().ok()?;
    (n >= 0.0 && n.is_finite()).then_some((n * mult as f64) as u64)
}

/// `50%` -> 50; `1.5` (cores) -> 150.
pub fn parse_cpu(v: &str) -> Option<u64> {
    let v = v.trim();
    let pct = match v.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().ok()?,
        None => v.parse::<f64>().ok()? * 100.0,
    };
    (pct >= 0.0 && pct.is_finite()).then_some(pct.round() as u64)
}

impl Rules {
    /// Reads the `[X-Fleet]` section of `file` for the unit `unit`.
    pub fn parse(unit: &UnitName, file: &UnitFile) -> Result<Rules, RuleError> {
        let mut r = Rules::default();
        let bad = |key: &str, value: &str, why: &str| RuleError::BadValue {
            key: key.into(),
            value: value.into(),
            why: why.into(),
        };
        for o in file.options.iter().filter(|o| o.section == SECTION) {
            let raw = expand_specifiers(&o.value, unit);
            // An empty assignment resets the list, as in systemd.
            let reset = raw.trim().is_empty();
            match o.name.as_str() {
                "MachineID" | "X-ConditionMachineID" | "X-ConditionMachineBootID" => {
                    if reset {
                        r.machine_id = None;
                    } else if r.machine_id.is_none() {
                        let id = raw.trim().to_string();
                        if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                            return Err(bad(&o.name, &raw, "expected a machine id (hex)"));
                        }
                        r.machine_id = Some(id);
                    }
                }
                "MachineOf" | "X-ConditionMachineOf" => {
                    if reset {
                        r.machine_of.clear();
                    }
                    for v in values(&raw).into_iter().filter(|v| !v.is_empty()) {
                        UnitName::parse(&v).map_err(|e| bad(&o.name, &v, &e.to_string()))?;
                        r.machine_of.push(v);
                    }
                }
                "MachineMetadata" | "X-ConditionMachineMetadata" => {
                    if reset {
                        r.metadata.clear();
                    }
                    for v in values(&raw).into_iter().filter(|v| !v.is_empty()) {
                        let req = MetadataReq::parse(&v).ok_or_else(|| {
                            bad(&o.name, &v, "expected key=value, key=a|b, key!=value or key>=number")
                        })?;
                        r.metadata.push(req);
                    }
                }
                "Conflicts" | "X-Conflicts" => {
                    if reset {
                        r.conflicts.clear();
                    }
                    for v in values(&raw) {
                        for p in v.split_whitespace() {
                            r.conflicts.push(UnitGlob::new(p).map_err(|why| bad(&o.name, p, &why))?);
                        }
                    }
                }
                "Global" => r.global = truthy(&raw),
                "Exclusive" => r.exclusive = truthy(&raw),
                "Replaces" => {
                    if reset {
                        r.replaces.clear();
                    }
                    for p in values(&raw).into_iter().filter(|v| !v.is_empty()) {
                        r.replaces.push(UnitGlob::new(&p).map_err(|why| bad(&o.name, &p, &why))?);
                    }
                }
                "MemoryMax" | "MemoryReservation" => {
                    r.reserve.memory = if reset {
                        0
                    } else {
                        parse_bytes(&raw).ok_or_else(|| bad(&o.name, &raw, "expected bytes such as 512M or 2G"))?
                    };
                }
                "CPUQuota" | "CPUReservation" => {
                    r.reserve.cpu = if reset {
                        0
                    } else {
                        parse_cpu(&raw)
                            .ok_or_else(|| bad(&o.name, &raw, "expected a percentage of one CPU such as 50% or 200%"))?
                    };
                }
                "MaxPerMachine" => {
                    r.max_per_machine = if reset {
                        None
                    } else {
                        Some(
                            raw.trim()
                                .parse::<u32>()
                                .ok()
                                .filter(|n| *n > 0)
                                .ok_or_else(|| bad(&o.name, &raw, "expected a positive integer"))?,
                        )
                    };
                }
                "SpreadBy" => {
                    let k = raw.trim();
                    if !reset && !k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) {
                        return Err(bad(&o.name, k, "expected a metadata key"));
                    }
                    r.spread_by = (!reset).then(|| k.to_string());
                }
                k if crate::health::KEYS.contains(&k) => r.health.set(k, &raw)?,
                k if crate::reschedule::KEYS.contains(&k) => r.reschedule.set(k, &raw)?,
                other => return Err(RuleError::UnknownKey(other.to_string())),
            }
        }
        r.validate()?;
        Ok(r)
    }

    /// Checks a template's `[X-Fleet]` section as far as it can be without an instance: every
    /// key must be known and every value that does not depend on the instance valid. A value
    /// with `%i`/`%I` (`MachineID=%i` pins each instance to the machine its instance names) is
    /// checked when an instance is made, with that instance's value.
    pub fn parse_template(template: &UnitName, file: &UnitFile) -> Result<Rules, RuleError> {
        let mut checked = file.clone();
        for o in checked.options.iter_mut().filter(|o| o.section == SECTION) {
            if o.value.contains("%i") || o.value.contains("%I") {
                if crate::health::KEYS.contains(&o.name.as_str()) {
                    // A check's settings follow the check: clearing `HealthCheck=http://...:808%i/`
                    // would refuse the settings after it. Checked with a stand-in instance.
                    o.value = o.value.replace("%i", "1").replace("%I", "1");
                } else {
                    o.value.clear();
                }
            }
        }
        Rules::parse(template, &checked)
    }

    fn validate(&self) -> Result<(), RuleError> {
        let id = self.machine_id.is_some();
        let combos: [(bool, bool, &'static str, &'static str); 7] = [
            (id, !self.machine_of.is_empty(), "MachineID", "MachineOf"),
            (id, !self.conflicts.is_empty(), "MachineID", "Conflicts"),
            (id, self.global, "MachineID", "Global"),
            (id, !self.replaces.is_empty(), "MachineID", "Replaces"),
            (self.global, !self.machine_of.is_empty(), "Global", "MachineOf"),
            (self.global, !self.replaces.is_empty(), "Global", "Replaces"),
            (!self.conflicts.is_empty(), !self.replaces.is_empty(), "Conflicts", "Replaces"),
        ];
        if let Some((_, _, a, b)) = combos.iter().find(|(a, b, _, _)| *a && *b) {
            return Err(RuleError::Combination(a, b));
        }
        if self.global && self.reschedule.is_on() {
            // A global unit runs on every eligible machine: there is nowhere to move it.
            return Err(RuleError::Combination("Global", "RescheduleAttempts"));
        }
        if self.global && self.exclusive {
            return Err(RuleError::Combination("Global", "Exclusive"));
        }
        if self.global && (self.max_per_machine.is_some() || self.spread_by.is_some()) {
            return Err(RuleError::Combination(
                "Global",
                if self.spread_by.is_some() { "SpreadBy" } else { "MaxPerMachine" },
            ));
        }
        for peer in &self.machine_of {
            if let Some(c) = self.conflicts.iter().find(|c| c.matches(peer)) {
                return Err(RuleError::Unresolvable { peer: peer.clone(), kind: "conflict", pattern: c.to_string() });
            }
            if let Some(c) = self.replaces.iter().find(|c| c.matches(peer)) {
                return Err(RuleError::Unresolvable { peer: peer.clone(), kind: "replace", pattern: c.to_string() });
            }
        }
        Ok(())
    }

    /// True if this unit's `Conflicts` patterns match `other` (never itself).
    pub fn conflicts_with(&self, me: &str, other: &str) -> bool {
        // The empty list first: most units declare none, and names compared are long and alike.
        !self.conflicts.is_empty() && me != other && self.conflicts.iter().any(|p| p.matches(other))
    }

    /// True if this unit's `Replaces` patterns match `other` (never itself).
    pub fn replaces_unit(&self, me: &str, other: &str) -> bool {
        !self.replaces.is_empty() && me != other && self.replaces.iter().any(|p| p.matches(other))
    }

    /// Whether a machine with this id and metadata satisfies the machine-local rules.
    pub fn machine_id_matches(&self, id: &str) -> bool {
        match &self.machine_id {
            None => true,
            Some(want) => id == want || (want.len() >= 8 && id.starts_with(want.as_str())),
        }
    }

    /// Metadata: `key=value` requirements on one key are OR'ed; everything else is AND'ed.
    pub fn metadata_matches(&self, metadata: &BTreeMap<String, String>) -> Result<(), String> {
        let mut one_of: BTreeMap<&str, Vec<&MetadataReq>> = BTreeMap::new();
        for req in &self.metadata {
            match req {
                MetadataReq::OneOf(k, _) => one_of.entry(k).or_default().push(req),
                other if !other.matches(metadata) => return Err(other.to_string()),
                _ => {}
            }
        }
        for reqs in one_of.values() {
            if !reqs.iter().any(|r| r.matches(metadata)) {
                return Err(reqs.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" or "));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(unit: &str, xfleet: &str) -> Result<Rules, RuleError> {
        let text = format!("[Service]\nExecStart=/bin/true\n\n[X-Fleet]\n{xfleet}");
        Rules::parse(&UnitName::parse(unit).expect("name"), &UnitFile::parse(&text).expect("file"))
    }
    fn md(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn values_split_like_fleet() {
        assert_eq!(values("\"a=b\" \"c=d\""), vec!["a=b", "c=d"]);
        assert_eq!(values("a=b c=d"), vec!["a=b c=d"]);
        let r = rules("a.service", "Conflicts=x.service y.service\nConflicts=z*\n").expect("parses");
        assert_eq!(r.conflicts, vec!["x.service", "y.service", "z*"]);
    }

    #[test]
    fn specifiers_expand_in_values() {
        let n = UnitName::parse("web@east.service").expect("name");
        assert_eq!(expand_specifiers("%n %N %p %i %% %m", &n), "web@east.service web@east web east % %m");
        let r = rules("web@east.service", "MachineMetadata=region=%i\nConflicts=%p@*.service\n").expect("parses");
        assert_eq!(r.metadata, vec![MetadataReq::OneOf("region".into(), vec!["east".into()])]);
        assert_eq!(r.conflicts, vec!["web@*.service"]);
    }

    #[test]
    fn metadata_semantics() {
        let r =
            rules("a.service", "MachineMetadata=region=east\nMachineMetadata=region=west\nMachineMetadata=disk=ssd\n")
                .expect("parses");
        assert!(r.metadata_matches(&md(&[("region", "west"), ("disk", "ssd")])).is_ok());
        assert!(r.metadata_matches(&md(&[("region", "west"), ("disk", "hdd")])).is_err());
        assert!(r.metadata_matches(&md(&[("disk", "ssd")])).is_err());
        let r = rules("a.service", "MachineMetadata=\"region=a|b\" \"tier!=db\" \"disk>=100\"\n").expect("parses");
        assert!(r.metadata_matches(&md(&[("region", "b"), ("disk", "250")])).is_ok());
        assert!(r.metadata_matches(&md(&[("region", "b"), ("disk", "99")])).is_err());
        assert!(r.metadata_matches(&md(&[("region", "b"), ("disk", "100"), ("tier", "db")])).is_err());
        assert!(r.metadata_matches(&md(&[("region", "c"), ("disk", "100")])).is_err());
        assert_eq!(
            rules("a.service", "MachineMetadata=region=east\nMachineMetadata=\n").expect("parses").metadata,
            vec![]
        );
    }

    #[test]
    fn errors_name_the_key_or_combination() {
        assert_eq!(rules("a.service", "Bogus=1\n"), Err(RuleError::UnknownKey("Bogus".into())));
        assert_eq!(
            rules("a.service", "MachineID=abc\nGlobal=true\n").map_err(|e| e.to_string()),
            Err("MachineID cannot be used with Global".into())
        );
        assert_eq!(
            rules("a.service", "Conflicts=b*\nReplaces=c.service\n").map_err(|e| e.to_string()),
            Err("Conflicts cannot be used with Replaces".into())
        );
        assert!(matches!(
            rules("a.service", "MachineOf=b.service\nConflicts=b*\n"),
            Err(RuleError::Unresolvable { .. })
        ));
        assert!(matches!(rules("a.service", "MachineMetadata=novalue\n"), Err(RuleError::BadValue { .. })));
        assert!(matches!(rules("a.service", "MemoryMax=lots\n"), Err(RuleError::BadValue { .. })));
        assert!(matches!(rules("a.service", "MaxPerMachine=0\n"), Err(RuleError::BadValue { .. })));
    }

    #[test]
    fn resources_and_flags() {
        let r = rules("a.service", "MemoryMax=512M\nCPUQuota=150%\nGlobal=yes\n").expect("parses");
        assert_eq!(r.reserve, Resources { memory: 512 << 20, cpu: 150 });
        assert!(r.global);
        assert_eq!(parse_cpu("2"), Some(200));
        assert_eq!(parse_bytes("1.5G"), Some(3 << 29));
    }

    #[test]
    fn globs() {
        assert!(glob_match("web@*.service", "web@1.service"));
        assert!(!glob_match("web@*.service", "api@1.service"));
        assert!(glob_match("conflict.?.service", "conflict.1.service"));
        assert!(glob_match("a[0-9].service", "a7.service"));
        assert!(!glob_match("a[!0-9].service", "a7.service"));
        assert!(!glob_match("*", "a/b"));
        assert!(!glob_match("a[^0-9].service", "a7.service"));
        assert!(glob_match("a\\*.service", "a*.service") && !glob_match("a\\*.service", "ab.service"));
    }

    /// The original's patterns are Go's `path.Match`: a plain reference matcher (dynamic
    /// programming over pattern and name, no classes) to compare against.
    fn reference(p: &[char], n: &[char]) -> bool {
        let mut m = vec![vec![false; n.len() + 1]; p.len() + 1];
        m[p.len()][n.len()] = true;
        for i in (0..p.len()).rev() {
            for j in (0..=n.len()).rev() {
                m[i][j] = match p[i] {
                    '*' => m[i + 1][j] || (j < n.len() && n[j] != '/' && m[i][j + 1]),
                    '?' => j < n.len() && n[j] != '/' && m[i + 1][j + 1],
                    c => j < n.len() && n[j] == c && m[i + 1][j + 1],
                };
            }
        }
        m[0][0]
    }

    proptest::proptest! {
        /// Any pattern of stars, `?` and letters against any name: the answer of the reference,
        /// and never slow (a backtracking matcher took seconds on ten stars against 40 letters).
        #[test]
        fn globs_match_like_path_match_and_never_slowly(
            pattern in "[ab*?]{0,30}(\\.service)?",
            name in "[ab/]{0,60}(\\.service)?",
        ) {
            let started = std::time::Instant::now();
            let got = glob_match(&pattern, &name);
            let p: Vec<char> = pattern.chars().collect();
            let n: Vec<char> = name.chars().collect();
            proptest::prop_assert_eq!(got, reference(&p, &n), "{} against {}", pattern, name);
            proptest::prop_assert!(started.elapsed() < std::time::Duration::from_millis(200), "{} against {} took {:?}", pattern, name, started.elapsed());
        }
    }

    #[test]
    fn a_template_may_take_rules_from_its_instance() {
        let t = UnitName::parse("pin@.service").expect("name");
        let f = UnitFile::parse("[X-Fleet]\nMachineID=%i\n").expect("file");
        assert!(Rules::parse_template(&t, &f).is_ok(), "MachineID=%i is valid in a template");
        let good = UnitName::parse("pin@0f1ee701.service").expect("name");
        assert_eq!(Rules::parse(&good, &f).ok().and_then(|r| r.machine_id), Some("0f1ee701".to_string()));
        let bad = UnitName::parse("pin@web.service").expect("name");
        assert!(matches!(Rules::parse(&bad, &f), Err(RuleError::BadValue { .. })), "an instance is checked");
        let unknown = UnitFile::parse("[X-Fleet]\nMachineId=%i\n").expect("file");
        assert!(matches!(Rules::parse_template(&t, &unknown), Err(RuleError::UnknownKey(_))));
        let broken = UnitFile::parse("[X-Fleet]\nMachineID=%i\nMemoryMax=lots\n").expect("file");
        assert!(matches!(Rules::parse_template(&t, &broken), Err(RuleError::BadValue { .. })));
        // A check naming its instance's port, with settings after it (examples/web@.service).
        let web = UnitName::parse("web@.service").expect("name");
        let checked =
            UnitFile::parse("[X-Fleet]\nHealthCheck=http://127.0.0.1:808%i/\nHealthCheckInterval=1s\n").expect("file");
        assert!(Rules::parse_template(&web, &checked).is_ok(), "{:?}", Rules::parse_template(&web, &checked));
    }

    #[test]
    fn a_careless_pattern_is_matched_at_once_and_long_ones_are_refused() {
        let name = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1.service";
        let started = std::time::Instant::now();
        for _ in 0..100 {
            assert!(!glob_match("*a*a*a*a*a*a*a*a*a*a*a*b.service", name));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
        let long = format!("Conflicts={}\n", "*".repeat(MAX_GLOB_BYTES + 1));
        assert!(matches!(rules("a.service", &long), Err(RuleError::BadValue { .. })));
        assert!(matches!(rules("a.service", "Conflicts=a[.service\n"), Err(RuleError::BadValue { .. })));
    }

    #[test]
    fn machine_id_prefix() {
        let r = rules("a.service", "MachineID=0f1ee701\n").expect("parses");
        assert!(r.machine_id_matches("0f1ee701000040008000000000000001"));
        assert!(!r.machine_id_matches("1f1ee701000040008000000000000001"));
    }
}
