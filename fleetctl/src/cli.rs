//! The command line as clap reads it: commands, flags and their defaults, as the original
//! fleetctl spelled them (also the source of the man page and the shell completions).

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "fleetctl",
    version,
    about = "fleetctl: run systemd units across a fleet cluster",
    before_help = concat!("fleetctl version ", env!("CARGO_PKG_VERSION")),
    infer_subcommands = true
)]
pub(crate) struct Cli {
    /// Output format of list and status commands.
    #[arg(short = 'o', long = "format", global = true, value_enum, default_value = "table")]
    pub(crate) format: Format,
    /// fleetctl's configuration file of contexts [default: ~/.config/fleet/fleetctl.toml].
    #[arg(long, global = true, env = "FLEETCTL_CONFIG")]
    pub(crate) config: Option<std::path::PathBuf>,
    /// The context of the configuration file to use [default: its `current`].
    #[arg(long, global = true, env = "FLEETCTL_CONTEXT")]
    pub(crate) context: Option<String>,
    /// fleet API endpoint(s), comma-separated (https://host:port, http://host:port or
    /// unix:///path): a request that cannot reach one engine, or that an engine cut off from
    /// etcd refuses, goes to the next [default: the context's, else unix:///var/run/fleet.sock].
    #[arg(long, global = true, env = "FLEETCTL_ENDPOINT")]
    pub(crate) endpoint: Option<String>,
    /// Seconds to wait for each API request [default: the context's, else 10].
    #[arg(long, global = true, env = "FLEETCTL_REQUEST_TIMEOUT")]
    pub(crate) request_timeout: Option<f64>,
    /// CA certificate (PEM) to verify an https:// endpoint with.
    #[arg(long, global = true, env = "FLEETCTL_CA_FILE")]
    pub(crate) ca_file: Option<String>,
    /// Client certificate (PEM) for endpoints that require one.
    #[arg(long, global = true, env = "FLEETCTL_CERT_FILE")]
    pub(crate) cert_file: Option<String>,
    /// Private key (PEM) of --cert-file.
    #[arg(long, global = true, env = "FLEETCTL_KEY_FILE")]
    pub(crate) key_file: Option<String>,
    /// API token (see docs/security.md); sent as a bearer token.
    #[arg(long, global = true, env = "FLEETCTL_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Table,
    Json,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct Block {
    /// Do not wait for units to reach the requested state.
    #[arg(long)]
    pub(crate) no_block: bool,
    /// Wait this many ~2 s attempts for the state (0 = wait forever).
    #[arg(long, default_value_t = 0)]
    pub(crate) block_attempts: u32,
}

/// The units a command acts on: named as arguments, and from a file for more than a command line
/// holds (a million names are ~20 MB; Linux passes a program at most 2 MB of arguments).
#[derive(Args, Debug, Clone)]
pub(crate) struct UnitArgs {
    /// Units: names, or unit files.
    pub(crate) units: Vec<String>,
    /// Also the units named in FILE, one a line (names or unit files; `-`: standard input;
    /// empty lines and lines starting with `#` are skipped).
    #[arg(long, value_name = "FILE")]
    pub(crate) names_from: Option<std::path::PathBuf>,
}

impl UnitArgs {
    /// The arguments, then the file's names.
    pub(crate) fn all(&self) -> anyhow::Result<Vec<String>> {
        use anyhow::Context;
        let mut out = self.units.clone();
        let Some(path) = &self.names_from else { return Ok(out) };
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("cannot read unit names from standard input")?
        } else {
            std::fs::read_to_string(path).with_context(|| format!("cannot read unit names from {}", path.display()))?
        };
        out.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string));
        Ok(out)
    }
}

#[derive(Args, Debug, Clone)]
pub(crate) struct ListFlags {
    /// Columns to show, comma-separated.
    #[arg(long)]
    pub(crate) fields: Option<String>,
    /// Show full machine ids and hashes.
    #[arg(long, short = 'l', visible_alias = "l")]
    pub(crate) full: bool,
    /// Omit the header line.
    #[arg(long)]
    pub(crate) no_legend: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum JoinTokenAction {
    /// Make a token and print it with the command a new machine runs to join.
    Create {
        /// How long it admits machines (`30m`, `24h`, `7d`).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// How many machines may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Metadata every machine joining with it gets (`k=v,k=v`).
        #[arg(long, value_parser = metadata_arg)]
        metadata: Option<std::collections::BTreeMap<String, String>>,
        #[arg(long, default_value = "")]
        description: String,
        /// Admit only these machines (their /etc/machine-id), comma-separated.
        #[arg(long = "machine-id", value_delimiter = ',')]
        machine_ids: Vec<String>,
    },
    /// The tokens (never their secrets): what each allows and who joined with it.
    List,
    /// Make a token admit nobody from now on.
    Revoke { id: String },
}

/// `k=v,k=v`, checked as the flag is read.
fn metadata_arg(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(format!("{kv:?}: expected key=value")),
        })
        .collect()
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// List the contexts of the configuration file; the one in use is marked.
    Contexts,
    /// Upload unit files without scheduling them.
    Submit {
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Schedule units to machines without starting them.
    Load {
        #[command(flatten)]
        block: Block,
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Schedule and start units.
    Start {
        #[command(flatten)]
        block: Block,
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Stop units, leaving them loaded.
    Stop {
        #[command(flatten)]
        block: Block,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Unschedule units, leaving them submitted.
    Unload {
        #[command(flatten)]
        block: Block,
        #[command(flatten)]
        units: UnitArgs,
    },
    /// Remove units from the cluster.
    Destroy {
        #[command(flatten)]
        block: Block,
        #[command(flatten)]
        units: UnitArgs,
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
    /// Roll a new version of a service over its running instances a few at a time, reverting by
    /// itself when one does not become healthy: `rollout FILE` (a template `web@.service`: its
    /// launched instances; a unit: that unit), `rollout status [SERVICE]`,
    /// `rollout pause|resume|promote|undo SERVICE` (docs/services.md).
    Rollout {
        /// Instances unavailable at once, at most.
        #[arg(long, default_value_t = 1)]
        max_parallel: u32,
        /// Instances replaced first; the rollout then waits for `rollout promote`.
        #[arg(long, default_value_t = 0)]
        canaries: u32,
        /// How long a replaced instance must stay healthy to count (`30s`, `2m`).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        min_healthy_time: std::time::Duration,
        /// How long a replaced instance may take to become healthy before the rollout goes back.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        deadline: std::time::Duration,
        /// Return once the rollout is asked for, without following it.
        #[arg(long)]
        no_block: bool,
        #[arg(num_args = 1..=2, value_name = "FILE | ACTION [SERVICE]")]
        args: Vec<String>,
    },
    /// Move every unit off a machine (full id or unique prefix) and keep new ones away.
    Drain {
        #[command(flatten)]
        block: Block,
        machine: String,
    },
    /// Let a drained machine take units again.
    Undrain { machine: String },
    /// Tokens that let a new machine join the cluster (docs/install.md): create, list, revoke.
    JoinToken {
        #[command(subcommand)]
        action: JoinTokenAction,
    },
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
    /// What happened in the cluster: the last events (of UNITs, names or globs), or with
    /// --follow, those and every new one as it happens.
    Events {
        /// Keep printing new events (reconnecting, to another endpoint if need be, without
        /// losing or repeating one).
        #[arg(long, short = 'f')]
        follow: bool,
        /// Events after this event id (REVISION.N, as `-o json` shows), instead of the last ones.
        #[arg(long)]
        since: Option<String>,
        /// How many of the last events to show first.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: usize,
        /// Only events on this machine (full id or prefix).
        #[arg(long)]
        machine: Option<String>,
        /// Only these kinds (unit-started, machine-lost, ...; globs like unit-*), comma-separated.
        #[arg(long, value_delimiter = ',')]
        kind: Vec<String>,
        /// Show full machine ids.
        #[arg(long)]
        full: bool,
        units: Vec<String>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn units_come_from_arguments_then_a_file() {
        let path = std::env::temp_dir().join(format!("fleetctl-names-{}.txt", std::process::id()));
        std::fs::write(&path, "# many\n\n  b@1.service \nb@2.service\n").expect("write");
        let cli = Cli::try_parse_from([
            "fleetctl",
            "start",
            "--no-block",
            "a.service",
            "--names-from",
            &path.to_string_lossy(),
        ])
        .expect("parses");
        let Command::Start { units, block, .. } = cli.command else { panic!("not start") };
        assert!(block.no_block);
        assert_eq!(units.all().expect("read"), ["a.service", "b@1.service", "b@2.service"]);
        let _ = std::fs::remove_file(&path);
        let missing = UnitArgs { units: vec![], names_from: Some(path.clone()) };
        let err = format!("{:#}", missing.all().expect_err("no such file"));
        assert!(err.contains("cannot read unit names from") && err.contains("fleetctl-names-"), "{err}");
    }
}
