use super::*;

const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";
const HASH: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn worker() -> String {
    format!(
        "version = 1\nrole = \"worker\"\naddress = \"10.0.0.4\"\nhostname = \"w1\"\n\
         [cluster]\nengines = [\"https://10.0.0.1:49153\"]\nca_hash = \"{HASH}\"\njoin_token = \"abc123.0123456789abcdef\"\n\
         [metadata]\nrack = \"r1\"\n"
    )
}

fn member() -> String {
    let pem = |k: &str, v: &str| format!("{k} = \"\"\"\n{v}\"\"\"\n");
    format!(
        "version = 1\nrole = \"member\"\naddress = \"10.0.0.1\"\n\
         [cluster]\nengines = [\"https://10.0.0.1:49153\"]\nca_hash = \"{HASH}\"\njoin_token = \"abc123.0123456789abcdef\"\n\
         [member]\nname = \"m1\"\ninitial_cluster = {{ m1 = \"10.0.0.1\", m2 = \"10.0.0.2\", m3 = \"10.0.0.3\" }}\n{}{}{}{}{}{}{}{}\
         admins = {{ admin = \"admin\" }}\n\
         [[member.join_tokens]]\ntoken = \"abc123.0123456789abcdef\"\nttl_secs = 3600\nuses = 5\n",
        pem("ca_cert", CERT),
        pem("ca_key", KEY),
        pem("root_cert", CERT),
        pem("root_key", KEY),
        pem("etcd_cert", CERT),
        pem("etcd_key", KEY),
        pem("engine_cert", CERT),
        pem("engine_key", KEY),
    )
}

fn refusal(text: &str) -> String {
    match Config::parse(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_worker_becomes_its_agent_and_join_settings_only() {
    let c = Config::parse(&worker()).expect("valid");
    let plan = c.plan();
    let paths: Vec<&str> = plan.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["lib/fleet/etc/agent.toml", "lib/fleet/etc/join.toml", "lib/fleet/etc/hostname"]);
    let agent = &plan[0].contents;
    // Whatever the metadata holds, agent.toml stays TOML (DEL and control characters escaped).
    let mut odd = c.clone();
    odd.metadata.insert("note".into(), "a\u{7f}b\u{1}c\"d".into());
    let text = &odd.plan()[0].contents;
    let back: toml::Table = toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert_eq!(back["metadata"]["note"].as_str(), Some("a\u{7f}b\u{1}c\"d"));
    assert!(agent.contains("public_ip = \"10.0.0.4\"") && agent.contains("\"rack\" = \"r1\""), "{agent}");
    let join: JoinSettings = toml::from_str(&plan[1].contents).expect("join.toml parses");
    assert_eq!(join.token, "abc123.0123456789abcdef");
    assert_eq!(plan[1].mode, 0o600, "the token is a secret");
    assert!(!plan.iter().any(|p| p.contents.contains("PRIVATE KEY")), "a worker holds no key from its config");
}

#[test]
fn a_member_becomes_etcd_engine_and_bootstrap_settings() {
    let c = Config::parse(&member()).expect("valid");
    let plan = c.plan();
    let get = |p: &str| plan.iter().find(|f| f.path == p).unwrap_or_else(|| panic!("no {p}"));
    let env = &get("lib/fleet/etc/etcd.env").contents;
    assert!(env.contains("ETCD_NAME=m1\n"));
    assert!(env
        .contains("ETCD_INITIAL_CLUSTER=m1=https://10.0.0.1:2380,m2=https://10.0.0.2:2380,m3=https://10.0.0.3:2380\n"));
    assert!(env.contains("ETCD_CLIENT_CERT_AUTH=true") && env.contains("ETCD_PEER_CLIENT_CERT_AUTH=true"));
    // Sized for a million units, compacted, etcd 3.4's buffer kept small.
    assert!(
        env.contains("ETCD_QUOTA_BACKEND_BYTES=8589934592\n") && env.contains("ETCD_AUTO_COMPACTION_RETENTION=1h\n")
    );
    assert!(env.contains("ETCD_BACKEND_BATCH_INTERVAL=10ms\n") && env.contains("ETCD_BACKEND_BATCH_LIMIT=500\n"));
    let key = get("lib/etcd/pki/etcd.key");
    assert_eq!((key.mode, key.owner), (0o600, Owner::Etcd));
    assert_eq!(get("lib/fleet/pki/ca.key").mode, 0o600);
    let engine = &get("lib/fleet/etc/engine.toml").contents;
    assert!(engine.contains("listen_tls = [\"10.0.0.1:49153\"]"), "{engine}");
    assert!(engine.contains("\"https://10.0.0.2:2379\""));
    assert!(engine.contains("[join]\npki_dir = \"/var/lib/fleet/pki\""));
    assert!(engine.contains("certificates = { \"admin\" = \"admin\" }"));
    let b: BootstrapSettings = toml::from_str(&get("lib/fleet/etc/bootstrap.toml").contents).expect("parses");
    assert_eq!(b.tokens[0].uses, 5);
    assert_eq!(b.etcd_endpoints, ["https://10.0.0.1:2379"]);
    // Deterministic: an interrupted first try is redone with the same files.
    assert_eq!(plan, c.plan());
    // The config round-trips as written by fleet-pki provision.
    assert_eq!(Config::parse(&c.to_toml()).expect("round trip"), c);
}

#[test]
fn bad_configs_are_refused_naming_the_setting() {
    let w = worker();
    assert!(refusal(&w.replace("version = 1", "version = 2")).contains("version = 2"));
    assert!(refusal(&w.replace("version = 1\n", "")).contains("version"));
    assert!(refusal(&w.replace("10.0.0.4", "node4")).starts_with("address:"));
    assert!(refusal(&w.replace("https://10.0.0.1", "http://10.0.0.1")).starts_with("cluster.engines:"));
    assert!(refusal(&w.replace(HASH, "sha256:12")).starts_with("cluster.ca_hash:"));
    assert!(refusal(&w.replace("abc123.", "abc.")).starts_with("cluster.join_token:"));
    assert!(refusal(&w.replace("role = \"worker\"", "role = \"member\"")).starts_with("member:"));
    assert!(refusal(&w.replace("role = \"worker\"", "role = \"boss\"")).contains("boss"));
    assert!(refusal(&format!("surprise = 1\n{w}")).contains("surprise"));
    assert!(refusal(&w.replace("rack = \"r1\"", "\"a=b\" = \"r1\"")).starts_with("metadata.a=b:"));
    let m = member();
    assert!(refusal(&m.replace("name = \"m1\"", "name = \"m9\"")).starts_with("member.name:"));
    assert!(refusal(&m.replace("m1 = \"10.0.0.1\"", "m1 = \"10.0.0.9\"")).starts_with("member.initial_cluster:"));
    assert!(refusal(&m.replacen("-----BEGIN PRIVATE KEY-----", "oops", 1)).starts_with("member.ca_key:"));
    assert!(refusal(&m.replace("uses = 5", "uses = 0")).starts_with("member.join_tokens[0].uses:"));
    assert!(refusal(&m.replace("\"admin\" }", "\"root\" }")).starts_with("member.admins.admin:"));
    assert!(refusal(&m.replace("role = \"member\"", "role = \"worker\"")).starts_with("member:"));
}

#[test]
fn files_go_to_var_only_and_host_units_are_kept_there() {
    let ok = format!(
        "{}\n[[files]]\npath = \"/etc/fleet/motd\"\nmode = \"0600\"\ncontents = \"hi\"\n\
         [[files]]\npath = \"/var/lib/app/conf\"\ncontents = \"x\"\n\
         [[units]]\nname = \"backup.timer\"\ncontents = \"[Timer]\\n\"\nenable = true\n",
        worker()
    );
    let plan = Config::parse(&ok).expect("valid").plan();
    let motd = plan.iter().find(|p| p.path == "lib/fleet/etc/motd").expect("motd");
    assert_eq!(motd.mode, 0o600);
    assert!(plan.iter().any(|p| p.path == "lib/app/conf"));
    assert!(plan.iter().any(|p| p.path == "lib/fleet/etc/units/backup.timer"));
    let enabled = plan.iter().find(|p| p.path == "lib/fleet/etc/units/enabled").expect("enabled list");
    assert_eq!(enabled.contents, "backup.timer\n");
    for (path, why) in [
        ("/etc/passwd", "read-only"),
        ("/var/../etc/shadow", "'..'"),
        ("/var/lib/fleet/provisioned.json", "own settings"),
        ("/etc/fleet/agent.d/50-join.toml", "own settings"),
        ("/etc/fleet/units/fleet-agent.service", "own settings"),
        ("/var/.fleet-provision/0", "own settings"),
        ("/var/lib/etcd/pki/ca.pem", "own settings"),
        ("/etc/fleet/join.toml", "own settings"),
        ("relative", "read-only"),
    ] {
        let bad = format!("{}\n[[files]]\npath = \"{path}\"\ncontents = \"x\"\n", worker());
        let e = refusal(&bad);
        assert!(e.starts_with("files[0].path:") && e.contains(why), "{path}: {e}");
    }
    let bad_mode = format!("{}\n[[files]]\npath = \"/var/x\"\nmode = \"rw\"\ncontents = \"x\"\n", worker());
    assert!(refusal(&bad_mode).starts_with("files[0].mode:"));
    let bad_capacity = format!("{}\n[capacity]\nmemory = \"lots\"\n", worker());
    assert!(refusal(&bad_capacity).starts_with("capacity.memory:"));
    let bad_unit = format!("{}\n[[units]]\nname = \"fleet-agent.service\"\ncontents = \"\"\n", worker());
    assert!(refusal(&bad_unit).starts_with("units[0].name:"));
}

#[test]
fn the_update_channel_becomes_update_toml() {
    let text = format!(
        "{}\n[update]\nchannel = \"https://updates.example/stable.json\"\nca = \"\"\"\n{CERT}\"\"\"\ngroup = \"workers\"\n",
        worker()
    );
    let plan = Config::parse(&text).expect("valid").plan();
    let u = &plan.iter().find(|p| p.path == "lib/fleet/etc/update.toml").expect("update.toml").contents;
    assert!(u.contains("channel = \"https://updates.example/stable.json\""), "{u}");
    assert!(u.contains("channel_ca_file = \"/etc/fleet/update-ca.pem\""));
    assert!(u.contains("group = \"workers\"") && u.contains("url = \"https://10.0.0.1:49153\""));
    assert!(plan.iter().any(|p| p.path == "lib/fleet/etc/update-ca.pem"));
    let bad = text.replace("https://updates.example", "ftp://updates.example");
    assert!(refusal(&bad).starts_with("update.channel:"));
}
