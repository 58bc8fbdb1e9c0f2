//! `shoal swarm ...`: the verbs and flags of `docker swarm`, with its messages.

use std::io::{BufRead, Write};

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use shoal_api::{
    info::Info,
    node::Node,
    swarm::{InitRequest, JoinRequest, Swarm, SwarmSpec, UnlockKeyResponse, UnlockRequest},
};

use crate::client::Client;

#[derive(Subcommand)]
pub enum SwarmCommand {
    /// Initialize a swarm: this node becomes its first manager.
    Init(InitArgs),
    /// Join a swarm as a node and/or manager.
    Join {
        /// Token for entry into the swarm.
        #[arg(long)]
        token: String,
        /// Advertised address (format: <ip|interface>[:port]).
        #[arg(long, default_value = "")]
        advertise_addr: String,
        /// Listen address (format: <ip|interface>[:port]).
        #[arg(long, default_value = "0.0.0.0:2377")]
        listen_addr: String,
        /// Availability of the node ("active", "pause", "drain").
        #[arg(long, default_value = "active")]
        availability: String,
        /// A manager's address, HOST:PORT.
        remote: String,
    },
    /// Display and rotate the root CA.
    Ca {
        /// Rotate the swarm CA: a new root (or the one given), every node's certificate
        /// reissued.
        #[arg(long)]
        rotate: bool,
        /// Path to the PEM-formatted root CA certificate to use for the new cluster.
        #[arg(long, requires = "rotate")]
        ca_cert: Option<std::path::PathBuf>,
        /// Path to the PEM-formatted root CA key to use for the new cluster.
        #[arg(long, requires = "rotate")]
        ca_key: Option<std::path::PathBuf>,
        /// Exit immediately instead of waiting for the root rotation to converge.
        #[arg(short, long)]
        detach: bool,
        /// Suppress progress output.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Manage join tokens.
    JoinToken {
        /// Rotate join token.
        #[arg(long)]
        rotate: bool,
        /// Only display token.
        #[arg(short, long)]
        quiet: bool,
        role: Role,
    },
    /// Leave the swarm.
    Leave {
        /// Force this node to leave the swarm, ignoring warnings.
        #[arg(short, long)]
        force: bool,
    },
    /// Update the swarm.
    Update(SpecArgs),
    /// Unlock swarm (the key is read from stdin).
    Unlock,
    /// Manage the unlock key.
    UnlockKey {
        /// Rotate unlock key.
        #[arg(long)]
        rotate: bool,
        /// Only display token.
        #[arg(short, long)]
        quiet: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Role {
    Worker,
    Manager,
}

#[derive(Args)]
pub struct InitArgs {
    /// Advertised address (format: <ip|interface>[:port]).
    #[arg(long, default_value = "")]
    advertise_addr: String,
    /// Listen address (format: <ip|interface>[:port]).
    #[arg(long, default_value = "0.0.0.0:2377")]
    listen_addr: String,
    /// Force create a new cluster from current state.
    #[arg(long)]
    force_new_cluster: bool,
    /// Availability of the node ("active", "pause", "drain").
    #[arg(long, default_value = "active")]
    availability: String,
    #[command(flatten)]
    spec: SpecArgs,
}

/// Flags shared by `init` and `update`.
#[derive(Args)]
pub struct SpecArgs {
    /// Enable manager autolocking (requiring an unlock key to start a stopped manager).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    autolock: Option<bool>,
    /// Validity period for node certificates (ns|us|ms|s|m|h).
    #[arg(long, value_parser = parse_duration)]
    cert_expiry: Option<i64>,
    /// Dispatcher heartbeat period (ns|us|ms|s|m|h).
    #[arg(long, value_parser = parse_duration)]
    dispatcher_heartbeat: Option<i64>,
    /// Task history retention limit.
    #[arg(long)]
    task_history_limit: Option<i64>,
}

impl SpecArgs {
    fn apply(&self, spec: &mut SwarmSpec) {
        if let Some(autolock) = self.autolock {
            spec.encryption_config.auto_lock_managers = autolock;
        }
        if let Some(ns) = self.cert_expiry {
            spec.ca_config.node_cert_expiry = ns;
        }
        if let Some(ns) = self.dispatcher_heartbeat {
            spec.dispatcher.heartbeat_period = ns;
        }
        if let Some(limit) = self.task_history_limit {
            spec.orchestration.task_history_retention_limit = Some(limit);
        }
    }
}

/// Go-style durations (`90s`, `2160h`, `1h30m`) in nanoseconds.
fn parse_duration(text: &str) -> Result<i64, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))?;
    i64::try_from(d.as_nanos()).map_err(|_| format!("duration {text:?} is too long"))
}

pub async fn run(client: &Client, command: SwarmCommand) -> Result<()> {
    match command {
        SwarmCommand::Init(args) => {
            let mut spec = SwarmSpec::default();
            args.spec.apply(&mut spec);
            let autolock = spec.encryption_config.auto_lock_managers;
            let request = InitRequest {
                listen_addr: args.listen_addr,
                advertise_addr: args.advertise_addr,
                force_new_cluster: args.force_new_cluster,
                availability: args.availability,
                auto_lock_managers: autolock,
                spec,
                ..Default::default()
            };
            let node_id: String = client.post("/swarm/init", &request).await?;
            println!("Swarm initialized: current node ({node_id}) is now a manager.\n");
            print_join_command(client, Role::Worker, false).await?;
            println!(
                "To add a manager to this swarm, run 'shoal swarm join-token manager' and follow the instructions.\n"
            );
            if autolock {
                print_unlock_key(client, false).await?;
            }
        }
        SwarmCommand::Join { token, advertise_addr, listen_addr, availability, remote } => {
            let request = JoinRequest {
                listen_addr,
                advertise_addr,
                remote_addrs: vec![remote],
                join_token: token,
                availability,
                ..Default::default()
            };
            client.post_empty("/swarm/join", &request).await?;
            let info: Info = client.get("/info").await?;
            let role = if info.swarm.control_available { "manager" } else { "worker" };
            println!("This node joined a swarm as a {role}.");
        }
        SwarmCommand::JoinToken { rotate, quiet, role } => {
            if rotate {
                let swarm: Swarm = client.get("/swarm").await?;
                let flag = match role {
                    Role::Worker => "rotateWorkerToken",
                    Role::Manager => "rotateManagerToken",
                };
                let path = format!("/swarm/update?version={}&{flag}=true", swarm.cluster.meta.version.index);
                client.post_empty(&path, &swarm.cluster.spec).await?;
                if !quiet {
                    println!("Successfully rotated {} join token.\n", role_name(role));
                }
            }
            print_join_command(client, role, quiet).await?;
        }
        SwarmCommand::Ca { rotate, ca_cert, ca_key, detach, quiet } => {
            if rotate {
                let swarm: Swarm = client.get("/swarm").await?;
                let mut spec = swarm.cluster.spec.clone();
                let read = |path: Option<std::path::PathBuf>| -> Result<String> {
                    path.map(|p| std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
                        .transpose()
                        .map(Option::unwrap_or_default)
                };
                spec.ca_config.signing_ca_cert = read(ca_cert)?;
                spec.ca_config.signing_ca_key = read(ca_key)?;
                if spec.ca_config.signing_ca_cert.is_empty() && spec.ca_config.signing_ca_key.is_empty() {
                    spec.ca_config.force_rotate += 1;
                }
                client
                    .post_empty(&format!("/swarm/update?version={}", swarm.cluster.meta.version.index), &spec)
                    .await?;
                if detach {
                    return Ok(());
                }
                wait_for_root_rotation(client, quiet).await?;
            }
            let swarm: Swarm = client.get("/swarm").await?;
            println!("{}", swarm.cluster.tls_info.trust_root.trim());
        }
        SwarmCommand::Leave { force } => {
            client.post_empty(&format!("/swarm/leave?force={force}"), &()).await?;
            println!("Node left the swarm.");
        }
        SwarmCommand::Update(args) => {
            let swarm: Swarm = client.get("/swarm").await?;
            let was_locked = swarm.cluster.spec.encryption_config.auto_lock_managers;
            let mut spec = swarm.cluster.spec.clone();
            args.apply(&mut spec);
            let now_locked = spec.encryption_config.auto_lock_managers;
            client.post_empty(&format!("/swarm/update?version={}", swarm.cluster.meta.version.index), &spec).await?;
            println!("Swarm updated.");
            if now_locked && !was_locked {
                print_unlock_key(client, false).await?;
            }
        }
        SwarmCommand::Unlock => {
            let info: Info = client.get("/info").await?;
            if info.swarm.local_node_state.as_str() != "locked" {
                bail!("Error: This node is not part of a swarm or is not locked");
            }
            print!("Please enter unlock key: ");
            std::io::stdout().flush()?;
            let mut key = String::new();
            std::io::stdin().lock().read_line(&mut key)?;
            client.post_empty("/swarm/unlock", &UnlockRequest { unlock_key: key.trim().to_owned() }).await?;
            println!();
        }
        SwarmCommand::UnlockKey { rotate, quiet } => {
            if rotate {
                let swarm: Swarm = client.get("/swarm").await?;
                if !swarm.cluster.spec.encryption_config.auto_lock_managers {
                    bail!("cannot rotate because autolock is not turned on");
                }
                let path =
                    format!("/swarm/update?version={}&rotateManagerUnlockKey=true", swarm.cluster.meta.version.index);
                client.post_empty(&path, &swarm.cluster.spec).await?;
                if !quiet {
                    println!("Successfully rotated manager unlock key.\n");
                }
            }
            print_unlock_key(client, quiet).await?;
        }
    }
    Ok(())
}

/// Shows, as `docker swarm ca --rotate` does, how many nodes hold a certificate of the new
/// root and then trust it alone, until all do.
async fn wait_for_root_rotation(client: &Client, quiet: bool) -> Result<()> {
    let mut last = None;
    loop {
        let swarm: Swarm = client.get("/swarm").await?;
        let nodes: Vec<Node> = client.get("/nodes").await?;
        let wanted = &swarm.cluster.tls_info;
        let certs = nodes.iter().filter(|n| n.description.tls_info.same_issuer(wanted)).count();
        let certs_done = certs == nodes.len() && !swarm.cluster.root_rotation_in_progress;
        let roots = if certs_done {
            nodes.iter().filter(|n| n.description.tls_info.trust_root == wanted.trust_root).count()
        } else {
            0
        };
        let progress = (certs, roots, nodes.len());
        if !quiet && last != Some(progress) {
            println!("rotated TLS certificates:  {certs}/{} nodes", nodes.len());
            println!("rotated CA certificates:   {roots}/{} nodes", nodes.len());
            last = Some(progress);
        }
        if certs_done && roots == nodes.len() {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Worker => "worker",
        Role::Manager => "manager",
    }
}

async fn print_join_command(client: &Client, role: Role, quiet: bool) -> Result<()> {
    let swarm: Swarm = client.get("/swarm").await?;
    let token = match role {
        Role::Worker => swarm.join_tokens.worker,
        Role::Manager => swarm.join_tokens.manager,
    };
    if quiet {
        println!("{token}");
        return Ok(());
    }
    let info: Info = client.get("/info").await?;
    let node: Node = client.get(&format!("/nodes/{}", info.swarm.node_id)).await?;
    let addr = node.manager_status.map(|m| m.addr).unwrap_or_default();
    println!("To add a {} to this swarm, run the following command:\n", role_name(role));
    println!("    shoal swarm join --token {token} {addr}\n");
    Ok(())
}

async fn print_unlock_key(client: &Client, quiet: bool) -> Result<()> {
    let key: UnlockKeyResponse = client.get("/swarm/unlockkey").await?;
    if key.unlock_key.is_empty() {
        bail!("no unlock key is set");
    }
    if quiet {
        println!("{}", key.unlock_key);
        return Ok(());
    }
    println!("To unlock a swarm manager after it restarts, run the `shoal swarm unlock`");
    println!("command and provide the following key:\n");
    println!("    {}\n", key.unlock_key);
    println!("Please remember to store this key in a password manager, since without it you");
    println!("will not be able to restart the manager.");
    Ok(())
}
