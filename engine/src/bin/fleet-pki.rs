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
        Cmd::CaHash => {
            let path = cli.dir.join("ca.pem");
            let pem = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            println!("{}", fleet_store::tls::ca_hash(&pem)?);
        }
    }
    Ok(())
}
