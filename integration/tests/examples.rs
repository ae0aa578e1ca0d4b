//! The examples in `examples/` work as docs/services.md says: the template service with its
//! health check comes up healthy on the lab, and `examples/rollout.sh` rolls a new version over
//! it through fleetctl. (`examples/container.service` runs in `containers.rs`, with the lab's
//! image in place of its placeholder.)

use fleet_integration::testkit::{self, fleetctl, fleetctl_env, text, wait_for};
use std::path::PathBuf;
use std::time::Duration;

fn examples() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_template_comes_up_healthy_and_rollout_sh_rolls_a_new_version() {
    let Some(lab) = testkit::lab() else { return };
    let Some(api) = lab.api_url().map(str::to_string) else { return };
    let dir = testkit::scratch("examples").expect("scratch");
    std::fs::copy(examples().join("web@.service"), dir.join("web@.service")).expect("copy");
    let instances: Vec<String> = (1..=3).map(|i| format!("web@{i}.service")).collect();
    let mut args = vec!["start".to_string()];
    args.extend(instances.iter().map(|i| dir.join(i).display().to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = fleetctl(&lab, &api, &refs).expect("fleetctl start");
    assert!(out.status.success(), "{:?}", text(&out));
    let healthy = || async {
        let out = fleetctl(&lab, &api, &["list-units", "--no-legend", "--fields", "unit,health"]).ok()?;
        let (o, _) = text(&out);
        let n =
            o.lines().filter(|l| l.starts_with("web@") && l.ends_with("healthy") && !l.ends_with("unhealthy")).count();
        (n == instances.len()).then_some(())
    };
    wait_for("the web instances healthy (their site answers)", Duration::from_secs(60), healthy)
        .await
        .expect("healthy");

    // rollout.sh, as a user runs it: fleetctl on PATH, the endpoint and credentials in the
    // environment.
    let path = format!("{}:{}", lab.bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut script = std::process::Command::new(examples().join("rollout.sh"));
    script.arg("2").arg(dir.join("web@.service")).env("PATH", path).env("FLEETCTL_ENDPOINT", &api);
    for (k, v) in fleetctl_env() {
        script.env(k, v);
    }
    let out = testkit::output_within(script, Duration::from_secs(180)).expect("rollout.sh");
    let (o, e) = text(&out);
    assert!(out.status.success(), "rollout.sh 2:\n{o}\n{e}");
    assert!(o.contains("version 2 of web@.service is out"), "{o}");
    let status = fleetctl(&lab, &api, &["rollout", "status", "web@.service"]).expect("status");
    let (s, _) = text(&status);
    assert!(s.contains("Phase:     succeeded"), "{s}");
    let new = s.lines().filter(|l| l.starts_with("web@") && l.split_whitespace().nth(1) == Some("new")).count();
    assert_eq!(new, instances.len(), "{s}");
    // The unit file each instance runs now says version 2.
    let cat = fleetctl(&lab, &api, &["cat", "web@1.service"]).expect("cat");
    assert!(text(&cat).0.contains("Environment=VERSION=2"), "{:?}", text(&cat));

    let mut args = vec!["destroy".to_string()];
    args.extend(instances.iter().cloned());
    args.push("web@.service".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let _ = fleetctl(&lab, &api, &refs);
}
