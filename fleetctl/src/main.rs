//! fleetctl: the fleet user's command line, over the `/fleet/v1` REST API.
//!
//! Commands, flags, columns and messages follow the original fleetctl so scripts keep working.

mod client;
mod table;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use client::{Client, Machine, Unit, UnitState};
use fleet_model::schema::is_stopped;
use fleet_model::{UnitFile, UnitName};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "fleetctl",
    version,
    about = "fleetctl: run systemd units across a fleet cluster",
    before_help = concat!("fleetctl version ", env!("CARGO_PKG_VERSION")),
    infer_subcommands = true
)]
struct Cli {
    /// Output format of list and status commands.
    #[arg(short = 'o', long = "format", global = true, value_enum, default_value = "table")]
    format: Format,
    /// fleet API endpoint.
    #[arg(long, global = true, env = "FLEETCTL_ENDPOINT", default_value = "unix:///var/run/fleet.sock")]
    endpoint: String,
    /// Seconds to wait for each API request.
    #[arg(long, global = true, env = "FLEETCTL_REQUEST_TIMEOUT", default_value_t = 10.0)]
    request_timeout: f64,
    /// CA certificate (PEM) to verify an https:// endpoint with.
    #[arg(long, global = true, env = "FLEETCTL_CA_FILE")]
    ca_file: Option<String>,
    /// Client certificate (PEM) for endpoints that require one.
    #[arg(long, global = true, env = "FLEETCTL_CERT_FILE")]
    cert_file: Option<String>,
    /// Private key (PEM) of --cert-file.
    #[arg(long, global = true, env = "FLEETCTL_KEY_FILE")]
    key_file: Option<String>,
    /// API token (see docs/security.md); sent as a bearer token.
    #[arg(long, global = true, env = "FLEETCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Args, Debug, Clone)]
struct Block {
    /// Do not wait for units to reach the requested state.
    #[arg(long)]
    no_block: bool,
    /// Wait this many ~2 s attempts for the state (0 = wait forever).
    #[arg(long, default_value_t = 0)]
    block_attempts: u32,
}

#[derive(Args, Debug, Clone)]
struct ListFlags {
    /// Columns to show, comma-separated.
    #[arg(long)]
    fields: Option<String>,
    /// Show full machine ids and hashes.
    #[arg(long, short = 'l', visible_alias = "l")]
    full: bool,
    /// Omit the header line.
    #[arg(long)]
    no_legend: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Upload unit files without scheduling them.
    Submit {
        #[arg(long)]
        replace: bool,
        units: Vec<String>,
    },
    /// Schedule units to machines without starting them.
    Load {
        #[command(flatten)]
        block: Block,
        #[arg(long)]
        replace: bool,
        units: Vec<String>,
    },
    /// Schedule and start units.
    Start {
        #[command(flatten)]
        block: Block,
        #[arg(long)]
        replace: bool,
        units: Vec<String>,
    },
    /// Stop units, leaving them loaded.
    Stop {
        #[command(flatten)]
        block: Block,
        units: Vec<String>,
    },
    /// Unschedule units, leaving them submitted.
    Unload {
        #[command(flatten)]
        block: Block,
        units: Vec<String>,
    },
    /// Remove units from the cluster.
    Destroy {
        #[command(flatten)]
        block: Block,
        units: Vec<String>,
    },
    /// Print a unit's file.
    Cat { units: Vec<String> },
    /// Move a unit to another machine (MACHINE: full id or unique prefix), or to the best other one.
    Move {
        #[command(flatten)]
        block: Block,
        unit: String,
        machine: Option<String>,
    },
    /// Move every unit off a machine (full id or unique prefix) and keep new ones away.
    Drain {
        #[command(flatten)]
        block: Block,
        machine: String,
    },
    /// Let a drained machine take units again.
    Undrain { machine: String },
    /// `systemctl status` of units on their machines (through the agents; no SSH), and why a unit
    /// is not placed.
    Status { units: Vec<String> },
    /// Journal lines of a unit on its machine (through its agent; no SSH).
    Journal {
        /// Number of recent lines to show.
        #[arg(long, short = 'n', default_value_t = 10)]
        lines: u32,
        /// Keep printing new lines.
        #[arg(long, short = 'f', visible_alias = "f")]
        follow: bool,
        /// journalctl output mode (short, short-iso, json, cat, ...).
        #[arg(long, default_value = "short")]
        output: String,
        /// Accepted for compatibility; the agent reads the journal itself.
        #[arg(long, hide = true)]
        sudo: bool,
        /// For a global unit: the machine to read (full id or unique prefix).
        #[arg(long)]
        machine: Option<String>,
        unit: String,
    },
    /// Restart units: stop (waiting until stopped), then start (waiting until active).
    Restart {
        #[command(flatten)]
        block: Block,
        units: Vec<String>,
    },
    /// Wait until units reach a state: active (launched and running), launched, loaded or inactive.
    Wait {
        #[arg(long = "for", default_value = "active")]
        state: String,
        #[command(flatten)]
        block: Block,
        units: Vec<String>,
    },
    /// Deprecated (signed units were removed from fleet); exits 2.
    #[command(hide = true)]
    Verify { units: Vec<String> },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
    /// Print fleetctl's man page (roff).
    Man,
    /// One row per unit per machine that reports it.
    ListUnits(ListFlags),
    /// One row per unit in the cluster.
    ListUnitFiles(ListFlags),
    /// One row per live machine.
    ListMachines(ListFlags),
    /// Print the version.
    Version,
}

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
    if !(cli.request_timeout > 0.0 && cli.request_timeout.is_finite()) {
        bail!("--request-timeout must be a positive number of seconds");
    }
    let tls = client::TlsFiles {
        // An empty value (`--cert-file ""`, or an empty variable) means unset.
        ca_file: cli.ca_file.clone().filter(|v| !v.is_empty()),
        cert_file: cli.cert_file.clone().filter(|v| !v.is_empty()),
        key_file: cli.key_file.clone().filter(|v| !v.is_empty()),
        token: cli.token.clone().filter(|v| !v.is_empty()),
    };
    let api = Client::new(&cli.endpoint, Duration::from_secs_f64(cli.request_timeout), &tls)
        .context("Unable to initialize client")?;
    let ctl = Ctl { api, json: cli.format == Format::Json };
    match cli.command {
        Command::Submit { replace, units } => ctl.submit(&units, replace, None).await,
        Command::Load { block, replace, units } => ctl.submit(&units, replace, Some(("loaded", block))).await,
        Command::Start { block, replace, units } => ctl.submit(&units, replace, Some(("launched", block))).await,
        Command::Stop { block, units } => ctl.stop(&units, &block).await,
        Command::Unload { block, units } => ctl.unload(&units, &block).await,
        Command::Destroy { block, units } => ctl.destroy(&units, &block).await,
        Command::Cat { units } => ctl.cat(&units).await,
        Command::Status { units } => ctl.status(&units).await,
        Command::Journal { lines, follow, output, sudo: _, machine, unit } => {
            ctl.journal(&unit, lines, follow, &output, machine.as_deref()).await
        }
        Command::Restart { block, units } => ctl.restart(&units, &block).await,
        Command::Drain { block, machine } => ctl.drain(&machine, &block).await,
        Command::Undrain { machine } => {
            ctl.api.drain(&machine, true).await?;
            println!("Machine {machine} undrained");
            Ok(ExitCode::SUCCESS)
        }
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

impl Ctl {
    /// Finds or creates each unit (from the cluster, a local file, or a template), then sets the
    /// desired state if one is given, and waits for it unless told not to.
    async fn submit(&self, args: &[String], replace: bool, target: Option<(&str, Block)>) -> Result<ExitCode> {
        if args.is_empty() {
            println!("No units given");
            return Ok(ExitCode::SUCCESS);
        }
        let mut names = Vec::new();
        for arg in args {
            let name = unit_name_of(arg);
            UnitName::parse(&name).with_context(|| format!("invalid unit name {name:?}"))?;
            self.ensure_unit(arg, &name, replace, target.as_ref().map(|t| t.0))
                .await
                .context("Error creating units")?;
            names.push(name);
        }
        let Some((state, block)) = target else {
            return Ok(ExitCode::SUCCESS);
        };
        let verb = if state == "launched" { "start" } else { "load" };
        let mut waiting = Vec::new();
        for name in &names {
            let unit = self.api.unit(name).await?.with_context(|| format!("unit {name} disappeared"))?;
            if state == "launched"
                && unit.desired_state == "launched"
                && !unit.is_global()
                && self.has_failed(name).await?
            {
                // `systemctl start` semantics: starting a failed unit runs it again (the original
                // fleet did nothing, since its desired state had not changed).
                eprintln!("Unit {name} has failed; starting it again");
                let again =
                    self.restart(std::slice::from_ref(name), &Block { no_block: false, ..block.clone() }).await?;
                if again != ExitCode::SUCCESS {
                    return Ok(again);
                }
                continue;
            }
            if unit.desired_state != state {
                self.api.set_desired(name, state).await.with_context(|| format!("cannot set {name} to {state}"))?;
            }
            if unit.is_global() {
                println!("Triggered global unit {name} {verb}");
            } else if block.no_block {
                println!("Triggered unit {name} {verb}");
            } else {
                waiting.push(name.clone());
            }
        }
        if block.no_block {
            return Ok(ExitCode::SUCCESS);
        }
        self.wait_all(&waiting, state, state == "launched", &block).await
    }

    async fn has_failed(&self, name: &str) -> Result<bool> {
        Ok(self.api.states(Some(name)).await?.iter().any(|s| s.systemd_active_state == "failed"))
    }

    async fn ensure_unit(&self, arg: &str, name: &str, replace: bool, target: Option<&str>) -> Result<()> {
        let local = Path::new(arg);
        let existing = self.api.unit(name).await?;
        if let Some(unit) = existing {
            if local.is_file() {
                let file = read_unit_file(local)?;
                let stored = UnitFile::from_options(unit.options.clone());
                if file.hash() != stored.hash() {
                    if !replace {
                        eprintln!("WARNING: Unit {name} in registry differs from local unit file {arg}. Add --replace to override.");
                        return Ok(());
                    }
                    let allowed = match target {
                        None => unit.desired_state == "inactive",
                        Some("loaded") => unit.desired_state != "launched",
                        _ => true,
                    };
                    if !allowed {
                        eprintln!(
                            "Warning: can not replace Unit({name}) in state '{}', use the appropriate command",
                            unit.desired_state
                        );
                        return Ok(());
                    }
                    self.api
                        .put(&Unit {
                            name: name.into(),
                            options: file.options,
                            desired_state: unit.desired_state.clone(),
                            ..Default::default()
                        })
                        .await?;
                } else if replace {
                    println!("Found same Unit({name}) in Registry, nothing to do");
                }
            }
            return Ok(());
        }
        let file = if local.is_file() {
            read_unit_file(local)?
        } else {
            let parsed = UnitName::parse(name)?;
            let template = parsed
                .template()
                .with_context(|| format!("unable to find Unit({name}) in Registry or on filesystem"))?;
            match self.api.unit(template.as_str()).await? {
                Some(t) => UnitFile::from_options(t.options),
                None => {
                    let tpath = local
                        .parent()
                        .map(|d| d.join(template.as_str()))
                        .unwrap_or_else(|| PathBuf::from(template.as_str()));
                    if !tpath.is_file() {
                        bail!("unable to find Unit({name}) or template Unit({template}) in Registry or on filesystem");
                    }
                    read_unit_file(&tpath)?
                }
            }
        };
        self.api.put(&Unit { name: name.into(), options: file.options, ..Default::default() }).await?;
        println!("Unit {name} inactive");
        Ok(())
    }

    async fn machines(&self) -> Result<HashMap<String, Machine>> {
        Ok(self.api.machines().await?.into_iter().map(|m| (m.id.clone(), m)).collect())
    }

    /// Waits until every unit reports `state` (and systemd `active` when `active` is set), then
    /// prints where each landed.
    async fn wait_all(&self, names: &[String], state: &str, active: bool, block: &Block) -> Result<ExitCode> {
        let until = deadline(block);
        // Waiting forever for a unit the engine says it cannot place would hang like the
        // original did; give the engine a while to change its mind, then report why.
        let unplaceable_grace = Duration::from_secs(10);
        let mut unplaceable_since: HashMap<String, Instant> = HashMap::new();
        let mut failed_since: HashMap<String, Instant> = HashMap::new();
        let mut pending: Vec<String> = names.to_vec();
        let mut delay = Duration::from_millis(20);
        let mut progress = Progress::new();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for name in pending {
                let Some(unit) = self.api.unit(&name).await? else {
                    bail!("unit {name} was destroyed while waiting for it")
                };
                if unit.current_state == "inactive" && !unit.reason.is_empty() {
                    let since = *unplaceable_since.entry(name.clone()).or_insert_with(Instant::now);
                    let out_of_time = until.map_or(since.elapsed() >= unplaceable_grace, |u| Instant::now() >= u);
                    if out_of_time {
                        eprintln!("Error waiting for units: unit {name} cannot be placed: {}", unit.reason);
                        return Ok(ExitCode::from(1));
                    }
                } else {
                    unplaceable_since.remove(&name);
                }
                let mut reached = unit.current_state == state;
                if reached && active {
                    let states = self.api.states(Some(&name)).await?;
                    let here = states.iter().filter(|s| s.machine_id == unit.machine_id);
                    reached =
                        here.clone().any(|s| s.systemd_active_state == "active" && s.systemd_load_state == "loaded");
                    // A failed unit will not become active by waiting (the original waited forever);
                    // a short grace lets a state published just before the start be replaced.
                    if here.clone().any(|s| s.systemd_active_state == "failed") {
                        let since = *failed_since.entry(name.clone()).or_insert_with(Instant::now);
                        if since.elapsed() >= Duration::from_secs(2) {
                            progress.clear();
                            eprintln!("Unit {name} failed on its machine; see `fleetctl status {name}` and `fleetctl journal {name}`");
                            return Ok(ExitCode::from(1));
                        }
                    } else {
                        failed_since.remove(&name);
                    }
                }
                if reached {
                    let legend = if unit.machine_id.is_empty() {
                        String::new()
                    } else {
                        let ms = self.machines().await?;
                        let m = ms
                            .get(&unit.machine_id)
                            .cloned()
                            .unwrap_or(Machine { id: unit.machine_id.clone(), ..Default::default() });
                        format!(" on {}", m.legend(false))
                    };
                    progress.clear();
                    println!("Unit {name} {state}{legend}");
                } else {
                    still.push(name);
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                for n in &pending {
                    eprintln!("Error waiting for units: timed out waiting for unit {n} to report state {state}");
                }
                return Ok(ExitCode::from(1));
            }
            progress.tick(&format!("waiting for {} unit(s) to be {state}: {}", pending.len(), pending.join(" ")));
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn found(&self, args: &[String]) -> Result<Vec<Unit>> {
        let mut out = Vec::new();
        for arg in args {
            if let Some(u) = self.api.unit(&unit_name_of(arg)).await? {
                out.push(u);
            }
        }
        Ok(out)
    }

    async fn stop(&self, args: &[String], block: &Block) -> Result<ExitCode> {
        let units = self.found(args).await?;
        if units.is_empty() {
            eprintln!("Units not found in registry");
            return Ok(ExitCode::SUCCESS);
        }
        let mut waiting = Vec::new();
        for u in &units {
            if u.is_global() {
                self.api.set_desired(&u.name, "loaded").await?;
                println!("Triggered global unit {} stop", u.name);
                continue;
            }
            match u.current_state.as_str() {
                "inactive" => {
                    eprintln!("Unable to stop unit {} in state inactive", u.name);
                    return Ok(ExitCode::from(1));
                }
                "loaded" => continue,
                _ => {}
            }
            self.api.set_desired(&u.name, "loaded").await?;
            if block.no_block {
                println!("Triggered unit {} stop", u.name);
            }
            waiting.push(u.name.clone());
        }
        if !block.no_block {
            let code = self.wait_all(&waiting, "loaded", false, block).await?;
            if code != ExitCode::SUCCESS {
                eprintln!("Failed to stop units {waiting:?}");
                return Ok(code);
            }
            // "loaded" only says the agent asked systemd to stop; wait until systemd says it did.
            self.wait_states(&waiting, block, |s| is_stopped(&s.systemd_active_state)).await?;
        }
        eprintln!("Successfully stopped units [{}].", waiting.join(" "));
        Ok(ExitCode::SUCCESS)
    }

    async fn unload(&self, args: &[String], block: &Block) -> Result<ExitCode> {
        let units = self.found(args).await?;
        if units.is_empty() {
            eprintln!("Units not found in registry");
            return Ok(ExitCode::SUCCESS);
        }
        let mut waiting = Vec::new();
        for u in units.iter().filter(|u| u.is_global()) {
            self.api.set_desired(&u.name, "inactive").await?;
            println!("Triggered global unit {} unload", u.name);
        }
        for u in
            units.iter().filter(|u| !u.is_global() && (u.current_state != "inactive" || u.desired_state != "inactive"))
        {
            self.api.set_desired(&u.name, "inactive").await?;
            if block.no_block {
                println!("Triggered unit {} unload", u.name);
            }
            waiting.push(u.name.clone());
        }
        if !block.no_block {
            let code = self.wait_all(&waiting, "inactive", false, block).await?;
            if code != ExitCode::SUCCESS {
                eprintln!("Failed to unload units {waiting:?}");
                return Ok(code);
            }
        }
        eprintln!("Successfully unloaded units [{}].", waiting.join(" "));
        Ok(ExitCode::SUCCESS)
    }

    /// Destroys units and, unlike the original, waits until no machine reports them any more,
    /// so "destroyed" means stopped and gone.
    async fn destroy(&self, args: &[String], block: &Block) -> Result<ExitCode> {
        let mut destroyed = Vec::new();
        let mut failed = false;
        for arg in args {
            let name = unit_name_of(arg);
            match self.api.destroy(&name).await {
                Ok(true) => {
                    println!("Destroyed {name}");
                    destroyed.push(name);
                }
                Ok(false) => {}
                Err(e) => {
                    eprintln!("Error destroying units: {e:#}");
                    failed = true;
                }
            }
        }
        if destroyed.is_empty() && !failed {
            eprintln!("Units not found in registry");
        }
        if !block.no_block && !destroyed.is_empty() {
            self.wait_states(&destroyed, block, |_| false).await?;
        }
        Ok(if failed { ExitCode::from(1) } else { ExitCode::SUCCESS })
    }

    /// Waits until every reported state of `names` satisfies `done` (`|_| false`: until none is
    /// reported at all).
    async fn wait_states(&self, names: &[String], block: &Block, done: impl Fn(&UnitState) -> bool) -> Result<()> {
        let until = deadline(block);
        let mut delay = Duration::from_millis(20);
        loop {
            let states = self.api.states(None).await?;
            let pending: Vec<&UnitState> = states.iter().filter(|s| names.contains(&s.name) && !done(s)).collect();
            if pending.is_empty() {
                return Ok(());
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                bail!("timed out waiting for {} to stop", pending[0].name);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(250));
        }
    }

    /// Moves a running unit; waits until it runs on its new machine unless told not to.
    async fn move_unit(&self, arg: &str, machine: Option<&str>, block: &Block) -> Result<ExitCode> {
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
                let running = u.desired_state != "launched"
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

    async fn status(&self, args: &[String]) -> Result<ExitCode> {
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
            let loaded = u.is_global() || u.current_state != "inactive";
            let statuses = if loaded { self.api.unit_status(&name).await.ok() } else { None };
            if self.json {
                json.push(serde_json::json!({
                    "name": name, "desiredState": u.desired_state, "currentState": u.current_state,
                    "machineID": u.machine_id, "reason": u.reason,
                    "statuses": statuses.clone().unwrap_or_default(),
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
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        Ok(code)
    }

    async fn journal(
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
        if !u.is_global() && u.current_state == "inactive" {
            eprintln!("Unit {name} does not appear to be running.");
            return Ok(ExitCode::from(1));
        }
        self.api.journal(&name, lines, follow, output, machine, &mut std::io::stdout()).await?;
        Ok(ExitCode::SUCCESS)
    }

    /// Stops each launched unit and waits until systemd reports it stopped, then starts it again
    /// and waits until it is active. Loaded units are just started.
    async fn restart(&self, args: &[String], block: &Block) -> Result<ExitCode> {
        let units = self.found(args).await?;
        let mut start = Vec::new();
        for u in &units {
            if u.is_global() {
                self.api.set_desired(&u.name, "loaded").await?;
                self.wait_states(std::slice::from_ref(&u.name), block, |s| s.systemd_active_state != "active").await?;
                self.api.set_desired(&u.name, "launched").await?;
                println!("Triggered global unit {} restart", u.name);
                continue;
            }
            match u.current_state.as_str() {
                "inactive" => eprintln!("Unable to restart unit {} in state inactive", u.name),
                "loaded" => start.push(u.name.clone()),
                _ => {
                    self.api.set_desired(&u.name, "loaded").await?;
                    let stopped = self
                        .wait_all(
                            std::slice::from_ref(&u.name),
                            "loaded",
                            false,
                            &Block { no_block: false, ..block.clone() },
                        )
                        .await?;
                    if stopped != ExitCode::SUCCESS {
                        return Ok(stopped);
                    }
                    self.wait_states(std::slice::from_ref(&u.name), block, |s| is_stopped(&s.systemd_active_state))
                        .await?;
                    start.push(u.name.clone());
                }
            }
        }
        for n in &start {
            self.api.set_desired(n, "launched").await?;
        }
        if block.no_block {
            for n in &start {
                println!("Triggered unit {n} start");
            }
            return Ok(ExitCode::SUCCESS);
        }
        self.wait_all(&start, "launched", true, block).await
    }

    /// Drains a machine and waits until no unit is scheduled to it or reported by it.
    async fn drain(&self, machine: &str, block: &Block) -> Result<ExitCode> {
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

    /// `fleetctl wait --for STATE UNIT...`: blocks until every unit is there.
    async fn wait(&self, args: &[String], state: &str, block: &Block) -> Result<ExitCode> {
        let (target, active) = match state {
            "active" => ("launched", true),
            "launched" | "loaded" | "inactive" => (state, false),
            other => bail!("--for {other:?}: expected active, launched, loaded or inactive"),
        };
        let mut names = Vec::new();
        for arg in args {
            let name = unit_name_of(arg);
            if self.api.unit(&name).await?.is_none() {
                eprintln!("Unit {name} does not exist.");
                return Ok(ExitCode::from(1));
            }
            names.push(name);
        }
        self.wait_all(&names, target, active, &Block { no_block: false, ..block.clone() }).await
    }

    async fn cat(&self, args: &[String]) -> Result<ExitCode> {
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

    async fn list_units(&self, f: &ListFlags) -> Result<ExitCode> {
        let fields = fields(f, "unit,machine,active,sub", &["active", "hash", "load", "machine", "sub", "unit"])?;
        let (mut states, machines) = tokio::try_join!(self.api.states(None), self.machines())
            .context("Error retrieving list of units from repository")?;
        states.sort_by(|a, b| (&a.name, &a.machine_id).cmp(&(&b.name, &b.machine_id)));
        let rows: Vec<Vec<String>> = states
            .iter()
            .map(|s| {
                fields
                    .iter()
                    .map(|c| match c.as_str() {
                        "unit" => s.name.clone(),
                        "machine" => machine_legend(&machines, &s.machine_id, f.full),
                        "active" => s.systemd_active_state.clone(),
                        "sub" => s.systemd_sub_state.clone(),
                        "load" => s.systemd_load_state.clone(),
                        _ => short_hash(&s.hash, f.full),
                    })
                    .collect()
            })
            .collect();
        self.emit(&fields, &rows, f.no_legend)?;
        Ok(ExitCode::SUCCESS)
    }

    async fn list_unit_files(&self, f: &ListFlags) -> Result<ExitCode> {
        let fields = fields(
            f,
            "unit,hash,dstate,state,target",
            &["desc", "dstate", "global", "hash", "reason", "state", "target", "tmachine"],
        )?;
        let (mut units, machines) = tokio::try_join!(self.api.units(), self.machines())
            .context("Error retrieving list of units from repository")?;
        units.sort_by(|a, b| a.name.cmp(&b.name));
        let rows: Vec<Vec<String>> = units
            .iter()
            .map(|u| {
                let file = UnitFile::from_options(u.options.clone());
                let global = u.is_global();
                fields
                    .iter()
                    .map(|c| match c.as_str() {
                        "unit" => u.name.clone(),
                        "hash" => short_hash(&file.hash(), f.full),
                        "dstate" => u.desired_state.clone(),
                        "state" if global => "-".into(),
                        "state" => dash(&u.current_state),
                        "target" | "tmachine" if global => "global".into(),
                        "target" | "tmachine" => machine_legend(&machines, &u.machine_id, f.full),
                        "global" => global.to_string(),
                        "reason" => dash(&u.reason),
                        _ => file.description().map(str::to_string).unwrap_or_else(|| "-".into()),
                    })
                    .collect()
            })
            .collect();
        self.emit(&fields, &rows, f.no_legend)?;
        Ok(ExitCode::SUCCESS)
    }

    async fn list_machines(&self, f: &ListFlags) -> Result<ExitCode> {
        let fields = fields(f, "machine,ip,metadata", &["ip", "machine", "metadata"])?;
        let machines = match self.api.machines().await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("Error retrieving list of active machines from fleet API ({e:#})");
                eprintln!("Check that the fleet engine is running and that etcd is healthy and reachable.");
                return Ok(ExitCode::from(1));
            }
        };
        let mut machines = machines;
        machines.sort_by(|a, b| a.id.cmp(&b.id));
        let rows: Vec<Vec<String>> = machines
            .iter()
            .map(|m| {
                fields
                    .iter()
                    .map(|c| match c.as_str() {
                        "machine" => {
                            if f.full {
                                m.id.clone()
                            } else {
                                short_id(&m.id)
                            }
                        }
                        "ip" => dash(&m.primary_ip),
                        _ => {
                            let md: BTreeMap<_, _> = m.metadata.iter().collect();
                            if md.is_empty() {
                                "-".into()
                            } else {
                                md.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
                            }
                        }
                    })
                    .collect()
            })
            .collect();
        self.emit(&fields, &rows, f.no_legend)?;
        Ok(ExitCode::SUCCESS)
    }
}

fn fields(f: &ListFlags, default: &str, valid: &[&str]) -> Result<Vec<String>> {
    let spec = f.fields.as_deref().unwrap_or(default);
    if spec.trim().is_empty() {
        bail!("Must define output format");
    }
    let out: Vec<String> = spec.split(',').map(|s| s.trim().to_string()).collect();
    for c in &out {
        if c != "unit" && !valid.contains(&c.as_str()) {
            bail!("Invalid key in output format: {c:?}");
        }
    }
    if out.iter().any(|c| c == "tmachine") {
        eprintln!("WARNING: The \"tmachine\" field is deprecated. Use \"target\" instead");
    }
    Ok(out)
}

impl Ctl {
    /// Rows as a table (the original's format) or, with `-o json`, as an array of objects keyed
    /// by field name.
    fn emit(&self, fields: &[String], rows: &[Vec<String>], no_legend: bool) -> Result<()> {
        if self.json {
            let objs: Vec<serde_json::Map<String, serde_json::Value>> = rows
                .iter()
                .map(|r| fields.iter().cloned().zip(r.iter().map(|v| serde_json::Value::String(v.clone()))).collect())
                .collect();
            println!("{}", serde_json::to_string_pretty(&objs)?);
        } else {
            print_table(fields, rows, no_legend);
        }
        Ok(())
    }
}

fn print_table(fields: &[String], rows: &[Vec<String>], no_legend: bool) {
    let header: Vec<String> = fields.iter().map(|f| f.to_uppercase()).collect();
    print!("{}", table::render((!no_legend).then_some(header.as_slice()), rows));
}

/// A one-line spinner on stderr while a command waits, only on a terminal; erased when done.
struct Progress {
    on: bool,
    frame: usize,
    started: Instant,
}

impl Progress {
    fn new() -> Self {
        use std::io::IsTerminal;
        Progress { on: std::io::stderr().is_terminal(), frame: 0, started: Instant::now() }
    }

    fn tick(&mut self, what: &str) {
        // Quick waits stay silent.
        if !self.on || self.started.elapsed() < Duration::from_millis(500) {
            return;
        }
        const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
        self.frame += 1;
        let mut line: String = what.chars().take(100).collect();
        if line.len() < what.len() {
            line.push_str("...");
        }
        eprint!("\r\x1b[K{} {line} ({}s)", FRAMES[self.frame % 4], self.started.elapsed().as_secs());
    }
}

impl Progress {
    fn clear(&mut self) {
        if self.on && self.frame > 0 {
            eprint!("\r\x1b[K");
            self.frame = 0;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn short_id(id: &str) -> String {
    if id.len() > 8 {
        format!("{}...", &id[..8])
    } else {
        id.to_string()
    }
}

fn short_hash(h: &str, full: bool) -> String {
    if h.is_empty() {
        "-".into()
    } else if full || h.len() <= 7 {
        h.to_string()
    } else {
        h[..7].to_string()
    }
}

fn machine_legend(machines: &HashMap<String, Machine>, id: &str, full: bool) -> String {
    if id.is_empty() {
        return "-".into();
    }
    machines.get(id).cloned().unwrap_or(Machine { id: id.to_string(), ..Default::default() }).legend(full)
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
