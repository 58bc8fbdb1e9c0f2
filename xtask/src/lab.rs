//! `cargo xtask lab ...`: the lab as a command-line tool over the `shoal-lab` library.

use anyhow::Result;
use clap::Subcommand;
use shoal_lab::{Lab, LabConfig, DEFAULT_LAB};

use crate::workspace;

#[derive(Subcommand)]
pub enum LabCommand {
    /// Build and bring up a lab (clearing any stale one of the same name first).
    Up {
        #[arg(long, default_value_t = 3)]
        managers: usize,
        #[arg(long, default_value_t = 3)]
        workers: usize,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
        /// Only start shoald on each host; do not form a swarm.
        #[arg(long)]
        no_swarm: bool,
    },
    /// Stop HOST's shoald (SIGTERM), keeping its data root.
    Stop {
        host: String,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Start HOST's shoald again on its data root.
    Start {
        host: String,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Cut HOSTS off from the other hosts on the lab switch (they still reach each other).
    Partition {
        #[arg(required = true)]
        hosts: Vec<String>,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Undo every partition.
    Heal {
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Remove everything the lab made (idempotent; also after a crash).
    Down {
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// One line per host: address, shoald state, socket.
    Status {
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Run a command inside HOST's network namespace, with DOCKER_HOST set and shoal on PATH.
    Exec {
        host: String,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print the `export DOCKER_HOST=...` line for HOST.
    Env {
        host: String,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
}

pub fn run(command: LabCommand) -> Result<()> {
    match command {
        LabCommand::Up { managers, workers, name, no_swarm } => {
            workspace::build()?;
            let config =
                LabConfig { managers, workers, swarm: !no_swarm, ..LabConfig::new(&name, workspace::bin_dir()) };
            let lab = Lab::up(&config)?;
            eprintln!("try: cargo xtask lab exec {} -- shoal version", lab.hosts[0].name);
            Ok(())
        }
        LabCommand::Stop { host, name } => Lab::load(&name)?.stop(&host),
        LabCommand::Start { host, name } => {
            let pid = Lab::load(&name)?.start(&host)?;
            eprintln!("{host}: shoald ready (pid {pid})");
            Ok(())
        }
        LabCommand::Partition { hosts, name } => {
            let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
            Lab::load(&name)?.partition(&hosts)
        }
        LabCommand::Heal { name } => Lab::load(&name)?.heal(),
        LabCommand::Down { name } => {
            let started = std::time::Instant::now();
            shoal_lab::down(&name)?;
            eprintln!("lab {name} down in {:.2}s", started.elapsed().as_secs_f64());
            Ok(())
        }
        LabCommand::Status { name } => {
            let lab = Lab::load(&name)?;
            println!("{:<6} {:<12} {:<10} SOCKET", "HOST", "ADDRESS", "SHOALD");
            for host in &lab.hosts {
                let state = if lab.is_serving(&host.name)? { "serving" } else { "down" };
                println!("{:<6} {:<12} {:<10} {}", host.name, host.addr.to_string(), state, host.socket.display());
            }
            Ok(())
        }
        LabCommand::Exec { host, name, command } => {
            let status = Lab::load(&name)?.command(&host, &command)?.status()?;
            // Hand the command's own exit code on, as `docker exec` does.
            std::process::exit(status.code().unwrap_or(1));
        }
        LabCommand::Env { host, name } => {
            println!("export DOCKER_HOST={}", Lab::load(&name)?.host(&host)?.docker_host());
            Ok(())
        }
    }
}
