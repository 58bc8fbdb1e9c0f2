//! The root rotator, a leader-only role: ends a root rotation once every node in the store
//! reports (in its heartbeats' `TLSInfo`) a certificate issued by the new root. A node that
//! is down holds the rotation up until it comes back or is removed, as in Docker: finishing
//! without it would lock it out.

use std::{sync::Arc, time::Duration};

use shoal_store::{Batch, Cluster, ClusterState, ClusterStore, CommandError, Filter, Kind, WriteError};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::leadership::LeaderRole;

/// How often the rotator looks again when nothing was announced (a write that failed).
const RETRY: Duration = Duration::from_secs(2);

pub struct RootRotator {
    store: Arc<ClusterStore>,
}

impl RootRotator {
    pub fn new(store: Arc<ClusterStore>) -> Self {
        RootRotator { store }
    }

    async fn finish_if_done(&self) {
        let Some((done, version)) = self.store.shared().read(finished) else { return };
        match self.store.write_as_leader(Batch::new().update(done, version)).await {
            Ok(_) => info!("root rotation done: every node holds a certificate of the new root"),
            // Changed meanwhile (another rotation, a spec update): looked at again next round.
            Err(WriteError::Refused(CommandError::OutOfSequence)) => {}
            Err(e) => warn!(error = %e, "root rotation not finished yet"),
        }
    }
}

impl LeaderRole for RootRotator {
    const NAME: &'static str = "root rotator";

    async fn run(self, cancel: CancellationToken) {
        let filter = || Filter::kinds(&[Kind::Cluster, Kind::Node]);
        let mut changes = self.store.shared().watch(filter());
        loop {
            self.finish_if_done().await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
                event = changes.recv() => if event.is_err() {
                    // Lagged or replaced: a fresh watch; the state is read anew each round.
                    changes = self.store.shared().watch(filter());
                },
            }
        }
    }
}

/// The cluster record with its rotation done, and the version it replaces, if a rotation is
/// under way and every node's certificate comes from the new root.
pub fn finished(state: &ClusterState) -> Option<(Cluster, u64)> {
    let cluster = state.cluster()?;
    let rotation = cluster.root_rotation.as_ref()?;
    let wanted = super::tls_info(&rotation.cert_pem).ok()?;
    let converged = state.nodes.iter().all(|n| n.description.tls_info.same_issuer(&wanted));
    if !converged {
        return None;
    }
    let mut done = Cluster::clone(cluster);
    let rotation = done.root_rotation.take()?;
    done.info.tls_info = wanted;
    done.info.root_rotation_in_progress = false;
    done.root_key_pem = rotation.key_pem;
    done.worker_token = rotation.worker_token;
    done.manager_token = rotation.manager_token;
    Some((done, cluster.info.meta.version.index))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shoal_api::node::Node;
    use shoal_ca::{IssuerInfo, RootCa};

    use super::*;

    fn state_with(nodes: &[&str]) -> (ClusterState, String) {
        let root = RootCa::generate().unwrap();
        let mut cluster = Cluster {
            info: shoal_api::swarm::ClusterInfo {
                id: "c".into(),
                tls_info: super::super::tls_info(root.cert_pem()).unwrap(),
                ..Default::default()
            },
            root_key_pem: root.key_pem().to_string(),
            ..Default::default()
        };
        super::super::start_rotation(&mut cluster, None).unwrap();
        let next = cluster.root_rotation.as_ref().unwrap().cert_pem.clone();
        let mut state = ClusterState::default();
        state.clusters.insert(Arc::new(cluster));
        for id in nodes {
            let mut node = Node { id: (*id).into(), ..Default::default() };
            node.description.tls_info = super::super::tls_info(root.cert_pem()).unwrap();
            state.nodes.insert(Arc::new(node));
        }
        (state, next)
    }

    fn reissue(state: &mut ClusterState, id: &str, root_pem: &str) {
        let mut node = Node::clone(state.nodes.get(id).unwrap());
        let issuer = IssuerInfo::of_ca(root_pem).unwrap();
        node.description.tls_info.cert_issuer_subject = issuer.subject;
        node.description.tls_info.cert_issuer_public_key = issuer.public_key;
        state.nodes.insert(Arc::new(node));
    }

    #[test]
    fn a_rotation_ends_only_when_every_node_holds_a_new_certificate() {
        let (mut state, next) = state_with(&["a", "b"]);
        assert!(finished(&state).is_none(), "nobody reissued");
        reissue(&mut state, "a", &next);
        assert!(finished(&state).is_none(), "b still has the old root's certificate");
        reissue(&mut state, "b", &next);
        let (done, _) = finished(&state).expect("every node reissued");
        let rotation = state.cluster().unwrap().root_rotation.clone().unwrap();
        assert_eq!(done.info.tls_info.trust_root, next);
        assert!(!done.info.root_rotation_in_progress && done.root_rotation.is_none());
        assert_eq!((done.worker_token, done.root_key_pem), (rotation.worker_token, rotation.key_pem));
        assert!(done
            .manager_token
            .parse::<shoal_ca::JoinToken>()
            .unwrap()
            .pins(&shoal_ca::root::digest_of_pem(&next).unwrap()));
    }

    #[test]
    fn nothing_to_finish_without_a_rotation() {
        let (mut state, _) = state_with(&[]);
        let mut cluster = Cluster::clone(state.cluster().unwrap());
        cluster.root_rotation = None;
        state.clusters.insert(Arc::new(cluster));
        assert!(finished(&state).is_none());
    }
}
