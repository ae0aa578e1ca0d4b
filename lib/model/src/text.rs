//! [`Text`]: an immutable string whose clones share one allocation.
//!
//! Records hold values that repeat across a whole cluster: a million instances of one template
//! carry the same 64-character body hash in their record, their schedule entry and their state,
//! and nearly every state says `loaded`/`active`/`running`. As `String`s each copy is its own
//! allocation (about 90 bytes for a hash); as `Text` a copy is a pointer, and a holder that
//! interns what it decodes (the engine's view, see [`Interner`]) keeps each distinct value once.
//! It reads, compares, orders, hashes and serialises exactly like the string it holds.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Text(Arc<str>);

impl Text {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether both are one allocation (what interning achieves), not merely equal.
    pub fn shares(&self, other: &Text) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Default for Text {
    fn default() -> Self {
        Text(Arc::from(""))
    }
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Text(Arc::from(s))
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text(Arc::from(s))
    }
}

impl From<&String> for Text {
    fn from(s: &String) -> Self {
        Text(Arc::from(s.as_str()))
    }
}

impl From<Text> for String {
    fn from(t: Text) -> String {
        t.0.to_string()
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        &*self.0 == other.as_str()
    }
}

impl PartialEq<Text> for String {
    fn eq(&self, other: &Text) -> bool {
        self.as_str() == &*other.0
    }
}

impl PartialEq<Text> for str {
    fn eq(&self, other: &Text) -> bool {
        self == &*other.0
    }
}

impl PartialEq<Text> for &str {
    fn eq(&self, other: &Text) -> bool {
        *self == &*other.0
    }
}

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Straight from the input's text into the `Arc` (a `String` or `Cow` first would copy
        // every field twice: a snapshot of a million units decodes millions of them).
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Text, E> {
                Ok(Text::from(s))
            }
        }
        d.deserialize_str(Visit)
    }
}

/// Keeps one copy of each distinct [`Text`] it is shown, so equal values decoded apart share
/// one allocation.
///
/// Values nobody else holds any more are dropped whenever the set has doubled since it was last
/// trimmed, so a stream of ever-new values (states an agent makes up, bodies replaced) costs at
/// most twice what is in use, and trimming costs O(1) per value interned.
#[derive(Debug, Default, Clone)]
pub struct Interner {
    known: HashSet<Text>,
    trim_at: usize,
}

/// Below this many values the set is never trimmed.
const TRIM_FLOOR: usize = 1024;

impl Interner {
    /// Replaces `t` with the copy already known, or makes it the known copy.
    pub fn intern(&mut self, t: &mut Text) {
        match self.known.get(t.as_str()) {
            Some(known) => {
                if !Arc::ptr_eq(&known.0, &t.0) {
                    *t = known.clone();
                }
            }
            None => {
                if self.known.len() >= self.trim_at.max(TRIM_FLOOR) {
                    // Only this set holds them: nothing refers to those values any more.
                    self.known.retain(|k| Arc::strong_count(&k.0) > 1);
                    self.trim_at = self.known.len() * 2;
                }
                self.known.insert(t.clone());
            }
        }
    }

    /// The known copy of `s`, made the known copy if there was none (allocating only then).
    pub fn text(&mut self, s: &str) -> Text {
        match self.known.get(s) {
            Some(known) => known.clone(),
            None => {
                let mut t = Text::from(s);
                self.intern(&mut t);
                t
            }
        }
    }

    /// How many distinct values are kept.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_compares_and_serialises_as_its_string() {
        let t = Text::from("loaded");
        assert_eq!(t, "loaded");
        assert_eq!("loaded".to_string(), t);
        assert_eq!(t.len(), 6);
        assert_eq!(format!("{t} {t:?}"), "loaded \"loaded\"");
        assert_eq!(serde_json::to_string(&t).ok(), Some("\"loaded\"".into()));
        let back: Text = serde_json::from_str("\"a\\\"b\"").expect("json");
        assert_eq!(back, "a\"b");
        let plain: Text = serde_json::from_slice(b"\"active\"").expect("json");
        assert_eq!(plain, "active");
        assert!(serde_json::from_str::<Text>("7").is_err(), "not a string");
        let (a, b) = (Text::from("a"), Text::from("b"));
        assert!(a < b);
    }

    #[test]
    fn interning_shares_equal_values_and_lets_unused_ones_go() {
        let mut pool = Interner::default();
        let mut a = Text::from("h1");
        let mut b = Text::from(String::from("h1"));
        assert!(!Arc::ptr_eq(&a.0, &b.0));
        pool.intern(&mut a);
        pool.intern(&mut b);
        assert!(Arc::ptr_eq(&a.0, &b.0), "equal values decoded apart share one copy");
        // Values interned and then dropped by everyone else go once the set has doubled.
        for i in 0..(TRIM_FLOOR * 3) {
            let mut t = Text::from(format!("gone{i}"));
            pool.intern(&mut t);
        }
        assert!(pool.len() < TRIM_FLOOR * 2, "{} values kept", pool.len());
        let mut c = Text::from("h1");
        pool.intern(&mut c);
        assert!(Arc::ptr_eq(&a.0, &c.0), "a value still held survives trimming");
        assert!(Arc::ptr_eq(&a.0, &pool.text("h1").0));
    }
}
