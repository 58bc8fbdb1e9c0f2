//! `cargo xtask bench ...`: measurements in the lab, written as reports under
//! `docs/benchmarks/`. Each number is the spread of several runs in one session, beside the
//! reference it is compared with, because these machines are noisy.

mod control;
mod net;
mod stats;
mod swarmkit;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Control plane: leader failover and node-down detection beside real Docker Swarm, write
    /// latency and throughput, `node ls` latency, spurious elections, the store at 100k tasks.
    Control {
        /// Failovers to measure (each kind, each cluster).
        #[arg(long, default_value_t = 5)]
        failovers: usize,
        /// Seconds idle, then as many under load, watching for spurious elections.
        #[arg(long, default_value_t = 300)]
        stability_seconds: u64,
        /// Only shoal's leader failovers (crash and graceful), printed, no report: for tuning
        /// raft's timers.
        #[arg(long)]
        failover_only: bool,
    },
    /// Data plane: HTTP through shoal's mesh and VIPs vs a direct path, nftables and iptables
    /// at several scales; programming time; per-program BPF cost; overlay vs underlay TCP.
    Net {
        /// Runs of each measurement.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
        /// Numbers of services to measure at.
        #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
        scales: Vec<usize>,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        iperf_seconds: u32,
        /// Rounds of single changes (add/remove a backend and an endpoint) at the largest scale.
        #[arg(long, default_value_t = 500)]
        change_rounds: usize,
        /// Only the single changes and resyncs at the largest scale, printed, no report.
        #[arg(long)]
        changes_only: bool,
    },
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Control { failovers, stability_seconds, failover_only } => {
            if failover_only {
                control::failovers_only(failovers)
            } else {
                control::run(failovers, std::time::Duration::from_secs(stability_seconds))
            }
        }
        BenchCommand::Net { runs, seconds, scales, iperf_seconds, change_rounds, changes_only } => {
            net::run(net::Options { runs, seconds, scales, iperf_seconds, change_rounds, changes_only })
        }
    }
}
