//! `fleet-image fetch [--cache DIR] URL SHA256`: makes a unit's container image available on
//! this machine, verified, before the unit runs it (docs/services.md, "Containers as units"). A
//! unit runs it as `ExecStartPre=+/usr/bin/fleet-image fetch ...` (the `+`: outside the unit's
//! `RootDirectory=`, which is the image once fetched).

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "fleet-image", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Download URL (http://, https:// or a path), check its SHA-256, unpack it into the cache
    /// (nothing is done when it is there already); prints the image's root directory.
    Fetch {
        #[arg(long, default_value = fleet_agent::image::DEFAULT_CACHE)]
        cache: PathBuf,
        url: String,
        sha256: String,
    },
    /// Print where the image with SHA256 is (or would be) unpacked.
    Path {
        #[arg(long, default_value = fleet_agent::image::DEFAULT_CACHE)]
        cache: PathBuf,
        sha256: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The unit's journal (and `fleetctl status`) shows this line.
            eprintln!("fleet-image: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    use fleet_agent::image::{fetch, parse_hash, rootfs, Fetched};
    match cli.command {
        Cmd::Fetch { cache, url, sha256 } => {
            match fetch(&cache, &url, &sha256).await.with_context(|| format!("fetch {url}"))? {
                Fetched::Cached(root) => println!("{} (cached)", root.display()),
                Fetched::Unpacked(root) => println!("{} (verified and unpacked)", root.display()),
            }
        }
        Cmd::Path { cache, sha256 } => println!("{}", rootfs(&cache, &parse_hash(&sha256)?).display()),
    }
    Ok(())
}
