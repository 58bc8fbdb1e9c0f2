//! The cluster port (2377): raft (from the store), and the CA and dispatcher endpoints. Every
//! endpoint but `/join` wants a certificate of this cluster whose node has not been removed;
//! `/raft/*` and `/raft/join` want a manager's.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::post,
    Extension, Json, Router,
};
use shoal_api::node::{ManagerStatus, Node, NodeRole, NodeSpec, NodeState, NodeStatus};
use shoal_ca::{JoinToken, NodeIdentity};
use shoal_store::{
    objects::node_replaceable,
    transport::{Peer, PeerChain},
    Batch, CommandError, Index, Kind, RaftPeer, WriteError,
};
use tokio::net::TcpListener;
use tracing::info;

use crate::{
    root_ca,
    wire::{ErrorReply, HeartbeatCall, HeartbeatReply, JoinCall, JoinReply, RaftJoinCall, RenewCall, RenewReply},
    Manager, SwarmError,
};

pub async fn serve(manager: Arc<Manager>, listener: TcpListener, stop: impl std::future::Future<Output = ()> + Send) {
    let leader_only = || middleware::from_fn_with_state(manager.clone(), leader_only);
    let node_routes = Router::new()
        .route("/heartbeat", post(heartbeat))
        .route("/renew", post(renew).layer(leader_only()))
        .route("/raft/join", post(raft_join))
        .route("/leave", post(leave))
        .layer(middleware::from_fn_with_state(manager.clone(), members_only))
        .with_state(manager.clone());
    let router = Router::new()
        .route("/join", post(join).layer(leader_only()))
        .with_state(manager.clone())
        .merge(node_routes)
        .merge(shoal_store::network::routes(manager.store().clone()));
    let tls_source = manager.clone();
    shoal_store::transport::serve(listener, move || tls_source.server_tls(), router, stop).await;
}

impl IntoResponse for SwarmError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorReply { message: self.to_string() })).into_response()
    }
}

/// The caller's verified identity, for handlers behind `members_only`.
#[derive(Clone)]
struct Caller(NodeIdentity);

async fn members_only(State(manager): State<Arc<Manager>>, mut req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>().and_then(|p| p.0.clone());
    let Some(peer) = peer else {
        return (StatusCode::UNAUTHORIZED, Json(ErrorReply { message: "a node certificate is required".into() }))
            .into_response();
    };
    let allowed = manager
        .store()
        .shared()
        .read(|s| !s.removed_nodes.contains(&peer.node_id) && s.cluster().is_none_or(|c| c.info.id == peer.cluster_id));
    if !allowed {
        let message = format!("node {} is not a member of this swarm", peer.node_id);
        return (StatusCode::FORBIDDEN, Json(ErrorReply { message })).into_response();
    }
    req.extensions_mut().insert(Caller(peer));
    next.run(req).await
}

/// The CA signs on the leader only: a follower's copy of the cluster's root may be behind (a
/// root rotation it has not applied yet), and a certificate from the old root could lock its
/// holder out once the rotation ends. Others send the caller to the leader (a 307 keeps the
/// method and the body).
async fn leader_only(State(manager): State<Arc<Manager>>, req: Request, next: Next) -> Response {
    if manager.store().is_leader() {
        return next.run(req).await;
    }
    match manager.leader() {
        Some(leader) => {
            let location = format!("https://{}{}", leader.addr, req.uri().path());
            (StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, location)]).into_response()
        }
        None => SwarmError::Write(WriteError::NoLeader).into_response(),
    }
}

/// A node with a token becomes a member: a certificate for a new node ID in the role the
/// token grants, and a node object in the store.
async fn join(State(manager): State<Arc<Manager>>, Json(call): Json<JoinCall>) -> Result<Json<JoinReply>, SwarmError> {
    let store = manager.store();
    let cluster = store
        .shared()
        .read(|s| s.cluster().map(|c| shoal_store::Cluster::clone(c)))
        .ok_or(SwarmError::Unreachable("the swarm is starting".into()))?;
    let token: JoinToken = call.token.parse().map_err(|_| invalid_token())?;
    let matches = |stored: &str| stored.parse::<JoinToken>().is_ok_and(|t| t.same_secret(&token));
    let role = if matches(&cluster.manager_token) {
        NodeRole::Manager
    } else if matches(&cluster.worker_token) {
        NodeRole::Worker
    } else {
        return Err(invalid_token());
    };
    // A retried request makes the same node ID, so a join whose first try went through
    // (its answer lost) gets that node back instead of a second one holding the hostname.
    let node_id = if call.request_id.is_empty() {
        shoal_ca::new_id().map_err(|e| SwarmError::Internal(e.to_string()))?
    } else {
        shoal_ca::id_for(&cluster.info.id, &call.request_id)
    };
    let identity = NodeIdentity { node_id: node_id.clone(), role, cluster_id: cluster.info.id.clone() };
    let cert_pem = root_ca::issue(&cluster, &call.csr_pem, &identity)?;
    let root_pem = cluster.trust_bundle();
    let mut description = call.description;
    // What its heartbeats will report, so the first one is no change to write.
    description.tls_info = root_ca::node_tls_info(&cert_pem, &root_pem);
    let node = Node {
        id: node_id.clone(),
        spec: NodeSpec { role, availability: call.availability, ..Default::default() },
        description,
        status: NodeStatus { state: NodeState::Ready, message: String::new(), addr: call.advertise_addr },
        ..Default::default()
    };
    // A machine that left (or died) and joins again replaces its old, down entry in the
    // same transaction; a live node or a manager keeps its hostname (the create is refused).
    let replaced = store.shared().read(|s| {
        s.nodes
            .find(Index::Name, &node.description.hostname)
            .find(|n| node_replaceable(n))
            .map(|n| (n.id.clone(), n.meta.version.index))
    });
    let mut batch = Batch::new();
    if let Some((old, version)) = replaced {
        batch = batch.delete(Kind::Node, old, Some(version));
    }
    // A retry of a join that went through finds the node it made; a retry racing its own
    // first try finds it once that create is refused as a duplicate.
    let hostname = node.description.hostname.clone();
    let made_by_this_request = || {
        store
            .shared()
            .read(|s| s.nodes.get(&node_id).map(|n| n.description.hostname == hostname && n.spec.role == role))
    };
    match made_by_this_request() {
        Some(true) => info!(node = %node_id, "join retried: the node it made already"),
        Some(false) => return Err(SwarmError::Conflict(format!("node {node_id} already exists"))),
        None => match store.write(batch.create(node)).await {
            Ok(_) => info!(node = %node_id, ?role, "node joined"),
            Err(WriteError::Refused(CommandError::Conflict(_))) if made_by_this_request() == Some(true) => {
                info!(node = %node_id, "join retried: the node it made already")
            }
            Err(e) => return Err(e.into()),
        },
    }
    Ok(Json(JoinReply {
        node_id,
        root_pem,
        cluster_id: cluster.info.id,
        role,
        cert_pem,
        managers: manager.manager_addrs(),
        generation: manager.store().generation().to_owned(),
        data_path_port: u16::try_from(cluster.info.data_path_port).unwrap_or(0),
    }))
}

fn invalid_token() -> SwarmError {
    SwarmError::InvalidArgument("A valid join token is necessary to join this cluster".into())
}

/// A fresh certificate for the caller, carrying the role the store holds now (this is how a
/// promotion or demotion reaches the node's certificate), from the root that signs now (how a
/// root rotation does), with the roots to trust now.
async fn renew(
    State(manager): State<Arc<Manager>>,
    Extension(Caller(caller)): Extension<Caller>,
    Json(call): Json<RenewCall>,
) -> Result<Json<RenewReply>, SwarmError> {
    let (cluster, node) =
        manager.store().shared().read(|s| (s.cluster().cloned(), s.nodes.get(&caller.node_id).cloned()));
    let cluster = cluster.ok_or(SwarmError::Unreachable("the swarm is starting".into()))?;
    let node = node.ok_or_else(|| SwarmError::NotFound(format!("node {} not found", caller.node_id)))?;
    let identity = NodeIdentity { node_id: node.id.clone(), role: node.spec.role, cluster_id: cluster.info.id.clone() };
    let cert_pem = root_ca::issue(&cluster, &call.csr_pem, &identity)?;
    Ok(Json(RenewReply { cert_pem, role: identity.role, root_pem: cluster.trust_bundle() }))
}

async fn heartbeat(
    State(manager): State<Arc<Manager>>,
    Extension(Caller(caller)): Extension<Caller>,
    Extension(PeerChain(chain)): Extension<PeerChain>,
    Json(call): Json<HeartbeatCall>,
) -> Result<Json<HeartbeatReply>, SwarmError> {
    Ok(Json(manager.dispatcher.heartbeat(&manager, &caller.node_id, &chain, call).await?))
}

/// A node holding a manager certificate (just joined as a manager, or promoted) becomes a
/// raft member.
async fn raft_join(
    State(manager): State<Arc<Manager>>,
    Extension(Caller(caller)): Extension<Caller>,
    Json(call): Json<RaftJoinCall>,
) -> Result<Json<()>, SwarmError> {
    if caller.role != NodeRole::Manager {
        return Err(SwarmError::NotManager);
    }
    let wanted = manager.store().shared().read(|s| s.nodes.get(&caller.node_id).map(|n| n.spec.role));
    if wanted != Some(NodeRole::Manager) {
        return Err(SwarmError::InvalidArgument(format!("node {} is not to be a manager", caller.node_id)));
    }
    if manager.store().shared().read(|s| s.retired_raft_ids.contains(&call.raft_id)) {
        return Err(SwarmError::InvalidArgument(format!(
            "raft member {} belongs to a cluster that was re-created with --force-new-cluster: leave the swarm and join again",
            call.raft_id
        )));
    }
    // One raft member per node, and a member ID is its node's alone: a node holding
    // several would hold several votes.
    let clash = manager.members().into_iter().find(|(id, p)| (*id == call.raft_id) != (p.node_id == caller.node_id));
    if let Some((id, p)) = clash {
        return Err(SwarmError::Conflict(format!(
            "raft member {id} is node {}: node {} cannot join as member {}",
            p.node_id, caller.node_id, call.raft_id
        )));
    }
    let peer = RaftPeer { node_id: caller.node_id.clone(), addr: call.addr.clone() };
    manager.store().add_manager(call.raft_id, peer).await?;
    let status = ManagerStatus { addr: call.addr, ..Default::default() };
    manager
        .store()
        .update::<Node>(&caller.node_id, |node| {
            node.manager_status = Some(status.clone());
            Ok(true)
        })
        .await?;
    info!(node = %caller.node_id, raft_id = call.raft_id, "manager joined raft");
    Ok(Json(()))
}

/// A node leaving the swarm says so, so it shows Down at once (and its hostname can join
/// again) instead of after the heartbeat grace.
async fn leave(
    State(manager): State<Arc<Manager>>,
    Extension(Caller(caller)): Extension<Caller>,
) -> Result<Json<()>, SwarmError> {
    manager
        .store()
        .update::<Node>(&caller.node_id, |node| {
            node.status =
                NodeStatus { state: NodeState::Down, message: "left the swarm".into(), addr: node.status.addr.clone() };
            Ok(true)
        })
        .await?;
    info!(node = %caller.node_id, "node left");
    Ok(Json(()))
}
