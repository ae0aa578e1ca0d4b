//! The engine's modules form layers: no two import each other (directly), so each can be read,
//! tested and replaced from the bottom up (http → auth → api → fleetlock/batch → routes). This
//! reads the sources as they are; a `use crate::x` (or `crate::x::` path) counts as an import,
//! test modules excluded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules it names, from every file under `src/`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).expect("under src");
            let top = rel.components().next().and_then(|c| c.as_os_str().to_str()).unwrap_or_default();
            let top = top.trim_end_matches(".rs").to_string();
            let text = std::fs::read_to_string(&path).expect("read source");
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let named = out.entry(top.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String =
                    code[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() && name != top {
                    named.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn no_two_modules_import_each_other() {
    let graph = imports();
    assert!(graph.contains_key("api") && graph.contains_key("http"), "read the engine's modules: {graph:?}");
    let mut circles = Vec::new();
    for (a, names) in &graph {
        for b in names {
            if a < b && graph.get(b).is_some_and(|n| n.contains(a)) {
                circles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(circles.is_empty(), "modules importing each other: {circles:?}");
}

#[test]
fn the_http_layer_imports_nothing_of_the_engine() {
    let graph = imports();
    assert_eq!(graph.get("http"), Some(&BTreeSet::new()), "http.rs is the bottom layer");
}
