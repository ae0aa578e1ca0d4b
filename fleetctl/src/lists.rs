//! The listings (`list-units`, `list-unit-files`, `list-machines`) and their columns.

use crate::*;

impl Ctl {
    /// Lists states as the engine streams them: up to [`HOLD_ROWS`] rows are held and printed as
    /// the original did (columns as wide as the rows printed); a longer listing is printed row by
    /// row as it arrives, its columns as wide as the stream's head announces (the MACHINE column
    /// as wide as the cluster's widest machine), so the first row shows at once.
    pub(crate) async fn list_units(&self, f: &ListFlags) -> Result<ExitCode> {
        use std::io::Write;
        let fields =
            fields(f, "unit,machine,active,sub", &["active", "hash", "health", "load", "machine", "sub", "unit"])?;
        let context = "Error retrieving list of units from repository";
        let mut stream = self.api.open_states(None).await.context(context)?;
        let head = match stream.next().await.context(context)? {
            Some(fleet_client::StateLine::Head(h)) => h,
            _ => anyhow::bail!("{context}: the engine's answer did not begin with its head"),
        };
        // Rows carry their machine's address, so the machines need not be listed (10,000 of
        // them took longer than the stream's first rows); an engine whose rows do not (or the
        // original's pages) is asked for them.
        let machines = if head.machine_ips { HashMap::new() } else { self.machines().await.context(context)? };
        let machine_cell = |s: &fleet_client::UnitState| {
            if head.machine_ips {
                Machine { id: s.machine_id.clone(), primary_ip: s.machine_ip.clone(), ..Default::default() }
                    .legend(f.full)
            } else {
                machine_legend(&machines, &s.machine_id, f.full)
            }
        };
        let cells = |s: &fleet_client::UnitState| -> Vec<String> {
            fields
                .iter()
                .map(|c| match c.as_str() {
                    "unit" => s.name.clone(),
                    "machine" if s.machine_id.is_empty() => "-".into(),
                    "machine" => machine_cell(s),
                    "active" => s.systemd_active_state.clone(),
                    "sub" => s.systemd_sub_state.clone(),
                    "load" => s.systemd_load_state.clone(),
                    // A unit that declares no health (or is not active) has none: "-".
                    "health" if s.health.is_empty() => "-".to_string(),
                    "health" => s.health.clone(),
                    _ => short_hash(&s.hash, f.full),
                })
                .collect()
        };
        let header: Vec<String> = fields.iter().map(|f| f.to_uppercase()).collect();
        let mut held: Vec<Vec<String>> = Vec::new();
        let mut streaming: Option<(table::Layout, std::io::BufWriter<std::io::Stdout>)> = None;
        if !self.json && head.rows > HOLD_ROWS {
            let layout = table::Layout::new(&stream_widths(&fields, &head, &machines, f));
            let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout());
            if !f.no_legend {
                let mut text = String::new();
                layout.line(&header, &mut text);
                if let Err(e) = out.write_all(text.as_bytes()) {
                    return written_out(Err(e));
                }
            }
            streaming = Some((layout, out));
        }
        let mut written = 0u64;
        while let Some(line) = stream.next().await.context(context)? {
            let s = match line {
                fleet_client::StateLine::Head(_) => continue,
                fleet_client::StateLine::Row(s) => s,
            };
            let Some((layout, out)) = streaming.as_mut() else {
                held.push(cells(&s));
                continue;
            };
            let mut text = String::new();
            layout.line(&cells(&s), &mut text);
            written += 1;
            // The first row is shown at once; the rest as the buffer fills.
            let r = out.write_all(text.as_bytes()).and_then(|_| if written == 1 { out.flush() } else { Ok(()) });
            if r.is_err() {
                return written_out(r);
            }
        }
        match streaming {
            Some((_, mut out)) => written_out(out.flush()),
            None => {
                self.emit(&fields, &held, f.no_legend)?;
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    pub(crate) async fn list_unit_files(&self, f: &ListFlags) -> Result<ExitCode> {
        let fields = fields(
            f,
            "unit,hash,dstate,state,target",
            &["desc", "dstate", "global", "hash", "reason", "state", "target", "tmachine"],
        )?;
        let (mut units, machines) =
            tokio::try_join!(async { Ok::<_, anyhow::Error>(self.api.units().await?) }, self.machines())
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

    pub(crate) async fn list_machines(&self, f: &ListFlags) -> Result<ExitCode> {
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

pub(crate) fn fields(f: &ListFlags, default: &str, valid: &[&str]) -> Result<Vec<String>> {
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
    pub(crate) fn emit(&self, fields: &[String], rows: &[Vec<String>], no_legend: bool) -> Result<()> {
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

pub(crate) fn print_table(fields: &[String], rows: &[Vec<String>], no_legend: bool) {
    let header: Vec<String> = fields.iter().map(|f| f.to_uppercase()).collect();
    print!("{}", table::render((!no_legend).then_some(header.as_slice()), rows));
}

/// Rows `list-units` holds to print as the original did; a longer listing is printed as it comes.
const HOLD_ROWS: u64 = 5_000;

/// Each column's longest value for a streamed listing, from the stream's head.
fn stream_widths(
    fields: &[String],
    h: &fleet_client::StateStreamHead,
    machines: &HashMap<String, Machine>,
    f: &ListFlags,
) -> Vec<usize> {
    let longest = |k: &str| h.longest.get(k).copied().unwrap_or(0) as usize;
    fields
        .iter()
        .map(|c| {
            let values = match c.as_str() {
                "unit" => longest("name"),
                "machine" if h.machine_ips => {
                    let zeros = |n: usize| "0".repeat(n);
                    let widest = Machine {
                        id: zeros(longest("machineID").max(1)),
                        primary_ip: zeros(longest("machineIP")),
                        ..Default::default()
                    };
                    widest.legend(f.full).chars().count()
                }
                "machine" => widest_machine(machines, longest("machineID"), f.full),
                "active" => longest("systemdActiveState"),
                "sub" => longest("systemdSubState"),
                "load" => longest("systemdLoadState"),
                "health" => longest("health").max(1),
                _ => short_hash(&"0".repeat(longest("hash")), f.full).len(),
            };
            // The legend is part of the table when printed.
            if f.no_legend {
                values
            } else {
                values.max(c.len())
            }
        })
        .collect()
}

/// How a streamed listing ends: a reader that stopped reading (`| head`) is not an error.
fn written_out(r: std::io::Result<()>) -> Result<ExitCode> {
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("cannot write the listing"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// The widest MACHINE cell any row could have: the cluster's machines, or a machine no longer
/// listed (an id of `id_len` characters and no address).
fn widest_machine(machines: &HashMap<String, Machine>, id_len: usize, full: bool) -> usize {
    let unknown = machine_legend(machines, &"0".repeat(id_len.max(1)), full).chars().count();
    machines.values().map(|m| m.legend(full).chars().count()).fold(unknown.max(1), usize::max)
}

pub(crate) fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

pub(crate) fn short_id(id: &str) -> String {
    if id.len() > 8 {
        format!("{}...", &id[..8])
    } else {
        id.to_string()
    }
}

pub(crate) fn short_hash(h: &str, full: bool) -> String {
    if h.is_empty() {
        "-".into()
    } else if full || h.len() <= 7 {
        h.to_string()
    } else {
        h[..7].to_string()
    }
}

pub(crate) fn machine_legend(machines: &HashMap<String, Machine>, id: &str, full: bool) -> String {
    if id.is_empty() {
        return "-".into();
    }
    machines.get(id).cloned().unwrap_or(Machine { id: id.to_string(), ..Default::default() }).legend(full)
}
