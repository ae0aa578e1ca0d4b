//! fleetctl: the fleet user's command line, over the `/fleet/v1` REST API.
//!
//! Commands, flags, columns and messages follow the original fleetctl so scripts keep working.
//! A REST client only: it depends on `fleet-model` for names and unit files and must not
//! depend on etcd's client or gRPC (`tests/dependencies.rs` keeps it so).

mod client;
mod table;
mod units;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use client::{Client, Machine};
use fleet_model::UnitFile;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
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
        Command::Load { block, replace, units } => {
            ctl.submit(&units, replace, Some((fleet_model::DesiredState::Loaded, block))).await
        }
        Command::Start { block, replace, units } => {
            ctl.submit(&units, replace, Some((fleet_model::DesiredState::Launched, block))).await
        }
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
    async fn machines(&self) -> Result<HashMap<String, Machine>> {
        Ok(self.api.machines().await?.into_iter().map(|m| (m.id.clone(), m)).collect())
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
            let loaded = u.is_global() || u.current() != Some(fleet_model::DesiredState::Inactive);
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
        if !u.is_global() && u.current() == Some(fleet_model::DesiredState::Inactive) {
            eprintln!("Unit {name} does not appear to be running.");
            return Ok(ExitCode::from(1));
        }
        self.api.journal(&name, lines, follow, output, machine, &mut std::io::stdout()).await?;
        Ok(ExitCode::SUCCESS)
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
