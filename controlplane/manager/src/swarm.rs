//! `Swarm`: this node's place in a swarm — inactive, locked, or active as a worker or a
//! manager — and the only way to change it (init, join, leave, unlock, role changes).
//! Operations run one at a time; readers (`info`, `manager`) never wait for them.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, RwLock, Weak},
};

use shoal_api::{
    node::{NodeDescription, NodeRole},
    swarm::{LocalNodeState, Peer, SwarmInfo},
};
use shoal_ca::tls::TlsMaterial;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{disk::Membership, session, Manager, SwarmDir, SwarmError};

/// What the node tells the swarm about itself, and where it keeps its state.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    pub data_root: PathBuf,
    /// Hostname, platform, resources and engine of this node.
    pub description: NodeDescription,
    /// Address to advertise when `swarm init/join` names none (shoald's `--advertise-addr`).
    pub default_advertise_addr: Option<IpAddr>,
}

pub struct Swarm {
    pub(crate) config: SwarmConfig,
    pub(crate) dir: SwarmDir,
    /// Serialises state changes.
    pub(crate) ops: tokio::sync::Mutex<()>,
    view: RwLock<View>,
    /// The VXLAN port of the swarm this node is in (`None`: in none, or not known), for the
    /// data plane.
    data_path_port: watch::Sender<Option<u16>>,
    pub(crate) this: Weak<Swarm>,
}

/// The node's state as readers see it.
#[derive(Clone, Default)]
pub(crate) struct View {
    pub state: LocalNodeState,
    pub membership: Option<Membership>,
    pub manager: Option<Arc<Manager>>,
    pub error: String,
    pub session: Option<Session>,
}

/// The running session loop of an active node.
#[derive(Clone)]
pub(crate) struct Session {
    stop: watch::Sender<bool>,
    task: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Swarm {
    /// Resumes whatever membership the data root holds: a worker rejoins its session, a
    /// manager reopens its replica — unless autolock wrapped its data key, then it waits
    /// locked for `unlock`.
    pub async fn start(config: SwarmConfig) -> Arc<Swarm> {
        let dir = SwarmDir::new(&config.data_root);
        let swarm = Arc::new_cyclic(|this| Swarm {
            config,
            dir,
            ops: tokio::sync::Mutex::new(()),
            view: RwLock::new(View::default()),
            data_path_port: watch::Sender::new(None),
            this: this.clone(),
        });
        let _guard = swarm.ops.lock().await;
        if let Err(e) = swarm.resume().await {
            warn!(error = %e, "could not resume the swarm membership");
            swarm.set_view(|v| {
                v.state = LocalNodeState::Error;
                v.error = e.to_string();
            });
        }
        drop(_guard);
        swarm
    }

    async fn resume(&self) -> Result<(), SwarmError> {
        let Some(membership) = self.dir.membership()? else { return Ok(()) };
        if membership.role == NodeRole::Manager && self.dir.is_locked()? {
            info!(node = %membership.node_id, "swarm is locked: waiting for `swarm unlock`");
            self.set_view(|v| {
                v.state = LocalNodeState::Locked;
                v.membership = Some(membership);
            });
            return Ok(());
        }
        let data_key = match membership.role {
            NodeRole::Manager => self.dir.data_key(None)?,
            NodeRole::Worker => None,
        };
        self.activate(membership, data_key).await
    }

    /// Starts the manager (with `data_key`) if the membership says manager, and the session.
    pub(crate) async fn activate(
        &self,
        membership: Membership,
        data_key: Option<shoal_ca::DataKey>,
    ) -> Result<(), SwarmError> {
        let manager = match (membership.role, data_key) {
            (NodeRole::Manager, Some(key)) => {
                Some(Manager::start(&self.dir, &membership, key, &self.dir.tls()?).await?)
            }
            (NodeRole::Manager, None) => return Err(SwarmError::Locked),
            (NodeRole::Worker, _) => None,
        };
        let session = self.start_session();
        info!(node = %membership.node_id, role = ?membership.role, "swarm active");
        self.set_view(|v| {
            v.state = LocalNodeState::Active;
            v.membership = Some(membership);
            v.manager = manager;
            v.error.clear();
            v.session = Some(session);
        });
        Ok(())
    }

    fn start_session(&self) -> Session {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(session::run(self.this.clone(), stopped));
        Session { stop, task: Arc::new(std::sync::Mutex::new(Some(task))) }
    }

    /// Stops the session and the manager; the view goes back to inactive.
    pub(crate) async fn deactivate(&self) {
        let view = self.view();
        if let Some(session) = view.session {
            let _ = session.stop.send(true);
            let task = session.task.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(task) = task {
                // The session may be the caller (a role change): never wait for ourselves.
                if tokio::task::try_id() != Some(task.id()) {
                    let _ = task.await;
                }
            }
        }
        if let Some(manager) = view.manager {
            manager.stop().await;
        }
        self.set_view(|v| *v = View::default());
    }

    pub(crate) fn view(&self) -> View {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_view(&self, change: impl FnOnce(&mut View)) {
        let mut view = self.view.write().unwrap_or_else(|p| p.into_inner());
        change(&mut view);
        let port = view.membership.as_ref().and_then(Membership::data_path_port);
        self.data_path_port.send_if_modified(|current| std::mem::replace(current, port) != port);
    }

    /// The UDP port the swarm's overlays use, as it changes: set by `init` (`--data-path-port`)
    /// or learnt at `join`; `None` outside a swarm.
    pub fn data_path_port(&self) -> watch::Receiver<Option<u16>> {
        self.data_path_port.subscribe()
    }

    /// The running manager, or the error dockerd gives for calls that need one.
    pub fn manager(&self) -> Result<Arc<Manager>, SwarmError> {
        let view = self.view();
        match (view.state, view.manager) {
            (_, Some(manager)) => Ok(manager),
            (LocalNodeState::Locked, _) => Err(SwarmError::Locked),
            (LocalNodeState::Active, None) => Err(SwarmError::NotManager),
            _ => Err(SwarmError::NotInSwarmForManagerCall),
        }
    }

    /// The manager, for calls that read or change the swarm: only once its replica is a
    /// voter (a manager still joining holds an empty or partial copy, which it must not
    /// serve as the swarm's state).
    pub fn serving_manager(&self) -> Result<Arc<Manager>, SwarmError> {
        let manager = self.manager()?;
        if !manager.is_voter() {
            return Err(SwarmError::Unreachable(
                "this node is still joining the managers (catching up with the swarm's state): try again in a moment"
                    .into(),
            ));
        }
        Ok(manager)
    }

    pub fn local_state(&self) -> LocalNodeState {
        self.view().state
    }

    /// `Info.Swarm`, from this node's point of view.
    pub fn info(&self) -> SwarmInfo {
        let view = self.view();
        let mut info = SwarmInfo {
            local_node_state: view.state,
            error: view.error.clone(),
            control_available: view.manager.is_some(),
            ..Default::default()
        };
        if let Some(membership) = &view.membership {
            info.node_id = membership.node_id.clone();
            info.node_addr = membership.advertise_addr.clone();
            info.remote_managers =
                membership.managers.iter().map(|addr| Peer { node_id: String::new(), addr: addr.clone() }).collect();
        }
        if let Some(manager) = &view.manager {
            info.remote_managers =
                manager.members().into_iter().map(|(_, p)| Peer { node_id: p.node_id, addr: p.addr }).collect();
            manager.store().shared().read(|s| {
                info.nodes = Some(s.nodes.len() as u64);
                info.managers = Some(s.managers().count() as u64);
                info.cluster = s.cluster().map(|c| c.info.clone());
            });
        }
        info
    }

    /// What the session needs each beat: who we are and our certificate.
    pub(crate) fn session_context(&self) -> Result<(Membership, TlsMaterial), SwarmError> {
        let membership = self.view().membership.ok_or(SwarmError::NotInSwarm)?;
        Ok((membership, self.dir.tls()?))
    }

    pub(crate) fn description(&self) -> NodeDescription {
        self.config.description.clone()
    }

    /// Remembers the managers the leader told us about (for failing over between them) and,
    /// on a worker, the swarm's incarnation.
    pub(crate) fn update_from_leader(
        &self,
        managers: Vec<String>,
        generation: Option<String>,
    ) -> Result<(), SwarmError> {
        let mut updated = None;
        self.set_view(|v| {
            if let Some(m) = &mut v.membership {
                m.managers = managers;
                if let Some(generation) = generation {
                    m.generation = generation;
                }
                updated = Some(m.clone());
            }
        });
        match updated {
            Some(m) => self.dir.save_membership(&m),
            None => Ok(()),
        }
    }

    /// Stops everything (daemon shutdown); the membership stays on disk.
    pub async fn shutdown(&self) {
        let _guard = self.ops.lock().await;
        self.deactivate().await;
    }
}
