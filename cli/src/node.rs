//! `shoal node ...`: the verbs and flags of `docker node`, with its table and messages.

use anyhow::{bail, Result};
use clap::Subcommand;
use shoal_api::{
    info::Info,
    node::{Node, NodeAvailability, NodeRole, NodeSpec},
};

use crate::{client::Client, table};

#[derive(Subcommand)]
pub enum NodeCommand {
    /// List nodes in the swarm.
    Ls {
        /// Only display IDs.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Display detailed information on one or more nodes.
    Inspect {
        /// Print the information in a human friendly format.
        #[arg(long)]
        pretty: bool,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Update a node.
    Update {
        /// Availability of the node ("active", "pause", "drain").
        #[arg(long)]
        availability: Option<String>,
        /// Add or update a node label (key=value).
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        /// Remove a node label if exists.
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        /// Role of the node ("worker", "manager").
        #[arg(long)]
        role: Option<String>,
        node: String,
    },
    /// Promote one or more nodes to manager in the swarm.
    Promote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Demote one or more nodes from manager in the swarm.
    Demote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Remove one or more nodes from the swarm.
    Rm {
        /// Force remove a node from the swarm.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

pub async fn run(client: &Client, command: NodeCommand) -> Result<()> {
    match command {
        NodeCommand::Ls { quiet } => ls(client, quiet).await,
        NodeCommand::Inspect { pretty, nodes } => {
            let mut found = Vec::new();
            for reference in &nodes {
                found.push(client.get::<Node>(&format!("/nodes/{reference}")).await?);
            }
            if pretty {
                for node in &found {
                    print!("{}", pretty_node(node));
                }
            } else {
                println!("{}", serde_json::to_string_pretty(&found)?);
            }
            Ok(())
        }
        NodeCommand::Update { availability, label_add, label_rm, role, node } => {
            update(client, &node, |spec| {
                if let Some(a) = &availability {
                    spec.availability = parse_availability(a)?;
                }
                if let Some(r) = &role {
                    spec.role = parse_role(r)?;
                }
                for label in &label_add {
                    let (k, v) = label.split_once('=').unwrap_or((label, ""));
                    spec.annotations.labels.insert(k.to_owned(), v.to_owned());
                }
                for key in &label_rm {
                    spec.annotations.labels.remove(key);
                }
                Ok(())
            })
            .await?;
            println!("{node}");
            Ok(())
        }
        NodeCommand::Promote { nodes } => {
            set_role(client, &nodes, NodeRole::Manager, |n| format!("Node {n} promoted to a manager in the swarm."))
                .await
        }
        NodeCommand::Demote { nodes } => {
            set_role(client, &nodes, NodeRole::Worker, |n| format!("Manager {n} demoted in the swarm.")).await
        }
        NodeCommand::Rm { force, nodes } => {
            for node in nodes {
                client.delete(&format!("/nodes/{node}?force={force}")).await?;
                println!("{node}");
            }
            Ok(())
        }
    }
}

/// `promote`/`demote`: the role of each node, with docker's message for each.
async fn set_role(client: &Client, nodes: &[String], role: NodeRole, message: impl Fn(&str) -> String) -> Result<()> {
    for node in nodes {
        update(client, node, |spec| {
            spec.role = role;
            Ok(())
        })
        .await?;
        println!("{}", message(node));
    }
    Ok(())
}

/// Reads the node, changes its spec, and writes it back at the version read.
async fn update(client: &Client, reference: &str, change: impl FnOnce(&mut NodeSpec) -> Result<()>) -> Result<()> {
    let node: Node = client.get(&format!("/nodes/{reference}")).await?;
    let mut spec = node.spec.clone();
    change(&mut spec)?;
    client.post_empty(&format!("/nodes/{}/update?version={}", node.id, node.meta.version.index), &spec).await
}

async fn ls(client: &Client, quiet: bool) -> Result<()> {
    let mut nodes: Vec<Node> = client.get("/nodes").await?;
    let info: Info = client.get("/info").await?;
    nodes.sort_by(|a, b| a.description.hostname.cmp(&b.description.hostname).then(a.id.cmp(&b.id)));
    if quiet {
        for node in nodes {
            println!("{}", node.id);
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let me = if n.id == info.swarm.node_id { " *" } else { "" };
            let manager = n.manager_status.as_ref().map_or(String::new(), |m| {
                if m.leader {
                    "Leader".into()
                } else {
                    capitalize(&m.reachability.to_string())
                }
            });
            vec![
                format!("{}{me}", n.id),
                n.description.hostname.clone(),
                capitalize(&n.status.state.to_string()),
                capitalize(&n.spec.availability.to_string()),
                manager,
                n.description.engine.engine_version.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS", "ENGINE VERSION"], &rows)
    );
    Ok(())
}

fn pretty_node(n: &Node) -> String {
    let mut out = format!("ID:\t\t\t{}\n", n.id);
    if !n.spec.annotations.labels.is_empty() {
        out.push_str("Labels:\n");
        let mut labels: Vec<_> = n.spec.annotations.labels.iter().collect();
        labels.sort();
        for (k, v) in labels {
            out.push_str(&format!(" - {k}={v}\n"));
        }
    }
    out.push_str(&format!("Hostname:\t\t{}\n", n.description.hostname));
    out.push_str(&format!("Joined at:\t\t{}\n", n.meta.created_at));
    out.push_str(&format!(
        "Status:\n State:\t\t\t{}\n Availability:\t\t{}\n Address:\t\t{}\n",
        capitalize(&n.status.state.to_string()),
        capitalize(&n.spec.availability.to_string()),
        n.status.addr
    ));
    if let Some(m) = &n.manager_status {
        out.push_str(&format!(
            "Manager Status:\n Address:\t\t{}\n Raft Status:\t\t{}\n Leader:\t\t{}\n",
            m.addr,
            capitalize(&m.reachability.to_string()),
            if m.leader { "Yes" } else { "No" }
        ));
    }
    let d = &n.description;
    out.push_str(&format!(
        "Platform:\n Operating System:\t{}\n Architecture:\t\t{}\n",
        d.platform.os, d.platform.architecture
    ));
    out.push_str(&format!(
        "Resources:\n CPUs:\t\t\t{}\n Memory:\t\t{:.1}GiB\n",
        d.resources.nano_cpus / 1_000_000_000,
        d.resources.memory_bytes as f64 / (1u64 << 30) as f64
    ));
    out.push_str(&format!("Engine Version:\t\t{}\n", d.engine.engine_version));
    out
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map_or(String::new(), |c| c.to_uppercase().chain(chars).collect())
}

fn parse_availability(text: &str) -> Result<NodeAvailability> {
    Ok(match text {
        "active" => NodeAvailability::Active,
        "pause" => NodeAvailability::Pause,
        "drain" => NodeAvailability::Drain,
        other => bail!("invalid availability {other:?}: use active, pause or drain"),
    })
}

fn parse_role(text: &str) -> Result<NodeRole> {
    Ok(match text {
        "worker" => NodeRole::Worker,
        "manager" => NodeRole::Manager,
        other => bail!("invalid role {other:?}: use worker or manager"),
    })
}
