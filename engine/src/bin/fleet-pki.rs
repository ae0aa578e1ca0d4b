//! `fleet-pki`: the cluster CA, certificates, API tokens and etcd's users and roles, so a cluster
//! is encrypted and authenticated without openssl (see docs/security.md).

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fleet_engine::auth::Role;
use fleet_engine::pki::{self, Ca, Usage};
use fleet_store::etcd::{connect, EtcdConfig};
use fleet_store::retry::RetryPolicy;
use fleet_store::tls::ClientTls;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "fleet-pki", version, about = "The fleet cluster's CA, certificates, tokens and etcd roles")]
struct Cli {
    /// Directory holding ca.pem and ca.key (and the certificates issued).
    #[arg(long, env = "FLEET_PKI_DIR", default_value = "/var/lib/fleet/pki", global = true)]
    dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum UsageArg {
    Server,
    Client,
    Both,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the cluster CA in --dir (kept if it exists).
    Init,
    /// Issue a certificate signed by the CA: <dir>/<file>.pem and <dir>/<file>.key.
    Issue {
        /// Base name of the files.
        #[arg(long)]
        file: String,
        /// Common name: the identity (`fleet-engine`, `machine-<machine id>`, `root`, a person).
        #[arg(long)]
        cn: String,
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        #[arg(long = "dns")]
        dns: Vec<String>,
        #[arg(long, value_enum, default_value = "both")]
        usage: UsageArg,
    },
    /// Print a new API token and the `[[auth.tokens]]` entry for the engine's configuration.
    Token {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
    },
    /// Turn on etcd's auth with the `root` and `fleet-engine` users (needs <dir>/root.pem).
    EtcdAuth {
        #[arg(long, value_delimiter = ',')]
        etcd_endpoints: Vec<String>,
        /// Key prefix the engines may read and write.
        #[arg(long, default_value = "/fleet/")]
        etcd_prefix: String,
    },
    /// Give machine ID its etcd user and role: its own keys only (needs <dir>/root.pem).
    EtcdAddMachine {
        #[arg(long, value_delimiter = ',')]
        etcd_endpoints: Vec<String>,
        #[arg(long, default_value = "/fleet/")]
        etcd_prefix: String,
        #[arg(long)]
        machine_id: String,
    },
    /// Remove machine ID's etcd user and role (a machine leaving for good, or joining again after
    /// a reinstall; needs <dir>/root.pem).
    EtcdRemoveMachine {
        #[arg(long, value_delimiter = ',')]
        etcd_endpoints: Vec<String>,
        #[arg(long)]
        machine_id: String,
    },
    /// Print the CA's pin (`sha256:<hex>` of its public key), which `fleet-agent join --ca-hash`
    /// checks.
    CaHash,
    /// Write the provisioning configs of a new cluster (docs/host-image.md, "From zero to a
    /// cluster"): OUT/NAME.toml per machine, and OUT/ca.pem, ca-hash, admin.pem, admin.key and
    /// fleetctl.toml for the operator. Members' configs hold the CA key; workers' only its pin.
    Provision {
        #[arg(long)]
        out: PathBuf,
        /// An etcd member with an engine: NAME=IP (an odd number of them).
        #[arg(long = "member", required = true, value_parser = name_ip)]
        members: Vec<(String, IpAddr)>,
        /// A worker: NAME=IP.
        #[arg(long = "worker", value_parser = name_ip)]
        workers: Vec<(String, IpAddr)>,
        #[arg(long, default_value_t = fleet_provision::ENGINE_PORT)]
        engine_port: u16,
        /// How long the configs' join token admits machines.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        token_ttl: Duration,
        /// Use the CA in this directory; without it a new CA is made, and its key is written only
        /// into the members' configs.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
    },
    /// A member's one-time etcd set-up at first boot (fleet-bootstrap.service): waits for etcd,
    /// turns on its auth, stores the provisioning config's join tokens.
    Bootstrap {
        #[arg(long, default_value = "/etc/fleet/bootstrap.toml")]
        settings: PathBuf,
        /// Give up after this long without etcd.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn name_ip(s: &str) -> Result<(String, IpAddr), String> {
    let (name, ip) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=IP"))?;
    let ip = ip.parse().map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
    Ok((name.to_string(), ip))
}

fn write_file(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    if private {
        pki::write_private(path, text).with_context(|| format!("cannot write {}", path.display()))
    } else {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }
}

fn provision(out: &Path, spec: &fleet_engine::provisioning::ClusterSpec, ca_dir: Option<&Path>) -> anyhow::Result<()> {
    let ca = match ca_dir {
        Some(dir) => Ca::load(dir)?,
        None => Ca::create("fleet cluster CA")?,
    };
    let made = fleet_engine::provisioning::cluster_configs(&ca, spec)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for (name, config) in &made.configs {
        write_file(&out.join(format!("{name}.toml")), &config.to_toml(), true)?;
    }
    write_file(&out.join("ca.pem"), &made.ca_pem, false)?;
    write_file(&out.join("ca-hash"), &format!("{}\n", made.ca_hash), false)?;
    write_file(&out.join("admin.pem"), &made.admin.cert_pem, false)?;
    write_file(&out.join("admin.key"), &made.admin.key_pem, true)?;
    let endpoints: Vec<String> = made.engines.iter().map(|e| format!("{e:?}")).collect();
    let context = format!(
        "current = \"cluster\"\n\n[contexts.cluster]\nendpoints = [{}]\nca_file = \"ca.pem\"\ncert_file = \"admin.pem\"\nkey_file = \"admin.key\"\n",
        endpoints.join(", ")
    );
    write_file(&out.join("fleetctl.toml"), &context, false)?;
    for (name, config) in &made.configs {
        println!("{}  {:?} {}", out.join(format!("{name}.toml")).display(), config.role, config.address);
    }
    println!("{}  fleetctl's context (FLEETCTL_CONFIG)", out.join("fleetctl.toml").display());
    Ok(())
}

async fn bootstrap(settings: &Path, timeout: Duration) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(settings).with_context(|| format!("cannot read {}", settings.display()))?;
    let b: fleet_provision::BootstrapSettings =
        toml::from_str(&text).with_context(|| format!("{}: not bootstrap settings", settings.display()))?;
    let dir = PathBuf::from(&b.pki_dir);
    let until = std::time::Instant::now() + timeout;
    let mut wait = Duration::from_millis(500);
    // etcd answers once a majority of members is up; until then, and while another member
    // turns auth on, try again.
    loop {
        let attempt = async {
            let mut c = root_client(&dir, b.etcd_endpoints.clone()).await?;
            pki::etcd_enable_auth(&mut c, &b.etcd_prefix).await.context("enabling etcd auth")?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
            for t in &b.tokens {
                let token = fleet_model::join::JoinToken::parse(&t.token)?;
                let record =
                    fleet_engine::provisioning::token_record(&token, t.ttl_secs, t.uses, t.metadata.clone(), now);
                let stored = fleet_engine::provisioning::add_bootstrap_token(&mut c, &b.etcd_prefix, &record).await?;
                println!("join token {}: {}", token.id, if stored { "stored" } else { "already there" });
            }
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(30), attempt).await {
            Ok(Ok(())) => {
                println!("etcd's auth is on and the cluster's join tokens are stored");
                return Ok(());
            }
            Ok(Err(e)) if std::time::Instant::now() + wait < until => eprintln!("bootstrap: not yet: {e:#}"),
            Err(_) if std::time::Instant::now() + wait < until => eprintln!("bootstrap: etcd did not answer in 30 s"),
            Ok(Err(e)) => return Err(e.context(format!("gave up after {timeout:?}"))),
            Err(_) => anyhow::bail!("etcd did not answer; gave up after {timeout:?}"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "read" => Ok(Role::Read),
        "operate" => Ok(Role::Operate),
        "admin" => Ok(Role::Admin),
        other => Err(format!("unknown role {other:?}: read, operate or admin")),
    }
}

async fn root_client(dir: &Path, endpoints: Vec<String>) -> anyhow::Result<fleet_store::etcd::Client> {
    let tls = ClientTls::from_files(
        &dir.join("ca.pem").to_string_lossy(),
        &dir.join("root.pem").to_string_lossy(),
        &dir.join("root.key").to_string_lossy(),
    )?;
    let cfg = EtcdConfig {
        endpoints,
        request_timeout: Duration::from_secs(10),
        tls: tls.map(|t| t.etcd_options()).transpose()?,
    };
    Ok(connect(&cfg, RetryPolicy { attempts: 5, ..RetryPolicy::default() }).await?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match cli.command {
        Cmd::Init => {
            Ca::load_or_create(&cli.dir)?;
            println!("{}", cli.dir.join("ca.pem").display());
        }
        Cmd::Issue { file, cn, ips, dns, usage } => {
            let ca = Ca::load_or_create(&cli.dir)?;
            let usage = match usage {
                UsageArg::Server => Usage::Server,
                UsageArg::Client => Usage::Client,
                UsageArg::Both => Usage::Both,
            };
            let (cert, key) = ca.issue_to(&cli.dir, &file, &cn, &ips, &dns, usage)?;
            println!("{}\n{}", cert.display(), key.display());
        }
        Cmd::Token { name, role } => {
            let token = pki::new_token()?;
            println!("{token}");
            eprintln!("[[auth.tokens]]\nname = {name:?}\nrole = \"{role}\"\nsha256 = \"{}\"", pki::token_hash(&token));
        }
        Cmd::EtcdAuth { etcd_endpoints, etcd_prefix } => rt.block_on(async {
            let mut c = root_client(&cli.dir, etcd_endpoints).await?;
            pki::etcd_enable_auth(&mut c, &etcd_prefix).await.context("enabling etcd auth")
        })?,
        Cmd::EtcdAddMachine { etcd_endpoints, etcd_prefix, machine_id } => rt.block_on(async {
            let mut c = root_client(&cli.dir, etcd_endpoints).await?;
            pki::etcd_add_machine(&mut c, &etcd_prefix, &machine_id).await.context("adding the machine's etcd role")
        })?,
        Cmd::EtcdRemoveMachine { etcd_endpoints, machine_id } => rt.block_on(async {
            let mut c = root_client(&cli.dir, etcd_endpoints).await?;
            pki::etcd_remove_machine(&mut c, &machine_id).await.context("removing the machine's etcd user and role")
        })?,
        Cmd::Provision { out, members, workers, engine_port, token_ttl, ca_dir } => {
            let spec = fleet_engine::provisioning::ClusterSpec {
                members,
                workers,
                engine_port,
                token_ttl_secs: token_ttl.as_secs().max(1),
                admin_name: "admin".into(),
            };
            provision(&out, &spec, ca_dir.as_deref())?;
        }
        Cmd::Bootstrap { settings, timeout } => rt.block_on(bootstrap(&settings, timeout))?,
        Cmd::CaHash => {
            let path = cli.dir.join("ca.pem");
            let pem = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            println!("{}", fleet_store::tls::ca_hash(&pem)?);
        }
    }
    Ok(())
}
