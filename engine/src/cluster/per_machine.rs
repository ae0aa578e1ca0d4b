//! A unit's entries per machine (its schedule entries, its states), as a small sorted vector.
//!
//! Nearly every unit has one entry (a global unit has one per machine). A `BTreeMap` allocates a
//! node of eleven slots even for one entry: at a million units its schedule and states maps took
//! ~2 KiB a unit, most of the engine's memory, twice in a leader (its view and its planning
//! copy). This keeps exactly the entries it holds, in machine order, with the part of
//! `BTreeMap`'s interface the engine uses.

use fleet_model::Text;

/// Entries by machine id, sorted, holding no spare capacity. Machine ids are [`Text`], which the
/// view interns: a million entries on 10,000 machines hold 10,000 ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerMachine<T> {
    entries: Vec<(Text, T)>,
}

impl<T> Default for PerMachine<T> {
    fn default() -> Self {
        PerMachine { entries: Vec::new() }
    }
}

impl<T> PerMachine<T> {
    fn find(&self, machine: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(m, _)| m.as_str().cmp(machine))
    }

    pub fn get(&self, machine: &str) -> Option<&T> {
        self.find(machine).ok().map(|i| &self.entries[i].1)
    }

    pub fn get_mut(&mut self, machine: &str) -> Option<&mut T> {
        self.find(machine).ok().map(|i| &mut self.entries[i].1)
    }

    pub fn contains_key(&self, machine: &str) -> bool {
        self.find(machine).is_ok()
    }

    /// Sets `machine`'s entry; the one it replaced, if any.
    pub fn insert(&mut self, machine: impl Into<Text>, value: T) -> Option<T> {
        let machine = machine.into();
        match self.find(&machine) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                // Exactly one more slot: a vector's own growth would reserve four.
                self.entries.reserve_exact(1);
                self.entries.insert(i, (machine, value));
                None
            }
        }
    }

    pub fn remove(&mut self, machine: &str) -> Option<T> {
        let i = self.find(machine).ok()?;
        let (_, v) = self.entries.remove(i);
        self.entries.shrink_to_fit();
        Some(v)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&Text, &mut T) -> bool) {
        self.entries.retain_mut(|(m, v)| keep(m, v));
        self.entries.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&Text, &T)> + ExactSizeIterator {
        self.entries.iter().map(|(m, v)| (m, v))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &Text> + ExactSizeIterator {
        self.entries.iter().map(|(m, _)| m)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &T> + ExactSizeIterator {
        self.entries.iter().map(|(_, v)| v)
    }

    pub fn first_key_value(&self) -> Option<(&Text, &T)> {
        self.entries.first().map(|(m, v)| (m, v))
    }
}

impl<'a, T> IntoIterator for &'a PerMachine<T> {
    type Item = (&'a Text, &'a T);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (Text, T)>, fn(&'a (Text, T)) -> (&'a Text, &'a T)>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(m, v)| (m, v))
    }
}

impl<M: Into<Text>, T> FromIterator<(M, T)> for PerMachine<T> {
    fn from_iter<I: IntoIterator<Item = (M, T)>>(iter: I) -> Self {
        let mut out = PerMachine::default();
        for (m, v) in iter {
            out.insert(m, v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_machine_order_and_exact_capacity() {
        let mut p = PerMachine::default();
        assert_eq!(p.insert("m2".to_string(), 2), None);
        assert_eq!(p.insert("m1".to_string(), 1), None);
        assert_eq!(p.insert("m3".to_string(), 3), None);
        assert_eq!(p.insert("m2".to_string(), 20), Some(2));
        assert_eq!(p.keys().map(Text::as_str).collect::<Vec<_>>(), ["m1", "m2", "m3"]);
        assert_eq!(p.get("m2"), Some(&20));
        assert_eq!(p.entries.capacity(), 3);
        assert_eq!(p.remove("m1"), Some(1));
        assert_eq!(p.remove("m1"), None);
        assert!(!p.contains_key("m1") && p.contains_key("m3"));
        p.retain(|m, _| m == "m3");
        assert_eq!(p.iter().collect::<Vec<_>>(), [(&Text::from("m3"), &3)]);
        assert_eq!(p.entries.capacity(), 1);
    }
}

/// A set of machine ids, sorted, holding no spare capacity: where a unit is placed during a
/// planning pass (a `BTreeSet` of one id allocated a node of eleven slots for each of a million
/// units).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineSet {
    ids: Vec<String>,
}

impl MachineSet {
    pub fn of(machine: &str) -> MachineSet {
        MachineSet { ids: vec![machine.to_string()] }
    }

    pub fn contains(&self, machine: &str) -> bool {
        self.ids.binary_search_by(|m| m.as_str().cmp(machine)).is_ok()
    }

    /// Adds `machine`; whether it was not there.
    pub fn insert(&mut self, machine: &str) -> bool {
        match self.ids.binary_search_by(|m| m.as_str().cmp(machine)) {
            Ok(_) => false,
            Err(i) => {
                self.ids.reserve_exact(1);
                self.ids.insert(i, machine.to_string());
                true
            }
        }
    }

    /// Removes `machine`; whether it was there.
    pub fn remove(&mut self, machine: &str) -> bool {
        match self.ids.binary_search_by(|m| m.as_str().cmp(machine)) {
            Ok(i) => {
                self.ids.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, String> {
        self.ids.iter()
    }
}

impl<'a> IntoIterator for &'a MachineSet {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.ids.iter()
    }
}

#[cfg(test)]
mod set_tests {
    use super::*;

    #[test]
    fn a_machine_set_is_sorted_and_exact() {
        let mut s = MachineSet::of("m2");
        assert!(s.insert("m1") && !s.insert("m2") && s.insert("m3"));
        assert_eq!(s.iter().map(String::as_str).collect::<Vec<_>>(), ["m1", "m2", "m3"]);
        assert!(s.contains("m3") && !s.contains("m4"));
        assert!(s.remove("m2") && !s.remove("m2"));
        assert_eq!(s.len(), 2);
        assert_eq!(s.ids.capacity(), 3);
    }
}
