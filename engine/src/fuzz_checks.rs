//! The properties the fuzz targets (`engine/fuzz`, run by `./lab fuzz`) check on arbitrary
//! input. They live here, not in the fuzz crate, so that every input the fuzzer ever found
//! worth keeping (`engine/fuzz/regressions/<target>/`) is replayed by the ordinary test suite:
//! a crash found becomes a test by copying its artifact there.
//!
//! Each check panics when the property does not hold; an `Err` for bad input is fine.

use crate::api::{self, ApiError};
use fleet_model::{UnitFile, UnitName};
use std::path::{Component, Path};

/// The unit-file parser: never panics; what it accepts prints canonically and reads back the same.
pub fn unit_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(file) = UnitFile::parse(text) else { return };
    let canonical = file.canonical();
    match UnitFile::parse(&canonical) {
        Ok(again) => {
            assert_eq!(again.canonical(), canonical, "canonical form is not stable");
            assert_eq!(again.hash(), file.hash(), "hash changed through the canonical form");
        }
        Err(e) => panic!("the canonical form of an accepted file is refused: {e}"),
    }
}

/// Unit names: never panics; an accepted name stays inside the units directory as one plain
/// file name (no separator, NUL, dot-dot or non-ASCII).
pub fn unit_name(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(name) = UnitName::parse(text) else { return };
    let s = name.as_str();
    assert!(s.is_ascii() && !s.contains(['/', '\0']) && s != "." && s != "..", "accepted {s:?}");
    let dir = Path::new("/run/fleet/units");
    let path = dir.join(s);
    assert_eq!(path.parent(), Some(dir), "{s:?} leaves the units directory");
    assert!(matches!(path.components().next_back(), Some(Component::Normal(_))), "{s:?}");
    if let Some(instance) = name.instance() {
        assert!(!instance.contains('/'), "instance of {s:?}");
    }
}

fn bad_request(e: &ApiError) {
    assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{}", e.message());
    assert!(!e.message().is_empty(), "an error without a message");
}

/// `PUT /units/{name}`: the first line is the URL's name, the rest the body. Never panics; bad
/// input is a 400 with a message; what is accepted is within the limits.
pub fn api_put_unit(data: &[u8]) {
    let (name, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let name = String::from_utf8_lossy(name);
    match api::parse_put_unit(&name, body) {
        Ok(req) => {
            unit_name(req.name.as_str().as_bytes());
            if let Some((file, _)) = req.file {
                assert!(file.canonical().len() <= api::MAX_UNIT_FILE_BYTES + 4 * api::MAX_UNIT_OPTIONS + 64);
                unit_file(file.canonical().as_bytes());
            }
        }
        Err(e) => bad_request(&e),
    }
}

/// `POST /units`: never panics; bad input is a 400 with a message; what is accepted is within
/// the limits, with no name twice.
pub fn api_create_units(data: &[u8]) {
    match api::parse_create_units(data) {
        Ok(api::NewUnits { units, .. }) => {
            assert!(!units.is_empty() && units.len() <= api::MAX_UNITS_PER_REQUEST);
            let names: std::collections::BTreeSet<_> = units.iter().map(|(r, _, _)| r.name.clone()).collect();
            assert_eq!(names.len(), units.len(), "a name twice");
        }
        Err(e) => bad_request(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays every kept input of every target (seeds and crashes found).
    #[test]
    fn fuzz_regressions_replay() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
        type Check = fn(&[u8]);
        let targets: [(&str, Check); 4] = [
            ("unit_file", unit_file),
            ("unit_name", unit_name),
            ("api_put_unit", api_put_unit),
            ("api_create_units", api_create_units),
        ];
        let mut replayed = 0;
        for (target, check) in targets {
            let dir = root.join(target);
            let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            for entry in entries.flatten() {
                let data = std::fs::read(entry.path()).unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
                check(&data);
                replayed += 1;
            }
        }
        assert!(replayed >= 8, "only {replayed} kept inputs");
    }

    #[test]
    fn checks_catch_what_they_are_for() {
        // The name check refuses what would escape, if the parser ever let it through.
        let escape = std::panic::catch_unwind(|| {
            let dir = Path::new("/run/fleet/units");
            assert_eq!(dir.join("../x.service").parent(), Some(dir));
        });
        assert!(escape.is_err());
        // Valid input passes every check.
        unit_file(b"[Unit]\nDescription=x\n\n[Service]\nExecStart=/bin/true\n");
        unit_name(b"web@1.service");
        api_put_unit(b"web.service\n{\"desiredState\":\"launched\",\"options\":[{\"section\":\"Service\",\"name\":\"ExecStart\",\"value\":\"/bin/true\"}]}");
    }
}
