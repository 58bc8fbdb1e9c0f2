//! `cargo xtask bench ...`: measurements in the lab, written as reports under
//! `docs/benchmarks/`. Each number is the spread of several runs in one session, beside the
//! reference it is compared with, because these machines are noisy.

mod control;
mod stats;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Control plane: leader failover, write latency and throughput, `node ls` latency.
    Control {
        /// Failovers to measure.
        #[arg(long, default_value_t = 5)]
        failovers: usize,
    },
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Control { failovers } => control::run(failovers),
    }
}
