//! Nodes: unique hostnames, and a swarm never left without a manager. A deleted node's ID
//! joins `removed_nodes` (the state does that), so its certificate stops working.

use shoal_api::node::{Node, NodeRole, NodeState};

use super::{Index, Rules};
use crate::{state::ClusterState, CommandError};

stored_object!(Node in nodes, id: id, meta: meta, name: description.hostname, keys: node_keys);

/// The keys of a node in its kind's own indexes.
fn node_keys(node: &Node, keys: &mut Vec<(Index, String)>) {
    keys.push((Index::Role, node.spec.role.to_string()));
}

impl Rules for Node {
    fn check_create(state: &ClusterState, new: &Node) -> Result<(), CommandError> {
        if state.removed_nodes.contains(&new.id) {
            return Err(CommandError::Conflict(format!("node {} was removed from the swarm", new.id)));
        }
        unique_hostname(state, new)
    }

    fn check_update(state: &ClusterState, old: &Node, new: &Node) -> Result<(), CommandError> {
        unique_hostname(state, new)?;
        let demoted = old.spec.role == NodeRole::Manager && new.spec.role == NodeRole::Worker;
        if demoted && state.nodes.count(Index::Role, "manager") == 1 {
            return Err(CommandError::FailedPrecondition("attempting to demote the last manager of the swarm".into()));
        }
        Ok(())
    }

    fn check_delete(_state: &ClusterState, old: &Node) -> Result<(), CommandError> {
        if old.spec.role == NodeRole::Manager || old.manager_status.is_some() {
            return Err(CommandError::FailedPrecondition(format!(
                "node {} is a cluster manager and is a member of the raft cluster. It must be demoted to worker before removal",
                old.id
            )));
        }
        Ok(())
    }
}

/// Hostnames are unique; a machine that joins again replaces its old entry only by deleting
/// it in the same transaction (which the join does for a down worker).
fn unique_hostname(state: &ClusterState, node: &Node) -> Result<(), CommandError> {
    let hostname = &node.description.hostname;
    if hostname.is_empty() {
        return Ok(());
    }
    if let Some(other) = state.nodes.find(Index::Name, hostname).find(|other| other.id != node.id) {
        return Err(CommandError::Conflict(format!(
            "a node with hostname {hostname} is already part of the swarm ({}): remove it first (docker node rm)",
            other.id
        )));
    }
    Ok(())
}

/// Whether a node with this hostname may be replaced by a new join: a worker that is down
/// (left, or died). A live node or a manager keeps its name.
pub fn replaceable(node: &Node) -> bool {
    node.status.state == NodeState::Down && node.spec.role == NodeRole::Worker
}
