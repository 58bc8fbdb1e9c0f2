//! `shoal-bpf-cost`: the kernel's time per packet for each of shoald's BPF programs on its
//! common paths (BPF_PROG_TEST_RUN in repeat mode on the testbed network), as JSON on stdout.
//! `cargo xtask bench net` runs it; it needs root and touches nothing but a scratch pin
//! directory it removes and a network namespace of its own (the testbed's underlay), gone
//! when it exits.
#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser)]
#[command(name = "shoal-bpf-cost")]
struct Args {
    /// Runs per measurement (the kernel reports their average).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Measurements per path.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let costs = shoal_agent::net::bpf::testbed::program_costs(args.repeat, args.rounds)?;
    println!("{}", serde_json::to_string_pretty(&costs)?);
    Ok(())
}
