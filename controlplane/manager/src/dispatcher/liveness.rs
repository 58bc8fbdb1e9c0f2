//! Node liveness, a leader-only role: a Ready node the leader has not heard from for three
//! heartbeat periods (Swarm's grace) is marked Down. The decision is a pure function of the
//! state, the heartbeat record and the time; each Down is written with the version it was
//! decided on, so a node whose heartbeat changed it in between is left alone.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use shoal_api::node::{Node, NodeState, NodeStatus};
use shoal_store::{Batch, ClusterState, ClusterStore, CommandError, WriteError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{heartbeat_period_ns, Heartbeats};
use crate::leadership::LeaderRole;

/// Heartbeats a node may miss before it is Down.
pub const MISSED_HEARTBEATS: u32 = 3;
/// How often the leader looks for silent nodes.
const SWEEP: Duration = Duration::from_secs(1);

pub struct Liveness {
    store: Arc<ClusterStore>,
    heartbeats: Arc<Heartbeats>,
}

impl Liveness {
    pub fn new(store: Arc<ClusterStore>, heartbeats: Arc<Heartbeats>) -> Self {
        Liveness { store, heartbeats }
    }

    async fn sweep(&self, leading_since: Instant) -> Result<(), WriteError> {
        let now = Instant::now();
        let (grace, down) = self.store.shared().read(|s| {
            let grace = grace(heartbeat_period_ns(s));
            (grace, silent_nodes(s, &self.heartbeats.all(), leading_since, now, grace))
        });
        for node in down {
            // A heartbeat that came while we decided wins.
            if self.heartbeats.last(&node.id).is_some_and(|at| at.elapsed() <= grace) {
                continue;
            }
            info!(node = %node.id, "no heartbeat for {grace:?}: node down");
            let version = node.meta.version.index;
            match self.store.write_as_leader(Batch::new().update(node, version)).await {
                Ok(_) | Err(WriteError::Refused(CommandError::OutOfSequence | CommandError::NotFound { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl LeaderRole for Liveness {
    const NAME: &'static str = "liveness";

    async fn run(self, cancel: CancellationToken) {
        // Nodes get their grace from the start of this term: heartbeats went to another
        // leader before it, and an old record from an earlier term says nothing.
        let leading_since = Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(SWEEP) => {}
            }
            if let Err(e) = self.sweep(leading_since).await {
                warn!(error = %e, "marking silent nodes down failed");
            }
        }
    }
}

/// Swarm's grace: three heartbeat periods.
pub fn grace(period_ns: i64) -> Duration {
    Duration::from_nanos(u64::try_from(period_ns).unwrap_or(5_000_000_000)) * MISSED_HEARTBEATS
}

/// The Ready nodes not heard from for longer than `grace` (counting from `leading_since` at
/// the earliest), as they should be written: Down, at the version they were read.
pub fn silent_nodes(
    state: &ClusterState,
    last_seen: &HashMap<String, Instant>,
    leading_since: Instant,
    now: Instant,
    grace: Duration,
) -> Vec<Node> {
    state
        .nodes
        .iter()
        .filter(|n| n.status.state == NodeState::Ready)
        .filter(|n| {
            let heard = last_seen.get(&n.id).map_or(leading_since, |at| (*at).max(leading_since));
            now.saturating_duration_since(heard) > grace
        })
        .map(|n| {
            let mut node = Node::clone(n);
            node.status =
                NodeStatus { state: NodeState::Down, message: "heartbeat failure".into(), addr: n.status.addr.clone() };
            node
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn ready(id: &str) -> Arc<Node> {
        let mut node = Node { id: id.into(), ..Default::default() };
        node.status.state = NodeState::Ready;
        node.meta.version.index = 7;
        Arc::new(node)
    }

    #[test]
    fn only_ready_nodes_silent_past_the_grace_go_down_at_their_version() {
        let mut state = ClusterState::default();
        for n in ["heard", "silent", "never"] {
            state.nodes.insert(ready(n));
        }
        let mut down = Node::clone(&ready("already"));
        down.status.state = NodeState::Down;
        state.nodes.insert(Arc::new(down));

        let since = Instant::now();
        let grace = Duration::from_secs(15);
        let now = since + Duration::from_secs(20);
        let last_seen = HashMap::from([
            ("heard".to_owned(), since + Duration::from_secs(10)),
            ("silent".to_owned(), since + Duration::from_secs(1)),
        ]);
        let ids: Vec<_> = silent_nodes(&state, &last_seen, since, now, grace).into_iter().map(|n| n.id).collect();
        assert_eq!(ids, ["never", "silent"]);
        let node = &silent_nodes(&state, &last_seen, since, now, grace)[0];
        assert_eq!((node.status.state, node.meta.version.index), (NodeState::Down, 7));
    }

    #[test]
    fn a_new_term_gives_every_node_its_grace_again() {
        let mut state = ClusterState::default();
        state.nodes.insert(ready("n"));
        let long_ago = Instant::now();
        let since = long_ago + Duration::from_secs(600);
        // Heard from in an earlier term, then this manager stopped leading for ten minutes.
        let last_seen = HashMap::from([("n".to_owned(), long_ago)]);
        let grace = Duration::from_secs(15);
        assert!(silent_nodes(&state, &last_seen, since, since + Duration::from_secs(5), grace).is_empty());
        assert_eq!(silent_nodes(&state, &last_seen, since, since + Duration::from_secs(16), grace).len(), 1);
    }
}
