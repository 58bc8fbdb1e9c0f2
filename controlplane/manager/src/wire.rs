//! Messages between nodes on the cluster port (JSON over mutual TLS), apart from raft's own.

use serde::{Deserialize, Serialize};
use shoal_api::node::{NodeAvailability, NodeDescription, NodeRole};

/// `POST /join` — the only call made without a certificate: the token is the credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinCall {
    pub token: String,
    /// Request for the joining node's own key; the CA chooses the subject.
    pub csr_pem: String,
    pub advertise_addr: String,
    pub listen_addr: String,
    pub availability: NodeAvailability,
    pub description: NodeDescription,
    /// The same on every retry of one `swarm join`: a retried join whose first try did go
    /// through gets the node it made, not a second one holding the hostname.
    #[serde(default)]
    pub request_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinReply {
    pub node_id: String,
    pub cluster_id: String,
    pub role: NodeRole,
    pub root_pem: String,
    pub cert_pem: String,
    /// Cluster ports of the managers, to fail over between.
    pub managers: Vec<String>,
    /// The swarm's incarnation (`Membership::generation`).
    #[serde(default)]
    pub generation: String,
    /// The swarm's VXLAN port (`ClusterInfo::data_path_port`).
    #[serde(default)]
    pub data_path_port: u16,
}

/// `POST /raft/join` — a node holding a manager certificate asks to become a raft member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RaftJoinCall {
    pub raft_id: u64,
    /// Its cluster port, `IP:port`.
    pub addr: String,
}

/// `POST /heartbeat` — every node, every heartbeat period, to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatCall {
    pub addr: String,
    /// Sent when it changed (first heartbeat after start), so the managers know the node's
    /// resources and platform.
    pub description: Option<NodeDescription>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// False when the callee is not the leader; `leader` says where to go instead.
    pub accepted: bool,
    pub leader: Option<String>,
    /// Nanoseconds until the next heartbeat is due.
    pub period_ns: i64,
    pub managers: Vec<String>,
    /// The role the swarm wants this node in (promote/demote).
    pub role: NodeRole,
    /// Whether this node is a raft voter now (by node ID: addresses can change).
    #[serde(default)]
    pub voter: bool,
    /// The swarm's incarnation: a worker follows it across a `--force-new-cluster`, so a
    /// later promotion speaks to the new one.
    #[serde(default)]
    pub generation: String,
    /// The roots nodes trust now (two during a root rotation): a node holding others takes
    /// these.
    #[serde(default)]
    pub trust_root: String,
    /// The issuer node certificates should have (`TLSInfo.CertIssuerPublicKey`): a node
    /// whose certificate has another renews it (a root rotation).
    #[serde(default)]
    pub cert_issuer_public_key: String,
}

/// `POST /renew` — a fresh certificate for the caller, with the role the store holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewCall {
    pub csr_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewReply {
    /// The certificate, and during a root rotation the chain that lets old nodes check it.
    pub cert_pem: String,
    pub role: NodeRole,
    /// The roots to trust (two during a root rotation).
    #[serde(default)]
    pub root_pem: String,
}

/// Error body of every cluster-port endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReply {
    pub message: String,
}
