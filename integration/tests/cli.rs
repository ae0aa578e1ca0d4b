//! fleetctl end to end on the lab: the CLI scenarios of the original fleet's functional tests
//! (reference section 8: 1-4, 6-15; SSH ones replaced by the agent-backed status and journal),
//! plus what we added (`-o json`, `wait`, completions, man page, the unix socket endpoint).

use fleet_integration::testkit::{self, fleetctl, text, wait_for};
use fleet_integration::LabState;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn hello(sleep: u32) -> String {
    format!("[Unit]\nDescription=Hello %i\n\n[Service]\nExecStart=/bin/sh -c \"while true; do echo Hello, World!; sleep {sleep}; done\"\n")
}

struct Cli {
    lab: LabState,
    api: String,
    dir: PathBuf,
}

impl Cli {
    fn new(test: &str) -> Option<Cli> {
        let lab = testkit::lab()?;
        let api = lab.api_url()?.to_string();
        let dir = testkit::scratch(test).ok()?;
        Some(Cli { lab, api, dir })
    }
    fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = fleetctl(&self.lab, &self.api, args).expect("fleetctl runs");
        let (o, e) = text(&out);
        (out.status.code(), o, e)
    }
    fn ok(&self, args: &[&str]) -> String {
        let (code, o, e) = self.run(args);
        assert_eq!(code, Some(0), "fleetctl {args:?}:\n{o}\n{e}");
        assert!(!e.contains("Error"), "fleetctl {args:?} printed an error: {e}");
        o
    }
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
    fn write(&self, name: &str, body: &str) -> String {
        std::fs::write(self.dir.join(name), body).expect("write");
        self.path(name)
    }
    /// Rows of a `--no-legend` listing whose first column starts with `prefix`.
    fn rows(&self, args: &[&str], prefix: &str) -> Vec<Vec<String>> {
        let mut full = args.to_vec();
        full.push("--no-legend");
        self.ok(&full)
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .filter(|r| r.first().is_some_and(|u| u.starts_with(prefix)))
            .collect()
    }
    async fn wait_rows(&self, args: &[&str], prefix: &str, pred: impl Fn(&[Vec<String>]) -> bool) -> Vec<Vec<String>> {
        wait_for(&format!("fleetctl {args:?} rows of {prefix}"), T, || async {
            let r = self.rows(args, prefix);
            pred(&r).then_some(r)
        })
        .await
        .expect("listing reaches the expected state")
    }
}

#[test]
fn version_help_and_env() {
    let Some(c) = Cli::new("cli-version") else { return };
    let (code, out, _) = c.run(&["version"]);
    assert_eq!((code, out.trim()), (Some(0), format!("fleetctl version {}", env!("CARGO_PKG_VERSION")).as_str()));
    let (code, out, _) = c.run(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(env!("CARGO_PKG_VERSION")));
    for args in [vec!["help"], vec!["--help"], vec!["-h"]] {
        let (code, out, _) = c.run(&args);
        assert_eq!(code, Some(0), "{args:?}");
        assert!(out.contains("list-units") && out.contains("start"), "{args:?}: {out}");
        assert!(out.contains(env!("CARGO_PKG_VERSION")), "help shows the version: {out}");
    }
    // FLEETCTL_ENDPOINT and the FLEETCTL_*_FILE variables alone reach the cluster (no flags).
    let (code, out, _) = c.run(&["list-machines", "--no-legend"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.lines().count(), c.lab.machines.len());
    let (code, _, _) = c.run(&["verify", "x.service"]);
    assert_eq!(code, Some(2));
    // Abbreviated commands, as the original allowed.
    assert_eq!(c.run(&["list-m", "--no-legend"]).1, out);
}

#[test]
fn a_context_file_alone_reaches_the_cluster_past_a_dead_endpoint() {
    let Some(c) = Cli::new("cli-contexts") else { return };
    let admin = fleet_integration::pki::identity("admin");
    // The first endpoint refuses connections: fleetctl goes on to the next.
    let config = format!(
        "current = \"lab\"\n\n[contexts.lab]\nendpoints = [\"https://127.0.0.1:1\", {:?}]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n\n[contexts.anonymous]\nendpoints = [{:?}]\nca_file = {:?}\n",
        c.api,
        admin.ca_file.display().to_string(),
        admin.cert_file.display().to_string(),
        admin.key_file.display().to_string(),
        c.api,
        admin.ca_file.display().to_string(),
    );
    let file = c.write("fleetctl.toml", &config);
    let run = |args: &[&str], context: Option<&str>| {
        let mut cmd = std::process::Command::new(c.lab.bin_dir.join("fleetctl"));
        cmd.args(args).env("FLEETCTL_CONFIG", &file).env("HOME", &c.dir);
        for v in ["FLEETCTL_ENDPOINT", "FLEETCTL_CA_FILE", "FLEETCTL_CERT_FILE", "FLEETCTL_KEY_FILE", "FLEETCTL_TOKEN"]
        {
            cmd.env_remove(v);
        }
        match context {
            Some(ctx) => cmd.env("FLEETCTL_CONTEXT", ctx),
            None => cmd.env_remove("FLEETCTL_CONTEXT"),
        };
        let out = testkit::output_within(cmd, Duration::from_secs(60)).expect("fleetctl runs");
        let (o, e) = text(&out);
        (out.status.code(), o, e)
    };
    let (code, out, err) = run(&["list-machines", "--no-legend"], None);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out.lines().count(), c.lab.machines.len(), "{out}");
    let (code, out, _) = run(&["contexts"], None);
    assert_eq!(code, Some(0));
    assert!(out.contains("* lab\t") && out.contains("  anonymous\t"), "{out}");
    // The context chosen by the variable is the one used: without a certificate, refused.
    let (code, out, err) = run(&["list-machines"], Some("anonymous"));
    assert_ne!(code, Some(0), "{out}");
    assert!(err.contains("authentication required"), "{err}");
    // A flag still wins over the context.
    let (code, _, err) = run(&["--endpoint", "https://127.0.0.1:1", "list-machines"], None);
    assert_ne!(code, Some(0));
    assert!(!err.is_empty());
    let (code, _, err) = run(&["list-machines"], Some("staging"));
    assert_eq!(code, Some(1));
    assert!(err.contains("\"staging\"") && err.contains("anonymous, lab"), "{err}");
}

#[tokio::test]
async fn submit_load_start_cycles_of_template_instances() {
    let Some(c) = Cli::new("cli-cycles") else { return };
    c.write("cyc@.service", &hello(1));
    for round in 0..2 {
        // Submit nine instances made from the local template, then destroy them.
        let names: Vec<String> = (1..=9).map(|i| c.path(&format!("cyc@{i}.service"))).collect();
        let mut args = vec!["submit"];
        args.extend(names.iter().map(String::as_str));
        c.ok(&args);
        let files = c.rows(&["list-unit-files"], "cyc@");
        assert_eq!(files.len(), 9, "round {round}");
        let mut destroy = vec!["destroy"];
        let units: Vec<String> = (1..=9).map(|i| format!("cyc@{i}.service")).collect();
        destroy.extend(units.iter().map(String::as_str));
        c.ok(&destroy);
        assert!(c.rows(&["list-unit-files"], "cyc@").is_empty());

        // Load six: listed loaded, systemd inactive; unload them.
        let mut load = vec!["load"];
        load.extend(names[..6].iter().map(String::as_str));
        c.ok(&load);
        let rows = c.rows(&["list-units", "--fields", "unit,active"], "cyc@");
        assert_eq!(rows.len(), 6);
        assert!(rows.iter().all(|r| r[1] == "inactive"), "{rows:?}");
        let mut unload = vec!["unload"];
        unload.extend(units[..6].iter().map(String::as_str));
        c.ok(&unload);
        c.wait_rows(&["list-units"], "cyc@", |r| r.is_empty()).await;

        // Start three: active; stop them: none active.
        let mut start = vec!["start"];
        start.extend(names[..3].iter().map(String::as_str));
        c.ok(&start);
        let rows = c.rows(&["list-units", "--fields", "unit,active"], "cyc@");
        assert_eq!(rows.iter().filter(|r| r[1] == "active").count(), 3, "{rows:?}");
        let mut stop = vec!["stop"];
        stop.extend(units[..3].iter().map(String::as_str));
        c.ok(&stop);
        assert_eq!(
            c.rows(&["list-units", "--fields", "unit,active"], "cyc@").iter().filter(|r| r[1] == "active").count(),
            0
        );
        let mut destroy = vec!["destroy"];
        destroy.extend(units.iter().map(String::as_str));
        c.run(&destroy);
    }
}

/// Requests the engine has served, as `/engine/status` counts them (this request included).
async fn requests_served(c: &Cli) -> u64 {
    let status: serde_json::Value = testkit::http()
        .get(format!("{}/engine/status", c.api))
        .send()
        .await
        .expect("engine status")
        .json()
        .await
        .expect("JSON");
    status["requests"].as_u64().expect("a request count")
}

/// Bulk commands cost a constant number of requests, however many units they name (counted by
/// the engine): `start` of 1,000 template instances from a local template is one lookup, one
/// create and one wait; `stop` a lookup, a change and a wait; `destroy` a delete and a wait. The
/// original's lines are printed for every unit.
#[tokio::test]
async fn bulk_commands_make_a_bounded_number_of_requests() {
    let Some(c) = Cli::new("cli-bulk") else { return };
    c.write("bulk@.service", "[Service]\nExecStart=/bin/sleep infinity\n");
    let paths: Vec<String> = (1..=1000).map(|i| c.path(&format!("bulk@{i}.service"))).collect();
    let units: Vec<String> = (1..=1000).map(|i| format!("bulk@{i}.service")).collect();
    let with = |verb: &'static str, args: &[String]| -> Vec<String> {
        std::iter::once(verb.to_string()).chain(args.iter().cloned()).collect()
    };
    let c = &c;
    let counted = |args: Vec<String>| async move {
        let before = requests_served(c).await;
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = c.ok(&refs);
        let after = requests_served(c).await;
        (out, after - before - 1)
    };

    let (out, requests) = counted(with("start", &paths)).await;
    for u in &units {
        assert!(out.contains(&format!("Unit {u} inactive\n")), "{u} created: {out}");
        assert!(out.contains(&format!("Unit {u} launched on ")), "{u} reported launched");
    }
    assert!((3..=5).contains(&requests), "start of 1,000 units made {requests} requests");
    let active = c.rows(&["list-units", "--fields", "unit,active"], "bulk@");
    assert_eq!(active.iter().filter(|r| r[1] == "active").count(), 1000, "every unit active");

    // Started again: already launched, nothing to write; only the lookup and the wait.
    let (_, requests) = counted(with("start", &paths)).await;
    assert!(requests <= 3, "a second start of 1,000 running units made {requests} requests");

    // Named from a file (at scale, more names than a command line holds): the same.
    c.write("bulk-names.txt", &format!("# the bulk units\n\n{}\n", units.join("\n")));
    let (out, requests) = counted(vec!["stop".into(), "--names-from".into(), c.path("bulk-names.txt")]).await;
    assert!(out.lines().filter(|l| l.starts_with("Unit bulk@") && l.contains(" loaded on ")).count() == 1000, "{out}");
    assert!((3..=5).contains(&requests), "stop of 1,000 units made {requests} requests");
    let rows = c.rows(&["list-units", "--fields", "unit,active"], "bulk@");
    assert!(rows.iter().all(|r| r[1] == "inactive" || r[1] == "failed"), "stopped means stopped: {rows:?}");

    let (out, requests) = counted(with("destroy", &units)).await;
    assert_eq!(out.lines().filter(|l| l.starts_with("Destroyed bulk@")).count(), 1000);
    assert!((2..=4).contains(&requests), "destroy of 1,000 units made {requests} requests");
    assert!(c.rows(&["list-units"], "bulk@").is_empty(), "destroy waits until no machine reports them");
    assert!(c.rows(&["list-unit-files"], "bulk@").is_empty());
}

#[tokio::test]
async fn replace_changes_contents_in_every_state() {
    let Some(c) = Cli::new("cli-replace") else { return };
    for (verb, n) in [("submit", 3), ("load", 2), ("start", 2)] {
        let prefix = format!("rp{verb}@");
        c.write(&format!("{prefix}.service"), &hello(1));
        let names: Vec<String> = (1..=n).map(|i| format!("{prefix}{i}.service")).collect();
        let mut args = vec![verb];
        let paths: Vec<String> = names.iter().map(|u| c.path(u)).collect();
        args.extend(paths.iter().map(String::as_str));
        c.ok(&args);
        let before: Vec<String> = names.iter().map(|u| c.ok(&["cat", u])).collect();
        // New contents in another directory, replaced unit by unit.
        let other = c.dir.join(format!("new-{verb}"));
        std::fs::create_dir_all(&other).expect("dir");
        for (i, u) in names.iter().enumerate() {
            let p = other.join(u);
            std::fs::write(&p, hello(2)).expect("write");
            let out = c.ok(&[verb, "--replace", p.to_str().unwrap_or_default()]);
            let _ = out;
            assert_ne!(c.ok(&["cat", u]), before[i], "{verb} --replace did not change {u}");
        }
        assert_eq!(c.rows(&["list-unit-files"], &prefix).len(), n);
        if verb == "start" {
            let rows = c
                .wait_rows(&["list-units", "--fields", "unit,active,hash"], &prefix, |r| {
                    r.len() == n && r.iter().all(|x| x[1] == "active")
                })
                .await;
            assert_eq!(rows.len(), n);
        }
        let mut destroy = vec!["destroy"];
        destroy.extend(names.iter().map(String::as_str));
        c.ok(&destroy);
    }
    // Without --replace, differing contents are left alone with a warning.
    let p = c.write("rpwarn.service", &hello(1));
    c.ok(&["submit", &p]);
    c.write("rpwarn.service", &hello(3));
    let (code, _, err) = c.run(&["submit", &p]);
    assert_eq!(code, Some(0));
    assert!(err.contains("differs from local unit file"), "{err}");
    c.ok(&["destroy", "rpwarn.service"]);
}

#[tokio::test]
async fn restart_status_journal_cat_and_wait() {
    let Some(c) = Cli::new("cli-status") else { return };
    let p = c.write("clihello.service", &hello(1).replace("%i", "cli"));
    // status of a loaded unit shows systemd's "Loaded: loaded".
    c.ok(&["load", &p]);
    // Like the original, status exits with systemctl's code: 3 for a unit that is not running.
    let (code, out, _) = c.run(&["status", "clihello.service"]);
    assert!(out.contains("Loaded: loaded"), "{out}");
    assert_eq!(code, Some(3));
    c.ok(&["start", "--no-block", &p]);
    c.ok(&["wait", "clihello.service"]);
    let out = c.ok(&["status", "clihello.service"]);
    assert!(out.contains("Active: active"), "{out}");
    let pid = |out: &str| {
        out.lines().find_map(|l| {
            l.trim().strip_prefix("Main PID: ").and_then(|r| r.split_whitespace().next()).map(str::to_string)
        })
    };
    let before = pid(&out).expect("main pid");
    let journal = wait_for("Hello, World! in the journal", T, || async {
        Some(c.ok(&["journal", "--lines", "20", "clihello.service"])).filter(|j| j.contains("Hello, World!"))
    })
    .await
    .expect("journal");
    assert!(journal.lines().count() <= 20);
    // journal -f keeps following until stopped.
    let mut follow = Command::new(c.lab.bin_dir.join("fleetctl"))
        .args(["journal", "-f", "--lines", "1", "clihello.service"])
        .env("FLEETCTL_ENDPOINT", &c.api)
        .envs(testkit::fleetctl_env())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(follow.try_wait().expect("poll").is_none(), "journal -f exited");
    follow.kill().ok();
    let out = follow.wait_with_output().expect("output");
    assert!(String::from_utf8_lossy(&out.stdout).matches("Hello, World!").count() >= 2);

    c.ok(&["restart", "clihello.service"]);
    let out = c.ok(&["status", "clihello.service"]);
    assert!(out.contains("Active: active"), "{out}");
    assert_ne!(pid(&out).expect("main pid"), before, "restart did not restart");
    assert_eq!(c.ok(&["cat", "clihello.service"]).trim(), hello(1).replace("%i", "cli").trim());

    // -o json on list and status commands.
    let v: serde_json::Value = serde_json::from_str(&c.ok(&["list-units", "-o", "json"])).expect("json");
    assert!(v.as_array().expect("array").iter().any(|r| r["unit"] == "clihello.service" && r["active"] == "active"));
    let v: serde_json::Value =
        serde_json::from_str(&c.ok(&["status", "-o", "json", "clihello.service"])).expect("json");
    assert_eq!(v[0]["statuses"][0]["exitCode"], 0);
    let (code, _, err) = c.run(&["status", "nosuch-cli.service"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Unit nosuch-cli.service does not exist."));
    c.ok(&["destroy", "clihello.service"]);
    let (code, _, err) = c.run(&["journal", "clihello.service"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn list_unit_files_are_sorted_and_the_unix_socket_works() {
    let Some(c) = Cli::new("cli-order") else { return };
    c.write("ord@.service", &hello(1));
    let mut names: Vec<String> = (1..=20).map(|i| format!("ord@{i:02}.service")).collect();
    names.reverse();
    for n in &names {
        c.ok(&["submit", &c.path(n)]);
    }
    let listed: Vec<String> =
        c.rows(&["list-unit-files", "--fields", "unit"], "ord@").into_iter().map(|r| r[0].clone()).collect();
    names.sort();
    assert_eq!(listed, names);
    // The same listing over the engine's unix socket.
    let sock = format!("unix://{}", fleet_integration::engine_socket("e1").display());
    let out = fleetctl(&c.lab, &sock, &["list-unit-files", "--no-legend", "--fields", "unit"]).expect("fleetctl");
    assert!(out.status.success(), "{:?}", text(&out));
    assert_eq!(text(&out).0.lines().filter(|l| l.starts_with("ord@")).count(), 20);
    let mut destroy = vec!["destroy"];
    destroy.extend(names.iter().map(String::as_str));
    c.ok(&destroy);
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    let Some(c) = Cli::new("cli-docs") else { return };
    let (code, out, _) = c.run(&["completion", "bash"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("list-unit-files") && out.contains("complete"), "{out}");
    let (code, out, _) = c.run(&["man"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(".TH fleetctl") && out.contains("list\\-units"), "{}", &out[..out.len().min(400)]);
}
