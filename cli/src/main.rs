//! `shoal`: the command-line client of a shoal node, speaking the same API as `docker`.
//!
//! `swarm` and `node` follow `docker swarm` and `docker node`; `dataplane` drives the agent's
//! overlay directly.
#![forbid(unsafe_code)]

mod client;
mod node;
mod swarm;
mod table;

use std::io::Read;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use shoal_api::{
    dataplane::{Counter, DataplaneSpec},
    system::Version,
};

use crate::client::Client;

#[derive(Parser)]
#[command(name = "shoal", version, about = "Drive a shoal node (same verbs as docker)")]
struct Cli {
    /// Daemon socket to connect to (as docker's -H; `unix://` optional).
    #[arg(short = 'H', long = "host", env = "DOCKER_HOST", default_value = "unix:///run/shoal/shoal.sock")]
    host: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the client and server versions.
    Version,
    /// Manage the swarm.
    #[command(subcommand)]
    Swarm(swarm::SwarmCommand),
    /// Manage swarm nodes.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// The node's overlay data plane (desired state and BPF counters).
    #[command(subcommand)]
    Dataplane(DataplaneCommand),
}

#[derive(Subcommand)]
enum DataplaneCommand {
    /// Print the desired state the node is applying, as JSON.
    Show,
    /// Replace the desired state with the JSON in FILE (`-` for stdin).
    Apply { file: String },
    /// Print the BPF programs' counters.
    Stats,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("{e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let client = Client::new(&cli.host)?;
    match cli.command {
        Command::Version => {
            let v: Version = client.get("/version").await?;
            println!("Client: shoal {}", env!("CARGO_PKG_VERSION"));
            println!(
                "Server: shoald {}\n API version:  {} (minimum {})\n OS/Arch:      {}/{}\n Kernel:       {}",
                v.version, v.api_version, v.min_api_version, v.os, v.arch, v.kernel_version
            );
        }
        Command::Swarm(command) => swarm::run(&client, command).await?,
        Command::Node(command) => node::run(&client, command).await?,
        Command::Dataplane(DataplaneCommand::Show) => {
            let spec: DataplaneSpec = client.get("/shoal/v1/dataplane").await?;
            println!("{}", serde_json::to_string_pretty(&spec)?);
        }
        Command::Dataplane(DataplaneCommand::Apply { file }) => {
            let text = if file == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let spec: DataplaneSpec = serde_json::from_str(&text).context("parsing the desired state")?;
            let applied: DataplaneSpec = client.put("/shoal/v1/dataplane", &spec).await?;
            println!("applied: {} networks, {} endpoints", applied.networks.len(), applied.endpoints.len());
        }
        Command::Dataplane(DataplaneCommand::Stats) => {
            let counters: Vec<Counter> = client.get("/shoal/v1/dataplane/stats").await?;
            if counters.is_empty() {
                bail!("the daemon returned no counters");
            }
            println!("{:<24} {:>12} {:>14}", "COUNTER", "PACKETS", "BYTES");
            for c in counters {
                println!("{:<24} {:>12} {:>14}", c.name, c.packets, c.bytes);
            }
        }
    }
    Ok(())
}
