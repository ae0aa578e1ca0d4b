//! `fleetctl rollout`: roll a new version of a service over its running instances, and watch,
//! pause, resume, promote or undo it (docs/services.md). Not in the original fleetctl.

use crate::{read_unit_file, unit_name_of, Ctl};
use anyhow::{bail, Result};
use fleet_api::{Rollout, RolloutRequest};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// What `fleetctl rollout` was asked, from its arguments.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Asked {
    /// A new version from a local unit file.
    Start(String),
    Status(Option<String>),
    /// pause, resume, promote or undo.
    Act(&'static str, String),
}

pub(crate) fn asked(args: &[String]) -> Result<Asked> {
    const ACTIONS: [&str; 4] = ["pause", "resume", "promote", "undo"];
    match args {
        [] => bail!("fleetctl rollout FILE | status [SERVICE] | pause|resume|promote|undo SERVICE"),
        [s] if s == "status" => Ok(Asked::Status(None)),
        [s, service] if s == "status" => Ok(Asked::Status(Some(unit_name_of(service)))),
        [a, service] if ACTIONS.contains(&a.as_str()) => {
            let action = ACTIONS.iter().find(|x| **x == a.as_str()).copied().unwrap_or("status");
            Ok(Asked::Act(action, unit_name_of(service)))
        }
        [a] if ACTIONS.contains(&a.as_str()) => bail!("fleetctl rollout {a} SERVICE: which service?"),
        [file] => Ok(Asked::Start(file.clone())),
        _ => bail!("fleetctl rollout takes one unit file (the new version), or an action and a service"),
    }
}

/// `fleetctl rollout`'s flags for a new rollout.
pub(crate) struct Settings {
    pub max_parallel: u32,
    pub canaries: u32,
    pub min_healthy: Duration,
    pub deadline: Duration,
    pub no_block: bool,
}

fn line(r: &Rollout) -> String {
    let back =
        if r.reverting && !r.why_back.is_empty() { format!(" (going back: {})", r.why_back) } else { String::new() };
    format!("rollout {}: {}{back}: {}", r.service, r.phase, r.note)
}

impl Ctl {
    pub(crate) async fn rollout(&self, args: &[String], s: &Settings) -> Result<ExitCode> {
        match asked(args)? {
            Asked::Start(file) => self.start_rollout(&file, s).await,
            Asked::Status(None) => {
                let all = self.api.rollouts().await?;
                if self.json {
                    println!("{}", serde_json::to_string_pretty(&all)?);
                    return Ok(ExitCode::SUCCESS);
                }
                let header: Vec<String> = ["SERVICE", "PHASE", "DONE", "NOTE"].map(String::from).to_vec();
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|r| {
                        let done = r.instances.iter().filter(|i| i.done).count();
                        vec![
                            r.service.clone(),
                            r.phase.clone(),
                            format!("{done}/{}", r.instances.len()),
                            r.note.clone(),
                        ]
                    })
                    .collect();
                print!("{}", crate::table::render(Some(&header), &rows));
                Ok(ExitCode::SUCCESS)
            }
            Asked::Status(Some(service)) => {
                let Some(r) = self.api.rollout(&service).await? else { bail!("no rollout of {service}") };
                self.show(&r)?;
                Ok(ExitCode::SUCCESS)
            }
            Asked::Act(action, service) => {
                let r = self.api.rollout_action(&service, action).await?;
                println!("{}", line(&r));
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    fn show(&self, r: &Rollout) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(r)?);
            return Ok(());
        }
        println!("Service:   {}", r.service);
        let way = if r.reverting { format!(", going back ({})", r.why_back) } else { String::new() };
        println!("Phase:     {}{way}", r.phase);
        println!("Versions:  new {}, previous {}", short(&r.version), short(&r.previous));
        println!(
            "Settings:  max-parallel {}, canaries {}{}, min-healthy-time {}s, deadline {}s",
            r.max_parallel,
            r.canaries,
            if r.promoted { " (promoted)" } else { "" },
            r.min_healthy_secs,
            r.deadline_secs
        );
        println!("Started:   {}", r.created);
        println!("Note:      {}", r.note);
        let header: Vec<String> =
            ["INSTANCE", "VERSION", "MACHINE", "ACTIVE", "HEALTH", "DONE"].map(String::from).to_vec();
        let mut rows = Vec::new();
        for i in &r.instances {
            rows.push(vec![
                i.name.clone(),
                i.version.clone(),
                if i.machine.is_empty() { "-".into() } else { format!("{}...", short(&i.machine)) },
                if i.active_state.is_empty() { "-".into() } else { i.active_state.clone() },
                if i.health.is_empty() { "-".into() } else { i.health.clone() },
                if i.done { "yes".into() } else { "no".into() },
            ]);
        }
        print!("{}", crate::table::render(Some(&header), &rows));
        Ok(())
    }

    async fn start_rollout(&self, file: &str, s: &Settings) -> Result<ExitCode> {
        let service = unit_name_of(file);
        let unit = read_unit_file(Path::new(file))?;
        let req = RolloutRequest {
            service: service.clone(),
            options: unit.options,
            max_parallel: Some(s.max_parallel),
            canaries: Some(s.canaries),
            min_healthy_secs: Some(s.min_healthy.as_secs()),
            deadline_secs: Some(s.deadline.as_secs().max(1)),
        };
        let r = self.api.create_rollout(&req).await?;
        println!(
            "Rolling out {} over {} instances of {service}, {} at a time",
            short(&r.version),
            r.instances.len(),
            r.max_parallel
        );
        if s.no_block {
            return Ok(ExitCode::SUCCESS);
        }
        // Follow it: say what changes, until it is over or waits for a promote.
        let mut last = String::new();
        loop {
            let Some(r) = self.api.rollout(&service).await? else { bail!("the rollout of {service} is gone") };
            let now = line(&r);
            if now != last {
                println!("{now}");
                last = now;
            }
            match r.phase.as_str() {
                "succeeded" => return Ok(ExitCode::SUCCESS),
                "awaiting-promotion" => {
                    println!("Canaries healthy: `fleetctl rollout promote {service}` to go on, `undo` to go back");
                    return Ok(ExitCode::SUCCESS);
                }
                "reverted" | "failed" => return Ok(ExitCode::from(1)),
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(8)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(args: &[&str]) -> Result<Asked> {
        asked(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn arguments_say_what_is_asked() {
        assert_eq!(a(&["web@.service"]).unwrap(), Asked::Start("web@.service".into()));
        assert_eq!(a(&["units/web@.service"]).unwrap(), Asked::Start("units/web@.service".into()));
        assert_eq!(a(&["status"]).unwrap(), Asked::Status(None));
        assert_eq!(a(&["status", "web@"]).unwrap(), Asked::Status(Some("web@.service".into())));
        assert_eq!(a(&["promote", "web@.service"]).unwrap(), Asked::Act("promote", "web@.service".into()));
        assert!(a(&["undo"]).unwrap_err().to_string().contains("which service"));
        assert!(a(&[]).is_err());
        assert!(a(&["a.service", "b.service"]).is_err());
    }
}
