//! The dispatcher: nodes report in every heartbeat period; the leader marks a node Ready when
//! it hears from it and Down when it has not for three periods (Swarm's grace), writing only
//! the transitions to the store. Managers that do not lead send callers to the leader.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use shoal_api::{
    node::{Node, NodeState, NodeStatus},
    swarm::DEFAULT_HEARTBEAT_PERIOD_NS,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    wire::{HeartbeatCall, HeartbeatReply},
    Manager, SwarmError,
};

/// Heartbeats a node may miss before it is Down.
const MISSED_HEARTBEATS: u32 = 3;
/// How often the leader looks for silent nodes.
const SWEEP: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Dispatcher {
    last_seen: Mutex<HashMap<String, Instant>>,
    /// When this manager became leader: nodes it has not heard from yet get their grace
    /// from then, not from the epoch.
    leading_since: Mutex<Option<Instant>>,
}

impl Dispatcher {
    /// Records a heartbeat from `node_id` (if we lead) and tells the node what it needs.
    pub async fn heartbeat(
        &self,
        manager: &Manager,
        node_id: &str,
        call: HeartbeatCall,
    ) -> Result<HeartbeatReply, SwarmError> {
        let store = manager.store();
        let (period_ns, node) = store.shared().read(|s| (heartbeat_period_ns(s), s.nodes.get(node_id).cloned()));
        let node = node.ok_or_else(|| SwarmError::NotFound(format!("node {node_id} not found")))?;
        let managers = manager.manager_addrs();
        if !store.is_leader() {
            return Ok(HeartbeatReply {
                accepted: false,
                leader: manager.leader().map(|l| l.addr),
                period_ns,
                managers,
                role: node.spec.role,
            });
        }
        self.last_seen.lock().unwrap_or_else(|p| p.into_inner()).insert(node_id.to_owned(), Instant::now());
        let changed_description = call.description.as_ref().is_some_and(|d| *d != node.description);
        if node.status.state != NodeState::Ready || node.status.addr != call.addr || changed_description {
            info!(node = node_id, addr = %call.addr, "node ready");
            let status = NodeStatus { state: NodeState::Ready, message: String::new(), addr: call.addr };
            store
                .update::<Node>(node_id, |node| {
                    node.status = status.clone();
                    if let Some(description) = &call.description {
                        node.description = description.clone();
                    }
                    Ok(true)
                })
                .await?;
        }
        Ok(HeartbeatReply {
            accepted: true,
            leader: Some(manager.addr().to_owned()),
            period_ns,
            managers,
            role: node.spec.role,
        })
    }

    /// The leader's sweep for nodes that went silent.
    pub async fn run(manager: Arc<Manager>, stopped: watch::Receiver<bool>) {
        let stop = crate::manager::until(stopped);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(SWEEP) => {}
            }
            if let Err(e) = manager.dispatcher.sweep(&manager).await {
                warn!(error = %e, "marking silent nodes down failed");
            }
        }
    }

    async fn sweep(&self, manager: &Manager) -> Result<(), SwarmError> {
        let store = manager.store();
        if !store.is_leader() {
            *self.leading_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.last_seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
            return Ok(());
        }
        let since = *self.leading_since.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(Instant::now);
        let (period_ns, ready) = store.shared().read(|s| {
            let ready: Vec<(String, String)> = s
                .nodes
                .iter()
                .filter(|n| n.status.state == NodeState::Ready)
                .map(|n| (n.id.clone(), n.status.addr.clone()))
                .collect();
            (heartbeat_period_ns(s), ready)
        });
        let grace = Duration::from_nanos(u64::try_from(period_ns).unwrap_or(5_000_000_000)) * MISSED_HEARTBEATS;
        let silent: Vec<(String, String)> = {
            let last_seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            ready.into_iter().filter(|(id, _)| last_seen.get(id).copied().unwrap_or(since).elapsed() > grace).collect()
        };
        for (id, addr) in silent {
            info!(node = %id, "no heartbeat for {grace:?}: node down");
            // Re-checked against the node as it is when written: a heartbeat that marked it
            // Ready after the read above wins, and is never overwritten with Down.
            let heard_since = || {
                let last_seen = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
                last_seen.get(&id).copied().unwrap_or(since).elapsed() <= grace
            };
            store
                .update::<Node>(&id, |node| {
                    if node.status.state != NodeState::Ready || heard_since() {
                        return Ok(false);
                    }
                    node.status =
                        NodeStatus { state: NodeState::Down, message: "heartbeat failure".into(), addr: addr.clone() };
                    Ok(true)
                })
                .await?;
        }
        Ok(())
    }
}

/// The cluster's heartbeat period in nanoseconds (Swarm's default when unset).
pub fn heartbeat_period_ns(state: &shoal_store::ClusterState) -> i64 {
    state
        .cluster()
        .map(|c| c.info.spec.dispatcher.heartbeat_period)
        .filter(|p| *p > 0)
        .unwrap_or(DEFAULT_HEARTBEAT_PERIOD_NS)
}
