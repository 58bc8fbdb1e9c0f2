//! The role manager, a leader-only role (swarmkit's `roleManager`): promotions and
//! demotions are intents in the store (`Spec.Role`), and this role makes raft and the store
//! agree with them. A node meant to be a worker is taken out of raft; a node's
//! `ManagerStatus` is set from raft's membership (present exactly while it is a voter). It
//! acts on node changes, on membership changes and on a timer, so a change cut short by a
//! leader crash is finished by the next leader.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use shoal_api::node::{ManagerStatus, Node, NodeRole, NodeState};
use shoal_store::{Batch, ClusterState, ClusterStore, CommandError, Filter, Kind, RaftId, RaftPeer, WriteError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::leadership::LeaderRole;

/// How often the role manager looks again even when nothing was announced (a removal that
/// failed for want of a quorum is retried).
const RETRY: Duration = Duration::from_secs(2);

/// What the role manager does to make raft and the store agree.
#[derive(Debug, Clone, PartialEq)]
pub enum RoleAction {
    /// Take node `node_id` (raft member `raft_id`, a voter or a learner) out of raft: it is
    /// to be a worker, it is gone from the store, or (a learner) its node is down.
    RemoveMember { node_id: String, raft_id: RaftId },
    /// Write `node` (its `ManagerStatus` as raft has it) if it is still at `version`.
    SetManagerStatus { node: Box<Node>, version: u64 },
}

pub struct RoleManager {
    store: Arc<ClusterStore>,
}

impl RoleManager {
    pub fn new(store: Arc<ClusterStore>) -> Self {
        RoleManager { store }
    }

    async fn reconcile_once(&self, cancel: &CancellationToken) {
        let metrics = self.store.metrics();
        let membership = metrics.membership_config.membership();
        let members: Vec<(RaftId, RaftPeer)> = membership.nodes().map(|(id, peer)| (*id, peer.clone())).collect();
        let voters: BTreeSet<RaftId> = membership.voter_ids().collect();
        let actions = self.store.shared().read(|s| reconcile(s, &members, &voters));
        for action in actions {
            // A role that no longer leads decides nothing more.
            if cancel.is_cancelled() {
                return;
            }
            if let Err(e) = self.act(action).await {
                warn!(error = %e, "role change not done yet");
            }
        }
    }

    async fn act(&self, action: RoleAction) -> Result<(), WriteError> {
        match action {
            RoleAction::RemoveMember { node_id, raft_id } => {
                info!(node = %node_id, raft_id, "taking the node out of raft");
                self.store.remove_member_as_leader(raft_id).await
            }
            RoleAction::SetManagerStatus { node, version } => {
                info!(node = %node.id, manager = node.manager_status.is_some(), "recording raft membership");
                match self.store.write_as_leader(Batch::new().update(*node, version)).await {
                    Ok(_) | Err(WriteError::Refused(CommandError::OutOfSequence | CommandError::NotFound { .. })) => {
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }
}

impl LeaderRole for RoleManager {
    const NAME: &'static str = "role manager";

    async fn run(self, cancel: CancellationToken) {
        let mut metrics = self.store.raft().metrics();
        let mut nodes = self.store.shared().watch(Filter::kinds(&[Kind::Node]));
        loop {
            self.reconcile_once(&cancel).await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
                changed = metrics.changed() => if changed.is_err() { return },
                event = nodes.recv() => if event.is_err() {
                    // Lagged or replaced: a fresh watch; the state is read anew each round.
                    nodes = self.store.shared().watch(Filter::kinds(&[Kind::Node]));
                },
            }
        }
    }
}

/// What to do so that raft and the store agree with the nodes' intended roles. A demoted
/// leader is removed like any voter: openraft commits the change and the leader steps down.
pub fn reconcile(state: &ClusterState, members: &[(RaftId, RaftPeer)], voters: &BTreeSet<RaftId>) -> Vec<RoleAction> {
    let mut actions = Vec::new();
    let node_of = |peer: &RaftPeer| state.nodes.get(&peer.node_id);
    let wanted = |peer: &RaftPeer| node_of(peer).is_some_and(|n| n.spec.role == NodeRole::Manager);
    let up = |peer: &RaftPeer| node_of(peer).is_some_and(|n| n.status.state == NodeState::Ready);
    // Learners not meant to be managers, or whose node is down (a join that died half-way;
    // the node asks again when it comes back): out, they cost no quorum.
    for (raft_id, peer) in members.iter().filter(|(id, _)| !voters.contains(id)) {
        if !wanted(peer) || !up(peer) {
            actions.push(RoleAction::RemoveMember { node_id: peer.node_id.clone(), raft_id: *raft_id });
        }
    }
    // One voter per round, members without a node first, and only if the voters left that
    // are up still make a majority of the new set (swarmkit's CanRemoveMember): taking a
    // voter out while another is down must not leave a configuration that cannot commit.
    let mut unwanted: Vec<(bool, RaftId, &RaftPeer)> = members
        .iter()
        .filter(|(id, peer)| voters.contains(id) && !wanted(peer))
        .map(|(id, peer)| (node_of(peer).is_some(), *id, peer))
        .collect();
    unwanted.sort_by_key(|(has_node, id, _)| (*has_node, *id));
    if let Some((_, raft_id, peer)) = unwanted.first() {
        let rest =
            members.iter().filter(|(id, _)| voters.contains(id) && id != raft_id).map(|(_, p)| p.node_id.as_str());
        if quorum_of(state, rest) {
            actions.push(RoleAction::RemoveMember { node_id: peer.node_id.clone(), raft_id: *raft_id });
        }
    }
    for node in state.nodes.iter() {
        let voter = members.iter().find(|(id, peer)| peer.node_id == node.id && voters.contains(id));
        let addr = voter.map(|(_, peer)| peer.addr.clone());
        if node.manager_status.as_ref().map(|m| &m.addr) != addr.as_ref() {
            let mut updated = Node::clone(node);
            updated.manager_status = addr.map(|addr| ManagerStatus { addr, ..Default::default() });
            actions.push(RoleAction::SetManagerStatus { node: Box::new(updated), version: node.meta.version.index });
        }
    }
    actions
}

/// Whether the voters (by node ID) that are up make a majority of them: a configuration a
/// removal leaves must be able to commit (swarmkit's `CanRemoveMember`).
pub fn quorum_of<'a>(state: &ClusterState, voters: impl Iterator<Item = &'a str>) -> bool {
    let (mut all, mut up) = (0, 0);
    for node in voters {
        all += 1;
        up += usize::from(state.nodes.get(node).is_some_and(|n| n.status.state == NodeState::Ready));
    }
    all > 0 && up > all / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, role: NodeRole, manager_addr: Option<&str>) -> Arc<Node> {
        let mut node = Node { id: id.into(), ..Default::default() };
        node.status.state = NodeState::Ready;
        node.spec.role = role;
        node.manager_status = manager_addr.map(|a| ManagerStatus { addr: a.into(), ..Default::default() });
        node.meta.version.index = 9;
        Arc::new(node)
    }

    fn peer(id: &str, addr: &str) -> RaftPeer {
        RaftPeer { node_id: id.into(), addr: addr.into() }
    }

    #[test]
    fn a_demoted_voter_is_taken_out_and_its_status_follows_raft() {
        let mut state = ClusterState::default();
        state.nodes.insert(node("m1", NodeRole::Manager, Some("a1")));
        state.nodes.insert(node("m2", NodeRole::Worker, Some("a2")));
        let members = [(1, peer("m1", "a1")), (2, peer("m2", "a2"))];
        let voters = BTreeSet::from([1, 2]);
        assert_eq!(
            reconcile(&state, &members, &voters),
            [RoleAction::RemoveMember { node_id: "m2".into(), raft_id: 2 }],
            "the status stays while m2 is still a voter"
        );
        // Once out of raft, the store stops showing it as a manager.
        let actions = reconcile(&state, &members[..1], &BTreeSet::from([1]));
        let [RoleAction::SetManagerStatus { node, version: 9 }] = actions.as_slice() else { panic!("{actions:?}") };
        assert_eq!((node.id.as_str(), node.manager_status.is_none()), ("m2", true));
    }

    #[test]
    fn a_voter_the_store_does_not_show_as_manager_gets_its_status() {
        // The leader crashed between adding the voter and recording it.
        let mut state = ClusterState::default();
        state.nodes.insert(node("m1", NodeRole::Manager, Some("a1")));
        state.nodes.insert(node("w1", NodeRole::Manager, None));
        let members = [(1, peer("m1", "a1")), (3, peer("w1", "a3"))];
        let actions = reconcile(&state, &members, &BTreeSet::from([1, 3]));
        let [RoleAction::SetManagerStatus { node, .. }] = actions.as_slice() else { panic!("{actions:?}") };
        assert_eq!(node.manager_status.as_ref().map(|m| m.addr.as_str()), Some("a3"));
        // A learner still catching up is not shown as a manager yet.
        assert!(reconcile(&state, &members, &BTreeSet::from([1])).is_empty());
    }

    #[test]
    fn no_demotion_that_would_leave_a_configuration_without_a_quorum() {
        // Three voters, m3 down: taking m2 out would leave {m1, m3} with one up. Wait.
        let mut state = ClusterState::default();
        state.nodes.insert(node("m1", NodeRole::Manager, Some("a1")));
        state.nodes.insert(node("m2", NodeRole::Worker, Some("a2")));
        let mut down = Node::clone(&node("m3", NodeRole::Manager, Some("a3")));
        down.status.state = NodeState::Down;
        state.nodes.insert(Arc::new(down));
        let members = [(1, peer("m1", "a1")), (2, peer("m2", "a2")), (3, peer("m3", "a3"))];
        assert!(reconcile(&state, &members, &BTreeSet::from([1, 2, 3])).is_empty());
    }

    #[test]
    fn learners_of_dead_or_unwanted_joins_are_taken_out() {
        let mut state = ClusterState::default();
        state.nodes.insert(node("m1", NodeRole::Manager, Some("a1")));
        let mut dead = Node::clone(&node("j1", NodeRole::Manager, None));
        dead.status.state = NodeState::Down;
        state.nodes.insert(Arc::new(dead));
        let members = [(1, peer("m1", "a1")), (5, peer("j1", "a5")), (6, peer("ghost", "a6"))];
        let actions = reconcile(&state, &members, &BTreeSet::from([1]));
        assert!(actions.contains(&RoleAction::RemoveMember { node_id: "j1".into(), raft_id: 5 }), "{actions:?}");
        assert!(actions.contains(&RoleAction::RemoveMember { node_id: "ghost".into(), raft_id: 6 }), "{actions:?}");
    }

    #[test]
    fn the_last_voter_stays_and_a_member_without_a_node_goes() {
        let mut state = ClusterState::default();
        state.nodes.insert(node("m1", NodeRole::Worker, Some("a1")));
        assert!(reconcile(&state, &[(1, peer("m1", "a1"))], &BTreeSet::from([1])).is_empty());
        let members = [(1, peer("m1", "a1")), (7, peer("gone", "a7"))];
        let actions = reconcile(&state, &members, &BTreeSet::from([1, 7]));
        assert!(actions.contains(&RoleAction::RemoveMember { node_id: "gone".into(), raft_id: 7 }), "{actions:?}");
    }
}
