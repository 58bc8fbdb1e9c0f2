//! Nodes: list and inspect (with the manager status computed from raft), update (availability,
//! labels, role — an intent the leader's role manager carries out in raft), remove.

use shoal_api::node::{Node, NodeRole, NodeSpec, NodeState, Reachability};
use std::sync::Arc;

use shoal_store::{Batch, ClusterState, CommandError, Kind, WriteError};

use crate::{Manager, SwarmError};

/// Filters of `GET /nodes`, each a list of accepted values (any may match).
#[derive(Debug, Default, Clone)]
pub struct NodeFilters {
    pub id: Vec<String>,
    pub name: Vec<String>,
    pub role: Vec<String>,
    pub membership: Vec<String>,
    /// `node.label`: the node's own labels (`docker node update --label-add`).
    pub label: Vec<String>,
    /// `label`: the engine's labels (dockerd's `--label`).
    pub engine_label: Vec<String>,
}

impl NodeFilters {
    /// From the query's `filters`, refusing what dockerd refuses (an unknown filter, a role
    /// or membership that does not exist) with its wording.
    pub fn from_query(filters: &std::collections::HashMap<String, Vec<String>>) -> Result<Self, String> {
        let mut out = NodeFilters::default();
        for (key, values) in filters {
            let field = match key.as_str() {
                "id" => &mut out.id,
                "name" => &mut out.name,
                "role" => &mut out.role,
                "membership" => &mut out.membership,
                "node.label" => &mut out.label,
                "label" => &mut out.engine_label,
                other => return Err(format!("invalid filter '{other}'")),
            };
            field.extend(values.iter().cloned());
        }
        if let Some(role) = out.role.iter().find(|r| !matches!(r.as_str(), "manager" | "worker")) {
            return Err(format!("invalid filter 'role={role}'"));
        }
        if let Some(m) = out.membership.iter().find(|m| !matches!(m.as_str(), "accepted" | "pending")) {
            return Err(format!("invalid filter 'membership={m}'"));
        }
        Ok(out)
    }
}

/// A `key` or `key=value` label filter against `labels`.
fn has_label(labels: &std::collections::HashMap<String, String>, filter: &str) -> bool {
    match filter.split_once('=') {
        Some((k, v)) => labels.get(k).is_some_and(|x| x == v),
        None => labels.contains_key(filter),
    }
}

/// `GET /nodes`.
pub fn list(manager: &Manager, filters: &NodeFilters) -> Vec<Node> {
    let leader = manager.leader().map(|l| l.node_id);
    manager
        .store()
        .shared()
        .read(|s| s.nodes.iter().filter(|n| matches(n, filters)).map(|n| present(n, leader.as_deref())).collect())
}

fn matches(node: &Node, f: &NodeFilters) -> bool {
    let any = |values: &[String], test: &dyn Fn(&str) -> bool| values.is_empty() || values.iter().any(|v| test(v));
    any(&f.id, &|v| node.id.starts_with(v))
        && any(&f.name, &|v| node.description.hostname.starts_with(v) || node.spec.annotations.name.starts_with(v))
        && any(&f.role, &|v| v == node.spec.role.to_string())
        && any(&f.membership, &|v| v == "accepted")
        && any(&f.label, &|v| has_label(&node.spec.annotations.labels, v))
        && any(&f.engine_label, &|v| has_label(&node.description.engine.labels, v))
}

/// A node as clients see it: the stored object plus leadership and reachability, which only
/// the live raft knows.
fn present(node: &Node, leader: Option<&str>) -> Node {
    let mut node = node.clone();
    if let Some(status) = &mut node.manager_status {
        status.leader = leader == Some(node.id.as_str());
        status.reachability = if status.leader || node.status.state == NodeState::Ready {
            Reachability::Reachable
        } else {
            Reachability::Unreachable
        };
    }
    node
}

/// `GET /nodes/{id}`: by full ID, unique ID prefix, or hostname.
pub fn inspect(manager: &Manager, reference: &str) -> Result<Node, SwarmError> {
    let leader = manager.leader().map(|l| l.node_id);
    manager.store().shared().read(|s| resolve(s, reference).map(|n| present(n, leader.as_deref())))
}

fn resolve<'a>(state: &'a ClusterState, reference: &str) -> Result<&'a Arc<Node>, SwarmError> {
    state.nodes.resolve(reference).map_err(|e| SwarmError::NotFound(e.to_string()))
}

/// `POST /nodes/{id}/update?version=N`.
pub async fn update(manager: &Manager, reference: &str, version: u64, spec: NodeSpec) -> Result<(), SwarmError> {
    let node = manager.store().shared().read(|s| resolve(s, reference).cloned())?;
    if node.meta.version.index != version {
        // Before anything changes: a stale demotion must not take the node out of raft.
        return Err(WriteError::from(CommandError::OutOfSequence).into());
    }
    let demoted = node.spec.role == NodeRole::Manager && spec.role == NodeRole::Worker;
    if demoted && manager.store().shared().read(|s| s.managers().count()) <= 1 {
        return Err(SwarmError::InvalidArgument("attempting to demote the last manager of the swarm".into()));
    }
    if demoted && !quorum_without(manager, &node.id) {
        return Err(SwarmError::InvalidArgument(format!(
            "can't demote {}: the managers left that are up would not make a majority (this would result in a loss of quorum)",
            node.description.hostname
        )));
    }
    // The role is an intent: the leader's role manager takes a demoted node out of raft
    // (and the node, seeing that, becomes a worker); a promoted node joins raft itself.
    let mut updated = Node::clone(&node);
    updated.spec = spec;
    manager.store().write(Batch::new().update(updated, version)).await?;
    Ok(())
}

/// Whether the voters other than node `id` that are up would make a majority of their own
/// set (swarmkit's `CanRemoveMember`).
fn quorum_without(manager: &Manager, id: &str) -> bool {
    let voters = manager.store().voter_nodes();
    let rest = voters.iter().map(String::as_str).filter(|n| *n != id);
    manager.store().shared().read(|s| crate::role_manager::quorum_of(s, rest))
}

/// `DELETE /nodes/{id}?force=`.
pub async fn remove(manager: &Manager, reference: &str, force: bool) -> Result<(), SwarmError> {
    let node = manager.store().shared().read(|s| resolve(s, reference).cloned())?;
    if !force && node.status.state == NodeState::Ready {
        let refused = CommandError::FailedPrecondition(format!("node {} is not down and can't be removed", node.id));
        return Err(WriteError::from(refused).into());
    }
    manager.store().write(Batch::new().delete(Kind::Node, node.id.clone(), Some(node.meta.version.index))).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use shoal_api::node::{ManagerStatus, NodeStatus};

    use super::*;

    fn node(id: &str, host: &str, state: NodeState, manager: bool) -> Node {
        let mut n = Node { id: id.into(), ..Default::default() };
        n.description.hostname = host.into();
        n.status = NodeStatus { state, ..Default::default() };
        if manager {
            n.spec.role = NodeRole::Manager;
            n.manager_status = Some(ManagerStatus { addr: "10.0.0.1:2377".into(), ..Default::default() });
        }
        n
    }

    #[test]
    fn managers_show_leader_and_reachability() {
        let leader = present(&node("a", "mgr1", NodeState::Ready, true), Some("a"));
        let ms = leader.manager_status.unwrap();
        assert!(ms.leader);
        assert_eq!(ms.reachability, Reachability::Reachable);
        let down = present(&node("b", "mgr2", NodeState::Down, true), Some("a"));
        assert_eq!(down.manager_status.unwrap().reachability, Reachability::Unreachable);
        assert!(present(&node("c", "wrk1", NodeState::Ready, false), Some("a")).manager_status.is_none());
    }

    #[test]
    fn resolves_by_id_prefix_and_hostname() {
        let mut state = ClusterState::default();
        for n in [node("abc1", "mgr1", NodeState::Ready, true), node("abd2", "wrk1", NodeState::Ready, false)] {
            state.nodes.insert(Arc::new(n));
        }
        assert_eq!(resolve(&state, "abc1").unwrap().id, "abc1");
        assert_eq!(resolve(&state, "wrk1").unwrap().id, "abd2");
        assert_eq!(resolve(&state, "abd").unwrap().id, "abd2");
        assert!(resolve(&state, "ab").unwrap_err().to_string().contains("ambiguous"));
        assert!(matches!(resolve(&state, "zzz"), Err(SwarmError::NotFound(_))));
    }

    #[test]
    fn filters_by_role_and_label() {
        let mut worker = node("w", "wrk1", NodeState::Ready, false);
        worker.spec.annotations.labels.insert("zone".into(), "a".into());
        let role = NodeFilters { role: vec!["worker".into()], ..Default::default() };
        assert!(matches(&worker, &role));
        let label = NodeFilters { label: vec!["zone=b".into()], ..Default::default() };
        assert!(!matches(&worker, &label));
        let engine = NodeFilters { engine_label: vec!["zone".into()], ..Default::default() };
        assert!(!matches(&worker, &engine), "label= is the engine's labels, not the node's");
        worker.description.engine.labels.insert("zone".into(), "x".into());
        assert!(matches(&worker, &engine));
    }

    #[test]
    fn unknown_filters_and_values_are_refused_as_dockerd_does() {
        let query = |k: &str, v: &str| std::collections::HashMap::from([(k.to_owned(), vec![v.to_owned()])]);
        assert!(NodeFilters::from_query(&query("node.label", "zone=a")).is_ok());
        assert_eq!(NodeFilters::from_query(&query("colour", "red")).unwrap_err(), "invalid filter 'colour'");
        assert_eq!(NodeFilters::from_query(&query("role", "king")).unwrap_err(), "invalid filter 'role=king'");
        assert!(NodeFilters::from_query(&query("membership", "maybe")).is_err());
    }
}
