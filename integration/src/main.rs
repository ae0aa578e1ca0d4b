//! `fleet-lab`: brings a real fleet cluster up and down on this host. `./lab` builds and runs it.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use fleet_integration::{self as lab, process, LabState, MachineSpec};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// mimalloc, as `fleet-sim` and the engine: `./lab bench` runs its simulated machines in this
/// process, and they should cost what they cost in `fleet-sim`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "lab", about = "A real multi-machine fleet cluster on this host")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start etcd, an engine and N machines (replacing any earlier lab).
    Up {
        #[arg(long, default_value_t = 3)]
        machines: u8,
        /// Members of the etcd cluster.
        #[arg(long, default_value_t = 1)]
        etcd: u8,
        /// Engine replicas (one leads).
        #[arg(long, default_value_t = 1)]
        engines: u8,
        /// Extra metadata for a machine: NAME:key=value,key=value (repeatable).
        #[arg(long)]
        metadata: Vec<String>,
        /// Boot every machine from this release of the host image (host-image/build --out DIR)
        /// instead of this host's /usr; releases to update to go in /run/fleet-lab/updates.
        #[arg(long)]
        image: Option<PathBuf>,
        /// The key the image's releases are signed with [default: release.pub next to the release,
        /// else host-image/.keys/release.pub].
        #[arg(long, requires = "image")]
        image_key: Option<PathBuf>,
        /// Make the machines from nothing but the image and each one's provisioning config: the
        /// first three are etcd members with engines, the rest workers; no etcd or engine of the
        /// lab's (docs/host-image.md, "From zero to a cluster").
        #[arg(long, requires = "image", conflicts_with_all = ["etcd", "engines", "metadata"])]
        provision: bool,
    },
    /// (internal) The lab's HTTPS server of provisioning configs and releases.
    #[command(hide = true)]
    ServeHttps {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        listen: String,
        #[arg(long)]
        log: PathBuf,
        /// Cut off the first whole-file download of each path ending in this...
        #[arg(long)]
        cut_suffix: Option<String>,
        /// ...after this many bytes.
        #[arg(long, default_value_t = 1 << 20)]
        cut_after: u64,
    },
    /// (internal) An image machine's boot loader, dm-verity and boot assessment.
    #[command(hide = true)]
    Firmware {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        uuid: String,
    },
    /// Stop everything the lab started and remove what it created.
    Down,
    /// One line per process: KIND NAME ADDRESS [ID] STATE.
    Ps,
    /// Shell exports for fleetctl: eval "$(./lab env)".
    Env,
    /// `up`, then start examples/hello.service and list units.
    Demo,
    /// SIGKILL a part: engine|agent|machine|etcd NAME (an agent is restarted by its systemd).
    Kill { kind: String, name: String },
    /// Bring a killed part back: engine|agent|machine|etcd NAME.
    Start { kind: String, name: String },
    /// Cut a machine off the network.
    Cut { name: String },
    /// Reconnect a machine that was cut off.
    Heal { name: String },
    /// Which phase of `./lab test` runs each test target (see integration/src/phases.rs).
    Phases {
        /// Print the first lab's `--test NAME` arguments, one per line.
        #[arg(long)]
        lab_args: bool,
    },
    /// The scale benchmark: simulated clusters of 1k/10k/100k units, then real systemd on a
    /// 5-machine lab; writes docs/performance.md (replaces any running lab).
    Bench {
        /// One simulated size instead of the three: machines...
        #[arg(long, requires = "units")]
        machines: Option<usize>,
        /// ...and units.
        #[arg(long, requires = "machines")]
        units: Option<usize>,
        /// Skip the real-systemd measures on the lab.
        #[arg(long)]
        no_lab: bool,
        /// Measure nothing: write docs/performance.md from the output of an earlier run.
        #[arg(long)]
        render_from: Option<PathBuf>,
        /// Only the lab's measures (real systemd, fleetctl), printed as JSON lines; writes nothing.
        #[arg(long, conflicts_with_all = ["no_lab", "render_from"])]
        only_lab: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if matches!(cli.command, Cmd::Bench { .. }) {
        // The bench's harness (the simulations' observers, their phases) says what it sees.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
            .with_writer(std::io::stderr)
            .init();
    }
    // The bench runs its simulations in this process.
    let rt = fleet_integration::sim::runtime(Some(2))?;
    match cli.command {
        Cmd::Up { machines, etcd, engines, metadata, image, image_key, provision } => {
            let image = match image {
                Some(release) => {
                    let public_key = match image_key {
                        Some(k) => k,
                        // Next to the release (as host-image/test keeps it), else host-image/build's own.
                        None => [
                            release.parent().context("--image has no parent directory")?.join("release.pub"),
                            repo_dir().join("host-image/.keys/release.pub"),
                        ]
                        .into_iter()
                        .find(|k| k.exists())
                        .context("no release.pub next to the release nor in host-image/.keys: pass --image-key")?,
                    };
                    fleet_host_image::release::verify(&release, &public_key)
                        .with_context(|| format!("--image {}", release.display()))?;
                    Some(lab::image::ImageSpec { release, public_key })
                }
                None => None,
            };
            match (provision, image) {
                (true, Some(image)) => rt.block_on(up_provisioned(machines, &image)).map(|_| ()),
                (_, image) => rt.block_on(up(machines, etcd, engines, &metadata, image.as_ref())).map(|_| ()),
            }
        }
        Cmd::ServeHttps { dir, listen, log, cut_suffix, cut_after } => {
            tracing_subscriber::fmt().with_writer(std::io::stderr).init();
            rt.block_on(lab::provision::serve(dir, listen, log, cut_suffix, cut_after))
        }
        Cmd::Firmware { dir, name, uuid } => {
            tracing_subscriber::fmt().with_writer(std::io::stderr).init();
            rt.block_on(lab::image::firmware(&dir, &name, &uuid))
        }
        Cmd::Kill { kind, name } => rt.block_on(async {
            let mut state = LabState::load()?.context("lab is not up")?;
            lab::faults::kill(&mut state, kind.parse()?, &name).await
        }),
        Cmd::Start { kind, name } => rt.block_on(async {
            let mut state = LabState::load()?.context("lab is not up")?;
            let unit = std::fs::read_to_string(repo_dir().join("agent/fleet-agent.service"))
                .context("cannot read agent/fleet-agent.service")?;
            lab::faults::start(&mut state, kind.parse()?, &name, &unit).await
        }),
        Cmd::Cut { name } => lab::faults::set_cut(&LabState::load()?.context("lab is not up")?, &name, true),
        Cmd::Heal { name } => lab::faults::set_cut(&LabState::load()?.context("lab is not up")?, &name, false),
        Cmd::Phases { lab_args: true } => {
            for a in lab::phases::lab_args()? {
                println!("{a}");
            }
            Ok(())
        }
        Cmd::Phases { lab_args: false } => {
            let counts = lab::phases::check()?;
            for (phase, (exes, tests)) in &counts {
                eprintln!("lab: phase {phase:?}: {tests} tests in {exes} test executables");
            }
            let total: usize = counts.values().map(|c| c.1).sum();
            eprintln!("lab: every one of the workspace's {total} tests runs in exactly one phase");
            Ok(())
        }
        Cmd::Down => down(),
        Cmd::Ps => rt.block_on(ps()),
        Cmd::Env => env(),
        Cmd::Demo => rt.block_on(demo()),
        Cmd::Bench { units: Some(u), render_from: Some(log), .. } if u >= lab::bench::MILLION_FROM => {
            lab::bench::million_from_log(&log, &repo_dir().join("docs/performance.md"))
        }
        Cmd::Bench { render_from: Some(log), .. } => {
            lab::bench::render_from_log(&log, &repo_dir().join("docs/performance.md"))
        }
        Cmd::Bench { only_lab: true, .. } => rt.block_on(async {
            let lab_up = |machines: usize| -> futures::future::BoxFuture<'static, Result<LabState>> {
                Box::pin(up(machines as u8, 1, 1, &[], None))
            };
            let result = lab::bench::lab_and_cli(&lab_up).await;
            down()?;
            result.map(|_| ())
        }),
        Cmd::Bench { machines: Some(m), units: Some(u), render_from: None, .. } if u >= lab::bench::MILLION_FROM => {
            rt.block_on(lab::bench::million(m, u, &target_dir()?, &repo_dir().join("docs/performance.md")))
        }
        Cmd::Bench { machines, units, no_lab, render_from: None, .. } => rt.block_on(async {
            // The whole cluster at each size, and the engine alone at the target size (its own
            // placement rate, without agents sharing the two cores).
            let (sizes, engine_size) = match (machines, units) {
                (Some(m), Some(u)) => (vec![(m, u)], (m, u)),
                _ => (vec![(100, 1_000), (1_000, 10_000), (10_000, 100_000)], (10_000, 100_000)),
            };
            let lab_up = |machines: usize| -> futures::future::BoxFuture<'static, Result<LabState>> {
                Box::pin(up(machines as u8, 1, 1, &[], None))
            };
            let out = repo_dir().join("docs/performance.md");
            let result =
                lab::bench::bench(&sizes, engine_size, &target_dir()?, (!no_lab).then_some(&lab_up), &out).await;
            if !no_lab {
                down()?;
            }
            result
        }),
    }
}

fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate fleet-lab")?;
    exe.parent().map(PathBuf::from).context("fleet-lab has no parent directory")
}

fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn down() -> Result<()> {
    // A corrupt state file must not stop the cleanup: everything is named and found anyway.
    match LabState::load() {
        Ok(Some(state)) => lab::teardown(&state),
        Ok(None) => {}
        Err(e) => eprintln!("lab: ignoring unreadable state: {e:#}"),
    }
    lab::clean_host();
    let dir = lab::lab_dir();
    let mut last = None;
    for _ in 0..5 {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                last = None;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    if let Some(e) = last {
        // What is left is overwritten by the next `up`; say so rather than fail.
        eprintln!("lab: could not remove all of {}: {e}", dir.display());
    }
    println!("lab is down");
    Ok(())
}

async fn up(
    machines: u8,
    etcd: u8,
    engines: u8,
    metadata: &[String],
    image: Option<&lab::image::ImageSpec>,
) -> Result<LabState> {
    if machines == 0 || machines > 200 {
        bail!("--machines must be between 1 and 200");
    }
    if !(1..=5).contains(&etcd) || !(1..=5).contains(&engines) {
        bail!("--etcd and --engines must be between 1 and 5");
    }
    let mut extra: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for m in metadata {
        let (name, kvs) =
            m.split_once(':').with_context(|| format!("--metadata {m:?}: expected NAME:key=value,..."))?;
        let mut pairs = Vec::new();
        for kv in kvs.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').with_context(|| format!("--metadata {m:?}: {kv:?} is not key=value"))?;
            pairs.push((k.trim().to_string(), v.trim().to_string()));
        }
        extra.push((name.to_string(), pairs));
    }
    // Replace whatever an earlier run left: its processes (by PID), links, namespaces, sockets.
    down()?;
    // A new lab starts from nothing: releases offered to an earlier lab's image machines, or
    // their disks, would have the new machines updating (or booting an old disk) at once.
    // A machine still shutting down may write its journal meanwhile: try for a few seconds.
    for left in [lab::image::updates_dir(), lab::lab_dir().join("machines")] {
        let mut tries = 0;
        loop {
            match std::fs::remove_dir_all(&left) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if tries >= 25 => bail!("cannot remove {} left by an earlier lab: {e}", left.display()),
                Err(_) => tries += 1,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    std::fs::create_dir_all(lab::lab_dir())?;
    let bin_dir = lab::install_binaries(&target_dir()?)?;
    let mut state = LabState { bin_dir: bin_dir.clone(), ..Default::default() };
    lab::net::ensure_bridge()?;
    lab::pki::create().context("cannot create the lab's CA and certificates")?;
    state.etcd = lab::start_etcd_cluster(etcd)?;
    state.save()?;
    lab::wait_etcd(&state.etcd_endpoints(), Duration::from_secs(30)).await?;
    lab::enable_etcd_auth(&state.etcd_endpoints()).await.context("cannot turn on etcd's auth")?;
    let bridge_urls: Vec<String> =
        state.etcd.iter().map(|e| format!("https://{}:{}", lab::HOST_IP, e.client_port)).collect();
    lab::pki::allow_joins(&bridge_urls).context("cannot let the engines admit machines")?;
    for i in 1..=engines {
        let port = lab::ENGINE_PORT + i as u16 - 1;
        state.engines.push(lab::start_engine(
            &format!("e{i}"),
            &bin_dir,
            &state.etcd_endpoints(),
            lab::ETCD_PREFIX,
            port,
            5,
        )?);
        state.save()?;
    }
    let unit = std::fs::read_to_string(repo_dir().join("agent/fleet-agent.service"))
        .context("cannot read agent/fleet-agent.service")?;
    let specs: Vec<MachineSpec> = (1..=machines)
        .map(|n| {
            let mut s = MachineSpec::numbered(n);
            s.etcd_endpoints = bridge_urls.clone();
            s.image = image.cloned();
            for (name, kvs) in &extra {
                if *name == s.name {
                    s.metadata.extend(kvs.iter().cloned());
                }
            }
            s
        })
        .collect();
    for spec in &specs {
        let m = lab::boot_machine(spec, &bin_dir, &unit).await;
        match m {
            Ok(m) => {
                state.machines.push(m);
                state.save()?;
            }
            Err(e) => {
                state.save()?;
                return Err(e.context(format!("machine {} failed to boot; `./lab down` cleans up", spec.name)));
            }
        }
    }
    wait_machines(&state, machines as usize, Duration::from_secs(60)).await?;
    print_ps(&state).await;
    Ok(state)
}

/// `up --image REL --provision`: machines from nothing but the image and their configs.
async fn up_provisioned(machines: u8, image: &lab::image::ImageSpec) -> Result<LabState> {
    if !(1..=20).contains(&machines) {
        bail!("--machines must be between 1 and 20 with --provision");
    }
    down()?;
    for left in [lab::image::updates_dir(), lab::lab_dir().join("machines")] {
        let _ = std::fs::remove_dir_all(&left);
    }
    std::fs::create_dir_all(lab::lab_dir())?;
    let bin_dir = lab::install_binaries(&target_dir()?)?;
    let mut state = LabState { bin_dir: bin_dir.clone(), ..Default::default() };
    lab::net::ensure_bridge()?;
    lab::pki::create().context("cannot create the lab's CA and certificates")?;
    state.machine_engines = lab::provision::write_configs(machines)?;
    let mut serve = Command::new(bin_dir.join("fleet-lab"));
    serve
        .arg("serve-https")
        .arg("--dir")
        .arg(lab::provision::serve_dir())
        .args(["--listen", &format!("{}:{}", lab::HOST_IP, lab::provision::SERVE_PORT)])
        .arg("--log")
        .arg(lab::provision::serve_log())
        .args(["--cut-suffix", "root.erofs"]);
    state.helpers.push(process::spawn_logged(serve, &lab::lab_dir().join("serve-https.log"))?);
    state.save()?;
    lab::provision::wait_serving(Duration::from_secs(10)).await?;
    // Every machine starts at once: a member's etcd waits for a majority of its peers.
    for n in 1..=machines {
        let mut spec = MachineSpec::numbered(n);
        spec.image = Some(image.clone());
        spec.provisioned = true;
        spec.etcd_endpoints.clear();
        let dir = lab::lab_dir().join("machines").join(&spec.name);
        // One worker reads its config from a config drive, the others from the network.
        let drive = n == machines && n > lab::provision::members_of(machines);
        lab::provision::give_config(&dir, &spec.name, drive)?;
        state.machines.push(lab::start_machine(&spec, &bin_dir, "").await?);
        state.save()?;
    }
    for m in &state.machines {
        lab::wait_booted(m, Duration::from_secs(240)).await?;
    }
    wait_machines(&state, machines as usize, Duration::from_secs(180)).await?;
    print_ps(&state).await;
    Ok(state)
}

/// A GET as the lab's administrator.
async fn api_get(url: &str) -> Option<serde_json::Value> {
    let http = lab::pki::http_as("admin").ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(3), http.get(url).send()).await.ok()?.ok()?;
    resp.json().await.ok()
}

async fn wait_machines(state: &LabState, n: usize, timeout: Duration) -> Result<()> {
    let url = format!("{}/fleet/v1/machines", state.api_url().context("no engine")?);
    let until = Instant::now() + timeout;
    loop {
        let count = api_get(&url)
            .await
            .and_then(|v| v.get("machines").and_then(|m| m.as_array()).map(|a| a.len()))
            .unwrap_or(0);
        if count >= n {
            return Ok(());
        }
        if Instant::now() > until {
            bail!(
                "only {count} of {n} machines registered within {timeout:?}; see {}/machines/*/console.log",
                lab::lab_dir().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn print_ps(state: &LabState) {
    for e in &state.etcd {
        let up = process::alive(e.pid);
        println!("etcd {} {} {}", e.name, e.client_url, if up { "up" } else { "down" });
    }
    for e in &state.engines {
        let role = if !process::alive(e.pid) {
            "down".to_string()
        } else {
            match api_get(&format!("{}/engine/status", e.api_url)).await {
                Some(v) if v.get("leader").and_then(|l| l.as_bool()) == Some(true) => "leader".into(),
                Some(_) => "follower".into(),
                None => "starting".into(),
            }
        };
        println!("engine {} {} {role} socket={}", e.name, e.api_url, lab::engine_socket(&e.name).display());
    }
    for url in &state.machine_engines {
        let role = match api_get(&format!("{url}/engine/status")).await {
            Some(v) if v.get("leader").and_then(|l| l.as_bool()) == Some(true) => "leader",
            Some(_) => "follower",
            None => "down",
        };
        println!("engine (in a machine) {url} {role}");
    }
    for m in &state.machines {
        let st = if !process::alive(m.pid) {
            "down"
        } else if lab::net::is_cut(&m.name) {
            "cut"
        } else {
            "up"
        };
        println!("machine {} {} {} {st}", m.name, m.ip, m.machine_id);
    }
}

async fn ps() -> Result<()> {
    match LabState::load()? {
        Some(s) => print_ps(&s).await,
        None => eprintln!("lab is not up"),
    }
    Ok(())
}

fn env() -> Result<()> {
    let state = LabState::load()?.context("lab is not up: run ./lab up")?;
    // Every engine: fleetctl goes to the next when one is down.
    state.api_url().context("lab has no engine")?;
    let endpoints: Vec<String> = state.api_urls().iter().map(|e| format!("{e:?}")).collect();
    let admin = lab::pki::identity("admin");
    // One context in a fleetctl configuration file instead of five variables (docs/fleetctl.md).
    let config = format!(
        "# Written by `./lab env`: the lab's engines, reached as its admin.\ncurrent = \"lab\"\n\n[contexts.lab]\nendpoints = [{}]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        endpoints.join(", "),
        admin.ca_file.display().to_string(),
        admin.cert_file.display().to_string(),
        admin.key_file.display().to_string(),
    );
    let path = lab::lab_dir().join("fleetctl.toml");
    std::fs::write(&path, config).with_context(|| format!("cannot write {}", path.display()))?;
    // Variables left from an earlier `./lab env` would win over the file.
    println!("unset FLEETCTL_ENDPOINT FLEETCTL_CA_FILE FLEETCTL_CERT_FILE FLEETCTL_KEY_FILE FLEETCTL_CONTEXT");
    println!("export FLEETCTL_CONFIG={}", path.display());
    println!("export PATH=\"{}:$PATH\"", state.bin_dir.display());
    Ok(())
}

async fn demo() -> Result<()> {
    let state = up(3, 1, 1, &[], None).await?;
    let api = state.api_url().context("lab has no engine")?.to_string();
    let fleetctl = state.bin_dir.join("fleetctl");
    let example = repo_dir().join("examples/hello.service");
    for args in [vec!["start".to_string(), example.display().to_string()], vec!["list-units".to_string()]] {
        println!("$ fleetctl {}", args.join(" ").replace(&format!("{}/", repo_dir().display()), ""));
        let status = Command::new(&fleetctl)
            .args(&args)
            .env("FLEETCTL_ENDPOINT", &api)
            .envs(lab::testkit::fleetctl_env())
            .status()
            .context("cannot run fleetctl")?;
        if !status.success() {
            bail!("fleetctl {} failed", args.join(" "));
        }
    }
    println!("\nThe lab is up. Try:  eval \"$(./lab env)\"; fleetctl list-machines   (./lab down to remove it)");
    Ok(())
}
