//! A cluster from nothing but the host image and each machine's provisioning config
//! (`./lab up --machines 5 --image REL --provision`, a phase of `./lab test`; docs/host-image.md,
//! "From zero to a cluster"): three etcd members with engines and two workers, no etcd or engine
//! of the lab's. Four machines fetched their config over HTTPS (a pinned URL on the kernel
//! command line), one read it from a config drive.
//!
//! Checked: they form a TLS etcd cluster with client certificates and auth; every machine joined
//! by the configs' token and runs units fleetctl starts; the CA key is on members only; a machine
//! rebooted is not provisioned again; a bad config, a config that does not match its pinned hash,
//! and a wrong CA hash each stop the machine before it joins, with the reason on its console.

use fleet_integration::testkit::{self, fleetctl, text, wait_for, MachineBus};
use fleet_integration::{image, provision, LabState, MachineProc, MachineSpec};
use std::time::Duration;

fn provisioned_lab() -> Option<LabState> {
    let lab = testkit::lab()?;
    assert!(
        !lab.machine_engines.is_empty() && lab.machines.iter().all(|m| m.spec.as_ref().is_some_and(|s| s.provisioned)),
        "this test needs a provisioned lab: ./lab up --machines 5 --image REL --provision"
    );
    Some(lab)
}

fn endpoints(lab: &LabState) -> String {
    lab.machine_engines.join(",")
}

fn record(m: &MachineProc) -> serde_json::Value {
    let path = image::var_dir(&m.dir).join("lib/fleet/provisioned.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("record is JSON")
}

fn console(m: &MachineProc) -> String {
    std::fs::read_to_string(m.dir.join("console.log")).unwrap_or_default()
}

async fn machine_ids(lab: &LabState) -> Vec<String> {
    let client = fleet_integration::pki::client_as("admin", &endpoints(lab)).expect("client");
    client.machines().await.map(|ms| ms.into_iter().map(|m| m.id).collect()).unwrap_or_default()
}

#[tokio::test]
async fn a_tls_cluster_forms_from_the_image_and_runs_units() {
    let Some(lab) = provisioned_lab() else { return };
    let members = provision::members_of(lab.machines.len() as u8) as usize;
    // Every machine was provisioned once, from where the lab put its config.
    for (i, m) in lab.machines.iter().enumerate() {
        let r = record(m);
        let role = if i < members { "member" } else { "worker" };
        assert_eq!(r["role"], role, "{}", m.name);
        let source = r["source"].as_str().unwrap_or_default();
        let drive = m.dir.join(image::CONFIG_DRIVE).exists();
        assert!(
            if drive { source.starts_with("config drive") } else { source.starts_with("fleet.provision=https://") },
            "{}: provisioned from {source}",
            m.name
        );
        // The CA key is on the members only.
        let ca_key = image::var_dir(&m.dir).join("lib/fleet/pki/ca.key").exists();
        assert_eq!(ca_key, i < members, "{}: CA key present = {ca_key}", m.name);
    }
    assert!(lab.machines.iter().any(|m| m.dir.join(image::CONFIG_DRIVE).exists()), "one machine used a config drive");

    // etcd: the members' own cluster, TLS with client certificates, auth on.
    let etcd_urls: Vec<String> = lab.machines[..members].iter().map(|m| format!("https://{}:2379", m.ip)).collect();
    let mut root = fleet_integration::pki::etcd_as(&etcd_urls, "root").await.expect("etcd as root");
    let list = root.member_list().await.expect("member list");
    assert_eq!(list.members().len(), members, "{:?}", list.members());
    for m in list.members() {
        assert!(m.peer_urls().iter().all(|u| u.starts_with("https://")), "peer URLs over TLS: {:?}", m.peer_urls());
    }
    // A certificate the CA signed but that is no etcd user reads nothing: auth is on.
    let mut admin = fleet_integration::pki::etcd_as(&etcd_urls, "admin").await.expect("connect");
    let denied = admin.get("/fleet/", None).await;
    assert!(denied.is_err(), "an identity without an etcd user read etcd: {denied:?}");
    // Plain HTTP gets no answer.
    let plain = etcd_client::Client::connect(
        [format!("http://{}:2379", lab.machines[0].ip)],
        Some(
            etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(3))
                .with_timeout(Duration::from_secs(3)),
        ),
    )
    .await;
    if let Ok(mut c) = plain {
        assert!(c.get("/fleet/", None).await.is_err(), "etcd answered over plain HTTP");
    }

    // Every machine joined; units run across the cluster.
    let ids = machine_ids(&lab).await;
    assert_eq!(ids.len(), lab.machines.len(), "{ids:?}");
    let dir = testkit::scratch("provision").expect("dir");
    let names: Vec<String> = (0..8).map(|i| format!("prov-{i}.service")).collect();
    for n in &names {
        std::fs::write(dir.join(n), "[Service]\nExecStart=/bin/sleep 100000\n").expect("write");
    }
    let paths: Vec<String> = names.iter().map(|n| dir.join(n).display().to_string()).collect();
    let mut args = vec!["start"];
    args.extend(paths.iter().map(String::as_str));
    let out = fleetctl(&lab, &endpoints(&lab), &args).expect("fleetctl");
    assert!(out.status.success(), "{:?}", text(&out));
    let client = fleet_integration::pki::client_as("admin", &endpoints(&lab)).expect("client");
    let hosts = wait_for("every unit active", Duration::from_secs(60), || async {
        let states = client.states(None).await.ok()?;
        let active: Vec<_> =
            states.iter().filter(|s| s.name.starts_with("prov-") && s.systemd_active_state == "active").collect();
        (active.len() == names.len())
            .then(|| active.iter().map(|s| s.machine_id.clone()).collect::<std::collections::HashSet<_>>())
    })
    .await
    .expect("units active");
    assert!(hosts.len() >= 3, "units spread over the cluster: {hosts:?}");
    // And systemd on a worker runs what the API says.
    let worker = lab.machines.last().expect("a worker");
    let bus = MachineBus::connect(worker).await.expect("bus");
    let on_worker = client.states(None).await.expect("states");
    for s in on_worker.iter().filter(|s| s.machine_id == worker.machine_id && s.name.starts_with("prov-")) {
        assert_eq!(bus.unit(&s.name).await.expect("unit").active_state, "active", "{}", s.name);
    }
    let out = fleetctl(
        &lab,
        &endpoints(&lab),
        &[
            "destroy",
            "prov-0.service",
            "prov-1.service",
            "prov-2.service",
            "prov-3.service",
            "prov-4.service",
            "prov-5.service",
            "prov-6.service",
            "prov-7.service",
        ],
    )
    .expect("fleetctl");
    assert!(out.status.success(), "{:?}", text(&out));
}

#[tokio::test]
async fn a_machine_rebooted_is_not_provisioned_again() {
    let Some(lab) = provisioned_lab() else { return };
    let m = lab.machines.last().expect("a worker").clone();
    let before = record(&m);
    fleet_integration::stop_machine(&m, Duration::from_secs(20));
    let spec = m.spec.clone().expect("spec");
    let again = fleet_integration::boot_machine(&spec, &lab.bin_dir, "").await.expect("boots again");
    let mut state = LabState::load().expect("state").expect("lab");
    if let Some(slot) = state.machines.iter_mut().find(|x| x.name == m.name) {
        *slot = again.clone();
    }
    state.save().expect("save");
    assert_eq!(record(&again), before, "the record is the first boot's");
    wait_for("the machine back in the cluster", Duration::from_secs(90), || async {
        machine_ids(&lab).await.contains(&m.machine_id).then_some(())
    })
    .await
    .expect("registered again");
    // Its console (both boots) shows one provisioning, the first boot's.
    assert_eq!(console(&again).matches("provisioned from").count(), 1, "{}", console(&again));
}

/// A worker config like the last machine's, for lab machine `n`, changed by `edit`.
fn extra_config(lab: &LabState, n: u8, edit: impl FnOnce(&mut fleet_provision::Config)) -> MachineSpec {
    let last = lab.machines.last().expect("a worker");
    let text = std::fs::read_to_string(provision::operator_dir().join(format!("{}.toml", last.name))).expect("config");
    let mut config = fleet_provision::Config::parse(&text).expect("valid");
    let mut spec = MachineSpec::numbered(n);
    config.address = spec.ip.clone();
    config.hostname = Some(spec.name.clone());
    config.metadata.insert("hostname".into(), spec.name.clone());
    edit(&mut config);
    let served = provision::serve_dir().join("provision").join(format!("{}.toml", spec.name));
    std::fs::write(&served, config.to_toml()).expect("serve");
    spec.image = last.spec.as_ref().and_then(|s| s.image.clone());
    spec.provisioned = true;
    spec.etcd_endpoints.clear();
    spec
}

/// Starts an extra machine with `args` on its command line (the test stops it with [`forget`]).
async fn start_extra(lab: &LabState, spec: &MachineSpec, args: String) -> MachineProc {
    let dir = fleet_integration::lab_dir().join("machines").join(&spec.name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join(image::BOOT_ARGS), args).expect("boot args");
    let m = fleet_integration::start_machine(spec, &lab.bin_dir, "").await.expect("starts");
    let mut state = LabState::load().expect("state").expect("lab");
    state.machines.push(m.clone());
    state.save().expect("save");
    m
}

/// [`start_extra`], then waits until it has booted (degraded: some unit failed).
async fn boot_extra(lab: &LabState, spec: &MachineSpec, args: String) -> MachineProc {
    let m = start_extra(lab, spec, args).await;
    fleet_integration::wait_booted(&m, Duration::from_secs(120)).await.expect("boots (degraded)");
    m
}

fn forget(m: &MachineProc) {
    fleet_integration::stop_machine(m, Duration::from_secs(10));
    if let Ok(Some(mut state)) = LabState::load() {
        state.machines.retain(|x| x.name != m.name);
        let _ = state.save();
    }
}

async fn assert_stopped_before_joining(lab: &LabState, m: &MachineProc, why: &str) {
    let bus = MachineBus::connect(m).await.expect("bus");
    let unit = bus.unit("fleet-provision.service").await.expect("unit");
    assert_eq!(unit.active_state, "failed", "{}: fleet-provision.service", m.name);
    for u in ["fleet-agent.service", "etcd.service", "fleet-join.service"] {
        assert_ne!(bus.unit(u).await.expect("unit").active_state, "active", "{}: {u} started", m.name);
    }
    let con = console(m);
    assert!(con.contains(why), "{}: the console does not say {why:?}:\n{con}", m.name);
    let var = image::var_dir(&m.dir);
    assert!(!var.join("lib/fleet/provisioned.json").exists(), "recorded as provisioned");
    assert!(!var.join("lib/fleet/etc/join.toml").exists(), "something was written");
    assert!(!machine_ids(lab).await.contains(&m.machine_id), "it joined");
}

#[tokio::test]
async fn a_bad_or_tampered_config_stops_the_boot_before_anything_joins() {
    let Some(lab) = provisioned_lab() else { return };
    // Invalid: an address that is no address.
    let spec = extra_config(&lab, 16, |c| c.address = "not-an-address".into());
    let args = format!("systemd.firstboot=off {}", provision::cmdline_for(&spec.name).expect("cmdline"));
    let m = boot_extra(&lab, &spec, args).await;
    assert_stopped_before_joining(&lab, &m, "address: \"not-an-address\" is not an IP address").await;
    forget(&m);

    // Valid, but not what the command line pinned (changed on the server).
    let spec = extra_config(&lab, 17, |_| {});
    let args = format!("systemd.firstboot=off {}", provision::cmdline_for(&spec.name).expect("cmdline"));
    let served = provision::serve_dir().join("provision").join(format!("{}.toml", spec.name));
    let text = std::fs::read_to_string(&served).expect("served");
    std::fs::write(&served, text.replace("role = \"worker\"", "role = \"worker\"\n# changed")).expect("tamper");
    let m = boot_extra(&lab, &spec, args).await;
    assert_stopped_before_joining(&lab, &m, "refused: the config's sha256 is").await;
    forget(&m);

    // Served by a server whose certificate is not the pinned one.
    let spec = extra_config(&lab, 19, |_| {});
    let served = provision::serve_dir().join("provision").join(format!("{}.toml", spec.name));
    let args = format!(
        "systemd.firstboot=off fleet.provision={} fleet.provision.sha256={} fleet.provision.tls_pin=sha256:{}",
        provision::serve_url(&format!("provision/{}.toml", spec.name)),
        provision::sha256_of(&served).expect("sha"),
        "0".repeat(64)
    );
    let m = boot_extra(&lab, &spec, args).await;
    assert_stopped_before_joining(&lab, &m, "not the one fleet.provision.tls_pin names").await;
    forget(&m);
}

#[tokio::test]
async fn a_wrong_ca_hash_never_joins() {
    let Some(lab) = provisioned_lab() else { return };
    let spec = extra_config(&lab, 18, |c| {
        c.cluster.ca_hash = format!("sha256:{}", "ab".repeat(32));
    });
    let args = format!("systemd.firstboot=off {}", provision::cmdline_for(&spec.name).expect("cmdline"));
    let m = start_extra(&lab, &spec, args).await;
    // Provisioned (the config is valid), but no engine shows the CA it pins: it never joins.
    let refused = wait_for("the join refused", Duration::from_secs(90), || async {
        console(&m).contains("refusing to join").then_some(())
    })
    .await;
    let joined = machine_ids(&lab).await.contains(&m.machine_id);
    let var = image::var_dir(&m.dir);
    let wrote_identity = var.join("lib/fleet/etc/pki/machine.key").exists();
    forget(&m);
    refused.unwrap_or_else(|e| panic!("{e}"));
    assert!(!joined, "a machine pinning another CA joined");
    assert!(!wrote_identity, "it made an identity");
}

fn releases() -> std::path::PathBuf {
    std::path::PathBuf::from(
        std::env::var("FLEET_IMAGE_RELEASES").unwrap_or_else(|_| "/var/tmp/fleet-tier-releases".into()),
    )
}

fn publish(version: &str, expires_in: Duration) -> fleet_host_image::channel::ChannelMeta {
    publish_issued(version, expires_in, Duration::ZERO)
}

/// Publishes metadata issued `ago` in the past: with `ago` longer than `expires_in` it is
/// expired the moment it is served, so no machine can fetch it while it is still valid.
fn publish_issued(version: &str, expires_in: Duration, ago: Duration) -> fleet_host_image::channel::ChannelMeta {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let now = now - ago.as_secs() as i64;
    fleet_host_image::channel::publish(
        &provision::serve_dir().join(provision::UPDATES),
        provision::CHANNEL,
        &releases().join(version),
        &releases().join("release.pub"),
        &releases().join("release.key"),
        expires_in,
        now,
    )
    .expect("publish")
}

/// The channel serial machine `m` accepted last.
fn seen(m: &MachineProc) -> u64 {
    fleet_host_image::channel::load_seen(&image::var_dir(&m.dir).join("lib/fleet/update-channel.json"))
        .map_or(0, |s| s.serial)
}

async fn every_machine_sees(lab: &LabState, serial: u64) {
    wait_for(&format!("every machine at channel serial {serial}"), Duration::from_secs(60), || async {
        lab.machines.iter().all(|m| seen(m) == serial).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", lab.machines.iter().map(seen).collect::<Vec<_>>()));
}

async fn every_console_says(lab: &LabState, words: &str) {
    wait_for(&format!("every machine to say {words:?}"), Duration::from_secs(60), || async {
        lab.machines.iter().all(|m| console(m).contains(words)).then_some(())
    })
    .await
    .expect("refused everywhere");
}

async fn sample(api: &fleet_client::Client, etcd: &mut etcd_client::Client) -> Option<testkit::RebootSample> {
    testkit::reboot_sample(api, etcd, "served-").await
}

#[tokio::test]
async fn a_release_published_over_https_rolls_over_every_machine_through_fleetlock() {
    let Some(lab) = provisioned_lab() else { return };
    let n = lab.machines.len();
    let api = fleet_integration::pki::client_as("admin", &endpoints(&lab)).expect("client");
    let members = provision::members_of(n as u8) as usize;
    let etcd_urls: Vec<String> = lab.machines[..members].iter().map(|m| format!("https://{}:2379", m.ip)).collect();
    let mut etcd = fleet_integration::pki::etcd_as(&etcd_urls, "root").await.expect("etcd");
    let tree = provision::serve_dir().join(provision::UPDATES);
    let meta_file = |ext: &str| tree.join(format!("{}.json{ext}", provision::CHANNEL));

    // The channel names what runs: every machine accepts it, nothing to do.
    let first = publish("1", Duration::from_secs(3600));
    every_machine_sees(&lab, first.serial).await;
    let old = (std::fs::read(meta_file("")).expect("meta"), std::fs::read(meta_file(".minisig")).expect("sig"));
    let second = publish("1", Duration::from_secs(3600));
    every_machine_sees(&lab, second.serial).await;
    let current = (std::fs::read(meta_file("")).expect("meta"), std::fs::read(meta_file(".minisig")).expect("sig"));

    // Replayed: the older metadata, validly signed and unexpired, served again.
    std::fs::write(meta_file(".minisig"), &old.1).expect("replay");
    std::fs::write(meta_file(""), &old.0).expect("replay");
    every_console_says(&lab, &format!("serial {}, older than serial {} seen before", first.serial, second.serial))
        .await;

    // Expired: a newer release named by metadata that expired; nobody takes it. Issued an hour
    // ago so it is expired from its first byte: metadata valid for a second could be fetched
    // (and rightly taken) within that second by a machine looking just then.
    // The current metadata back first: the serial is the served one's plus one, and the clock's
    // an hour ago is below it.
    std::fs::write(meta_file(".minisig"), &current.1).expect("restore");
    std::fs::write(meta_file(""), &current.0).expect("restore");
    let expired = publish_issued("2", Duration::from_secs(60), Duration::from_secs(3600));
    assert!(expired.serial > second.serial);
    let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(expired.expires as u64));
    every_console_says(&lab, &format!("expired at {at}: refusing it (a frozen or stale server)")).await;
    for m in &lab.machines {
        assert!(
            !image::var_dir(&m.dir).join("lib/fleet/downloads/2").exists(),
            "{} downloaded 2 from expired metadata",
            m.name
        );
        assert_eq!(seen(m), second.serial, "{} took the expired serial", m.name);
    }

    // Units on every machine, then release 2 for real.
    let dir = testkit::scratch("served").expect("dir");
    let names: Vec<String> = (0..n).map(|i| format!("served-{i}.service")).collect();
    for name in &names {
        std::fs::write(dir.join(name), "[Service]\nExecStart=/bin/sleep 100000\n").expect("write");
    }
    let paths: Vec<String> = names.iter().map(|u| dir.join(u).display().to_string()).collect();
    let mut args = vec!["start"];
    args.extend(paths.iter().map(String::as_str));
    let out = fleetctl(&lab, &endpoints(&lab), &args).expect("fleetctl");
    assert!(out.status.success(), "{:?}", text(&out));
    wait_for("every unit active", Duration::from_secs(60), || async {
        let s = sample(&api, &mut etcd.clone()).await?;
        (s.units.len() == n && s.units.iter().all(|u| u.2)).then_some(())
    })
    .await
    .expect("units active");

    publish("2", Duration::from_secs(3600));
    let blessed = |m: &MachineProc| m.dir.join("disk/esp/loader/entries/fleet-2-b.conf").exists();
    let until = std::time::Instant::now() + Duration::from_secs(900);
    let (mut samples, mut max_away, mut max_held) = (0, 0, 0);
    loop {
        if let Some(s) = sample(&api, &mut etcd).await {
            samples += 1;
            max_held = max_held.max(s.slot_holders);
            assert!(s.slot_holders <= 1, "more than one reboot slot held: {s:?}");
            let away = n - s.machines.len();
            max_away = max_away.max(away);
            assert!(away <= 1, "more than one machine away at once: {s:?}");
            if s.slot_holders == 0 && away == 0 {
                assert!(
                    s.units.len() == n && s.units.iter().all(|u| u.2),
                    "with no machine updating, every unit runs: {s:?}"
                );
            }
            if lab.machines.iter().all(blessed) && s.slot_holders == 0 && away == 0 {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < until,
            "not every machine updated in time; boots: {:?}",
            lab.machines
                .iter()
                .map(|m| std::fs::read_to_string(image::boots_log(&m.dir)).unwrap_or_default())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        samples > 10 && max_away == 1 && max_held == 1,
        "the rollout was observed ({samples} samples, {max_away} away, {max_held} held)"
    );
    for m in &lab.machines {
        let boots = std::fs::read_to_string(image::boots_log(&m.dir)).expect("boots");
        assert!(boots.lines().any(|l| l == "fleet-2-b+0-1.conf 2 healthy"), "{}: {boots}", m.name);
    }
    // The first download of the image was cut off; it was resumed, not started again.
    let log = std::fs::read_to_string(provision::serve_log()).expect("server log");
    assert!(log.lines().any(|l| l.contains("root.erofs") && l.ends_with(" cut")), "{log}");
    assert!(
        log.lines().any(|l| l.contains("/root.erofs bytes=") && l.contains(" 206")),
        "no resumed (ranged) download of root.erofs:\n{log}"
    );
}
