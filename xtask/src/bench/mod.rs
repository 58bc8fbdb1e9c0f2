//! `cargo xtask bench ...`: measurements in the lab, written as reports under
//! `docs/benchmarks/`. Each number is the spread of several runs in one session, beside the
//! reference it is compared with, because these machines are noisy.

mod control;
mod net;
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
    /// Data plane: overlay vs underlay TCP throughput (iperf3).
    Net {
        /// Runs of each path.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds per run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
    },
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Control { failovers } => control::run(failovers),
        BenchCommand::Net { runs, seconds } => net::run(runs, seconds),
    }
}
