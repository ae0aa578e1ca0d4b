//! The commands that act on many units: submit, load, start, stop, unload, destroy, restart and
//! wait. Each makes a constant number of requests however many units it names (one lookup, one
//! write of each kind, one streaming wait per 30 s), and prints the original fleetctl's lines.

use crate::{deadline, read_unit_file, unit_name_of, Block, Ctl, Progress};
use anyhow::{bail, Context, Result};
use fleet_client::{NewUnit, Unit, UnitState, Until, WaitEvent};
use fleet_model::DesiredState;
use fleet_model::{UnitFile, UnitName};
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// What the cluster holds of the units a command names, from one lookup.
pub struct Known {
    units: HashMap<String, Unit>,
    states: HashMap<String, Vec<UnitState>>,
}

impl Known {
    fn of(units: Vec<Unit>, states: Vec<UnitState>) -> Known {
        let mut by_unit: HashMap<String, Vec<UnitState>> = HashMap::new();
        for s in states {
            by_unit.entry(s.name.clone()).or_default().push(s);
        }
        Known { units: units.into_iter().map(|u| (u.name.clone(), u)).collect(), states: by_unit }
    }

    fn merge(&mut self, other: Known) {
        self.units.extend(other.units);
        self.states.extend(other.states);
    }

    fn failed(&self, name: &str) -> bool {
        self.states.get(name).is_some_and(|s| s.iter().any(|s| s.systemd_active_state == "failed"))
    }
}

/// What `submit` does with a named unit the cluster holds.
enum Plan {
    /// Give it these options (`--replace`).
    Replace(Vec<fleet_model::UnitOption>),
    /// It exists; leave its contents alone.
    Keep,
}

/// Unit names of the arguments, each once, in order, beside the argument each came from.
fn names_of(args: &[String]) -> Result<Vec<(&str, String)>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for arg in args {
        let name = unit_name_of(arg);
        UnitName::parse(&name).with_context(|| format!("invalid unit name {name:?}"))?;
        if seen.insert(name.clone()) {
            out.push((arg.as_str(), name));
        }
    }
    Ok(out)
}

/// Whether each argument is a unit file (relative to `dir`, where fleetctl runs), as
/// `Path::is_file` says, without asking the filesystem about each of a million bare names
/// (seconds of path walks): a name without a directory can only be a file if `dir`, read once,
/// holds an entry of that name.
fn unit_files(dir: &Path, named: &[(&str, String)]) -> Vec<bool> {
    let here: Option<HashSet<OsString>> =
        std::fs::read_dir(dir).ok().map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name())).collect());
    named
        .iter()
        .map(|(arg, _)| {
            let path = Path::new(arg);
            let bare = path.parent().is_some_and(|d| d.as_os_str().is_empty());
            match &here {
                Some(here) if bare && !here.contains(path.as_os_str()) => false,
                _ => dir.join(path).is_file(),
            }
        })
        .collect()
}

/// A unit's options, shared by every instance of one template.
type Options = Arc<[fleet_model::UnitOption]>;

/// Where new units' contents come from, each template's read or copied once however many
/// instances name it: the templates the cluster holds, and local template files by path
/// (`Err(None)`: no such file).
#[derive(Default)]
struct Templates {
    cluster: HashMap<String, Options>,
    local: HashMap<PathBuf, Result<Options, Option<String>>>,
}

impl Templates {
    /// The contents a named unit gets should it be new, as the original fleetctl found them: its
    /// own file (`is_file`: `arg` is one), else its template's, the cluster's or a local file of
    /// the template's name beside the argument. An error says why none was found.
    fn options_of(&mut self, arg: &str, name: &str, is_file: bool) -> Result<Options> {
        let local = Path::new(arg);
        if is_file {
            return Ok(read_unit_file(local)?.options.into());
        }
        let parsed = UnitName::parse(name)?;
        let template =
            parsed.template().with_context(|| format!("unable to find Unit({name}) in Registry or on filesystem"))?;
        if let Some(t) = self.cluster.get(template.as_str()) {
            return Ok(t.clone());
        }
        let tpath =
            local.parent().map(|d| d.join(template.as_str())).unwrap_or_else(|| PathBuf::from(template.as_str()));
        let read = self.local.entry(tpath).or_insert_with_key(|tpath| match tpath.is_file() {
            true => read_unit_file(tpath).map(|f| f.options.into()).map_err(|e| Some(format!("{e:#}"))),
            false => Err(None),
        });
        match read {
            Ok(options) => Ok(options.clone()),
            Err(Some(e)) => Err(anyhow::Error::msg(e.clone())),
            Err(None) => bail!("unable to find Unit({name}) or template Unit({template}) in Registry or on filesystem"),
        }
    }
}

impl Ctl {
    /// The named units as the cluster holds them, in one request.
    pub async fn lookup(&self, names: &[String]) -> Result<Known> {
        let found = self.api.batch_get(names).await?;
        Ok(Known::of(found.units, found.states))
    }

    /// Finds or creates each unit (from the cluster, a local file, or a template), then sets the
    /// desired state if one is given, and waits for it unless told not to.
    pub async fn submit(
        &self,
        args: &[String],
        replace: bool,
        target: Option<(DesiredState, Block)>,
    ) -> Result<ExitCode> {
        if args.is_empty() {
            println!("No units given");
            return Ok(ExitCode::SUCCESS);
        }
        let named = names_of(args)?;
        let state = target.as_ref().map(|t| t.0);
        let is_file = unit_files(Path::new("."), &named);
        // An instance not given as a file comes from its template: the cluster's if it has one,
        // else a local file of the template's name beside the argument. The templates are
        // looked up first (few, however many instances).
        let mut templates: Vec<String> = named
            .iter()
            .zip(&is_file)
            .filter(|(_, f)| !**f)
            .filter_map(|((_, name), _)| UnitName::parse(name).ok().and_then(|n| n.template()))
            .map(|t| t.to_string())
            .collect();
        templates.sort();
        templates.dedup();
        let mut known = match templates.is_empty() {
            true => Known { units: HashMap::new(), states: HashMap::new() },
            false => self.lookup(&templates).await.context("Error creating units")?,
        };
        let mut sources = Templates {
            cluster: known.units.iter().map(|(n, u)| (n.clone(), u.options.clone().into())).collect(),
            ..Default::default()
        };

        // Each unit's contents should it be new (by position in `named`); a unit without (no
        // file, no template) must exist, and is looked up to know it does. The instances of a
        // template share its options: a million of them are a million pointers, not copies.
        let mut new: Vec<Option<Options>> = Vec::with_capacity(named.len());
        let mut unresolved: Vec<(&str, anyhow::Error)> = Vec::new();
        for ((arg, name), file) in named.iter().zip(&is_file) {
            match sources.options_of(arg, name, *file) {
                Ok(options) => new.push(Some(options)),
                Err(e) => {
                    new.push(None);
                    unresolved.push((name, e));
                }
            }
        }
        if !unresolved.is_empty() {
            let names: Vec<String> = unresolved.iter().map(|(n, _)| n.to_string()).collect();
            let found = self.lookup(&names).await.context("Error creating units")?;
            if let Some((_, e)) = unresolved.into_iter().find(|(n, _)| !found.units.contains_key(*n)) {
                return Err(e.context("Error creating units"));
            }
            known.merge(found);
        }

        // One request per 10,000 units creates the new ones and answers those that exist, each
        // batch encoded from the shared options as its request goes out.
        let desired = state.unwrap_or(DesiredState::Inactive).to_string();
        let sending: Vec<NewUnit> = named
            .iter()
            .zip(&new)
            .filter_map(|((_, name), o)| o.as_deref().map(|options| NewUnit { name, options, desired_state: &desired }))
            .collect();
        let answer = self.api.create_or_find(&sending).await.context("Error creating units")?;
        drop(sending);
        let revision = answer.revision;
        let existing: HashSet<String> = answer.existing.iter().map(|u| u.name.clone()).collect();
        known.merge(Known::of(answer.existing, answer.states));
        // What this command created: sent, and not answered as existing.
        let created: Vec<bool> =
            named.iter().zip(&new).map(|((_, name), o)| o.is_some() && !existing.contains(name)).collect();
        let mut changes: Vec<Unit> = Vec::new();
        for (i, ((arg, name), file)) in named.iter().zip(&is_file).enumerate() {
            if created[i] {
                continue;
            }
            let Some(unit) = known.units.get(name) else { continue };
            // The local file as read above; read here only if that failed, to say why.
            let local = match (*file, &new[i]) {
                (false, _) => None,
                (true, Some(options)) => Some(UnitFile::from_options(options.to_vec())),
                (true, None) => Some(read_unit_file(Path::new(arg)).context("Error creating units")?),
            };
            match self.plan(arg, name, local, unit, replace, state) {
                Plan::Replace(options) => changes.push(Unit { name: name.clone(), options, ..Default::default() }),
                Plan::Keep => {}
            }
        }
        print_lines(
            named.iter().zip(&created).filter(|(_, c)| **c).map(|((_, name), _)| format!("Unit {name} inactive")),
        )?;
        let Some((state, block)) = target else {
            self.api.update(&changes).await.context("Error creating units")?;
            return Ok(ExitCode::SUCCESS);
        };
        let verb = if state == DesiredState::Launched { "start" } else { "load" };
        let replaced: HashMap<String, usize> = changes.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect();
        let mut again = Vec::new();
        let mut waiting = Vec::new();
        let mut triggered = Vec::new();
        for (i, (_, name)) in named.iter().enumerate() {
            let created_with = new[i].as_deref().filter(|_| created[i]);
            let global = match (created_with, known.units.get(name)) {
                (Some(options), _) => fleet_api::is_global(name, options),
                (None, Some(unit)) => {
                    if state == DesiredState::Launched
                        && unit.desired() == Some(DesiredState::Launched)
                        && !unit.is_global()
                        && known.failed(name)
                    {
                        // `systemctl start` semantics: starting a failed unit runs it again (the
                        // original fleet did nothing, since its desired state had not changed).
                        again.push(name.clone());
                        continue;
                    }
                    if unit.desired() != Some(state) {
                        match replaced.get(name).and_then(|i| changes.get_mut(*i)) {
                            Some(c) => c.desired_state = state.to_string(),
                            None => changes.push(Unit {
                                name: name.clone(),
                                desired_state: state.to_string(),
                                ..Default::default()
                            }),
                        }
                    }
                    unit.is_global()
                }
                (None, None) => continue,
            };
            if global {
                triggered.push(format!("Triggered global unit {name} {verb}"));
            } else if block.no_block {
                triggered.push(format!("Triggered unit {name} {verb}"));
            } else {
                waiting.push(name.clone());
            }
        }
        let revision =
            revision.max(self.api.update(&changes).await.with_context(|| format!("cannot set units to {state}"))?);
        print_lines(&triggered)?;
        if !again.is_empty() {
            for name in &again {
                eprintln!("Unit {name} has failed; starting it again");
            }
            let code = self.restart(&again, &Block { no_block: false, ..block.clone() }).await?;
            if code != ExitCode::SUCCESS {
                return Ok(code);
            }
        }
        if block.no_block {
            return Ok(ExitCode::SUCCESS);
        }
        self.wait_all(&waiting, state, state == DesiredState::Launched, &block, revision).await
    }

    /// What to do with a named unit the cluster holds, as the original fleetctl decided: it is
    /// kept unless its local file (`local`, read from `arg`) differs and `--replace` allows
    /// replacing it in its state.
    fn plan(
        &self,
        arg: &str,
        name: &str,
        local: Option<UnitFile>,
        unit: &Unit,
        replace: bool,
        target: Option<DesiredState>,
    ) -> Plan {
        let Some(file) = local else {
            return Plan::Keep;
        };
        let stored = UnitFile::from_options(unit.options.clone());
        if file.hash() == stored.hash() {
            if replace {
                println!("Found same Unit({name}) in Registry, nothing to do");
            }
            return Plan::Keep;
        }
        if !replace {
            eprintln!(
                "WARNING: Unit {name} in registry differs from local unit file {arg}. Add --replace to override."
            );
            return Plan::Keep;
        }
        let allowed = match target {
            None => unit.desired() == Some(DesiredState::Inactive),
            Some(DesiredState::Loaded) => unit.desired() != Some(DesiredState::Launched),
            _ => true,
        };
        if !allowed {
            eprintln!(
                "Warning: can not replace Unit({name}) in state '{}', use the appropriate command",
                unit.desired_state
            );
            return Plan::Keep;
        }
        Plan::Replace(file.options)
    }

    /// Waits until every unit reports `state` (and systemd `active` when `active` is set), printing
    /// where each landed as it does. A unit that cannot be placed, fails, or is destroyed ends
    /// the wait with exit 1 (the original waited forever).
    pub async fn wait_all(
        &self,
        names: &[String],
        state: DesiredState,
        active: bool,
        block: &Block,
        revision: i64,
    ) -> Result<ExitCode> {
        let until = match state {
            DesiredState::Launched if active => Until::Active,
            DesiredState::Launched => Until::Launched,
            DesiredState::Loaded => Until::Loaded,
            DesiredState::Inactive => Until::Inactive,
        };
        self.wait_until(names, until, state, block, revision).await
    }

    /// [`Ctl::wait_all`] for any condition of `units:wait`; `shown` is the state printed.
    async fn wait_until(
        &self,
        names: &[String],
        until: Until,
        shown: DesiredState,
        block: &Block,
        revision: i64,
    ) -> Result<ExitCode> {
        if names.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        let mut progress = Progress::new();
        let mut left = names.len();
        let mut failure = None;
        let pending = self
            .api
            .wait(names, until, revision, deadline(block), |e: &WaitEvent| {
                progress.clear();
                match e.error.as_str() {
                    "" => {
                        left -= 1;
                        match e.machine_id.as_str() {
                            "" => println!("Unit {} {shown}", e.name),
                            _ => println!("Unit {} {shown} on {}", e.name, e.legend()),
                        }
                        progress.tick(&format!("waiting for {left} unit(s) to be {shown}"));
                        return ControlFlow::Continue(());
                    }
                    "unplaceable" => {
                        eprintln!("Error waiting for units: unit {} cannot be placed: {}", e.name, e.reason)
                    }
                    "failed" => eprintln!(
                        "Unit {0} failed on its machine; see `fleetctl status {0}` and `fleetctl journal {0}`",
                        e.name
                    ),
                    _ => eprintln!("Error waiting for units: unit {} was destroyed while waiting for it", e.name),
                }
                failure = Some(ExitCode::from(1));
                ControlFlow::Break(())
            })
            .await?;
        if let Some(code) = failure {
            return Ok(code);
        }
        if pending.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        for n in &pending {
            eprintln!("Error waiting for units: timed out waiting for unit {n} to report state {shown}");
        }
        Ok(ExitCode::from(1))
    }

    /// The named units that exist, in the order named.
    async fn found(&self, args: &[String]) -> Result<(Vec<Unit>, Known)> {
        let names: Vec<String> = names_of(args)?.into_iter().map(|(_, n)| n).collect();
        let known = self.lookup(&names).await?;
        let units = names.iter().filter_map(|n| known.units.get(n).cloned()).collect();
        Ok((units, known))
    }

    pub async fn stop(&self, args: &[String], block: &Block) -> Result<ExitCode> {
        let (units, _) = self.found(args).await?;
        if units.is_empty() {
            eprintln!("Units not found in registry");
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(u) = units.iter().find(|u| !u.is_global() && u.current() == Some(DesiredState::Inactive)) {
            eprintln!("Unable to stop unit {} in state inactive", u.name);
            return Ok(ExitCode::from(1));
        }
        let globals: Vec<&Unit> = units.iter().filter(|u| u.is_global()).collect();
        let waiting: Vec<String> = units
            .iter()
            .filter(|u| !u.is_global() && u.current() != Some(DesiredState::Loaded))
            .map(|u| u.name.clone())
            .collect();
        let changes: Vec<Unit> = globals
            .iter()
            .map(|u| u.name.clone())
            .chain(waiting.iter().cloned())
            .map(|name| change(name, DesiredState::Loaded))
            .collect();
        let revision = self.api.update(&changes).await?;
        for u in &globals {
            println!("Triggered global unit {} stop", u.name);
        }
        if block.no_block {
            print_lines(waiting.iter().map(|n| format!("Triggered unit {n} stop")))?;
        } else {
            // Until systemd says each has stopped, not only that its agent asked it to.
            let code = self.wait_until(&waiting, Until::Stopped, DesiredState::Loaded, block, revision).await?;
            if code != ExitCode::SUCCESS {
                eprintln!("Failed to stop units {waiting:?}");
                return Ok(code);
            }
        }
        eprintln!("Successfully stopped units [{}].", waiting.join(" "));
        Ok(ExitCode::SUCCESS)
    }

    pub async fn unload(&self, args: &[String], block: &Block) -> Result<ExitCode> {
        let (units, _) = self.found(args).await?;
        if units.is_empty() {
            eprintln!("Units not found in registry");
            return Ok(ExitCode::SUCCESS);
        }
        let globals: Vec<String> = units.iter().filter(|u| u.is_global()).map(|u| u.name.clone()).collect();
        let waiting: Vec<String> = units
            .iter()
            .filter(|u| {
                !u.is_global()
                    && (u.current() != Some(DesiredState::Inactive) || u.desired() != Some(DesiredState::Inactive))
            })
            .map(|u| u.name.clone())
            .collect();
        let changes: Vec<Unit> =
            globals.iter().chain(&waiting).map(|name| change(name.clone(), DesiredState::Inactive)).collect();
        let revision = self.api.update(&changes).await?;
        for n in &globals {
            println!("Triggered global unit {n} unload");
        }
        if block.no_block {
            print_lines(waiting.iter().map(|n| format!("Triggered unit {n} unload")))?;
        } else {
            let code = self.wait_all(&waiting, DesiredState::Inactive, false, block, revision).await?;
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
    pub async fn destroy(&self, args: &[String], block: &Block) -> Result<ExitCode> {
        let names: Vec<String> = names_of(args)?.into_iter().map(|(_, n)| n).collect();
        let (destroyed, revision) = match self.api.destroy_many(&names).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("Error destroying units: {e:#}");
                return Ok(ExitCode::from(1));
            }
        };
        let destroyed: HashSet<String> = destroyed.into_iter().collect();
        let in_order: Vec<String> = names.into_iter().filter(|n| destroyed.contains(n)).collect();
        print_lines(in_order.iter().map(|n| format!("Destroyed {n}")))?;
        if in_order.is_empty() {
            eprintln!("Units not found in registry");
            return Ok(ExitCode::SUCCESS);
        }
        if block.no_block {
            return Ok(ExitCode::SUCCESS);
        }
        let pending =
            self.api.wait(&in_order, Until::Gone, revision, deadline(block), |_| ControlFlow::Continue(())).await?;
        if let Some(n) = pending.first() {
            bail!("timed out waiting for {n} to stop");
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Stops each launched unit and waits until systemd reports it stopped, then starts it again
    /// and waits until it is active. Loaded units are just started.
    pub async fn restart(&self, args: &[String], block: &Block) -> Result<ExitCode> {
        let (units, _) = self.found(args).await?;
        let mut globals = Vec::new();
        let mut stop = Vec::new();
        let mut start = Vec::new();
        for u in &units {
            if u.is_global() {
                globals.push(u.name.clone());
                continue;
            }
            match u.current() {
                Some(DesiredState::Inactive) => eprintln!("Unable to restart unit {} in state inactive", u.name),
                Some(DesiredState::Loaded) => start.push(u.name.clone()),
                _ => stop.push(u.name.clone()),
            }
        }
        let to = |names: &[String], state: DesiredState| -> Vec<Unit> {
            names.iter().map(|n| change(n.clone(), state)).collect()
        };
        let stopping: Vec<String> = globals.iter().chain(&stop).cloned().collect();
        let revision = self.api.update(&to(&stopping, DesiredState::Loaded)).await?;
        let waited = Block { no_block: false, ..block.clone() };
        let code = self.wait_until(&stop, Until::Stopped, DesiredState::Loaded, &waited, revision).await?;
        if code != ExitCode::SUCCESS {
            return Ok(code);
        }
        // A global unit has no one machine to print: wait quietly until every machine stopped it.
        let pending =
            self.api.wait(&globals, Until::Stopped, revision, deadline(block), |_| ControlFlow::Continue(())).await?;
        if let Some(n) = pending.first() {
            bail!("timed out waiting for {n} to stop");
        }
        start.extend(stop);
        let starting: Vec<String> = globals.iter().chain(&start).cloned().collect();
        let revision = self.api.update(&to(&starting, DesiredState::Launched)).await?;
        for n in &globals {
            println!("Triggered global unit {n} restart");
        }
        if block.no_block {
            print_lines(start.iter().map(|n| format!("Triggered unit {n} start")))?;
            return Ok(ExitCode::SUCCESS);
        }
        self.wait_all(&start, DesiredState::Launched, true, block, revision).await
    }

    /// `fleetctl wait --for STATE UNIT...`: blocks until every unit is there.
    pub async fn wait(&self, args: &[String], state: &str, block: &Block) -> Result<ExitCode> {
        let (target, active) = match state {
            "active" => (DesiredState::Launched, true),
            other => match other.parse::<DesiredState>() {
                Ok(s) => (s, false),
                Err(_) => bail!("--for {other:?}: expected active, launched, loaded or inactive"),
            },
        };
        let names: Vec<String> = names_of(args)?.into_iter().map(|(_, n)| n).collect();
        let known = self.lookup(&names).await?;
        if let Some(n) = names.iter().find(|n| !known.units.contains_key(*n)) {
            eprintln!("Unit {n} does not exist.");
            return Ok(ExitCode::from(1));
        }
        self.wait_all(&names, target, active, &Block { no_block: false, ..block.clone() }, 0).await
    }
}

/// A change of one unit's desired state, for `units:batchUpdate`.
fn change(name: String, state: DesiredState) -> Unit {
    Unit { name, desired_state: state.to_string(), ..Default::default() }
}

/// Prints one line per unit through one buffer: a million units' lines were as many `write`
/// calls (standard output is line-buffered), seconds of a `--names-from` command's time.
fn print_lines<L: std::fmt::Display>(lines: impl IntoIterator<Item = L>) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    for line in lines {
        writeln!(out, "{line}").context("writing to standard output")?;
    }
    out.flush().context("writing to standard output")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare name is a file only if the directory holds a file of that name (not a directory
    /// of it); a path with a directory is looked at as given; a name given twice counts once.
    #[test]
    fn unit_files_are_the_arguments_that_are_files() {
        let dir = std::env::temp_dir().join(format!("fleetctl-unit-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).expect("scratch directory");
        std::fs::create_dir_all(dir.join("d.service")).expect("scratch directory");
        std::fs::write(dir.join("a.service"), "[Service]\nExecStart=/bin/true\n").expect("unit file");
        std::fs::write(dir.join("sub/b.service"), "[Service]\nExecStart=/bin/true\n").expect("unit file");
        let abs = dir.join("a.service").display().to_string();
        let args: Vec<String> =
            ["a.service", "c.service", "d.service", "sub/b.service", "sub/a.service", abs.as_str(), "a.service"]
                .map(String::from)
                .to_vec();
        let named = names_of(&args).expect("valid names");
        let files = unit_files(&dir, &named);
        let _ = std::fs::remove_dir_all(&dir);
        // `abs` and the second `a.service` share a unit name with the first: counted once.
        assert_eq!(
            named.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
            ["a.service", "c.service", "d.service", "sub/b.service"]
        );
        assert_eq!(files, [true, false, false, true]);
        let one = |arg: &str| unit_files(&dir, &names_of(&[arg.to_string()]).expect("valid"));
        std::fs::create_dir_all(dir.join("sub")).expect("scratch directory");
        std::fs::write(dir.join("a.service"), "").expect("unit file");
        assert_eq!(one(&abs), [true]);
        assert_eq!(one("sub/a.service"), [false]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
