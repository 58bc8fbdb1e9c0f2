//! The swarm's own record: what `GET /swarm` shows (`ClusterInfo`, the view) plus the secrets
//! only managers hold. There is at most one.

use serde::{Deserialize, Serialize};
use shoal_api::swarm::ClusterInfo;

use super::Rules;
use crate::{state::ClusterState, CommandError};

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub info: ClusterInfo,
    /// PEM of the root CA key (the whole store is sealed at rest; never in `info`).
    pub root_key_pem: String,
    pub worker_token: String,
    pub manager_token: String,
    /// `SWMKEY-1-...` while autolock is on.
    pub unlock_key: Option<String>,
    /// The root CA being rotated to (`swarm ca --rotate`), until every node holds a
    /// certificate it issued.
    #[serde(default)]
    pub root_rotation: Option<RootRotation>,
}

/// A root rotation under way: the new root, what lets nodes that trust only the old one
/// accept its certificates, and the join tokens that will pin it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootRotation {
    pub cert_pem: String,
    /// PEM of the new root's key (sealed at rest like the rest of the store).
    pub key_pem: String,
    /// The new root's certificate signed by the current root; it follows every certificate
    /// the new root issues in the chain nodes present.
    pub cross_signed_pem: String,
    /// Join tokens pinning the new root, in force once the rotation is done (tokens pinning
    /// the old root are refused then, as Docker's are).
    pub worker_token: String,
    pub manager_token: String,
}

impl Cluster {
    /// The roots a node should trust now: the cluster's, and during a rotation the new one.
    pub fn trust_bundle(&self) -> String {
        let mut bundle = self.info.tls_info.trust_root.clone();
        if let Some(rotation) = &self.root_rotation {
            if !bundle.ends_with('\n') {
                bundle.push('\n');
            }
            bundle.push_str(&rotation.cert_pem);
        }
        bundle
    }

    /// The root that signs node certificates now.
    pub fn signer(&self) -> Signer<'_> {
        match &self.root_rotation {
            Some(r) => Signer { cert_pem: &r.cert_pem, key_pem: &r.key_pem, chain_pem: &r.cross_signed_pem },
            None => Signer { cert_pem: &self.info.tls_info.trust_root, key_pem: &self.root_key_pem, chain_pem: "" },
        }
    }
}

/// A root that signs node certificates, as PEM.
pub struct Signer<'a> {
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
    /// What follows the certificates it issues in a node's chain (mid-rotation: the new root
    /// cross-signed by the old).
    pub chain_pem: &'a str,
}

/// Keys stay out of logs.
impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("info", &self.info)
            .field("root_rotation", &self.root_rotation)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RootRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootRotation").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

stored_object!(Cluster in clusters, id: info.id, meta: info.meta, name: info.spec.annotations.name);

impl Rules for Cluster {
    fn check_create(state: &ClusterState, _new: &Self) -> Result<(), CommandError> {
        if !state.clusters.is_empty() {
            return Err(CommandError::Conflict("this node is already part of a swarm".into()));
        }
        Ok(())
    }

    fn check_update(_state: &ClusterState, old: &Self, new: &Self) -> Result<(), CommandError> {
        if old.info.id != new.info.id {
            return Err(CommandError::Invalid("the cluster ID cannot change".into()));
        }
        Ok(())
    }

    fn check_delete(_state: &ClusterState, _old: &Self) -> Result<(), CommandError> {
        Err(CommandError::FailedPrecondition("the cluster record cannot be deleted".into()))
    }
}
