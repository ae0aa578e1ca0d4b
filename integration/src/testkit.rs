//! Helpers for the scenario tests: find the lab, wait for conditions, look inside machines.
//!
//! Tests that need the lab skip when it is not up, except under `CI=true`, where a missing lab
//! is a failure: CI must never pass by skipping.

use crate::{LabState, MachineProc};
use anyhow::{bail, Context, Result};
use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The running lab, or `None` (test skipped) outside CI.
pub fn lab() -> Option<LabState> {
    watch_this_test();
    match LabState::load() {
        Ok(Some(s)) if !s.etcd.is_empty() || !s.machine_engines.is_empty() => Some(s),
        other => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI=true but the lab is not up ({other:?}); run the suite with ./lab test");
            }
            eprintln!("skipped: the lab is not up (run ./lab test)");
            None
        }
    }
}

/// Polls `check` until it returns `Some`, failing with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > until {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks `check` again and again for `window` (at least every 100 ms, and once at its end):
/// "nothing changed for 2 s" sampled across the window, not looked at once after a sleep.
/// The first deviation is the error.
pub async fn holds_for<F, Fut>(window: Duration, mut check: F) -> std::result::Result<usize, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), String>>,
{
    let until = std::time::Instant::now() + window;
    let mut samples = 0;
    loop {
        check().await?;
        samples += 1;
        if std::time::Instant::now() >= until {
            return Ok(samples);
        }
        tokio::time::sleep(Duration::from_millis(100).min(until.saturating_duration_since(std::time::Instant::now())))
            .await;
    }
}

/// etcd as its administrator (`root`).
pub async fn etcd(state: &LabState) -> Result<etcd_client::Client> {
    crate::etcd_admin(&state.etcd_endpoints()).await
}

/// An HTTP client for the lab's API as its administrator (client certificate `admin`).
pub fn http() -> reqwest::Client {
    match crate::pki::http_as("admin") {
        Ok(c) => c,
        Err(e) => panic!("the lab's admin identity: {e:#}"),
    }
}

/// What fleetctl needs to reach the lab's API as its administrator.
pub fn fleetctl_env() -> Vec<(&'static str, String)> {
    let admin = crate::pki::identity("admin");
    vec![
        ("FLEETCTL_CA_FILE", admin.ca_file.display().to_string()),
        ("FLEETCTL_CERT_FILE", admin.cert_file.display().to_string()),
        ("FLEETCTL_KEY_FILE", admin.key_file.display().to_string()),
    ]
}

/// A key prefix no other test uses.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("/fleet-test/{test}-{nanos:x}/")
}

/// All keys under `prefix`, as strings.
pub async fn keys_under(client: &mut etcd_client::Client, prefix: &str) -> Result<Vec<String>> {
    let resp = client.get(prefix, Some(etcd_client::GetOptions::new().with_prefix().with_keys_only())).await?;
    Ok(resp.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect())
}

/// How long one fleetctl command may take in a test. fleetctl's own waits are unbounded by
/// default (as the original's), so a unit that can never start would otherwise hang the suite.
const FLEETCTL_LIMIT: Duration = Duration::from_secs(180);

/// Runs the lab's fleetctl against `endpoint`; an error if it has not finished in 180 s (it is
/// killed then).
pub fn fleetctl(state: &LabState, endpoint: &str, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(state.bin_dir.join("fleetctl"));
    cmd.args(args).env("FLEETCTL_ENDPOINT", endpoint).envs(fleetctl_env());
    output_within(cmd, FLEETCTL_LIMIT).with_context(|| format!("fleetctl {args:?}"))
}

/// Runs `cmd` to completion like `Command::output`, but kills it after `limit`.
pub fn output_within(mut cmd: Command, limit: Duration) -> Result<Output> {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    // Read both pipes while waiting, so a chatty child never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let until = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            let (o, e) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
            bail!(
                "did not finish in {limit:?}; it printed:\n{}\n{}",
                String::from_utf8_lossy(&o),
                String::from_utf8_lossy(&e)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

/// How long one lab test may run before the test binary gives up (FLEET_TEST_LIMIT_SECS).
const TEST_LIMIT: Duration = Duration::from_secs(20 * 60);

/// The lab test running now (named after libtest's thread), since when, and any time it asked
/// for beyond the limit.
static CURRENT_TEST: std::sync::Mutex<Option<(String, Instant, Duration)>> = std::sync::Mutex::new(None);

/// Lets the current lab test run `extra` longer than the watchdog's limit (a soak asked for on
/// purpose, such as `FLEET_CHAOS_SECS=3600`).
pub fn allow_longer(extra: Duration) {
    if let Ok(mut current) = CURRENT_TEST.lock() {
        if let Some(c) = current.as_mut() {
            c.2 += extra;
        }
    }
}

/// Makes a lab test's failure visible at once and a hung one end the run.
///
/// libtest prints a failed test's panic only when the whole binary finishes; a later test that
/// hangs would hide it (CI once timed out with no word of why two tests had failed). So panics
/// are also written straight to stderr as they happen, and a watchdog ends the test binary
/// (exit 124) when one test runs longer than the limit, naming it.
fn watch_this_test() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    let name = std::thread::current().name().unwrap_or("?").to_string();
    if let Ok(mut current) = CURRENT_TEST.lock() {
        if current.as_ref().map(|(n, _, _)| n) != Some(&name) {
            *current = Some((name, Instant::now(), Duration::ZERO));
        }
    }
    INSTALLED.call_once(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            use std::io::Write;
            let test = std::thread::current().name().unwrap_or("?").to_string();
            // Straight to the file descriptor: libtest captures only print! and the default hook.
            let _ = writeln!(std::io::stderr(), "\n[{test}] panicked: {info}");
            default_hook(info);
        }));
        let limit = std::env::var("FLEET_TEST_LIMIT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(TEST_LIMIT);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            let overrun = CURRENT_TEST
                .lock()
                .ok()
                .and_then(|c| c.clone())
                .filter(|(_, since, extra)| since.elapsed() > limit + *extra);
            if let Some((test, since, _)) = overrun {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "\n[{test}] still running after {:?} (limit {limit:?}): ending this test binary",
                    since.elapsed()
                );
                std::process::exit(124);
            }
        });
    });
}

pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A scratch directory for unit files.
pub fn scratch(test: &str) -> Result<PathBuf> {
    crate::process::scratch_dir(&std::env::temp_dir(), &format!("fleet-{test}"))
}

/// A connection to one machine's systemd, from the host.
pub struct MachineBus {
    conn: zbus::Connection,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitProps {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub main_pid: u32,
    /// `Description=`: which version of a unit file systemd runs, in tests that say it there.
    pub description: String,
}

impl MachineBus {
    pub async fn connect(m: &MachineProc) -> Result<Self> {
        let conn = zbus::connection::Builder::address(m.bus_address().as_str())?
            .build()
            .await
            .with_context(|| format!("bus of {}", m.name))?;
        Ok(MachineBus { conn })
    }

    async fn manager(&self) -> Result<zbus::Proxy<'_>> {
        Ok(zbus::Proxy::new(
            &self.conn,
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
        )
        .await?)
    }

    /// systemd's view of `unit` (loading it if needed: a unit without a file is `not-found`).
    pub async fn unit(&self, unit: &str) -> Result<UnitProps> {
        let path: zbus::zvariant::OwnedObjectPath = self.manager().await?.call("LoadUnit", &(unit,)).await?;
        let u = zbus::Proxy::new(&self.conn, "org.freedesktop.systemd1", path.clone(), "org.freedesktop.systemd1.Unit")
            .await?;
        let s =
            zbus::Proxy::new(&self.conn, "org.freedesktop.systemd1", path, "org.freedesktop.systemd1.Service").await?;
        Ok(UnitProps {
            load_state: u.get_property("LoadState").await?,
            active_state: u.get_property("ActiveState").await?,
            sub_state: u.get_property("SubState").await?,
            main_pid: s.get_property("MainPID").await.unwrap_or(0),
            description: u.get_property("Description").await?,
        })
    }

    /// When systemd last saw `unit` become active (µs since the epoch, systemd's own clock
    /// reading); 0 if it never was.
    pub async fn active_since_usec(&self, unit: &str) -> Result<u64> {
        let path: zbus::zvariant::OwnedObjectPath = self.manager().await?.call("LoadUnit", &(unit,)).await?;
        let u = zbus::Proxy::new(&self.conn, "org.freedesktop.systemd1", path, "org.freedesktop.systemd1.Unit").await?;
        Ok(u.get_property("ActiveEnterTimestamp").await?)
    }

    /// The file systemd loaded `unit` from.
    pub async fn fragment_path(&self, unit: &str) -> Result<String> {
        let path: zbus::zvariant::OwnedObjectPath = self.manager().await?.call("LoadUnit", &(unit,)).await?;
        let u = zbus::Proxy::new(&self.conn, "org.freedesktop.systemd1", path, "org.freedesktop.systemd1.Unit").await?;
        Ok(u.get_property("FragmentPath").await?)
    }

    /// ActiveState of many units in one call (units systemd does not know are left out).
    pub async fn active_states(&self, units: &[String]) -> Result<std::collections::HashMap<String, String>> {
        let names: Vec<&str> = units.iter().map(String::as_str).collect();
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            zbus::zvariant::OwnedObjectPath,
            u32,
            String,
            zbus::zvariant::OwnedObjectPath,
        );
        let rows: Vec<Row> = self.manager().await?.call("ListUnitsByNames", &(names,)).await?;
        Ok(rows.into_iter().filter(|r| r.2 != "not-found").map(|r| (r.0, r.3)).collect())
    }

    /// Kills `unit`'s main process with SIGKILL, as a crash would: a service without
    /// `Restart=` ends `failed`.
    pub async fn kill(&self, unit: &str) -> Result<()> {
        let _: () = self.manager().await?.call("KillUnit", &(unit, "main", 9i32)).await?;
        Ok(())
    }

    pub async fn restart(&self, unit: &str) -> Result<()> {
        let _: zbus::zvariant::OwnedObjectPath = self.manager().await?.call("RestartUnit", &(unit, "replace")).await?;
        Ok(())
    }
}

/// A `fleetctl events --follow` running in the background, its lines collected: what a user
/// watching the cluster sees.
pub struct EventFollower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line so far.
    pub seen: Vec<String>,
}

impl EventFollower {
    /// Starts `fleetctl events --follow ARGS` against `endpoints` (comma-separated) with the
    /// lab's admin identity, and waits until it has pinned where it starts (its first request).
    pub fn start(state: &LabState, endpoints: &str, args: &[&str]) -> Result<EventFollower> {
        use std::io::BufRead;
        let mut child = Command::new(state.bin_dir.join("fleetctl"))
            .args(["events", "--follow", "--lines", "0"])
            .args(args)
            .env("FLEETCTL_ENDPOINT", endpoints)
            .envs(fleetctl_env())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("cannot start fleetctl events --follow")?;
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().context("no stdout")?;
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        // It asks where "now" is, then opens the stream: events before that are not its.
        std::thread::sleep(Duration::from_millis(500));
        Ok(EventFollower { child, lines, seen: Vec::new() })
    }

    /// Waits up to `limit` for a line holding every one of `words`; returns it.
    pub fn expect(&mut self, words: &[&str], limit: Duration) -> Result<String> {
        let until = Instant::now() + limit;
        loop {
            if let Some(l) = self.seen.iter().find(|l| words.iter().all(|w| l.contains(w))) {
                return Ok(l.clone());
            }
            match self.lines.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(l) => self.seen.push(l),
                Err(_) => bail!("no event line with {words:?} within {limit:?}; seen:\n{}", self.seen.join("\n")),
            }
        }
    }
}

impl Drop for EventFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a test of rolling reboots sees at one moment: the machines registered, each test unit
/// (name, machine it is scheduled on, active?) and how many reboot slots are held.
#[derive(Debug, Default)]
pub struct RebootSample {
    pub machines: std::collections::HashSet<String>,
    pub units: Vec<(String, String, bool)>,
    pub slot_holders: usize,
}

/// One sample through the API (machines, units named `unit_prefix*`, their states) and etcd
/// (the `default` group's FleetLock semaphore); `None` when a call fails or takes over 3 s.
pub async fn reboot_sample(
    api: &fleet_client::Client,
    etcd: &mut etcd_client::Client,
    unit_prefix: &str,
) -> Option<RebootSample> {
    let machines = api.machines().await.ok()?.into_iter().map(|m| m.id).collect();
    let states = api.states(None).await.ok()?;
    let units = api
        .units()
        .await
        .ok()?
        .into_iter()
        .filter(|u| u.name.starts_with(unit_prefix))
        .map(|u| {
            let active = states.iter().any(|s| s.name == u.name && s.systemd_active_state == "active");
            (u.name, u.machine_id, active)
        })
        .collect();
    let key = format!("{}reboot-lock/default", crate::ETCD_PREFIX);
    let resp = tokio::time::timeout(Duration::from_secs(3), etcd.get(key, None)).await.ok()?.ok()?;
    let slot_holders = match resp.kvs().first() {
        Some(kv) => serde_json::from_slice::<serde_json::Value>(kv.value()).ok()?["holders"].as_array()?.len(),
        None => 0,
    };
    Some(RebootSample { machines, units, slot_holders })
}
