//! Looking at one unit: `status`, `journal`, `cat`.

use crate::*;

impl Ctl {
    pub(crate) async fn status(&self, args: &[String]) -> Result<ExitCode> {
        if args.is_empty() {
            eprintln!("One unit file must be provided");
            return Ok(ExitCode::from(1));
        }
        let mut code = ExitCode::SUCCESS;
        let mut json = Vec::new();
        for (i, arg) in args.iter().enumerate() {
            let name = unit_name_of(arg);
            let Some(u) = self.api.unit(&name).await? else {
                eprintln!("Unit {name} does not exist.");
                return Ok(ExitCode::from(1));
            };
            let loaded = u.is_global() || u.current() != Some(fleet_model::DesiredState::Inactive);
            let statuses = if loaded { self.api.unit_status(&name).await.ok() } else { None };
            // The unit's last events, from the engine's history (an engine without events, as
            // the original's, leaves them out).
            let query = fleet_client::EventQuery { units: vec![name.clone()], tail: Some(5), ..Default::default() };
            let events = self.api.events(&query).await.map(|p| p.events).unwrap_or_default();
            if self.json {
                json.push(serde_json::json!({
                    "name": name, "desiredState": u.desired_state, "currentState": u.current_state,
                    "machineID": u.machine_id, "reason": u.reason,
                    "statuses": statuses.clone().unwrap_or_default(),
                    "events": events,
                }));
                continue;
            }
            let Some(statuses) = statuses.filter(|s| !s.is_empty()) else {
                match u.reason.as_str() {
                    "" => eprintln!("Unit {name} does not appear to be loaded."),
                    why => eprintln!("Unit {name} does not appear to be loaded: {why}"),
                }
                return Ok(ExitCode::from(1));
            };
            if i > 0 {
                println!();
            }
            for s in statuses {
                print!("{}", s.output);
                if s.exit_code != 0 && code == ExitCode::SUCCESS {
                    code = ExitCode::from(s.exit_code.clamp(1, 255) as u8);
                }
            }
            if !events.is_empty() {
                println!("\nRecent fleet events:");
                for e in &events {
                    println!("  {}", crate::events::line(e, false));
                }
            }
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        Ok(code)
    }

    pub(crate) async fn journal(
        &self,
        arg: &str,
        lines: u32,
        follow: bool,
        output: &str,
        machine: Option<&str>,
    ) -> Result<ExitCode> {
        let name = unit_name_of(arg);
        let Some(u) = self.api.unit(&name).await? else {
            eprintln!("Unit {name} does not exist.");
            return Ok(ExitCode::from(1));
        };
        if u.is_global() && machine.is_none() {
            eprintln!("Unable to retrieve journal of global unit {name}: name a machine with --machine.");
            return Ok(ExitCode::from(1));
        }
        if !u.is_global() && u.current() == Some(fleet_model::DesiredState::Inactive) {
            eprintln!("Unit {name} does not appear to be running.");
            return Ok(ExitCode::from(1));
        }
        self.api.journal(&name, lines, follow, output, machine, &mut std::io::stdout()).await?;
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) async fn cat(&self, args: &[String]) -> Result<ExitCode> {
        if args.len() != 1 {
            eprintln!("One unit file must be provided");
            return Ok(ExitCode::from(1));
        }
        let name = unit_name_of(&args[0]);
        match self.api.unit(&name).await? {
            Some(u) => {
                print!("{}", UnitFile::from_options(u.options).canonical());
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("Unit {name} not found");
                Ok(ExitCode::from(1))
            }
        }
    }
}
