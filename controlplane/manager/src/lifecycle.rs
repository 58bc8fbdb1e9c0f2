//! Changing this node's place in the swarm: `init`, `join`, `leave`, `unlock`, and the
//! role changes and certificate renewals the session asks for.

use std::{net::IpAddr, time::Duration};

use rand::Rng;
use shoal_api::{
    node::{ManagerStatus, Node, NodeAvailability, NodeRole, NodeSpec, NodeState, NodeStatus},
    swarm::{ClusterInfo, InitRequest, JoinRequest, LocalNodeState},
};
use shoal_ca::{tls::TlsMaterial, DataKey, JoinToken, NodeIdentity, NodeKey, RootCa, UnlockKey};
use shoal_store::{Batch, Cluster, RaftPeer};
use tracing::{info, warn};

use crate::{
    controlapi::swarm::{address_pool, data_path_port, validated},
    disk::Membership,
    manager::cluster_addr,
    root_ca,
    session::post,
    wire::{JoinCall, JoinReply, RaftJoinCall, RenewCall, RenewReply},
    Swarm, SwarmError,
};

/// Swarm's cluster port.
pub const DEFAULT_PORT: u16 = 2377;
/// Tries of one `swarm join` whose outcome stays unknown (no answer) before giving up.
const JOIN_ATTEMPTS: u32 = 4;

impl Swarm {
    /// `swarm init`: a new cluster with this node as its first manager and leader.
    pub async fn init(&self, req: InitRequest) -> Result<String, SwarmError> {
        let _guard = self.ops.lock().await;
        if req.force_new_cluster {
            return self.force_new_cluster().await;
        }
        if self.local_state() != LocalNodeState::Inactive {
            return Err(SwarmError::AlreadyInSwarm);
        }
        // Everything the request says is checked before anything is made.
        validated(req.spec.clone())?;
        address_pool(&req.default_addr_pool, req.subnet_size)?;
        data_path_port(req.data_path_port)?;
        let (listen_addr, advertise_addr) = self.addresses(&req.listen_addr, &req.advertise_addr)?;
        let availability = parse_availability(&req.availability)?;
        let created = self.create_cluster(req, listen_addr, advertise_addr, availability).await;
        if created.is_err() {
            self.deactivate().await;
            let _ = self.dir.remove();
        }
        created
    }

    async fn create_cluster(
        &self,
        req: InitRequest,
        listen_addr: String,
        advertise_addr: String,
        availability: NodeAvailability,
    ) -> Result<String, SwarmError> {
        let internal = |e: shoal_ca::CaError| SwarmError::Internal(e.to_string());
        let cluster_id = shoal_ca::new_id().map_err(internal)?;
        let node_id = shoal_ca::new_id().map_err(internal)?;
        let root = RootCa::generate().map_err(internal)?;
        let digest = root.digest().map_err(internal)?;
        let unlock = req.auto_lock_managers.then(UnlockKey::generate).transpose().map_err(internal)?;
        let mut spec = validated(req.spec)?;
        let (default_addr_pool, subnet_size) = address_pool(&req.default_addr_pool, req.subnet_size)?;
        let data_path_port = data_path_port(req.data_path_port)?;
        spec.encryption_config.auto_lock_managers = req.auto_lock_managers;

        let key = NodeKey::generate().map_err(internal)?;
        let identity =
            NodeIdentity { node_id: node_id.clone(), role: NodeRole::Manager, cluster_id: cluster_id.clone() };
        let lifetime = Duration::from_nanos(spec.ca_config.node_cert_expiry as u64);
        let tls = TlsMaterial {
            root_pem: root.cert_pem().to_owned(),
            cert_pem: root.issue(&key.csr_pem().map_err(internal)?, &identity, lifetime).map_err(internal)?,
            key_pem: key.to_pem().to_string(),
        };
        let data_key = DataKey::generate().map_err(internal)?;
        let membership = Membership {
            node_id: node_id.clone(),
            cluster_id: cluster_id.clone(),
            role: NodeRole::Manager,
            advertise_addr: advertise_addr.clone(),
            listen_addr,
            managers: Vec::new(),
            raft_id: Some(new_raft_id()),
            generation: shoal_ca::new_id().map_err(internal)?,
            data_path_port: u16::try_from(data_path_port).unwrap_or(0),
        };
        let addr = cluster_addr(&membership);
        let membership = Membership { managers: vec![addr.clone()], ..membership };
        self.dir.save_tls(&tls)?;
        self.dir.save_data_key(&data_key, unlock.as_ref())?;
        self.dir.save_membership(&membership)?;

        self.activate(membership, Some(data_key)).await?;
        let manager = self.manager()?;
        manager.store().bootstrap(RaftPeer { node_id: node_id.clone(), addr: addr.clone() }).await?;
        let cluster = Cluster {
            info: ClusterInfo {
                id: cluster_id,
                spec,
                tls_info: root_ca::tls_info(root.cert_pem())?,
                subnet_size,
                data_path_port,
                default_addr_pool,
                ..Default::default()
            },
            root_key_pem: root.key_pem().to_string(),
            worker_token: JoinToken::generate(&digest).map_err(internal)?.to_string(),
            manager_token: JoinToken::generate(&digest).map_err(internal)?.to_string(),
            unlock_key: unlock.map(|k| k.to_string()),
            root_rotation: None,
        };
        let mut description = self.description();
        description.tls_info = root_ca::node_tls_info(&tls.cert_pem, &tls.root_pem);
        let first = Node {
            id: node_id.clone(),
            spec: NodeSpec { role: NodeRole::Manager, availability, ..Default::default() },
            description,
            status: NodeStatus { state: NodeState::Ready, message: String::new(), addr: advertise_addr },
            manager_status: Some(ManagerStatus { addr, ..Default::default() }),
            ..Default::default()
        };
        manager.store().write(Batch::new().create(cluster).create(first)).await?;
        info!(node = %node_id, "swarm initialized");
        Ok(node_id)
    }

    /// `swarm init --force-new-cluster`: a new single-manager raft from this manager's copy of
    /// the state — the way back from losing the quorum, or from a backup of the data root. The
    /// cluster keeps its ID, CA and tokens, so workers stay members; every other node shows
    /// Down until it reports in again.
    async fn force_new_cluster(&self) -> Result<String, SwarmError> {
        let view = self.view();
        let manager = match (view.state, &view.manager) {
            (_, Some(manager)) => manager.clone(),
            (LocalNodeState::Locked, _) => return Err(SwarmError::Locked),
            _ => {
                return Err(SwarmError::InvalidArgument(
                    "--force-new-cluster needs this node's manager state: restore a manager's data root first".into(),
                ))
            }
        };
        let mut membership = view.membership.clone().ok_or(SwarmError::NotInSwarm)?;
        let mut state = manager.store().shared().read(|s| s.clone());
        // Fence the old cluster: its members' raft IDs (ours included: we take a new one)
        // are refused from now on, so old managers that come back cannot depose the new
        // leader or truncate its log.
        state.retired_raft_ids.extend(manager.members().into_iter().map(|(id, _)| id));
        if state.cluster().is_none() {
            return Err(SwarmError::InvalidArgument("this node's state holds no swarm to recover".into()));
        }
        let unlock = state.cluster().and_then(|c| c.unlock_key.as_deref()).map(str::parse::<UnlockKey>);
        let data_key = self.dir.data_key(unlock.transpose().ok().flatten().as_ref())?.ok_or(SwarmError::Locked)?;
        self.deactivate().await;

        let addr = cluster_addr(&membership);
        let nodes: Vec<_> = state.nodes.iter().map(|n| shoal_api::node::Node::clone(n)).collect();
        for mut node in nodes {
            if node.id == membership.node_id {
                node.status.state = NodeState::Ready;
                node.manager_status = Some(ManagerStatus { addr: addr.clone(), ..Default::default() });
            } else {
                node.status.state = NodeState::Down;
                node.status.message = "not heard from since the cluster was re-created".into();
                node.manager_status = None;
            }
            state.nodes.insert(std::sync::Arc::new(node));
        }
        std::fs::remove_dir_all(self.dir.raft_dir())
            .map_err(|e| SwarmError::io("removing the old raft data".into(), e))?;
        membership.raft_id = Some(new_raft_id());
        membership.managers = vec![addr.clone()];
        // A new incarnation: the old managers' raft traffic is refused from the first moment
        // the new replica serves, before it even has a membership.
        membership.generation = shoal_ca::new_id().map_err(|e| SwarmError::Internal(e.to_string()))?;
        self.dir.save_membership(&membership)?;
        self.activate(membership.clone(), Some(data_key)).await?;
        let manager = self.manager()?;
        manager.store().bootstrap(RaftPeer { node_id: membership.node_id.clone(), addr }).await?;
        manager.store().restore(state).await?;
        // The restore entry holds the whole state: snapshot it at once, so managers that join
        // get the snapshot instead of an entry that may be too big for one raft message.
        if let Err(e) = manager.store().raft().trigger().snapshot().await {
            warn!(error = %e, "snapshot after the restore not started");
        }
        info!(node = %membership.node_id, "new cluster forced from this manager's state");
        Ok(membership.node_id)
    }

    /// `swarm join`: becomes a member through the manager at `remote_addrs[0]`, in the role
    /// the token grants.
    pub async fn join(&self, req: JoinRequest) -> Result<(), SwarmError> {
        let _guard = self.ops.lock().await;
        if self.local_state() != LocalNodeState::Inactive {
            return Err(SwarmError::AlreadyInSwarm);
        }
        let token: JoinToken = req.join_token.parse().map_err(|_| SwarmError::InvalidToken)?;
        let remote = req
            .remote_addrs
            .first()
            .map(|a| with_port(a))
            .ok_or_else(|| SwarmError::InvalidArgument("no remote manager address given".into()))?;
        let (listen_addr, advertise_addr) = self.addresses(&req.listen_addr, &req.advertise_addr)?;
        let joined = self.join_through(&token, &remote, &req, listen_addr, advertise_addr).await;
        if joined.is_err() {
            self.deactivate().await;
            let _ = self.dir.remove();
        }
        joined
    }

    async fn join_through(
        &self,
        token: &JoinToken,
        remote: &str,
        req: &JoinRequest,
        listen_addr: String,
        advertise_addr: String,
    ) -> Result<(), SwarmError> {
        let internal = |e: shoal_ca::CaError| SwarmError::Internal(e.to_string());
        let client = shoal_store::transport::join_client(token).map_err(internal)?;
        let key = NodeKey::generate().map_err(internal)?;
        let call = JoinCall {
            token: token.to_string(),
            csr_pem: key.csr_pem().map_err(internal)?,
            advertise_addr: advertise_addr.clone(),
            listen_addr: listen_addr.clone(),
            availability: parse_availability(&req.availability)?,
            description: self.description(),
            request_id: shoal_ca::new_id().map_err(internal)?,
        };
        let reply = self.join_call(&client, remote, &call).await?;
        let tls = TlsMaterial { root_pem: reply.root_pem, cert_pem: reply.cert_pem, key_pem: key.to_pem().to_string() };
        let membership = Membership {
            node_id: reply.node_id.clone(),
            cluster_id: reply.cluster_id,
            role: reply.role,
            advertise_addr,
            listen_addr,
            managers: if reply.managers.is_empty() { vec![remote.to_owned()] } else { reply.managers },
            raft_id: (reply.role == NodeRole::Manager).then(new_raft_id),
            generation: reply.generation,
            data_path_port: reply.data_path_port,
        };
        self.dir.save_tls(&tls)?;
        let data_key = match reply.role {
            NodeRole::Manager => {
                // Plain until the replicated cluster record says autolock (keys.rs re-wraps).
                let key = DataKey::generate().map_err(internal)?;
                self.dir.save_data_key(&key, None)?;
                Some(key)
            }
            NodeRole::Worker => None,
        };
        self.dir.save_membership(&membership)?;
        self.activate(membership.clone(), data_key).await?;
        if reply.role == NodeRole::Manager {
            self.join_raft(&membership, &tls, remote).await?;
        }
        info!(node = %reply.node_id, role = ?reply.role, "joined the swarm");
        Ok(())
    }

    /// Asks the managers to make this (manager-certified) node a raft member.
    /// `POST /join`, tried again (with the same request ID, so at most one node is made) while
    /// its outcome is unknown: the manager could not be reached or did not say.
    async fn join_call(
        &self,
        client: &reqwest::Client,
        remote: &str,
        call: &JoinCall,
    ) -> Result<JoinReply, SwarmError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match post::<_, JoinReply>(client, remote, "join", call).await {
                Err(SwarmError::Unreachable(e)) if attempt < JOIN_ATTEMPTS => {
                    warn!(error = %e, attempt, "join not answered: trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => return other,
            }
        }
    }

    /// Asks the managers again to take this manager into raft (a join or promotion that was
    /// cut short).
    pub(crate) async fn rejoin_raft(&self) -> Result<(), SwarmError> {
        let _guard = self.ops.lock().await;
        let Some(membership) = self.view().membership else { return Ok(()) };
        if membership.role != NodeRole::Manager {
            return Ok(());
        }
        let via = membership.managers.first().cloned().unwrap_or_default();
        self.join_raft(&membership, &self.dir.tls()?, &via).await
    }

    async fn join_raft(&self, membership: &Membership, tls: &TlsMaterial, via: &str) -> Result<(), SwarmError> {
        let client = shoal_store::transport::client(tls).map_err(|e| SwarmError::Internal(e.to_string()))?;
        let call = RaftJoinCall {
            raft_id: membership.raft_id.ok_or_else(|| SwarmError::Internal("no raft ID".into()))?,
            addr: cluster_addr(membership),
        };
        let mut last = None;
        for addr in std::iter::once(via.to_owned()).chain(membership.managers.iter().cloned()) {
            match post::<_, ()>(&client, &addr, "raft/join", &call).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(SwarmError::Unreachable("no manager to join".into())))
    }

    /// `swarm leave`. A manager needs `force` (it may take the cluster's quorum with it).
    pub async fn leave(&self, force: bool) -> Result<(), SwarmError> {
        let _guard = self.ops.lock().await;
        let view = self.view();
        if view.state == LocalNodeState::Inactive {
            return Err(SwarmError::NotInSwarm);
        }
        if let Some(manager) = &view.manager {
            if !force {
                return Err(SwarmError::LastManager);
            }
            // Leave raft while there is a quorum to agree to it; alone, there is nothing to tell.
            if manager.members().len() > 1 {
                if let Some(raft_id) = view.membership.as_ref().and_then(|m| m.raft_id) {
                    if let Err(e) = manager.store().remove_manager(raft_id).await {
                        warn!(error = %e, "could not leave raft cleanly");
                    }
                }
            }
        }
        self.announce_leave().await;
        self.deactivate().await;
        self.dir.remove()?;
        info!("left the swarm");
        Ok(())
    }

    /// Tells a manager this node is leaving; best effort (a node leaving a dead swarm must
    /// still be able to leave).
    async fn announce_leave(&self) {
        let Some(membership) = self.view().membership else { return };
        let Ok(tls) = self.dir.tls() else { return };
        let Ok(client) = shoal_store::transport::client(&tls) else { return };
        for addr in &membership.managers {
            if post::<_, ()>(&client, addr, "leave", &()).await.is_ok() {
                return;
            }
        }
        warn!("no manager heard that this node left");
    }

    /// `swarm unlock`: opens a locked manager's data key with the unlock key and resumes.
    pub async fn unlock(&self, key: &str) -> Result<(), SwarmError> {
        let _guard = self.ops.lock().await;
        let view = self.view();
        if view.state != LocalNodeState::Locked {
            return Err(SwarmError::NotLocked);
        }
        let kek: UnlockKey = key.parse().map_err(|_| SwarmError::InvalidUnlockKey)?;
        let data_key = self.dir.data_key(Some(&kek))?;
        let membership = view.membership.ok_or(SwarmError::NotInSwarm)?;
        self.activate(membership, data_key).await?;
        info!("swarm unlocked");
        Ok(())
    }

    /// Follows a promotion or demotion: new certificate first (it carries the role), then
    /// start or stop the manager.
    pub(crate) async fn change_role(&self, role: NodeRole) -> Result<(), SwarmError> {
        let _guard = self.ops.lock().await;
        let Some(mut membership) = self.view().membership else { return Ok(()) };
        if membership.role == role {
            return Ok(());
        }
        let tls = self.renew_locked(&membership).await?;
        if role_of(&tls)? != role {
            return Err(SwarmError::Unreachable("the managers have not issued the new role yet".into()));
        }
        self.deactivate().await;
        membership.role = role;
        match role {
            NodeRole::Manager => {
                membership.raft_id = Some(new_raft_id());
                let key = DataKey::generate().map_err(|e| SwarmError::Internal(e.to_string()))?;
                self.dir.save_data_key(&key, None)?;
                self.dir.save_membership(&membership)?;
                let via = membership.managers.first().cloned().unwrap_or_default();
                self.activate(membership.clone(), Some(key)).await?;
                self.join_raft(&membership, &tls, &via).await?;
            }
            NodeRole::Worker => {
                membership.raft_id = None;
                self.dir.remove_manager_data()?;
                self.dir.save_membership(&membership)?;
                self.activate(membership, None).await?;
            }
        }
        info!(?role, "role changed");
        Ok(())
    }

    pub(crate) async fn renew_certificate(&self) -> Result<(), SwarmError> {
        let _guard = self.ops.lock().await;
        let Some(membership) = self.view().membership else { return Ok(()) };
        let tls = self.renew_locked(&membership).await?;
        if let Some(manager) = self.view().manager {
            manager.set_tls(&tls)?;
        }
        Ok(())
    }

    /// Trusts `roots` from now on: the swarm's roots changed (a root rotation began or ended).
    pub(crate) async fn set_trust_root(&self, roots: &str) -> Result<(), SwarmError> {
        let _guard = self.ops.lock().await;
        let mut tls = self.dir.tls()?;
        if tls.root_pem == roots {
            return Ok(());
        }
        tls.root_pem = roots.to_owned();
        // Refused before it replaces anything if the roots do not make a configuration.
        shoal_ca::tls::client_config(&tls).map_err(|e| SwarmError::Internal(format!("the swarm's roots: {e}")))?;
        self.dir.save_tls(&tls)?;
        if let Some(manager) = self.view().manager {
            manager.set_tls(&tls)?;
        }
        Ok(())
    }

    /// A new key and certificate from the managers, saved; the caller holds `ops`.
    async fn renew_locked(&self, membership: &Membership) -> Result<TlsMaterial, SwarmError> {
        let internal = |e: shoal_ca::CaError| SwarmError::Internal(e.to_string());
        let current = self.dir.tls()?;
        let client = shoal_store::transport::client(&current).map_err(internal)?;
        let key = NodeKey::generate().map_err(internal)?;
        let call = RenewCall { csr_pem: key.csr_pem().map_err(internal)? };
        let mut last = None;
        for addr in &membership.managers {
            match post::<_, RenewReply>(&client, addr, "renew", &call).await {
                Ok(reply) => {
                    let root_pem = if reply.root_pem.is_empty() { current.root_pem } else { reply.root_pem };
                    let tls = TlsMaterial { root_pem, cert_pem: reply.cert_pem, key_pem: key.to_pem().to_string() };
                    self.dir.save_tls(&tls)?;
                    return Ok(tls);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(SwarmError::Unreachable("no manager known".into())))
    }

    /// `(listen, advertise)`: listen as `IP:port` (default `0.0.0.0:2377`); advertise as an
    /// IP, from the request, else the listen IP, else shoald's `--advertise-addr`.
    fn addresses(&self, listen: &str, advertise: &str) -> Result<(String, String), SwarmError> {
        let listen = if listen.is_empty() { format!("0.0.0.0:{DEFAULT_PORT}") } else { with_port(listen) };
        let (listen_ip, _) = listen.rsplit_once(':').unwrap_or((&listen, ""));
        let advertise_ip = advertise.rsplit_once(':').map_or(advertise, |(ip, _)| ip);
        let chosen = if !advertise_ip.is_empty() {
            interface_addr(advertise_ip)?.unwrap_or_else(|| advertise_ip.to_owned())
        } else if listen_ip != "0.0.0.0" {
            listen_ip.to_owned()
        } else if let Some(ip) = self.config.default_advertise_addr {
            ip.to_string()
        } else {
            return Err(SwarmError::InvalidArgument(
                "could not choose an IP address to advertise since this system has multiple addresses - specify one with --advertise-addr".into(),
            ));
        };
        chosen
            .parse::<IpAddr>()
            .map_err(|_| SwarmError::InvalidArgument(format!("advertise address must be an IP address: {chosen:?}")))?;
        Ok((listen, chosen))
    }
}

/// The IPv4 address of interface `name` (`--advertise-addr eth0` or `eth0:2377`, as
/// dockerd accepts), or `None` if `name` is no interface here (then it must be an address).
fn interface_addr(name: &str) -> Result<Option<String>, SwarmError> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(None);
    }
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| SwarmError::Internal(format!("listing interfaces: {e}")))?;
    let found: Vec<std::net::Ipv4Addr> = addrs
        .filter(|a| a.interface_name == name)
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .collect();
    match found.as_slice() {
        [] if nix::net::if_::if_nametoindex(name).is_ok() => {
            Err(SwarmError::InvalidArgument(format!("interface {name} has no IPv4 addresses")))
        }
        [] => Ok(None),
        [one] => Ok(Some(one.to_string())),
        _ => Err(SwarmError::InvalidArgument(format!(
            "interface {name} has more than one IPv4 address ({})",
            found.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" and ")
        ))),
    }
}

fn role_of(tls: &TlsMaterial) -> Result<NodeRole, SwarmError> {
    NodeIdentity::from_cert_pem(&tls.cert_pem).map(|i| i.role).map_err(|e| SwarmError::Internal(e.to_string()))
}

fn with_port(addr: &str) -> String {
    if addr.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) {
        addr.to_owned()
    } else {
        format!("{addr}:{DEFAULT_PORT}")
    }
}

fn parse_availability(text: &str) -> Result<NodeAvailability, SwarmError> {
    match text {
        "" | "active" => Ok(NodeAvailability::Active),
        "pause" => Ok(NodeAvailability::Pause),
        "drain" => Ok(NodeAvailability::Drain),
        other => Err(SwarmError::InvalidArgument(format!("invalid availability {other:?}"))),
    }
}

/// A random, non-zero raft member ID.
fn new_raft_id() -> u64 {
    rand::thread_rng().gen_range(1..u64::MAX)
}
