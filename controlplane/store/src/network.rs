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
    Extension, Json, Router,
};
use openraft::{
    error::{InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable},
    network::{RPCOption, RaftNetwork, RaftNetworkFactory},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
        VoteResponse,
    },
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use shoal_api::node::NodeRole;
use shoal_ca::NodeIdentity;

use crate::{
    append_in_flight::InFlight,
    command::Command,
    raft::{ClusterStore, WriteError},
    transport::Peer,
    types::{Applied, RaftId, RaftPeer, TypeConfig},
};

/// Largest raft message accepted (snapshots travel in chunks well below this).
pub const MAX_MESSAGE: usize = 64 << 20;

/// How long an append carrying entries may take (`append_in_flight`): a 16 MiB entry sent,
/// parsed and fsynced on a loaded machine, with room; a connection that hangs longer is
/// given up and the next call starts afresh.
const APPEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// A write a follower hands to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Forward {
    Write(Command),
    AddManager {
        id: RaftId,
        peer: RaftPeer,
    },
    RemoveManager {
        id: RaftId,
    },
    /// A voter or a learner out (leader-only roles; never forwarded).
    RemoveMember {
        id: RaftId,
    },
}

pub type ForwardReply = Result<Option<Applied>, WriteError>;

/// The header every raft-port request carries: the sender's cluster generation.
pub const GENERATION_HEADER: &str = "x-shoal-generation";

/// Dials other managers; cheap to clone (the clones share the client).
#[derive(Clone)]
pub struct Network {
    client: Arc<std::sync::RwLock<reqwest::Client>>,
    generation: String,
}

impl Network {
    pub fn new(client: reqwest::Client, generation: String) -> Self {
        Network { client: Arc::new(std::sync::RwLock::new(client)), generation }
    }

    /// Dials with `client` from now on: the node's certificate was renewed, or the cluster's
    /// trust changed (a root rotation).
    pub fn set_client(&self, client: reqwest::Client) {
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = client;
    }

    fn post(&self, url: String) -> reqwest::RequestBuilder {
        let client = self.client.read().unwrap_or_else(|p| p.into_inner()).clone();
        client.post(url).header(GENERATION_HEADER, &self.generation)
    }

    /// Asks the manager at `addr` to stand for election now (the leader handing over).
    pub async fn elect(&self, addr: &str) -> Result<(), String> {
        let response = self.post(format!("https://{addr}/raft/elect")).send().await.map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(response.text().await.unwrap_or_default())
        }
    }

    /// Hands `forward` to the manager at `addr` (the leader).
    pub async fn forward(&self, addr: &str, forward: &Forward) -> ForwardReply {
        let response = self
            .post(format!("https://{addr}/raft/forward"))
            .json(forward)
            .send()
            .await
            // A leader we cannot reach is, to the caller, no leader at all; one that got
            // the write and did not answer may have applied it.
            .map_err(|e| {
                if e.is_connect() {
                    WriteError::NoLeader
                } else {
                    WriteError::Ambiguous(format!("the leader at {addr} did not answer: {e}"))
                }
            })?;
        response
            .json::<ForwardReply>()
            .await
            .map_err(|e| WriteError::Unavailable(format!("reply from the leader at {addr}: {e}")))?
    }
}

/// One raft member to call; cheap to clone into a task.
#[derive(Clone)]
struct Target {
    network: Network,
    id: RaftId,
    addr: String,
}

/// openraft's client for one member: the calls, and the append under way to it.
pub struct PeerClient {
    target: Target,
    append: Option<InFlight>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: RaftId, node: &RaftPeer) -> PeerClient {
        PeerClient { target: Target { network: self.clone(), id: target, addr: node.addr.clone() }, append: None }
    }
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<RaftId, RaftPeer, RaftError<RaftId, E>>>;

impl Target {
    async fn call<Req, Resp, E>(&self, path: &str, req: &Req, option: &RPCOption) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
    {
        let body = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.send(path, "application/json", body, Some(option.hard_ttl())).await
    }

    /// POSTs `body` to `/raft/{path}` and decodes openraft's answer; without a `timeout`,
    /// the client's own (`transport::REQUEST_TIMEOUT`) bounds it.
    async fn send<Resp, E>(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        timeout: Option<std::time::Duration>,
    ) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
    {
        let mut request = self.network.post(format!("https://{}/raft/{path}", self.addr));
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let response =
            request.header(reqwest::header::CONTENT_TYPE, content_type).body(body).send().await.map_err(|e| {
                // A failed connect makes openraft back off; anything later is a network error.
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        let reply: Result<Resp, RaftError<RaftId, E>> =
            response.json().await.map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.id, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<RaftId>> {
        // A heartbeat (no entries) is small and must be timely: sent as openraft says.
        if rpc.entries.is_empty() {
            return self.target.call("append", &rpc, &option).await;
        }
        if !self.append.as_ref().is_some_and(|under_way| under_way.answers(&rpc)) {
            let body = serde_json::to_vec(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            // Too big for the receiver: openraft sends fewer entries at a time when told so
            // (every single entry fits: `ClusterStore::write` bounds them).
            if body.len() > MAX_MESSAGE && rpc.entries.len() > 1 {
                return Err(PayloadTooLarge::new_entries_hint(rpc.entries.len() as u64 / 2).into());
            }
            let target = self.target.clone();
            // Replacing one under way (another term or starting point) aborts it.
            self.append = Some(InFlight::start(&rpc, async move {
                target.send("append", "application/json", body, Some(APPEND_TIMEOUT)).await
            }));
        }
        let under_way = self.append.as_mut().expect("an append is under way");
        let answer = under_way.answer(rpc.entries.last().map(|e| e.log_id)).await;
        self.append = None;
        answer
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<RaftId>, InstallSnapshotError> {
        // The follower's log changes under a snapshot: an append's answer from before it
        // (a conflict, say) must not stand for a call after it.
        self.append = None;
        let body = SnapshotChunk::encode(rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.target.send("snapshot", "application/octet-stream", body, Some(option.hard_ttl())).await
    }

    async fn vote(&mut self, rpc: VoteRequest<RaftId>, option: RPCOption) -> RpcResult<VoteResponse<RaftId>> {
        self.target.call("vote", &rpc, &option).await
    }
}

/// The raft endpoints of the cluster port; only managers of this cluster may call them.
pub fn routes(store: Arc<ClusterStore>) -> Router {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/forward", post(forward))
        .route("/raft/elect", post(elect))
        .layer(Extension(Arc::new(std::sync::Mutex::new(Reception::default()))))
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
    // Another incarnation of the cluster (before or after a --force-new-cluster): never
    // heard, whatever this replica holds, an empty one included.
    let generation = req.headers().get(GENERATION_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if generation != store.generation() {
        let message = "this manager belongs to another incarnation of the swarm (re-created with --force-new-cluster): leave the swarm and join again";
        return (StatusCode::FORBIDDEN, message).into_response();
    }
    let (refused, demoted) = store.shared().read(|state| {
        let refused = state.removed_nodes.contains(&peer.node_id)
            || state.cluster().is_some_and(|c| c.info.id != peer.cluster_id);
        // A manager certificate outlives a demotion: once the store says worker and raft
        // no longer has the node as a voter, the certificate no longer opens raft.
        let worker = state.nodes.get(&peer.node_id).is_some_and(|n| n.spec.role != NodeRole::Manager);
        (refused, worker)
    });
    if refused {
        return (StatusCode::FORBIDDEN, "this node's certificate is no longer valid in the swarm").into_response();
    }
    if demoted && !store.voter_nodes().contains(&peer.node_id) {
        return (StatusCode::FORBIDDEN, "this node is no longer a manager").into_response();
    }
    next.run(req).await
}

/// Why a raft message was refused although its sender holds a manager certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SenderError {
    #[error("raft member {0} belongs to a cluster that was re-created with --force-new-cluster: this manager must leave the swarm and join again")]
    Retired(RaftId),
    #[error("node {node} may not speak for raft member {member}")]
    Impersonation { node: String, member: RaftId },
    #[error("raft member {member} is not a member of this cluster and node {node} is not one of its managers")]
    Stranger { node: String, member: RaftId },
}

/// Whether the node in `peer`'s certificate may send raft messages as member `sender` (the
/// leader or candidate the message names). A member known to this replica must be that
/// very node; an unknown one (added after what this replica has seen) must at least be one
/// of the cluster's managers; a replica that knows no members yet (a manager joining)
/// hears its leader.
pub fn check_sender(
    store: &ClusterStore,
    peer: &NodeIdentity,
    sender: RaftId,
    call: RaftCall,
) -> Result<(), SenderError> {
    let (retired, is_manager) = store.shared().read(|s| {
        let is_manager = s.nodes.get(&peer.node_id).is_some_and(|n| n.spec.role == NodeRole::Manager);
        (s.retired_raft_ids.contains(&sender), is_manager)
    });
    if retired {
        return Err(SenderError::Retired(sender));
    }
    let metrics = store.metrics();
    let membership = metrics.membership_config.membership();
    match membership.get_node(&sender) {
        Some(member) if member.node_id == peer.node_id => Ok(()),
        Some(_) => Err(SenderError::Impersonation { node: peer.node_id.clone(), member: sender }),
        // A leader this replica has not heard of yet (added while it was away) must be able
        // to bring it up to date; only votes need a member this replica knows, or a
        // manager of the cluster.
        None if call != RaftCall::Vote || membership.nodes().next().is_none() || is_manager => Ok(()),
        None => Err(SenderError::Stranger { node: peer.node_id.clone(), member: sender }),
    }
}

/// Which raft message a sender sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaftCall {
    Append,
    Vote,
    Snapshot,
}

/// Runs `check_sender` for a handler: the refusal to send back (403 naming the reason), if any.
fn refusal(store: &ClusterStore, peer: &Peer, sender: RaftId, call: RaftCall) -> Option<Response> {
    let Some(identity) = &peer.0 else {
        return Some((StatusCode::UNAUTHORIZED, "a manager certificate is required").into_response());
    };
    let refused = check_sender(store, identity, sender, call).err()?;
    tracing::warn!(node = %identity.node_id, member = sender, error = %refused, "raft message refused");
    Some((StatusCode::FORBIDDEN, refused.to_string()).into_response())
}

async fn append(
    State(store): State<Arc<ClusterStore>>,
    Extension(peer): Extension<Peer>,
    Json(rpc): Json<AppendEntriesRequest<TypeConfig>>,
) -> Response {
    if let Some(refused) = refusal(&store, &peer, rpc.vote.leader_id().node_id, RaftCall::Append) {
        return refused;
    }
    let answer = store.raft().append_entries(rpc).await;
    // Only a leader this replica accepts counts as heard (see `election`).
    if matches!(
        answer,
        Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_) | AppendEntriesResponse::Conflict)
    ) {
        store.heard_from_leader();
    }
    Json(answer).into_response()
}

async fn vote(
    State(store): State<Arc<ClusterStore>>,
    Extension(peer): Extension<Peer>,
    Json(rpc): Json<VoteRequest<RaftId>>,
) -> Response {
    if let Some(refused) = refusal(&store, &peer, rpc.vote.leader_id().node_id, RaftCall::Vote) {
        return refused;
    }
    let answer = store.raft().vote(rpc.clone()).await;
    if let Ok(response) = &answer {
        store.after_vote(&rpc, response);
    }
    Json(answer).into_response()
}

async fn snapshot(
    State(store): State<Arc<ClusterStore>>,
    Extension(peer): Extension<Peer>,
    Extension(reception): Extension<Arc<std::sync::Mutex<Reception>>>,
    body: axum::body::Bytes,
) -> Response {
    let rpc = match SnapshotChunk::decode(&body) {
        Ok(rpc) => rpc,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("snapshot chunk: {e}")).into_response(),
    };
    if let Some(refused) = refusal(&store, &peer, rpc.vote.leader_id().node_id, RaftCall::Snapshot) {
        return refused;
    }
    let accepted = reception.lock().unwrap_or_else(|p| p.into_inner()).accept(&rpc);
    if let Err(e) = accepted {
        return (StatusCode::BAD_REQUEST, format!("snapshot chunk: {e}")).into_response();
    }
    let answer = store.raft().install_snapshot(rpc).await;
    if answer.is_ok() {
        store.heard_from_leader();
    }
    Json(answer).into_response()
}

/// Largest snapshot a manager accepts (a 100k-task state is tens of MB).
const MAX_SNAPSHOT: u64 = 1 << 30;

/// The snapshot being received: chunks must come in order, each where the last ended (or
/// the last again), and the whole stay under `MAX_SNAPSHOT` (openraft would otherwise seek
/// to any offset a sender names and zero-fill the gap in memory).
#[derive(Default)]
struct Reception {
    snapshot_id: String,
    /// Where the last chunk began (a sender whose answer was lost sends it again).
    last: u64,
    next: u64,
}

impl Reception {
    fn accept(&mut self, rpc: &InstallSnapshotRequest<TypeConfig>) -> Result<(), String> {
        if rpc.offset == 0 {
            self.snapshot_id = rpc.meta.snapshot_id.clone();
        } else if rpc.meta.snapshot_id != self.snapshot_id || (rpc.offset != self.next && rpc.offset != self.last) {
            return Err(format!(
                "chunk of snapshot {} at offset {}, expected offset {} of snapshot {}",
                rpc.meta.snapshot_id, rpc.offset, self.next, self.snapshot_id
            ));
        }
        let end = rpc.offset + rpc.data.len() as u64;
        if end > MAX_SNAPSHOT {
            return Err(format!("a snapshot may hold at most {MAX_SNAPSHOT} bytes"));
        }
        (self.last, self.next) = (rpc.offset, end);
        Ok(())
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

/// The leader, stopping, asks this manager to take over: it stands for election at once
/// (the leader, whose log it has, votes for it and steps down). Only the current leader may
/// ask.
async fn elect(State(store): State<Arc<ClusterStore>>, Extension(peer): Extension<Peer>) -> Response {
    let metrics = store.metrics();
    let leader = metrics.current_leader.and_then(|id| metrics.membership_config.membership().get_node(&id).cloned());
    let asked_by_leader = peer.0.as_ref().zip(leader).is_some_and(|(p, l)| p.node_id == l.node_id);
    if !asked_by_leader {
        return (StatusCode::FORBIDDEN, "only the leader may hand over leadership").into_response();
    }
    match store.raft().trigger().elect().await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn forward(State(store): State<Arc<ClusterStore>>, Json(forward): Json<Forward>) -> Json<ForwardReply> {
    Json(store.execute_as_leader(forward).await)
}

#[cfg(test)]
mod tests {
    use openraft::{SnapshotMeta, Vote};

    use super::*;

    fn chunk(id: &str, offset: u64, len: usize) -> InstallSnapshotRequest<TypeConfig> {
        let meta = SnapshotMeta { snapshot_id: id.into(), ..Default::default() };
        InstallSnapshotRequest { vote: Vote::new(1, 1), meta, offset, data: vec![0; len], done: false }
    }

    #[test]
    fn snapshot_chunks_come_in_order_and_within_bounds() {
        let mut reception = Reception::default();
        assert!(reception.accept(&chunk("s1", 0, 10)).is_ok());
        assert!(reception.accept(&chunk("s1", 10, 10)).is_ok());
        assert!(reception.accept(&chunk("s1", 10, 10)).is_ok(), "the last chunk again (its answer was lost)");
        assert!(reception.accept(&chunk("s1", 1 << 40, 1)).is_err(), "a jump that would zero-fill memory");
        assert!(reception.accept(&chunk("s2", 20, 1)).is_err(), "another snapshot's chunk mid-way");
        assert!(reception.accept(&chunk("s1", 20, 10)).is_ok());
        let mut nearly_full = Reception { snapshot_id: "s3".into(), last: 0, next: MAX_SNAPSHOT - 10 };
        assert!(nearly_full.accept(&chunk("s3", MAX_SNAPSHOT - 10, 11)).is_err(), "past the size limit");
    }
}
