//! `cargo xtask`: the chores around shoal — set up a fresh machine, build, run the lab, the
//! demo and the tests.
#![forbid(unsafe_code)]

mod bench;
mod bootstrap;
mod demo;
mod lab;
mod workspace;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what a fresh machine lacks (Debian packages, nightly rust-src, bpf-linker).
    /// Idempotent; the other commands run it when something is missing.
    Bootstrap,
    /// Benchmarks in the lab; reports go to docs/benchmarks/.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Build every binary (the BPF object is built and embedded by the agent's build script).
    Build,
    /// The main job: lab up, one workload per host on an overlay, traffic across hosts.
    Demo {
        /// Leave the lab running afterwards (`cargo xtask lab down` removes it).
        #[arg(long)]
        keep: bool,
    },
    /// Run the lab: hosts as network namespaces, each running shoald.
    #[command(subcommand)]
    Lab(lab::LabCommand),
    /// Formatting, lints, unit tests and end-to-end tests (needs root).
    Test,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Bootstrap => bootstrap::run(),
        Command::Bench(command) => bench::run(command),
        Command::Build => workspace::build(),
        Command::Demo { keep } => demo::run(keep),
        Command::Lab(command) => lab::run(command),
        Command::Test => workspace::test(),
    }
}
