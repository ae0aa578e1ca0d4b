//! fleetctl is a REST client: it must not compile etcd's client or gRPC (nor need protoc to
//! build). Read from Cargo.lock, so a dependency that drags them in fails here, not in a review.

use std::collections::{BTreeMap, BTreeSet};

#[test]
fn fleetctl_depends_on_no_etcd_client_and_no_grpc() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).expect("Cargo.lock");
    let lock: toml::Value = toml::from_str(&lock).expect("Cargo.lock parses");
    // name -> names it depends on (every version of a name merged: a superset, which is safe here).
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in lock.get("package").and_then(|p| p.as_array()).expect("packages") {
        let name = p.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_string();
        let of = p.get("dependencies").and_then(|d| d.as_array()).cloned().unwrap_or_default();
        let entry = deps.entry(name).or_default();
        for d in of {
            if let Some(d) = d.as_str() {
                entry.insert(d.split(' ').next().unwrap_or(d).to_string());
            }
        }
    }
    let mut seen = BTreeSet::new();
    let mut queue = vec!["fleetctl".to_string()];
    while let Some(name) = queue.pop() {
        if seen.insert(name.clone()) {
            queue.extend(deps.get(&name).into_iter().flatten().cloned());
        }
    }
    assert!(seen.contains("fleet-model"), "the walk did not find fleetctl's own dependencies: {seen:?}");
    for banned in ["etcd-client", "tonic", "prost", "fleet-store"] {
        assert!(!seen.contains(banned), "fleetctl depends on {banned}");
    }
}
