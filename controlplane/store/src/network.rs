//! Raft between managers over mutual TLS: the client side (openraft's `RaftNetwork`, one
//! `PeerClient` per target), the server side (`routes`, for the cluster port's router), and
//! forwarding of writes from followers to the leader.

use std::sync::Arc;

use axum::{
    extract::{DefaultBodyLimit, Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use openraft::{
    error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable},
    network::{RPCOption, RaftNetwork, RaftNetworkFactory},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
        VoteResponse,
    },
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use shoal_api::node::NodeRole;

use crate::{
    command::Command,
    raft::{ClusterStore, WriteError},
    transport::Peer,
    types::{Applied, RaftId, RaftPeer, TypeConfig},
};

/// Largest raft message accepted (snapshots travel in chunks well below this).
const MAX_MESSAGE: usize = 64 << 20;

/// A write a follower hands to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Forward {
    Write(Command),
    AddManager { id: RaftId, peer: RaftPeer },
    RemoveManager { id: RaftId },
}

pub type ForwardReply = Result<Option<Applied>, WriteError>;

/// Dials other managers; cheap to clone.
#[derive(Clone)]
pub struct Network {
    client: reqwest::Client,
}

impl Network {
    pub fn new(client: reqwest::Client) -> Self {
        Network { client }
    }

    /// Hands `forward` to the manager at `addr` (the leader).
    pub async fn forward(&self, addr: &str, forward: &Forward) -> ForwardReply {
        let response = self
            .client
            .post(format!("https://{addr}/raft/forward"))
            .json(forward)
            .send()
            .await
            // A leader we cannot reach (refused, reset, timed out) is, to the caller, no
            // leader at all.
            .map_err(|_| WriteError::NoLeader)?;
        response
            .json::<ForwardReply>()
            .await
            .map_err(|e| WriteError::Unavailable(format!("reply from the leader at {addr}: {e}")))?
    }
}

pub struct PeerClient {
    client: reqwest::Client,
    target: RaftId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: RaftId, node: &RaftPeer) -> PeerClient {
        PeerClient { client: self.client.clone(), target, addr: node.addr.clone() }
    }
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<RaftId, RaftPeer, RaftError<RaftId, E>>>;

impl PeerClient {
    async fn call<Req, Resp, E>(&self, path: &str, req: &Req, option: &RPCOption) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
    {
        let response = self
            .client
            .post(format!("https://{}/raft/{path}", self.addr))
            .timeout(option.hard_ttl())
            .json(req)
            .send()
            .await
            .map_err(|e| {
                // A failed connect makes openraft back off; anything later is a network error.
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        let reply: Result<Resp, RaftError<RaftId, E>> =
            response.json().await.map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<RaftId>> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<RaftId>, InstallSnapshotError> {
        let body = SnapshotChunk::encode(rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let response = self
            .client
            .post(format!("https://{}/raft/snapshot", self.addr))
            .timeout(option.hard_ttl())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        let reply: Result<InstallSnapshotResponse<RaftId>, RaftError<RaftId, InstallSnapshotError>> =
            response.json().await.map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(&mut self, rpc: VoteRequest<RaftId>, option: RPCOption) -> RpcResult<VoteResponse<RaftId>> {
        self.call("vote", &rpc, &option).await
    }
}

/// The raft endpoints of the cluster port; only managers of this cluster may call them.
pub fn routes(store: Arc<ClusterStore>) -> Router {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/forward", post(forward))
        .layer(DefaultBodyLimit::max(MAX_MESSAGE))
        .layer(middleware::from_fn_with_state(store.clone(), managers_only))
        .with_state(store)
}

/// Refuses callers without a manager certificate of this cluster, and removed nodes.
async fn managers_only(State(store): State<Arc<ClusterStore>>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>().and_then(|p| p.0.clone());
    let Some(peer) = peer else {
        return (StatusCode::UNAUTHORIZED, "a manager certificate is required").into_response();
    };
    if peer.role != NodeRole::Manager {
        return (StatusCode::FORBIDDEN, "only managers may call raft endpoints").into_response();
    }
    let refused = store.shared().read(|state| {
        state.removed_nodes.contains(&peer.node_id) || state.cluster().is_some_and(|c| c.info.id != peer.cluster_id)
    });
    if refused {
        return (StatusCode::FORBIDDEN, "this node's certificate is no longer valid in the swarm").into_response();
    }
    next.run(req).await
}

async fn append(
    State(store): State<Arc<ClusterStore>>,
    Json(rpc): Json<AppendEntriesRequest<TypeConfig>>,
) -> Json<Result<AppendEntriesResponse<RaftId>, RaftError<RaftId>>> {
    Json(store.raft().append_entries(rpc).await)
}

async fn vote(
    State(store): State<Arc<ClusterStore>>,
    Json(rpc): Json<VoteRequest<RaftId>>,
) -> Json<Result<VoteResponse<RaftId>, RaftError<RaftId>>> {
    Json(store.raft().vote(rpc).await)
}

async fn snapshot(State(store): State<Arc<ClusterStore>>, body: axum::body::Bytes) -> Response {
    match SnapshotChunk::decode(&body) {
        Ok(rpc) => Json(store.raft().install_snapshot(rpc).await).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("snapshot chunk: {e}")).into_response(),
    }
}

/// A snapshot chunk on the wire: the length of a JSON header (vote, metadata, offset,
/// done), the header, then the chunk's bytes as they are — not a JSON array of numbers.
struct SnapshotChunk;

#[derive(Serialize, Deserialize)]
struct ChunkHeader {
    vote: openraft::Vote<RaftId>,
    meta: openraft::SnapshotMeta<RaftId, RaftPeer>,
    offset: u64,
    done: bool,
}

impl SnapshotChunk {
    fn encode(rpc: InstallSnapshotRequest<TypeConfig>) -> Result<Vec<u8>, serde_json::Error> {
        let header =
            serde_json::to_vec(&ChunkHeader { vote: rpc.vote, meta: rpc.meta, offset: rpc.offset, done: rpc.done })?;
        let mut body = Vec::with_capacity(4 + header.len() + rpc.data.len());
        body.extend_from_slice(&(header.len() as u32).to_le_bytes());
        body.extend_from_slice(&header);
        body.extend_from_slice(&rpc.data);
        Ok(body)
    }

    fn decode(body: &[u8]) -> Result<InstallSnapshotRequest<TypeConfig>, String> {
        let (len, rest) = body.split_first_chunk::<4>().ok_or("too short")?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err("header longer than the chunk".into());
        }
        let (header, data) = rest.split_at(len);
        let header: ChunkHeader = serde_json::from_slice(header).map_err(|e| e.to_string())?;
        Ok(InstallSnapshotRequest {
            vote: header.vote,
            meta: header.meta,
            offset: header.offset,
            data: data.to_vec(),
            done: header.done,
        })
    }
}

async fn forward(State(store): State<Arc<ClusterStore>>, Json(forward): Json<Forward>) -> Json<ForwardReply> {
    Json(store.execute_as_leader(forward).await)
}
