//! The swarm itself: cluster info, its spec, join tokens, and the requests of
//! `docker swarm init|join|update|unlock` (moby `api/types/swarm/swarm.go`).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// `Version.Index` of a stored object: the raft index of its last change. Updates must
/// carry the current one (`?version=N`), so concurrent writers cannot lose each other's work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ObjectVersion {
    #[serde(default)]
    pub index: u64,
}

/// What the store stamps on every object it keeps (moby's `swarm.Meta`): the version (raft
/// index of the last change) and when the object was created and last changed (RFC 3339).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Meta {
    #[serde(default)]
    pub version: ObjectVersion,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub updated_at: String,
}

/// Name and labels, embedded in every spec (moby's `Annotations`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Annotations {
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub labels: HashMap<String, String>,
}

/// Default heartbeat period of the dispatcher (swarmkit: 5 s).
pub const DEFAULT_HEARTBEAT_PERIOD_NS: i64 = 5_000_000_000;
/// The UDP port of the VXLAN data path when `swarm init` names none (IANA's, as Docker's).
pub const DEFAULT_DATA_PATH_PORT: u16 = 4789;
/// Default node certificate lifetime (swarmkit: 90 days).
pub const DEFAULT_NODE_CERT_EXPIRY_NS: i64 = 90 * 24 * 3600 * 1_000_000_000;
/// Default number of old tasks kept per slot.
pub const DEFAULT_TASK_HISTORY_LIMIT: i64 = 5;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SwarmSpec {
    #[serde(flatten)]
    pub annotations: Annotations,
    #[serde(default)]
    pub orchestration: OrchestrationConfig,
    #[serde(default)]
    pub raft: RaftConfig,
    #[serde(default)]
    pub dispatcher: DispatcherConfig,
    #[serde(default, rename = "CAConfig")]
    pub ca_config: CaConfig,
    #[serde(default)]
    pub task_defaults: TaskDefaults,
    #[serde(default)]
    pub encryption_config: EncryptionConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct OrchestrationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_history_retention_limit: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RaftConfig {
    #[serde(default)]
    pub snapshot_interval: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_old_snapshots: Option<u64>,
    #[serde(default)]
    pub log_entries_for_slow_followers: u64,
    #[serde(default)]
    pub election_tick: i64,
    #[serde(default)]
    pub heartbeat_tick: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DispatcherConfig {
    /// Nanoseconds.
    #[serde(default)]
    pub heartbeat_period: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CaConfig {
    /// Nanoseconds.
    #[serde(default)]
    pub node_cert_expiry: i64,
    #[serde(
        default,
        deserialize_with = "crate::null_as_default",
        rename = "ExternalCAs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub external_cas: Vec<serde_json::Value>,
    #[serde(default, rename = "SigningCACert", skip_serializing_if = "String::is_empty")]
    pub signing_ca_cert: String,
    #[serde(default, rename = "SigningCAKey", skip_serializing_if = "String::is_empty")]
    pub signing_ca_key: String,
    #[serde(default)]
    pub force_rotate: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TaskDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_driver: Option<Driver>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Driver {
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "crate::null_as_default", skip_serializing_if = "HashMap::is_empty")]
    pub options: HashMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EncryptionConfig {
    #[serde(default)]
    pub auto_lock_managers: bool,
}

impl TlsInfo {
    /// Whether the certificates these describe come from the same issuer.
    pub fn same_issuer(&self, other: &TlsInfo) -> bool {
        self.cert_issuer_public_key == other.cert_issuer_public_key
            && self.cert_issuer_subject == other.cert_issuer_subject
    }
}

/// The cluster's root of trust as clients see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TlsInfo {
    /// PEM of the root CA certificate.
    #[serde(default)]
    pub trust_root: String,
    /// DER subject of the issuer, base64 (Go's []byte).
    #[serde(default)]
    pub cert_issuer_subject: String,
    /// DER public key of the issuer, base64 (Go's []byte).
    #[serde(default)]
    pub cert_issuer_public_key: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ClusterInfo {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(flatten)]
    pub meta: Meta,
    pub spec: SwarmSpec,
    #[serde(rename = "TLSInfo")]
    pub tls_info: TlsInfo,
    pub root_rotation_in_progress: bool,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub default_addr_pool: Vec<String>,
    pub subnet_size: u32,
    pub data_path_port: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct JoinTokens {
    pub worker: String,
    pub manager: String,
}

/// `GET /swarm`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Swarm {
    #[serde(flatten)]
    pub cluster: ClusterInfo,
    pub join_tokens: JoinTokens,
}

/// `POST /swarm/init`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct InitRequest {
    pub listen_addr: String,
    pub advertise_addr: String,
    pub data_path_addr: String,
    pub data_path_port: u32,
    pub force_new_cluster: bool,
    pub spec: SwarmSpec,
    pub auto_lock_managers: bool,
    pub availability: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub default_addr_pool: Vec<String>,
    pub subnet_size: u32,
}

/// `POST /swarm/join`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct JoinRequest {
    pub listen_addr: String,
    pub advertise_addr: String,
    pub data_path_addr: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub remote_addrs: Vec<String>,
    pub join_token: String,
    pub availability: String,
}

/// `POST /swarm/unlock`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct UnlockRequest {
    pub unlock_key: String,
}

/// `GET /swarm/unlockkey`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UnlockKeyResponse {
    pub unlock_key: String,
}

/// Where a node is in joining a swarm (`Info.Swarm.LocalNodeState`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalNodeState {
    #[default]
    Inactive,
    Pending,
    Active,
    Error,
    Locked,
}

impl LocalNodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            LocalNodeState::Inactive => "inactive",
            LocalNodeState::Pending => "pending",
            LocalNodeState::Active => "active",
            LocalNodeState::Error => "error",
            LocalNodeState::Locked => "locked",
        }
    }
}

/// A manager as other nodes see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Peer {
    #[serde(rename = "NodeID")]
    pub node_id: String,
    pub addr: String,
}

/// `Info.Swarm`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SwarmInfo {
    #[serde(rename = "NodeID")]
    pub node_id: String,
    pub node_addr: String,
    pub local_node_state: LocalNodeState,
    pub control_available: bool,
    pub error: String,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub remote_managers: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managers: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterInfo>,
}
