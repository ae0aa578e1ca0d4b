//! How a machine's units are grouped into a few etcd keys: pages of up to [`PAGE_UNITS`] units,
//! each a JSON object from unit name to record. Agents publish their units' states this way
//! (`states/<machine>/<page>`, [`StatePage`]) and the leader writes each machine's schedule this
//! way (`schedule/<machine>/<page>`, [`SchedulePage`]), for machines whose agent reads it.
//!
//! One key per unit made a million units a million keys that every placement and every start
//! rewrote: etcd's single apply loop, its write buffer (copied for every lease renewal) and its
//! watchers carried them and fell behind at 10,000 machines / 1,000,000 units on two cores. A
//! page holds one machine's units together, so a machine given or starting its hundred units is
//! one key written, not a hundred. A page is bounded so one changed unit never rewrites a
//! machine's whole share (and a value stays far below etcd's request size limit).
//!
//! A unit keeps its page while it stays on the machine, so a page's other units are untouched by
//! its coming and going; new units fill the lowest page with room.

use crate::{ScheduleEntry, UnitName, UnitStateRecord};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap};

/// Units per state page: about 40 KiB of JSON at most, one key for a machine of typical size.
pub const PAGE_UNITS: usize = 250;

/// Units per schedule page: about 7 KiB of JSON at most. Smaller than a state page because the
/// leader may give a machine one unit at a time (a user's `fleetctl start` of a few units into a
/// large cluster), and each time rewrites that unit's page whole; a machine of a hundred units is
/// two pages.
pub const SCHEDULE_PAGE_UNITS: usize = 64;

/// A page's contents: unit name -> record, encoded as a JSON object.
pub type Page<R> = BTreeMap<String, R>;

/// A page of one machine's unit states, as its agent publishes them.
pub type StatePage = Page<UnitStateRecord>;

/// A page of one machine's schedule, as the leader writes it.
pub type SchedulePage = Page<ScheduleEntry>;

/// What one agent has published, page by page.
pub type StatePages = Pages<UnitStateRecord>;

/// One machine's schedule as the leader writes it, page by page.
pub type SchedulePages = Pages<ScheduleEntry>;

/// One machine's pages as written, and which page each unit is in.
#[derive(Debug, Clone)]
pub struct Pages<R> {
    pages: BTreeMap<u32, Page<R>>,
    page_of: HashMap<String, u32>,
    /// Units per page at most.
    limit: usize,
}

impl<R> Default for Pages<R> {
    fn default() -> Self {
        Pages { pages: BTreeMap::new(), page_of: HashMap::new(), limit: PAGE_UNITS }
    }
}

impl<R: Clone> Pages<R> {
    /// Pages as read back from etcd (an earlier run's): units keep the pages they are in.
    pub fn from_pages(pages: impl IntoIterator<Item = (u32, Page<R>)>) -> Self {
        Self::from_pages_of(PAGE_UNITS, pages)
    }

    /// As [`Pages::from_pages`], new units filling pages up to `limit` units.
    pub fn from_pages_of(limit: usize, pages: impl IntoIterator<Item = (u32, Page<R>)>) -> Self {
        let mut out = Pages { limit: limit.max(1), ..Pages::default() };
        for (n, page) in pages {
            for unit in page.keys() {
                out.page_of.insert(unit.clone(), n);
            }
            out.pages.insert(n, page);
        }
        out
    }

    pub fn get(&self, unit: &str) -> Option<&R> {
        let page = self.page_of.get(unit)?;
        self.pages.get(page)?.get(unit)
    }

    pub fn contains_key(&self, unit: &str) -> bool {
        self.page_of.contains_key(unit)
    }

    pub fn len(&self) -> usize {
        self.page_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.page_of.is_empty()
    }

    pub fn units(&self) -> impl Iterator<Item = &String> {
        self.page_of.keys()
    }

    pub fn values(&self) -> impl Iterator<Item = &R> {
        self.pages.values().flat_map(|p| p.values())
    }

    /// Everything forgotten: a new lease starts with nothing published.
    pub fn clear(&mut self) {
        self.pages.clear();
        self.page_of.clear();
    }

    /// The pages `changes` rewrite (`Some`: a record to write, `None`: the unit's record removed),
    /// with their new contents; `None` for a page left empty (to delete). Nothing is changed here:
    /// once a page is written, [`StatePages::written`] records it.
    pub fn plan(&self, changes: &[(String, Option<R>)]) -> BTreeMap<u32, Option<Page<R>>> {
        let mut dirty: BTreeMap<u32, Page<R>> = BTreeMap::new();
        // How full each page will be: new units go where there is room after this plan's moves.
        let mut fill: BTreeMap<u32, usize> = self.pages.iter().map(|(n, p)| (*n, p.len())).collect();
        for (unit, _) in changes.iter().filter(|(_, s)| s.is_none()) {
            if let Some(f) = self.page_of.get(unit).and_then(|n| fill.get_mut(n)) {
                *f = f.saturating_sub(1);
            }
        }
        let mut placed: HashMap<&str, u32> = HashMap::new();
        for (unit, state) in changes {
            let page = match (self.page_of.get(unit).or_else(|| placed.get(unit.as_str())), state) {
                (Some(n), _) => *n,
                (None, None) => continue,
                (None, Some(_)) => {
                    let n = lowest_with_room(&fill, self.limit);
                    *fill.entry(n).or_default() += 1;
                    placed.insert(unit, n);
                    n
                }
            };
            let contents = dirty.entry(page).or_insert_with(|| self.pages.get(&page).cloned().unwrap_or_default());
            match state {
                Some(s) => {
                    contents.insert(unit.clone(), s.clone());
                }
                None => {
                    contents.remove(unit);
                }
            }
        }
        dirty.into_iter().map(|(n, p)| (n, if p.is_empty() { None } else { Some(p) })).collect()
    }

    /// Records that `page` now holds `contents` (`None`: deleted) in etcd.
    pub fn written(&mut self, page: u32, contents: Option<Page<R>>) {
        if let Some(old) = self.pages.remove(&page) {
            for unit in old.keys() {
                if self.page_of.get(unit) == Some(&page) {
                    self.page_of.remove(unit);
                }
            }
        }
        if let Some(p) = contents {
            for unit in p.keys() {
                self.page_of.insert(unit.clone(), page);
            }
            self.pages.insert(page, p);
        }
    }
}

/// What a reader of etcd's events makes of pages: which units' records a page's new value
/// changes or removes. Each unit's record is handed out as the raw JSON inside the page, and
/// units whose record did not change are left out, so a page rewritten for one unit costs its
/// reader one record, not a page of them.
#[derive(Debug, Default, Clone)]
pub struct PageFollower {
    /// machine -> page -> its units.
    pages: HashMap<String, BTreeMap<u32, FollowedPage>>,
}

/// A page as last seen: the revision it was written at, and its units (sorted) with a hash of
/// each one's record (after an unreadable value, the units it held before that value).
#[derive(Debug, Default, Clone)]
struct FollowedPage {
    revision: i64,
    units: Vec<(UnitName, u64)>,
}

/// One unit's record as a page changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageChange<'v> {
    /// The unit's record, as raw JSON (a [`UnitStateRecord`] or a [`ScheduleEntry`]).
    Put(UnitName, &'v [u8]),
    Removed(UnitName),
}

impl PageFollower {
    /// `machine`'s page `page` now holds `value`, written at `revision`. `share` lets the caller
    /// hand back a unit name it already holds (one allocation per name).
    ///
    /// An unreadable page changes no unit (an error says so) but is known at its new revision:
    /// the leader rewrites a page whole, guarded by the revision it last saw, and a guard on the
    /// revision before the unreadable value would refuse every write to that page — and every
    /// placement sharing its transaction — for good. At its new revision the page's next write
    /// replaces the unreadable value with what the view holds.
    pub fn put<'v>(
        &mut self,
        machine: &str,
        page: u32,
        revision: i64,
        value: &'v [u8],
        share: impl Fn(UnitName) -> UnitName,
    ) -> Result<Vec<PageChange<'v>>, serde_json::Error> {
        let followed = self.pages.entry(machine.to_string()).or_default();
        let records: BTreeMap<std::borrow::Cow<'v, str>, &'v RawValue> = match serde_json::from_slice(value) {
            Ok(r) => r,
            Err(e) => {
                followed.entry(page).or_default().revision = revision;
                return Err(e);
            }
        };
        let old = followed.remove(&page).unwrap_or_default().units;
        let mut changes = Vec::new();
        let mut now = Vec::with_capacity(records.len());
        let mut old_iter = old.into_iter().peekable();
        for (name, raw) in records {
            // Both sides are sorted by name: one merge finds what is new, changed and gone.
            while let Some((gone, _)) = old_iter.next_if(|(o, _)| o.as_str() < name.as_ref()) {
                changes.push(PageChange::Removed(gone));
            }
            let hash = hash_of(raw.get().as_bytes());
            let unit = match old_iter.next_if(|(o, _)| o.as_str() == name.as_ref()) {
                Some((unit, h)) if h == hash => {
                    now.push((unit, hash));
                    continue;
                }
                Some((unit, _)) => unit,
                None => match UnitName::parse(&name) {
                    Ok(u) => share(u),
                    Err(_) => continue,
                },
            };
            changes.push(PageChange::Put(unit.clone(), raw.get().as_bytes()));
            now.push((unit, hash));
        }
        changes.extend(old_iter.map(|(gone, _)| PageChange::Removed(gone)));
        // Kept even with no units (`{}`, or only names that do not parse: neither is written by
        // fleet): the page exists at this revision, and a write of it must be guarded so.
        followed.insert(page, FollowedPage { revision, units: now });
        Ok(changes)
    }

    /// `machine`'s page `page` was deleted (by its agent, or with its lease).
    pub fn delete(&mut self, machine: &str, page: u32) -> Vec<PageChange<'static>> {
        let old = self.pages.get_mut(machine).and_then(|p| p.remove(&page)).unwrap_or_default();
        self.forget_empty(machine);
        old.units.into_iter().map(|(u, _)| PageChange::Removed(u)).collect()
    }

    /// `machine`'s pages: number, the revision it was last written at, and its units (sorted;
    /// after an unreadable value, those it held before).
    pub fn pages_of(&self, machine: &str) -> impl Iterator<Item = (u32, i64, impl Iterator<Item = &UnitName>)> {
        self.pages.get(machine).into_iter().flatten().map(|(n, p)| (*n, p.revision, p.units.iter().map(|(u, _)| u)))
    }

    /// How many units `machine`'s pages hold.
    pub fn units_on(&self, machine: &str) -> usize {
        self.pages.get(machine).map_or(0, |p| p.values().map(|p| p.units.len()).sum())
    }

    /// Whether one of `machine`'s pages holds `unit` (so an older per-unit key's deletion is
    /// an agent moving it into a page, not the unit's state going).
    pub fn holds(&self, machine: &str, unit: &str) -> bool {
        self.pages
            .get(machine)
            .is_some_and(|p| p.values().any(|p| p.units.binary_search_by(|(u, _)| u.as_str().cmp(unit)).is_ok()))
    }

    fn forget_empty(&mut self, machine: &str) {
        if self.pages.get(machine).is_some_and(|p| p.is_empty()) {
            self.pages.remove(machine);
        }
    }
}

fn hash_of(bytes: &[u8]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(bytes)
}

fn lowest_with_room(fill: &BTreeMap<u32, usize>, limit: usize) -> u32 {
    let mut n = 0;
    loop {
        match fill.get(&n) {
            Some(f) if *f >= limit => n += 1,
            _ => return n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DesiredState;

    fn state(active: &str) -> UnitStateRecord {
        UnitStateRecord {
            hash: "h".into(),
            load_state: "loaded".into(),
            active_state: active.into(),
            sub_state: "running".into(),
            applied: DesiredState::Launched,
            health: None,
        }
    }

    fn write_all(p: &mut StatePages, plan: BTreeMap<u32, Option<StatePage>>) {
        for (n, c) in plan {
            p.written(n, c);
        }
    }

    #[test]
    fn a_machines_units_share_pages_of_bounded_size() {
        let mut p = StatePages::default();
        let changes: Vec<_> =
            (0..PAGE_UNITS * 2 + 3).map(|i| (format!("u{i}.service"), Some(state("active")))).collect();
        let plan = p.plan(&changes);
        assert_eq!(plan.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2], "three pages for {} units", changes.len());
        assert!(plan.values().all(|c| c.as_ref().is_some_and(|c| c.len() <= PAGE_UNITS)));
        write_all(&mut p, plan);
        assert_eq!(p.len(), changes.len());
        assert_eq!(p.get("u7.service").map(|s| s.active_state.as_str()), Some("active"));

        // One unit changing rewrites its page only, with the page's other units as they were.
        let plan = p.plan(&[("u7.service".into(), Some(state("failed")))]);
        assert_eq!(plan.len(), 1);
        let (n, c) = plan.iter().next().map(|(n, c)| (*n, c.clone())).unwrap_or_default();
        assert_eq!(n, 0);
        let c = c.unwrap_or_default();
        assert_eq!(c.len(), PAGE_UNITS);
        assert_eq!(c.get("u7.service").map(|s| s.active_state.as_str()), Some("failed"));
        write_all(&mut p, plan);
    }

    #[test]
    fn units_leaving_free_room_and_an_empty_page_is_deleted() {
        let mut p = StatePages::default();
        let changes: Vec<_> = (0..PAGE_UNITS + 1).map(|i| (format!("u{i}.service"), Some(state("active")))).collect();
        let plan = p.plan(&changes);
        write_all(&mut p, plan);
        // The one unit on page 1 leaves: page 1 is deleted.
        let last = format!("u{PAGE_UNITS}.service");
        let plan = p.plan(&[(last.clone(), None)]);
        assert_eq!(plan.get(&1), Some(&None));
        write_all(&mut p, plan);
        assert!(!p.contains_key(&last));
        // A unit of page 0 leaves, a new one comes: it takes the room on page 0, nothing else moves.
        let plan = p.plan(&[("u3.service".into(), None), ("new.service".into(), Some(state("active")))]);
        assert_eq!(plan.keys().copied().collect::<Vec<_>>(), vec![0]);
        write_all(&mut p, plan);
        assert!(p.get("new.service").is_some() && p.get("u3.service").is_none());
        assert_eq!(p.len(), PAGE_UNITS);
        // Removing what was never published writes nothing.
        assert!(p.plan(&[("never.service".into(), None)]).is_empty());
    }

    fn changes(c: Vec<PageChange<'_>>) -> Vec<(String, Option<String>)> {
        c.into_iter()
            .map(|c| match c {
                PageChange::Put(u, raw) => {
                    let s: UnitStateRecord = serde_json::from_slice(raw).unwrap_or_default();
                    (u.to_string(), Some(s.active_state.to_string()))
                }
                PageChange::Removed(u) => (u.to_string(), None),
            })
            .collect()
    }

    #[test]
    fn a_reader_sees_only_the_units_a_page_changed() {
        let page = |units: &[(&str, &str)]| {
            let p: StatePage = units.iter().map(|(u, a)| (u.to_string(), state(a))).collect();
            serde_json::to_vec(&p).unwrap_or_default()
        };
        let mut f = PageFollower::default();
        let v = page(&[("a.service", "active"), ("b\\x2d1.service", "activating"), ("c.service", "active")]);
        let c = changes(f.put("m1", 0, 7, &v, |u| u).unwrap_or_default());
        assert_eq!(c.len(), 3, "{c:?}");
        assert!(f.holds("m1", "b\\x2d1.service") && !f.holds("m2", "a.service"));
        // b changes, c goes, d comes; a is as it was.
        let v = page(&[("a.service", "active"), ("b\\x2d1.service", "active"), ("d.service", "failed")]);
        let c = changes(f.put("m1", 0, 7, &v, |u| u).unwrap_or_default());
        assert_eq!(
            c,
            vec![
                ("b\\x2d1.service".to_string(), Some("active".to_string())),
                ("c.service".to_string(), None),
                ("d.service".to_string(), Some("failed".to_string())),
            ]
        );
        assert!(!f.holds("m1", "c.service"));
        // Unreadable: an error, what the page held is kept, and the page is known at the
        // revision of the unreadable value (a page written whole is guarded by it).
        assert!(f.put("m1", 0, 8, b"{not json", |u| u).is_err());
        assert!(f.holds("m1", "a.service"));
        let revisions = |f: &PageFollower, m| f.pages_of(m).map(|(n, r, _)| (n, r)).collect::<Vec<_>>();
        assert_eq!(revisions(&f, "m1"), vec![(0, 8)]);
        // Also a page not seen before: known, holding nothing.
        assert!(f.put("m1", 3, 9, b"[]", |u| u).is_err());
        assert_eq!(revisions(&f, "m1"), vec![(0, 8), (3, 9)]);
        assert_eq!(f.pages_of("m1").map(|(_, _, u)| u.count()).sum::<usize>(), 3);
        // A readable page holding no unit fleet can name is known at its revision too.
        assert_eq!(changes(f.put("m1", 4, 10, br#"{"not a unit name":{}}"#, |u| u).unwrap_or_default()), vec![]);
        assert_eq!(revisions(&f, "m1"), vec![(0, 8), (3, 9), (4, 10)]);
        f.delete("m1", 3);
        f.delete("m1", 4);
        // Deleted with its lease: every unit it held is removed.
        let c = changes(f.delete("m1", 0));
        assert_eq!(c.iter().filter(|(_, s)| s.is_none()).count(), 3);
        assert!(!f.holds("m1", "a.service"));
        assert!(f.delete("m1", 0).is_empty());
    }

    #[test]
    fn schedule_pages_are_smaller() {
        let p: Pages<UnitStateRecord> = Pages::from_pages_of(SCHEDULE_PAGE_UNITS, []);
        let changes: Vec<_> = (0..100).map(|i| (format!("u{i}.service"), Some(state("active")))).collect();
        let plan = p.plan(&changes);
        let sizes: Vec<usize> = plan.values().map(|c| c.as_ref().map_or(0, |c| c.len())).collect();
        assert_eq!(sizes, vec![SCHEDULE_PAGE_UNITS, 100 - SCHEDULE_PAGE_UNITS]);
    }

    #[test]
    fn pages_read_back_keep_their_units_where_they_are() {
        let page: StatePage = [("a.service".to_string(), state("active"))].into_iter().collect();
        let p = StatePages::from_pages([(4, page)]);
        let plan = p.plan(&[("a.service".into(), Some(state("failed")))]);
        assert_eq!(plan.keys().copied().collect::<Vec<_>>(), vec![4]);
        assert_eq!(p.values().count(), 1);
    }
}
