//! A machine joins the lab's cluster by token, as docs/install.md tells a user to: an admin makes
//! a token with fleetctl; on a machine with nothing of the cluster (an empty /etc/fleet, the agent
//! installed but not started) `fleet-agent join` checks the engine's CA against the pin, gets its
//! certificate and etcd user from the engine, writes its configuration and starts its agent; the
//! machine then runs a unit placed there by its metadata. The misuses a user can make are refused
//! on the machine with the engine's words and leave nothing behind: a wrong CA hash, a forged
//! token, a used-up token, a revoked one.

use fleet_integration::testkit::{self, fleetctl, text};
use fleet_integration::{boot_machine, stop_machine, MachineSpec, HOST_IP};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

struct Stop(fleet_integration::MachineProc);
impl Drop for Stop {
    fn drop(&mut self) {
        stop_machine(&self.0, Duration::from_secs(10));
    }
}

/// Runs a command inside the machine (all its namespaces).
fn inside(m: &fleet_integration::MachineProc, args: &[&str]) -> std::process::Output {
    let init = fleet_integration::process::children(m.pid).first().copied().expect("the machine's init");
    let mut cmd = Command::new("nsenter");
    cmd.args(["-t", &init.to_string(), "-a"]).args(args);
    testkit::output_within(cmd, Duration::from_secs(120)).expect("nsenter runs")
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in walk(dir) {
        out.push(entry.strip_prefix(dir).map(|p| p.display().to_string()).unwrap_or_default());
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn a_machine_joins_by_token_runs_units_and_misuse_is_refused() {
    let Some(lab) = testkit::lab() else { return };
    let Some(api) = lab.api_url().map(str::to_string) else { return };
    let run = |args: &[&str]| {
        let out = fleetctl(&lab, &api, args).expect("fleetctl runs");
        let (o, e) = text(&out);
        assert_eq!(out.status.code(), Some(0), "fleetctl {args:?}:\n{o}\n{e}");
        (o, e)
    };
    // Engines are reached from the machines on the bridge.
    let port = api.rsplit(':').next().expect("port").to_string();
    let engine = format!("https://{HOST_IP}:{port}");

    let role = format!("joined-{}", std::process::id());
    let (made, _) = run(&["-o", "json", "join-token", "create", "--ttl", "10m", "--metadata", &format!("role={role}")]);
    let made: serde_json::Value = serde_json::from_str(&made).expect("json");
    let token = made["token"].as_str().expect("token").to_string();
    let ca_hash = made["caHash"].as_str().expect("caHash").to_string();
    let id = made["info"]["id"].as_str().expect("id").to_string();
    // The plain output prints the command to run on the machine.
    let (_, said) = run(&["join-token", "create", "--ttl", "1m", "--description", "printed"]);
    assert!(said.contains("fleet-agent join --engine") && said.contains("--ca-hash sha256:"), "{said}");

    let mut spec = MachineSpec::numbered(9);
    spec.name = "fl-j1".into();
    spec.ip = "10.231.90.219".into();
    spec.machine_id = fleet_integration::machine_id_for("fl-j1", std::process::id());
    spec.etcd_endpoints = Vec::new();
    spec.metadata = Vec::new();
    spec.joining = true;
    let unit_file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../agent/fleet-agent.service"))
        .expect("agent unit file");
    let m = Stop(boot_machine(&spec, &lab.bin_dir, &unit_file).await.expect("boot the new machine"));
    let etc = m.0.dir.join("fleet");
    // `fleet-agent join` on the machine: its exit status and everything it printed.
    let join_into = |token: &str, hash: &str, dir: &str| {
        let args = [
            "/opt/fleet/fleet-agent",
            "join",
            "--engine",
            &engine,
            "--token",
            token,
            "--ca-hash",
            hash,
            "--config-dir",
            dir,
        ];
        let out = inside(&m.0, &args);
        let (o, e) = text(&out);
        (out.status.code(), format!("{o}{e}"))
    };
    let join = |token: &str, hash: &str| join_into(token, hash, "/etc/fleet");

    // Refused, nothing written: a wrong pin (nothing is even sent), a forged secret.
    let wrong_hash = format!("sha256:{}", "ab".repeat(32));
    let (code, said) = join(&token, &wrong_hash);
    assert_ne!(code, Some(0));
    assert!(said.contains("refusing to join") && said.contains(&ca_hash), "{said}");
    let forged = format!("{id}.{}", "x".repeat(16));
    let (code, said) = join(&forged, &ca_hash);
    assert_ne!(code, Some(0));
    assert!(said.contains("no such token, or a wrong secret"), "{said}");
    assert!(files_under(&etc).is_empty(), "a refused join wrote {:?}", files_under(&etc));

    // The join.
    let (code, said) = join(&token, &ca_hash);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("joined the cluster") && said.contains("fleet-agent started"), "{said}");
    let written = files_under(&etc);
    for f in
        ["agent.d/50-join.toml", "agent.toml", "pki/ca.pem", "pki/etcd-ca.pem", "pki/machine.key", "pki/machine.pem"]
    {
        assert!(written.contains(&f.to_string()), "{f} not in {written:?}");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(etc.join("pki/machine.key")).expect("key").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the key is the machine's alone");

    // A member: listed with the token's metadata, and running what is placed there.
    let listed = testkit::wait_for("the joined machine listed", T, || async {
        let out = fleetctl(&lab, &api, &["list-machines", "--full", "--no-legend"]).ok()?;
        let (o, _) = text(&out);
        o.lines().find(|l| l.starts_with(&spec.machine_id)).map(str::to_string)
    })
    .await
    .expect("the new machine registers");
    assert!(listed.contains(&format!("role={role}")) && listed.contains(&spec.ip), "{listed}");
    let dir = testkit::scratch("join").expect("scratch");
    let unit = format!("joined-{}.service", std::process::id());
    let path = dir.join(&unit);
    std::fs::write(
        &path,
        format!("[Service]\nExecStart=/bin/sleep infinity\n\n[X-Fleet]\nMachineMetadata=role={role}\n"),
    )
    .expect("unit file");
    run(&["start", &path.display().to_string()]);
    let active = inside(&m.0, &["systemctl", "is-active", &unit]);
    assert_eq!(text(&active).0.trim(), "active", "{unit} runs on the joined machine's own systemd");

    // The token is used up now; another join with it is refused on the machine (in another
    // directory, so the refusal is the engine's, not "joined before").
    let (code, said) = join_into(&token, &ca_hash, "/tmp/again");
    assert_ne!(code, Some(0));
    assert!(said.contains(&format!("machine {} already joined", spec.machine_id)), "{said}");
    // A revoked token admits nobody.
    let (listed_tokens, _) = run(&["join-token", "list"]);
    assert!(
        listed_tokens.lines().any(|l| l.starts_with(&id) && l.contains(&format!("role={role}"))),
        "{listed_tokens}"
    );
    let (made2, _) = run(&["-o", "json", "join-token", "create"]);
    let made2: serde_json::Value = serde_json::from_str(&made2).expect("json");
    let (token2, id2) = (made2["token"].as_str().expect("token"), made2["info"]["id"].as_str().expect("id"));
    run(&["join-token", "revoke", id2]);
    let (code, said) = join_into(token2, &ca_hash, "/tmp/again");
    assert!(code != Some(0) && said.contains("no such token"), "{said}");
    // Every attempt is in the engine's audit log.
    let audit = std::fs::read_to_string(fleet_integration::engine_audit_log(&lab.engines[0].name)).unwrap_or_default();
    assert!(audit.contains(&format!("machine {} joined", spec.machine_id)), "no join in the audit log");
    assert!(audit.contains(&format!("join-token:{id}")) && audit.contains("refused"), "refusals not audited");

    run(&["destroy", &unit]);
    drop(m);
    let _ = std::fs::remove_dir_all(&dir);
}
