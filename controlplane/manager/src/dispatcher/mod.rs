//! The dispatcher: nodes report in every heartbeat period. Any manager answers (a manager
//! that does not lead sends the caller to the leader); the leader records when it heard
//! from each node (`Heartbeats`, in memory: a raft write per heartbeat is the load swarmkit
//! avoids too) and writes only transitions to the store. `liveness`, a leader-only role,
//! marks nodes Down when they fall silent.

mod liveness;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

pub use liveness::Liveness;
use rustls::pki_types::CertificateDer;
use shoal_api::{
    node::{Node, NodeState, NodeStatus},
    swarm::DEFAULT_HEARTBEAT_PERIOD_NS,
};
use tracing::info;

use crate::{
    wire::{HeartbeatCall, HeartbeatReply},
    Manager, SwarmError,
};

/// When the leader last heard from each node.
#[derive(Default)]
pub struct Heartbeats(Mutex<HashMap<String, Instant>>);

impl Heartbeats {
    pub fn record(&self, node_id: &str, at: Instant) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(node_id.to_owned(), at);
    }

    pub fn last(&self, node_id: &str) -> Option<Instant> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(node_id).copied()
    }

    pub fn all(&self) -> HashMap<String, Instant> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Default)]
pub struct Dispatcher {
    heartbeats: Arc<Heartbeats>,
}

impl Dispatcher {
    pub fn heartbeats(&self) -> Arc<Heartbeats> {
        self.heartbeats.clone()
    }

    /// Records a heartbeat from `node_id` (if we lead) and tells the node what it needs.
    pub async fn heartbeat(
        &self,
        manager: &Manager,
        node_id: &str,
        chain: &[CertificateDer<'static>],
        mut call: HeartbeatCall,
    ) -> Result<HeartbeatReply, SwarmError> {
        let store = manager.store();
        let (period_ns, node, trust) = store.shared().read(|s| {
            let trust = s.cluster().map(|c| (c.trust_bundle(), c.info.tls_info.cert_issuer_public_key.clone()));
            (heartbeat_period_ns(s), s.nodes.get(node_id).cloned(), trust.unwrap_or_default())
        });
        let (trust_root, cert_issuer_public_key) = trust;
        if let Some(description) = &mut call.description {
            // Who issued the node's certificate is read from the chain it presented, not
            // taken on its word: a root rotation ends on it.
            let roots = shoal_ca::issuer::certs_from_pem(&trust_root).unwrap_or_default();
            let issuer = shoal_ca::IssuerInfo::of_chain(chain, &roots).unwrap_or_default();
            description.tls_info.cert_issuer_subject = issuer.subject;
            description.tls_info.cert_issuer_public_key = issuer.public_key;
        }
        let node = node.ok_or_else(|| SwarmError::NotFound(format!("node {node_id} not found")))?;
        let leading = store.is_leader();
        let reply = HeartbeatReply {
            accepted: leading,
            leader: if leading { Some(manager.addr().to_owned()) } else { manager.leader().map(|l| l.addr) },
            period_ns,
            managers: manager.manager_addrs(),
            role: node.spec.role,
            voter: store.voter_nodes().contains(node_id),
            generation: store.generation().to_owned(),
            trust_root,
            cert_issuer_public_key,
        };
        if !leading {
            return Ok(reply);
        }
        self.heartbeats.record(node_id, Instant::now());
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
        Ok(reply)
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
