//! Commands about machines: `move` (a unit to another machine) and `drain`.

use crate::*;

impl Ctl {
    pub(crate) async fn machines(&self) -> Result<HashMap<String, Machine>> {
        Ok(self.api.machines().await?.into_iter().map(|m| (m.id.clone(), m)).collect())
    }

    /// Moves a running unit; waits until it runs on its new machine unless told not to.
    pub(crate) async fn move_unit(&self, arg: &str, machine: Option<&str>, block: &Block) -> Result<ExitCode> {
        let name = unit_name_of(arg);
        let Some(unit) = self.api.unit(&name).await? else {
            eprintln!("Unit {name} does not exist.");
            return Ok(ExitCode::from(1));
        };
        let from = unit.machine_id.clone();
        self.api.request_move(&name, machine).await.with_context(|| format!("cannot move {name}"))?;
        if block.no_block {
            println!("Triggered unit {name} move");
            return Ok(ExitCode::SUCCESS);
        }
        let until = deadline(block);
        let mut delay = Duration::from_millis(20);
        loop {
            let Some(u) = self.api.unit(&name).await? else { bail!("unit {name} was destroyed while moving it") };
            if !u.move_refused.is_empty() {
                eprintln!("Error moving unit: {}", u.move_refused);
                let _ = self.api.forget_move(&name).await;
                return Ok(ExitCode::from(1));
            }
            if !u.machine_id.is_empty() && u.machine_id != from && u.current_state == u.desired_state {
                let running = u.desired() != Some(fleet_model::DesiredState::Launched)
                    || self
                        .api
                        .states(Some(&name))
                        .await?
                        .iter()
                        .any(|s| s.machine_id == u.machine_id && s.systemd_active_state == "active");
                if running {
                    println!("Unit {name} moved to {}", machine_legend(&self.machines().await?, &u.machine_id, false));
                    return Ok(ExitCode::SUCCESS);
                }
            }
            if until.is_some_and(|t| Instant::now() >= t) {
                eprintln!("Error moving unit: timed out waiting for {name} to run on its new machine");
                return Ok(ExitCode::from(1));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    /// Drains a machine and waits until no unit is scheduled to it or reported by it.
    pub(crate) async fn drain(&self, machine: &str, block: &Block) -> Result<ExitCode> {
        let id = self.api.drain(machine, false).await.with_context(|| format!("cannot drain {machine}"))?;
        if block.no_block {
            println!("Triggered drain of machine {id}");
            return Ok(ExitCode::SUCCESS);
        }
        let until = deadline(block);
        let mut progress = Progress::new();
        loop {
            let scheduled = self.api.units().await?.into_iter().filter(|u| u.machine_id == id).count();
            let reported = self.api.states(None).await?.into_iter().filter(|s| s.machine_id == id).count();
            if scheduled == 0 && reported == 0 {
                progress.clear();
                println!("Machine {id} drained");
                return Ok(ExitCode::SUCCESS);
            }
            if until.is_some_and(|t| Instant::now() >= t) {
                eprintln!("Error draining machine: {} unit(s) still on {id}", scheduled.max(reported));
                return Ok(ExitCode::from(1));
            }
            progress.tick(&format!("draining {id}: {} unit(s) left", scheduled.max(reported)));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
