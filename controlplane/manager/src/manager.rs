//! A running manager: this node's replica of the cluster store, its cluster port (raft, CA,
//! dispatcher endpoints over mutual TLS) and the leader-only loops. Built from the store
//! alone at start; the roles never call each other, they share the store.

use std::sync::{Arc, Mutex, RwLock};

use shoal_ca::{tls::TlsMaterial, DataKey};
use shoal_store::{ClusterStore, RaftPeer, StoreConfig};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::info;

use crate::{
    cluster_port,
    disk::Membership,
    dispatcher::{Dispatcher, Liveness},
    keys,
    leadership::{self, RoleStarter},
    role_manager::RoleManager,
    root_ca::RootRotator,
    SwarmDir, SwarmError,
};

/// How long a stopping leader tries to hand over before it just stops.
const HANDOVER_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

pub struct Manager {
    store: Arc<ClusterStore>,
    pub(crate) dispatcher: Dispatcher,
    node_id: String,
    /// This manager's cluster port as others dial it.
    addr: String,
    tls: RwLock<Arc<rustls::ServerConfig>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Manager {
    /// Opens the replica and starts serving the cluster port.
    pub async fn start(
        dir: &SwarmDir,
        membership: &Membership,
        data_key: DataKey,
        tls: &TlsMaterial,
    ) -> Result<Arc<Self>, SwarmError> {
        let raft_id = membership.raft_id.ok_or_else(|| SwarmError::Internal("a manager without a raft ID".into()))?;
        let client = shoal_store::transport::client(tls).map_err(|e| SwarmError::Internal(e.to_string()))?;
        let store = ClusterStore::open(StoreConfig {
            dir: dir.raft_dir(),
            data_key: data_key.clone(),
            raft_id,
            client,
            generation: membership.generation.clone(),
        })
        .await?;
        let server_tls = shoal_ca::tls::server_config(tls).map_err(|e| SwarmError::Internal(e.to_string()))?;
        let listener = TcpListener::bind(&membership.listen_addr)
            .await
            .map_err(|e| SwarmError::InvalidArgument(format!("cannot listen on {}: {e}", membership.listen_addr)))?;
        let (stop, stopped) = watch::channel(false);
        let manager = Arc::new(Manager {
            store,
            dispatcher: Dispatcher::default(),
            node_id: membership.node_id.clone(),
            addr: cluster_addr(membership),
            tls: RwLock::new(server_tls),
            stop,
            tasks: Mutex::new(Vec::new()),
        });
        let tasks = vec![
            tokio::spawn(cluster_port::serve(manager.clone(), listener, until(stopped.clone()))),
            tokio::spawn(leadership::run_while_leader(manager.store.clone(), manager.leader_roles(), stopped.clone())),
            tokio::spawn(keys::follow_autolock(manager.clone(), dir.clone(), data_key, stopped)),
        ];
        *manager.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        info!(node = %manager.node_id, addr = %manager.addr, raft_id, "manager started");
        Ok(manager)
    }

    /// The roles that run on the leader only, each built afresh per term of leadership.
    fn leader_roles(&self) -> Vec<RoleStarter> {
        let (store, heartbeats) = (self.store.clone(), self.dispatcher.heartbeats());
        let liveness = leadership::starter(move || Liveness::new(store.clone(), heartbeats.clone()));
        let store = self.store.clone();
        let roles = leadership::starter(move || RoleManager::new(store.clone()));
        let store = self.store.clone();
        let rotator = leadership::starter(move || RootRotator::new(store.clone()));
        vec![liveness, roles, rotator]
    }

    pub fn store(&self) -> &Arc<ClusterStore> {
        &self.store
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// `IP:port` of this manager's cluster port.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub(crate) fn server_tls(&self) -> Arc<rustls::ServerConfig> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serves new connections, and dials other managers, with a renewed certificate or new
    /// trusted roots.
    pub fn set_tls(&self, tls: &TlsMaterial) -> Result<(), SwarmError> {
        let internal = |e: shoal_ca::CaError| SwarmError::Internal(e.to_string());
        let config = shoal_ca::tls::server_config(tls).map_err(internal)?;
        let client = shoal_store::transport::client(tls).map_err(internal)?;
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = config;
        self.store.set_client(client);
        Ok(())
    }

    /// The raft members as (raft ID, peer).
    pub fn members(&self) -> Vec<(u64, RaftPeer)> {
        let membership = self.store.shared().membership();
        membership.membership().nodes().map(|(id, peer)| (*id, peer.clone())).collect()
    }

    /// Whether this replica is a voter of the cluster it belongs to.
    pub fn is_voter(&self) -> bool {
        let raft_id = self.store.raft_id();
        self.store.metrics().membership_config.membership().voter_ids().any(|id| id == raft_id)
    }

    /// Cluster ports of all managers.
    pub fn manager_addrs(&self) -> Vec<String> {
        self.members().into_iter().map(|(_, peer)| peer.addr).collect()
    }

    /// The node ID and cluster port of the current leader, if one is known.
    pub fn leader(&self) -> Option<RaftPeer> {
        let leader = self.store.metrics().current_leader?;
        self.members().into_iter().find(|(id, _)| *id == leader).map(|(_, peer)| peer)
    }

    /// Hands leadership over if we lead (the cluster port still serves, so the new leader
    /// gets our vote), then stops the cluster port and the loops, then the replica.
    pub async fn stop(&self) {
        self.store.hand_over(HANDOVER_LIMIT).await;
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
        self.store.shutdown().await;
        info!(node = %self.node_id, "manager stopped");
    }
}

/// `IP:port` others dial this manager at: the advertised address with the listen port.
pub fn cluster_addr(membership: &Membership) -> String {
    let port = membership.listen_addr.rsplit_once(':').map_or("2377", |(_, p)| p);
    format!("{}:{port}", membership.advertise_addr)
}

/// Completes when `stopped` turns true.
pub(crate) async fn until(mut stopped: watch::Receiver<bool>) {
    while !*stopped.borrow() {
        if stopped.changed().await.is_err() {
            return;
        }
    }
}
