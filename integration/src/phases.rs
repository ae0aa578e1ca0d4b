//! Which phase of `./lab test` runs each test target of the workspace, in one place.
//!
//! `./lab test` takes the first lab's targets from here (`fleet-lab phases --lab-args`) and
//! checks with `fleet-lab phases --check` that every test executable cargo builds belongs to
//! exactly one phase, counting its tests with the executable's own `--list`: a test target
//! added in a way the script did not foresee (a `[[test]]` with a path of its own, a new crate)
//! fails the run instead of never running.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::process::Command;

/// The crate whose tests need a lab.
const LAB_CRATE: &str = "fleet-integration";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Every other crate's tests: they need nothing (`cargo test --workspace --exclude ...`).
    Units,
    /// The lab crate's library, binaries and scenario targets, on the first lab.
    Lab,
    /// `faults`, on a lab of its own (3 etcd members, 2 engines).
    Faults,
    /// `image_rollout`, on a lab of image machines.
    Image,
    /// `provision`, on a lab of image machines made from their provisioning configs.
    Provision,
    /// `packages` and `install`: the Debian packages `./lab package` built, installed into fresh
    /// Debian trees and machines (docs/install.md run as written).
    Packages,
}

/// The phase of one test target: by crate, kind and name.
pub fn phase_of(package: &str, kind: &str, name: &str) -> Phase {
    match (package == LAB_CRATE, kind, name) {
        (false, _, _) => Phase::Units,
        (true, "test", "faults") => Phase::Faults,
        (true, "test", "image_rollout") => Phase::Image,
        (true, "test", "provision") => Phase::Provision,
        (true, "test", "packages" | "install") => Phase::Packages,
        (true, _, _) => Phase::Lab,
    }
}

/// One test executable cargo built.
#[derive(Debug)]
struct TestExe {
    package: String,
    kind: String,
    name: String,
    path: String,
}

/// Builds (if needed) and lists every test executable of the workspace.
fn test_executables() -> Result<Vec<TestExe>> {
    let out = Command::new("cargo")
        .args(["test", "--workspace", "--no-run", "--quiet", "--message-format=json"])
        .output()
        .context("cannot run cargo")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(path) = msg["executable"].as_str() else { continue };
        // "fleet-integration 0.1.0 (path+file:///...)" or "path+file:///...#fleet-integration@0.1.0"
        let id = msg["package_id"].as_str().unwrap_or_default();
        let package = id
            .rsplit_once('#')
            .map(|(_, p)| p.split('@').next().unwrap_or(p))
            .unwrap_or_else(|| id.split(' ').next().unwrap_or(id))
            .to_string();
        exes.push(TestExe {
            package,
            kind: msg["target"]["kind"][0].as_str().unwrap_or_default().to_string(),
            name: msg["target"]["name"].as_str().unwrap_or_default().to_string(),
            path: path.to_string(),
        });
    }
    Ok(exes)
}

/// `--test NAME` for each scenario target of the first lab.
pub fn lab_args() -> Result<Vec<String>> {
    let mut args = Vec::new();
    for e in test_executables()? {
        if e.package == LAB_CRATE && e.kind == "test" && phase_of(&e.package, &e.kind, &e.name) == Phase::Lab {
            args.extend(["--test".to_string(), e.name]);
        }
    }
    Ok(args)
}

/// Counts the tests of every executable by phase; fails if one has no phase the script runs.
pub fn check() -> Result<BTreeMap<Phase, (usize, usize)>> {
    let mut counts: BTreeMap<Phase, (usize, usize)> = BTreeMap::new();
    for e in test_executables()? {
        let phase = phase_of(&e.package, &e.kind, &e.name);
        // The lab crate's targets of other kinds (examples, benches) are not run by any phase.
        if e.package == LAB_CRATE && !matches!(e.kind.as_str(), "lib" | "bin" | "test") {
            bail!("{} target {} of {LAB_CRATE} runs in no phase of ./lab test", e.kind, e.name);
        }
        let out = Command::new(&e.path)
            .args(["--list", "--format", "terse"])
            .output()
            .with_context(|| format!("cannot list the tests of {}", e.path))?;
        let tests = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.ends_with(": test")).count();
        let c = counts.entry(phase).or_default();
        c.0 += 1;
        c.1 += tests;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_target_has_its_phase() {
        assert_eq!(phase_of("fleet-engine", "test", "faults"), Phase::Units);
        assert_eq!(phase_of(LAB_CRATE, "lib", "fleet_integration"), Phase::Lab);
        assert_eq!(phase_of(LAB_CRATE, "test", "faults"), Phase::Faults);
        assert_eq!(phase_of(LAB_CRATE, "test", "image_rollout"), Phase::Image);
        assert_eq!(phase_of(LAB_CRATE, "test", "provision"), Phase::Provision);
        assert_eq!(phase_of(LAB_CRATE, "test", "packages"), Phase::Packages);
        assert_eq!(phase_of(LAB_CRATE, "test", "install"), Phase::Packages);
        assert_eq!(phase_of(LAB_CRATE, "test", "e2e"), Phase::Lab);
    }
}
