//! The swarm's own record: what `GET /swarm` shows (`ClusterInfo`, the view) plus the secrets
//! only managers hold. There is at most one.

use serde::{Deserialize, Serialize};
use shoal_api::swarm::ClusterInfo;

use super::Rules;
use crate::{state::ClusterState, CommandError};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub info: ClusterInfo,
    /// PEM of the root CA key (the whole store is sealed at rest; never in `info`).
    pub root_key_pem: String,
    pub worker_token: String,
    pub manager_token: String,
    /// `SWMKEY-1-...` while autolock is on.
    pub unlock_key: Option<String>,
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
