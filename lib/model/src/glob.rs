//! Globs over unit names, as `Conflicts=` and `Replaces=` take them.

/// Longest `Conflicts`/`Replaces` pattern accepted (unit names are at most 256 bytes).
pub const MAX_GLOB_BYTES: usize = 256;

/// A shell-style glob over unit names (`*`, `?`, `[...]`, `[!...]`/`[^...]`, `\` escapes), as
/// Go's `path.Match` that the original fleet used; `*` and `?` do not match `/`.
///
/// Compiled once, when the unit's rules are parsed, into an automaton that matches in time
/// linear in the name (globset, over the regex crate): a backtracking matcher took seconds on
/// one careless pattern (`*a*a*a*a*a*a*a*a*b.service` against a 40-character name) and the
/// scheduler calls it for every pair of units on a machine.
#[derive(Clone)]
pub struct UnitGlob {
    text: String,
    matcher: globset::GlobMatcher,
}

impl UnitGlob {
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern.len() > MAX_GLOB_BYTES {
            return Err(format!("pattern is {} bytes; at most {MAX_GLOB_BYTES}", pattern.len()));
        }
        // A run of stars is one star in Go's path.Match; globset would read `**` as "across
        // separators".
        let mut plain = String::with_capacity(pattern.len());
        let (mut escaped, mut star) = (false, false);
        for c in pattern.chars() {
            if c == '*' && !escaped && star {
                continue;
            }
            star = c == '*' && !escaped;
            escaped = c == '\\' && !escaped;
            plain.push(c);
        }
        let glob = globset::GlobBuilder::new(&plain)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| e.kind().to_string())?;
        Ok(UnitGlob { text: pattern.to_string(), matcher: glob.compile_matcher() })
    }

    /// Comma-separated names or globs (no unit name holds a comma), as the API's filters take
    /// them; empty items are skipped. An error names the pattern refused.
    pub fn list(text: &str) -> Result<Vec<UnitGlob>, String> {
        text.split(',')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(|g| UnitGlob::new(g).map_err(|e| format!("{g:?}: {e}")))
            .collect()
    }

    pub fn matches(&self, name: &str) -> bool {
        self.matcher.is_match(name)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for UnitGlob {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl PartialEq<&str> for UnitGlob {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

impl std::fmt::Debug for UnitGlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl std::fmt::Display for UnitGlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Whether `name` matches the glob `pattern` (false for an invalid pattern).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    UnitGlob::new(pattern).is_ok_and(|g| g.matches(name))
}
