//! Property-based tests of the API from its OpenAPI document: schemathesis (from PyPI) generates
//! requests for every operation, valid and not, against an engine of its own (own key prefix,
//! no machines, so nothing it submits ever runs) and fails on any 5xx or any answer slower than
//! 10 s. The run is bounded (`FLEET_SCHEMATHESIS_SECS`, default 60).

use fleet_integration::testkit;
use fleet_integration::{lab_dir, pki, process};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The pinned schemathesis, in a virtualenv of its own outside the repository.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";

struct Engine(u32);
impl Drop for Engine {
    fn drop(&mut self) {
        process::stop(self.0, "fleet-engine", Duration::from_secs(5));
    }
}

fn venv() -> PathBuf {
    std::env::var_os("FLEET_SCHEMATHESIS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/fleet-lab-schemathesis"))
}

/// The `st` command, installed on first use.
fn schemathesis() -> Result<PathBuf, String> {
    let dir = venv();
    let st = dir.join("bin/st");
    let pinned = dir.join(".pinned");
    if st.exists() && std::fs::read_to_string(&pinned).is_ok_and(|p| p == SCHEMATHESIS) {
        return Ok(st);
    }
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir))?;
    run(Command::new(dir.join("bin/pip")).args(["install", "--quiet", "--disable-pip-version-check", SCHEMATHESIS]))?;
    std::fs::write(&pinned, SCHEMATHESIS).map_err(|e| e.to_string())?;
    Ok(st)
}

#[tokio::test]
async fn generated_requests_never_get_a_server_error_or_hang() {
    let Some(lab) = testkit::lab() else { return };
    let st = match schemathesis() {
        Ok(st) => st,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("cannot install schemathesis: {e}"),
        Err(e) => {
            eprintln!("skipped: cannot install schemathesis: {e}");
            return;
        }
    };
    let port = 12588;
    let prefix = testkit::unique_prefix("schemathesis");
    let mut cmd = Command::new(lab.bin_dir.join("fleet-engine"));
    cmd.args(lab.engine_base_args())
        .args(["--etcd-prefix", &prefix, "--engine-id", "t-schemathesis"])
        .args(["--listen", &lab_dir().join("t-schemathesis.sock").display().to_string()])
        .args(["--listen-tls", &format!("127.0.0.1:{port}")])
        .args(["--audit-log", &lab_dir().join("t-schemathesis.audit.log").display().to_string()]);
    let _engine = Engine(process::spawn_logged(cmd, &lab_dir().join("t-schemathesis.log")).expect("engine starts"));
    let url = format!("https://127.0.0.1:{port}");
    let http = testkit::http();
    testkit::wait_for("engine API", Duration::from_secs(30), || async {
        http.get(format!("{url}/fleet/v1/units")).send().await.ok().filter(|r| r.status().is_success())
    })
    .await
    .expect("engine serves");

    let secs: u64 = std::env::var("FLEET_SCHEMATHESIS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let token = pki::token("admin").expect("admin token");
    let ca = pki::identity("admin").ca_file;
    let report = lab_dir().join("schemathesis");
    let out = Command::new("timeout")
        .arg((secs + 120).to_string())
        .arg(&st)
        .arg("run")
        .arg(&spec)
        .args(["--url", &url, "--header", &format!("Authorization: Bearer {token}")])
        .arg("--tls-verify")
        .arg(&ca)
        .args(["--checks", "not_a_server_error", "--max-response-time", "10", "--request-timeout", "10"])
        // A stream that never ends by design; the lab's events test covers it.
        .args(["--exclude-path", "/fleet/v1/events/stream"])
        .args(["--max-examples", "20", "--max-time", &secs.to_string(), "--workers", "1"])
        .arg("--report-dir")
        .arg(&report)
        .current_dir(lab_dir())
        .output()
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tail: Vec<&str> = stdout.lines().rev().take(60).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    assert!(
        out.status.success(),
        "schemathesis found failures (exit {:?}):\n{}\n{}",
        out.status.code(),
        tail.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("passed"), "schemathesis ran no test case:\n{}", tail.join("\n"));
}
