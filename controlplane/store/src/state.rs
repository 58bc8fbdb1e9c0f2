//! The replicated objects and the one place that changes them: `ClusterState::apply`.
//!
//! Apply is pure — a function of the state, the command and the raft index — so every
//! replica decides alike. Checks that depend on the state (the version a writer read, unique
//! hostnames, the last manager) happen here, at apply time, where they cannot race.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use shoal_api::{
    node::{ManagerStatus, Node, NodeDescription, NodeRole, NodeSpec, NodeState, NodeStatus},
    swarm::ClusterInfo,
};

use crate::types::{Applied, Change};

/// The swarm's own record: what `GET /swarm` shows plus the secrets only managers hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub info: ClusterInfo,
    /// PEM of the root CA key (the whole store is sealed at rest).
    pub root_key_pem: String,
    pub worker_token: String,
    pub manager_token: String,
    /// `SWMKEY-1-...` while autolock is on.
    pub unlock_key: Option<String>,
}

/// Every object of the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub cluster: Option<Cluster>,
    pub nodes: BTreeMap<String, Node>,
    /// IDs of removed nodes: their certificates stay valid until they expire, so every
    /// endpoint refuses them by ID.
    pub removed_nodes: BTreeSet<String>,
}

/// One change to the cluster, with the time its proposer stamped on it (replicas must not
/// read their own clocks while applying).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// RFC 3339 time of the proposal.
    pub at: String,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// The first entry of a new swarm: the cluster and its first manager.
    CreateCluster {
        cluster: Box<Cluster>,
        first: Box<Node>,
    },
    /// Replaces the cluster record if `version` is still current.
    UpdateCluster {
        version: u64,
        cluster: Box<Cluster>,
    },
    AddNode {
        node: Box<Node>,
    },
    /// A user's change to a node (availability, labels, role) if `version` is still current.
    UpdateNodeSpec {
        id: String,
        version: u64,
        spec: NodeSpec,
    },
    /// What the dispatcher observed (heartbeats) or the node reported about itself.
    SetNodeStatus {
        id: String,
        status: NodeStatus,
        description: Option<Box<NodeDescription>>,
    },
    /// Marks a node as a raft member at `addr`, or not a member (`None`).
    SetManagerAddr {
        id: String,
        addr: Option<String>,
    },
    RemoveNode {
        id: String,
        force: bool,
    },
    /// The first entry of a cluster re-created from a surviving manager's state
    /// (`swarm init --force-new-cluster`): everything as it was.
    RestoreState {
        state: Box<ClusterState>,
    },
}

/// Why a command was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("{kind} {id} not found")]
    NotFound { kind: String, id: String },
    /// The writer read an older version than the current one (Docker: "update out of
    /// sequence").
    #[error("update out of sequence")]
    OutOfSequence,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Invalid(String),
}

impl ClusterState {
    /// Applies `command` at raft index `index`; returns the change to announce.
    pub fn apply(&mut self, index: u64, command: Command) -> (Result<Applied, CommandError>, Option<Change>) {
        let at = command.at;
        let result = match command.op {
            Op::CreateCluster { cluster, first } => self.create_cluster(index, &at, *cluster, *first),
            Op::UpdateCluster { version, cluster } => self.update_cluster(index, &at, version, *cluster),
            Op::AddNode { node } => self.add_node(index, &at, *node),
            Op::UpdateNodeSpec { id, version, spec } => self.update_node_spec(index, &at, &id, version, spec),
            Op::SetNodeStatus { id, status, description } => self.with_node(index, &at, &id, |node| {
                node.status = status;
                if let Some(description) = description {
                    node.description = *description;
                }
                Ok(())
            }),
            Op::SetManagerAddr { id, addr } => self.with_node(index, &at, &id, |node| {
                node.manager_status = addr.map(|addr| ManagerStatus { addr, ..Default::default() });
                Ok(())
            }),
            Op::RemoveNode { id, force } => self.remove_node(&id, force),
            Op::RestoreState { state } => {
                *self = *state;
                Ok(Change::All)
            }
        };
        match result {
            Ok(change) => (Ok(Applied { version: index }), Some(change)),
            Err(e) => (Err(e), None),
        }
    }

    pub fn managers(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().filter(|n| n.spec.role == NodeRole::Manager)
    }

    fn create_cluster(
        &mut self,
        index: u64,
        at: &str,
        mut cluster: Cluster,
        mut first: Node,
    ) -> Result<Change, CommandError> {
        if self.cluster.is_some() {
            return Err(CommandError::Conflict("this node is already part of a swarm".into()));
        }
        stamp_new(
            &mut cluster.info.version.index,
            &mut cluster.info.created_at,
            &mut cluster.info.updated_at,
            index,
            at,
        );
        stamp_new(&mut first.version.index, &mut first.created_at, &mut first.updated_at, index, at);
        self.nodes.insert(first.id.clone(), first);
        self.cluster = Some(cluster);
        Ok(Change::All)
    }

    fn update_cluster(&mut self, index: u64, at: &str, version: u64, mut new: Cluster) -> Result<Change, CommandError> {
        let current =
            self.cluster.as_mut().ok_or(CommandError::NotFound { kind: "cluster".into(), id: "default".into() })?;
        if current.info.version.index != version {
            return Err(CommandError::OutOfSequence);
        }
        new.info.id = current.info.id.clone();
        new.info.created_at = current.info.created_at.clone();
        new.info.version.index = index;
        new.info.updated_at = at.to_owned();
        *current = new;
        Ok(Change::Cluster)
    }

    fn add_node(&mut self, index: u64, at: &str, mut node: Node) -> Result<Change, CommandError> {
        if self.removed_nodes.contains(&node.id) || self.nodes.contains_key(&node.id) {
            return Err(CommandError::Conflict(format!("node {} already exists", node.id)));
        }
        let hostname = node.description.hostname.clone();
        if let Some(other) = self.nodes.values().find(|n| n.description.hostname == hostname) {
            // A machine that left (or died) and joins again replaces its old, down entry;
            // a live node or a manager keeps its name.
            let replaceable = other.status.state == NodeState::Down && other.spec.role == NodeRole::Worker;
            if !replaceable {
                return Err(CommandError::Conflict(format!(
                    "a node with hostname {hostname} is already part of the swarm ({}): remove it first (docker node rm)",
                    other.id
                )));
            }
            let old = other.id.clone();
            self.nodes.remove(&old);
            self.removed_nodes.insert(old);
        }
        stamp_new(&mut node.version.index, &mut node.created_at, &mut node.updated_at, index, at);
        let id = node.id.clone();
        self.nodes.insert(id.clone(), node);
        Ok(Change::All)
    }

    fn update_node_spec(
        &mut self,
        index: u64,
        at: &str,
        id: &str,
        version: u64,
        spec: NodeSpec,
    ) -> Result<Change, CommandError> {
        let node = self.nodes.get(id).ok_or_else(|| not_found(id))?;
        if node.version.index != version {
            return Err(CommandError::OutOfSequence);
        }
        if node.spec.role == NodeRole::Manager && spec.role == NodeRole::Worker && self.managers().count() == 1 {
            return Err(CommandError::FailedPrecondition("attempting to demote the last manager of the swarm".into()));
        }
        self.with_node(index, at, id, |node| {
            node.spec = spec;
            Ok(())
        })
    }

    fn remove_node(&mut self, id: &str, force: bool) -> Result<Change, CommandError> {
        let node = self.nodes.get(id).ok_or_else(|| not_found(id))?;
        if node.spec.role == NodeRole::Manager || node.manager_status.is_some() {
            return Err(CommandError::FailedPrecondition(format!(
                "node {id} is a cluster manager and is a member of the raft cluster. It must be demoted to worker before removal"
            )));
        }
        if !force && node.status.state == NodeState::Ready {
            return Err(CommandError::FailedPrecondition(format!("node {id} is not down and can't be removed")));
        }
        self.nodes.remove(id);
        self.removed_nodes.insert(id.to_owned());
        Ok(Change::Node(id.to_owned()))
    }

    fn with_node(
        &mut self,
        index: u64,
        at: &str,
        id: &str,
        change: impl FnOnce(&mut Node) -> Result<(), CommandError>,
    ) -> Result<Change, CommandError> {
        let node = self.nodes.get_mut(id).ok_or_else(|| not_found(id))?;
        change(node)?;
        node.version.index = index;
        node.updated_at = at.to_owned();
        Ok(Change::Node(id.to_owned()))
    }
}

fn not_found(id: &str) -> CommandError {
    CommandError::NotFound { kind: "node".into(), id: id.to_owned() }
}

fn stamp_new(version: &mut u64, created: &mut String, updated: &mut String, index: u64, at: &str) {
    *version = index;
    *created = at.to_owned();
    *updated = at.to_owned();
}

#[cfg(test)]
mod tests {
    use shoal_api::node::NodeAvailability;

    use super::*;

    const AT: &str = "2026-11-21T00:00:00Z";

    fn node(id: &str, hostname: &str, role: NodeRole) -> Node {
        let mut node = Node { id: id.into(), ..Default::default() };
        node.description.hostname = hostname.into();
        node.spec.role = role;
        node.status.state = NodeState::Ready;
        node
    }

    fn cmd(op: Op) -> Command {
        Command { at: AT.into(), op }
    }

    fn swarm() -> ClusterState {
        let mut state = ClusterState::default();
        let (result, change) = state.apply(
            1,
            cmd(Op::CreateCluster { cluster: Box::default(), first: Box::new(node("m1", "mgr1", NodeRole::Manager)) }),
        );
        assert_eq!(result, Ok(Applied { version: 1 }));
        assert_eq!(change, Some(Change::All));
        state
    }

    #[test]
    fn versions_are_raft_indexes_and_stale_writers_lose() {
        let mut state = swarm();
        state.apply(2, cmd(Op::AddNode { node: Box::new(node("w1", "wrk1", NodeRole::Worker)) })).0.unwrap();
        assert_eq!(state.nodes["w1"].version.index, 2);
        let spec = NodeSpec { availability: NodeAvailability::Drain, ..Default::default() };
        let ok = state.apply(3, cmd(Op::UpdateNodeSpec { id: "w1".into(), version: 2, spec: spec.clone() }));
        assert_eq!(ok.0, Ok(Applied { version: 3 }));
        let stale = state.apply(4, cmd(Op::UpdateNodeSpec { id: "w1".into(), version: 2, spec }));
        assert_eq!(stale.0, Err(CommandError::OutOfSequence));
        assert_eq!(state.nodes["w1"].version.index, 3, "a refused command changes nothing");
    }

    #[test]
    fn hostnames_are_unique_but_a_down_worker_is_replaced() {
        let mut state = swarm();
        let dup = state.apply(2, cmd(Op::AddNode { node: Box::new(node("x", "mgr1", NodeRole::Worker)) }));
        assert!(matches!(dup.0, Err(CommandError::Conflict(_))));
        assert!(!state.nodes.contains_key("x"));

        let mut gone = node("w1", "wrk1", NodeRole::Worker);
        gone.status.state = NodeState::Down;
        state.apply(2, cmd(Op::AddNode { node: Box::new(gone) })).0.unwrap();
        state.apply(3, cmd(Op::AddNode { node: Box::new(node("w2", "wrk1", NodeRole::Worker)) })).0.unwrap();
        assert!(state.nodes.contains_key("w2") && !state.nodes.contains_key("w1"));
        assert!(state.removed_nodes.contains("w1"), "the replaced node's certificate stops working");
    }

    #[test]
    fn the_last_manager_cannot_be_demoted_or_removed() {
        let mut state = swarm();
        let demote = NodeSpec { role: NodeRole::Worker, ..Default::default() };
        let refused = state.apply(2, cmd(Op::UpdateNodeSpec { id: "m1".into(), version: 1, spec: demote }));
        assert!(matches!(refused.0, Err(CommandError::FailedPrecondition(_))));
        let removed = state.apply(2, cmd(Op::RemoveNode { id: "m1".into(), force: true }));
        assert!(matches!(removed.0, Err(CommandError::FailedPrecondition(_))));
    }

    #[test]
    fn a_ready_node_needs_force_and_a_removed_id_never_comes_back() {
        let mut state = swarm();
        state.apply(2, cmd(Op::AddNode { node: Box::new(node("w1", "wrk1", NodeRole::Worker)) })).0.unwrap();
        let refused = state.apply(3, cmd(Op::RemoveNode { id: "w1".into(), force: false }));
        assert!(matches!(refused.0, Err(CommandError::FailedPrecondition(_))));
        state.apply(3, cmd(Op::RemoveNode { id: "w1".into(), force: true })).0.unwrap();
        assert!(state.removed_nodes.contains("w1"));
        let again = state.apply(4, cmd(Op::AddNode { node: Box::new(node("w1", "wrk9", NodeRole::Worker)) }));
        assert!(matches!(again.0, Err(CommandError::Conflict(_))));
    }
}
