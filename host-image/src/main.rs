//! `fleet-update`: verifies and applies signed releases of the host image to the inactive A/B
//! slot, and plays systemd-boot's and systemd-bless-boot's parts for tests (see docs/host-image.md).

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_host_image::{boot, release, slots, update_agent};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "fleet-update", version, about = "Signed A/B updates of the fleet host image")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check a release directory: signature, every file's hash, the verity root hash.
    Verify {
        release: PathBuf,
        /// minisign public key trusted to sign releases.
        #[arg(long, default_value = "/usr/lib/fleet/update.pub")]
        public_key: PathBuf,
    },
    /// Write a verified release to the slot not running and add its boot entry (one try).
    Apply {
        release: PathBuf,
        #[arg(long, default_value = "/usr/lib/fleet/update.pub")]
        public_key: PathBuf,
        /// Slots and ESP (TOML: slot_a, slot_b, esp, cmdline).
        #[arg(long, default_value = "/etc/fleet/update.toml")]
        layout: PathBuf,
        /// The running slot; default: `fleet.slot=` of /proc/cmdline.
        #[arg(long)]
        running: Option<char>,
    },
    /// The update agent (fleet-update.service): applies the newest release offered in the
    /// source directory, takes a reboot slot from the engines, reboots; gives the slot back after
    /// a healthy boot. Settings: the [agent] and [fleetlock] sections of update.toml.
    Agent {
        #[arg(long, default_value = "/etc/fleet/update.toml")]
        config: PathBuf,
        /// One look at the source: apply what is newer, but neither take a slot nor reboot.
        #[arg(long)]
        once: bool,
    },
    /// After a failed health check (fleet-unhealthy.service): reboot if this boot was the try of
    /// a new release (the boot loader then falls back), stay up if it was a blessed one.
    OnUnhealthy {
        #[arg(long, default_value = "/etc/fleet/update.toml")]
        config: PathBuf,
    },
    /// Write manifest.json for the files of a release directory and sign it.
    Seal {
        release: PathBuf,
        #[arg(long)]
        version: String,
        #[arg(long)]
        secret_key: PathBuf,
        /// The image and its hash tree, as `veritysetup format` made them.
        #[arg(long, default_value = "root.erofs")]
        data: String,
        #[arg(long, default_value = "root.verity")]
        hash: String,
        #[arg(long)]
        root_hash: String,
        /// Every file of the release (the image and the hash tree included).
        #[arg(long = "file", required = true)]
        files: Vec<String>,
    },
    /// A new signing key pair: BASE.key and BASE.pub.
    Keygen { base: PathBuf },
    /// Publish a release to an update channel: copy it into TREE/releases/<version>/ and write
    /// TREE/<channel>.json naming it (the next serial, an expiry), signed. Serve TREE over HTTPS.
    Publish {
        release: PathBuf,
        #[arg(long)]
        tree: PathBuf,
        #[arg(long, default_value = "stable")]
        channel: String,
        /// The release signing key (minisign secret key).
        #[arg(long)]
        key: PathBuf,
        /// Its public key [default: the key's name with .pub].
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// How long machines accept this metadata: publish again before then.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        expires_in: std::time::Duration,
    },
    /// The boot loader's choice among the ESP's entries (counting a try down), for the test tier.
    BootSelect {
        #[arg(long)]
        esp: PathBuf,
    },
    /// systemd-bless-boot: mark an entry good (`good`) or bad (`bad`).
    Bless {
        #[arg(long)]
        esp: PathBuf,
        /// Entry id: fleet-<version>-<slot>.
        entry: String,
        #[arg(long, default_value = "good")]
        verdict: String,
    },
    /// Take this machine's reboot slot from the engines (FleetLock pre-reboot), waiting while
    /// every slot is held or the machine is still being drained.
    TakeRebootSlot(SlotArgs),
    /// Give the reboot slot back (FleetLock steady-state), once the new boot is healthy.
    ReleaseRebootSlot(SlotArgs),
    /// First-boot provisioning (docs/host-image.md, "From zero to a cluster").
    #[command(subcommand)]
    Provision(ProvisionCmd),
    /// The ESP's entries in boot order.
    Status {
        #[arg(long)]
        esp: PathBuf,
    },
}

#[derive(Subcommand)]
enum ProvisionCmd {
    /// Find this machine's provisioning config (fw_cfg, config drive, kernel command line), check
    /// it and apply it to var, once (fleet-provision.service, before etcd and fleet start).
    Apply {
        #[arg(long, default_value = "/var")]
        var: PathBuf,
    },
    /// Check a provisioning config and show what it would write.
    Check { file: PathBuf },
    /// Join the cluster as the config says (fleet-join.service): `fleet-agent join`, tried again
    /// until an engine admits the machine or the time is up.
    Join {
        #[arg(long, default_value = "/etc/fleet")]
        config_dir: PathBuf,
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// At every boot (fleet-host-units.service): the config's hostname and host units.
    HostUnits {
        #[arg(long, default_value = "/etc/fleet")]
        config_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct SlotArgs {
    /// An engine's API (`https://host:port`).
    #[arg(long)]
    url: String,
    /// This machine's id; default: /etc/machine-id.
    #[arg(long)]
    machine_id: Option<String>,
    #[arg(long, default_value = "default")]
    group: String,
    #[arg(long, default_value = "/etc/fleet/ca.pem")]
    ca_file: PathBuf,
    /// The machine's certificate (CN machine-<id>) and key.
    #[arg(long, default_value = "/etc/fleet/machine.pem")]
    cert_file: PathBuf,
    #[arg(long, default_value = "/etc/fleet/machine.key")]
    key_file: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Seconds between attempts.
    #[arg(long, default_value_t = 5)]
    retry: u64,
}

impl SlotArgs {
    fn client(&self) -> anyhow::Result<fleet_host_image::fleetlock::Client> {
        let machine_id = match &self.machine_id {
            Some(id) => id.clone(),
            None => {
                std::fs::read_to_string("/etc/machine-id").context("cannot read /etc/machine-id")?.trim().to_string()
            }
        };
        Ok(fleet_host_image::fleetlock::Client {
            url: self.url.clone(),
            machine_id,
            group: self.group.clone(),
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        })
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Under systemd its output goes to the journal and the console: no colour codes there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet-update: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn provision(cmd: ProvisionCmd) -> anyhow::Result<()> {
    use fleet_host_image::provision as p;
    match cmd {
        ProvisionCmd::Apply { var } => {
            if let Some(r) = p::record(&var) {
                println!(
                    "fleet-provision: provisioned already ({} from {}, {}): not applied again",
                    r.role_name(),
                    r.source,
                    r.applied
                );
                return Ok(());
            }
            // A machine whose var was prepared by other means (the image lab, a disk made with
            // `make-disk --var`) has its settings already; one with nothing gives a config
            // drive a little time to appear (udev names it while this runs).
            // (A provisioning interrupted before its record is not "prepared": it wrote
            // join.toml, which nothing else writes, and is applied again.)
            let prepared =
                var.join("lib/fleet/etc/agent.toml").exists() && !var.join("lib/fleet/etc/join.toml").exists();
            let patience = if prepared { 0 } else { 20 };
            let mut found = p::find(&p::Sources::system())?;
            for _ in 0..patience {
                if found.is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
                found = p::find(&p::Sources::system())?;
            }
            let Some(found) = found else {
                if prepared {
                    println!("fleet-provision: no provisioning config; this machine's var holds its settings already");
                    return Ok(());
                }
                return Err(p::ProvisionError::NotFound.into());
            };
            let config = p::parse(&found).context("nothing was written; this machine does not join")?;
            let plan = config.plan();
            let record = fleet_provision::Record {
                source: found.source.clone(),
                sha256: p::sha256_hex(&found.bytes),
                role: config.role,
                address: config.address.clone(),
                applied: p::now_rfc3339(),
                files: plan.len(),
            };
            p::apply(&var, &plan, &record, std::path::Path::new("/etc/passwd"))?;
            println!(
                "fleet-provision: {} at {} provisioned from {} (sha256 {}): {} files",
                record.role_name(),
                record.address,
                record.source,
                record.sha256,
                record.files
            );
        }
        ProvisionCmd::Check { file } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let found = p::Found { source: file.display().to_string(), bytes };
            let config = p::parse(&found)?;
            println!("{}: a valid {:?} config for {}", file.display(), config.role, config.address);
            for f in config.plan() {
                println!("  /var/{} ({:o})", f.path, f.mode);
            }
        }
        ProvisionCmd::Join { config_dir, timeout } => p::join(&config_dir, timeout)?,
        ProvisionCmd::HostUnits { config_dir } => p::host_units(&config_dir)?,
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Verify { release, public_key } => {
            let m = release::verify(&release, &public_key)?;
            println!("{}: release {} verified (root hash {})", release.display(), m.version, m.verity.root_hash);
        }
        Cmd::Apply { release, public_key, layout, running } => {
            let layout = update_agent::UpdateConfig::load(&layout)?.layout;
            let running = match running {
                Some(s @ ('a' | 'b')) => s,
                Some(s) => anyhow::bail!("--running {s}: expected a or b"),
                None => {
                    let cmdline = std::fs::read_to_string("/proc/cmdline").context("cannot read /proc/cmdline")?;
                    slots::running_slot(&cmdline).context("no fleet.slot= on the kernel command line; use --running")?
                }
            };
            let applied = slots::apply(&release, &public_key, &layout, running)?;
            println!(
                "release {} written to slot {}; boot entry {} (one try)",
                applied.manifest.version,
                applied.slot,
                applied.entry.file_name()
            );
        }
        Cmd::Agent { config, once } => {
            let config = update_agent::UpdateConfig::load(&config)?;
            let mut agent = update_agent::Agent::new(config, update_agent::Host::default());
            if once {
                println!("{:?}", agent.step()?);
            } else {
                agent.run()?;
            }
        }
        Cmd::OnUnhealthy { config } => {
            let config = update_agent::UpdateConfig::load(&config)?;
            update_agent::Agent::new(config, update_agent::Host::default()).on_unhealthy()?;
        }
        Cmd::Seal { release, version, secret_key, data, hash, root_hash, files } => {
            let names: Vec<&str> = files.iter().map(String::as_str).collect();
            let verity = release::Verity { data, hash, root_hash };
            let m = release::seal(&release, &version, &names, verity, &secret_key)?;
            println!("{} sealed: {} files", m.version, m.files.len());
        }
        Cmd::Keygen { base } => {
            let (sk, pk) = release::keygen(&base)?;
            println!("{}\n{}", sk.display(), pk.display());
        }
        Cmd::Publish { release, tree, channel, key, public_key, expires_in } => {
            let public_key = public_key.unwrap_or_else(|| key.with_extension("pub"));
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
            let meta =
                fleet_host_image::channel::publish(&tree, &channel, &release, &public_key, &key, expires_in, now)?;
            println!(
                "{}: channel {} serial {} names release {}, expires {}",
                tree.join(format!("{channel}.json")).display(),
                meta.channel,
                meta.serial,
                meta.version,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(meta.expires.max(0) as u64)
                )
            );
        }
        Cmd::BootSelect { esp } => match boot::select(&esp)? {
            Some(e) => println!("{}", e.file_name()),
            None => anyhow::bail!("no boot entry in {}", boot::entries_dir(&esp).display()),
        },
        Cmd::Bless { esp, entry, verdict } => {
            let e = match verdict.as_str() {
                "good" => boot::bless(&esp, &entry)?,
                "bad" => boot::mark_bad(&esp, &entry)?,
                v => anyhow::bail!("verdict {v:?}: expected good or bad"),
            };
            println!("{}", e.file_name());
        }
        Cmd::TakeRebootSlot(a) => {
            let c = a.client()?;
            c.call("pre-reboot", std::time::Duration::from_secs(a.timeout), std::time::Duration::from_secs(a.retry))?;
            println!("reboot slot of group {} taken for {}", c.group, c.machine_id);
        }
        Cmd::ReleaseRebootSlot(a) => {
            let c = a.client()?;
            c.call("steady-state", std::time::Duration::from_secs(a.timeout), std::time::Duration::from_secs(a.retry))?;
            println!("reboot slot of group {} released for {}", c.group, c.machine_id);
        }
        Cmd::Provision(p) => provision(p)?,
        Cmd::Status { esp } => {
            for e in boot::entries(&esp)? {
                println!("{}", e.file_name());
            }
        }
    }
    Ok(())
}
