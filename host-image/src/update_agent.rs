//! The update agent (`fleet-update agent`, run by `fleet-update.service`): takes the machine from
//! the release it runs to the newest one offered, one machine of the cluster at a time.
//!
//! Each pass looks at the update source (a directory of release directories, filled by whatever
//! distributes releases), and [`decide`]s, from what is offered and what the ESP's boot entries
//! say, one of: nothing to do; apply a release (verify, write the inactive slot, add its entry
//! with one try); or reboot into an applied release. Before a reboot it takes a reboot slot from
//! the engines (FleetLock `pre-reboot`, which drains the machine first) and after a healthy boot
//! it gives the slot back (`steady-state`). The service runs only after `fleet-health.service`
//! succeeded, so a machine whose update failed keeps its slot until it has rolled back: a bad
//! release stops at the first machine that tried it.
//!
//! A release that failed to boot here (its entry ran out of tries) is never applied again; a newer
//! release replaces it.

use crate::boot::{self, Entry};
use crate::fleetlock;
use crate::release;
use crate::slots::{self, Layout};
use serde::Deserialize;
use std::cmp::Ordering;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `/etc/fleet/update.toml`: the machine's disk layout at the top, then the agent's settings.
#[derive(Debug, Clone)]
pub struct UpdateConfig {
    pub layout: Layout,
    pub agent: AgentSettings,
    pub fleetlock: Option<FleetLockSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Directory of release directories (each with its manifest.json).
    #[serde(default = "default_source")]
    pub source: PathBuf,
    /// Seconds between looks at the source.
    #[serde(default = "default_interval")]
    pub check_interval_secs: u64,
    /// Trusted release signing key.
    #[serde(default = "default_public_key")]
    pub public_key: PathBuf,
    /// The command that reboots the machine.
    #[serde(default = "default_reboot")]
    pub reboot_command: Vec<String>,
    /// An update channel to follow over HTTPS (`https://.../<channel>.json`, as `fleet-update
    /// publish` writes it): its releases are downloaded into `download_dir`, which is then the
    /// source, instead of `source`.
    #[serde(default)]
    pub channel: Option<String>,
    /// The CA the channel's server is checked against (PEM); without it, the built-in roots.
    #[serde(default)]
    pub channel_ca_file: Option<PathBuf>,
    #[serde(default = "default_download_dir")]
    pub download_dir: PathBuf,
    /// The highest channel serial this machine accepted (no replays below it).
    #[serde(default = "default_channel_seen")]
    pub channel_seen: PathBuf,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            source: default_source(),
            check_interval_secs: default_interval(),
            public_key: default_public_key(),
            reboot_command: default_reboot(),
            channel: None,
            channel_ca_file: None,
            download_dir: default_download_dir(),
            channel_seen: default_channel_seen(),
        }
    }
}

fn default_source() -> PathBuf {
    PathBuf::from("/var/lib/fleet/updates")
}
fn default_download_dir() -> PathBuf {
    PathBuf::from("/var/lib/fleet/downloads")
}
fn default_channel_seen() -> PathBuf {
    PathBuf::from("/var/lib/fleet/update-channel.json")
}
fn default_interval() -> u64 {
    300
}
fn default_public_key() -> PathBuf {
    PathBuf::from("/usr/lib/fleet/update.pub")
}
fn default_reboot() -> Vec<String> {
    vec!["systemctl".into(), "reboot".into()]
}

/// Where to take reboot slots. Without it the machine reboots as soon as an update is written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetLockSettings {
    /// An engine's API, `https://host:port`.
    pub url: String,
    #[serde(default = "default_group")]
    pub group: String,
    #[serde(default = "default_ca")]
    pub ca_file: PathBuf,
    #[serde(default = "default_cert")]
    pub cert_file: PathBuf,
    #[serde(default = "default_key")]
    pub key_file: PathBuf,
    /// Seconds between attempts while every slot is taken or the machine is being drained.
    #[serde(default = "default_retry")]
    pub retry_secs: u64,
}

fn default_group() -> String {
    "default".into()
}
fn default_ca() -> PathBuf {
    PathBuf::from("/etc/fleet/ca.pem")
}
fn default_cert() -> PathBuf {
    PathBuf::from("/etc/fleet/machine.pem")
}
fn default_key() -> PathBuf {
    PathBuf::from("/etc/fleet/machine.key")
}
fn default_retry() -> u64 {
    5
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl UpdateConfig {
    /// Parses update.toml; unknown keys are refused, naming the section they are in.
    pub fn parse(path: &Path, text: &str) -> Result<UpdateConfig, ConfigError> {
        let invalid = |section: &str, e: &dyn std::fmt::Display| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: if section.is_empty() { e.to_string() } else { format!("[{section}]: {e}") },
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| invalid("", &e))?;
        let agent = match table.remove("agent") {
            Some(v) => v.try_into().map_err(|e| invalid("agent", &e))?,
            None => AgentSettings::default(),
        };
        let fleetlock = match table.remove("fleetlock") {
            Some(v) => Some(v.try_into().map_err(|e| invalid("fleetlock", &e))?),
            None => None,
        };
        let layout: Layout = toml::Value::Table(table).try_into().map_err(|e| invalid("", &e))?;
        Ok(UpdateConfig { layout, agent, fleetlock })
    }

    pub fn load(path: &Path) -> Result<UpdateConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        UpdateConfig::parse(path, &text)
    }
}

/// A release offered by the source (its manifest read, not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offered {
    pub version: String,
    pub dir: PathBuf,
}

/// What the agent should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Write this release to the inactive slot (then reboot into it).
    Apply(Offered),
    /// The release is written and its entry has its try left: reboot into it.
    Reboot {
        version: String,
    },
}

/// The next step, from what runs, what is offered, the ESP's entries and the releases this run
/// of the agent already refused (failed verification or could not be written).
pub fn decide(running: &str, offered: &[Offered], entries: &[Entry], refused: &HashSet<String>) -> Action {
    // Only the newest release is a candidate: once it failed here, an older one is not tried in
    // its place (writing that would erase the record of the failure, the bad entry), the machine
    // waits for a newer one.
    let Some(newest) = offered.iter().max_by(|a, b| boot::version_cmp(&a.version, &b.version)) else {
        return Action::Nothing;
    };
    let failed_here = entries.iter().any(|e| e.version == newest.version && e.is_bad());
    if boot::version_cmp(&newest.version, running) != Ordering::Greater
        || refused.contains(&newest.version)
        || failed_here
    {
        return Action::Nothing;
    }
    // Written already (an earlier run stopped before its reboot): the entry still has its try.
    if entries.iter().any(|e| e.version == newest.version && matches!(e.counter, Some((left, 0)) if left > 0)) {
        return Action::Reboot { version: newest.version.clone() };
    }
    Action::Apply(newest.clone())
}

/// The releases in `source`, by their manifests. Whoever fills the source copies a release
/// into a dot-directory and renames it into place; directories without a readable manifest are
/// skipped too.
pub fn offered(source: &Path) -> std::io::Result<Vec<Offered>> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(source)? {
        let dir = d?.path();
        // A release being copied in is a dot-directory until it is renamed into place.
        if dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(dir.join(release::MANIFEST)) else { continue };
        if let Ok(m) = serde_json::from_str::<release::Manifest>(&text) {
            out.push(Offered { version: m.version, dir });
        }
    }
    Ok(out)
}

/// The version of the running image (`IMAGE_VERSION` of os-release).
pub fn running_version(os_release: &str) -> Option<String> {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("IMAGE_VERSION="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// The running slot: `fleet.slot=` of the kernel command line; where there is none (a container
/// shares its host's), the slot of the entry that carries the running version (a blessed one
/// first: a try of the same version in the other slot is not what runs unless it is the only one).
pub fn running_slot(cmdline: &str, running: &str, entries: &[Entry]) -> Option<char> {
    slots::running_slot(cmdline).or_else(|| {
        let mut of_version: Vec<&Entry> = entries.iter().filter(|e| e.version == running).collect();
        of_version.sort_by_key(|e| e.counter.is_some());
        of_version.first().map(|e| e.slot)
    })
}

/// The release that was tried here and rolled back, if it is still the newest offered: the
/// cluster's rollout of it must stop at this machine.
pub fn rolled_back_from(running: &str, offered: &[Offered], entries: &[Entry]) -> Option<String> {
    let newest = offered.iter().max_by(|a, b| boot::version_cmp(&a.version, &b.version))?;
    (boot::version_cmp(&newest.version, running) == Ordering::Greater
        && entries.iter().any(|e| e.version == newest.version && e.is_bad()))
    .then(|| newest.version.clone())
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("cannot tell which release runs: no IMAGE_VERSION in {0}")]
    NoVersion(PathBuf),
    #[error("cannot tell which slot runs {0}: no fleet.slot= on the kernel command line and no boot entry for it")]
    NoSlot(String),
    #[error(transparent)]
    FleetLock(#[from] fleetlock::FleetLockError),
    #[error("reboot command {command:?} failed: {detail}")]
    Reboot { command: Vec<String>, detail: String },
}

/// Where the agent reads the machine's own facts (overridable for tests).
#[derive(Debug, Clone)]
pub struct Host {
    pub os_release: PathBuf,
    pub cmdline: PathBuf,
    pub machine_id: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            os_release: "/usr/lib/os-release".into(),
            cmdline: "/proc/cmdline".into(),
            machine_id: "/etc/machine-id".into(),
        }
    }
}

fn read(path: &Path) -> Result<String, AgentError> {
    std::fs::read_to_string(path).map_err(|source| AgentError::Io { what: format!("read {}", path.display()), source })
}

pub struct Agent {
    pub config: UpdateConfig,
    pub host: Host,
    refused: HashSet<String>,
    /// The channel's last answer, so a refusal repeated every look is logged once.
    last_channel: Option<String>,
}

impl Agent {
    pub fn new(config: UpdateConfig, host: Host) -> Agent {
        Agent { config, host, refused: HashSet::new(), last_channel: None }
    }

    /// Where releases are offered: the download directory when following a channel.
    fn source(&self) -> &Path {
        match self.config.agent.channel {
            Some(_) => &self.config.agent.download_dir,
            None => &self.config.agent.source,
        }
    }

    /// One look at the channel, if the machine follows one: its newest release downloaded
    /// into the source when it is newer than what runs and has not failed here.
    fn follow_channel(&mut self) {
        let Some(url) = self.config.agent.channel.clone() else { return };
        let follow = crate::channel::Follow {
            url,
            ca_file: self.config.agent.channel_ca_file.clone(),
            public_key: self.config.agent.public_key.clone(),
            download_dir: self.config.agent.download_dir.clone(),
            seen_file: self.config.agent.channel_seen.clone(),
        };
        let Ok((running, entries, _)) = self.observe() else { return };
        let refused = self.refused.clone();
        let wanted = |v: &str| {
            boot::version_cmp(v, &running) == Ordering::Greater
                && !refused.contains(v)
                && !entries.iter().any(|e| e.version == v && e.is_bad())
        };
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let answer = match crate::channel::sync(&follow, now, wanted) {
            Ok(Some(crate::channel::Synced::Ready { version, serial })) => {
                format!("channel serial {serial}: release {version} ready")
            }
            Ok(None) => "channel: nothing newer".to_string(),
            Err(e) => format!("channel: {e}"),
        };
        if self.last_channel.as_deref() != Some(answer.as_str()) {
            if answer.contains("refusing") || answer.contains("bad signature") || answer.contains("not valid") {
                tracing::error!("{answer}");
            } else {
                tracing::info!("{answer}");
            }
            self.last_channel = Some(answer);
        }
    }

    fn fleetlock(&self) -> Result<Option<fleetlock::Client>, AgentError> {
        let Some(f) = &self.config.fleetlock else { return Ok(None) };
        Ok(Some(fleetlock::Client {
            url: f.url.clone(),
            machine_id: read(&self.host.machine_id)?.trim().to_string(),
            group: f.group.clone(),
            ca_file: f.ca_file.clone(),
            cert_file: f.cert_file.clone(),
            key_file: f.key_file.clone(),
        }))
    }

    fn retry(&self) -> Duration {
        Duration::from_secs(self.config.fleetlock.as_ref().map_or(5, |f| f.retry_secs.max(1)))
    }

    /// After a healthy boot: give back the reboot slot this machine may hold (a no-op otherwise).
    pub fn steady_state(&self) -> Result<(), AgentError> {
        if let Some(c) = self.fleetlock()? {
            c.call("steady-state", Duration::from_secs(24 * 3600), self.retry())?;
            tracing::info!(group = %c.group, "FleetLock: steady state, reboot slot released");
        }
        Ok(())
    }

    /// What runs, the ESP's entries and what the source offers.
    fn observe(&self) -> Result<(String, Vec<Entry>, Vec<Offered>), AgentError> {
        let running = running_version(&read(&self.host.os_release)?)
            .ok_or_else(|| AgentError::NoVersion(self.host.os_release.clone()))?;
        let esp = &self.config.layout.esp;
        let entries = boot::entries(esp)
            .map_err(|source| AgentError::Io { what: format!("read boot entries under {}", esp.display()), source })?;
        let source = self.source();
        let offered = match offered(source) {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source_err) => {
                return Err(AgentError::Io { what: format!("read {}", source.display()), source: source_err })
            }
        };
        Ok((running, entries, offered))
    }

    /// After a failed health check (`fleet-unhealthy.service`): a boot that was the one try of a
    /// new release reboots, and the boot loader falls back to the previous slot; a boot of a
    /// blessed entry stays up for its operator, since rebooting it would only loop. True if it
    /// rebooted.
    pub fn on_unhealthy(&self) -> Result<bool, AgentError> {
        let (running, entries, _) = self.observe()?;
        let cmdline = std::fs::read_to_string(&self.host.cmdline).unwrap_or_default();
        let slot = running_slot(&cmdline, &running, &entries).ok_or_else(|| AgentError::NoSlot(running.clone()))?;
        let booted = entries.iter().find(|e| e.version == running && e.slot == slot);
        match booted {
            Some(e) if e.counter.is_some() => {
                tracing::error!(entry = %e.file_name(), "the try of {running} failed its health check: rebooting into the previous slot");
                self.run_reboot_command()?;
                Ok(true)
            }
            _ => {
                tracing::error!(%running, "this blessed boot is unhealthy; not rebooting (it would loop): see fleet-health.service");
                Ok(false)
            }
        }
    }

    /// One look at the source, and what it led to.
    pub fn step(&mut self) -> Result<Action, AgentError> {
        self.follow_channel();
        let (running, entries, offered) = self.observe()?;
        let action = decide(&running, &offered, &entries, &self.refused);
        if let Action::Apply(o) = &action {
            let cmdline = std::fs::read_to_string(&self.host.cmdline).unwrap_or_default();
            let slot = running_slot(&cmdline, &running, &entries).ok_or_else(|| AgentError::NoSlot(running.clone()))?;
            tracing::info!(from = %running, to = %o.version, release = %o.dir.display(), "applying update");
            let machine_id = std::fs::read_to_string(&self.host.machine_id).unwrap_or_default();
            let layout = slots::with_machine_id(&self.config.layout, &machine_id);
            match slots::apply(&o.dir, &self.config.agent.public_key, &layout, slot) {
                Ok(applied) => {
                    tracing::info!(version = %o.version, slot = %applied.slot, entry = %applied.entry.file_name(), "update written")
                }
                Err(e) => {
                    // Refused (bad signature, hash, root hash) or failed to write: not retried
                    // until the agent restarts or a newer release arrives.
                    tracing::error!(version = %o.version, error = %e, "update not applied");
                    self.refused.insert(o.version.clone());
                    return Ok(Action::Nothing);
                }
            }
        }
        Ok(action)
    }

    /// Takes a reboot slot (waiting for it and for the drain) and reboots.
    pub fn reboot(&self, version: &str) -> Result<(), AgentError> {
        if let Some(c) = self.fleetlock()? {
            tracing::info!(group = %c.group, %version, "FleetLock: asking for a reboot slot");
            c.call("pre-reboot", Duration::from_secs(24 * 3600), self.retry())?;
        }
        tracing::info!(%version, "rebooting into the update");
        self.run_reboot_command()
    }

    fn run_reboot_command(&self) -> Result<(), AgentError> {
        let cmd = &self.config.agent.reboot_command;
        tracing::info!(command = ?cmd, "rebooting");
        let (program, args) = cmd
            .split_first()
            .ok_or_else(|| AgentError::Reboot { command: cmd.clone(), detail: "empty reboot_command".into() })?;
        let status = std::process::Command::new(program)
            .args(args)
            .status()
            .map_err(|e| AgentError::Reboot { command: cmd.clone(), detail: e.to_string() })?;
        if !status.success() {
            return Err(AgentError::Reboot { command: cmd.clone(), detail: status.to_string() });
        }
        Ok(())
    }

    /// The service: steady state, then a look at the source every interval until a reboot.
    /// After a rollback the reboot slot is kept, so no other machine tries the release that
    /// failed here; an operator releases it (`fleet-update release-reboot-slot`) once they know why.
    pub fn run(&mut self) -> Result<(), AgentError> {
        let (running, entries, offered) = self.observe()?;
        match rolled_back_from(&running, &offered, &entries) {
            Some(failed) if self.config.fleetlock.is_some() => tracing::error!(
                %failed, %running,
                "release {failed} failed to boot here and was rolled back; keeping this machine's reboot slot so the rollout stops"
            ),
            Some(failed) => tracing::error!(
                %failed, %running,
                "release {failed} failed to boot here and was rolled back; it will not be applied again"
            ),
            None => self.steady_state()?,
        }
        let interval = Duration::from_secs(self.config.agent.check_interval_secs.max(1));
        loop {
            match self.step() {
                Ok(Action::Apply(o)) => return self.reboot(&o.version),
                Ok(Action::Reboot { version }) => return self.reboot(&version),
                Ok(Action::Nothing) => {}
                // A passing problem (the ESP or the source unreadable) is logged and looked at again.
                Err(e) => tracing::warn!(error = %e, "update check failed"),
            }
            std::thread::sleep(interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(v: &str) -> Offered {
        Offered { version: v.into(), dir: PathBuf::from(format!("/src/{v}")) }
    }
    fn entry(name: &str) -> Entry {
        Entry::parse(name).expect("entry name")
    }

    #[test]
    fn the_newest_newer_release_is_applied() {
        let offered = [offer("1"), offer("3"), offer("2"), offer("10")];
        let entries = [entry("fleet-2-a.conf")];
        assert_eq!(decide("2", &offered, &entries, &HashSet::new()), Action::Apply(offer("10")));
        assert_eq!(decide("10", &offered, &entries, &HashSet::new()), Action::Nothing);
        assert_eq!(decide("2", &[], &entries, &HashSet::new()), Action::Nothing);
    }

    #[test]
    fn a_release_that_failed_to_boot_or_was_refused_is_not_tried_again() {
        let offered = [offer("3")];
        let rolled_back = [entry("fleet-2-b.conf"), entry("fleet-3-a+0-1.conf")];
        assert_eq!(decide("2", &offered, &rolled_back, &HashSet::new()), Action::Nothing);
        // Nor is an older one tried in its place.
        assert_eq!(decide("1", &[offer("2"), offer("3")], &rolled_back, &HashSet::new()), Action::Nothing);
        let refused: HashSet<String> = ["3".to_string()].into();
        assert_eq!(decide("2", &offered, &[entry("fleet-2-b.conf")], &refused), Action::Nothing);
        // A newer one replaces it.
        assert_eq!(decide("2", &[offer("3"), offer("4")], &rolled_back, &refused), Action::Apply(offer("4")));
    }

    #[test]
    fn a_release_written_but_not_booted_yet_is_rebooted_into() {
        let entries = [entry("fleet-2-b.conf"), entry("fleet-3-a+1-0.conf")];
        assert_eq!(decide("2", &[offer("3")], &entries, &HashSet::new()), Action::Reboot { version: "3".into() });
    }

    #[test]
    fn the_running_slot_comes_from_the_command_line_or_the_running_version_entry() {
        let entries = [entry("fleet-2-b.conf"), entry("fleet-3-a+0-1.conf")];
        assert_eq!(running_slot("ro fleet.slot=a quiet", "2", &entries), Some('a'));
        assert_eq!(running_slot("ro quiet", "2", &entries), Some('b'));
        assert_eq!(running_slot("ro quiet", "3", &entries), Some('a'), "the try of 3 runs until it is blessed");
        assert_eq!(running_slot("", "7", &entries), None);
    }

    #[test]
    fn update_toml_has_the_layout_then_the_agent_and_fleetlock_sections() {
        let p = Path::new("/etc/fleet/update.toml");
        let c = UpdateConfig::parse(
            p,
            "slot_a = \"/dev/a\"\nslot_b = \"/dev/b\"\nesp = \"/efi\"\n[agent]\nsource = \"/srv/u\"\ncheck_interval_secs = 2\n[fleetlock]\nurl = \"https://e:1\"\n",
        )
        .expect("parses");
        assert_eq!(c.layout.slot_b, PathBuf::from("/dev/b"));
        assert_eq!((c.agent.source.as_path(), c.agent.check_interval_secs), (Path::new("/srv/u"), 2));
        assert_eq!(c.agent.reboot_command, ["systemctl", "reboot"]);
        let f = c.fleetlock.expect("fleetlock");
        assert_eq!((f.url.as_str(), f.group.as_str()), ("https://e:1", "default"));

        let e = UpdateConfig::parse(p, "slot_a = \"a\"\nslot_b = \"b\"\nesp = \"e\"\n[agent]\nsourc = \"x\"\n")
            .expect_err("typo");
        assert!(e.to_string().contains("[agent]") && e.to_string().contains("sourc"), "{e}");
        let e = UpdateConfig::parse(p, "slot_a = \"a\"\nesp = \"e\"\n").expect_err("missing");
        assert!(e.to_string().contains("slot_b"), "{e}");
    }

    #[test]
    fn a_rolled_back_release_is_named_while_it_is_the_newest() {
        let entries = [entry("fleet-2-b.conf"), entry("fleet-3-a+0-1.conf")];
        assert_eq!(rolled_back_from("2", &[offer("2"), offer("3")], &entries).as_deref(), Some("3"));
        assert_eq!(rolled_back_from("2", &[offer("3"), offer("4")], &entries), None);
        assert_eq!(rolled_back_from("2", &[offer("2")], &entries), None);
    }

    #[test]
    fn the_machine_id_travels_in_the_entries() {
        let layout =
            Layout { slot_a: "/a".into(), slot_b: "/b".into(), esp: "/efi".into(), cmdline: "console=ttyS0".into() };
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            slots::with_machine_id(&layout, &format!("{id}\n")).cmdline,
            format!("console=ttyS0 systemd.machine_id={id}")
        );
        let has = slots::with_machine_id(&layout, id);
        assert_eq!(slots::with_machine_id(&has, "fedcba9876543210fedcba9876543210").cmdline, has.cmdline, "kept");
        assert_eq!(slots::with_machine_id(&layout, "").cmdline, "console=ttyS0");
        assert_eq!(slots::with_machine_id(&layout, "uninitialized").cmdline, "console=ttyS0");
    }

    #[test]
    fn the_running_version_is_image_version() {
        assert_eq!(running_version("NAME=x\nIMAGE_VERSION=\"2026.1\"\n").as_deref(), Some("2026.1"));
        assert_eq!(running_version("NAME=x\n"), None);
    }
}
