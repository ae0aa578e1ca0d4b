//! Health checks of this machine's units (`[X-Fleet] HealthCheck=`): each active unit's check
//! runs on its own timer and sends its results to the agent's loop, which keeps each unit's
//! [`HealthTracker`] (the pure state machine in `fleet_model::health`) and publishes its health
//! with its state when it changes.
//!
//! A command check runs as the agent runs (root), as the unit's own `ExecStart=` would by
//! default: whoever may submit the unit may already run it. An HTTP check is fetched from the
//! machine itself.

use fleet_model::health::{HealthCheck, Probe};
use std::collections::HashMap;
use std::process::Stdio;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// One check's result: the unit, the run of its check that made it, and whether it passed.
pub type CheckResult = (String, u64, bool);

/// The checks running now, one task per active unit with a check.
pub struct Checks {
    /// Each unit's check, the run it is in, and its task.
    running: HashMap<String, (HealthCheck, u64, JoinHandle<()>)>,
    /// Runs started so far: a result of a run that was stopped (it may be queued already when
    /// its task is aborted) is told apart from the current run's and ignored.
    runs: u64,
    results: mpsc::UnboundedSender<CheckResult>,
    http: reqwest::Client,
}

impl Checks {
    pub fn new(results: mpsc::UnboundedSender<CheckResult>) -> Self {
        // Checks fetch from this machine: no proxy from the environment.
        let http = reqwest::Client::builder().no_proxy().build().unwrap_or_default();
        Checks { running: HashMap::new(), runs: 0, results, http }
    }

    /// Runs `unit`'s check while `run` is true (the unit is active and has one), stops it
    /// otherwise; a changed check restarts.
    pub fn set(&mut self, unit: &str, check: Option<&HealthCheck>, run: bool) {
        let wanted = check.filter(|_| run);
        match (self.running.get(unit), wanted) {
            (Some((old, _, _)), Some(new)) if old == new => {}
            (None, None) => {}
            (_, wanted) => {
                if let Some((_, _, task)) = self.running.remove(unit) {
                    task.abort();
                }
                if let Some(check) = wanted {
                    self.runs += 1;
                    let task = tokio::spawn(run_check(
                        unit.to_string(),
                        self.runs,
                        check.clone(),
                        self.results.clone(),
                        self.http.clone(),
                    ));
                    self.running.insert(unit.to_string(), (check.clone(), self.runs, task));
                }
            }
        }
    }

    /// Whether a result of `run` is of `unit`'s current check (not of one stopped since).
    pub fn current(&self, unit: &str, run: u64) -> bool {
        self.running.get(unit).is_some_and(|(_, r, _)| *r == run)
    }

    /// Units whose checks run now.
    pub fn running(&self) -> impl Iterator<Item = &String> {
        self.running.keys()
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        for (_, _, task) in self.running.values() {
            task.abort();
        }
    }
}

async fn run_check(
    unit: String,
    run: u64,
    check: HealthCheck,
    results: mpsc::UnboundedSender<CheckResult>,
    http: reqwest::Client,
) {
    let mut every = tokio::time::interval(check.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let passed = probe(&check, &http).await;
        if results.send((unit.clone(), run, passed)).is_err() {
            return;
        }
    }
}

/// Runs one check within its timeout: a command that exits 0, or an HTTP GET answered 2xx.
pub async fn probe(check: &HealthCheck, http: &reqwest::Client) -> bool {
    let attempt = async {
        match &check.probe {
            Probe::Exec(argv) => {
                let Some((program, args)) = argv.split_first() else { return false };
                tokio::process::Command::new(program)
                    .args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .status()
                    .await
                    .is_ok_and(|s| s.success())
            }
            Probe::Http(url) => http.get(url).send().await.is_ok_and(|r| r.status().is_success()),
        }
    };
    tokio::time::timeout(check.timeout, attempt).await.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn check(probe: Probe, timeout_ms: u64) -> HealthCheck {
        HealthCheck {
            probe,
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(timeout_ms),
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            grace: std::time::Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn probes_pass_on_success_and_fail_on_failure_or_timeout() {
        let http = reqwest::Client::new();
        let exec = |args: &[&str]| Probe::Exec(args.iter().map(|s| s.to_string()).collect());
        assert!(probe(&check(exec(&["/bin/sh", "-c", "exit 0"]), 2000), &http).await);
        assert!(!probe(&check(exec(&["/bin/sh", "-c", "exit 3"]), 2000), &http).await);
        assert!(!probe(&check(exec(&["/nonexistent/check"]), 2000), &http).await);
        assert!(!probe(&check(exec(&["/bin/sleep", "5"]), 100), &http).await, "timed out");
        // An HTTP check: a server answering 200, then 503, then nobody listening.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
        let addr = listener.local_addr().expect("addr");
        let code = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(200));
        let served = code.clone();
        let app = axum::Router::new().route(
            "/health",
            axum::routing::get(move || {
                let c = served.load(std::sync::atomic::Ordering::Relaxed);
                async move { axum::http::StatusCode::from_u16(c).unwrap_or(axum::http::StatusCode::OK) }
            }),
        );
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let url = Probe::Http(format!("http://{addr}/health"));
        assert!(probe(&check(url.clone(), 2000), &http).await);
        code.store(503, std::sync::atomic::Ordering::Relaxed);
        assert!(!probe(&check(url.clone(), 2000), &http).await);
        server.abort();
        let _ = server.await;
        assert!(!probe(&check(url, 2000), &http).await);
    }

    #[tokio::test]
    async fn checks_run_while_wanted_and_stop_when_not() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut checks = Checks::new(tx);
        let ok = check(Probe::Exec(vec!["/bin/true".into()]), 1000);
        checks.set("a.service", Some(&ok), true);
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("a result");
        let Some((unit, run, passed)) = got else { panic!("no result") };
        assert_eq!((unit.as_str(), passed), ("a.service", true));
        assert!(checks.current("a.service", run));
        checks.set("a.service", Some(&ok), false);
        assert_eq!(checks.running().count(), 0);
        // A result of the stopped run, were one still queued, is not of the current check; nor
        // is one of an earlier run once the check runs again.
        assert!(!checks.current("a.service", run));
        checks.set("a.service", Some(&ok), true);
        assert!(!checks.current("a.service", run));
        checks.set("a.service", Some(&ok), false);
        while rx.try_recv().is_ok() {}
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rx.try_recv().is_err(), "a stopped check still reports");
    }
}
