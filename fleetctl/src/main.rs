//! fleetctl: the fleet user's command line, over the `/fleet/v1` REST API.
//!
//! Commands, flags, columns and messages follow the original fleetctl so scripts keep working.
//! A REST client only: it depends on `fleet-model` for names and unit files and on `fleet-api`
//! for what goes over the wire, and must not depend on etcd's client or gRPC
//! (`tests/dependencies.rs` keeps it so).

mod cli;
mod contexts;
mod events;
mod inspect;
mod join;
mod lists;
mod machines;
mod progress;
mod rollout;
mod table;
mod units;

use cli::*;
use lists::*;
use progress::Progress;

use anyhow::{bail, Context, Result};
use clap::Parser;
use fleet_client::{Client, Machine};
use fleet_model::UnitFile;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// mimalloc rather than glibc's allocator: `fleetctl start` of a million units builds and frees
/// request bodies of megabytes, which glibc served with fresh mappings each time; 9% of the
/// host's CPU samples during that submission were the kernel zeroing those pages for fleetctl.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Version => {
            println!("fleetctl version {}", env!("CARGO_PKG_VERSION"));
            return Ok(ExitCode::SUCCESS);
        }
        Command::Verify { .. } => {
            eprintln!("WARNING: The signed/verified units feature is DEPRECATED and cannot be used.");
            return Ok(ExitCode::from(2));
        }
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Cli::command(), "fleetctl", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .context("cannot write the man page")?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let given = contexts::Given {
        config: cli.config.clone().filter(|p| !p.as_os_str().is_empty()),
        context: cli.context.clone().filter(|c| !c.is_empty()),
        endpoint: cli.endpoint.clone(),
        request_timeout: cli.request_timeout,
        ca_file: cli.ca_file.clone(),
        cert_file: cli.cert_file.clone(),
        key_file: cli.key_file.clone(),
        token: cli.token.clone(),
    };
    let file = contexts::load(given.config.as_deref())?;
    let settings = contexts::settings(&given, file.as_ref())?;
    let creds = fleet_client::Credentials {
        ca_file: settings.ca_file,
        cert_file: settings.cert_file,
        key_file: settings.key_file,
        token: settings.token,
    };
    let api = Client::new(&settings.endpoint, Duration::from_secs_f64(settings.request_timeout), &creds)
        .context("Unable to initialize client")?;
    let ctl = Ctl { api, json: cli.format == Format::Json };
    match cli.command {
        Command::Contexts => {
            print!("{}", contexts::list(&given, file.as_ref())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit { replace, units } => ctl.submit(&units.all()?, replace, None).await,
        Command::Load { block, replace, units } => {
            ctl.submit(&units.all()?, replace, Some((fleet_model::DesiredState::Loaded, block))).await
        }
        Command::Start { block, replace, units } => {
            ctl.submit(&units.all()?, replace, Some((fleet_model::DesiredState::Launched, block))).await
        }
        Command::Stop { block, units } => ctl.stop(&units.all()?, &block).await,
        Command::Unload { block, units } => ctl.unload(&units.all()?, &block).await,
        Command::Destroy { block, units } => ctl.destroy(&units.all()?, &block).await,
        Command::Cat { units } => ctl.cat(&units).await,
        Command::Status { units } => ctl.status(&units).await,
        Command::Journal { lines, follow, output, sudo: _, machine, unit } => {
            ctl.journal(&unit, lines, follow, &output, machine.as_deref()).await
        }
        Command::Events { follow, since, lines, machine, kind, full, units } => {
            let query = fleet_client::EventQuery {
                since,
                units: units.iter().map(|u| unit_name_of(u)).collect(),
                machine,
                kinds: kind,
                ..Default::default()
            };
            ctl.events(query, lines, follow, full).await
        }
        Command::Restart { block, units } => ctl.restart(&units, &block).await,
        Command::Drain { block, machine } => ctl.drain(&machine, &block).await,
        Command::Rollout { max_parallel, canaries, min_healthy_time, deadline, no_block, args } => {
            let settings =
                rollout::Settings { max_parallel, canaries, min_healthy: min_healthy_time, deadline, no_block };
            ctl.rollout(&args, &settings).await
        }
        Command::Undrain { machine } => {
            ctl.api.drain(&machine, true).await?;
            println!("Machine {machine} undrained");
            Ok(ExitCode::SUCCESS)
        }
        Command::JoinToken { action } => ctl.join_token(action, &settings.endpoint).await,
        Command::Wait { state, block, units } => ctl.wait(&units, &state, &block).await,
        Command::Move { block, unit, machine } => ctl.move_unit(&unit, machine.as_deref(), &block).await,
        Command::ListUnits(f) => ctl.list_units(&f).await,
        Command::ListUnitFiles(f) => ctl.list_unit_files(&f).await,
        Command::ListMachines(f) => ctl.list_machines(&f).await,
        Command::Version | Command::Verify { .. } | Command::Completion { .. } | Command::Man => Ok(ExitCode::SUCCESS),
    }
}

/// `foo` -> `foo.service`, `dir/bar.socket` -> `bar.socket`, as the original mangles names.
fn unit_name_of(arg: &str) -> String {
    let base = Path::new(arg).file_name().map(|b| b.to_string_lossy().into_owned()).unwrap_or_else(|| arg.to_string());
    const KNOWN: &[&str] = &[".service", ".socket", ".timer", ".path", ".device", ".mount", ".automount"];
    if KNOWN.iter().any(|s| base.ends_with(s)) {
        base
    } else {
        format!("{base}.service")
    }
}

fn read_unit_file(path: &Path) -> Result<UnitFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read unit file {}", path.display()))?;
    UnitFile::parse(&text).with_context(|| format!("unit file {}", path.display()))
}

struct Ctl {
    api: Client,
    json: bool,
}

fn deadline(block: &Block) -> Option<Instant> {
    (block.block_attempts > 0).then(|| Instant::now() + Duration::from_secs(2 * block.block_attempts as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_mangled_like_the_original() {
        assert_eq!(unit_name_of("foo"), "foo.service");
        assert_eq!(unit_name_of("foo.1"), "foo.1.service");
        assert_eq!(unit_name_of("dir/bar.socket"), "bar.socket");
        assert_eq!(unit_name_of("examples/hello.service"), "hello.service");
    }

    #[test]
    fn field_lists_are_checked() {
        let f = |s: &str| ListFlags { fields: Some(s.into()), full: false, no_legend: false };
        assert!(fields(&f("unit,bogus"), "", &["hash"]).is_err());
        assert_eq!(
            fields(&f(""), "", &[]).map_err(|e| e.to_string()).err().as_deref(),
            Some("Must define output format")
        );
        assert_eq!(fields(&f("unit,hash"), "", &["hash"]).ok(), Some(vec!["unit".to_string(), "hash".to_string()]));
    }
}
